"""EDM2 magnitude-preserving U-Net and its preconditioning.

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models"
(config G of Table 1, Figure 21). Class names, constructor arguments and state_dict layout follow
NVlabs/edm2 training/networks_edm2.py so that its checkpoints load unchanged. The ablation configs
B-F of Table 1 are available through `config=` (docs/edm2-configs.md); size presets at the bottom.
"""

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch

from torch_utils import misc, persistence

# The reference EDM2 code executes this file's source when it loads our pickles, and it has no other
# module of this project: so this file only imports torch, numpy and torch_utils at load time.
try:  # one attention, resampling and weights switch for the whole project, owned by training.networks
    from training.networks import _compiling, box_resample, derived_weight, is_box_filter, use_sdpa
except ImportError:  # running as embedded source inside the reference code: SDPA, convolution resampling
    def use_sdpa(head_channels: int) -> bool:
        return True

    def derived_weight(layer, make, *inputs):
        return make()  # in every call, as the reference

    def _compiling() -> bool:
        return False  # the reference's resample takes its cached constant (const_like) under compile too

    def is_box_filter(resample_filter: Sequence[float]) -> bool:
        return False

    box_resample = None

#----------------------------------------------------------------------------
# Input validation and attention.

def check_inputs(x, noise_labels, class_labels, img_channels: int, img_resolution: int, label_dim: int) -> None:
    """Raise ValueError, naming the expected shape, unless the U-Net inputs fit the network."""
    expected = [img_channels, img_resolution, img_resolution]
    if x.ndim != 4 or list(x.shape[1:]) != expected:
        raise ValueError(f'x must have shape [N, {", ".join(map(str, expected))}], got {list(x.shape)}')
    if noise_labels.numel() != 1 and noise_labels.numel() != x.shape[0]:
        raise ValueError(f'sigma (noise_labels) must have 1 or N={x.shape[0]} elements, got shape {list(noise_labels.shape)}')
    if label_dim == 0:
        return
    if class_labels is None:
        raise ValueError(f'class_labels is required, expected a tensor of shape [N, {label_dim}]')
    if class_labels.ndim != 2 or class_labels.shape[1] != label_dim:
        raise ValueError(f'class_labels must have shape [N, {label_dim}], got {list(class_labels.shape)}')
    if class_labels.shape[0] != x.shape[0] and class_labels.shape[0] != 1:
        raise ValueError(f'class_labels has batch size {class_labels.shape[0]}, expected 1 or {x.shape[0]} to match the images')


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q^T k / sqrt(C)) v over [N, heads, C, L]; SDPA or the reference einsum (see training.networks)."""
    if use_sdpa(q.shape[2]):
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return out.transpose(-1, -2)
    w = torch.einsum('nhcq,nhck->nhqk', q, k / math.sqrt(q.shape[2])).softmax(dim=3)
    return torch.einsum('nhqk,nhck->nhcq', w, v)

#----------------------------------------------------------------------------
# Magnitude-preserving fixed-function layers.

def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """Scale x to unit RMS over `dim` (default: all but the first), EDM2 Eq. 46 / Eq. 66."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = norm * math.sqrt(norm.numel() / x.numel()) + eps  # L2 norm -> RMS
    return x / norm.to(x.dtype)


def _fir_kernel_2d(f: Sequence[float]) -> list:
    # Separable 2D kernel as nested Python floats: a constant that keeps torch.compile graphs clean.
    if len(f) % 2 != 0:
        raise ValueError(f'resample_filter must have an even number of taps, got {list(f)}')
    taps = [float(v) / float(sum(f)) for v in f]
    return [[a * b for b in taps] for a in taps]


def _fir_kernel(f: Sequence[float], x: torch.Tensor) -> torch.Tensor:
    # Eager mode reuses one tensor per filter, dtype and device (misc.const_like, as the reference): building it in
    # every call copied it to the GPU and made the host wait for the device each time. A compiled graph takes the
    # Python floats as a constant.
    if _compiling():
        return torch.tensor(_fir_kernel_2d(f), dtype=x.dtype, device=x.device)[None, None]
    return misc.const_like(x, _fir_kernel_2d(f))[None, None]


