"""Clocks, memory meters and peak-throughput probes shared by every benchmark case.

Every number the benchmark reports comes from `time_call`: a few untimed warm-up calls (which
also absorb torch.compile and cuDNN autotuning), then `reps` timed calls, each bracketed by a
device synchronisation so that queued GPU work is charged to the call that issued it. The
median of the timed calls is the reported time; all of them are kept in the JSON.
"""

import contextlib
import ctypes
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import psutil
import torch

#----------------------------------------------------------------------------
# Time.

def synchronize(device: torch.device) -> None:
    """Wait for all queued work on `device` (a no-op on the CPU, whose ops are synchronous)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'mps':
        torch.mps.synchronize()


def time_call(fn: Callable[[], object], device: torch.device, warmup: int = 1, reps: int = 3) -> dict:
    """Median wall time of `fn()` over `reps` synchronised calls after `warmup` untimed ones."""
    if reps < 1 or warmup < 0:
        raise ValueError(f'need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}')
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return dict(median_s=statistics.median(times), times_s=times)

#----------------------------------------------------------------------------
# Memory.

class _RSSSampler:
    """Samples this process's resident set size in a background thread and keeps the maximum."""

    def __init__(self, interval_s: float = 0.002):
        self.process = psutil.Process()
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def _release_free_heap() -> None:
    # Freed blocks stay in glibc's heap and would be reused without growing the RSS, so memory
    # freed by the previous measurement would hide this one's; hand them back to the OS first.
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (macOS, musl): the figure may then under-report


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Yields a dict that, on exit, holds `peak_mem_mb`: torch.cuda.max_memory_allocated on CUDA
    (everything live, weights and optimizer state included), else the peak RSS growth of this process."""
    result = {}
    if device.type == 'cuda':
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        synchronize(device)
        result.update(peak_mem_mb=torch.cuda.max_memory_allocated(device) / 2**20, peak_mem_kind='cuda_max_allocated')
        return
    _release_free_heap()
    before = psutil.Process().memory_info().rss
    with _RSSSampler() as sampler:
        yield result
    result.update(peak_mem_mb=max(sampler.peak - before, 0) / 2**20, peak_mem_kind='rss_delta')


def measure(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> dict:
    """`time_call` inside `peak_memory`. On CUDA the warm-up (compilation, autotuning) runs before the
    meter starts; on the CPU it runs inside, since the allocator would otherwise hide the step's memory."""
    if device.type == 'cuda':
        for _ in range(warmup):
            fn()
        warmup = 0
    with peak_memory(device) as memory:
        timing = time_call(fn, device, warmup=warmup, reps=reps)
    return dict(timing, **memory)

#----------------------------------------------------------------------------
# Device peak throughput, the denominator of model FLOP utilisation.

def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, reps: int = 5) -> float:
    """Best achieved TFLOP/s of a square [size x size] matmul (2 size^3 FLOPs) over `reps` calls:
    a peak is a ceiling, so the fastest call counts, not the median."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timing = time_call(lambda: a @ b, device, warmup=1, reps=reps)
    return 2 * size ** 3 / min(timing['times_s']) / 1e12


def peak_tflops(device: torch.device, override: float | None = None, quick: bool = False) -> dict:
    """Peak TFLOP/s per numeric: 'fp32' (TF32 off) and, on CUDA, 'bf16', each measured with a large
    matmul; `override` replaces the figure of the fast variant's numeric (bf16 on CUDA, else fp32),
    e.g. a datasheet peak such as 989 for an H100 SXM in dense bf16."""
    dtypes = {'fp32': torch.float32}
    if device.type == 'cuda':
        dtypes['bf16'] = torch.bfloat16
    size = (8192 if device.type == 'cuda' else 1024) // (4 if quick else 1)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        result = {name: matmul_tflops(device, dtype, size) for name, dtype in dtypes.items()}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    result['source'] = f'measured ({size}x{size} matmul)'
    if override is not None:
        fast_dtype = 'bf16' if 'bf16' in dtypes else 'fp32'
        result[f'{fast_dtype}_measured'] = result[fast_dtype]
        result[fast_dtype] = float(override)
        result['source'] += f', {fast_dtype} from --peak-tflops'
    return result
