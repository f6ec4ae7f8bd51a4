"""EDM backbones: DDPM++ / NCSN++ (SongUNet) and ADM (DhariwalUNet) with their layers.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
Appendix F.2. Class names, constructor arguments and state_dict layout follow NVlabs/edm so that
its checkpoints load unchanged. Preconditioning wrappers live in training/preconditioning.py and
resolve here too (`training.networks.EDMPrecond`, as reference pickles and configs name them).
This file imports only torch, numpy and torch_utils at load time: the reference code executes its
source when it loads our pickles.
"""

import contextlib
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.nn.functional import silu

from torch_utils import persistence

try:  # this project only: where the reference code runs the source stored in our pickles, the einsum path runs
    from training import attention_ops as _attention_ops
except ImportError:
    _attention_ops = None
# Inside the reference code (which may run a torch older than ours) every layer computes as the reference's does.
_IN_PROJECT = _attention_ops is not None


def _compiling() -> bool:
    # torch.compiler.is_compiling() arrived in torch 2.3; the reference code may run this source under an older one.
    is_compiling = getattr(getattr(torch, 'compiler', None), 'is_compiling', None)
    return is_compiling is not None and is_compiling()

#----------------------------------------------------------------------------
# Input validation shared by every outer forward().

def _describe_shape(shape: Sequence) -> str:
    return '[' + ', '.join('N' if s is None else str(s) for s in shape) + ']'


def check_shape(name: str, tensor, expected: Sequence) -> None:
    """Raise ValueError unless `tensor` has `expected` shape (None = any size along that dim)."""
    if tensor is None:
        raise ValueError(f'{name} is required, expected a tensor of shape {_describe_shape(expected)}')
    if tensor.ndim != len(expected) or any(e is not None and s != e for s, e in zip(tensor.shape, expected)):
        raise ValueError(f'{name} must have shape {_describe_shape(expected)}, got {list(tensor.shape)}')


def check_batch(name: str, tensor, batch_size: int) -> None:
    """Raise ValueError unless the leading dimension of `tensor` is 1 or `batch_size` (broadcastable)."""
    if tensor.shape[0] != batch_size and tensor.shape[0] != 1:
        raise ValueError(f'{name} has batch size {tensor.shape[0]}, expected 1 or {batch_size} to match the images')

#----------------------------------------------------------------------------
# Backends: process-wide choices of how a layer computes, never what. None touches parameters, so
# state_dicts and constructor arguments are identical under all of them.
#
# Attention: 'sdpa' uses torch's fused scaled_dot_product_attention; 'reference' runs the einsum math of the
# reference code; 'auto' takes SDPA up to SDPA_MAX_HEAD_CHANNELS per head and the einsum above (with DDPM++'s
# single 256-channel head the einsum trained 4% faster on an H200, eager and compiled: docs/performance.md).
#
# Resampling: the reference resamples by per-channel (depthwise) convolutions with its FIR filter. With the box
# filter [1,1] of DDPM++, ADM and EDM2 these compute a 2x2 mean (down) and a nearest 2x copy (up): 'auto' runs
# them as average pooling and nearest upsampling where BOX_RESAMPLE_MODES says so, 'reference' keeps the
# convolutions. Other filters always take the convolutions.
#
# Weights: EDM2's layers derive their weights from their parameters in every call (normalization, gain, cast).
# Inside frozen_weights(), where the caller keeps the parameters as they are (sampling), 'auto' derives them once
# per layer and reuses them in eval mode; 'reference' derives them in every call.

