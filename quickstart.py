"""Whole pipeline on a small built-in dataset, on CPU, in a few minutes.

Runs the real scripts one after the other, exactly as a user would:
dataset_tool.py convert -> train.py -> generate.py -> fid.py ref + calc.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

import click

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, 'quickstart', 'cifar10-mini.zip')


def run_step(title: str, script: str, args: list[str]) -> None:
    """Run one of the project's scripts in a child process; stop the quickstart if it fails."""
    cmd = [sys.executable, os.path.join(HERE, script)] + args
    click.secho(f'\n=== {title}', bold=True)
    click.echo('$ python ' + ' '.join([script] + args))
    start = time.time()
    if subprocess.run(cmd).returncode != 0:
        raise click.ClickException(f'{title} failed (see above); rerun the quickstart to continue where it stopped')
    click.echo(f'({time.time() - start:.0f} s)')


def plan(outdir: str, kimg: int, num_images: int, device: str) -> list[tuple[str, str, list[str]]]:
    """The steps of the quickstart and their command lines."""
    dataset = os.path.join(outdir, 'dataset-16x16.zip')
    run_dir = os.path.join(outdir, 'training-run')
    images = os.path.join(outdir, 'images')
    steps = []
    if not os.path.isfile(dataset):
        steps.append(('1/4 Convert 1000 CIFAR-10 images to a 16x16 dataset', 'dataset_tool.py',
                      ['convert', f'--source={DATA}', f'--dest={dataset}', '--resolution=16x16']))
    ref_subset = os.path.join(outdir, f'dataset-16x16-first{num_images}.zip')
    if not os.path.isfile(ref_subset):
        steps.append(('1/4 (cont.) Keep the first images as the FID reference set', 'dataset_tool.py',
                      ['convert', f'--source={DATA}', f'--dest={ref_subset}', '--resolution=16x16',
                       f'--max-images={num_images}']))
    steps += [
        ('2/4 Train a tiny class-conditional EDM model', 'train.py',
         ['--preset=quickstart', f'--data={dataset}', f'--outdir={run_dir}', '--nosubdir', f'--duration={kimg}k',
          f'--device={device}']),
        ('3/4 Sample an image grid with the newest snapshot', 'generate.py',
         [f'--net={{snapshot}}', f'--outdir={images}', f'--seeds=0-{num_images - 1}', '--steps=18', '--batch=64',
          f'--grid={os.path.join(outdir, "grid.png")}', f'--device={device}']),
        ('4/4 FID of the samples against the dataset', 'fid.py',
         ['ref', f'--data={ref_subset}', f'--dest={os.path.join(outdir, "dataset-ref.npz")}', f'--device={device}']),
        ('4/4 (cont.)', 'fid.py',
         ['calc', f'--images={images}', f'--ref={os.path.join(outdir, "dataset-ref.npz")}', f'--num={num_images}',
          f'--device={device}', f'--metrics-file={os.path.join(outdir, "metrics.jsonl")}']),
    ]
    return steps


def check_fid_detector() -> None:
    """Stop before training, not after it, when the last step's FID detector is not installed."""
    from training import detectors
    try:
        detectors.find_inception(allow_download=False)
    except Exception as err:  # the detector's own one-line message names the pip command
        raise click.ClickException(f'the FID step needs its detector: {err}') from None


def newest_snapshot(run_dir: str) -> str:
    """The newest network snapshot of the training run."""
    snapshots = sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl')))
    if not snapshots:
        raise click.ClickException(f'no network-snapshot-*.pkl in {run_dir}: training did not save one')
    return snapshots[-1]


@click.command()
@click.option('--outdir', help='Where to put everything', metavar='DIR', default='quickstart-run', show_default=True)
@click.option('--kimg', help='Training length in thousands of images', type=click.IntRange(min=1), default=36, show_default=True)
@click.option('--num', 'num_images', help='Images to sample and measure', type=click.IntRange(min=2), default=64, show_default=True)
@click.option('--device', help='auto|cuda|cpu|mps', default='auto', show_default=True)
def main(outdir: str, kimg: int, num_images: int, device: str) -> None:
    """Run dataset_tool -> train -> generate -> fid on a built-in CIFAR-10 subset.

    \b
    python quickstart.py                  # about 3 minutes on 2 CPU cores
    python quickstart.py --kimg=400       # longer training, better images
    """
    start = time.time()
    check_fid_detector()
    os.makedirs(outdir, exist_ok=True)
    run_dir = os.path.join(outdir, 'training-run')
    for title, script, args in plan(outdir, kimg, num_images, device):
        args = [a.replace('{snapshot}', newest_snapshot(run_dir)) if '{snapshot}' in a else a for a in args]
        run_step(title, script, args)
    click.secho(f'\nDone in {time.time() - start:.0f} s. Everything is in {os.path.abspath(outdir)}:', bold=True)
    for name, what in [('dataset-16x16.zip', 'the converted dataset'), ('training-run/', 'log.txt, stats.jsonl, snapshots'),
                       ('images/', f'{num_images} generated PNGs'), ('grid.png', 'all of them in one picture'),
                       ('metrics.jsonl', 'the FID result')]:
        click.echo(f'  {name:<20} {what}')


if __name__ == '__main__':
    main()
