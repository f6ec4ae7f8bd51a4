"""python -m bench --mode=e2e: the user's scripts (train.py, generate.py, fid.py, dataset_tool.py) as
subprocesses, one command line per row (bench/e2e_rows.py), on inputs this module makes itself.

Per row: steady img/s, start-up time, peak memory, and img/s as a ratio to the group's reference-fp16
row and fp32 row. docs/performance.md ("End-to-end mode") describes the method.
"""

from __future__ import annotations

import datetime
import fnmatch
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

import numpy as np

from bench import e2e_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATUS_PREFIX = 'Status:'  # training/training_loop.py _status(): one such stdout line per tick

#----------------------------------------------------------------------------
# Row selection.

def select_rows(pattern: str | None, rows: list = e2e_rows.ROWS) -> list:
    """Rows whose names match the comma list of names or globs (all rows for None), in table order."""
    if not pattern:
        return list(rows)
    wanted = [p.strip() for p in pattern.split(',') if p.strip()]
    unknown = [p for p in wanted if not any(fnmatch.fnmatchcase(r.name, p) for r in rows)]
    if unknown:
        raise ValueError(f'--rows: {", ".join(unknown)} matches no row; choose from {", ".join(r.name for r in rows)}')
    return [r for r in rows if any(fnmatch.fnmatchcase(r.name, p) for p in wanted)]

#----------------------------------------------------------------------------
# Inputs: made once per work folder, on first use, and reused when --workdir is given again.

def _write_png_folder(folder: str, count: int, resolution: int, classes: int, seed: int) -> None:
    """`count` random RGB images with labels (dataset.json), the input of `dataset_tool.py convert`."""
    import PIL.Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = []
    for idx in range(count):
        name = f'{idx:06d}.png'
        PIL.Image.fromarray(rng.integers(0, 256, [resolution, resolution, 3], dtype=np.uint8)).save(os.path.join(folder, name))
        labels.append([name, idx % classes])
    with open(os.path.join(folder, 'dataset.json'), 'wt') as f:
        json.dump(dict(labels=labels), f)


def make_image_dataset(dest: str, count: int, resolution: int, classes: int = 10, seed: int = 0) -> str:
    """A labelled PNG dataset zip made by `dataset_tool.py convert` from random images."""
    with tempfile.TemporaryDirectory(dir=os.path.dirname(dest)) as src:
        _write_png_folder(src, count, resolution, classes, seed)
        proc = subprocess.run([sys.executable, os.path.join(ROOT, 'dataset_tool.py'), 'convert', f'--source={src}',
                               f'--dest={dest}', '--workers=1', '--force'], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f'dataset_tool.py convert failed: {last_line(proc.stderr)}')
    return dest


def make_latent_dataset(dest: str, count: int, resolution: int, classes: int = 1000, seed: int = 0) -> str:
    """A zip of raw 8-channel latents (mean, std) as `dataset_tool.py encode` writes them, drawn at random
    (no VAE needed: EDM2 training reads the raw latents only)."""
    rng = np.random.default_rng(seed)
    tmp = dest + '.tmp'
    with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED) as zf:
        labels = []
        for idx in range(count):
            mean = rng.normal(0, 4, [4, resolution, resolution])
            std = rng.uniform(0.05, 0.2, [4, resolution, resolution])
            buf = io.BytesIO()
            np.save(buf, np.concatenate([mean, std]).astype(np.float32))
            name = f'{idx // 1000:05d}/img-mean-std-{idx:08d}.npy'
            zf.writestr(name, buf.getvalue())
            labels.append([name, idx % classes])
        zf.writestr('dataset.json', json.dumps(dict(labels=labels)))
    os.replace(tmp, dest)
    return dest


def make_fid_ref(dest: str, dim: int = 2048) -> str:
    """EDM-format FID reference statistics (.npz of mu, sigma) of a standard normal: the timing needs
    their shape, not their values."""
    tmp = dest + '.tmp.npz'
    np.savez(tmp, mu=np.zeros(dim), sigma=np.eye(dim))
    os.replace(tmp, dest)
    return dest