ATTENTION_IMPLS = ('auto', 'sdpa', 'reference')
RESAMPLE_IMPLS = ('auto', 'reference')
WEIGHTS_IMPLS = ('auto', 'reference')
_IMPLS = {'attention': ATTENTION_IMPLS, 'resample': RESAMPLE_IMPLS, 'weights': WEIGHTS_IMPLS}
_backend = {'attention': 'auto', 'resample': 'auto', 'weights': 'auto'}
SDPA_MAX_HEAD_CHANNELS = 128
# Where 'auto' pools or copies, per device type. CUDA: cuDNN's depthwise kernels took 0.8 ms a call at DDPM++'s
# 32x32 level, batch 512 (6% of a training step, 10% of sampling, H200 profiles of sessions 27-28). CPU (2 cores,
# 16x128x32x32, eager): nearest upsampling beat the transposed convolution 1.2-130x, but avg_pool2d never beat
# oneDNN's strided depthwise convolution (2.2 vs 0.7 ms float32 NCHW). Devices not listed convolve.
BOX_RESAMPLE_MODES = {'cuda': ('up', 'down'), 'cpu': ('up',)}


def _set_backend(kind: str, impl: str) -> None:
    if impl not in _IMPLS[kind]:
        raise ValueError(f'{kind} impl must be one of {_IMPLS[kind]}, got {impl!r}')
    _backend[kind] = impl


@contextlib.contextmanager
def _backend_scope(kind: str, impl: str) -> Iterator[None]:
    previous = _backend[kind]
    _set_backend(kind, impl)
    try:
        yield
    finally:
        _backend[kind] = previous


def get_attention_impl() -> str:
    """Name of the attention backend used by every network in this project."""
    return _backend['attention']


def set_attention_impl(impl: str) -> None:
    """Select the attention backend globally: 'auto' (default), 'sdpa' or 'reference' (einsum math)."""
    _set_backend('attention', impl)


def attention_impl(impl: str) -> contextlib.AbstractContextManager:
    """Context manager that temporarily switches the attention backend."""
    return _backend_scope('attention', impl)


def get_resample_impl() -> str:
    """Name of the resampling backend used by every network in this project."""
    return _backend['resample']


def set_resample_impl(impl: str) -> None:
    """Select the resampling backend globally: 'auto' (default) or 'reference' (depthwise convolutions)."""
    _set_backend('resample', impl)


