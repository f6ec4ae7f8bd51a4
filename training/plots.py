"""Training curves of a run directory as one PNG: loss, speed and (optionally) metrics against kimg.

    python -m training.plots training-runs/00000-tiny-edm
    python -m training.plots RUN --out=curves.png --metrics=RUN/metrics.jsonl

Reads `stats.jsonl`, written by `training/training_loop.py` once per status tick. The EDM recipe
writes `{name: {num, mean, std}}` per statistic, the EDM2 recipe flat means (`'NaN'` for non-finite);
both carry `Progress/kimg`. Metrics come from the JSON lines `fid.py --metrics-file` appends:
`{metric, value, repeat, net | images, ...}`; a network snapshot name gives the x position in kimg.
"""

import json
import math
import os
import re

import click

import dnnlib

STATS_FILE = 'stats.jsonl'
METRICS_FILE = 'metrics.jsonl'
PANEL_SIZE_IN = (8.0, 2.6)  # Width and height of one panel in inches.
DPI = 100                   # PNG pixels per inch; fixed so the image size depends only on the panel count.
HIGHER_IS_BETTER = ('precision', 'recall')
SNAPSHOT_RE = re.compile(r'-(\d{6,})(?:-(\d+\.\d+))?\.pkl$')  # network-snapshot-0001234[-0.050].pkl, phema-...

#----------------------------------------------------------------------------
# Reading the logs.


def _stat_mean(value) -> float:
    """Mean of one statistic in either format: EDM {num, mean, std} or EDM2 flat number / 'NaN'."""
    if isinstance(value, dict):
        value = value.get('mean')
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_jsonl(path: str) -> tuple[list[dict], list[str]]:
    """JSON objects of a JSONL file and warnings for the lines skipped (blank lines are ignored)."""
    records, warnings = [], []
    with open(path, encoding='utf-8', errors='replace') as f:
        lines = f.read().split('\n')
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            last = all(not rest.strip() for rest in lines[line_no:])
            why = 'incomplete last line (interrupted write?)' if last else 'not a JSON object'
            warnings.append(f'{path}:{line_no}: skipped {why}')
            continue
        records.append(record)
    return records, warnings


def drop_superseded(points: list[tuple[float, dict]]) -> list[tuple[float, dict]]:
    """After a resume from an earlier training state, the repeated kimg range replaces the old one."""
    kept = []
    for kimg, record in points:
        while kept and kept[-1][0] >= kimg:
            kept.pop()
        kept.append((kimg, record))
    return kept


