"""Encoding datasets into VAE latents and decoding them back (EDM2 `dataset_tool.py encode|decode`).

Output layout as the reference: `00000/img-mean-std-00000000.npy` holds the 8-channel raw latent
(posterior mean and std of the Stable Diffusion VAE, float32 CHW) of image 0; decoding writes
`00000/img00000000.png`; labels go to dataset.json. What we add: batches, bf16/fp16 on CUDA, work
split over torchrun ranks, resuming (finished files are skipped; every file is written atomically),
and decoding with per-image seeds, so that the output does not depend on batch size or rank count.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from typing import Callable, Iterator, Optional

import numpy as np
import torch

import dnnlib
from training.dataset_convert import (DatasetWriter, Source, get_handle, archive_fname, close_handles, encode_png,
                                      file_ext, labels_json, open_image_folder, open_image_zip, open_source, read_pixels)

# tf32 (the default): torch's defaults, under which the reference encoder runs (cuDNN convolutions in TF32, matmuls
# in fp32). fp32: no TF32 anywhere. bf16/fp16: autocast (CUDA only). Off CUDA, tf32 and fp32 are the same.
PRECISIONS = {'fp32': None, 'tf32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}

#----------------------------------------------------------------------------
# Reading latents.

def _is_npy(fname: str) -> bool:
    return fname.lower().endswith('.npy')

def open_latent_source(source: str, max_images: Optional[int] = None) -> Source:
    """The .npy raw latents in a folder or zip made by `encode`, with their labels."""
    if os.path.isdir(source):
        src = open_image_folder(source, max_images, is_item=_is_npy, folder_labels=False)
    elif os.path.isfile(source) and file_ext(source).lower() == 'zip':
        src = open_image_zip(source, max_images, is_item=_is_npy)
    elif not os.path.exists(source):
        raise FileNotFoundError(f'--source {source} does not exist')
    else:
        raise ValueError(f'--source {source} must be a folder or .zip of .npy latents made by `dataset_tool.py encode`')
    if len(src) == 0:
        raise ValueError(f'--source {source} holds no .npy latents; make them with `dataset_tool.py encode`')
    return src

def read_latents(payload: tuple) -> np.ndarray:
    """One stored raw latent as a float32 CHW array."""
    if payload[0] == 'zip':
        data = get_handle('zip', payload[1]).read(payload[2])
    else:
        with open(payload[1], 'rb') as f:
            data = f.read()
    latent = np.load(io.BytesIO(data), allow_pickle=False)
    return latent.reshape(-1, *latent.shape[-2:]).astype(np.float32)

#----------------------------------------------------------------------------
# Output that survives interruption: one atomic file at a time, dataset.json last.

def _write_file_atomic(path: str, data: bytes) -> None:
    tmp = f'{path}.{os.getpid()}.tmp'
    with dnnlib.util.writing(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, 'wb') as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise

class ResumableWriter:
    """Writes into the --dest folder (or, for a .zip, a '<dest>.partial' folder packed at the end)."""

    def __init__(self, dest: str):
        if dest == '':
            raise ValueError('--dest must not be an empty string')
        self.dest = os.path.abspath(dest)
        self.is_zip = file_ext(dest).lower() == 'zip'
        self.folder = self.dest + '.partial' if self.is_zip else self.dest
        if self.is_zip and os.path.exists(self.dest):
            raise ValueError(f'--dest {dest} already exists; remove it or choose another name')
        if os.path.isfile(self.folder):
            raise ValueError(f'--dest {dest} is an existing file; give a folder or a .zip name')
        if os.path.isfile(os.path.join(self.folder, 'dataset.json')):
            raise ValueError(f'--dest {self.folder} already holds a finished dataset; choose a new folder or empty it')
        stray = [f for f in (os.listdir(self.folder) if os.path.isdir(self.folder) else []) if not (f.isdigit() and len(f) == 5)]
        if stray:
            raise ValueError(f'--dest folder {self.folder} is not empty (e.g. {stray[0]}) and is not an '
                             'unfinished output of this tool; choose a new folder or empty it')

    def exists(self, fname: str) -> bool:
        return os.path.isfile(os.path.join(self.folder, fname))

    def write(self, fname: str, data: bytes) -> None:
        _write_file_atomic(os.path.join(self.folder, fname), data)

    def finish(self, fnames: list[str], labels: Optional[list]) -> None:
        """Write dataset.json; pack the zip. Call on one rank after every file was written."""
        missing = [f for f in fnames if not self.exists(f)]
        if missing:
            raise RuntimeError(f'{len(missing)} outputs are missing (e.g. {missing[0]}); run the same command again')
        entries = [[f, label] if label is not None else None for f, label in zip(fnames, labels or [None] * len(fnames))]
        for folder in {os.path.dirname(os.path.join(self.folder, f)) for f in fnames}:
            for stale in [f for f in os.listdir(folder) if f.endswith('.tmp')]:  # from interrupted runs
                os.remove(os.path.join(folder, stale))
        if not self.is_zip:
            _write_file_atomic(os.path.join(self.folder, 'dataset.json'), labels_json(entries).encode('utf8'))
            return
        with DatasetWriter(self.dest) as writer:
            for fname in fnames:
                with open(os.path.join(self.folder, fname), 'rb') as f:
                    writer.write(fname, f.read())
            writer.write('dataset.json', labels_json(entries))
        shutil.rmtree(self.folder)

#----------------------------------------------------------------------------
# The loop shared by encode and decode.

class _Reader(torch.utils.data.Dataset):
    """Reads items in DataLoader workers; errors travel back as text, to be raised as one line."""

    def __init__(self, source: Source, indices: list[int], read_fn: Callable):
        self.source, self.indices, self.read_fn = source, indices, read_fn

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple:
        idx = self.indices[k]
        try:
            return idx, self.read_fn(self.source.payloads[idx]), None
        except Exception as err:  # reported in the main process with the file name
            return idx, None, f'cannot read {self.source.names(idx)}: {type(err).__name__}: {err}'

def _identity(item):
    return item

def _batches(source: Source, indices: list[int], read_fn: Callable, batch: int, workers: int) -> Iterator[tuple]:
    """(indices, stacked arrays) of up to `batch` consecutive items of one shape. The reader processes start here,
    in the calling thread (the main one), even when a background thread gathers the batches."""
    ahead = dict(prefetch_factor=-(-2 * batch // workers)) if workers > 0 else {}  # two batches ready
    items = iter(torch.utils.data.DataLoader(_Reader(source, indices, read_fn), batch_size=None, shuffle=False,
                                              num_workers=workers, collate_fn=_identity, **ahead))
    return _stacked(items, batch)

def _stacked(items: Iterator[tuple], batch: int) -> Iterator[tuple]:
    idxs, arrays = [], []
    for idx, array, error in items:
        if error is not None:
            raise ValueError(error)
        if arrays and (len(arrays) == batch or array.shape != arrays[0].shape):
            yield idxs, np.stack(arrays)
            idxs, arrays = [], []
        idxs.append(idx)
        arrays.append(array)
    if arrays:
        yield idxs, np.stack(arrays)

def _setup(device: str, precision: str) -> tuple[torch.device, contextlib.AbstractContextManager]:
    """Device of this rank (joining torchrun's process group) and the autocast context."""
    from torch_utils import distributed, misc
    if precision not in PRECISIONS:
        raise ValueError(f'--precision={precision} is not one of {", ".join(PRECISIONS)}')
    dev = distributed.device_for_rank(misc.choose_device(device))
    if PRECISIONS[precision] is not None and dev.type != 'cuda':
        raise ValueError(f'--precision={precision} needs a CUDA device; use --precision=tf32 (the default) on {dev.type}')
    distributed.init(dev)
    if dev.type == 'cuda':  # fp32 means fp32 (cuDNN would use TF32 by default); tf32 keeps the reference's defaults
        torch.backends.cudnn.allow_tf32 = precision == 'tf32'
        torch.backends.cuda.matmul.allow_tf32 = False
        # Every batch has one shape, so cuDNN's measured algorithm choice pays from the second batch on. Its
        # heuristic choice made --batch=8 in fp32 slower than --batch=1 on an H200 (12.0 against 18.6 img/s).
        torch.backends.cudnn.benchmark = True
    autocast = torch.autocast(dev.type, dtype=PRECISIONS[precision]) if PRECISIONS[precision] else contextlib.nullcontext()
    return dev, autocast

def _start(open_src: Callable[[], Source], dest: str, model: str, batch: int, device: str, precision: str) -> tuple:
    """What encode and decode both need, checked in this order: writer, source, device, autocast, loaded VAE."""
    from training.encoders import StabilityVAEEncoder
    if batch < 1:
        raise ValueError(f'--batch={batch} must be >= 1')
    writer = ResumableWriter(dest)
    src = open_src()
    dev, autocast = _setup(device, precision)
    vae = StabilityVAEEncoder(vae_name=model, batch_size=batch)
    vae.init(dev)  # fail now, before any work, if the model is not available
    return writer, src, dev, autocast, vae

def _run(src: Source, writer: ResumableWriter, fnames: list[str], read_fn: Callable, compute_fn: Callable,
         to_bytes: Callable, batch: int, workers: int, progress: bool) -> int:
    """Compute this rank's missing outputs, then (rank 0) finish the dataset; returns the dataset size.
    While the GPU computes a batch, one background thread gathers the next one from the DataLoader and another
    serializes (to_bytes) and writes the previous one's outputs."""
    from tqdm import tqdm
    from torch_utils import distributed
    rank, world = distributed.get_rank(), distributed.get_world_size()
    todo = [i for i in range(rank, len(src), world) if not writer.exists(fnames[i])]

    def write_batch(names, outputs):
        for name, output in zip(names, outputs):
            writer.write(name, to_bytes(output))

    bar = tqdm(total=len(todo), disable=not progress or rank != 0, unit='img')  # rank 0's share
    with bar, dnnlib.util.BackgroundWrites('dataset-writer') as writes:
        for idxs, arrays in dnnlib.util.prefetch(_batches(src, todo, read_fn, batch, workers), 'dataset-reader'):
            writes.submit(write_batch, [fnames[i] for i in idxs], compute_fn(idxs, arrays))
            bar.update(len(idxs))
    close_handles()
    distributed.barrier()
    if rank == 0:
        writer.finish(fnames, src.labels)
    distributed.barrier()
    return len(src)

#----------------------------------------------------------------------------
# Encode and decode.

def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()

def _read_image_for_vae(payload: tuple) -> np.ndarray:
    img = read_pixels(payload, rgb=True)
    if img.shape[0] % 8 or img.shape[1] % 8:
        raise ValueError(f'the VAE needs sides divisible by 8, got {img.shape[1]}x{img.shape[0]}')
    return img

def encode_dataset(
    source:     str,                    # Images: folder, zip or any source that `convert` reads.
    dest:       str,                    # Output folder or .zip of .npy raw latents.
    model:      str = 'stabilityai/sd-vae-ft-mse', # Hugging Face name or local diffusers folder of the VAE.
    max_images: Optional[int] = None,   # Encode at most this many images. None = all.
    batch:      int = 8,                # Images per VAE call; does not change the results.
    precision:  str = 'tf32',           # tf32 (the reference's cuDNN default), fp32, or bf16/fp16 autocast on CUDA.
    device:     str = 'auto',           # auto, cpu, cuda, cuda:N or mps.
    workers:    int = 2,                # DataLoader processes that decode images. 0 = main process.
    progress:   bool = True,            # Show a tqdm progress bar?
) -> int:
    """Encode images into SD-VAE raw latents, 8 x H/8 x W/8 mean+std per image (EDM2 dataset_tool encode)."""
    writer, src, dev, autocast, vae = _start(lambda: open_source(source, max_images), dest, model, batch, device, precision)

    def compute_fn(idxs, images):
        pixels = torch.from_numpy(images).to(dev).permute(0, 3, 1, 2)
        with torch.no_grad(), autocast:
            latents = vae.encode_pixels(pixels)
        return list(latents.to(torch.float32).cpu().numpy())

    fnames = [archive_fname(i, prefix='img-mean-std-', ext='npy') for i in range(len(src))]
    return _run(src, writer, fnames, _read_image_for_vae, compute_fn, _npy_bytes, batch, workers, progress)

def latent_noise(seed: int, idx: int, shape: tuple) -> torch.Tensor:
    """Standard normal noise of image `idx`, the same for any batch size, rank count or device."""
    state = np.random.SeedSequence([seed, idx]).generate_state(2, np.uint32)
    generator = torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return torch.randn(shape, generator=generator)

def decode_dataset(
    source:     str,                    # Folder or zip of .npy raw latents made by encode_dataset.
    dest:       str,                    # Output folder or .zip of PNG images.
    model:      str = 'stabilityai/sd-vae-ft-mse', # Hugging Face name or local diffusers folder of the VAE.
    max_images: Optional[int] = None,   # Decode at most this many latents. None = all.
    batch:      int = 8,                # Latents per VAE call; does not change the results.
    precision:  str = 'tf32',           # tf32 (the reference's cuDNN default), fp32, or bf16/fp16 autocast on CUDA.
    device:     str = 'auto',           # auto, cpu, cuda, cuda:N or mps.
    seed:       int = 0,                # Seed of the posterior samples mean + std * noise.
    workers:    int = 2,                # DataLoader processes that read latents. 0 = main process.
    progress:   bool = True,            # Show a tqdm progress bar?
) -> int:
    """Sample each stored posterior and decode it to a PNG (EDM2 dataset_tool decode)."""
    writer, src, dev, autocast, vae = _start(lambda: open_latent_source(source, max_images), dest, model, batch, device, precision)

    def compute_fn(idxs, latents):
        latents = torch.from_numpy(latents)
        if latents.shape[1] % 2:
            raise ValueError(f'{src.names(idxs[0])} has {latents.shape[1]} channels; expected mean and std (an even number)')
        noise = torch.stack([latent_noise(seed, i, (latents.shape[1] // 2, *latents.shape[2:])) for i in idxs])
        with torch.no_grad(), autocast:
            pixels = vae.decode(vae.encode_latents(latents.to(dev), noise=noise.to(dev)))
        return list(pixels.permute(0, 2, 3, 1).cpu().numpy())

    fnames = [archive_fname(i) for i in range(len(src))]
    return _run(src, writer, fnames, read_latents, compute_fn, encode_png, batch, workers, progress)

#----------------------------------------------------------------------------