def resample(x: torch.Tensor, f: Sequence[float] = (1, 1), mode: str = 'keep') -> torch.Tensor:
    """2x FIR upsampling ('up'), downsampling ('down') or identity ('keep') per channel (EDM2 Fig. 21)."""
    if mode == 'keep':
        return x
    if mode not in ('up', 'down'):
        raise ValueError(f"resample mode must be one of ('keep', 'up', 'down'), got {mode!r}")
    if is_box_filter(f) and (y := box_resample(x, mode)) is not None:
        return y  # the same numbers as the convolutions below (training/networks.py, resampling backend)
    pad = (len(f) - 1) // 2
    kernel = _fir_kernel(f, x)
    c = x.shape[1]
    if mode == 'down':
        return torch.nn.functional.conv2d(x, kernel.tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))
    return torch.nn.functional.conv_transpose2d(x, (kernel * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU, EDM2 Eq. 81."""
    return torch.nn.functional.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving weighted sum (1-t) a + t b, EDM2 Eq. 88."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation with balance t, EDM2 Eq. 103."""
    na, nb = a.shape[dim], b.shape[dim]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (scale / math.sqrt(na) * (1 - t)), b * (scale / math.sqrt(nb) * t)], dim=dim)

#----------------------------------------------------------------------------

@persistence.persistent_class
class MPFourier(torch.nn.Module):
    """Magnitude-preserving Fourier features sqrt(2) cos(2 pi (f x + phi)), EDM2 Eq. 75."""

    def __init__(self,
        num_channels:   int,            # Output dimensionality.
        bandwidth:      float   = 1,    # Standard deviation of the random frequencies.
    ):
        super().__init__()
        self.register_buffer('freqs', 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer('phases', 2 * np.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32))
        y = (y + self.phases.to(torch.float32)).cos() * math.sqrt(2)
        return y.to(x.dtype)


