"""The DDPM UNet of tqch/ddpm-torch (ddpm_torch/models/unet.py), with its constructor arguments and
state_dict layout, so its published checkpoints load as they are (Ho et al. 2020, App. B), and the
ModelWrapper of its train.py (--block-size: pixel unshuffle around the UNet).

Quirks kept: the stride-2 downsampling conv uses TensorFlow "SAME" padding (0 on top/left, 1 on
bottom/right for even sizes), the sinusoidal embedding divides by half - 1, and the timestep
embedding is taken at the base width `hid_channels`.
"""

import math
import re

import torch
from torch.nn import functional as F

import dnnlib


def get_timestep_embedding(timesteps: torch.Tensor, embed_dim: int) -> torch.Tensor:
    """[sin(t f_k)..., cos(t f_k)...] with f_k = 10000^(-k / (half - 1)) (DDPM's TensorFlow embedding)."""
    half = embed_dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / (half - 1))
    args = timesteps.to(torch.float32)[:, None] * freqs[None, :]
    embedding = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if embed_dim % 2 == 1:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def _init(module, scale: float = 1.0):
    """Xavier-uniform weights with gain sqrt(scale), zero bias (the reference's DEFAULT_INITIALIZER)."""
    torch.nn.init.xavier_uniform_(module.weight, gain=math.sqrt(scale))
    torch.nn.init.zeros_(module.bias)
    return module


def _norm(channels: int) -> torch.nn.GroupNorm:
    return torch.nn.GroupNorm(32, channels, eps=1e-6)


class SamePad2d(torch.nn.Module):
    """TensorFlow 'SAME' padding for a k x k kernel with stride s: total s ceil(h / s - 1) + k - h, extra on the far side."""

    def __init__(self, kernel_size: int, stride: int):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x):
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            total = max(self.stride * math.ceil(size / self.stride - 1) + self.kernel_size - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)


