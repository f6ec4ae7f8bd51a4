"""Small tensor, module and sampler helpers (reference torch_utils.misc API)."""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any, Iterator

import numpy as np
import torch

import dnnlib

#----------------------------------------------------------------------------
# Cached constants: avoids re-uploading the same small tensor every call.

_constant_cache = dict()

def constant(value: Any, shape=None, dtype=None, device=None, memory_format=None) -> torch.Tensor:
    """Cached tensor constant of the given value, shape, dtype and device."""
    value = np.asarray(value)
    if shape is not None:
        shape = tuple(shape)
    if dtype is None:
        dtype = torch.get_default_dtype()
    if device is None:
        device = torch.device('cpu')
    if memory_format is None:
        memory_format = torch.contiguous_format
    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format)
    tensor = _constant_cache.get(key, None)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor, _ = torch.broadcast_tensors(tensor, torch.empty(shape))
        tensor = tensor.contiguous(memory_format=memory_format)
        _constant_cache[key] = tensor
    return tensor

def const_like(ref: torch.Tensor, value: Any, shape=None, dtype=None, device=None) -> torch.Tensor:
    """`constant()` with the dtype and device of `ref` unless given."""
    if dtype is None:
        dtype = ref.dtype
    if device is None:
        device = ref.device
    return constant(value, shape=shape, dtype=dtype, device=device)

def nan_to_num(input, nan=0.0, posinf=None, neginf=None, *, out=None):
    """torch.nan_to_num (kept for reference code that calls misc.nan_to_num)."""
    return torch.nan_to_num(input, nan=nan, posinf=posinf, neginf=neginf, out=out)

@contextlib.contextmanager
def suppress_tracer_warnings():
    """Silence torch.jit tracer warnings inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        yield

def assert_shape(tensor: torch.Tensor, ref_shape) -> None:
    """Assert a tensor's shape; None in `ref_shape` matches any size (internal invariant)."""
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f'Wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)}')
    for idx, (size, ref_size) in enumerate(zip(tensor.shape, ref_shape)):
        if ref_size is None:
            pass
        elif isinstance(ref_size, torch.Tensor):
            with suppress_tracer_warnings():
                torch._assert(torch.equal(torch.as_tensor(size), ref_size), f'Wrong size for dimension {idx}')
        elif isinstance(size, torch.Tensor):
            with suppress_tracer_warnings():
                torch._assert(torch.equal(size, torch.as_tensor(ref_size)), f'Wrong size for dimension {idx}: expected {ref_size}')
        elif size != ref_size:
            raise AssertionError(f'Wrong size for dimension {idx}: got {size}, expected {ref_size}')

def profiled_function(fn):
    """Decorator that labels a function in the torch profiler."""
    def decorator(*args, **kwargs):
        with torch.autograd.profiler.record_function(fn.__name__):
            return fn(*args, **kwargs)
    decorator.__name__ = fn.__name__
    return decorator

#----------------------------------------------------------------------------
# Devices.

def choose_device(name: str | torch.device | None = 'auto') -> torch.device:
    """Resolve --device auto|cuda|cuda:N|cpu|mps into a torch.device, with a clear error if absent."""
    if isinstance(name, torch.device):
        return name
    name = (name or 'auto').lower()
    if name == 'auto':
        if torch.cuda.is_available():
            return torch.device('cuda')
        if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
            return torch.device('mps')
        return torch.device('cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f'--device={name!r} is not a device; choose auto, cuda, cuda:N, cpu or mps') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device={name} was asked for, but this PyTorch build sees no CUDA GPU; use --device=cpu (or auto)')
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f'--device={name}: only {torch.cuda.device_count()} CUDA device(s) are visible')
    if device.type == 'mps' and not (getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available()):
        raise ValueError(f'--device={name} was asked for, but MPS is not available here; use --device=cpu (or auto)')
    if device.type not in ('cuda', 'cpu', 'mps'):
        raise ValueError(f'--device={name!r} is not supported; choose auto, cuda, cpu or mps')
    return device

#----------------------------------------------------------------------------
# Data sampling.