def resample_impl(impl: str) -> contextlib.AbstractContextManager:
    """Context manager that temporarily switches the resampling backend."""
    return _backend_scope('resample', impl)


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Context manager that runs the reference code's kernels: einsum attention, convolution resampling, and
    weights derived in every call."""
    with attention_impl('reference'), resample_impl('reference'), _backend_scope('weights', 'reference'):
        yield


_frozen = {'depth': 0, 'weights': {}}  # frozen_weights(): how deep, and each layer's (key, derived weight)


@contextlib.contextmanager
def frozen_weights() -> Iterator[None]:
    """Context manager for sampling: the caller keeps every parameter as it is inside. Layers in eval mode then
    derive their weights (EDM2's normalized, scaled and cast weights) once and reuse them, with the same numbers.
    A parameter or gain changed in place, moved or replaced is seen, and its weight derived again."""
    _frozen['depth'] += 1
    try:
        yield
    finally:
        _frozen['depth'] -= 1
        if _frozen['depth'] == 0:
            _frozen['weights'].clear()


def _version_key(value):
    if isinstance(value, torch.Tensor):
        return id(value), value._version, value.data_ptr(), value.device, value.dtype
    return value


def derived_weight(layer: torch.nn.Module, make, *inputs):
    """The weight `make()` derives from `layer`'s own parameters and `inputs` (dtypes, gains): computed once and
    reused inside frozen_weights() in eval mode without gradients, with 'auto' weights, outside torch.compile (whose
    graph derives it in its fused kernels); computed in every call otherwise."""
    if _compiling() or not _frozen['depth'] or layer.training or torch.is_grad_enabled():
        return make()
    if _backend['weights'] != 'auto':
        return make()
    try:
        key = tuple(_version_key(value) for value in (*layer.parameters(recurse=False), *inputs))
    except RuntimeError:  # parameters without storage (vmap's batched copies, as in BatchedGuidance): no key
        return make()
    entry = _frozen['weights'].get(id(layer))
    if entry is None or entry[0] != key:
        entry = _frozen['weights'][id(layer)] = (key, make())
    return entry[1]


def is_box_filter(resample_filter: Sequence[float]) -> bool:
    """Whether a 1D FIR filter is the 2-tap box [a, a], whose 2x resampling is a mean or a copy."""
    return len(resample_filter) == 2 and float(resample_filter[0]) == float(resample_filter[1])


def box_resample(x: torch.Tensor, mode: str) -> torch.Tensor | None:
    """2x box resampling of x as the reference's depthwise convolution computes it: 'down' = mean of each 2x2
    block, 'up' = each pixel copied to a 2x2 block; None where the convolution runs instead."""
    if not _IN_PROJECT or _backend['resample'] != 'auto' or mode not in BOX_RESAMPLE_MODES.get(x.device.type, ()):
        return None
    if torch.is_autocast_enabled(x.device.type):  # the convolution would have run in autocast's dtype
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if mode == 'down':
        return torch.nn.functional.avg_pool2d(x, 2)
    return torch.nn.functional.interpolate(x, scale_factor=2, mode='nearest')


class _FP32AttentionWeights(torch.autograd.Function):
    """softmax(q^T k / sqrt(C)) computed in float32 while keeping q, k in their own dtype (EDM)."""

    @staticmethod
    def forward(ctx, q, k):
        weights = _fp32_attention_weights(q, k)
        ctx.save_for_backward(q, k, weights)
        return weights

    @staticmethod
    def backward(ctx, grad_weights):
        q, k, weights = ctx.saved_tensors
        w = weights.to(torch.float32)
        g = grad_weights.to(torch.float32)
        grad_logits = w * (g - (g * w).sum(dim=-1, keepdim=True))  # softmax Jacobian-vector product
        scale = 1 / math.sqrt(k.shape[-2])
        grad_q = torch.einsum('...ck,...qk->...cq', k.to(torch.float32), grad_logits).to(q.dtype) * scale
        grad_k = torch.einsum('...cq,...qk->...ck', q.to(torch.float32), grad_logits).to(k.dtype) * scale
        return grad_q, grad_k


def _fp32_attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The forward of _FP32AttentionWeights, in plain ops. torch.compile differentiates it as it is: AOTAutograd's
    cache refuses graphs that hold a custom autograd.Function, so every start of a compiled DDPM++ (one 256-channel
    head: the einsum path) traced and partitioned the whole network again. Autograd's gradient is the Function's, up
    to the rounding of the saved weights (kept in float32 there, in q's dtype in the Function): the same in float32."""
    scale = 1 / math.sqrt(k.shape[-2])
    logits = torch.einsum('...cq,...ck->...qk', q.to(torch.float32), (k * scale).to(torch.float32))
    return logits.softmax(dim=-1).to(q.dtype)


def use_sdpa(head_channels: int) -> bool:
    """Whether attention over heads of `head_channels` channels runs through SDPA under the current backend."""
    impl = _backend['attention']
    return impl == 'sdpa' or (impl == 'auto' and head_channels <= SDPA_MAX_HEAD_CHANNELS)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp32_weights: bool = True) -> torch.Tensor:
    """Dot-product self-attention softmax(q^T k / sqrt(C)) v over [..., C, L] tensors (Vaswani et al.)."""
    if use_sdpa(q.shape[-2]):
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return out.transpose(-1, -2)
    if fp32_weights and _attention_ops is not None and _backend['attention'] == 'auto' and _attention_ops.supports(q, k):
        # bf16 q, k: the same float32 logits from a bf16 GEMM with float32 output ('reference' keeps the einsum)
        logits = _attention_ops.attention_logits(q, k * (1 / math.sqrt(k.shape[-2])))
        weights = logits.softmax(dim=-1).to(q.dtype)
    elif fp32_weights and _compiling():
        weights = _fp32_attention_weights(q, k)  # the same forward; a custom Function keeps the graph out of the compile cache
    elif fp32_weights:
        weights = _FP32AttentionWeights.apply(q, k)
    else:
        weights = torch.einsum('...cq,...ck->...qk', q, k / math.sqrt(q.shape[-2])).softmax(dim=-1)
    return torch.einsum('...qk,...ck->...cq', weights, v)

