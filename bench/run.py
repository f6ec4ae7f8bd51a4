"""python -m bench: reference vs fast numerics, side by side, for training, sampling, FID and encoding.

    python -m bench                                   # auto device; full sizes on CUDA, tiny on CPU
    python -m bench --mode=e2e --rows='train-*'       # the user's scripts end to end (bench/e2e.py)
    python -m bench --device cpu --size tiny --reps 3
    python -m bench --device cuda --tasks train --nets ddpmpp-cifar10,edm2-s --peak-tflops 989
    python -m bench --device cpu --quick --reps 1     # smoke test: smallest nets, 3 sampler steps

Prints a table and writes JSON (default bench/results/<device>-<date>.json). docs/performance.md
describes the method; bench/fastpaths.py defines the two variants.
"""

import dataclasses
import datetime
import gc
import json
import os
import platform
import shlex
import sys
import time

import click
import torch
from click.core import ParameterSource

import dnnlib
from bench import cases, configs, e2e, e2e_rows, timing
from bench.fastpaths import make_variants
from torch_utils import misc

TASKS = ('train', 'sample', 'fid', 'encode')
OPTIONAL_ERRORS = (dnnlib.util.UserError, FileNotFoundError, ImportError, OSError)

#----------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    """Marketing name of the GPU, or the CPU model."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe_run(device, size, variants, peak, warmup, reps) -> dict:
    """The `meta` block of the JSON: where, when and how the numbers were taken."""
    return dict(
        date=datetime.datetime.now().isoformat(timespec='seconds'), device=str(device), device_name=device_name(device),
        torch=torch.__version__, cuda=torch.version.cuda, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
        load_average=[round(x, 2) for x in os.getloadavg()] if hasattr(os, 'getloadavg') else None, size=size, warmup=warmup,
        reps=reps, statistic='median', peak_tflops=peak, variants={v.name: dataclasses.asdict(v) for v in variants})


def add_ratios(record: dict) -> dict:
    """speedup = fast / reference images/s; mem_ratio = fast / reference peak memory (same run)."""
    ref, fast = record['variants']['reference'], record['variants']['fast']
    record['speedup'] = fast['images_per_s'] / ref['images_per_s']
    record['mem_ratio'] = fast['peak_mem_mb'] / ref['peak_mem_mb'] if ref['peak_mem_mb'] > 0 else None
    return record


def run_all(device, size, tasks, nets, variants, warmup, reps, peak, train_batch=None, detector=None, vae=None,
            log=print, on_record=None) -> list[dict]:
    """Every selected case, in order; FID / encoding cases whose models are unavailable are recorded as skipped."""
    jobs = []
    if 'train' in tasks:
        jobs += [('train', name, lambda name=name: cases.bench_train(name, size, variants, device, warmup, reps, peak,
                                                                     train_batch)) for name in nets]
    if 'sample' in tasks:
        jobs += [('sample', spec.name, lambda spec=spec: cases.bench_sample(spec, size, variants, device, warmup, reps, peak))
                 for spec in configs.sample_specs(size)]
    if 'fid' in tasks:
        jobs.append(('fid', 'inception-v3', lambda: cases.bench_fid(size, variants, device, warmup, reps, detector)))
    if 'encode' in tasks:
        jobs.append(('encode', 'sd-vae', lambda: cases.bench_encode(size, variants, device, warmup, reps, vae)))
    records = []
    for task, name, job in jobs:
        start = time.perf_counter()
        try:
            records.append(add_ratios(job()))
        except OPTIONAL_ERRORS as err:
            if task in ('train', 'sample'):
                raise
            records.append(dict(task=task, config=name, skipped=str(err)))
        log(f'{task:<7s}{name:<28s} {time.perf_counter() - start:6.1f} s' + (' (skipped)' if 'skipped' in records[-1] else ''))
        if on_record is not None:  # e.g. save what is measured so far: a killed run keeps its results
            on_record(records)
    return records

#----------------------------------------------------------------------------
# Output.

def _fmt(value, spec: str) -> str:
    return '-' if value is None else format(value, spec)


def table_rows(records: list[dict]) -> list[list[str]]:
    """One row of strings per case: images/s, speed-up, peak memory and MFU of both variants."""
    rows = []
    for r in records:
        if 'skipped' in r:
            rows.append([r['task'], r['config'], '-', f'skipped: {r["skipped"][:80]}'] + [''] * 6)
            continue
        ref, fast = r['variants']['reference'], r['variants']['fast']
        rows.append([r['task'], r['config'], str(r['batch']), f'{ref["images_per_s"]:.2f}', f'{fast["images_per_s"]:.2f}',
                     f'{r["speedup"]:.2f}x', f'{ref["peak_mem_mb"]:.1f}', f'{fast["peak_mem_mb"]:.1f}',
                     _fmt(ref.get('mfu'), '.1%'), _fmt(fast.get('mfu'), '.1%')])
    return rows


