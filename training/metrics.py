"""Image-quality metrics: FID, FD_DINOv2 and precision/recall, with EDM / EDM2 statistics files.

The protocol is that of NVlabs/edm `fid.py` and NVlabs/edm2 `calculate_metrics.py`: features of uint8
images are reduced to a mean and an unbiased covariance in float64, summed over ranks, and compared
with reference statistics by the Frechet distance. Precision/recall (Kynkaanniemi et al. 2019) keeps
the features themselves. See docs/metrics.md.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import time
from typing import Any, Iterable, Iterator

import numpy as np
import scipy.linalg
import scipy.linalg.lapack
import torch

import dnnlib
from torch_utils import distributed as dist
from training import detectors as detectors_lib

METRICS = ('fid', 'fd_dinov2', 'pr')
METRIC_DETECTOR = {'fid': 'inception', 'fd_dinov2': 'dinov2', 'pr': 'inception'}
PR_DTYPES = ('float32', 'float16') # --pr-dtype: distance arithmetic of precision/recall (PRConfig.dtype)
PR_DETECTORS = ('inception', 'vgg16') # --pr-detector: Inception-v3 pool features (default) or VGG-16 (StyleGAN2-ADA, ddpm-torch)
PR_MAX_REF = 50000 # reference features kept for precision/recall by `ref`; more are subsampled

#----------------------------------------------------------------------------
# Parsing.

def parse_metrics(spec: str | Iterable[str]) -> list[str]:
    """'fid,fd_dinov2' -> ['fid', 'fd_dinov2'], rejecting unknown names."""
    names = [s.strip() for s in (spec.split(',') if isinstance(spec, str) else spec) if s.strip()]
    bad = [name for name in names if name not in METRICS]
    if bad or not names:
        raise ValueError(f'--metrics={",".join(names)!r}: unknown metric {bad[0] if bad else "(none)"!r}; choose from {", ".join(METRICS)}')
    return list(dict.fromkeys(names))

#----------------------------------------------------------------------------
# Frechet distance and precision/recall.

def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, method: str = 'eigh') -> float:
    """d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))  (Heusel et al. 2017, Eq. 6; Dowson & Landau 1982).
    method='sqrtm' is the reference's scipy.linalg.sqrtm; 'eigh' (default) gets the same trace from the
    eigenvalues of a symmetric matrix similar to S1 S2. It is the more accurate of the two: within ~1e-14
    relative of a closed form at 2048-d, where sqrtm's own error reaches 1e-12 and, on real Inception
    statistics, ~1e-7 (so the two differ by that). It is several times faster and stays accurate for
    rank-deficient statistics."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f'statistics do not match: mean {mu1.shape} / covariance {sigma1.shape} '
                         f'vs mean {mu2.shape} / covariance {sigma2.shape}; were they made by the same detector?')
    if method == 'sqrtm':
        root = scipy.linalg.sqrtm(sigma1 @ sigma2)
        trace_root = np.real(np.trace(root[0] if isinstance(root, tuple) else root))
    elif method == 'eigh':
        trace_root = _trace_sqrt_product(sigma1, sigma2)
    else:
        raise ValueError(f'unknown Frechet distance method {method!r}; choose eigh or sqrtm')
    return float(np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)