#----------------------------------------------------------------------------
# Weight initialization (EDM Appendix F.2: Glorot/He, uniform or normal).

INIT_MODES = ('xavier_uniform', 'xavier_normal', 'kaiming_uniform', 'kaiming_normal')


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random tensor with Xavier (Glorot) or Kaiming (He) variance for the given fans."""
    if mode not in INIT_MODES:
        raise ValueError(f'init_mode must be one of {INIT_MODES}, got {mode!r}')
    fan = (fan_in + fan_out) / 2 if mode.startswith('xavier') else fan_in  # Kaiming here has unit gain
    if mode.endswith('uniform'):
        return np.sqrt(3 / fan) * (torch.rand(*shape) * 2 - 1)
    return np.sqrt(1 / fan) * torch.randn(*shape)

#----------------------------------------------------------------------------

@persistence.persistent_class
class Linear(torch.nn.Module):
    """Fully-connected layer y = x W^T + b with EDM initialization."""

    def __init__(self,
        in_features:    int,                        # Input dimensionality.
        out_features:   int,                        # Output dimensionality.
        bias:           bool    = True,             # Add a learned bias?
        init_mode:      str     = 'kaiming_normal', # One of INIT_MODES.
        init_weight:    float   = 1,                # Multiplier for the initial weight.
        init_bias:      float   = 0,                # Multiplier for the initial bias.
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)

#----------------------------------------------------------------------------

def _resample_kernel(resample_filter: Sequence[float]) -> torch.Tensor:
    f = torch.as_tensor(resample_filter, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square()).reshape(1, 1, len(f), len(f))


@persistence.persistent_class
class Conv2d(torch.nn.Module):
    """2D convolution with optional FIR up/downsampling (Song et al. 2021 resampling, EDM App. F.2)."""

    def __init__(self,
        in_channels:        int,                        # Input channels.
        out_channels:       int,                        # Output channels.
        kernel:             int,                        # Kernel size; 0 = resample only, no weight.
        bias:               bool    = True,             # Add a learned bias?
        up:                 bool    = False,            # Upsample 2x before the convolution?
        down:               bool    = False,            # Downsample 2x before the convolution?
        resample_filter:    Sequence[float] = (1, 1),   # 1D FIR filter, [1,1] = box, [1,3,3,1] = bilinear.
        fused_resample:     bool    = False,            # Merge resampling into the convolution (padding differs).
        init_mode:          str     = 'kaiming_normal', # One of INIT_MODES.
        init_weight:        float   = 1,                # Multiplier for the initial weight.
        init_bias:          float   = 0,                # Multiplier for the initial bias.
    ):
        if up and down:
            raise ValueError('Conv2d: up and down cannot both be True')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        self.register_buffer('resample_filter', _resample_kernel(resample_filter) if up or down else None)
        self.box_filter = (up or down) and is_box_filter(resample_filter)  # resampling may run as pooling / copying

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        conv = torch.nn.functional.conv2d

        if self.fused_resample and self.up and w is not None:
            x = conv(self._resample(x, f, 'up', max(f_pad - w_pad, 0)), w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = self._resample(conv(x, w, padding=w_pad + f_pad), f, 'down', 0)
        else:
            if self.up:
                x = self._resample(x, f, 'up', f_pad)
            if self.down:
                x = self._resample(x, f, 'down', f_pad)
            if w is not None:
                x = conv(x, w, padding=w_pad)
        if self.bias is not None:
            x = x.add_(self.bias.to(x.dtype).reshape(1, -1, 1, 1))
        return x

    def _resample(self, x: torch.Tensor, f: torch.Tensor, mode: str, padding: int) -> torch.Tensor:
        # box_filter is absent from modules saved whole (torch.save) by older versions: they convolve.
        y = box_resample(x, mode) if getattr(self, 'box_filter', False) else None
        if y is not None:
            return y
        if mode == 'up':
            return torch.nn.functional.conv_transpose2d(x, f.mul(4).tile([x.shape[1], 1, 1, 1]), groups=x.shape[1],
                                                        stride=2, padding=padding)
        return torch.nn.functional.conv2d(x, f.tile([x.shape[1], 1, 1, 1]), groups=x.shape[1], stride=2, padding=padding)

#----------------------------------------------------------------------------

def _autocast_off(x: torch.Tensor):
    """Context that turns autocast off for a reduced-precision x; a no-op for float32 or other devices."""
    if x.dtype == torch.float32 or x.device.type not in ('cuda', 'cpu'):
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    """Group normalization (Wu & He 2018) with the group count capped by channels per group."""

    def __init__(self,
        num_channels:           int,            # Channels to normalize.
        num_groups:             int     = 32,   # Upper bound on the number of groups.
        min_channels_per_group: int     = 4,    # Fewer groups if channels per group would drop below this.
        eps:                    float   = 1e-5, # Added to the variance.
    ):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Autocast would run group_norm in float32 and hand float32 to the next layers. Normalizing in the
        # input's dtype instead, as the reference fp16 path does, keeps bf16 activations bf16 (half the traffic).
        with _autocast_off(x):
            return torch.nn.functional.group_norm(x, num_groups=self.num_groups,
                weight=self.weight.to(x.dtype), bias=self.bias.to(x.dtype), eps=self.eps)

#----------------------------------------------------------------------------

@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    """Residual U-Net block with optional resampling and self-attention; the union of DDPM++, NCSN++ and ADM blocks (EDM Table 7)."""

    def __init__(self,
        in_channels:        int,                            # Input channels.
        out_channels:       int,                            # Output channels.
        emb_channels:       int,                            # Embedding vector dimensionality.
        up:                 bool    = False,                # Upsample 2x?
        down:               bool    = False,                # Downsample 2x?
        attention:          bool    = False,                # Append a self-attention layer?
        num_heads:          int     = None,                 # Attention heads; None = out_channels // channels_per_head.
        channels_per_head:  int     = 64,                   # Used when num_heads is None.
        dropout:            float   = 0,                    # Dropout probability before conv1.
        skip_scale:         float   = 1,                    # Scale applied after each residual sum.
        eps:                float   = 1e-5,                 # GroupNorm epsilon.
        resample_filter:    Sequence[float] = [1, 1],       # FIR filter for up/downsampling (a list, as the reference records it).
        resample_proj:      bool    = False,                # 1x1 conv on the skip path even when channels match?
        adaptive_scale:     bool    = True,                 # Embedding gives scale and shift (ADM) instead of a bias (DDPM++).
        init:               dict    = None,                 # Init kwargs for most layers; None = {}.
        init_zero:          dict    = None,                 # Init kwargs for the last layer of each branch; None = zero weights.
        init_attn:          dict    = None,                 # Init kwargs for qkv; None = same as `init`.
    ):
        super().__init__()
        init = dict(init) if init is not None else {}
        init_zero = dict(init_zero) if init_zero is not None else dict(init_weight=0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(in_features=emb_channels, out_features=out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=out_channels * 3, kernel=1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(silu(self.norm0(x)))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x.add_(params)))

        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            # Channel layout of qkv is [head, channel, (q,k,v)], as in the reference checkpoints.
            q, k, v = self.qkv(self.norm2(x)).reshape(x.shape[0] * self.num_heads, x.shape[1] // self.num_heads, 3, -1).unbind(2)
            a = attention(q, k, v, fp32_weights=True)
            x = self.proj(a.reshape(*x.shape)).add_(x)
            x = x * self.skip_scale
        return x

#----------------------------------------------------------------------------

@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal timestep embedding [cos(x f), sin(x f)] of DDPM++ and ADM (Vaswani et al. 2017)."""

    def __init__(self,
        num_channels:   int,            # Output dimensionality (cos half + sin half).
        max_positions:  int     = 10000,# Lowest frequency is 1 / max_positions.
        endpoint:       bool    = False,# Include the lowest frequency exactly?
    ):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = (1 / self.max_positions) ** (freqs / (half - (1 if self.endpoint else 0)))
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    """Random Fourier feature timestep embedding of NCSN++ (Tancik et al. 2020)."""

    def __init__(self,
        num_channels:   int,            # Output dimensionality (cos half + sin half).
        scale:          float   = 16,   # Standard deviation of the random frequencies.
    ):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