TABLE_HEAD = ['task', 'config', 'batch', 'ref img/s', 'fast img/s', 'speedup', 'ref MB', 'fast MB', 'ref MFU', 'fast MFU']


def format_table(records: list[dict], markdown: bool = False) -> str:
    """The cases as a fixed-width text table, or as a Markdown table for docs/performance.md."""
    rows = table_rows(records)
    if markdown:
        lines = [TABLE_HEAD, ['---'] * len(TABLE_HEAD)] + rows
        return '\n'.join('| ' + ' | '.join(cells) + ' |' for cells in lines)
    widths = [7, 28] + [10] * 8
    fmt = lambda cells: ' '.join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [fmt(TABLE_HEAD), '-' * (sum(widths) + len(widths) - 1)]
    lines += [fmt(cells) if not cells[3].startswith('skipped') else f'{cells[0]:<7} {cells[1]:<28} {cells[3]}' for cells in rows]
    return '\n'.join(lines)


def default_out_path(device: torch.device) -> str:
    """bench/results/<device type>-<YYYY-MM-DD>.json next to this file."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
    return os.path.join(folder, f'{device.type}-{datetime.date.today().isoformat()}.json')


def write_json(path: str, data: dict) -> None:
    """Write `data` atomically (tmp file, then rename)."""
    with dnnlib.util.atomic_write(path, 'wt') as f:
        json.dump(data, f, indent=2)
        f.write('\n')

#----------------------------------------------------------------------------

def _parse_list(value: str | None, choices: tuple, flag: str) -> list[str]:
    items = [item.strip() for item in value.split(',') if item.strip()] if value else list(choices)
    bad = [item for item in items if item not in choices]
    if bad:
        raise click.BadParameter(f'{", ".join(bad)} not known; choose from {", ".join(choices)}', param_hint=flag)
    return items


def run_e2e_mode(device, size, rows, time_limit, workdir, images, detector, vae, markdown, out) -> None:
    """--mode=e2e: the rows of bench/e2e_rows.py as subprocesses; table on stdout, JSON in `out`."""
    try:
        selected = e2e.select_rows(rows)
    except ValueError as err:
        raise click.BadParameter(str(err).removeprefix('--rows: '), param_hint='--rows') from None
    size = size or ('full' if device.type == 'cuda' else 'tiny')
    time_limit = time_limit or (600 if device.type == 'cuda' else 300)
    meta = dict(mode='e2e', command=shlex.join(['python', '-m', 'bench'] + sys.argv[1:]),
                date=datetime.datetime.now().isoformat(timespec='seconds'), device=str(device),
                device_name=device_name(device), torch=torch.__version__, cuda=torch.version.cuda, cpu_count=os.cpu_count(),
                load_average=[round(x, 2) for x in os.getloadavg()] if hasattr(os, 'getloadavg') else None,
                git_commit=e2e.git_commit(), size=size, data=dict(e2e_rows.DATA[size], **({} if images is None else dict(images=images))),
                time_limit_s=time_limit, rows=[r.name for r in selected])
    click.echo(f'{meta["device_name"]} ({device}), size {size}, {len(selected)} row(s), time limit {time_limit} s per command, '
               f'load average {meta["load_average"]}')
    out = out or e2e.default_out_path(device.type)
    records = e2e.run_e2e(selected, device.type, device.index, size, time_limit, workdir, images, detector, vae, log=click.echo,
                          on_record=lambda partial: write_json(out, dict(meta=meta, results=partial)))
    click.echo(e2e.format_table(records, markdown=markdown))
    write_json(out, dict(meta=meta, results=records))
    click.echo(f'Wrote {out}')


STEPS_ONLY = ('quick', 'tasks', 'nets', 'train_batch', 'reps', 'warmup', 'compile_', 'peak_tflops', 'threads')
E2E_ONLY = ('rows', 'time_limit', 'workdir', 'images')


def check_mode_options(mode: str) -> None:
    """Options of the other mode, given on the command line, are an error rather than silently ignored."""
    ctx = click.get_current_context()
    wrong = E2E_ONLY if mode == 'steps' else STEPS_ONLY
    given = [p for p in ctx.command.params if p.name in wrong and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]
    if given:
        flags = ', '.join(p.opts[0] for p in given)
        raise click.BadParameter(f'{flags} only apply to --mode={"e2e" if mode == "steps" else "steps"}', param_hint='--mode')


@click.command()
@click.option('--mode', help='steps: isolated steps, reference vs fast numerics; e2e: the user scripts end to end',
              type=click.Choice(['steps', 'e2e']), default='steps', show_default=True)
@click.option('--device', help='auto | cpu | cuda | cuda:N | mps', type=str, default='auto', show_default=True)
@click.option('--size', help='Network sizes [default: full on CUDA, tiny elsewhere]', type=click.Choice(['tiny', 'full']))
@click.option('--quick', help='Smoke test: smallest nets, 3 sampler steps, no warm-up unless --warmup', is_flag=True)
@click.option('--tasks', help=f'Comma list of {",".join(TASKS)} [default: all]', type=str)
@click.option('--nets', help=f'Training nets, comma list of {",".join(configs.TRAIN_NETS)} [default: all]', type=str)
@click.option('--batch', 'train_batch', help='Training batch for every net [default: per net, bench/configs.py]', type=click.IntRange(min=1))
@click.option('--reps', help='Timed repetitions per measurement (the median is reported)', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--warmup', help='Untimed calls before timing [default: 2, --quick: 0]', type=click.IntRange(min=0))
@click.option('--compile/--no-compile', 'compile_', help='torch.compile in the fast variant [default: on CUDA only]', default=None)
@click.option('--peak-tflops', help='Peak TFLOP/s of the fast numerics (bf16 on CUDA) for MFU [default: measured with a large matmul]', type=click.FloatRange(min=0, min_open=True))
@click.option('--threads', help='CPU threads for torch [default: torch default, --quick: 1]', type=click.IntRange(min=1))
@click.option('--detector', help='Inception-v3 FID detector file [default: training/detectors.py lookup]', type=str)
@click.option('--vae', help='Real VAE (name or diffusers folder) [default: random init of the SD architecture]', type=str)
@click.option('--markdown', help='Print the table as Markdown', is_flag=True)
@click.option('--out', help='JSON output path [default: bench/results/[e2e-]<device>-<date>.json]', type=click.Path(dir_okay=False))
@click.option('--rows', help='e2e: comma list of row names or globs, e.g. train-*,gen-fp32 [default: all of bench/e2e_rows.py]', type=str)
@click.option('--time-limit', help='e2e: seconds before a command is killed [default: 600 on CUDA, 300 elsewhere]', type=click.FloatRange(min=1))
@click.option('--workdir', help='e2e: keep the made-up datasets and snapshot here, reuse them next time [default: a temporary folder]', type=click.Path(file_okay=False))
@click.option('--images', help='e2e: images in the made-up PNG dataset [default: 5000 full, 64 tiny]', type=click.IntRange(min=2))
@dnnlib.util.cli_errors
def main(mode, device, size, quick, tasks, nets, train_batch, reps, warmup, compile_, peak_tflops, threads, detector, vae, markdown, out,
         rows, time_limit, workdir, images):
    """Benchmark reference vs fast numerics of training, sampling, FID features and latent encoding,
    or (--mode=e2e) the user's scripts end to end."""
    check_mode_options(mode)
    device = misc.choose_device(device)
    if mode == 'e2e':
        return run_e2e_mode(device, size, rows, time_limit, workdir, images, detector, vae, markdown, out)
    size = 'quick' if quick else size or ('full' if device.type == 'cuda' else 'tiny')
    warmup = warmup if warmup is not None else (0 if quick else 2)
    compile_ = compile_ if compile_ is not None else device.type == 'cuda'
    threads = threads if threads is not None else (1 if quick else None)
    if threads is not None:
        torch.set_num_threads(threads)  # one thread avoids OpenMP spinning when other jobs share the cores
    tasks = _parse_list(tasks, TASKS, '--tasks')
    nets = _parse_list(nets, configs.TRAIN_NETS, '--nets')
    gc.freeze()  # the modules imported so far are permanent: later gc.collect() calls stay fast
    peak = timing.peak_tflops(device, override=peak_tflops, quick=quick)
    variants = make_variants(device, compile_)
    meta = describe_run(device, size, variants, peak, warmup, reps)
    click.echo(f'{meta["device_name"]} ({device}), size {size}, warm-up {warmup}, reps {reps}, compile {compile_}, '
               f'peak TFLOP/s {", ".join(f"{k} {v:.3g}" for k, v in peak.items() if k != "source")} ({peak["source"]})')
    if device.type == 'cpu':
        click.echo(f'CPU load average {meta["load_average"]} on {meta["cpu_count"]} cores, {torch.get_num_threads()} torch threads')
    out = out or default_out_path(device)
    records = run_all(device, size, tasks, nets, variants, warmup, reps, peak, train_batch, detector, vae, log=click.echo,
                      on_record=lambda partial: write_json(out, dict(meta=meta, results=partial)))
    click.echo(format_table(records, markdown=markdown))
    write_json(out, dict(meta=meta, results=records))
    click.echo(f'Wrote {out}')
