"""Measuring one command of `python -m bench --mode=e2e`: run it with a time limit and a memory poller,
then read steady img/s and start-up time from what the script wrote (stats.jsonl, PNG times, its
progress bar)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import numpy as np

from bench.e2e_inputs import ROOT, flag_value

STATUS_PREFIX = 'Status:'  # training/training_loop.py _status(): one such stdout line per tick

#----------------------------------------------------------------------------
# Running one command: stdout lines with their arrival times, peak memory, a time limit.

def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (data-loader workers, compile workers)."""
    import psutil
    try:
        proc = psutil.Process(pid)
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def _gpu_used_mb(gpu: str) -> float | None:
    """Memory in use on one GPU (nvidia-smi -i: index or UUID) by every process (None if it cannot tell)."""
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=memory.used', '--format=csv,noheader,nounits', '-i', gpu],
                             capture_output=True, text=True, timeout=10)
        return float(out.stdout.strip().splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def physical_gpu(index: int | None) -> str:
    """nvidia-smi's name (-i) of torch's cuda:index, which counts within $CUDA_VISIBLE_DEVICES."""
    visible = [v.strip() for v in os.environ.get('CUDA_VISIBLE_DEVICES', '').split(',') if v.strip()]
    position = index or 0
    return visible[position] if position < len(visible) else str(position)


class MemoryPoller:
    """Peak memory of a running command: the process tree's RSS (CPU), or the GPU's used memory above
    its level before the start, from nvidia-smi (CUDA; the GPU is assumed to be the bench's alone).
    Without a working nvidia-smi the peak is None."""

    def __init__(self, pid: int, gpu: str | None, interval_s: float):
        self.pid, self.gpu, self.interval_s = pid, gpu, interval_s
        self.baseline = _gpu_used_mb(gpu) if gpu is not None else None
        self.kind = 'rss_tree' if gpu is None else 'nvidia_smi_delta' if self.baseline is not None else 'unavailable'
        self.peak_mb, self._stop = None if self.kind == 'unavailable' else 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if self.kind != 'unavailable':
            self._thread.start()

    def _sample(self) -> float:
        if self.gpu is None:
            return _tree_rss_mb(self.pid)
        used = _gpu_used_mb(self.gpu)
        return 0.0 if used is None else used - self.baseline

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._sample())
            self._stop.wait(self.interval_s)

    def stop(self) -> float | None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return self.peak_mb


def _read_segments(stream, sink: list, start: float) -> None:
    """Append (seconds since start, text) per line of a binary stream; a carriage return ends a segment
    too, so every tqdm update gets its own time. A segment is timed by the arrival of its first byte:
    tqdm writes '\r' + text, so a bar's text is only ended by the next update's '\r'."""
    pending, pending_s = b'', 0.0
    for chunk in iter(lambda: stream.read1(65536), b''):
        now = time.time() - start
        parts = re.split(rb'[\r\n]', chunk)
        parts[0], first_s = pending + parts[0], pending_s if pending else now
        for idx, part in enumerate(parts[:-1]):
            if part.strip():
                sink.append((first_s if idx == 0 else now, part.decode(errors='replace')))
        pending, pending_s = parts[-1], (first_s if len(parts) == 1 else now)
    if pending.strip():
        sink.append((pending_s, pending.decode(errors='replace')))
    stream.close()