#----------------------------------------------------------------------------
# Shared pieces of the two EDM backbones.

def _drop_labels(labels: torch.Tensor, p: float, training: bool, batch_size: int) -> torch.Tensor:
    # Zero whole label vectors with probability p, for classifier-free guidance. One draw per image of the batch,
    # as the reference: a broadcast [1, label_dim] label then gets a mask of its own in every image.
    if not training or not p:
        return labels
    keep = torch.rand([batch_size, 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)


def _check_backbone_inputs(net, x, noise_labels, class_labels, augment_labels) -> None:
    check_shape('x', x, [None, net.in_channels, net.img_resolution, net.img_resolution])
    check_shape('noise_labels', noise_labels, [None])
    check_batch('noise_labels', noise_labels, x.shape[0])
    if net.map_label is not None:
        check_shape('class_labels', class_labels, [None, net.map_label.in_features])
        check_batch('class_labels', class_labels, x.shape[0])
    if net.map_augment is not None and augment_labels is not None:
        check_shape('augment_labels', augment_labels, [x.shape[0], net.map_augment.in_features])

#----------------------------------------------------------------------------

EMBEDDING_TYPES = ('positional', 'fourier')
ENCODER_TYPES = ('standard', 'skip', 'residual')
DECODER_TYPES = ('standard', 'skip')


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f'{name} must be one of {choices}, got {value!r}')


