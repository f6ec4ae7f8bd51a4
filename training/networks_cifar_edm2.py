"""The pixel-space CIFAR reimplementation of EDM2 configs C, E and G (FutureXiang/edm2).

Class names, constructor arguments and state_dict keys follow that codebase's model/unet{C,E,G}.py
and model/EDM.py, so its checkpoints ({"MODEL", "EMA", "opt"}, ema-pytorch keys) load unchanged:
39.5 M trainable parameters on CIFAR, 62.4 M on Tiny-ImageNet. Its layout differs from our EDM2
UNet (training/networks_edm2.py: resampling, block order, attention heads, pixel norm, Fourier
parameterisation), so the networks live beside it; the magnitude-preserving math (MPConv, mp_silu,
mp_sum, mp_cat, attention) is reused from there.
"""

from collections.abc import Sequence

import numpy as np
import torch

from torch_utils import persistence

# Pickles embed this file's source; code that runs it elsewhere has only torch, numpy and torch_utils.
try:  # the EDM2 layers are shared with our EDM2 network
    from training.networks_edm2 import MPConv, attention, mp_cat, mp_silu, mp_sum
except ImportError:
    def _needs_this_project(*args, **kwargs):
        raise ImportError('the CIFAR EDM2 networks need training/networks_edm2.py of this project')
    MPConv = attention = mp_cat = mp_silu = mp_sum = _needs_this_project

CONFIGS = ('C', 'E', 'G')
# sqrt(2) rounded to float32, as the reference's np.sqrt(2, dtype=np.float32); a Python number, because torch.compile
# traces numpy calls into the graph, which AOTAutograd's cache then refuses.
_SQRT2_FLOAT32 = float(np.float32(np.sqrt(2)))

#----------------------------------------------------------------------------
# Fixed-function pieces that differ from our EDM2 UNet.

