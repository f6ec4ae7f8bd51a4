"""python -m bench --mode=e2e: the user's scripts (train.py, generate.py, generate_images.py, fid.py,
dataset_tool.py) as subprocesses, one command line per row (bench/e2e_rows.py), on inputs this module
makes itself.

Per row: steady img/s, start-up time, peak memory, and img/s as a ratio to the group's reference-fp16
row and fp32 row. docs/performance.md ("End-to-end mode") describes the method; the inputs are made
in bench/e2e_inputs.py, the measurements taken in bench/e2e_measure.py.
"""

from __future__ import annotations

import datetime
import fnmatch
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from bench import compile_report, e2e_rows
from bench.e2e_inputs import ROOT, Workspace, last_line
from bench.e2e_measure import measure_images, measure_progress, measure_train, physical_gpu, run_command

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
# Rows and records.

def _display(script: str, args: list[str], env: dict, wrapper: list[str]) -> str:
    """The command as a user would type it in the repository root."""
    prefix = ' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())
    return (prefix + ' ' if prefix else '') + shlex.join(['python', *wrapper, script] + args)


def _failure(run: dict, time_limit_s: float) -> str | None:
    """The one-line error of a run, or None when it succeeded."""
    if run['timed_out']:
        return f'killed after the time limit of {time_limit_s:g} s'
    if run['returncode'] != 0:
        return f'exit code {run["returncode"]}: {last_line(run["stderr_tail"]) or "(no error message)"}'
    return None


def run_row(row, ws: Workspace, time_limit_s: float, gpu: str | None, env: dict) -> dict:
    """Run one row and measure it; a failure is recorded as `error` (one line), never raised."""
    group, script = e2e_rows.GROUPS[row.group], e2e_rows.script_of(row)
    base = list(group.base[ws.size]) + list(row.args)
    record = dict(row=row.name, group=row.group, script=script, ref=row.ref, fp32=row.fp32, ok=False)
    try:
        cache = ws.compile_cache(row)
        if cache is not None:
            env = dict(env, TORCHINDUCTOR_CACHE_DIR=cache[0])
            record['compile_cache'] = cache[1]
        outdir = ws.outdir(row.name)
        args = ws.fill(base, outdir)
        # A reference row runs the reference code's layers (bench.reference_kernels), and the command says so.
        kernels = ['-m', 'bench.reference_kernels'] if row.ref else []
        record['command'] = _display(script, args, env, kernels)
        # A compiling row runs under bench.compile_report: what its start-up compiled, and why a cache missed.
        report = ws.compile_report_path(row.name) if cache is not None else None
        if report is not None and kernels:
            raise ValueError(f'row {row.name}: a reference row does not compile (bench/e2e_rows.py)')
        python = [sys.executable] + (kernels if report is None else ['-m', 'bench.compile_report', f'--out={report}'])
        run = run_command(python + [script] + args, time_limit_s, gpu, env)
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
        if report is not None:
            record['compile_report'] = compile_report.summary(report)
    except (RuntimeError, OSError, ValueError) as err:
        return dict(record, error=str(err))
    except Exception as err:  # a harness bug or an unforeseen output must not stop the other rows
        return dict(record, error=f'{type(err).__name__}: {err}')
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
    ws = Workspace(root, size, device_type, images, vae, time_limit_s)
    records = []
    try:
        for row in rows:
            start = time.time()
            records.append(run_row(row, ws, time_limit_s, gpu, dict(env, **script_env.get(e2e_rows.script_of(row), {}))))
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
