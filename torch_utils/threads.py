"""CPU threads for torch: as many as the cores this process may use and that other work leaves idle."""

from __future__ import annotations

import os

import psutil
import torch

_applied = False

#----------------------------------------------------------------------------

def usable_cores() -> int:
    """Cores this process may run on (scheduler affinity, e.g. taskset or a container's cpuset), at most
    the physical ones: a second hyper-thread adds little to dense math and slows OpenMP barriers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    physical = psutil.cpu_count(logical=False) or cores
    logical = psutil.cpu_count(logical=True) or cores
    return max(1, min(cores, cores * physical // logical))


def busy_share(sample_s: float = 0.25) -> float:
    """Share of the usable cores that other processes kept busy over the last sample_s seconds (this
    process sleeps meanwhile). A load average would also count this program's previous steps."""
    per_cpu = psutil.cpu_percent(interval=sample_s, percpu=True)
    mine = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else range(len(per_cpu))
    shares = [per_cpu[i] / 100 for i in mine if i < len(per_cpu)] or [0.0]
    return min(1.0, sum(shares) / len(shares))


def choose_cpu_threads(environ: dict | None = None, busy: float | None = None) -> tuple[int, str]:
    """(threads, why): OMP_NUM_THREADS if set; else the usable cores per local rank that other work
    leaves idle, at least 1. OpenMP threads that wait for a busy core spin, and a tiny model on a
    loaded machine then runs several times slower than with one thread."""
    environ = os.environ if environ is None else environ
    if environ.get('OMP_NUM_THREADS'):
        return torch.get_num_threads(), f'OMP_NUM_THREADS={environ["OMP_NUM_THREADS"]}'
    cores = max(1, usable_cores() // max(1, int(environ.get('LOCAL_WORLD_SIZE', '1'))))
    busy = busy_share() if busy is None else busy
    threads = max(1, min(cores, int(cores * (1 - busy) + 0.5)))
    return threads, f'{cores} usable core(s), {busy:.0%} busy with other work; set OMP_NUM_THREADS to choose'


def apply_cpu_threads(device: torch.device) -> str | None:
    """On CPU, once per process: set torch's thread count by choose_cpu_threads() and return a log line."""
    global _applied
    if device.type != 'cpu' or _applied:
        return None
    _applied = True
    threads, why = choose_cpu_threads()
    torch.set_num_threads(threads)
    return f'CPU threads: {threads} ({why})'

#----------------------------------------------------------------------------