def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(R^T S2 R)) for any R with R R^T = S1, since S1 S2 and
    R^T S2 R share their nonzero eigenvalues. R comes from a pivoted Cholesky factorisation, which stops
    at the numerical rank r of S1: O(D^2 r), so statistics of few images are cheap too."""
    factor, piv, rank, info = scipy.linalg.lapack.dpstrf(sigma1, lower=1)
    if info < 0:
        raise ValueError(f'covariance cannot be factorised (LAPACK dpstrf info={info}); does it hold NaN or Inf?')
    root1 = np.zeros([sigma1.shape[0], rank])
    root1[piv - 1] = np.tril(factor)[:, :rank] # undo the pivoting: S1 = P L L^T P^T
    inner = root1.T @ sigma2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())

@dataclasses.dataclass(frozen=True)
class PRConfig:
    """Settings of improved precision/recall; names as in tqch/ddpm-torch eval.py."""
    nhood_size:     int = 3         # k: a feature's ball reaches its k-th nearest other feature (Kynkaanniemi Eq. 1).
    dtype:          str = 'float32' # Distance arithmetic: 'float32' (torch-fidelity's) or 'float16' (ddpm-torch's).
    row_batch_size: int = 10000     # Rows of one block of pairwise distances; memory only, not the result.
    col_batch_size: int = 10000     # Columns of one block of pairwise distances; memory only, not the result.

    def __post_init__(self):
        if self.dtype not in PR_DTYPES:
            raise ValueError(f'--pr-dtype={self.dtype} is not one of {", ".join(PR_DTYPES)}')
        for name in ('nhood_size', 'row_batch_size', 'col_batch_size'):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f'--{name.replace("_", "-")}={getattr(self, name)} must be a positive integer')

def pairwise_distances(rows: torch.Tensor, cols: torch.Tensor, col_batch_size: int = 10000) -> torch.Tensor:
    """Euclidean distances [len(rows), len(cols)] in the features' dtype, one column block at a time.
    float16 goes through the matmul form |x|^2 - 2 x.y + |y|^2, as torch.cdist does for the 10000-row
    blocks of ddpm-torch (its direct form has no float16 kernel on CPU)."""
    mode = 'use_mm_for_euclid_dist' if rows.dtype == torch.float16 else 'use_mm_for_euclid_dist_if_necessary'
    return torch.cat([torch.cdist(rows, block, compute_mode=mode) for block in cols.split(col_batch_size)], dim=1)

def knn_radii(features: torch.Tensor, k: int = 3, row_batch_size: int = 10000, col_batch_size: int = 10000) -> torch.Tensor:
    """Distance of every feature to its k-th nearest other feature: the radius of its hypersphere in
    the estimated manifold (Kynkaanniemi et al. 2019, Eq. 1). float16 features give float16 radii,
    selected among the float16 distances widened to float32 (ddpm-torch ManifoldBuilder.compute_kth)."""
    radii = []
    for rows in features.split(row_batch_size):
        dists = pairwise_distances(rows, features, col_batch_size)
        radii.append(dists.float().kthvalue(k + 1, dim=1).values.to(features.dtype)) # +1: the point itself is at distance 0
    return torch.cat(radii)

def fraction_in_manifold(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor,
                         row_batch_size: int = 10000, col_batch_size: int = 10000) -> float:
    """Fraction of `queries` inside at least one hypersphere (support_i, radii_i) (Kynkaanniemi Eq. 2);
    distances and radii are compared in the features' dtype."""
    inside = 0
    for rows in queries.split(row_batch_size):
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        for cols, col_radii in zip(support.split(col_batch_size), radii.split(col_batch_size)):
            hit |= (pairwise_distances(rows, cols, col_batch_size) <= col_radii.unsqueeze(0)).any(dim=1)
        inside += int(hit.sum())
    return inside / max(queries.shape[0], 1)

