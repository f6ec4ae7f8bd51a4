"""Benchmark dataset_tool conversion: CIFAR-10 (50k images) and ImageNet-like JPEGs with the ADM crop.

    python bench/dataset_bench.py                      # both cases, 1 and 2 worker processes
    python bench/dataset_bench.py --case cifar --workers 1,2,4

The CIFAR case needs ../shared/assets/cifar-10-batches-py (tarred into the official archive first).
Prints one line per run: case, workers, seconds, images per second.
"""

import os
import pathlib
import shutil
import sys
import tarfile
import tempfile
import time

import click
import numpy as np
import PIL.Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from training.dataset_convert import convert_dataset  # noqa: E402

ASSETS = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'assets'

def make_cifar_archive(folder: pathlib.Path) -> str:
    """cifar-10-python.tar.gz from the real batches (fast gzip level; the content is what matters)."""
    path = folder / 'cifar-10-python.tar.gz'
    with tarfile.open(path, 'w:gz', compresslevel=1) as tar:
        tar.add(ASSETS / 'cifar-10-batches-py', arcname='cifar-10-batches-py')
    return str(path)

def make_jpeg_folder(folder: pathlib.Path, count: int) -> str:
    """ImageNet-like input: `count` 500x375 JPEGs of smooth noise in 10 class folders."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=[count, 47, 63, 3], dtype=np.uint8)
    for i in range(count):
        path = folder / 'jpegs' / f'class{i % 10}' / f'{i:06d}.jpg'
        path.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(base[i]).resize((500, 375), PIL.Image.Resampling.BILINEAR).save(path, quality=90)
    return str(folder / 'jpegs')

def timed_convert(source: str, dest: str, workers: int, **kwargs) -> tuple[float, int]:
    start = time.perf_counter()
    count = convert_dataset(source, dest, workers=workers, progress=False, **kwargs)
    seconds = time.perf_counter() - start
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    else:
        os.remove(dest)
    return seconds, count

@click.command()
@click.option('--case', type=click.Choice(['cifar', 'jpeg', 'all']), default='all', show_default=True)
@click.option('--workers', help='Comma-separated worker counts', default='1,2', show_default=True)
@click.option('--jpegs', help='Images in the JPEG case', type=int, default=2000, show_default=True)
def main(case: str, workers: str, jpegs: int):
    """Time convert_dataset on real CIFAR-10 and synthetic JPEGs."""
    worker_counts = [int(w) for w in workers.split(',')]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        runs = []
        if case in ('cifar', 'all'):
            runs.append(('cifar10-50k -> zip', make_cifar_archive(tmp), {}))
        if case in ('jpeg', 'all'):
            runs.append((f'jpeg-{jpegs} 500x375 -> 64x64 dhariwal', make_jpeg_folder(tmp, jpegs),
                         dict(transform='center-crop-dhariwal', resolution=(64, 64))))
        for name, source, kwargs in runs:
            for count in worker_counts:
                seconds, images = timed_convert(source, str(tmp / 'out.zip'), count, **kwargs)
                print(f'{name:40s} workers={count:2d}  {seconds:7.2f} s  {images / seconds:8.0f} img/s', flush=True)

if __name__ == '__main__':
    main()
