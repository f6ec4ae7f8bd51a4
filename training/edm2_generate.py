"""EDM2's programmatic image API, `generate_images()` of NVlabs/edm2 generate_images.py, over this
project's batched generator (`training.sampling.generate_images`).

EDM2 user scripts call it as `from generate_images import generate_images`; the top-level
generate_images.py re-exports it. It takes a network object or a pickle path/URL (read with the
safe loader), splits the seeds over the ranks as EDM2 does, writes `SEED.png` files when `outdir`
is given and yields one EasyDict per batch.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence

import torch

import dnnlib
from torch_utils import distributed as dist
from training import encoders, sampling

# EDM2's `edm_sampler` is the float32 flavour here.
edm_sampler = sampling.edm2_sampler


class GeneratedBatches:
    """Iterable of EasyDict(images, labels, noise, batch_idx, num_batches, indices, seeds), one per batch of this rank."""

    def __init__(self, batches: sampling.ImageBatches, outdir: str | None, subdirs: bool):
        self.batches, self.outdir, self.subdirs = batches, outdir, subdirs

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dnnlib.EasyDict]:
        with sampling.PngWriter(self.outdir, self.subdirs) as writer:  # PNGs written while the next batch samples
            for batch in self.batches:
                writer.write(batch.seeds, batch.images)
                dist.barrier()  # Keep the ranks in step, as the reference does after every batch.
                yield dnnlib.EasyDict(images=batch.images, labels=batch.labels, noise=batch.noise,
                                      batch_idx=batch.batch_idx, num_batches=batch.num_batches, indices=batch.indices,
                                      seeds=batch.seeds)


def _load(source, what: str, verbose: bool, trust: bool, device: torch.device):
    if verbose:
        dist.print0(f'Loading {what} network from {source} ...')
    return sampling.load_network(source, trust=trust, device=device)


def generate_images(
    net,                                    # Main network: torch.nn.Module, or pickle path / URL.
    gnet                = None,             # Guiding network: module, path or URL; None = the main network.
    encoder             = None,             # training.encoders.Encoder; None = the pickle's, else StandardRGBEncoder.
    outdir: str | None  = None,             # Where to write SEED.png files; None = write nothing.
    subdirs: bool       = False,            # One subfolder per 1000 seeds.
    seeds: Sequence[int] = range(16, 24),   # One image per seed.
    class_idx           = None,             # Class of every image; None = drawn from each seed.
    max_batch_size: int = 32,               # Maximum images per network call.
    encoder_batch_size  = 4,                # Images per decoder call; None = the encoder's default.
    verbose: bool       = True,             # Print what is loaded and generated (rank 0).
    device              = None,             # torch.device or name; None = auto (CUDA, MPS, else CPU).
    sampler_fn: Callable | str = edm_sampler,  # Sampler function (or 'module.function' name, or a SAMPLERS name).
    trust: bool         = False,            # Let pickles run their embedded code (only for files you trust).
    **sampler_kwargs,                       # Options of the sampler, e.g. num_steps, guidance.
) -> GeneratedBatches:
    """Images for the given seeds, batch by batch (EDM2 generate_images.py `generate_images`)."""
    from torch_utils import misc
    device = dist.device_for_rank(misc.choose_device(device)) if not isinstance(device, torch.device) else device
    if isinstance(sampler_fn, str) and sampler_fn not in sampling.SAMPLERS:
        sampler_fn = dnnlib.util.get_obj_by_name(sampler_fn)

    if dist.get_rank() != 0:
        dist.barrier()  # Rank 0 loads (and downloads) first.
    if not isinstance(net, torch.nn.Module):
        net, pickled_encoder = _load(net, 'main', verbose, trust, device)
        encoder = encoder if encoder is not None else pickled_encoder
    if gnet is not None and not isinstance(gnet, torch.nn.Module):
        gnet, _ = _load(gnet, 'guiding', verbose, trust, device)
    if encoder is None:
        encoder = encoders.StandardRGBEncoder()
    if verbose:
        dist.print0(f'Setting up {type(encoder).__name__}...')
    encoder.init(device)
    if encoder_batch_size is not None and hasattr(encoder, 'batch_size'):
        encoder.batch_size = encoder_batch_size
    if dist.get_rank() == 0:
        dist.barrier()

    seeds = [int(seed) for seed in seeds]
    if verbose:
        dist.print0(f'Generating {len(seeds)} images...')
    if outdir is not None and dist.get_rank() == 0:
        os.makedirs(outdir, exist_ok=True)
    batches = sampling.generate_images(net, seeds, gnet=gnet if gnet is not None else net, encoder=encoder,
                                       class_idx=class_idx, batch_size=max_batch_size, sampler=sampler_fn, device=device,
                                       rank=dist.get_rank(), world_size=dist.get_world_size(), **sampler_kwargs)
    return GeneratedBatches(batches, outdir, subdirs)