def make_vae(dest: str, size: str) -> str:
    """A diffusers folder with a randomly initialised Stable Diffusion VAE architecture (full) or a narrow
    copy (tiny): the encoder's speed does not depend on its weights."""
    try:
        import diffusers
    except ImportError:
        raise RuntimeError('the encode rows need diffusers (pip install diffusers) or --vae NAME|FOLDER') from None
    from bench import configs
    tmp = dest + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    diffusers.AutoencoderKL(**configs.vae_config(size)).save_pretrained(tmp)
    os.replace(tmp, dest)
    return dest


def last_line(text: str) -> str:
    """The last non-empty line (of stderr: the one-line error of our scripts); tqdm's \\r updates split too."""
    lines = [line.strip() for line in text.replace('\r', '\n').splitlines() if line.strip()]
    return lines[-1] if lines else ''


class Workspace:
    """The work folder: the made-up inputs (once each, on demand) and a fresh output folder per row."""

    def __init__(self,
        root:     str,              # Work folder; inputs found there are reused.
        size:     str,              # 'full' or 'tiny' (e2e_rows.DATA, base arguments of the groups).
        device:   str,              # What the scripts get as --device: 'cpu' or 'cuda'.
        images:   int | None,       # PNG dataset size; None = e2e_rows.DATA[size]['images'].
        vae:      str | None,       # VAE name or diffusers folder for the encode rows; None = random one made here.
    ):
        self.root, self.size, self.device, self.vae = root, size, device, vae
        self.data = dict(e2e_rows.DATA[size], **({} if images is None else dict(images=images)))
        self._made, self._failed = {}, {}
        os.makedirs(root, exist_ok=True)

    def _make(self, key: str, fn, *args) -> str:
        """Make input `key` once; a failure is remembered, so every row that needs it fails the same way."""
        if key in self._failed:
            raise RuntimeError(self._failed[key])
        if key not in self._made:
            try:
                self._made[key] = fn(*args)
            except (RuntimeError, OSError, ValueError) as err:
                self._failed[key] = f'making {key} failed: {err}'
                raise RuntimeError(self._failed[key]) from None
        return self._made[key]

    def _existing(self, path: str, fn, *args) -> str:
        return path if os.path.exists(path) else fn(path, *args)

    def path(self, key: str) -> str:
        """The input a placeholder names, made if missing."""
        d, size = self.data, self.size
        if key == 'data':
            path = os.path.join(self.root, f'data-{d["resolution"]}px-{d["images"]}.zip')
            return self._make(key, self._existing, path, make_image_dataset, d['images'], d['resolution'])
        if key == 'encode_data':
            path = os.path.join(self.root, f'data-{d["encode_resolution"]}px-{d["encode_images"]}.zip')
            return self._make(key, self._existing, path, make_image_dataset, d['encode_images'], d['encode_resolution'])
        if key == 'latents':
            path = os.path.join(self.root, f'latents-{d["latent_resolution"]}px-{d["latents"]}.zip')
            return self._make(key, self._existing, path, make_latent_dataset, d['latents'], d['latent_resolution'])
        if key == 'ref':
            return self._make(key, self._existing, os.path.join(self.root, 'fid-ref-2048.npz'), make_fid_ref)
        if key == 'vae':
            if self.vae is not None:
                return self.vae
            return self._make(key, self._existing, os.path.join(self.root, f'vae-{size}'), make_vae, size)
        if key == 'network':
            return self._make(key, self._make_snapshot)
        raise KeyError(key)

    def offer_snapshot(self, outdir: str) -> None:
        """A finished fp32 'train' row's folder: its last snapshot serves the generate rows of this run."""
        found = sorted(n for n in os.listdir(outdir) if n.startswith('network-snapshot-'))
        if found and 'network' not in self._made and 'network' not in self._failed:
            self._made['network'] = os.path.join(outdir, found[-1])

    def _make_snapshot(self) -> str:
        """The network pickle of the generate rows: train.py as the 'train' rows run it (fp32), one batch."""
        folder = os.path.join(self.root, f'snapshot-{self.size}')
        found = sorted(n for n in os.listdir(folder) if n.startswith('network-snapshot-')) if os.path.isdir(folder) else []
        if not found:
            shutil.rmtree(folder, ignore_errors=True)
            args = self.fill(e2e_rows.GROUPS['train'].base[self.size], folder)
            batch = int(flag_value(args, '--batch'))
            argv = [sys.executable, 'train.py'] + args + [f'--duration={batch / 1000}k', '--workers=0']
            proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
            found = sorted(n for n in os.listdir(folder) if n.startswith('network-snapshot-')) if os.path.isdir(folder) else []
            if proc.returncode != 0 or not found:
                raise RuntimeError(f'train.py for the snapshot failed: {last_line(proc.stderr) or last_line(proc.stdout)}')
        return os.path.join(folder, found[-1])

    def outdir(self, row_name: str) -> str:
        """An empty output folder for one run of a row."""
        path = os.path.join(self.root, 'runs', row_name)
        shutil.rmtree(path, ignore_errors=True)
        return path

    def fill(self, args, outdir: str) -> list[str]:
        """Arguments with their {placeholders} replaced; inputs are made on first use."""
        filled = []
        for arg in args:
            values = dict(device=self.device, outdir=outdir, images=str(self.data['images']))
            for key in ('data', 'encode_data', 'latents', 'ref', 'vae', 'network'):
                if '{' + key + '}' in arg:
                    values[key] = self.path(key)
            filled.append(arg.format(**values))
        return filled