class InfiniteSampler(torch.utils.data.Sampler):
    """Endless, seeded, rank-aware sampler that can restart at any index with the same order.

    With `window_size` (EDM behaviour) the order is one shuffle that keeps mixing as it loops;
    with `window_size=None` every epoch gets a fresh seeded permutation (cheap to resume).
    """

    def __init__(self, dataset, rank: int = 0, num_replicas: int = 1, shuffle: bool = True, seed: int = 0,
                 window_size: float | None = 0.5, start_idx: int = 0):
        assert len(dataset) > 0
        assert num_replicas > 0
        assert 0 <= rank < num_replicas
        assert window_size is None or 0 <= window_size <= 1
        super().__init__()
        self.dataset_size = len(dataset)
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.window_size = window_size
        self.start_idx = start_idx

    def __iter__(self) -> Iterator[int]:
        if self.window_size is None:
            yield from self._iter_epochs()
        else:
            yield from self._iter_window()

    def _iter_window(self):
        order = np.arange(self.dataset_size)
        rnd = None
        window = 0
        if self.shuffle:
            rnd = np.random.RandomState(self.seed)
            rnd.shuffle(order)
            window = int(np.rint(order.size * self.window_size))
        idx = 0
        while True:
            i = idx % order.size
            if idx >= self.start_idx and idx % self.num_replicas == self.rank:
                yield int(order[i])
            if window >= 2:
                j = (i - rnd.randint(window)) % order.size
                order[i], order[j] = order[j], order[i]
            idx += 1

    def _iter_epochs(self):
        idx = self.start_idx
        epoch, order = None, None
        while True:
            if epoch != idx // self.dataset_size:
                epoch = idx // self.dataset_size
                order = self._epoch_order(epoch)
            if idx % self.num_replicas == self.rank:
                yield int(order[idx % self.dataset_size])
            idx += 1

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The dataset indices of one epoch, shuffled by (seed, epoch)."""
        order = np.arange(self.dataset_size)
        if self.shuffle:
            np.random.default_rng([self.seed, epoch]).shuffle(order)
        return order


class EDM2InfiniteSampler(InfiniteSampler):
    """EDM2's data order: a fresh permutation per epoch from RandomState(hash((seed, epoch)) mod 2^31);
    rank r takes items start_idx + r, start_idx + r + num_replicas, ... (EDM2 torch_utils.misc)."""

    def __init__(self, dataset, rank: int = 0, num_replicas: int = 1, shuffle: bool = True, seed: int = 0,
                 start_idx: int = 0, window_size: None = None):
        assert window_size is None, 'EDM2InfiniteSampler shuffles per epoch; it has no window'
        super().__init__(dataset, rank=rank, num_replicas=num_replicas, shuffle=shuffle, seed=seed,
                         window_size=None, start_idx=start_idx)

    def __iter__(self) -> Iterator[int]:
        idx = self.start_idx + self.rank
        epoch, order = None, None
        while True:
            if epoch != idx // self.dataset_size:
                epoch = idx // self.dataset_size
                order = self._epoch_order(epoch)
            yield int(order[idx % self.dataset_size])
            idx += self.num_replicas

    def _epoch_order(self, epoch: int) -> np.ndarray:
        order = np.arange(self.dataset_size)
        if self.shuffle:
            np.random.RandomState(hash((self.seed, epoch)) % (1 << 31)).shuffle(order)
        return order


def set_random_seed(*args) -> None:
    """Reseed torch (all devices) and numpy from hash(args) mod 2^31, e.g. (seed, rank, cur_nimg) (EDM2 torch_utils.misc)."""
    seed = hash(tuple(args)) % (1 << 31)
    torch.manual_seed(seed)
    np.random.seed(seed)

#----------------------------------------------------------------------------
# Parameters and buffers.

def params_and_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    """All parameters, then all buffers."""
    assert isinstance(module, torch.nn.Module)
    return list(module.parameters()) + list(module.buffers())

def named_params_and_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """All named parameters, then all named buffers."""
    assert isinstance(module, torch.nn.Module)
    return list(module.named_parameters()) + list(module.named_buffers())

@torch.no_grad()
def copy_params_and_buffers(src_module: torch.nn.Module, dst_module: torch.nn.Module, require_all: bool = False) -> None:
    """Copy tensors by name from one module into another (e.g. --transfer of a pickle's weights)."""
    assert isinstance(src_module, torch.nn.Module)
    assert isinstance(dst_module, torch.nn.Module)
    src_tensors = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        if name not in src_tensors and require_all:
            raise ValueError(f'the source network has no tensor {name!r}')
        if name in src_tensors:
            if src_tensors[name].shape != tensor.shape:
                raise ValueError(f'tensor {name!r} has shape {list(src_tensors[name].shape)} in the source but {list(tensor.shape)} here')
            tensor.copy_(src_tensors[name])

@contextlib.contextmanager
def ddp_sync(module: torch.nn.Module, sync: bool):
    """Skip DDP gradient all-reduce inside the block unless `sync` (gradient accumulation)."""
    assert isinstance(module, torch.nn.Module)
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield

def check_ddp_consistency(module: torch.nn.Module, ignore_regex: str | None = None) -> None:
    """Assert that every parameter and buffer equals rank 0's copy (collective: call on all ranks)."""
    assert isinstance(module, torch.nn.Module)
    differing = []
    for name, tensor in named_params_and_buffers(module):
        fullname = type(module).__name__ + '.' + name
        if ignore_regex is not None and re.fullmatch(ignore_regex, fullname):
            continue
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = torch.nan_to_num(tensor)
        other = tensor.clone()
        torch.distributed.broadcast(tensor=other, src=0)
        if not (tensor == other).all():
            differing.append(fullname)
    # Raise only after every broadcast, so that all ranks issue the same collectives.
    if differing:
        raise AssertionError(f'these tensors differ from rank 0: {", ".join(differing)}')

#----------------------------------------------------------------------------
# Module summary table.

def print_module_summary(module: torch.nn.Module, inputs, max_nesting: int = 3, skip_redundant: bool = True):
    """Print a table of submodules with parameter/buffer counts and output shapes; return outputs."""
    assert isinstance(module, torch.nn.Module)
    assert not isinstance(module, torch.jit.ScriptModule)
    assert isinstance(inputs, (tuple, list))
    entries, nesting = [], [0]

    def pre_hook(_mod, _inputs):
        nesting[0] += 1

    def post_hook(mod, _inputs, outputs):
        nesting[0] -= 1
        if nesting[0] <= max_nesting:
            outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            entries.append(dnnlib.EasyDict(mod=mod, outputs=[t for t in outputs if isinstance(t, torch.Tensor)]))

    hooks = [mod.register_forward_pre_hook(pre_hook) for mod in module.modules()]
    hooks += [mod.register_forward_hook(post_hook) for mod in module.modules()]
    try:
        outputs = module(*inputs)
    finally:
        for hook in hooks:
            hook.remove()

    tensors_seen = set()
    for e in entries:
        e.unique_params = [t for t in e.mod.parameters() if id(t) not in tensors_seen]
        e.unique_buffers = [t for t in e.mod.buffers() if id(t) not in tensors_seen]
        tensors_seen |= {id(t) for t in e.unique_params + e.unique_buffers}
    if skip_redundant:
        entries = [e for e in entries if len(e.unique_params) or len(e.unique_buffers) or len(e.outputs)]

    rows = [[type(module).__name__, 'Parameters', 'Buffers', 'Output shape', 'Datatype'], ['---'] * 5]
    param_total = buffer_total = 0
    submodule_names = {mod: name for name, mod in module.named_modules()}
    for e in entries:
        name = '<top-level>' if e.mod is module else submodule_names[e.mod]
        param_size = sum(t.numel() for t in e.unique_params)
        buffer_size = sum(t.numel() for t in e.unique_buffers)
        shapes = [str(list(t.shape)) for t in e.outputs] or ['-']
        dtypes = [str(t.dtype).split('.')[-1] for t in e.outputs] or ['-']
        rows.append([name + (':0' if len(e.outputs) >= 2 else ''), str(param_size) if param_size else '-',
                     str(buffer_size) if buffer_size else '-', shapes[0], dtypes[0]])
        for idx in range(1, len(e.outputs)):
            rows.append([name + f':{idx}', '-', '-', shapes[idx], dtypes[idx]])
        param_total += param_size
        buffer_total += buffer_size
    rows += [['---'] * 5, ['Total', str(param_total), str(buffer_total), '-', '-']]
    widths = [max(len(cell) for cell in column) for column in zip(*rows)]
    print()
    for row in rows:
        print('  '.join(cell + ' ' * (width - len(cell)) for cell, width in zip(row, widths)))
    print()
    return outputs