def load_stats(run_dir: str) -> tuple[dict, list[str]]:
    """Series kimg, loss, images/s from RUN_DIR/stats.jsonl, plus warnings for skipped lines."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f'run directory {run_dir!r} does not exist')
    path = os.path.join(run_dir, STATS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} not found: RUN_DIR must be a training run directory '
                                f'(train.py writes {STATS_FILE} at every status tick)')
    records, warnings = read_jsonl(path)
    points = []
    for record in records:
        kimg = _stat_mean(record.get('Progress/kimg'))
        if math.isfinite(kimg):
            points.append((kimg, record))
    if len(points) < len(records):
        warnings.append(f'{path}: skipped {len(records) - len(points)} line(s) without Progress/kimg')
    if not points:
        raise ValueError(f'{path} holds no status lines with Progress/kimg; nothing to plot')
    points = drop_superseded(points)
    sec_per_kimg = [_stat_mean(r.get('Timing/sec_per_kimg')) for _, r in points]
    series = dict(
        kimg=[k for k, _ in points],
        loss=[_stat_mean(r.get('Loss/loss')) for _, r in points],
        images_per_sec=[1e3 / s if s > 0 else math.nan for s in sec_per_kimg])
    return series, warnings


def snapshot_kimg(path: str) -> tuple[float | None, str | None]:
    """kimg and EMA std (EDM2) from a snapshot name such as network-snapshot-0002048-0.100.pkl."""
    match = SNAPSHOT_RE.search(str(path))
    if match is None:
        return None, None
    return float(match.group(1)), match.group(2)


def load_metrics(path: str) -> tuple[dict, str, list[str]]:
    """{metric: {line label: [(x, value)]}} from a fid.py metrics file, the x-axis name, and warnings."""
    records, warnings = read_jsonl(path)
    records = [r for r in records if 'metric' in r and isinstance(r.get('value'), (int, float))]
    if not records:
        raise ValueError(f'{path} holds no metric results (lines with "metric" and "value"); '
                         f'write it with fid.py --metrics-file')
    parsed = [snapshot_kimg(r.get('net', '')) for r in records]
    by_kimg = all(kimg is not None for kimg, _ in parsed)
    series = {}
    for index, (record, (kimg, std)) in enumerate(zip(records, parsed)):
        label = f'EMA std {std}' if by_kimg and std else record['metric']
        x = kimg if by_kimg else index
        # Repeats of one network keep the best value, as the EDM protocol reports the min FID of three.
        best = max if record['metric'] in HIGHER_IS_BETTER else min
        points = series.setdefault(record['metric'], {}).setdefault(label, {})
        points[x] = best(points[x], record['value']) if x in points else record['value']
    curves = {metric: {label: sorted(points.items()) for label, points in lines.items()}
              for metric, lines in series.items()}
    return curves, ('kimg (snapshot)' if by_kimg else 'result index (line order)'), warnings

#----------------------------------------------------------------------------
# Drawing.


def _draw_panel(ax, x, y, ylabel: str, log: bool = False) -> None:
    """One line panel; log scale only where every finite value is positive."""
    ax.plot(x, y, marker='.', markersize=3, linewidth=1)
    finite = [v for v in y if math.isfinite(v)]
    if log and finite and min(finite) > 0:
        ax.set_yscale('log')
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def plot_run(run_dir: str, out: str | None = None, metrics: str | None = None) -> tuple[str, list[str]]:
    """Write the curves of a run as a PNG (atomically); returns its path and the warnings."""
    dnnlib.util.require('matplotlib', 'plotting')
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Object API: the global backend is left alone.
    from matplotlib.figure import Figure

    stats, warnings = load_stats(run_dir)
    if metrics is None and os.path.isfile(os.path.join(run_dir, METRICS_FILE)):
        metrics = os.path.join(run_dir, METRICS_FILE)
    if metrics is not None and not os.path.isfile(metrics):
        raise FileNotFoundError(f'--metrics={metrics} does not exist; pass a file written by fid.py --metrics-file')
    curves, metrics_xlabel = {}, None
    if metrics is not None:
        curves, metrics_xlabel, metric_warnings = load_metrics(metrics)
        warnings += metric_warnings

    num_panels = 2 + len(curves)
    fig = Figure(figsize=(PANEL_SIZE_IN[0], PANEL_SIZE_IN[1] * num_panels), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(num_panels, 1, squeeze=False)[:, 0]
    _draw_panel(axes[0], stats['kimg'], stats['loss'], 'Loss/loss (mean)', log=True)
    axes[0].set_title(os.path.basename(os.path.normpath(run_dir)))
    _draw_panel(axes[1], stats['kimg'], stats['images_per_sec'], 'images/s (training)')
    axes[1].set_xlabel('kimg')
    for ax, (metric, lines) in zip(axes[2:], curves.items()):
        for label, points in lines.items():
            ax.plot([x for x, _ in points], [v for _, v in points], marker='o', markersize=3, label=label)
        ax.set_ylabel(metric)
        ax.set_xlabel(metrics_xlabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize='small')
    fig.tight_layout()

    out = out if out is not None else os.path.join(run_dir, 'stats.png')
    with dnnlib.util.atomic_write(out, 'wb') as f:
        fig.savefig(f, format='png', dpi=DPI)
    return out, warnings

#----------------------------------------------------------------------------


@click.command()
@click.argument('run_dir', metavar='RUN_DIR', type=str)
@click.option('--out', help='Output PNG  [default: RUN_DIR/stats.png]', metavar='PNG', type=str, default=None)
@click.option('--metrics', help=f'fid.py --metrics-file JSONL  [default: RUN_DIR/{METRICS_FILE} if present]',
              metavar='FILE', type=str, default=None)
@dnnlib.util.cli_errors
def main(run_dir: str, out: str | None, metrics: str | None) -> None:
    """Plot loss, images/s and metric curves of a training run against kimg.

    \b
    python -m training.plots training-runs/00000-edm2-img512-xs
    python -m training.plots RUN --metrics=fid.jsonl --out=curves.png
    """
    out, warnings = plot_run(run_dir, out=out, metrics=metrics)
    for warning in warnings:
        click.echo(f'Warning: {warning}', err=True)
    click.echo(f'Saved {out}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
