"""The two numerics the benchmark compares, and the few fast paths the library does not offer yet.

`reference` reproduces the numerics of NVlabs/edm and NVlabs/edm2 run in fp32: TF32 off, einsum
attention, depthwise-convolution resampling, eager mode, NCHW tensors, a for-loop Adam and a
per-parameter EMA loop. `fast` switches on everything this project adds for speed: bf16 autocast on
CUDA (preconditioning and loss stay in fp32 because autocast only lowers matmuls and convolutions),
TF32 for what remains in fp32, channels-last, SDPA attention, pooling / copying for box-filter
resampling, torch.compile of the network module, fused (CUDA) or foreach Adam, torch._foreach EMA
updates and guidance evaluated as one batched call when the two networks share an architecture. `tests/test_fastpaths.py` checks every switch against the reference numerics.
"""

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from training import networks, phema
from training.guidance import BatchedGuidance, same_architecture  # noqa: F401  (re-exported)

#----------------------------------------------------------------------------
# Variants.

@dataclasses.dataclass(frozen=True)
class Variant:
    """One set of numerics and implementation switches."""
    name:               str                     # 'reference' or 'fast'.
    bf16:               bool                    # bf16 autocast around the network?
    tf32:               bool                    # Allow TF32 in fp32 matmuls and convolutions (CUDA)?
    attention:          str                     # training.networks attention impl: 'reference' or 'sdpa'.
    channels_last:      bool                    # Channels-last weights (convolutions then run channels-last)?
    compile:            bool                    # torch.compile the network module?
    adam:               str                     # 'loop' (for-loop Adam), 'foreach' or 'fused'.
    ema:                str                     # 'loop' (one lerp per parameter) or 'foreach'.
    batched_guidance:   bool                    # net and gnet in one vmapped call when they share an architecture?
    compile_backend:    str     = 'inductor'    # torch.compile backend (tests use 'aot_eager').
    resample:           str     = 'auto'        # training.networks resample impl: 'reference' (convolutions) or 'auto'.


def make_variants(device: torch.device, compile: bool) -> list[Variant]:
    """[reference, fast] for `device`; bf16 autocast and fused Adam only on CUDA."""
    cuda = device.type == 'cuda'
    reference = Variant(name='reference', bf16=False, tf32=False, attention='reference', channels_last=False,
                        compile=False, adam='loop', ema='loop', batched_guidance=False, resample='reference')
    fast = Variant(name='fast', bf16=cuda, tf32=cuda, attention='sdpa', channels_last=True, compile=compile,
                   adam='fused' if cuda else 'foreach', ema='foreach', batched_guidance=True)
    return [reference, fast]


@contextlib.contextmanager
def variant_scope(variant: Variant) -> Iterator[None]:
    """Set the global switches of `variant` (attention and resample impls, TF32) and restore them afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = variant.tf32
    torch.backends.cudnn.allow_tf32 = variant.tf32
    try:
        with networks.attention_impl(variant.attention), networks.resample_impl(variant.resample):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast(variant: Variant, device: torch.device):
    """bf16 autocast context when the variant asks for it, else a no-op context."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=variant.bf16)


def prepare_network(net: torch.nn.Module, variant: Variant) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(module, callable): the module with channels-last weights if asked (convolutions then run
    channels-last whatever the input layout) and, for calling, its compiled form."""
    if variant.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, compile_module(net, variant)


def compile_module(module: torch.nn.Module, variant: Variant) -> torch.nn.Module:
    """torch.compile(module) with the variant's backend, or the module itself when compile is off."""
    return torch.compile(module, backend=variant.compile_backend) if variant.compile else module

#----------------------------------------------------------------------------
# Optimizer and EMA.

def make_adam(params, variant: Variant, **kwargs) -> torch.optim.Adam:
    """torch.optim.Adam with the variant's implementation: for-loop, foreach (multi-tensor) or fused."""
    if variant.adam not in ('loop', 'foreach', 'fused'):
        raise ValueError(f"adam implementation must be one of ('loop', 'foreach', 'fused'), got {variant.adam!r}")
    return torch.optim.Adam(params, foreach=(variant.adam == 'foreach'), fused=(variant.adam == 'fused') or None, **kwargs)


class LoopEMA:
    """Reference EMA update of a training.phema tracker: one `p_net.lerp(p_ema, beta)` per parameter,
    as NVlabs/edm training_loop.py and NVlabs/edm2 phema.py write it, with the tracker's own beta."""

    def __init__(self, tracker):
        self.tracker = tracker

    @torch.no_grad()
    def update(self, cur_nimg: int, batch_size: int) -> None:
        """Advance every EMA of the tracker to cur_nimg, parameter by parameter."""
        net_params = list(self.tracker.net.parameters())
        for ema, beta in self._targets(cur_nimg, batch_size):
            for p_net, p_ema in zip(net_params, ema.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, beta))

    def _targets(self, cur_nimg, batch_size):
        tracker = self.tracker
        if isinstance(tracker, phema.PowerFunctionEMA):  # EDM2 Eq. 127, one beta per profile
            return [(ema, float(phema.power_function_beta(std=std, t_next=cur_nimg, t_delta=batch_size)))
                    for std, ema in zip(tracker.stds, tracker.emas)]
        halflife_Mimg = tracker.halflife_Mimg  # EDM: half-life with ramp-up
        if tracker.rampup_ratio is not None:
            halflife_Mimg = min(halflife_Mimg, cur_nimg / 1e6 * tracker.rampup_ratio)
        return [(tracker.ema, 0.5 ** (batch_size / max(halflife_Mimg * 1e6, 1e-8)))]


def make_ema(net: torch.nn.Module, edm2: bool, variant: Variant):
    """The recipe's EMA tracker (EDM2: power-function stds 0.05/0.10; EDM: 0.5 Mimg half-life, ramp-up 0.05)."""
    tracker = phema.PowerFunctionEMA(net, stds=[0.050, 0.100]) if edm2 else \
        phema.TraditionalEMA(net, halflife_Mimg=0.5, rampup_ratio=0.05)
    return tracker if variant.ema == 'foreach' else LoopEMA(tracker)

#----------------------------------------------------------------------------
# Guidance.

# same_architecture and BatchedGuidance live in the library (training/guidance.py).