def pix_norm(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over `dim` (FutureXiang/edm2 PixNorm; eps inside the root)."""
    return x / torch.sqrt(torch.mean(x ** 2, dim=dim, keepdim=True) + eps)


def resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    """2x average pooling ('down'), nearest 2x upsampling ('up') or identity ('keep')."""
    if mode == 'down':
        return torch.nn.functional.avg_pool2d(x, 2)
    if mode == 'up':
        return torch.nn.functional.interpolate(x, scale_factor=2, mode='nearest')
    return x


def check_config(config: str) -> None:
    """Raise ValueError unless `config` is one of the reimplemented EDM2 configs."""
    if config not in CONFIGS:
        raise ValueError(f'config must be one of {CONFIGS}, got {config!r}')


def layer(config: str, in_channels: int, out_channels: int, kernel: int = 0) -> torch.nn.Module:
    """Bias-free conv (kernel > 0) or linear layer: plain PyTorch in C, forced weight norm (MPConv) in E and G."""
    if config == 'C':
        if kernel:
            return torch.nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False)
        return torch.nn.Linear(in_channels, out_channels, bias=False)
    return MPConv(in_channels, out_channels, kernel=[kernel, kernel] if kernel else [])

#----------------------------------------------------------------------------

@persistence.persistent_class
class Fourier(torch.nn.Module):
    """cos(2 pi (a f + p)) with frozen f ~ N(0, 1), p ~ U(0, 1); times sqrt(2) in G (EDM2 Eq. 75)."""

    def __init__(self,
        embedding_size: int     = 256,      # Number of features.
        mp:             bool    = False,    # Magnitude-preserving (sqrt(2) scale, config G)?
    ):
        super().__init__()
        self.mp = mp
        self.frequencies = torch.nn.Parameter(torch.randn(embedding_size), requires_grad=False)
        self.phases = torch.nn.Parameter(torch.rand(embedding_size), requires_grad=False)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        y = torch.cos((2 * np.pi) * (a[:, None] * self.frequencies[None, :] + self.phases[None, :]))
        return y * _SQRT2_FLOAT32 if self.mp else y


@persistence.persistent_class
class Gain(torch.nn.Module):
    """One learned scalar gain g (EDM2 Figure 21, config G)."""

    def __init__(self,
        init:   float   = 0.0,  # Initial value: 1 in the residual blocks, 0 at the output.
    ):
        super().__init__()
        self.g = torch.nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.g


@persistence.persistent_class
class Embedding(torch.nn.Module):
    """Noise embedding: Fourier -> linear1 -> SiLU -> linear2 -> SiLU (C, E); MP: Fourier -> linear1 -> mp_silu (G)."""

    def __init__(self,
        n_channels:     int,            # Embedding width (4x the UNet's base channels).
        config:         str = 'C',      # 'C', 'E' or 'G'.
    ):
        super().__init__()
        check_config(config)
        self.config = config
        self.fourier = Fourier(n_channels // 4, mp=(config == 'G'))
        self.linear1 = layer(config, n_channels // 4, n_channels)
        if config != 'G':
            self.linear2 = layer(config, n_channels, n_channels)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        if self.config == 'G':
            return mp_silu(self.linear1(self.fourier(c_noise)))
        emb = torch.nn.functional.silu(self.linear1(self.fourier(c_noise)))
        return torch.nn.functional.silu(self.linear2(emb))


@persistence.persistent_class
class Reweighting(torch.nn.Module):
    """Learned loss weighting u(sigma) = linear(Fourier(ln(sigma) / 4)) (EDM2 Eq. 21)."""

    def __init__(self,
        n_channels:     int = 256,      # Fourier features.
        config:         str = 'C',      # 'C', 'E' or 'G'.
    ):
        super().__init__()
        check_config(config)
        self.fourier = Fourier(n_channels, mp=(config == 'G'))
        self.linear = layer(config, n_channels, 1)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        return self.linear(self.fourier(c_noise))

#----------------------------------------------------------------------------

@persistence.persistent_class
class ResBlock(torch.nn.Module):
    """Residual block modulated by the embedding: GroupNorm ADM-style (C, E) or magnitude-preserving (G)."""

    def __init__(self,
        in_channels:    int,                # Input channels.
        out_channels:   int,                # Output channels.
        emb_channels:   int,                # Embedding width.
        dropout:        float   = 0.1,      # Dropout before the second conv.
        flavor:         str     = 'enc',    # 'enc' (G: shortcut first, pixel norm) or 'dec' (G: shortcut last).
        resample_mode:  str     = 'keep',   # 'keep', 'down' (average pool) or 'up' (nearest).
        config:         str     = 'C',      # 'C', 'E' or 'G'.
    ):
        super().__init__()
        check_config(config)
        self.config = config
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.linear = layer(config, emb_channels, out_channels)
        if config == 'G':
            self.gain = Gain(1.0)
        self.shortcut = layer(config, in_channels, out_channels, 1) if in_channels != out_channels else torch.nn.Identity()
        conv1_in = out_channels if (config == 'G' and flavor == 'enc') else in_channels
        self.conv1 = layer(config, conv1_in, out_channels, 3)
        self.conv2 = torch.nn.Sequential(torch.nn.Dropout(dropout), layer(config, out_channels, out_channels, 3))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.config == 'G':
            return self._forward_mp(x, emb)
        gn = torch.nn.functional.group_norm
        r = resample(torch.nn.functional.silu(gn(x, 32)), self.resample_mode)
        r = gn(self.conv1(r), 32) * (1 + self.linear(emb))[:, :, None, None]
        r = self.conv2(torch.nn.functional.silu(r))
        return self.shortcut(resample(x, self.resample_mode)) + r

    def _forward_mp(self, x, emb):
        main = resample(x, self.resample_mode)
        if self.flavor == 'enc':
            main = pix_norm(self.shortcut(main))
        r = self.conv1(mp_silu(main)) * (1 + self.gain(self.linear(emb)))[:, :, None, None]
        r = self.conv2(mp_silu(r))
        if self.flavor == 'dec':
            main = self.shortcut(main)
        return mp_sum(main, r, t=0.3)


@persistence.persistent_class
class AttentionBlock(torch.nn.Module):
    """Cosine self-attention, q/k/v pixel-normalised per head; residual sum (C, E) or mp_sum (G)."""

    def __init__(self,
        n_channels:     int,                # Channels.
        d_k:            int     = None,     # Channels per head; None = one head.
        config:         str     = 'C',      # 'C', 'E' or 'G'.
    ):
        super().__init__()
        check_config(config)
        d_k = n_channels if d_k is None else d_k
        if d_k <= 0 or n_channels % d_k != 0:
            raise ValueError(f'attn_channels_per_head={d_k} must divide the {n_channels} channels of the block')
        self.config = config
        self.n_heads = n_channels // d_k
        self.d_k = d_k
        self.projection = layer(config, n_channels, n_channels * 3, 1)
        self.output = layer(config, n_channels, n_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each head's 3 d_k projected channels are [q | k | v]: split per head, then per tensor.
        qkv = self.projection(x).reshape(x.shape[0], self.n_heads, 3, self.d_k, x.shape[2] * x.shape[3])
        q, k, v = pix_norm(qkv, dim=3).unbind(2)
        res = self.output(attention(q, k, v).reshape(x.shape))
        return mp_sum(x, res, t=0.3) if self.config == 'G' else x + res


@persistence.persistent_class
class UpDownBlock(torch.nn.Module):
    """EncoderBlock / DecoderBlock: residual block, optional attention, then +-256 clamp in E and G."""

    def __init__(self,
        in_channels:    int,                # Input channels.
        out_channels:   int,                # Output channels.
        emb_channels:   int,                # Embedding width.
        dropout:        float,              # Dropout of the residual block.
        flavor:         str,                # 'enc' or 'dec'.
        resample_mode:  str,                # 'keep', 'down' or 'up'.
        has_attn:       bool,               # Append self-attention?
        d_k:            int     = None,     # Channels per attention head; None = one head.
        config:         str     = 'C',      # 'C', 'E' or 'G'.
    ):
        super().__init__()
        self.config = config
        self.resample_mode = resample_mode
        self.res = ResBlock(in_channels, out_channels, emb_channels, dropout, flavor, resample_mode, config)
        self.attn = AttentionBlock(out_channels, d_k, config) if has_attn else torch.nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.res(x, emb))
        return x if self.config == 'C' else torch.clip(x, -256, 256)

#----------------------------------------------------------------------------

class _UNet(torch.nn.Module):
    """U-Net of FutureXiang/edm2 model/unet{C,E,G}.py; `up` blocks are the probe's out_1, out_2, ..."""

    def __init__(self,
        config:                 str,                                        # 'C', 'E' or 'G'.
        image_shape:            Sequence[int]   = (3, 32, 32),              # [channels, height, width].
        n_channels:             int             = 128,                      # Base channels; the embedding has 4x.
        ch_mults:               Sequence[int]   = (1, 2, 2, 2),             # Channel multiplier per resolution.
        is_attn:                Sequence[bool]  = (False, True, False, False),  # Attention per resolution.
        attn_channels_per_head: int             = None,                     # None = one head per attention block.
        dropout:                float           = 0.1,                      # Dropout of every residual block.
        n_blocks:               int             = 3,                        # Encoder: n_blocks - 1 blocks per level (incl. the down block); decoder: n_blocks + 1.
    ):
        super().__init__()
        check_config(config)
        if len(is_attn) != len(ch_mults):
            raise ValueError(f'is_attn={list(is_attn)} needs one entry per ch_mults={list(ch_mults)}')
        if n_blocks < 2:
            raise ValueError(f'n_blocks={n_blocks} must be at least 2')
        if config != 'G' and any(n_channels * m % 32 for m in ch_mults):
            raise ValueError(f'n_channels={n_channels} x ch_mults={list(ch_mults)}: config {config} normalises with '
                             f'GroupNorm(32), so every level needs a multiple of 32 channels')
        self.config = config
        self.image_shape = list(image_shape)
        emb_channels = 4 * n_channels
        blk = dict(emb_channels=emb_channels, dropout=dropout, d_k=attn_channels_per_head, config=config)
        self.image_proj = layer(config, image_shape[0] + 1, n_channels, 3)
        self.embedding = Embedding(emb_channels, config)

        down, skips, cin = [], [n_channels], n_channels
        for level, mult in enumerate(ch_mults):
            cout = n_channels * mult
            for idx in range(n_blocks - 1):
                down.append(UpDownBlock(cin if idx == 0 else cout, cout, flavor='enc', resample_mode='keep', has_attn=is_attn[level], **blk))
                skips.append(cout)
            if level < len(ch_mults) - 1:
                down.append(UpDownBlock(cout, cout, flavor='enc', resample_mode='down', has_attn=False, **blk))
                skips.append(cout)
            cin = cout
        self.down = torch.nn.ModuleList(down)
        self.middle1 = UpDownBlock(cout, cout, flavor='enc', resample_mode='keep', has_attn=True, **blk)
        self.middle2 = UpDownBlock(cout, cout, flavor='enc', resample_mode='keep', has_attn=False, **blk)

        up = []
        for level in reversed(range(len(ch_mults))):
            cout = n_channels * ch_mults[level]
            for _ in range(n_blocks):
                up.append(UpDownBlock(cin + skips.pop(), cout, flavor='dec', resample_mode='keep', has_attn=is_attn[level], **blk))
                cin = cout
            if level > 0:
                up.append(UpDownBlock(cout, cout, flavor='dec', resample_mode='up', has_attn=False, **blk))
        assert not skips
        self.up = torch.nn.ModuleList(up)
        if config == 'G':
            self.final = torch.nn.Sequential(layer(config, cout, image_shape[0], 3), Gain(0.0))
        else:
            self.final = torch.nn.Sequential(torch.nn.GroupNorm(8, cout, affine=False), torch.nn.SiLU(),
                                             layer(config, cout, image_shape[0], 3))

    def forward(self, x: torch.Tensor, t: torch.Tensor, ret_activation: bool = False):
        """F(x; c_noise); with ret_activation also {out_k: output of the k-th `up` block}."""
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        x = self.image_proj(x)
        emb = self.embedding(t)
        skips = [x]
        for block in self.down:
            x = block(x, emb)
            skips.append(x)
        x = self.middle2(self.middle1(x, emb), emb)
        activations = {}
        for idx, block in enumerate(self.up):
            if block.resample_mode != 'up':
                skip = skips.pop()
                x = mp_cat(x, skip) if self.config == 'G' else torch.cat([x, skip], dim=1)
            x = block(x, emb)
            activations[f'out_{idx + 1}'] = x
        out = self.final(x)
        return (out, activations) if ret_activation else out


@persistence.persistent_class
class UNetC(_UNet):
    """EDM2 config C in pixel space: cosine attention, no biases, standard layers."""
    def __init__(self, **kwargs):
        super().__init__('C', **kwargs)


@persistence.persistent_class
class UNetE(_UNet):
    """EDM2 config E in pixel space: C plus forced weight normalisation (EDM2 Eq. 66)."""
    def __init__(self, **kwargs):
        super().__init__('E', **kwargs)


@persistence.persistent_class
class UNetG(_UNet):
    """EDM2 config G in pixel space: magnitude-preserving, no group norms."""
    def __init__(self, **kwargs):
        super().__init__('G', **kwargs)


UNETS = {'C': UNetC, 'E': UNetE, 'G': UNetG}

#----------------------------------------------------------------------------

@persistence.persistent_class
class CifarPrecond(torch.nn.Module):
    """EDM preconditioning + learned loss weighting around UNet<C|E|G> (FutureXiang/edm2 model/EDM.py)."""

    default_sampler = 'cifar-edm2'  # training.sampling: the reference's clipped 18-step Heun sampler

    def __init__(self,
        img_resolution:     int,                # Image resolution.
        img_channels:       int,                # Image channels.
        label_dim:          int     = 0,        # Must be 0: the reference networks are unconditional.
        config:             str     = 'E',      # 'C', 'E' or 'G'.
        sigma_data:         float   = 0.5,      # Expected standard deviation of the training data.
        use_fp16:           bool    = False,    # Accepted for the training loop; the network runs in fp32 (autocast from outside).
        **unet_kwargs,                          # UNet<config> kwargs except image_shape (n_channels, ch_mults, ...).
    ):
        super().__init__()
        check_config(config)
        if label_dim != 0:
            raise ValueError(f'label_dim={label_dim}: the CIFAR EDM2 networks are unconditional; use label_dim=0 (no --cond)')
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = 0
        self.config = config
        self.sigma_data = sigma_data
        self.use_fp16 = use_fp16
        self.nn_model = UNETS[config](image_shape=[img_channels, img_resolution, img_resolution], **unet_kwargs)
        self.reweight_mlp = Reweighting(256, config)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, ret_activation=False):
        """D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma)/4) (EDM Table 1), float32."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_noise = sigma.log().flatten() / 4
        F_x = self.nn_model(c_in * x, c_noise, ret_activation=ret_activation)
        F_x, activations = F_x if ret_activation else (F_x, None)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        result = (D_x,)
        if return_logvar:
            with torch.autocast(x.device.type, enabled=False):
                result += (self.reweight_mlp(c_noise.float()).reshape(-1, 1, 1, 1),)
        if ret_activation:
            result += (activations,)
        return result[0] if len(result) == 1 else result

#----------------------------------------------------------------------------
# The six configurations (config/<dataset>/<C|E>.yaml `network` sections; G uses the E section).

_CIFAR = dict(n_channels=128, ch_mults=[1, 2, 2, 2], is_attn=[False, True, False, False], dropout=0.13, n_blocks=3)
NETWORKS = {
    'cifar10':      dict(img_resolution=32, **_CIFAR),
    'cifar100':     dict(img_resolution=32, **_CIFAR),
    'tinyimagenet': dict(img_resolution=64, n_channels=128, ch_mults=[1, 2, 2, 2], is_attn=[False, False, True, False],
                         dropout=0.1, n_blocks=5),
}


def network_kwargs(dataset: str, config: str) -> dict:
    """CifarPrecond kwargs of one reference configuration, e.g. ('cifar10', 'E')."""
    if dataset not in NETWORKS:
        raise ValueError(f'dataset={dataset!r} must be one of {tuple(NETWORKS)}')
    check_config(config)
    return dict(img_channels=3, config=config, **NETWORKS[dataset])


def parse_reference_config(name: str) -> tuple[str, str]:
    """'cifar10-e' / 'cifar10/E' -> ('cifar10', 'E'), naming the valid choices otherwise."""
    parts = name.replace('/', '-').rsplit('-', 1)
    if len(parts) != 2 or parts[0].lower() not in NETWORKS or parts[1].upper() not in CONFIGS:
        choices = [f'{d}-{c.lower()}' for d in NETWORKS for c in CONFIGS]
        raise ValueError(f'{name!r} is not a reference configuration; choose one of {", ".join(choices)}')
    return parts[0].lower(), parts[1].upper()

#----------------------------------------------------------------------------
# Reference checkpoints: <save_dir>/ckpts/model_<ep>.pth = {"MODEL", "EMA", "opt"}.

WEIGHTS = {'ema': ('EMA', 'ema_model.'), 'online': ('EMA', 'online_model.'), 'model': ('MODEL', 'module.')}


def reference_state_dict(checkpoint: dict, weights: str = 'ema') -> dict:
    """The EDM-wrapper state_dict inside a reference checkpoint: EMA (ema-pytorch ema_model.*), online, or MODEL (DDP)."""
    if weights not in WEIGHTS:
        raise ValueError(f'weights={weights!r} must be one of {tuple(WEIGHTS)}')
    entry, prefix = WEIGHTS[weights]
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(entry), dict):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f'not a FutureXiang/edm2 checkpoint: expected a dict with "{entry}", found {found}')
    state = checkpoint[entry]
    if entry == 'MODEL' and not any(k.startswith(prefix) for k in state):
        prefix = ''  # saved without DDP
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def check_state_dict(net: torch.nn.Module, state: dict, what: str, max_keys: int = 3) -> None:
    """Raise ValueError naming the first keys that are missing, unexpected or of another shape."""
    ours = net.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    shapes = [f'{k} {list(state[k].shape)} (expected {list(ours[k].shape)})' for k in ours
              if k in state and tuple(state[k].shape) != tuple(ours[k].shape)]
    problems = []
    for label, keys in (('missing', missing), ('unexpected', unexpected), ('wrong shape', shapes)):
        if keys:
            more = f' and {len(keys) - max_keys} more' if len(keys) > max_keys else ''
            problems.append(f'{label}: {", ".join(keys[:max_keys])}{more}')
    if problems:
        raise ValueError(f'{what} does not fit this network ({"; ".join(problems)}); is it a checkpoint of another configuration?')


def load_reference_checkpoint(path: str, reference_config: str, weights: str = 'ema', device=None,
                              **overrides) -> CifarPrecond:
    """CifarPrecond in eval mode with the weights of a FutureXiang/edm2 model_<ep>.pth (EMA by default).

    `overrides` replace network kwargs of the named configuration (e.g. n_channels for an edited YAML).
    """
    dataset, config = parse_reference_config(reference_config)
    import pickle
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f'{path} is not a checkpoint of tensors that loads safely ({str(err).splitlines()[0]})') from None
    state = reference_state_dict(checkpoint, weights)
    net = CifarPrecond(**{**network_kwargs(dataset, config), **overrides})
    check_state_dict(net, state, f'{path} ({weights} weights, as {dataset}-{config.lower()})')
    net.load_state_dict(state)
    net = net.eval().requires_grad_(False)
    return net.to(device) if device is not None else net
