"""Datasets prepared as the DDPM codebase prepares them (tqch/ddpm-torch ddpm_torch/datasets.py).

`dataset_tool.py convert --ddpm-dataset=NAME` writes, in the reference's order, the images that the
reference's training pipeline feeds its network (before its random horizontal flip, which our
training loop does with --xflip):

| NAME     | --source                                            | order                          | pixels |
| mnist    | train-images-idx3-ubyte[.gz] (labels beside it)     | file order                     | PIL bilinear 28x28 -> 32x32, grayscale |
| cifar10  | cifar-10-python.tar.gz                              | data_batch_1..5                | unchanged 32x32 RGB |
| celeba   | folder with list_eval_partition.txt + img_align_celeba/ | list_eval_partition.txt, all splits | crop rows 40..187, cols 15..162 (148x148), PIL bilinear -> 64x64 |
| celebahq | folder of N.png files (img_celeba_hq/)              | numeric, then RandomState(123) shuffle (ProGAN) | unchanged (the reference expects 256x256 PNGs) |

The resize is what torchvision's Resize does to a PIL image: Image.resize with BILINEAR (Pillow
antialiases when shrinking). --resolution changes the output size; for mnist and celeba the filter
stays bilinear, for cifar10 and celebahq (which the reference never resizes) it is Lanczos as in a
plain `dataset_tool.py convert`.
"""

from __future__ import annotations

import csv
import functools
import os
from typing import Callable, Optional

import numpy as np
import PIL.Image

from training import dataset_convert

DDPM_DATASETS = ('mnist', 'cifar10', 'celeba', 'celebahq')
DDPM_RESOLUTION = {'mnist': (32, 32), 'cifar10': None, 'celeba': (64, 64), 'celebahq': None} # None = as stored
CELEBA_CROP = (15, 40, 15 + 148, 40 + 148) # (left, top, right, bottom): ddpm-torch crop_celeba(top=40, left=15, 148x148)
CELEBAHQ_SHUFFLE_SEED = 123 # ProGAN's legacy order of the 30000 CelebA-HQ images

#----------------------------------------------------------------------------
# Transforms.

def _bilinear(width: int, height: int, img: np.ndarray) -> np.ndarray:
    """torchvision Resize((height, width)) of a PIL image: Pillow BILINEAR."""
    if img.shape[1] == width and img.shape[0] == height:
        return img
    return np.array(PIL.Image.fromarray(img).resize((width, height), PIL.Image.Resampling.BILINEAR))

def _crop_celeba(width: int, height: int, img: np.ndarray) -> np.ndarray:
    """ddpm-torch crop_celeba (148x148 at top 40, left 15), then bilinear to width x height."""
    left, top, right, bottom = CELEBA_CROP
    if img.shape[1] < right or img.shape[0] < bottom:
        raise ValueError(f'a {img.shape[1]}x{img.shape[0]} image does not hold the CelebA crop box (left {left}, top {top}, '
                         f'148x148); --ddpm-dataset=celeba expects the aligned 178x218 images of img_align_celeba/')
    return _bilinear(width, height, img[top:bottom, left:right])

def make_ddpm_transform(name: str, resolution: Optional[tuple[int, int]]) -> Callable:
    """Crop/resize of one image for --ddpm-dataset=name; --resolution overrides the reference's size."""
    size = resolution if resolution is not None else DDPM_RESOLUTION[name]
    if size is not None:
        dataset_convert.check_output_size(*size, f'--ddpm-dataset={name} --resolution={size[0]}x{size[1]}')
    if name == 'celeba':
        return functools.partial(_crop_celeba, *size)
    if name == 'mnist':
        return functools.partial(_bilinear, *size)
    return dataset_convert.make_transform(None, resolution)

#----------------------------------------------------------------------------
# Sources in the reference's order.

def open_ddpm_mnist(source: str, max_images: Optional[int]) -> dataset_convert.Source:
    """MNIST training images at 28x28 (the resize to 32 is the transform), in file order."""
    if not os.path.basename(source).endswith(('-images-idx3-ubyte', '-images-idx3-ubyte.gz')):
        raise ValueError(f'--ddpm-dataset=mnist needs --source=.../train-images-idx3-ubyte[.gz], got {source}')
    return dataset_convert.open_mnist(source, max_images, pad=False)

def open_ddpm_cifar10(source: str, max_images: Optional[int]) -> dataset_convert.Source:
    """CIFAR-10 training set, data_batch_1..5 in order (torchvision CIFAR10(train=True))."""
    src = dataset_convert.open_source(source, max_images)
    if not src.description.startswith('CIFAR-10 archive'):
        raise ValueError(f'--ddpm-dataset=cifar10 needs --source=cifar-10-python.tar.gz, got {src.description}')
    return src