@persistence.persistent_class
class MPConv(torch.nn.Module):
    """Magnitude-preserving convolution / linear layer (EDM2 Eq. 47) with forced weight normalization (Eq. 66)."""

    def __init__(self,
        in_channels:    int,            # Input channels (fan-in per output, times kernel area).
        out_channels:   int,            # Output channels.
        kernel:         Sequence[int],  # [] = fully-connected, [kh, kw] = convolution.
        forced:         bool    = True, # Renormalize the stored weight in training (config E+); False = config D.
    ):
        super().__init__()
        self.out_channels = out_channels
        self.forced = forced
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain=1) -> torch.Tensor:
        w = derived_weight(self, lambda: self._weight(x.dtype, gain), x.dtype, gain)  # sampling: derived once
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=(w.shape[-1] // 2,))

    def _weight(self, dtype: torch.dtype, gain) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        if self.training and self.forced:
            # Forced: the stored weight itself stays at unit norm. Writing through a detached alias
            # (not `with no_grad(): weight.copy_()`) because inductor drops the latter (torch 2.13).
            self.weight.detach().copy_(normalize(w.detach()))
        w = normalize(w)  # and the gradient sees a normalized weight (standard weight normalization)
        w = w * (gain / math.sqrt(w.numel() // w.shape[0]))  # unit fan-in variance
        return w.to(dtype)

#----------------------------------------------------------------------------
# Ablation configs of EDM2 Table 1 (network part; see docs/edm2-configs.md). Each config adds one
# step to the previous one; 'G' is the published network and the only one with reference weights.

@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Feature switches that distinguish the configs B-G of EDM2 Table 1."""
    adm_layers:     bool    # B: biases, learned GroupNorm scale/shift, scale+shift modulation, positional embedding + MLP.
    cosine_attn:    bool    # C+: q, k, v normalized per head; biases removed, a constant input channel instead.
    weight_norm:    str     # 'none' (B, C), 'standard' (D: MPConv), 'forced' (E+: MPConv with forced normalization).
    group_norms:    bool    # B-E: GroupNorm in the residual, attention and output paths; F+: pixel norm in the encoder.
    mp_fixed:       bool    # G: mp_silu / mp_sum / mp_cat, unit-magnitude Fourier features, learned gains, clipping.


CONFIGS = {
    'B': ArchConfig(adm_layers=True,  cosine_attn=False, weight_norm='none',     group_norms=True,  mp_fixed=False),
    'C': ArchConfig(adm_layers=False, cosine_attn=True,  weight_norm='none',     group_norms=True,  mp_fixed=False),
    'D': ArchConfig(adm_layers=False, cosine_attn=True,  weight_norm='standard', group_norms=True,  mp_fixed=False),
    'E': ArchConfig(adm_layers=False, cosine_attn=True,  weight_norm='forced',   group_norms=True,  mp_fixed=False),
    'F': ArchConfig(adm_layers=False, cosine_attn=True,  weight_norm='forced',   group_norms=False, mp_fixed=False),
    'G': ArchConfig(adm_layers=False, cosine_attn=True,  weight_norm='forced',   group_norms=False, mp_fixed=True),
}


def arch_config(config: str) -> ArchConfig:
    """Feature switches of an EDM2 Table 1 config letter."""
    if config not in CONFIGS:
        raise ValueError(f'config must be one of {tuple(CONFIGS)}, got {config!r}')
    return CONFIGS[config]


def learned_layer(cfg: ArchConfig, in_channels: int, out_channels: int, kernel: Sequence[int], zero_init: bool = False):
    """A conv ([kh, kw]) or linear ([]) layer as config `cfg` builds it."""
    if cfg.weight_norm == 'forced':
        return MPConv(in_channels, out_channels, kernel=kernel)  # G passes no `forced`: reference init kwargs
    from training import networks  # B, C reuse EDM's layers; imported on use (see the top of the file)
    if cfg.weight_norm == 'standard':
        return MPConv(in_channels, out_channels, kernel=kernel, forced=False)
    # B: ADM init (uniform, PyTorch-default scale) with biases; C: unit-variance Kaiming, no biases.
    if cfg.adm_layers:
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
    else:
        init = dict(init_mode='kaiming_normal')
    if zero_init:
        init.update(init_weight=0, init_bias=0)
    if kernel:
        return networks.Conv2d(in_channels, out_channels, kernel=kernel[0], bias=cfg.adm_layers, **init)
    return networks.Linear(in_channels, out_channels, bias=cfg.adm_layers, **init)


def group_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """GroupNorm without learned parameters (configs C-E), groups as in EDM's GroupNorm."""
    return torch.nn.functional.group_norm(x, num_groups=min(32, x.shape[1] // 4), eps=eps)

#----------------------------------------------------------------------------

@persistence.persistent_class
class Block(torch.nn.Module):
    """Encoder/decoder residual block with optional self-attention, EDM2 Figure 21."""

    def __init__(self,
        in_channels:        int,                        # Input channels.
        out_channels:       int,                        # Output channels.
        emb_channels:       int,                        # Embedding vector dimensionality.
        flavor:             str     = 'enc',            # 'enc' (skip conv before the branch) or 'dec' (after).
        resample_mode:      str     = 'keep',           # 'keep', 'up' or 'down'.
        resample_filter:    Sequence[float] = (1, 1),   # FIR filter for resampling.
        attention:          bool    = False,            # Append self-attention?
        channels_per_head:  int     = 64,               # Channels per attention head.
        dropout:            float   = 0,                # Dropout probability in the residual branch.
        res_balance:        float   = 0.3,              # mp_sum balance: main branch (0) vs residual (1).
        attn_balance:       float   = 0.3,              # mp_sum balance: main branch (0) vs attention (1).
        clip_act:           float   = 256,              # Clamp outputs to +-clip_act; None = no clamping.
        config:             str     = 'G',              # EDM2 Table 1 config, 'B'..'G'; 'G' = published network.
    ):
        super().__init__()
        if flavor not in ('enc', 'dec'):
            raise ValueError(f"flavor must be one of ('enc', 'dec'), got {flavor!r}")
        cfg = arch_config(config)
        self.config = config
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = resample_filter
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act if cfg.mp_fixed else None
        # With group norms (B-E) both flavors project the skip path after the branch, like ADM.
        self.skip_first = flavor == 'enc' and not cfg.group_norms
        if cfg.mp_fixed:
            self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        if cfg.adm_layers:
            from training.networks import GroupNorm  # imported on use (see the top of the file)
            self.norm0 = GroupNorm(in_channels if not self.skip_first else out_channels)
        self.conv_res0 = learned_layer(cfg, out_channels if self.skip_first else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = learned_layer(cfg, emb_channels, out_channels * (2 if cfg.adm_layers else 1), kernel=[])
        if cfg.adm_layers:
            self.norm1 = GroupNorm(out_channels)
        self.conv_res1 = learned_layer(cfg, out_channels, out_channels, kernel=[3, 3], zero_init=True)
        self.conv_skip = learned_layer(cfg, in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        if self.num_heads != 0 and cfg.adm_layers:
            self.norm2 = GroupNorm(out_channels)
        self.attn_qkv = learned_layer(cfg, out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads != 0 else None
        self.attn_proj = learned_layer(cfg, out_channels, out_channels, kernel=[1, 1], zero_init=True) if self.num_heads != 0 else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Main branch.
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.skip_first:
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        # Residual branch, modulated by the embedding (G: gain starts at 0 => c = 1).
        y = self.conv_res0(self._act(self._norm('norm0', x)))
        y = self._modulate(self._norm('norm1', y), emb)
        if self.training and self.dropout != 0:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if not self.skip_first and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = self._sum(x, y, t=self.res_balance)

        if self.num_heads != 0:
            x = self._sum(x, self._attention(self._norm('norm2', x)), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)  # out of place: vmap (batched guidance) has no rule for clip_
        return x

    @property
    def cfg(self) -> ArchConfig:
        # A property, not an attribute: pickles then hold only the config letter (safe-loader friendly).
        return CONFIGS[self.config]

    def _act(self, x):
        return mp_silu(x) if self.cfg.mp_fixed else torch.nn.functional.silu(x)

    def _sum(self, a, b, t):
        return mp_sum(a, b, t=t) if self.cfg.mp_fixed else a + b  # before G: plain ADM residual sums

    def _norm(self, name, x):
        if not self.cfg.group_norms:
            return x
        return getattr(self, name)(x) if self.cfg.adm_layers else group_norm(x)

    def _modulate(self, y, emb):
        if self.cfg.adm_layers:  # B: ADM adaptive scale and shift
            scale, shift = self.emb_linear(emb).unsqueeze(2).unsqueeze(3).to(y.dtype).chunk(2, dim=1)
            return self._act(torch.addcmul(shift, y, scale + 1))
        c = (self.emb_linear(emb, gain=self.emb_gain) if self.cfg.mp_fixed else self.emb_linear(emb)) + 1
        return self._act(y * c.unsqueeze(2).unsqueeze(3).to(y.dtype))

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        # Cosine attention (C+): q, k, v are pixel-normalized per head.
        y = self.attn_qkv(x)
        y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
        if self.cfg.cosine_attn:
            y = normalize(y, dim=2)
        q, k, v = y.unbind(3)
        y = attention(q, k, v)
        return self.attn_proj(y.reshape(*x.shape))

#----------------------------------------------------------------------------

@persistence.persistent_class
class UNet(torch.nn.Module):
    """EDM2 U-Net backbone, EDM2 Figure 21 (config G; configs B-F of Table 1 on request)."""

    def __init__(self,
        img_resolution:     int,                            # Image resolution.
        img_channels:       int,                            # Image channels.
        label_dim:          int,                            # Class label dimensionality; 0 = unconditional.
        model_channels:     int     = 192,                  # Base multiplier for the number of channels.
        channel_mult:       Sequence[int] = (1, 2, 3, 4),   # Per-resolution channel multipliers.
        channel_mult_noise: int     = None,                 # Noise embedding size multiplier; None = channel_mult[0].
        channel_mult_emb:   int     = None,                 # Embedding size multiplier; None = max(channel_mult).
        num_blocks:         int     = 3,                    # Residual blocks per resolution.
        attn_resolutions:   Sequence[int] = (16, 8),        # Resolutions that get self-attention (B+: none at 32x32).
        label_balance:      float   = 0.5,                  # mp_sum balance: noise embedding (0) vs class embedding (1).
        concat_balance:     float   = 0.5,                  # mp_cat balance: skip connection (0) vs main path (1).
        config:             str     = 'G',                  # EDM2 Table 1 config, 'B'..'G'; 'G' = published network.
        **block_kwargs,                                     # Keyword arguments of Block.
    ):
        super().__init__()
        cfg = arch_config(config)
        self.config = config
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        if config != 'G':
            block_kwargs = dict(block_kwargs, config=config)  # G passes nothing: init kwargs as in the reference
        if cfg.mp_fixed:
            self.out_gain = torch.nn.Parameter(torch.zeros([]))

        # Embedding.
        if cfg.adm_layers:
            from training.networks import GroupNorm, PositionalEmbedding  # imported on use (see the top of the file)
        self.emb_fourier = PositionalEmbedding(cnoise) if cfg.adm_layers else MPFourier(cnoise)
        self.emb_noise = learned_layer(cfg, cnoise, cemb, kernel=[])
        if cfg.adm_layers:
            self.emb_mlp = learned_layer(cfg, cemb, cemb, kernel=[])  # B keeps ADM's two-layer mapping
        self.emb_label = learned_layer(cfg, label_dim, cemb, kernel=[]) if label_dim != 0 else None

        # Encoder; the input gets a constant channel so that the first conv can learn a bias (C+).
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + (0 if cfg.adm_layers else 1)
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f'{res}x{res}_conv'] = learned_layer(cfg, cin, cout, kernel=[3, 3])
            else:
                self.enc[f'{res}x{res}_down'] = Block(cout, cout, cemb, flavor='enc', resample_mode='down', **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f'{res}x{res}_block{idx}'] = Block(cin, cout, cemb, flavor='enc', attention=(res in attn_resolutions), **block_kwargs)

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f'{res}x{res}_in0'] = Block(cout, cout, cemb, flavor='dec', attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = Block(cout, cout, cemb, flavor='dec', **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = Block(cout, cout, cemb, flavor='dec', resample_mode='up', **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f'{res}x{res}_block{idx}'] = Block(cin, cout, cemb, flavor='dec', attention=(res in attn_resolutions), **block_kwargs)
        if cfg.adm_layers:
            self.out_norm = GroupNorm(cout)
        self.out_conv = learned_layer(cfg, cout, img_channels, kernel=[3, 3], zero_init=True)

    def forward(self, x, noise_labels, class_labels):
        check_inputs(x, noise_labels, class_labels, self.img_channels, self.img_resolution, self.label_dim)
        emb = self._embed(noise_labels, class_labels)

        if not self.cfg.adm_layers:
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if 'conv' in name else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if 'block' in name:
                x = self._cat(x, skips.pop())
            x = block(x, emb)
        return self._output(x)

    @property
    def cfg(self) -> ArchConfig:
        return CONFIGS[self.config]

    def _embed(self, noise_labels, class_labels):
        cfg = self.cfg
        act = mp_silu if cfg.mp_fixed else torch.nn.functional.silu
        emb = self.emb_fourier(noise_labels)
        if not cfg.adm_layers and not cfg.mp_fixed:
            emb = emb / math.sqrt(2)  # unit-amplitude cosines before G made them magnitude-preserving
        emb = self.emb_noise(emb)
        if cfg.adm_layers:
            emb = self.emb_mlp(act(emb))
        if self.emb_label is not None:
            label_emb = self.emb_label(class_labels * math.sqrt(class_labels.shape[1]))
            emb = mp_sum(emb, label_emb, t=self.label_balance) if cfg.mp_fixed else emb + label_emb
        return act(emb)

    def _cat(self, x, skip):
        return mp_cat(x, skip, t=self.concat_balance) if self.cfg.mp_fixed else torch.cat([x, skip], dim=1)

    def _output(self, x):
        if self.cfg.mp_fixed:
            return self.out_conv(x, gain=self.out_gain)
        if self.cfg.group_norms:  # B-E keep ADM's output normalization
            x = torch.nn.functional.silu(self.out_norm(x) if self.cfg.adm_layers else group_norm(x))
        return self.out_conv(x)

#----------------------------------------------------------------------------

@persistence.persistent_class
class Precond(torch.nn.Module):
    """EDM preconditioning around the EDM2 U-Net plus the learned uncertainty u(sigma), EDM2 Eq. 21."""

    def __init__(self,
        img_resolution:     int,            # Image resolution.
        img_channels:       int,            # Image channels.
        label_dim:          int,            # Class label dimensionality; 0 = unconditional.
        use_fp16:           bool    = True, # Run the U-Net in float16 (CUDA only)?
        sigma_data:         float   = 0.5,  # Expected standard deviation of the training data.
        logvar_channels:    int     = 128,  # Fourier features of the uncertainty estimate.
        **unet_kwargs,                      # Keyword arguments of UNet.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **unet_kwargs):
        x, sigma, class_labels, dtype = self._prepare_inputs(x, sigma, class_labels, force_fp32)

        # EDM preconditioning, EDM Table 1.
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4

        F_x = self.unet((c_in * x).to(dtype), c_noise, class_labels, **unet_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if return_logvar:
            with torch.autocast(x.device.type, enabled=False):  # scales the whole loss: keep it in fp32
                logvar = self.logvar_linear(self.logvar_fourier(c_noise.float())).reshape(-1, 1, 1, 1)
            return D_x, logvar
        return D_x

    def _prepare_inputs(self, x, sigma, class_labels, force_fp32):
        # As training.preconditioning.prepare_inputs, which this file may not import (see the top).
        sigma = torch.as_tensor(sigma, device=x.device)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is not None:
            if class_labels.numel() % self.label_dim != 0:
                raise ValueError(f'class_labels must have shape [N, {self.label_dim}], got {list(class_labels.shape)}')
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        check_inputs(x, sigma, class_labels, self.img_channels, self.img_resolution, 0 if class_labels is None else self.label_dim)
        if self.label_dim != 0 and class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32
        return x.to(torch.float32), sigma, class_labels, dtype

#----------------------------------------------------------------------------
# Size presets of the EDM2 paper (Table 2 and train_edm2.py): ImageNet-512 in the 64x64x4 latent
# space of the Stable Diffusion VAE, and ImageNet-64 in pixel space. All use the UNet defaults above.

_IMG512 = dict(img_resolution=64, img_channels=4, label_dim=1000)
_IMG64 = dict(img_resolution=64, img_channels=3, label_dim=1000)
PRESETS = {
    'edm2-img512-xxs':  dict(_IMG512, model_channels=64,  dropout=0.00),
    'edm2-img512-xs':   dict(_IMG512, model_channels=128, dropout=0.00),
    'edm2-img512-s':    dict(_IMG512, model_channels=192, dropout=0.00),
    'edm2-img512-m':    dict(_IMG512, model_channels=256, dropout=0.10),
    'edm2-img512-l':    dict(_IMG512, model_channels=320, dropout=0.10),
    'edm2-img512-xl':   dict(_IMG512, model_channels=384, dropout=0.10),
    'edm2-img512-xxl':  dict(_IMG512, model_channels=448, dropout=0.10),
    'edm2-img64-xs':    dict(_IMG64,  model_channels=128, dropout=0.00),
    'edm2-img64-s':     dict(_IMG64,  model_channels=192, dropout=0.00),
    'edm2-img64-m':     dict(_IMG64,  model_channels=256, dropout=0.10),
    'edm2-img64-l':     dict(_IMG64,  model_channels=320, dropout=0.10),
    'edm2-img64-xl':    dict(_IMG64,  model_channels=384, dropout=0.10),
}


def preset_kwargs(name: str, **overrides) -> dict:
    """Precond kwargs of a size preset, e.g. 'edm2-img512-s' (also 'img512-s', 'S' = img512), with overrides."""
    key = name.lower()
    if not key.startswith('edm2-'):
        key = f'edm2-img512-{key}' if '-' not in key else f'edm2-{key}'
    if key not in PRESETS:
        raise ValueError(f'unknown EDM2 preset {name!r}; choose one of {sorted(PRESETS)}')
    return {**PRESETS[key], **overrides}


def build_preset(name: str, **overrides) -> Precond:
    """Construct the Precond network of a size preset (build under torch.device('meta') to only count)."""
    return Precond(**preset_kwargs(name, **overrides))
