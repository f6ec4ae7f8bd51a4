"""Speed switches of the training and sampling scripts: torch.compile (whole network or per block), and the
checks that turn a fast flag the device cannot honour into one line (and a fallback) instead of a traceback.

Every switch here changes speed only; tests/test_fastpaths.py and tests/test_speed.py hold each one against
the reference numerics on the CPU.
"""

import dataclasses
import functools
import importlib.util
import os
import shutil
import sys

import torch

import dnnlib
from torch_utils import distributed as dist

COMPILE_MODES = ('blocks', 'full')
# What --compile does. On an H200 (docs/performance.md) the whole DDPM++ compiled faster (98 s against 118-134 s
# for its blocks) and trained faster (2,233 against 2,192 img/s), so whole-network compilation is the default.
DEFAULT_COMPILE_MODE = 'full'
DEFAULT_BACKEND = 'inductor'    # tests switch to 'aot_eager' (no C++ or Triton compile)

# The repeated blocks of each backbone, by module and class name (imported lazily: no cycles).
REGION_CLASSES = {
    'training.networks':            ('UNetBlock',),
    'training.networks_edm2':       ('Block',),
    'training.networks_ddpm':       ('ResidualBlock', 'AttentionBlock'),
    'training.networks_cifar_edm2': ('ResBlock', 'AttentionBlock', 'UpDownBlock'),
}

#----------------------------------------------------------------------------
# torch.compile.


def _region_types() -> tuple[type, ...]:
    types = []
    for module_name, class_names in REGION_CLASSES.items():
        module = importlib.import_module(module_name)
        types += [getattr(module, name) for name in class_names]
    return tuple(types)


def compile_regions(net: torch.nn.Module, backend: str | None = None, inductor_mode: str | None = None,
                    options: dict | None = None) -> list[str]:
    """Compile each repeated block of `net` in place (regional compilation); returns the compiled modules' names.

    Blocks of one class and shape share one compiled graph, so a UNet compiles a handful of graphs instead of one
    huge one, and the state_dict keeps its keys. Shapes stay static (no dynamic-shape kernels).
    """
    region_types = _region_types()
    names = []
    for name, module in net.named_modules():
        if isinstance(module, region_types) and not any(name.startswith(done + '.') for done in names):
            module.compile(backend=backend or DEFAULT_BACKEND, dynamic=False, mode=inductor_mode, options=options)
            names.append(name)
    # Each distinct block configuration is one cache entry of the same code object.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 8 * max(len(names), 1))
    return names


def compile_network(net: torch.nn.Module, mode: str | None = None, backend: str | None = None,
                    inductor_mode: str | None = None, options: dict | None = None) -> torch.nn.Module:
    """The module to call: torch.compile(net) ('full', the default) or `net` with compiled blocks ('blocks').

    Network wrappers that batch or overlap two networks (training/guidance.py) get their blocks compiled.
    `inductor_mode` is torch.compile's mode ('reduce-overhead': CUDA graphs, 'max-autotune-no-cudagraphs', ...),
    `options` its inductor settings (one or the other, as torch.compile takes them).
    """
    mode = mode or DEFAULT_COMPILE_MODE
    backend = backend or DEFAULT_BACKEND
    if mode not in COMPILE_MODES:
        raise ValueError(f'compile mode must be one of {COMPILE_MODES}, got {mode!r}')
    keep_compiled_kernels()
    cacheable_autocast()
    plain_scalars(net)
    from training import guidance
    wrapper = isinstance(net, (guidance.BatchedGuidance, guidance.OverlappedGuidance))
    if mode == 'blocks' or wrapper:
        if compile_regions(net, backend=backend, inductor_mode=inductor_mode, options=options):
            return net
    return torch.compile(net, backend=backend, dynamic=False, mode=inductor_mode, options=options)


def train_compile_options(net: torch.nn.Module, device: torch.device) -> dict | None:
    """Inductor settings for compiling `net` to train on `device`. EDM's SongUNet (DDPM++, NCSN++) on CUDA runs every
    convolution channels-last (force_layout_optimization): inductor's own heuristic declines DDPM++, whose decoder
    convolutions halve the channel count, and cuDNN then spent 45 of the 219 ms of a step transposing around each
    convolution. Measured on DDPM++ only (docs/performance.md); the other backbones keep inductor's choice until
    measured (`python -m bench.sweep_train --net adm-imagenet64 --variants bf16+full,bf16+full+nhwc`)."""
    from training import networks
    song_unet = isinstance(getattr(net, 'model', None), networks.SongUNet)
    return dict(force_layout_optimization=True) if song_unet and device.type == 'cuda' else None


def cacheable_autocast() -> None:
    """Let AOTAutograd's cache keep graphs that switch autocast (GroupNorm turns it off, networks._autocast_off).
    torch treats every private function in a graph as unsafe to cache, so a bf16 network was traced, differentiated
    and partitioned again at every start: 38 of the 45 s of a warm-cache compile of DDPM++ on an H200. Entering and
    leaving autocast is recorded in the graph with its arguments, so the cache key covers it."""
    from torch._inductor import config
    marked = getattr(config, 'unsafe_marked_cacheable_functions', None)
    functions = [getattr(torch.amp.autocast_mode, name, None) for name in ('_enter_autocast', '_exit_autocast')]
    if isinstance(marked, dict):
        for fn in filter(None, functions):
            marked.setdefault(f'{fn.__module__}.{fn.__name__}', torch.__version__)


