"""One code path for 1..N processes: torchrun env, NCCL on CUDA, gloo on CPU, preemption flag."""

from __future__ import annotations

import contextlib
import datetime
import os
import signal

import torch

from . import threads
from . import training_stats

_stop_requested = False
_handlers_installed = False

#----------------------------------------------------------------------------

def init(device: torch.device | str | None = None, timeout_min: float = 30) -> None:
    """Join the process group that torchrun describes in the environment; no-op when run alone."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    device = torch.device(device) if device is not None else None
    if world_size > 1 and not torch.distributed.is_initialized():
        use_nccl = (device is None or device.type == 'cuda') and torch.cuda.is_available() and torch.distributed.is_nccl_available()
        backend = 'nccl' if use_nccl else 'gloo'
        if backend == 'nccl':
            torch.cuda.set_device(get_local_rank())
        torch.distributed.init_process_group(backend=backend, init_method='env://',
                                             timeout=datetime.timedelta(minutes=timeout_min))
    sync_device = None
    if get_world_size() > 1 and torch.distributed.get_backend() == 'nccl':
        sync_device = torch.device('cuda', get_local_rank())
    training_stats.init_multiprocessing(rank=get_rank(), sync_device=sync_device)

def device_for_rank(device: torch.device) -> torch.device:
    """On CUDA, give every local rank its own GPU (an explicit index, which torch.cuda.set_device
    needs); other devices are shared. Works before init(): the world size comes from torchrun's env.
    On CPU, also sets torch's thread count once (torch_utils/threads.py)."""
    message = threads.apply_cpu_threads(device)
    if message and get_rank() == 0:
        print(message)
    if device.type == 'cuda' and device.index is None:
        if int(os.environ.get('WORLD_SIZE', '1')) > 1:
            return torch.device('cuda', get_local_rank())
        return torch.device('cuda', torch.cuda.current_device())
    return device

def get_rank() -> int:
    """Global rank (0 without torchrun)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get('RANK', '0'))

def get_world_size() -> int:
    """Number of processes (1 without torchrun)."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

def get_local_rank() -> int:
    """Rank within this host."""
    return int(os.environ.get('LOCAL_RANK', '0'))

def should_print() -> bool:
    """Only rank 0 talks."""
    return get_rank() == 0

def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs)

def barrier() -> None:
    """Wait for every process (no-op alone)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()

def shutdown() -> None:
    """Leave the process group cleanly: all ranks meet first, so that none tears its connections down while a
    peer is still using them (a 2-process gloo test once saw one rank abort at exit)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

def all_reduce_any(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank when `flag` is True on any rank (e.g. a stop request)."""
    if not torch.distributed.is_initialized():
        return bool(flag)
    if device is None:
        device = torch.device('cuda', get_local_rank()) if torch.distributed.get_backend() == 'nccl' else torch.device('cpu')
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value)
    return bool(value.item() > 0)

#----------------------------------------------------------------------------
# Preemption: SIGTERM / SIGUSR1 ask a long job to checkpoint and exit cleanly.

def _on_signal(signum, _frame) -> None:
    global _stop_requested
    _stop_requested = True
    print(f'Received signal {signal.Signals(signum).name}: will checkpoint and exit at the next opportunity.', flush=True)

def install_signal_handlers() -> None:
    """Make SIGTERM and SIGUSR1 set the stop flag instead of killing the process."""
    global _handlers_installed
    if _handlers_installed:
        return
    for name in ('SIGTERM', 'SIGUSR1'):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _on_signal)
    _handlers_installed = True

def should_stop() -> bool:
    """True once a stop signal arrived (poll it between steps)."""
    return _stop_requested

def request_stop(value: bool = True) -> None:
    """Set or clear the stop flag by hand (tests, and code that wants a clean stop)."""
    global _stop_requested
    _stop_requested = value

#----------------------------------------------------------------------------
# DataLoader workers: SLURM and `timeout` signal the whole process group, workers included.
# The workers leave the decision to the main process, which checkpoints, then stops them.

def _stop_signals() -> list:
    return [getattr(signal, name) for name in ('SIGTERM', 'SIGUSR1') if hasattr(signal, name)]

def ignore_stop_signals(_worker_id: int | None = None) -> None:
    """DataLoader worker_init_fn: ignore SIGTERM/SIGUSR1 (torch's workers would die of them)."""
    for sig in _stop_signals():
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, 'pthread_sigmask'):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _stop_signals())

@contextlib.contextmanager
def stop_signals_held():
    """Hold SIGTERM/SIGUSR1 while DataLoader workers start, so none dies before ignore_stop_signals runs;
    the main process gets a held signal when the block ends."""
    if not hasattr(signal, 'pthread_sigmask'):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _stop_signals())
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)

_worker_failure = None

def defer_worker_failures() -> None:
    """torch raises a dead DataLoader worker from its SIGCHLD handler, at any point of the main process
    (even mid-checkpoint). Record it instead: the next batch fetch raises it, before any state changes."""
    global _worker_failure
    _worker_failure = None
    handler = signal.getsignal(signal.SIGCHLD) if hasattr(signal, 'SIGCHLD') else None
    if not callable(handler) or getattr(handler, '_defers_worker_failures', False):
        return
    def deferring(signum, frame):
        global _worker_failure
        try:
            handler(signum, frame)
        except RuntimeError as err:
            _worker_failure = str(err)
    deferring._defers_worker_failures = True
    signal.signal(signal.SIGCHLD, deferring)

def worker_failure() -> str | None:
    """The message of a DataLoader worker death that defer_worker_failures() recorded, if any."""
    return _worker_failure