def precision_recall(real: torch.Tensor, gen: torch.Tensor, k: int = 3, dtype: str = 'float32',
                     row_batch_size: int = 10000, col_batch_size: int = 10000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, Eqs. 3-4): precision = share of generated
    features inside the real manifold, recall = share of real features inside the generated manifold.
    dtype='float32' equals torch-fidelity; 'float16' reproduces tqch/ddpm-torch (calc_pr) exactly."""
    cfg = PRConfig(nhood_size=k, dtype=dtype, row_batch_size=row_batch_size, col_batch_size=col_batch_size)
    if real.shape[1] != gen.shape[1]:
        raise ValueError(f'precision/recall features differ in width: {real.shape[1]} vs {gen.shape[1]}')
    if min(real.shape[0], gen.shape[0]) <= k:
        raise ValueError(f'precision/recall with --nhood-size={k} needs more than {k} features per set, '
                         f'got {real.shape[0]} and {gen.shape[0]}; use more images or a smaller --nhood-size')
    real, gen = real.to(getattr(torch, cfg.dtype)), gen.to(getattr(torch, cfg.dtype))
    blocks = dict(row_batch_size=row_batch_size, col_batch_size=col_batch_size)
    precision = fraction_in_manifold(gen, real, knn_radii(real, k, **blocks), **blocks)
    recall = fraction_in_manifold(real, gen, knn_radii(gen, k, **blocks), **blocks)
    return precision, recall

#----------------------------------------------------------------------------
# Statistics files: EDM .npz {mu, sigma} and EDM2 .pkl {metric: {mu, sigma}}.

class _StatsUnpickler(pickle.Unpickler):
    """Reads plain dicts of numpy arrays (what EDM2 writes) and refuses anything that could run code."""
    ALLOWED = {('numpy', 'ndarray'), ('numpy', 'dtype'), ('numpy.core.multiarray', '_reconstruct'),
               ('numpy._core.multiarray', '_reconstruct'), ('numpy.core.multiarray', 'scalar'),
               ('numpy._core.multiarray', 'scalar'), ('dnnlib.util', 'EasyDict'), ('collections', 'OrderedDict')}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED and not (module.startswith('numpy') and name.endswith('DType')):
            raise pickle.UnpicklingError(f'unexpected object {module}.{name}')
        return super().find_class(module, name)

def load_stats(path: str) -> dict:
    """Read reference statistics (.npz of EDM, .pkl of EDM2; path or URL) as {metric: {'mu', 'sigma'}}."""
    try:
        with dnnlib.util.open_url(path, verbose=(dist.get_rank() == 0)) as f:
            data = f.read()
        if data[:4] == b'PK\x03\x04': # .npz is a zip archive
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                stats = {'fid': {key: npz[key] for key in npz.files}}
        else:
            stats = _StatsUnpickler(io.BytesIO(data)).load()
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
        if isinstance(err, FileNotFoundError):
            raise FileNotFoundError(f'--ref={path}: no such file') from None
        raise ValueError(f'{path}: not a readable statistics file (.npz or .pkl): {err}') from None
    if not isinstance(stats, dict):
        raise ValueError(f'{path}: not a statistics file: holds a {type(stats).__name__}, expected a dict')
    for metric, entry in stats.items():
        if metric in ('fid', 'fd_dinov2'):
            _check_moments(entry, f'{path} [{metric}]')
    return {key: (dict(value) if isinstance(value, dict) else value) for key, value in stats.items()}

def _check_moments(entry: Any, where: str) -> None:
    if not isinstance(entry, dict) or 'mu' not in entry or 'sigma' not in entry:
        raise ValueError(f'{where}: expected a dict with mu and sigma')
    mu, sigma = np.asarray(entry['mu']), np.asarray(entry['sigma'])
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f'{where}: mu has shape {mu.shape} and sigma {sigma.shape}; expected [D] and [D, D]')

def save_stats(stats: dict, path: str) -> None:
    """Write statistics atomically: .npz holds only FID's mu/sigma (EDM), .pkl everything (EDM2)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == '.npz':
        if 'fid' not in stats:
            raise ValueError(f'--dest={path}: an EDM .npz holds FID statistics only; add fid to --metrics or write a .pkl')
        with dnnlib.util.atomic_write(path) as f:
            np.savez(f, mu=stats['fid']['mu'], sigma=stats['fid']['sigma'])
    elif ext == '.pkl':
        with dnnlib.util.atomic_write(path) as f:
            pickle.dump(stats, f)
    else:
        raise ValueError(f'--dest={path}: unknown statistics format {ext!r}; use .npz (EDM, FID only) or .pkl (EDM2)')

def default_metrics_for_file(path: str) -> list[str]:
    """What `ref` computes without --metrics: FID for an EDM .npz, FID + FD_DINOv2 for an EDM2 .pkl."""
    return ['fid'] if path.lower().endswith('.npz') else ['fid', 'fd_dinov2']

