"""FID during DDPM training (tqch/ddpm-torch train.py --eval, its Evaluator), with our metric pieces.

As in the reference, every snapshot (--chkpt-intv epochs) generates --eval-total-size images (50,000)
from the EMA weights (its configs set use_ema) with ancestral sampling over all T steps, or DDIM with
eta 0 over --skip-schedule / --subseq-size (--use-ddim), and compares their Inception statistics with
the dataset's. Unlike the reference, the images come from fixed seeds 0..N-1 (the same images for any
batch size or number of GPUs, and every evaluation sees the same noise), the detector is the FID
Inception-v3 of training/detectors.py, and the reference statistics are those of --data, computed once
and cached in the run folder (the reference downloads TTUR's precomputed files), or --eval-ref.
Every rank generates its share of the seeds; rank 0 writes the cache and reports the value.
"""

import os
import time

import torch

from torch_utils import distributed as dist
from training import metrics
from training.sampling_ddpm import DDPMNetwork, DDPMPixels

REF_FILE = 'fid-ref.npz'  # Cached statistics of --data in the run folder.


def reference_stats(cfg, run_dir: str, detectors: dict, device: torch.device) -> tuple[dict, str]:
    """(FID statistics, where they came from): --eval-ref, the run folder's cache, or --data (computed on every
    rank, cached by rank 0)."""
    path = cfg.eval_ref or os.path.join(run_dir, REF_FILE)
    if cfg.eval_ref is not None or os.path.isfile(path):
        if dist.get_rank() != 0:
            dist.barrier()  # rank 0 downloads an --eval-ref URL first
        try:
            ref = metrics.load_stats(path)
        finally:
            if dist.get_rank() == 0:
                dist.barrier()
        flag = f'--eval-ref={path}' if cfg.eval_ref is not None else path
        metrics.check_ref(ref, ['fid'], detectors, flag)
        return ref, path
    stats = metrics.stats_for_files(cfg.data, ['fid'], detectors, device, num_workers=cfg.workers)[0]
    if dist.get_rank() == 0:
        metrics.save_stats(stats, path)
    dist.barrier()
    return stats, f'{cfg.data} ({stats["num_images"]} images, cached as {path})'


def sampler_settings(cfg) -> tuple[str, dict, str]:
    """(sampler name, its options, words for the log) of --use-ddim / --skip-schedule / --subseq-size."""
    if cfg.use_ddim:
        kwargs = dict(eta=0.0, skip_schedule=cfg.skip_schedule, subseq_size=cfg.subseq_size)
        return 'ddim', kwargs, f'DDIM eta 0, {cfg.skip_schedule} subsequence of {cfg.subseq_size}'
    return 'ddpm', {}, f'ancestral, {cfg.timesteps} steps'


def fid_of_network(net: DDPMNetwork, ref: dict, detectors: dict, num: int, batch_size: int, device: torch.device,
                   sampler: str = 'ddpm', **sampler_kwargs) -> float | None:
    """FID of `num` images of seeds 0..num-1 against `ref`, generated and measured on all ranks; the value on
    rank 0, None elsewhere. batch_size counts the images of one sampling call summed over ranks."""
    per_rank = max(-(-batch_size // dist.get_world_size()), 1)
    batches = metrics.generated_batches(net, list(range(num)), per_rank, device, sampler=sampler, encoder=DDPMPixels(),
                                        **sampler_kwargs)
    stats = metrics.compute_stats(batches, ['fid'], detectors, device, progress=False)
    if dist.get_rank() != 0:
        return None
    return metrics.metrics_from_stats(stats, ref, ['fid'], device=device)['fid']


class Evaluator:
    """--eval of the DDPM recipe: detector and reference statistics loaded once, then one FID per call."""

    def __init__(self,
        cfg,                        # TrainConfig of the run (eval_* fields, use_ddim, data).
        run_dir:    str,            # Run folder, where the statistics of --data are cached.
        device:     torch.device,   # Where to sample and run the detector.
        log,                        # Function taking one log line (rank 0 writes it).
    ):
        self.cfg, self.device, self.log = cfg, device, log
        self.detectors = metrics.build_detectors(['fid'])
        self.ref, source = reference_stats(cfg, run_dir, self.detectors, device)
        log(f'FID reference statistics (--eval): {source}')

    def __call__(self, ema_net: torch.nn.Module, resolution: int, diffusion: dict) -> float | None:
        """FID of the EMA network (rank 0; None elsewhere), logged in one line."""
        cfg, log = self.cfg, self.log
        start = time.time()
        sampler, kwargs, words = sampler_settings(cfg)
        net = DDPMNetwork(ema_net, resolution, diffusion).eval()
        fid = fid_of_network(net, self.ref, self.detectors, cfg.eval_total_size, cfg.eval_batch_size, self.device,
                             sampler=sampler, **kwargs)
        if fid is not None:
            log(f'FID {fid:.4f} of the EMA ({cfg.eval_total_size} images, {words}; {time.time() - start:.1f} s)')
        return fid
