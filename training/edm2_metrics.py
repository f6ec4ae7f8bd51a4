"""EDM2's programmatic metrics API (NVlabs/edm2 calculate_metrics.py) over training/metrics.py.

EDM2 user scripts chain it with generate_images():

    stats_iter = calculate_stats_for_iterable(generate_images(net, seeds=range(50000)), metrics=['fid'])
    for r in stats_iter: pass
    calculate_metrics_from_stats(r.stats, ref='img512.pkl', metrics=['fid'])

The top-level calculate_metrics.py re-exports these names.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

import dnnlib
from torch_utils import distributed as dist
from training import metrics as metrics_lib

load_stats = metrics_lib.load_stats
save_stats = metrics_lib.save_stats


class StatsIterable:
    """Feeds batches through the detectors; yields EasyDict(stats, images, batch_idx, num_batches, num_images),
    `stats` set on the last batch only (EDM2 calculate_stats_for_iterable)."""

    def __init__(self, image_iter, metrics: list[str], detectors: dict, device: torch.device, dest_path: str | None):
        self.image_iter, self.metrics, self.detectors, self.device, self.dest_path = image_iter, metrics, detectors, device, dest_path

    def __len__(self) -> int:
        return len(self.image_iter)

    def __iter__(self) -> Iterator[dnnlib.EasyDict]:
        acc = metrics_lib.StatsAccumulator(self.metrics, self.detectors, self.device)
        num_batches = len(self.image_iter)
        for batch_idx, images in enumerate(self.image_iter):
            if isinstance(images, dict):  # a generate_images() batch
                images = images['images']
            elif isinstance(images, (tuple, list)) and len(images) == 2:  # (images, labels)
                images = images[0]
            if images is not None:
                acc.add(torch.as_tensor(images))
            r = dnnlib.EasyDict(stats=None, images=images, batch_idx=batch_idx, num_batches=num_batches)
            if batch_idx == num_batches - 1:
                r.stats = acc.finish()
                r.num_images = r.stats['num_images']
                if self.dest_path is not None and dist.get_rank() == 0:
                    save_stats(r.stats, self.dest_path)
            yield r


def calculate_stats_for_iterable(
    image_iter: Iterable,                       # Batches: uint8 NCHW, (images, labels), or generate_images() EasyDicts.
    metrics: list[str]  = ('fid', 'fd_dinov2'), # Metrics to compute the statistics for.
    verbose: bool       = True,                 # Print what is set up (rank 0).
    dest_path: str | None = None,               # Also save the statistics here (.pkl or .npz); None = do not.
    device              = None,                 # torch.device or name; None = auto.
    detector: str | None = None,                # Inception-v3 file; None = the lookup of training/detectors.py.
    dinov2: str | None  = None,                 # DINOv2 weights; None = the lookup of training/detectors.py.
) -> StatsIterable:
    """Statistics of image batches in a distributed fashion (EDM2 calculate_metrics.py)."""
    from torch_utils import misc
    device = misc.choose_device(device)
    metrics = metrics_lib.parse_metrics(list(metrics))
    if verbose:
        dist.print0('Setting up detectors...')
    detectors = metrics_lib.build_detectors(metrics, inception=detector, dinov2=dinov2)
    return StatsIterable(image_iter, metrics, detectors, device, dest_path)


def calculate_metrics_from_stats(
    stats: dict,                                # Statistics of the generated images.
    ref,                                        # Reference statistics: dict, or .pkl/.npz path or URL.
    metrics: list[str]  = ('fid', 'fd_dinov2'), # Metrics to compute.
    verbose: bool       = True,                 # Print each result as `<metric> = <value>`.
) -> dict:
    """{metric: Frechet distance} for the metrics both sides hold, others skipped (EDM2 calculate_metrics.py)."""
    if isinstance(ref, str):
        ref = load_stats(ref)
    results = {}
    for metric in metrics:
        if metric not in stats or metric not in ref:
            if verbose:
                print(f'No statistics computed for {metric} -- skipping.')
            continue
        results[metric] = metrics_lib.frechet_distance(stats[metric]['mu'], stats[metric]['sigma'],
                                                       ref[metric]['mu'], ref[metric]['sigma'])
        if verbose:
            print(f'{metric} = {results[metric]:g}')
    return results