def _find_folder(source: str, *candidates: str) -> str:
    """The first of source/candidate that exists, else source itself."""
    for candidate in candidates:
        if os.path.isdir(os.path.join(source, candidate)):
            return os.path.join(source, candidate)
    return source

def open_ddpm_celeba(source: str, max_images: Optional[int]) -> dataset_convert.Source:
    """All CelebA images (split 'all') in the order of list_eval_partition.txt, unlabeled."""
    folder = _find_folder(source, 'celeba')
    if os.path.basename(os.path.normpath(folder)) == 'img_align_celeba':
        folder = os.path.dirname(os.path.normpath(folder)) # the images' folder itself: the partition file is beside it
    partition = os.path.join(folder, 'list_eval_partition.txt')
    if not os.path.isfile(partition):
        raise ValueError(f'--ddpm-dataset=celeba needs --source=<folder holding list_eval_partition.txt and img_align_celeba/>; '
                         f'{partition} not found')
    with open(partition, newline='') as f:
        names = [row[0] for row in csv.reader(f, delimiter=' ', skipinitialspace=True) if row]
    files = [os.path.join(folder, 'img_align_celeba', name) for name in names]
    missing = [f for f in files[:max_images] if not os.path.isfile(f)]
    if missing:
        raise ValueError(f'{len(missing)} images listed in {partition} are missing, e.g. {missing[0]}')
    files = files[:max_images]
    return dataset_convert.Source(description=f'CelebA folder {folder}', payloads=[('file', f) for f in files],
                                  labels=None, item_names=files)

def celebahq_order(fnames: list[str]) -> list[str]:
    """The reference's CelebA-HQ order: N.png sorted by N, then shuffled by RandomState(123) (ProGAN)."""
    stems = [name[:-len('.png')] for name in fnames]
    bad = [name for name, stem in zip(fnames, stems) if not stem.isdigit()]
    if bad:
        raise ValueError(f'--ddpm-dataset=celebahq expects PNGs named by their index (0.png ... 29999.png), found {bad[0]}')
    ordered = sorted(fnames, key=lambda name: int(name[:-len('.png')]))
    permutation = np.random.RandomState(CELEBAHQ_SHUFFLE_SEED).permutation(len(ordered))
    return [ordered[i] for i in permutation]

def open_ddpm_celebahq(source: str, max_images: Optional[int]) -> dataset_convert.Source:
    """The *.png files of img_celeba_hq/ (top level only, as the reference lists them) in ProGAN order."""
    folder = _find_folder(source, 'img_celeba_hq', os.path.join('celeba_hq', 'img_celeba_hq'))
    if not os.path.isdir(folder):
        raise ValueError(f'--ddpm-dataset=celebahq needs --source=<folder of CelebA-HQ PNGs>, got {source}')
    fnames = celebahq_order([f for f in os.listdir(folder) if f.endswith('.png')])
    if not fnames:
        raise ValueError(f'--ddpm-dataset=celebahq found no .png files in {folder}')
    files = [os.path.join(folder, f) for f in fnames[:max_images]]
    return dataset_convert.Source(description=f'CelebA-HQ folder {folder}', payloads=[('file', f) for f in files],
                                  labels=None, item_names=files)

_OPENERS = {'mnist': open_ddpm_mnist, 'cifar10': open_ddpm_cifar10, 'celeba': open_ddpm_celeba, 'celebahq': open_ddpm_celebahq}

#----------------------------------------------------------------------------

def prepare(name: str, source: str, max_images: Optional[int], transform: Optional[str],
            resolution: Optional[tuple[int, int]]) -> tuple[dataset_convert.Source, Callable, bool]:
    """(source, per-image transform, store as RGB?) for `convert --ddpm-dataset=name`."""
    if name not in DDPM_DATASETS:
        raise ValueError(f'--ddpm-dataset={name} is not one of {", ".join(DDPM_DATASETS)}')
    if transform is not None:
        raise ValueError(f'--transform={transform} cannot be combined with --ddpm-dataset={name}, which crops and '
                         f'resizes as ddpm-torch does; leave out --transform')
    transform_fn = make_ddpm_transform(name, resolution)
    source = os.path.expanduser(source) # the reference's --root is '~/datasets'
    if not os.path.exists(source):
        raise FileNotFoundError(f'--source {source} does not exist')
    return _OPENERS[name](source, max_images), transform_fn, name != 'mnist'
