"""FID@10k of a quality run (bench/quality_cifar10.sh) against images seen and training wall-clock.

    python bench/quality_plot.py bench/results/h200-2026-12-04-cifar10-quality --kimg=250,400,500,750,800

--kimg names the snapshot of each line of fid10k.jsonl, in the order the eval phase ran them.
"""

import json
import os

import click


def load_jsonl(path: str) -> list[dict]:
    """One dict per non-empty line."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def wall_clock_at(stats: list[dict], kimg: float) -> float:
    """Training seconds (Timing/total_sec) at the first status tick at or past kimg."""
    for record in stats:
        if record['Progress/kimg']['mean'] >= kimg:
            return record['Timing/total_sec']['mean']
    raise ValueError(f'no status line reaches {kimg} kimg')


@click.command()
@click.argument('run_files', metavar='DIR')
@click.option('--kimg', 'kimg_list', help='Snapshot kimg of each FID line', metavar='LIST', required=True)
@click.option('--out', help='Output PNG', metavar='PNG', default='docs/figures/cifar10-h200-fid.png', show_default=True)
def main(run_files, kimg_list, out):
    """Plot FID@10k against Mimg seen and against training minutes."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    stats = load_jsonl(os.path.join(run_files, 'stats.jsonl'))
    fids = [r['value'] for r in load_jsonl(os.path.join(run_files, 'fid10k.jsonl')) if r['metric'] == 'fid']
    kimgs = [float(k) for k in kimg_list.split(',')]
    if len(kimgs) != len(fids):
        raise click.BadParameter(f'{len(kimgs)} kimg values for {len(fids)} FID lines', param_hint='--kimg')
    minutes = [wall_clock_at(stats, k) / 60 for k in kimgs]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, x, label in [(axes[0], [k / 1e3 for k in kimgs], 'Mimg seen'), (axes[1], minutes, 'training minutes (1x H200)')]:
        ax.plot(x, fids, 'o-')
        ax.set_xlabel(label)
        ax.set_yscale('log')
        ax.grid(True, which='both', alpha=0.3)
    axes[0].set_ylabel('FID@10k vs CIFAR-10 train')
    fig.suptitle('EDM cond DDPM++ CIFAR-10, batch 512, --fp16=1 (2026-12-04)')
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    for k, m, f in zip(kimgs, minutes, fids):
        print(f'{k:6.0f} kimg  {m:5.2f} min  FID@10k {f:.2f}')
    print(f'Wrote {out}')


if __name__ == '__main__':
    main()