def check_ref(ref: dict, metrics: list[str], detectors: dict[str, detectors_lib.Detector], ref_path: str) -> None:
    """Fail before any feature work when the reference lacks a metric or was made by another detector."""
    for metric in metrics:
        if metric not in ref:
            have = ', '.join(m for m in METRICS if m in ref) or 'nothing usable'
            raise ValueError(f'--ref={ref_path} has no {metric!r} statistics (it holds: {have}); '
                             f'choose --metrics from those, or recompute it with fid.py ref --metrics={metric}')
        width = detectors[detector_kind(metric, detectors)].feature_dim
        ref_width = np.shape(ref[metric]['features'])[1] if metric == 'pr' else np.shape(ref[metric]['mu'])[0]
        if ref_width != width:
            raise ValueError(f'--ref={ref_path} [{metric}] has {ref_width}-d features, but the detector '
                             f'{detectors[detector_kind(metric, detectors)].name} gives {width}-d; recompute the reference with the '
                             f'same detector' + (' (--pr-detector)' if metric == 'pr' else ''))

#----------------------------------------------------------------------------
# Detectors per metric.

def detector_kind(metric: str, detectors: dict) -> str:
    """Key of the detector whose features `metric` uses: 'pr' takes VGG-16 where it was built (--pr-detector=vgg16)."""
    return 'vgg16' if metric == 'pr' and 'vgg16' in detectors else METRIC_DETECTOR[metric]

def build_detectors(metrics: list[str], inception: str | None = None, dinov2: str | None = None,
                    dinov2_model: torch.nn.Module | None = None, pr_detector: str = 'inception',
                    vgg16: str | None = None) -> dict[str, detectors_lib.Detector]:
    """One detector per kind the metrics need; rank 0 builds first so only it ever downloads."""
    kinds = {'vgg16' if m == 'pr' and pr_detector == 'vgg16' else METRIC_DETECTOR[m] for m in metrics}
    if dist.get_rank() != 0:
        dist.barrier()
    result = {}
    try:
        if 'inception' in kinds:
            result['inception'] = detectors_lib.InceptionV3Detector(path=inception)
        if 'dinov2' in kinds:
            result['dinov2'] = detectors_lib.DINOv2Detector(path=dinov2, model=dinov2_model)
        if 'vgg16' in kinds:
            result['vgg16'] = detectors_lib.VGG16Detector(path=vgg16)
    finally:
        if dist.get_rank() == 0:
            dist.barrier()
    return result

#----------------------------------------------------------------------------
# Accumulating statistics over batches, across ranks.

class FeatureMoments:
    """Running sum and sum of outer products of features in float64 (the reference's accumulation)."""

    def __init__(self, dim: int, device: torch.device):
        self.sum = torch.zeros([dim], dtype=torch.float64, device=device)
        self.outer = torch.zeros([dim, dim], dtype=torch.float64, device=device)

    def add(self, features: torch.Tensor) -> None:
        features = features.to(torch.float64)
        self.sum += features.sum(0)
        self.outer += features.T @ features

    def finish(self, num: int) -> dict:
        """Mean and unbiased covariance over all ranks: sigma = (sum x x^T - n mu mu^T) / (n - 1)."""
        total, outer = _all_reduce(self.sum), _all_reduce(self.outer)
        mu = total / num
        sigma = (outer - torch.outer(mu, mu) * num) / (num - 1)
        return dict(mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy())

def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    if dist.get_world_size() > 1:
        torch.distributed.all_reduce(x)
    return x