@persistence.persistent_class
class SongUNet(torch.nn.Module):
    """DDPM++ and NCSN++ backbones of Song et al. 2021, as configured in EDM (Table 7, configs A-F)."""

    def __init__(self,
        img_resolution:     int,                            # Image resolution at input and output.
        in_channels:        int,                            # Color channels at input.
        out_channels:       int,                            # Color channels at output.
        label_dim:          int     = 0,                    # Number of class labels; 0 = unconditional.
        augment_dim:        int     = 0,                    # Augmentation label dimensionality; 0 = no augmentation.
        model_channels:     int     = 128,                  # Base multiplier for the number of channels.
        channel_mult:       Sequence[int] = (1, 2, 2, 2),   # Per-resolution channel multipliers.
        channel_mult_emb:   int     = 4,                    # Embedding dimensionality = model_channels * this.
        num_blocks:         int     = 4,                    # Residual blocks per resolution.
        attn_resolutions:   Sequence[int] = (16,),          # Resolutions that get self-attention.
        dropout:            float   = 0.10,                 # Dropout probability inside the blocks.
        label_dropout:      float   = 0,                    # Probability of dropping the class label during training.
        embedding_type:     str     = 'positional',         # 'positional' (DDPM++) or 'fourier' (NCSN++).
        channel_mult_noise: int     = 1,                    # Noise embedding size multiplier: 1 (DDPM++), 2 (NCSN++).
        encoder_type:       str     = 'standard',           # 'standard' (DDPM++), 'skip' or 'residual' (NCSN++).
        decoder_type:       str     = 'standard',           # 'standard' or 'skip'.
        resample_filter:    Sequence[float] = (1, 1),       # [1,1] (DDPM++) or [1,3,3,1] (NCSN++).
    ):
        _check_choice('embedding_type', embedding_type, EMBEDDING_TYPES)
        _check_choice('encoder_type', encoder_type, ENCODER_TYPES)
        _check_choice('decoder_type', decoder_type, DECODER_TYPES)
        super().__init__()
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn,
        )

        # Mapping network.
        if embedding_type == 'positional':
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **init) if label_dim else None
        self.map_augment = Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(in_features=noise_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)

        self.enc = torch.nn.ModuleDict()
        self._build_encoder(img_resolution, in_channels, model_channels, channel_mult, num_blocks,
            attn_resolutions, encoder_type, resample_filter, init, block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]
        self.dec = torch.nn.ModuleDict()
        self._build_decoder(img_resolution, out_channels, model_channels, channel_mult, num_blocks,
            attn_resolutions, decoder_type, resample_filter, init_zero, block_kwargs, skips)

    def _build_encoder(self, img_resolution, in_channels, model_channels, channel_mult, num_blocks,
            attn_resolutions, encoder_type, resample_filter, init, block_kwargs):
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(in_channels=caux, out_channels=caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(in_channels=caux, out_channels=cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(in_channels=caux, out_channels=cout, kernel=3, down=True,
                        resample_filter=resample_filter, fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)

    def _build_decoder(self, img_resolution, out_channels, model_channels, channel_mult, num_blocks,
            attn_resolutions, decoder_type, resample_filter, init_zero, block_kwargs, skips):
        cout = skips[-1]
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = (idx == num_blocks and res in attn_resolutions)  # DDPM++ attends only after the last block
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=attn, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def _embed(self, noise_labels, class_labels, augment_labels, batch_size: int):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [sin, cos] order of Song et al.
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training, batch_size)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        return silu(self.map_layer1(emb))

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        _check_backbone_inputs(self, x, noise_labels, class_labels, augment_labels)
        emb = self._embed(noise_labels, class_labels, augment_labels, x.shape[0])

        # Encoder; the aux_* layers carry the downsampled input image (NCSN++ progressive input).
        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder; the aux_* layers accumulate the output image (progressive output).
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux

#----------------------------------------------------------------------------

@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    """ADM backbone of Dhariwal & Nichol 2021, as configured in EDM (Table 7)."""

    def __init__(self,
        img_resolution:     int,                            # Image resolution at input and output.
        in_channels:        int,                            # Color channels at input.
        out_channels:       int,                            # Color channels at output.
        label_dim:          int     = 0,                    # Number of class labels; 0 = unconditional.
        augment_dim:        int     = 0,                    # Augmentation label dimensionality; 0 = no augmentation.
        model_channels:     int     = 192,                  # Base multiplier for the number of channels.
        channel_mult:       Sequence[int] = (1, 2, 3, 4),   # Per-resolution channel multipliers.
        channel_mult_emb:   int     = 4,                    # Embedding dimensionality = model_channels * this.
        num_blocks:         int     = 3,                    # Residual blocks per resolution.
        attn_resolutions:   Sequence[int] = (32, 16, 8),    # Resolutions that get self-attention.
        dropout:            float   = 0.10,                 # Dropout probability inside the blocks.
        label_dropout:      float   = 0,                    # Probability of dropping the class label during training.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Mapping network.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(in_features=augment_dim, out_features=model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(in_features=model_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)
        self.map_label = Linear(in_features=label_dim, out_features=emb_channels, bias=False, init_mode='kaiming_normal',
            init_weight=np.sqrt(label_dim)) if label_dim else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def _embed(self, noise_labels, class_labels, augment_labels, batch_size: int):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training, batch_size))
        return silu(emb)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        _check_backbone_inputs(self, x, noise_labels, class_labels, augment_labels)
        emb = self._embed(noise_labels, class_labels, augment_labels, x.shape[0])
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))

#----------------------------------------------------------------------------
# Reference pickles and configs name the wrappers `training.networks.<Name>Precond`; they live in
# training/preconditioning.py. Resolved on first access (PEP 562) rather than imported here: the
# reference code executes this file's source from pickles, where that module does not exist.

PRECOND_CLASSES = ('VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond')


def __getattr__(name: str):
    if name in PRECOND_CLASSES:
        import importlib
        return getattr(importlib.import_module('training.preconditioning'), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