def plain_scalars(net: torch.nn.Module) -> int:
    """Turn numpy scalar attributes of every submodule (EDM's UNetBlock keeps skip_scale = np.sqrt(0.5), also in
    published pickles) into Python numbers of the same value; returns how many. Dynamo traces a numpy scalar as a
    float64 tensor whose value it cannot fold, gives up on the whole graph and traces the network a second time.
    Eager results do not change: np.float64 is a float subclass, and torch multiplies by its value."""
    import numpy as np
    count = 0
    for module in net.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, np.generic) and value.ndim == 0 and value.dtype.kind in 'fiub':
                setattr(module, name, value.item())
                count += 1
    return count


def autocast_calls(net, device: torch.device, enabled: bool):
    """`net` with only its calls under bf16 autocast, so that what the loss does around them (augmentation,
    noise, weighting) stays fp32. Autocast around the whole loss ran the augmentation's matrix products in
    bf16: its resampling blurred every image (mean square 0.271 -> 0.254 on CIFAR-like data)."""
    if not enabled:
        return net

    def call(*args, **kwargs):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            return net(*args, **kwargs)
    return call


def keep_compiled_kernels() -> str:
    """Point inductor's on-disk cache into the dnnlib cache ($DNNLIB_CACHE_DIR or ~/.cache/dnnlib), unless
    TORCHINDUCTOR_CACHE_DIR is set: its default, /tmp, is lost on reboot and with every container, and with the
    cache a rerun or resume skips most of the compile (measured in docs/performance.md)."""
    return os.environ.setdefault('TORCHINDUCTOR_CACHE_DIR', dnnlib.make_cache_dir_path('torchinductor'))

#----------------------------------------------------------------------------
# What the device can do.


@functools.cache
def compiler_missing(device_type: str) -> str | None:
    """Why torch.compile (inductor) cannot run on `device_type`, or None when it can."""
    if device_type == 'cuda':
        if importlib.util.find_spec('triton') is None:
            return 'torch.compile needs Triton on CUDA, and it is not installed (pip install triton)'
        major, _minor = torch.cuda.get_device_capability()
        if major < 7:
            return f'torch.compile (Triton) needs a GPU of compute capability 7.0 or newer, this one is {major}.x'
        return None
    if device_type == 'cpu':
        compiler = os.environ.get('CXX') or 'g++'
        if shutil.which(compiler) is None and shutil.which('clang++') is None:
            return f'torch.compile on the CPU needs a C++ compiler ({compiler} or clang++), and none is on PATH'
        return None
    if device_type == 'mps':
        return None
    return f'torch.compile is not supported on device type {device_type!r}'


def bf16_missing(device: torch.device) -> str | None:
    """Why bf16 cannot run fast on `device`, or None when it can."""
    if device.type == 'cuda' and not torch.cuda.is_bf16_supported(including_emulation=False):
        return f'{torch.cuda.get_device_name(device)} has no native bf16 (it needs compute capability 8.0 or newer)'
    return None


def honour(flag: str, reason: str | None, explicit: bool) -> bool:
    """True when the switch can stay on; else a one-line error (the user asked for it) or a warning and False."""
    if reason is None:
        return True
    if explicit:
        raise ValueError(f'{flag}: {reason}. Drop {flag} to run without it')
    warn(f'{flag} is off: {reason}')
    return False


def warn(message: str) -> None:
    """One line on stderr (rank 0 only)."""
    if dist.get_rank() == 0:
        print(f'Warning: {message}', file=sys.stderr, flush=True)


def usable_switches(device: torch.device, fast: bool, bf16: bool, compile: bool, bf16_flag: str) -> tuple[bool, bool]:
    """(bf16, compile) with what `device` cannot run turned off: a warning for what --fast chose, a one-line
    ValueError for what the user asked for by name (`bf16_flag`, e.g. '--bf16=1')."""
    if fast and device.type != 'cuda':  # measured gains are CUDA's; bf16 autocast is slow on most CPUs
        if bf16 or compile:
            warn(f'--fast turns nothing on for device {device.type}: bf16 and --compile pay on CUDA GPUs only')
        return False, False
    bf16 = bf16 and honour('--fast (bf16)' if fast else bf16_flag, bf16_missing(device), explicit=not fast)
    compile = compile and honour('--compile', compiler_missing(device.type), explicit=not fast)
    return bf16, compile


def resolve_switches(cfg, device: torch.device):
    """TrainConfig with the speed switches `device` cannot run turned off (usable_switches)."""
    bf16, compile_ = usable_switches(device, cfg.fast, cfg.bf16, cfg.compile, '--bf16=1')
    return dataclasses.replace(cfg, bf16=bf16, compile=compile_)
