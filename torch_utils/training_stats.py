"""Statistics reported anywhere in the code, reduced across processes (reference training_stats API).

`report(name, value)` accumulates the count, sum and sum of squares of a scalar or tensor on
the device (no host sync); a `Collector` reduces them across ranks at most once per tick and
exposes num/mean/std, which the training loop writes as one JSON line of `stats.jsonl`.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
import torch

import dnnlib

_num_moments = 3                 # [num_scalars, sum_of_scalars, sum_of_squares]
_reduce_dtype = torch.float32    # Data type to use for initial per-tensor reduction.
_counter_dtype = torch.float64   # Data type to use for the internal counters.
_rank = 0                        # Rank of the current process.
_sync_device = None              # Device to use for multiprocess communication. None = single-process.
_sync_called = False             # Has _sync() been called yet?
_counters = dict()               # Running counters on each device, updated by report(): name => device => torch.Tensor
_cumulative = dict()             # Cumulative counters on the CPU, updated by _sync(): name => torch.Tensor

def init_multiprocessing(rank: int, sync_device: torch.device | None) -> None:
    """Set the rank and the device used to reduce counters (None: CPU gloo or single process)."""
    global _rank, _sync_device
    assert not _sync_called or (rank == _rank and sync_device == _sync_device)
    _rank = rank
    _sync_device = sync_device

def report(name: str, value) -> torch.Tensor | float:
    """Accumulate the elements of `value` under `name`; returns `value` unchanged."""
    if name not in _counters:
        _counters[name] = dict()
    elems = torch.as_tensor(value)
    if elems.numel() == 0:
        return value
    elems = elems.detach().flatten().to(_reduce_dtype)
    moments = torch.stack([
        torch.ones_like(elems).sum(),
        elems.sum(),
        elems.square().sum(),
    ])
    assert moments.ndim == 1 and moments.shape[0] == _num_moments
    moments = moments.to(_counter_dtype)
    device = moments.device
    if device not in _counters[name]:
        _counters[name][device] = torch.zeros_like(moments)
    _counters[name][device].add_(moments)
    return value

def report0(name: str, value):
    """report() on rank 0 only; other ranks register the name with no data."""
    report(name, value if _rank == 0 else [])
    return value

class Collector:
    """Reduces the reported statistics whose names match `regex` across ranks on `update()`."""

    def __init__(self, regex: str = '.*', keep_previous: bool = True):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._cumulative = dict()
        self._moments = dict()
        self.update()
        self._moments.clear()

    def names(self) -> list[str]:
        """Names reported so far that match the regex."""
        return sorted(name for name in _counters if self._regex.fullmatch(name))

    def update(self) -> None:
        """Reduce the counters reported since the last call (collective: call on every rank)."""
        if not self._keep_previous:
            self._moments.clear()
        for name, cumulative in _sync(self.names()):
            if name not in self._cumulative:
                self._cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
            delta = cumulative - self._cumulative[name]
            self._cumulative[name].copy_(cumulative)
            if float(delta[0]) != 0:
                self._moments[name] = delta

    def _get_delta(self, name: str) -> torch.Tensor:
        assert self._regex.fullmatch(name)
        if name not in self._moments:
            self._moments[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        return self._moments[name]

    def num(self, name: str) -> int:
        """Number of scalars reported under `name` in the last interval."""
        return int(self._get_delta(name)[0])

    def mean(self, name: str) -> float:
        """Mean of the scalars reported under `name` (nan if none)."""
        delta = self._get_delta(name)
        if int(delta[0]) == 0:
            return float('nan')
        return float(delta[1] / delta[0])

    def std(self, name: str) -> float:
        """Standard deviation of the scalars reported under `name` (nan if none)."""
        delta = self._get_delta(name)
        if int(delta[0]) == 0 or not np.isfinite(float(delta[1])):
            return float('nan')
        if int(delta[0]) == 1:
            return float(0)
        mean = float(delta[1] / delta[0])
        raw_var = float(delta[2] / delta[0])
        return np.sqrt(max(raw_var - np.square(mean), 0))

    def as_dict(self) -> dnnlib.EasyDict:
        """{name: {num, mean, std}} for every name with data (the stats.jsonl format)."""
        stats = dnnlib.EasyDict()
        for name in self.names():
            if not self._regex.fullmatch(name):
                continue
            if self.num(name) > 0:
                stats[name] = dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
        return stats

    def __getitem__(self, name: str) -> float:
        """Shorthand for mean(name)."""
        return self.mean(name)

def _sync(names: list[str]) -> list[tuple[str, torch.Tensor]]:
    """Sum the per-device counters of `names` into the cumulative CPU counters, across ranks."""
    if len(names) == 0:
        return []
    global _sync_called
    _sync_called = True

    deltas = []
    device = _sync_device if _sync_device is not None else torch.device('cpu')
    for name in names:
        delta = torch.zeros([_num_moments], dtype=_counter_dtype, device=device)
        for counter in _counters[name].values():
            delta.add_(counter.to(device))
            counter.copy_(torch.zeros_like(counter))
        deltas.append(delta)
    deltas = torch.stack(deltas)

    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(deltas)

    deltas = deltas.cpu()
    for idx, name in enumerate(names):
        if name not in _cumulative:
            _cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        _cumulative[name].add_(deltas[idx])
    return [(name, _cumulative[name]) for name in names]

# Global collector, as in the reference.
default_collector = Collector()