def _gather_rows(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate every rank's [n_r, D] tensor (n_r may differ) on every rank."""
    if dist.get_world_size() == 1:
        return x
    x = x.to(device)
    sizes = [torch.zeros([], dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    torch.distributed.all_gather(sizes, torch.tensor(x.shape[0], device=device))
    padded = torch.zeros([int(max(sizes)), x.shape[1]], dtype=x.dtype, device=device)
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([part[:int(n)] for part, n in zip(parts, sizes)])

class StatsAccumulator:
    """Feeds image batches through the detectors and accumulates what each metric needs."""

    def __init__(self, metrics: list[str], detectors: dict[str, detectors_lib.Detector], device: torch.device):
        self.metrics, self.detectors, self.device = metrics, detectors, device
        self.moments = {m: FeatureMoments(detectors[METRIC_DETECTOR[m]].feature_dim, device) for m in metrics if m != 'pr'}
        self.pr_features = []
        self.num_local = 0

    def add(self, images: torch.Tensor, pr_keep: torch.Tensor | None = None) -> None:
        """Add a uint8 NCHW batch; `pr_keep` masks which images' features precision/recall keeps."""
        images = _to_rgb(torch.as_tensor(images).to(self.device))
        if images.shape[0] == 0:
            return
        features = {kind: det(images) for kind, det in self.detectors.items()}
        for metric, moments in self.moments.items():
            moments.add(features[METRIC_DETECTOR[metric]])
        if 'pr' in self.metrics:
            pr_features = features[detector_kind('pr', self.detectors)]
            kept = pr_features if pr_keep is None else pr_features[pr_keep.to(self.device)]
            self.pr_features.append(kept.cpu())
        self.num_local += images.shape[0]

    def finish(self) -> dict:
        """Statistics over all ranks: {'num_images', metric: {'mu', 'sigma'} | {'features'}}."""
        num = int(_all_reduce(torch.tensor(self.num_local, dtype=torch.int64, device=self.device)))
        if num < 2:
            raise ValueError(f'statistics need at least 2 images, got {num}')
        stats = dict(num_images=num)
        for metric, moments in self.moments.items():
            stats[metric] = moments.finish(num)
        if 'pr' in self.metrics:
            width = self.detectors[detector_kind('pr', self.detectors)].feature_dim
            local = torch.cat(self.pr_features) if self.pr_features else torch.zeros([0, width])
            stats['pr'] = dict(features=_gather_rows(local, self.device).cpu().numpy().astype(np.float16))
        return stats

def _to_rgb(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f'images must be NCHW with 1 or 3 channels, got shape {tuple(images.shape)}; '
                         f'convert RGBA or latent data to RGB images first')
    if images.dtype != torch.uint8:
        raise ValueError(f'images must be uint8 in [0, 255], got {images.dtype}')
    return images.repeat([1, 3, 1, 1]) if images.shape[1] == 1 else images

#----------------------------------------------------------------------------
# Images from files: the reference subset rule, extended to disjoint repeats.

def select_subsets(num_available: int, num: int | None, repeats: int = 1, seed: int = 0) -> list[np.ndarray]:
    """Indices of `repeats` disjoint subsets of `num` images. With one repeat this is the reference
    rule (ImageFolderDataset max_size): shuffle with RandomState(seed) when there are more, keep sorted."""
    if num is None:
        return [np.arange(num_available)]
    if num_available < num * repeats:
        need = f'--num={num}' + (f' x --repeats={repeats} = {num * repeats}' if repeats > 1 else '')
        raise ValueError(f'found {num_available} images, but {need} are needed; pass a smaller --num or more images')
    order = np.arange(num_available)
    if num_available > num:
        np.random.RandomState(seed % (1 << 31)).shuffle(order)
    return [np.sort(order[r * num:(r + 1) * num]) for r in range(repeats)]

class _CaughtItems(torch.utils.data.Dataset):
    """Dataset wrapper returning (index, image, error) so an unreadable file becomes one clean line
    in the main process instead of a DataLoader worker traceback."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int):
        try:
            return idx, self.dataset[idx][0], None
        except ValueError as err:
            return idx, None, str(err)

def _collate_caught(items: list) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    indices = torch.tensor([item[0] for item in items], dtype=torch.int64)
    errors = [item[2] for item in items if item[2] is not None]
    images = None if errors or not items else torch.from_numpy(np.stack([item[1] for item in items]))
    return indices, images, errors

def open_image_files(path: str):
    """The images of a folder or zip (dataset_tool.py layout or any image files), labels ignored."""
    from training.dataset import ImageFolderDataset
    return ImageFolderDataset(path=path, use_labels=False)

def iterate_image_files(dataset, indices: np.ndarray, batch_size: int = 64, num_workers: int = 2,
                        pr_keep: np.ndarray | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """This rank's share of `indices` as (uint8 images, P/R keep mask) batches; the reference's split:
    the same number of batches on every rank."""
    world, rank = dist.get_world_size(), dist.get_rank()
    num_batches = max((len(indices) - 1) // (batch_size * world) + 1, 1) * world
    rank_batches = [b.tolist() for b in np.array_split(indices, num_batches)[rank::world]]
    # The platform's default start method (fork on Linux, as in the training loop): spawned workers
    # re-import fid.py, torch and scipy each, which cost ~40 s before the first batch on a GPU host.
    loader = torch.utils.data.DataLoader(_CaughtItems(dataset), batch_sampler=rank_batches, num_workers=num_workers,
        collate_fn=_collate_caught, prefetch_factor=(2 if num_workers > 0 else None))
    for batch_indices, images, errors in loader:
        if errors:
            raise ValueError(errors[0])
        keep = None if pr_keep is None else torch.from_numpy(pr_keep[batch_indices.numpy()])
        yield (images if images is not None else torch.zeros([0, 3, 1, 1], dtype=torch.uint8)), keep

#----------------------------------------------------------------------------
# Top-level computations used by fid.py.

def compute_stats(batches: Iterable, metrics: list[str], detectors: dict, device: torch.device,
                  progress: bool = True, total: int | None = None) -> dict:
    """Statistics of all batches (uint8 NCHW, or (images, pr_keep)) on all ranks."""
    import tqdm
    acc = StatsAccumulator(metrics, detectors, device)
    for batch in tqdm.tqdm(batches, total=total, unit='batch', disable=(not progress or dist.get_rank() != 0)):
        images, keep = batch if isinstance(batch, tuple) else (batch, None)
        acc.add(images, keep)
    return acc.finish()

def stats_for_files(path: str, metrics: list[str], detectors: dict, device: torch.device, num: int | None = None,
                    seed: int = 0, repeats: int = 1, batch_size: int = 64, num_workers: int = 2) -> list[dict]:
    """Statistics of `repeats` disjoint subsets of `num` images in a folder/zip (all images if num is None)."""
    dataset = open_image_files(path)
    subsets = select_subsets(len(dataset), num, repeats, seed)
    results = []
    for indices in subsets:
        pr_keep = None
        if 'pr' in metrics and num is None and len(indices) > PR_MAX_REF:
            pr_keep = np.zeros(len(dataset), dtype=bool)
            pr_keep[np.random.RandomState(seed).choice(indices, PR_MAX_REF, replace=False)] = True
        batches = iterate_image_files(dataset, indices, batch_size, num_workers, pr_keep)
        total = max((len(indices) - 1) // (batch_size * dist.get_world_size()) + 1, 1)
        results.append(compute_stats(batches, metrics, detectors, device, total=total))
    return results

def generated_batches(net: Any, seeds: list[int], batch_size: int, device: torch.device, **generate_kwargs) -> Iterator[torch.Tensor]:
    """This rank's uint8 NCHW batches from training.sampling.generate_images; nothing is saved."""
    from training import sampling
    batches = sampling.generate_images(net, seeds, batch_size=batch_size, device=device, rank=dist.get_rank(),
                                       world_size=dist.get_world_size(), **generate_kwargs)
    for batch in batches:
        if batch.images is not None:
            yield batch.images

def metrics_from_stats(stats: dict, ref: dict, metrics: list[str], device: torch.device | None = None,
                       pr: PRConfig | None = None) -> dict:
    """{'fid': .., 'fd_dinov2': .., 'precision': .., 'recall': ..} for the requested metrics."""
    results = {}
    pr = pr if pr is not None else PRConfig()
    for metric in metrics:
        if metric == 'pr':
            real = torch.as_tensor(ref['pr']['features'], device=device).float()
            gen = torch.as_tensor(stats['pr']['features'], device=device).float()
            results['precision'], results['recall'] = precision_recall(real, gen, k=pr.nhood_size, dtype=pr.dtype,
                row_batch_size=pr.row_batch_size, col_batch_size=pr.col_batch_size)
        else:
            results[metric] = frechet_distance(stats[metric]['mu'], stats[metric]['sigma'], ref[metric]['mu'], ref[metric]['sigma'])
    return results

def check_pr_config(pr: PRConfig | None, metrics: list[str], ref: dict | None, num: int | None) -> None:
    """Refuse P/R settings that cannot apply: no 'pr' among the metrics, or too few features for k."""
    if pr is None:
        return
    if 'pr' not in metrics:
        raise ValueError(f'precision/recall options (--nhood-size, --pr-dtype, --row/col-batch-size) were given, but the '
                         f'metrics are {",".join(metrics)}; add pr to --metrics (the --ref statistics must hold P/R features)')
    counts = {'--num': num}
    if ref is not None and isinstance(ref.get('pr'), dict) and 'features' in ref['pr']:
        counts['--ref'] = len(ref['pr']['features'])
    for what, count in counts.items():
        if count is not None and count <= pr.nhood_size:
            raise ValueError(f'--nhood-size={pr.nhood_size} needs more than {pr.nhood_size} features per set, but {what} '
                             f'gives {count}; use a smaller --nhood-size or more images')

def _setup(metrics: list[str] | None, ref_path: str | None, detector: str | None, dinov2: str | None,
           dinov2_model: torch.nn.Module | None, pr: PRConfig | None = None, num: int | None = None,
           pr_detector: str = 'inception', vgg16: str | None = None) -> tuple[list[str], dict | None, dict]:
    """Load the reference first (it is cheap and often wrong), then the detectors, then check they agree."""
    if dist.get_rank() != 0:
        dist.barrier() # rank 0 downloads a --ref URL first; the others read the cache
    try:
        ref = load_stats(ref_path) if ref_path is not None else None
    finally:
        if dist.get_rank() == 0:
            dist.barrier()
    if metrics is None:
        metrics = [m for m in METRICS if m in ref] if ref is not None else ['fid']
    check_pr_config(pr, metrics, ref, num)
    if pr_detector not in PR_DETECTORS:
        raise ValueError(f'--pr-detector={pr_detector} is not one of {", ".join(PR_DETECTORS)}')
    if pr_detector != 'inception' and 'pr' not in metrics:
        raise ValueError(f'--pr-detector={pr_detector} was given, but the metrics are {",".join(metrics)}; add pr to --metrics')
    detectors = build_detectors(metrics, inception=detector, dinov2=dinov2, dinov2_model=dinov2_model,
                                pr_detector=pr_detector, vgg16=vgg16)
    if ref is not None:
        check_ref(ref, metrics, detectors, ref_path)
    return metrics, ref, detectors

def calc(images: str, ref_path: str, metrics: list[str] | None = None, num: int = 50000, seed: int = 0, repeats: int = 1,
         batch_size: int = 64, num_workers: int = 2, device: torch.device = torch.device('cpu'),
         detector: str | None = None, dinov2: str | None = None, dinov2_model: torch.nn.Module | None = None,
         pr: PRConfig | None = None, pr_detector: str = 'inception', vgg16: str | None = None) -> list[dict]:
    """Metrics of `repeats` disjoint random subsets of `num` images in a folder/zip vs reference statistics
    (EDM fid.py calc, EDM2 calculate_metrics.py calc). Results on rank 0, [] elsewhere."""
    dataset = open_image_files(images) # fail on a bad --images before loading detectors
    select_subsets(len(dataset), num, repeats, seed)
    metrics, ref, detectors = _setup(metrics, ref_path, detector, dinov2, dinov2_model, pr=pr, num=num,
                                     pr_detector=pr_detector, vgg16=vgg16)
    all_stats = stats_for_files(images, metrics, detectors, device, num=num, seed=seed, repeats=repeats,
                                batch_size=batch_size, num_workers=num_workers)
    if dist.get_rank() != 0:
        return []
    return [dict(metrics_from_stats(stats, ref, metrics, device=device, pr=pr), num_images=stats['num_images']) for stats in all_stats]

def ref(data: str, dest: str, metrics: list[str] | None = None, seed: int = 0, batch_size: int = 64, num_workers: int = 2,
        device: torch.device = torch.device('cpu'), detector: str | None = None, dinov2: str | None = None,
        dinov2_model: torch.nn.Module | None = None, pr_detector: str = 'inception', vgg16: str | None = None) -> dict:
    """Reference statistics of every image in a dataset, written atomically to .npz or .pkl (EDM/EDM2 ref)."""
    if metrics is None:
        metrics = default_metrics_for_file(dest)
    if dest.lower().endswith('.npz') and metrics != ['fid']:
        raise ValueError(f'--dest={dest}: an EDM .npz holds FID statistics only, but --metrics={",".join(metrics)}; write a .pkl')
    if os.path.splitext(dest)[1].lower() not in ('.npz', '.pkl'):
        raise ValueError(f'--dest={dest}: unknown statistics format; use .npz (EDM, FID only) or .pkl (EDM2)')
    open_image_files(data)
    metrics, _ref, detectors = _setup(metrics, None, detector, dinov2, dinov2_model, pr_detector=pr_detector, vgg16=vgg16)
    stats = stats_for_files(data, metrics, detectors, device, seed=seed, batch_size=batch_size, num_workers=num_workers)[0]
    if dist.get_rank() == 0:
        save_stats(stats, dest)
    dist.barrier()
    return stats

def gen(net: str | torch.nn.Module, ref_path: str, metrics: list[str] | None = None, num: int = 50000, seed: int = 0,
        repeats: int = 1, batch_size: int = 32, device: torch.device = torch.device('cpu'), gnet: str | torch.nn.Module | None = None,
        trust: bool = False, detector: str | None = None, dinov2: str | None = None,
        dinov2_model: torch.nn.Module | None = None, pr: PRConfig | None = None, pr_detector: str = 'inception',
        vgg16: str | None = None, **sampler_kwargs) -> list[dict]:
    """Metrics of images generated on the fly for seeds seed + r*num ... seed + (r+1)*num - 1 of each
    repeat r, with nothing written to disk (EDM2 calculate_metrics.py gen). Results on rank 0."""
    metrics, ref, detectors = _setup(metrics, ref_path, detector, dinov2, dinov2_model, pr=pr, num=num,
                                     pr_detector=pr_detector, vgg16=vgg16)
    net, gnet, encoder = _load_generators(net, gnet, trust, device)
    results = []
    for r in range(repeats):
        seeds = list(range(seed + r * num, seed + (r + 1) * num))
        batches = generated_batches(net, seeds, batch_size, device, gnet=gnet, encoder=encoder, **sampler_kwargs)
        total = max((num - 1) // (batch_size * dist.get_world_size()) + 1, 1)
        stats = compute_stats(batches, metrics, detectors, device, total=total)
        if dist.get_rank() == 0:
            results.append(dict(metrics_from_stats(stats, ref, metrics, device=device, pr=pr), num_images=stats['num_images'],
                                seeds=f'{seeds[0]}-{seeds[-1]}'))
    return results

def _load_generators(net, gnet, trust: bool, device: torch.device) -> tuple[Any, Any, Any]:
    """(net, gnet, encoder) from pickles (rank 0 first, so only it downloads) or ready modules."""
    from training import sampling
    encoder = None
    if dist.get_rank() != 0:
        dist.barrier()
    try:
        if not isinstance(net, torch.nn.Module):
            net, encoder = sampling.load_network(net, trust=trust, device=device)
        if gnet is not None and not isinstance(gnet, torch.nn.Module):
            gnet, _ = sampling.load_network(gnet, trust=trust, device=device)
    finally:
        if dist.get_rank() == 0:
            dist.barrier()
    return net.to(device), (gnet.to(device) if gnet is not None else None), encoder

def summarize(results: list[dict]) -> dict:
    """Per metric value: min and mean over repeats."""
    keys = [key for key, value in results[0].items() if isinstance(value, float)]
    return {key: dict(min=float(np.min([r[key] for r in results])), mean=float(np.mean([r[key] for r in results])))
            for key in keys}

def append_jsonl(path: str, records: list[dict]) -> None:
    """Append one JSON line per record and flush (a results log, like stats.jsonl)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, 'a', encoding='utf-8') as f:
        for record in records:
            f.write(json.dumps(dict(record, timestamp=time.time())) + '\n')
        f.flush()

#----------------------------------------------------------------------------