def _kill_tree(proc: subprocess.Popen) -> None:
    """Stop the command's own process group (it was started in a new session): TERM, then KILL."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(argv: list[str], time_limit_s: float, gpu: str | None, env: dict | None = None) -> dict:
    """Run one command in the repository root; returns wall time, exit code, timed stdout lines, stderr
    tail and peak memory. The command is killed after `time_limit_s`."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
    start_wall = time.time()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    poller = MemoryPoller(proc.pid, gpu, interval_s=0.1 if gpu is None else 0.5)
    stdout, stderr = [], []
    readers = [threading.Thread(target=_read_segments, args=(s, sink, start_wall), daemon=True)
               for s, sink in ((proc.stdout, stdout), (proc.stderr, stderr))]
    for reader in readers:
        reader.start()
    timed_out = False
    try:
        proc.wait(time_limit_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_tree(proc)
    except BaseException:
        _kill_tree(proc)
        raise
    finally:
        peak_mb = poller.stop()
    wall_s = time.time() - start_wall
    for reader in readers:
        reader.join(10)
    return dict(returncode=proc.returncode, timed_out=timed_out, wall_s=wall_s, start_wall=start_wall,
                stdout=stdout, stderr=stderr, stderr_tail='\n'.join(line for _, line in stderr[-50:])[-4000:],
                peak_mem_mb=peak_mb, peak_mem_kind=poller.kind)

#----------------------------------------------------------------------------
# Measurements per group kind.

def _stat(value):
    """A stats.jsonl value: {num, mean, std} (EDM) or the mean itself (EDM2)."""
    return value['mean'] if isinstance(value, dict) else value


def read_ticks(stats_path: str) -> list[dict]:
    """Per status tick: timestamp, kimg, sec/kimg and peak GPU memory from train.py's stats.jsonl."""
    ticks = []
    with open(stats_path) as f:
        for line in f:
            if line.strip():
                s = json.loads(line)
                ticks.append(dict(timestamp=s['timestamp'], kimg=_stat(s['Progress/kimg']),
                                  sec_per_kimg=_stat(s['Timing/sec_per_kimg']),
                                  peak_gpu_mem_gb=_stat(s.get('Resources/peak_gpu_mem_gb', 0.0))))
    return ticks


def steady_train_rate(ticks: list[dict]) -> float:
    """img/s between the first and the last tick: the first tick holds start-up and compilation."""
    if len(ticks) < 2:
        raise RuntimeError(f'{len(ticks)} status tick(s) in stats.jsonl; need 2 or more (raise --time-limit?)')
    first, last = ticks[0], ticks[-1]
    return (last['kimg'] - first['kimg']) * 1e3 / (last['timestamp'] - first['timestamp'])


def fixed_startup(startup_s: float | None, images_before: float, images_per_s: float) -> float | None:
    """The start-up less the time the images done by then take at the steady rate: the fixed cost
    (imports, set-up, compilation), comparable across status intervals and batch sizes."""
    return None if startup_s is None else startup_s - images_before / images_per_s


def measure_train(run: dict, outdir: str, on_cuda: bool) -> dict:
    """Steady img/s from stats.jsonl, time to the first status line on stdout, peak memory."""
    stats = os.path.join(outdir, 'stats.jsonl')
    if not os.path.isfile(stats):
        raise RuntimeError('train.py wrote no stats.jsonl')
    ticks = read_ticks(stats)
    first = next((t for t, line in run['stdout'] if line.startswith(STATUS_PREFIX)), None)
    rate = steady_train_rate(ticks)
    result = dict(images_per_s=rate, startup_s=first, startup_kind='first_status_line',
                  startup_fixed_s=fixed_startup(first, ticks[0]['kimg'] * 1e3, rate), ticks=ticks,
                  images_per_s_train_only=1e3 / float(np.median([t['sec_per_kimg'] for t in ticks[1:]])),
                  images_per_s_last_ticks=steady_train_rate(ticks[-4:]))  # after a --compile-async switch
    if on_cuda:  # what the script itself reports: torch.cuda.max_memory_allocated over each tick
        result.update(peak_mem_mb=max(t['peak_gpu_mem_gb'] for t in ticks) * 1024, peak_mem_kind='torch_max_allocated',
                      peak_mem_polled_mb=run['peak_mem_mb'], peak_mem_polled_kind=run['peak_mem_kind'])
    return result


def steady_image_rate(mtimes: list[float], batch: int) -> float:
    """img/s from the PNG write times after the first batch (start-up and its warm-up excluded)."""
    mtimes = sorted(mtimes)
    if len(mtimes) <= batch:
        raise RuntimeError(f'{len(mtimes)} images written; need more than one batch of {batch}')
    span = mtimes[-1] - mtimes[batch - 1]
    if span <= 0:
        raise RuntimeError('all images have the same write time; raise the image count')
    return (len(mtimes) - batch) / span


def measure_images(run: dict, outdir: str, args: list[str]) -> dict:
    """Steady img/s and time to the first image from the mtimes of the PNGs generate.py wrote."""
    mtimes = [os.path.getmtime(os.path.join(d, n)) for d, _, names in os.walk(outdir) for n in names if n.endswith('.png')]
    batch = int(flag_value(args, '--batch'))
    rate, first = steady_image_rate(mtimes, batch), min(mtimes) - run['start_wall']
    return dict(images_per_s=rate, startup_s=first, startup_kind='first_image',
                startup_fixed_s=fixed_startup(first, min(batch, len(mtimes)), rate), images=len(mtimes), batch=batch)


_TQDM = re.compile(r'(\d+)/(\d+) \[[^\]]*?(?:\?|[\d.]+)\s*([A-Za-z]+)/s')


MIN_PROGRESS_SPAN_S = 0.1  # tqdm's default mininterval: updates closer than this are not all shown


def progress_points(segments: list[tuple[float, str]]) -> list[tuple[float, int, int, str]]:
    """(seconds, done, total, unit) of every tqdm update on stderr, each count at the first time it was shown."""
    points, seen = [], set()
    for seconds, text in segments:
        m = _TQDM.search(text)
        if m is not None and int(m.group(1)) not in seen:
            seen.add(int(m.group(1)))
            points.append((seconds, int(m.group(1)), int(m.group(2)), m.group(3)))
    return points


def steady_progress_rate(points: list, images_per_unit: int, num_images: int | None) -> tuple[float, float, int]:
    """(img/s between the first shown count above zero and the last, seconds to that first count, images
    done by then): start-up and the first batch are excluded from the rate."""
    done = [(t, min(n * images_per_unit, num_images or n * images_per_unit)) for t, n, _, _ in points if n > 0]
    if len(done) < 2 or done[-1][0] - done[0][0] < MIN_PROGRESS_SPAN_S:
        span = done[-1][0] - done[0][0] if done else 0.0
        raise RuntimeError(f'{len(done)} progress count(s) above zero over {span:.2f} s; too little to time '
                           f'(need {MIN_PROGRESS_SPAN_S} s or more); use more images')
    return (done[-1][1] - done[0][1]) / (done[-1][0] - done[0][0]), done[0][0], done[0][1]


def measure_progress(run: dict, args: list[str]) -> dict:
    """Steady img/s and time to the first progress count from the tqdm bar on stderr (fid.py, dataset_tool.py)."""
    points = progress_points(run['stderr'])
    if not points:
        raise RuntimeError('no progress bar on stderr')
    unit = points[-1][3]
    if unit == 'batch' and flag_value(args, '--batch') is None:
        raise RuntimeError('the progress bar counts batches; give the row an explicit --batch')
    batch = int(flag_value(args, '--batch')) if unit == 'batch' else 1
    num = flag_value(args, '--num') or flag_value(args, '--max-images')
    rate, first, images_before = steady_progress_rate(points, batch, int(num) if num else None)
    return dict(images_per_s=rate, startup_s=first, startup_kind='first_progress_count',
                startup_fixed_s=fixed_startup(first, images_before, rate), progress_unit=unit,
                progress=[dict(seconds=t, done=n, total=total) for t, n, total, _ in points])
