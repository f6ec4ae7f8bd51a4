"""Linear-probe accuracy of a denoiser's features (FutureXiang/edm2 linear.py), for any of our networks.

Images in [0, 1] are mapped to [-1, 1], noised at one level sigma of the 18-step EDM schedule (index
t counted from the clean end), and denoised once; the output of one decoder block is average-pooled
over H, W and a linear classifier (Adam, cosine schedule, 15 epochs, random x-flips) is trained on
the training split and scored once on the test split. `grid` trains one classifier per noise level
in (3, 4, 5) and decoder block and reports the best.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Optional

import numpy as np
import torch

GRID_T = (3, 4, 5)

#----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """Options of one probe run; the defaults are those of the reference's config files."""
    t:              Optional[int]   = None      # Noise index into reversed(schedule); None = 4 (32x32), 5 (64x64 and up).
    steps:          int             = 18        # Length of the EDM schedule that t indexes.
    block:          str             = 'out_6'   # Decoder block out_k (k-th decoder block, up-sampling blocks included).
    grid:           bool            = False     # Every t in GRID_T x every decoder block; report the best.
    epochs:         int             = 15        # Classifier epochs (cosine schedule over them).
    batch_size:     int             = 128       # Images per process per step.
    lr:             float           = 1e-3      # Adam learning rate per process (times the number of processes).
    flip:           bool            = True      # Random horizontal flips of the training images.
    seed:           int             = 1337      # Noise, flips, shuffling and classifier init.
    precision:      str             = 'auto'    # Feature extraction: auto (bf16 on CUDA with bf16) | bf16 | fp32.
    workers:        int             = 1         # DataLoader worker processes.


def build_config(**options) -> ProbeConfig:
    """ProbeConfig with the options that are not None (the command line's); the rest keep their defaults."""
    return dataclasses.replace(ProbeConfig(), **{k: v for k, v in options.items() if v is not None})


def default_t(resolution: int) -> int:
    """The reference's noise index: 4 for CIFAR (32x32), 5 for Tiny-ImageNet (64x64)."""
    return 4 if resolution <= 32 else 5


def reference_sigma(t: int, steps: int = 18, sigma_min: float = 0.002, sigma_max: int = 80, rho: int = 7) -> float:
    """reversed(EDM schedule + [0])[t] with the reference's dtypes (float32 roots, float64 mix; EDM Eq. 5)."""
    if not 0 <= t <= steps:
        raise ValueError(f'--t={t} must be in [0, {steps}] for a {steps}-step schedule (0 = clean, {steps} = sigma_max)')
    rho_t = torch.tensor(rho)  # int64, as the reference stores it
    lo, hi = torch.tensor(sigma_min, dtype=torch.float32) ** (1 / rho_t), torch.tensor(sigma_max) ** (1 / rho_t)
    sigmas = (hi + torch.arange(steps, dtype=torch.float64) / (steps - 1) * (lo - hi)) ** rho_t
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
    return float(sigmas.flip(0)[t])

#----------------------------------------------------------------------------
# Features: forward hooks on the decoder blocks of any of our denoisers.

