"""Feature-extraction throughput (images/s) of the metric detectors, preprocessing included.

    python bench/metrics_bench.py --detectors=inception,dinov2 --batch=64 --num=256 --device=cuda

The DINOv2 timing uses randomly initialised ViT-L/14 weights unless --dinov2 names the real file:
the network is the same, so the speed is too. Prints one JSON line per detector.
"""

from __future__ import annotations

import json
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import dnnlib # noqa: E402
from torch_utils import misc # noqa: E402
from training import detectors # noqa: E402

#----------------------------------------------------------------------------

def make_detector(name: str, inception: str | None, dinov2: str | None) -> detectors.Detector:
    """The detector to time; DINOv2 falls back to random weights of the real architecture."""
    if name == 'inception':
        return detectors.InceptionV3Detector(path=inception, allow_download=False)
    if dinov2 is not None:
        return detectors.DINOv2Detector(path=dinov2, allow_download=False)
    return detectors.DINOv2Detector(model=detectors.DINOv2ViT())

def time_detector(det: detectors.Detector, num: int, batch: int, resolution: int, device: torch.device,
                  warmup: int = 2) -> dict:
    """images/s over `num` images after `warmup` untimed batches (TorchScript optimises the graph on
    its second call); uint8 input of the given resolution. The warm-up calls' times are reported too."""
    images = torch.randint(0, 256, [batch, 3, resolution, resolution], dtype=torch.uint8, device=device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    warmup_s = []
    for _ in range(warmup):
        start = time.perf_counter()
        det(images)
        sync()
        warmup_s.append(round(time.perf_counter() - start, 3))
    start, done = time.perf_counter(), 0
    while done < num:
        det(images)
        done += batch
    sync()
    seconds = time.perf_counter() - start
    return dict(detector=det.name, device=str(device), batch=batch, resolution=resolution, images=done,
                seconds=round(seconds, 3), images_per_s=round(done / seconds, 2), warmup_s=warmup_s,
                threads=torch.get_num_threads())

#----------------------------------------------------------------------------

@click.command()
@click.option('--detectors', 'names', help='Which detectors', metavar='LIST', type=str, default='inception,dinov2', show_default=True)
@click.option('--batch', help='Batch size', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--num', help='Images to time per detector', metavar='INT', type=click.IntRange(min=1), default=256, show_default=True)
@click.option('--warmup', help='Untimed batches first', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@click.option('--resolution', help='Input image side', metavar='INT', type=click.IntRange(min=8), default=32, show_default=True)
@click.option('--device', help='Compute device', metavar='auto|cuda|cpu|mps', type=str, default='auto', show_default=True)
@click.option('--detector', 'inception', help='Inception detector file [default: lookup]', metavar='PATH', type=str, default=None)
@click.option('--dinov2', help='DINOv2 weights [default: random ViT-L/14]', metavar='PATH', type=str, default=None)
@dnnlib.util.cli_errors
def main(names, batch, num, warmup, resolution, device, inception, dinov2):
    """Time the feature detectors of fid.py."""
    device = misc.choose_device(device)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = False # as fid.py: full fp32 features
        torch.backends.cudnn.allow_tf32 = False
    for name in names.split(','):
        if name not in ('inception', 'dinov2'):
            raise click.BadParameter(f'{name!r}: choose inception or dinov2', param_hint='--detectors')
        det = make_detector(name, inception, dinov2)
        print(json.dumps(time_detector(det, num, batch, resolution, device, warmup)), flush=True)

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