class ResidualBlock(torch.nn.Module):
    """GroupNorm-SiLU-conv twice, timestep embedding added per channel before the second norm."""

    def __init__(self,
        in_channels:    int,            # Input channels.
        out_channels:   int,            # Output channels; a 1x1 conv skip when they differ.
        embed_dim:      int,            # Width of the timestep embedding.
        drop_rate:      float = 0.0,    # Dropout before the second conv.
    ):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = _init(torch.nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.fc = _init(torch.nn.Linear(embed_dim, out_channels))
        self.norm2 = _norm(out_channels)
        self.dropout = torch.nn.Dropout(drop_rate)
        self.conv2 = _init(torch.nn.Conv2d(out_channels, out_channels, 3, padding=1), scale=1e-10)
        self.skip = torch.nn.Identity() if in_channels == out_channels else _init(torch.nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x, t_emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.fc(F.silu(t_emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.skip(x)


class AttentionBlock(torch.nn.Module):
    """Single-head self-attention over all H x W positions, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.project_in = _init(torch.nn.Conv2d(channels, 3 * channels, 1))
        self.project_out = _init(torch.nn.Conv2d(channels, channels, 1), scale=1e-10)

    def forward(self, x, t_emb=None):
        batch, channels, height, width = x.shape
        q, k, v = self.project_in(self.norm(x)).reshape(batch, 3, channels, height * width).unbind(1)
        weights = torch.softmax(torch.einsum('bcq,bck->bqk', q, k) / math.sqrt(channels), dim=-1)
        out = torch.einsum('bqk,bck->bcq', weights, v).reshape(batch, channels, height, width)
        return self.project_out(out) + x


class ResidualAttentionBlock(torch.nn.Sequential):
    """Sequential(ResidualBlock, AttentionBlock) whose forward passes the timestep embedding on (keys .0, .1)."""

    def forward(self, x, t_emb):
        return self[1](self[0](x, t_emb))


def _block(in_channels, out_channels, embed_dim, drop_rate, attn: bool) -> torch.nn.Module:
    block = ResidualBlock(in_channels, out_channels, embed_dim, drop_rate)
    return ResidualAttentionBlock(block, AttentionBlock(out_channels)) if attn else block


class UNet(torch.nn.Module):
    """DDPM UNet (Ho et al. 2020, App. B; ddpm-torch models/unet.py): net(x, t) with integer timesteps t."""

    def __init__(self,
        in_channels:        int,                # Image channels.
        hid_channels:       int,                # Base width (also the sinusoidal embedding width).
        out_channels:       int,                # Output channels (2 x in_channels for learned variance).
        ch_multipliers:     list,               # Width multiplier per level; the first must be 1.
        num_res_blocks:     int,                # Residual blocks per level on the way down.
        apply_attn,                             # Self-attention per level: a list of bools, or one bool for all.
        time_embedding_dim: int | None = None,  # Timestep embedding width; None = 4 x hid_channels.
        drop_rate:          float = 0.0,        # Dropout in every residual block.
        resample_with_conv: bool = True,        # Strided / post-upsampling convs; False = average pool / plain upsampling.
    ):
        super().__init__()
        ch_multipliers = list(ch_multipliers)
        levels = len(ch_multipliers)
        apply_attn = [bool(apply_attn)] * levels if isinstance(apply_attn, bool) else list(apply_attn)
        if ch_multipliers[0] != 1 or len(apply_attn) != levels:
            # The reference builds such a net but cannot run it (its out_conv expects hid_channels).
            raise ValueError(f'ch_multipliers={ch_multipliers} must start with 1 and apply_attn={apply_attn} '
                             f'must have one entry per level')
        self.in_channels, self.hid_channels, self.out_channels = in_channels, hid_channels, out_channels
        self.num_res_blocks, self.levels = num_res_blocks, levels
        embed_dim = time_embedding_dim or 4 * hid_channels
        chs = [hid_channels * m for m in ch_multipliers]
        self.embed = torch.nn.Sequential(_init(torch.nn.Linear(hid_channels, embed_dim)), torch.nn.SiLU(),
                                         _init(torch.nn.Linear(embed_dim, embed_dim)))
        self.in_conv = _init(torch.nn.Conv2d(in_channels, hid_channels, 3, padding=1))
        self.downsamples = torch.nn.ModuleDict()
        for i in range(levels):
            blocks = [_block(chs[i - 1] if i > 0 else hid_channels, chs[i], embed_dim, drop_rate, apply_attn[i])]
            blocks += [_block(chs[i], chs[i], embed_dim, drop_rate, apply_attn[i]) for _ in range(num_res_blocks - 1)]
            if i < levels - 1:
                blocks.append(torch.nn.Sequential(SamePad2d(3, 2), _init(torch.nn.Conv2d(chs[i], chs[i], 3, stride=2)))
                              if resample_with_conv else torch.nn.AvgPool2d(2))
            self.downsamples[f'level_{i}'] = torch.nn.ModuleList(blocks)
        mid = chs[-1]
        self.middle = torch.nn.ModuleList([ResidualBlock(mid, mid, embed_dim, drop_rate), AttentionBlock(mid),
                                           ResidualBlock(mid, mid, embed_dim, drop_rate)])
        self.upsamples = torch.nn.ModuleDict()
        for i in range(levels):   # Registered level 0 first (the state_dict order); run last level first.
            first_in = (chs[-1] if i == levels - 1 else chs[i + 1]) + chs[i]
            last_in = (hid_channels if i == 0 else chs[i - 1]) + chs[i]
            ins = [first_in] + [2 * chs[i]] * (num_res_blocks - 1) + [last_in]
            blocks = [_block(c, chs[i], embed_dim, drop_rate, apply_attn[i]) for c in ins]
            if i > 0:
                upsample = [torch.nn.Upsample(scale_factor=2, mode='nearest')]
                if resample_with_conv:
                    upsample.append(_init(torch.nn.Conv2d(chs[i], chs[i], 3, padding=1)))
                blocks.append(torch.nn.Sequential(*upsample))
            self.upsamples[f'level_{i}'] = torch.nn.ModuleList(blocks)
        self.out_conv = torch.nn.Sequential(_norm(hid_channels), torch.nn.SiLU(),
                                            _init(torch.nn.Conv2d(hid_channels, out_channels, 3, padding=1), scale=1e-10))

    @staticmethod
    def _takes_embedding(module) -> bool:
        return isinstance(module, (ResidualBlock, ResidualAttentionBlock))

    def forward(self, x, t):
        t_emb = self.embed(get_timestep_embedding(t, self.hid_channels))
        h = self.in_conv(x)
        skips = [h]
        for i in range(self.levels):
            for module in self.downsamples[f'level_{i}']:
                h = module(h, t_emb) if self._takes_embedding(module) else module(h)
                skips.append(h)
        h = self.middle[0](h, t_emb)
        h = self.middle[1](h)
        h = self.middle[2](h, t_emb)
        for i in reversed(range(self.levels)):
            for module in self.upsamples[f'level_{i}']:
                h = module(torch.cat([h, skips.pop()], dim=1), t_emb) if self._takes_embedding(module) else module(h)
        return self.out_conv(h)


class ModelWrapper(torch.nn.Module):
    """ddpm-torch train.py's ModelWrapper for --block-size > 1: PixelUnshuffle (space-to-depth) before the UNet,
    PixelShuffle after; the UNet's keys gain the prefix `_model.`, as in the reference's state_dict."""

    def __init__(self,
        block_size: int,    # Side of the pixel blocks folded into channels.
        **unet_kwargs,      # UNet arguments, in_channels and out_channels already multiplied by block_size^2.
    ):
        super().__init__()
        area = block_size ** 2
        if block_size < 1 or unet_kwargs['in_channels'] % area or unet_kwargs['out_channels'] % area:
            raise ValueError(f'--block-size={block_size}: the UNet channels ({unet_kwargs["in_channels"]} in, '
                             f'{unet_kwargs["out_channels"]} out) must be multiples of block_size^2 = {area}')
        self._model = UNet(**unet_kwargs)
        self.pre_transform = torch.nn.PixelUnshuffle(block_size)
        self.post_transform = torch.nn.PixelShuffle(block_size)
        self.block_size = block_size
        self.in_channels, self.out_channels = unet_kwargs['in_channels'] // area, unet_kwargs['out_channels'] // area
        self.hid_channels = self._model.hid_channels

    def forward(self, x, t):
        return self.post_transform(self._model(self.pre_transform(x), t))


def build_unet(unet_kwargs: dict, block_size: int = 1) -> torch.nn.Module:
    """The UNet, wrapped in ModelWrapper when block_size > 1 (ddpm-torch train.py / generate.py)."""
    return ModelWrapper(block_size, **unet_kwargs) if block_size > 1 else UNet(**unet_kwargs)

#----------------------------------------------------------------------------
# Checkpoints in the published layout: {'model': state_dict, 'ema': {'shadow': state_dict, ...},
# 'optimizer': ..., 'epoch': int} (ddpm-torch train.py / generate.py).


def strip_ddp_prefix(state_dict: dict) -> dict:
    """Drop the 'module.' prefix DistributedDataParallel adds to every key."""
    return {(k.split('.', 1)[1] if k.startswith('module.') else k): v for k, v in state_dict.items()}


def unet_kwargs_from_state_dict(state_dict: dict) -> dict:
    """UNet constructor arguments read off a reference state_dict (drop_rate does not show; 0)."""
    def shape(key):
        if key not in state_dict:
            raise ValueError(f'not a DDPM UNet state_dict: key {key!r} is missing')
        return state_dict[key].shape
    hid, in_channels = shape('in_conv.weight')[:2]
    levels = 1 + max(int(k.split('.')[1][len('level_'):]) for k in state_dict if k.startswith('downsamples.level_'))
    ch_multipliers, apply_attn = [], []
    last = max(int(k.split('.')[2]) for k in state_dict if k.startswith('downsamples.level_0.'))
    resample_with_conv = levels == 1 or f'downsamples.level_0.{last}.1.weight' in state_dict
    num_res_blocks = last + 1 - (levels > 1 and resample_with_conv)
    for i in range(levels):
        prefix = f'downsamples.level_{i}.0.'
        attn = any(k.startswith(prefix + '1.project_in') for k in state_dict)
        ch_multipliers.append(shape(prefix + ('0.' if attn else '') + 'conv1.weight')[0] // hid)
        apply_attn.append(attn)
    return dict(in_channels=int(in_channels), hid_channels=int(hid), out_channels=int(shape('out_conv.2.weight')[0]),
                ch_multipliers=ch_multipliers, num_res_blocks=num_res_blocks, apply_attn=apply_attn,
                time_embedding_dim=int(shape('embed.0.weight')[0]), resample_with_conv=resample_with_conv)


def load_state_dict_checked(net: torch.nn.Module, state_dict: dict, source: str) -> None:
    """load_state_dict that names the missing / extra / mis-shaped keys in one line."""
    own = net.state_dict()
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    shapes = [f'{k} {list(state_dict[k].shape)} != {list(v.shape)}' for k, v in own.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    if missing or extra or shapes:
        def show(keys):
            return ', '.join(keys[:5]) + (f' (+{len(keys) - 5} more)' if len(keys) > 5 else '')
        parts = [f'missing keys: {show(missing)}' if missing else '', f'unexpected keys: {show(extra)}' if extra else '',
                 f'shape mismatches: {show(shapes)}' if shapes else '']
        raise ValueError(f'{source}: layout does not match the DDPM UNet; ' + '; '.join(p for p in parts if p))
    net.load_state_dict(state_dict)


def read_checkpoint(path: str, flag: str = '--network') -> dict:
    """A .pt checkpoint (path or URL) as a dict, read safely (weights_only); one-line errors naming `flag`."""
    try:
        local = dnnlib.util.open_url(path, return_filename=True, verbose=False)
        checkpoint = torch.load(local, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f'{flag}={path}: no such file') from None
    except dnnlib.util.UserError:
        raise
    except Exception as err:
        # torch's weights_only refusal is a page of advice; name the object that would run code instead.
        refused = re.search(r'Unsupported global: GLOBAL (\S+)', str(err))
        why = f'it holds {refused.group(1)}' if refused else dnnlib.util.text_line(err)
        raise ValueError(f'{flag}={path}: not a DDPM checkpoint readable without running code ({why})') from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f'{flag}={path}: expected a dict with "model" (and "ema": {{"shadow"}}), got {type(checkpoint).__name__}')
    return checkpoint


def checkpoint_weights(checkpoint: dict, use_ema: bool, source: str) -> dict:
    """The EMA (ema.shadow) or raw weights (model; net of our training states), without DDP's 'module.' prefix."""
    raw_key = 'model' if 'model' in checkpoint else 'net' if 'net' in checkpoint else None
    if raw_key is None:
        raise ValueError(f'{source}: expected a dict with "model" (and "ema": {{"shadow"}}), got {sorted(map(str, checkpoint))}')
    if use_ema:
        if not isinstance(checkpoint.get('ema'), dict) or 'shadow' not in checkpoint['ema']:
            raise ValueError(f'{source}: has no ema.shadow weights; load the raw model weights instead (no --use-ema)')
        state_dict = checkpoint['ema']['shadow']
    else:
        state_dict = checkpoint[raw_key]
    return strip_ddp_prefix(state_dict)


def net_from_state_dict(state_dict: dict, unet_kwargs: dict | None, block_size: int | None, img_channels: int,
                        source: str) -> torch.nn.Module:
    """The (wrapped) UNet a state_dict needs: kwargs given (our `config`) or read off the keys; `_model.` keys mean
    ModelWrapper, whose block size is given or follows from the image channels."""
    wrapped = any(key.startswith('_model.') for key in state_dict)
    if unet_kwargs is not None:
        return build_unet(dict(unet_kwargs), block_size or 1)
    inner = {key[len('_model.'):]: value for key, value in state_dict.items() if key.startswith('_model.')} if wrapped else state_dict
    kwargs = unet_kwargs_from_state_dict(inner)
    if not wrapped:
        return build_unet(kwargs, 1)
    if block_size is None:
        block_size = math.isqrt(max(kwargs['in_channels'] // img_channels, 1))
    if block_size < 2 or block_size ** 2 * img_channels != kwargs['in_channels']:
        raise ValueError(f'{source}: a ModelWrapper (--block-size) checkpoint whose UNet takes {kwargs["in_channels"]} '
                         f'channels, which is not block_size^2 x {img_channels} image channels')
    return build_unet(kwargs, block_size)


def load_checkpoint(path: str, use_ema: bool = True, unet_kwargs: dict | None = None,
                    device: torch.device | str = 'cpu', block_size: int | None = None,
                    img_channels: int = 3) -> tuple[torch.nn.Module, dict]:
    """(Wrapped) UNet from a checkpoint in the published layout, read safely (weights_only); returns (net, checkpoint)."""
    checkpoint = read_checkpoint(path)
    state_dict = checkpoint_weights(checkpoint, use_ema, f'--network={path}')
    net = net_from_state_dict(state_dict, unet_kwargs, block_size, img_channels, f'--network={path}')
    load_state_dict_checked(net, state_dict, f'--network={path}')
    return net.eval().requires_grad_(False).to(device), checkpoint


def load_transfer(net: torch.nn.Module, path: str) -> str:
    """--transfer: copy the EMA weights (else the raw ones) of a DDPM checkpoint, a network-snapshot-*.pt or a
    training-state-*.pt of the DDPM recipe into `net`; returns which weights were used."""
    checkpoint = read_checkpoint(path, flag='--transfer')
    use_ema = isinstance(checkpoint.get('ema'), dict) and 'shadow' in checkpoint['ema']
    state_dict = checkpoint_weights(checkpoint, use_ema, f'--transfer={path}')
    load_state_dict_checked(net, state_dict, f'--transfer={path}')
    return 'ema.shadow' if use_ema else 'model'