def decoder_blocks(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks out_1, out_2, ... in order (skip-joining and up-sampling blocks, not the bottleneck)."""
    for name in ('nn_model', 'unet', 'model'):  # CIFAR EDM2, EDM2, EDM preconditioning
        inner = getattr(net, name, None)
        if isinstance(inner, torch.nn.Module):
            break
    else:
        inner = net
    if isinstance(getattr(inner, 'up', None), torch.nn.ModuleList):
        return list(inner.up)
    if isinstance(getattr(inner, 'dec', None), torch.nn.ModuleDict):
        return [m for name, m in inner.dec.items() if name.endswith('_up') or '_block' in name]
    raise ValueError(f'{type(net).__name__} has no decoder blocks the probe knows (expected a U-Net with `up` or `dec`)')


@contextlib.contextmanager
def capture_decoder_outputs(net: torch.nn.Module) -> Iterator[dict]:
    """Within the context, each net call fills the yielded dict with {out_k: output of decoder block k}."""
    outputs = {}
    handles = []
    for idx, block in enumerate(decoder_blocks(net)):
        def hook(_module, _inputs, output, name=f'out_{idx + 1}'):
            outputs[name] = output
        handles.append(block.register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto -> bf16 on CUDA devices that support it, fp32 elsewhere."""
    if precision not in ('auto', 'bf16', 'fp32'):
        raise ValueError(f'--precision={precision} must be one of auto, bf16, fp32')
    if precision == 'auto':
        return torch.bfloat16 if device.type == 'cuda' and torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if precision == 'bf16' else torch.float32


def make_feature_fn(net: torch.nn.Module, sigmas: dict[int, float], names: Optional[set] = None,
                    dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None) -> Callable:
    """features(images01, t) -> {out_k: [B, C] float32}: x = 2 x - 1 + sigma n, one net call, mean over H, W."""
    def features(images: torch.Tensor, t: int) -> dict:
        x = images * 2 - 1
        x = x + torch.randn(x.shape, generator=generator, device=x.device) * sigmas[t]
        sigma = torch.full([x.shape[0]], sigmas[t], dtype=torch.float32, device=x.device)
        with capture_decoder_outputs(net) as outputs, torch.no_grad():
            with torch.autocast(x.device.type, dtype=dtype, enabled=(dtype != torch.float32)):
                net(x, sigma)
        return {k: v.float().mean(dim=(2, 3)) for k, v in outputs.items() if names is None or k in names}
    return features

#----------------------------------------------------------------------------
# The classifiers.

def _all_reduce_grads(heads: torch.nn.ModuleDict, world: int) -> None:
    # Averaging the gradients over ranks, as DDP does for the reference's wrapped classifier.
    if world > 1:
        for p in heads.parameters():
            torch.distributed.all_reduce(p.grad)
            p.grad /= world


def fit_classifiers(heads: torch.nn.ModuleDict, train_batches: Callable[[int], Iterable], features: Callable,
                    keys: list[tuple[int, str]], epochs: int, lr: float, progress: Callable = None) -> None:
    """Train one linear head per (t, block) on the same batches: CE loss, Adam(lr), cosine over epochs."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    optimizer = torch.optim.Adam(heads.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(epochs):
        for images, labels in train_batches(epoch):
            optimizer.zero_grad(set_to_none=True)
            loss = 0
            for t in sorted({t for t, _ in keys}):
                feats = features(images, t)
                for key in [k for k in keys if k[0] == t]:
                    loss = loss + loss_fn(heads[head_name(key)](feats[key[1]]), labels)
            loss.backward()  # heads are independent: one backward trains them all
            _all_reduce_grads(heads, world)
            optimizer.step()
            if progress is not None:
                progress(1)
        scheduler.step()


@torch.no_grad()
def evaluate_classifiers(heads: torch.nn.ModuleDict, test_batches: Iterable, features: Callable,
                         keys: list[tuple[int, str]], progress: Callable = None) -> dict:
    """{(t, block): (number correct, number seen)} over this rank's test batches."""
    counts = {key: [0, 0] for key in keys}
    for images, labels in test_batches:
        valid = labels >= 0  # padding of the distributed split is labelled -1
        for t in sorted({t for t, _ in keys}):
            feats = features(images, t)
            for key in [k for k in keys if k[0] == t]:
                pred = heads[head_name(key)](feats[key[1]]).argmax(dim=1)
                counts[key][0] += int((pred == labels)[valid].sum())
                counts[key][1] += int(valid.sum())
        if progress is not None:
            progress(1)
    return counts


def head_name(key: tuple[int, str]) -> str:
    """ModuleDict key of the head for (t, block)."""
    return f't{key[0]}_{key[1]}'


def make_heads(dims: dict[tuple[int, str], int], num_classes: int, seed: int, device: torch.device) -> torch.nn.ModuleDict:
    """One nn.Linear(C, classes) per (t, block), PyTorch default init from `seed` (identical on every rank)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = torch.nn.ModuleDict({head_name(k): torch.nn.Linear(c, num_classes) for k, c in dims.items()})
    return heads.to(device)

#----------------------------------------------------------------------------
# Data: the reference's DistributedSampler split (shuffled per epoch, padded by repetition).

class _Items(torch.utils.data.Dataset):
    """(uint8 image, class index) of dataset[indices[i]]; class -1 marks padding that must not be scored."""

    def __init__(self, dataset, indices: np.ndarray, valid: np.ndarray):
        self.dataset, self.indices, self.valid = dataset, indices, valid

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.dataset[int(self.indices[i])]
        return torch.from_numpy(image), int(np.argmax(label)) if self.valid[i] else -1


def rank_indices(num: int, rank: int, world: int, shuffle_seed: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """This rank's (indices, is-real) of a split padded to a multiple of `world` (DistributedSampler order)."""
    order = np.arange(num)
    if shuffle_seed is not None:
        order = torch.randperm(num, generator=torch.Generator().manual_seed(shuffle_seed)).numpy()
    pad = -num % world
    valid = np.concatenate([np.ones(num, dtype=bool), np.zeros(pad, dtype=bool)])
    order = np.concatenate([order, order[:pad]])
    return order[rank::world], valid[rank::world]


def iterate_split(dataset, batch_size: int, device: torch.device, shuffle_seed: Optional[int], workers: int,
                  pad_valid: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images in [0, 1] on `device`, class indices) batches of this rank's share of the split."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    indices, valid = rank_indices(len(dataset), rank, world, shuffle_seed)
    if pad_valid:
        valid = np.ones_like(valid)  # training keeps the repeated padding, as DistributedSampler does
    loader = torch.utils.data.DataLoader(_Items(dataset, indices, valid), batch_size=batch_size, num_workers=workers,
                                         pin_memory=(device.type == 'cuda'))
    for images, labels in loader:
        yield images.to(device).to(torch.float32) / 255, labels.to(device)


def check_labels(train_set, test_set, net, train_name: str, test_name: str) -> int:
    """Number of classes; ValueError when a split has no labels or the class counts disagree."""
    for flag, name, dataset in (('--data', train_name, train_set), ('--test-data', test_name, test_set)):
        if not dataset.has_labels:
            raise ValueError(f'{flag}={name} has no class labels (dataset.json); the probe needs labelled splits, '
                             f'e.g. dataset_tool.py convert of the labelled train / test split')
    if test_set.label_dim != train_set.label_dim:
        raise ValueError(f'--test-data={test_name} has {test_set.label_dim} classes but --data={train_name} has '
                         f'{train_set.label_dim}; pass the test split of the same dataset')
    net_classes = getattr(net, 'label_dim', 0)
    if net_classes and net_classes != test_set.label_dim:
        raise ValueError(f'--test-data={test_name} has {test_set.label_dim} classes but --net is conditional on '
                         f'{net_classes}; pass data of the dataset the network was trained on')
    return test_set.label_dim

#----------------------------------------------------------------------------

def probe_keys(features: Callable, image_shape: list[int], cfg: ProbeConfig, ts: list[int], device) -> dict:
    """{(t, block): feature width} to train, checked against the blocks the network has."""
    dims = {}
    for t in ts:
        feats = features(torch.zeros([1, *image_shape], device=device), t)
        names = list(feats) if cfg.grid else [cfg.block]
        missing = [n for n in names if n not in feats]
        if missing:
            raise ValueError(f'--block={cfg.block} is not a decoder block of this network; it has {", ".join(feats)}')
        dims.update({(t, name): feats[name].shape[1] for name in names})
    return dims


def run_probe(net: torch.nn.Module, train_set, test_set, cfg: ProbeConfig, device: torch.device,
              names: tuple[str, str] = ('train', 'test')) -> dict:
    """Linear-probe accuracy in % ({'probe_acc', 't', 'sigma', 'block', 'grid'}); every rank returns it."""
    import tqdm

    from training.loss import random_flip
    num_classes = check_labels(train_set, test_set, net, *names)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    ts = list(GRID_T) if cfg.grid else [default_t(train_set.resolution) if cfg.t is None else cfg.t]
    sigmas = {t: reference_sigma(t, cfg.steps) for t in ts}
    generator = torch.Generator(device).manual_seed(cfg.seed + rank)
    dtype = resolve_precision(cfg.precision, device)
    features = make_feature_fn(net.eval().requires_grad_(False), sigmas, dtype=dtype, generator=generator)
    dims = probe_keys(features, train_set.image_shape, cfg, ts, device)
    keys = list(dims)
    heads = make_heads(dims, num_classes, cfg.seed, device)

    def train_batches(epoch):
        for images, labels in iterate_split(train_set, cfg.batch_size, device, cfg.seed + epoch, cfg.workers, pad_valid=True):
            yield (random_flip(images, generator) if cfg.flip else images), labels

    steps_per_epoch = math.ceil(math.ceil(len(train_set) / world) / cfg.batch_size)
    test_steps = math.ceil(math.ceil(len(test_set) / world) / cfg.batch_size)
    with tqdm.tqdm(total=cfg.epochs * steps_per_epoch + test_steps, unit='batch', disable=(rank != 0)) as bar:
        fit_classifiers(heads, train_batches, features, keys, cfg.epochs, cfg.lr * world, progress=bar.update)
        heads.eval()
        counts = evaluate_classifiers(heads, iterate_split(test_set, cfg.batch_size, device, None, cfg.workers),
                                      features, keys, progress=bar.update)
    return summarize(counts, sigmas, device)


def summarize(counts: dict, sigmas: dict, device: torch.device) -> dict:
    """Sum the per-rank counts; accuracy in % per (t, block) and the best one."""
    keys = list(counts)
    totals = torch.tensor([counts[k] for k in keys], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    acc = {k: float(100 * c / n) for k, (c, n) in zip(keys, totals.tolist())}
    best = max(keys, key=lambda k: acc[k])
    result = dict(probe_acc=acc[best], t=best[0], sigma=sigmas[best[0]], block=best[1], num_test=int(totals[0, 1]))
    if len(keys) > 1:
        result['grid'] = {f't={t},{block}': round(a, 4) for (t, block), a in acc.items()}
    return result

#----------------------------------------------------------------------------

def load_probe_network(net: str, device: torch.device, trust: bool = False, reference_config: Optional[str] = None,
                       weights: str = 'ema') -> torch.nn.Module:
    """Our network pickle (its EMA net), or a FutureXiang/edm2 model_<ep>.pth with `reference_config`."""
    from training import networks_cifar_edm2, sampling
    if reference_config is not None:
        return networks_cifar_edm2.load_reference_checkpoint(net, reference_config, weights=weights, device=device)
    if str(net).endswith(('.pth', '.pt')):
        raise ValueError(f'--net={net} looks like a FutureXiang/edm2 checkpoint; say which configuration it is with '
                         f'--reference-config (e.g. cifar10-e)')
    network, encoder = sampling.load_network(net, trust=trust, device=device)
    if encoder is not None and type(encoder).__name__ != 'StandardRGBEncoder':
        raise ValueError(f'--net={net} is a latent-space network; the probe feeds it pixels and supports pixel-space networks only')
    return network


def probe(net: str, data: str, test_data: str, cfg: ProbeConfig, device: torch.device, trust: bool = False,
          reference_config: Optional[str] = None, weights: str = 'ema') -> dict:
    """Load the network and the two labelled splits, then run_probe()."""
    from training.dataset import ImageFolderDataset
    network = load_probe_network(net, device, trust=trust, reference_config=reference_config, weights=weights)
    train_set = ImageFolderDataset(path=data, use_labels=True)
    test_set = ImageFolderDataset(path=test_data, use_labels=True)
    expected = [network.img_channels, network.img_resolution, network.img_resolution]
    for flag, path, dataset in (('--data', data, train_set), ('--test-data', test_data, test_set)):
        if dataset.image_shape != expected:
            raise ValueError(f'{flag}={path} holds images of shape {dataset.image_shape}, but the network takes {expected}')
    return run_probe(network, train_set, test_set, cfg, device, names=(data, test_data))