def flag_value(args: list[str], flag: str) -> str | None:
    """Value of the last `--flag=value` or `--flag value` in an argument list (click: the last one wins)."""
    value = None
    for idx, arg in enumerate(args):
        if arg.startswith(flag + '='):
            value = arg.split('=', 1)[1]
        elif arg == flag and idx + 1 < len(args):
            value = args[idx + 1]
    return value

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
    too, so every tqdm update arrives with its own time."""
    pending = b''
    for chunk in iter(lambda: stream.read1(65536), b''):
        now = time.time() - start
        parts = re.split(rb'[\r\n]', pending + chunk)
        pending = parts.pop()
        sink.extend((now, part.decode(errors='replace')) for part in parts if part.strip())
    if pending.strip():
        sink.append((time.time() - start, pending.decode(errors='replace')))
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


def measure_train(run: dict, outdir: str, on_cuda: bool) -> dict:
    """Steady img/s from stats.jsonl, time to the first status line on stdout, peak memory."""
    stats = os.path.join(outdir, 'stats.jsonl')
    if not os.path.isfile(stats):
        raise RuntimeError('train.py wrote no stats.jsonl')
    ticks = read_ticks(stats)
    first = next((t for t, line in run['stdout'] if line.startswith(STATUS_PREFIX)), None)
    result = dict(images_per_s=steady_train_rate(ticks), startup_s=first, startup_kind='first_status_line', ticks=ticks,
                  images_per_s_train_only=1e3 / float(np.median([t['sec_per_kimg'] for t in ticks[1:]])))
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
    return dict(images_per_s=steady_image_rate(mtimes, batch), startup_s=min(mtimes) - run['start_wall'],
                startup_kind='first_image', images=len(mtimes), batch=batch)


_TQDM = re.compile(r'(\d+)/(\d+) \[[^\]]*?(?:\?|[\d.]+)\s*([A-Za-z]+)/s')


def progress_points(segments: list[tuple[float, str]]) -> list[tuple[float, int, int, str]]:
    """(seconds, done, total, unit) of every tqdm update on stderr, each count at the first time it was shown."""
    points, seen = [], set()
    for seconds, text in segments:
        m = _TQDM.search(text)
        if m is not None and int(m.group(1)) not in seen:
            seen.add(int(m.group(1)))
            points.append((seconds, int(m.group(1)), int(m.group(2)), m.group(3)))
    return points


def steady_progress_rate(points: list, images_per_unit: int, num_images: int | None) -> tuple[float, float]:
    """(img/s between the first shown count above zero and the last, seconds to that first count):
    start-up and the first batch are excluded from the rate."""
    done = [(t, min(n * images_per_unit, num_images or n * images_per_unit)) for t, n, _, _ in points if n > 0]
    if len(done) < 2 or done[-1][0] <= done[0][0]:
        raise RuntimeError(f'{len(done)} progress update(s) on stderr; need 2 or more (use more images)')
    return (done[-1][1] - done[0][1]) / (done[-1][0] - done[0][0]), done[0][0]


def measure_progress(run: dict, args: list[str]) -> dict:
    """Steady img/s and time to the first progress count from the tqdm bar on stderr (fid.py, dataset_tool.py)."""
    points = progress_points(run['stderr'])
    if not points:
        raise RuntimeError('no progress bar on stderr')
    unit = points[-1][3]
    batch = int(flag_value(args, '--batch') or 1) if unit == 'batch' else 1
    num = flag_value(args, '--num') or flag_value(args, '--max-images')
    rate, first = steady_progress_rate(points, batch, int(num) if num else None)
    return dict(images_per_s=rate, startup_s=first, startup_kind='first_progress_count', progress_unit=unit,
                progress=[dict(seconds=t, done=n, total=total) for t, n, total, _ in points])

#----------------------------------------------------------------------------
# Rows and records.

def _display(script: str, args: list[str], env: dict) -> str:
    """The command as a user would type it in the repository root."""
    prefix = ' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())
    return (prefix + ' ' if prefix else '') + shlex.join(['python', script] + args)


def _failure(run: dict, time_limit_s: float) -> str | None:
    """The one-line error of a run, or None when it succeeded."""
    if run['timed_out']:
        return f'killed after the time limit of {time_limit_s:g} s'
    if run['returncode'] != 0:
        return f'exit code {run["returncode"]}: {last_line(run["stderr_tail"]) or "(no error message)"}'
    return None


def run_row(row, ws: Workspace, time_limit_s: float, gpu: str | None, env: dict) -> dict:
    """Run one row and measure it; a failure is recorded as `error` (one line), never raised."""
    group = e2e_rows.GROUPS[row.group]
    base = list(group.base[ws.size]) + list(row.args)
    record = dict(row=row.name, group=row.group, script=group.script, ref=row.ref, fp32=row.fp32, ok=False)
    try:
        outdir = ws.outdir(row.name)
        args = ws.fill(base, outdir)
        record['command'] = _display(group.script, args, env)
        run = run_command([sys.executable, group.script] + args, time_limit_s, gpu, env)
        record.update(wall_s=run['wall_s'], peak_mem_mb=run['peak_mem_mb'], peak_mem_kind=run['peak_mem_kind'])
        if (error := _failure(run, time_limit_s)) is not None:
            return dict(record, error=error)
        if group.measure == 'train':
            record.update(measure_train(run, outdir, gpu is not None))
            if row.group == 'train' and row.fp32:
                ws.offer_snapshot(outdir)
        elif group.measure == 'images':
            record.update(measure_images(run, outdir, args))
        else:
            record.update(measure_progress(run, args))
    except (RuntimeError, OSError, ValueError, KeyError) as err:
        return dict(record, error=str(err))
    record['ok'] = True
    return record


def add_ratios(records: list[dict]) -> list[dict]:
    """img/s (and peak memory) of every row over its group's reference-fp16 row and fp32 row, when those
    ran in the same invocation and succeeded; None otherwise."""
    for record in records:
        for key, marker in (('vs_ref', 'ref'), ('vs_fp32', 'fp32')):
            base = next((r for r in records if r['group'] == record['group'] and r[marker] and r['ok']), None)
            ok = record['ok'] and base is not None
            record[key] = record['images_per_s'] / base['images_per_s'] if ok else None
            if key == 'vs_ref':
                mems = (record['peak_mem_mb'], base['peak_mem_mb']) if ok else (None, None)
                record['mem_vs_ref'] = mems[0] / mems[1] if None not in mems and mems[1] > 0 else None
    return records

#----------------------------------------------------------------------------
# Output.

TABLE_HEAD = ['row', 'img/s', 'startup s', 'peak MB', 'vs ref', 'vs fp32', 'command']


def _fmt(value, spec: str, suffix: str = '') -> str:
    return '-' if value is None else format(value, spec) + suffix


def table_rows(records: list[dict]) -> list[list[str]]:
    """One row of strings per record; a failed row has 'failed' for img/s and its error as an 8th cell."""
    rows = []
    for r in records:
        if not r['ok']:
            rows.append([r['row'], 'failed', '', '', '', '', r.get('command', ''), r['error']])
            continue
        rows.append([r['row'], f'{r["images_per_s"]:.1f}', _fmt(r['startup_s'], '.1f'), _fmt(r['peak_mem_mb'], '.0f'),
                     _fmt(r['vs_ref'], '.2f', 'x'), _fmt(r['vs_fp32'], '.2f', 'x'), r['command']])
    return rows


def format_table(records: list[dict], markdown: bool = False) -> str:
    """The rows as a fixed-width text table, or Markdown for docs/performance.md; a failed row's error
    follows its command."""
    rows = table_rows(records)
    if markdown:
        cell = lambda cells: (f'`{cells[6]}`' if cells[6] else '') + (f' failed: {cells[7]}' if len(cells) > 7 else '')
        lines = [TABLE_HEAD, ['---'] * len(TABLE_HEAD)] + [cells[:6] + [cell(cells).strip()] for cells in rows]
        return '\n'.join('| ' + ' | '.join(cells) + ' |' for cells in lines)
    widths = [max(len(c[0]) for c in rows + [TABLE_HEAD]), 9, 9, 8, 7, 7]
    line = lambda cells: ' '.join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:6], widths[1:])] + [cells[6]])
    lines = [line(TABLE_HEAD), '-' * (sum(widths) + len(widths) + 8)]
    for cells in rows:
        lines.append(line(cells).rstrip())
        if len(cells) > 7:
            lines.append(' ' * (widths[0] + 1) + f'error: {cells[7]}')
    return '\n'.join(lines)


def default_out_path(device_type: str) -> str:
    """bench/results/e2e-<device type>-<YYYY-MM-DD>.json next to this file."""
    return os.path.join(ROOT, 'bench', 'results', f'e2e-{device_type}-{datetime.date.today().isoformat()}.json')


def git_commit() -> str | None:
    """The checked-out commit, so a table can be traced to the code it measured."""
    try:
        proc = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return proc.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def run_e2e(rows: list, device_type: str, gpu_index: int | None, size: str, time_limit_s: float, workdir: str | None,
            images: int | None = None, detector: str | None = None, vae: str | None = None, log=print,
            on_record=None) -> list[dict]:
    """Run the rows in order in a work folder (a temporary one unless `workdir`), each killed after
    `time_limit_s`; returns the records with ratios. `on_record(records)` runs after every row.
    `gpu_index` is N of cuda:N (None: the default GPU, or no GPU when `device_type` is not cuda)."""
    gpu = physical_gpu(gpu_index) if device_type == 'cuda' else None
    env = {} if gpu_index is None else dict(CUDA_VISIBLE_DEVICES=gpu)
    script_env = {} if detector is None else {'fid.py': dict(EDM_FID_DETECTOR=detector)}
    root = workdir or tempfile.mkdtemp(prefix='bench-e2e-')
    ws = Workspace(root, size, device_type, images, vae)
    records = []
    try:
        for row in rows:
            start = time.time()
            script = e2e_rows.GROUPS[row.group].script
            records.append(run_row(row, ws, time_limit_s, gpu, dict(env, **script_env.get(script, {}))))
            add_ratios(records)
            r = records[-1]
            log(f'{row.name:<24s} {time.time() - start:6.1f} s  ' +
                (f'{r["images_per_s"]:.1f} img/s' if r['ok'] else f'failed: {r["error"]}'))
            if on_record is not None:  # e.g. save what is measured so far: a killed run keeps its results
                on_record(records)
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return records
