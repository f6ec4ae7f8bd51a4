"""Streaming images (PNG) or latents (NPY) and their labels from datasets made by dataset_tool.py.

Same semantics as the reference `training/dataset.py` of EDM and EDM2: `max_size` picks a fixed
random subset (seeded by `random_seed`) before `xflip` doubles the dataset, integer labels are
returned one-hot, float labels as they are, and `use_labels=False` gives a zero-width label.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Optional

import numpy as np
import PIL.Image
import torch

import dnnlib

try:
    import pyspng  # optional: faster PNG decoding, identical pixels
except ImportError:
    pyspng = None

#----------------------------------------------------------------------------
# Abstract base class: index bookkeeping, labels, caching and x-flips.

class Dataset(torch.utils.data.Dataset):
    """Abstract dataset of CHW images (uint8 pixels or float32 latents) with optional labels."""

    def __init__(self,
        name:           str,                # Name of the dataset, e.g. the file name without extension.
        raw_shape:      list[int],          # Shape of all the raw data, [N, C, H, W].
        use_labels:     bool = True,        # Return labels? False = zero-width labels (label_dim 0).
        max_size:       Optional[int] = None, # Keep a fixed random subset of this many items. None = all. Applied before xflip.
        xflip:          bool = False,       # Double the dataset with horizontally flipped copies. Applied after max_size.
        random_seed:    int = 0,            # Seed of the max_size subset.
        cache:          bool = False,       # Keep loaded items in CPU memory?
    ):
        self._name = name
        self._raw_shape = list(raw_shape)
        self._use_labels = use_labels
        self._cache = cache
        self._cached_images: dict[int, np.ndarray] = {}
        self._raw_labels: Optional[np.ndarray] = None
        self._label_shape: Optional[list[int]] = None

        # Fixed random subset; sorting keeps the file order, as in the reference.
        self._raw_idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if max_size is not None and self._raw_idx.size > max_size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])

        # The flipped copies follow all the unflipped ones.
        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    def _get_raw_labels(self) -> np.ndarray:
        if self._raw_labels is None:
            labels = self._load_raw_labels() if self._use_labels else None
            if labels is None:
                labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)
            assert isinstance(labels, np.ndarray) and labels.shape[0] == self._raw_shape[0]
            assert labels.dtype in (np.float32, np.int64)
            if labels.dtype == np.int64:
                assert labels.ndim == 1
                if np.any(labels < 0):
                    raise ValueError(f'{self._name}: class labels must be >= 0, got {int(labels.min())}')
            self._raw_labels = labels
        return self._raw_labels

    def close(self) -> None:
        """Release open files (overridden by subclasses)."""

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:  # overridden by subclasses
        raise NotImplementedError

    def _load_raw_labels(self) -> Optional[np.ndarray]:  # overridden by subclasses
        raise NotImplementedError

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _raw_labels=None)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __len__(self) -> int:
        return self._raw_idx.size

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        raw_idx = int(self._raw_idx[idx])
        image = self._cached_images.get(raw_idx)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if list(image.shape) != self.image_shape:
                raise ValueError(f'{self._describe(raw_idx)} has shape {list(image.shape)}, '
                                 f'but the dataset\'s first item has {self.image_shape}; all items must have one shape')
            if self._cache:
                self._cached_images[raw_idx] = image
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def _describe(self, raw_idx: int) -> str:
        return f'{self._name} item {raw_idx}'

    def get_label(self, idx: int) -> np.ndarray:
        """The label of item `idx`: one-hot float32 for class indices, else the stored vector."""
        label = self._get_raw_labels()[self._raw_idx[idx]]
        if label.dtype == np.int64:
            onehot = np.zeros(self.label_shape, dtype=np.float32)
            onehot[label] = 1
            label = onehot
        return label.copy()

    def get_details(self, idx: int) -> dnnlib.EasyDict:
        """Where item `idx` comes from: raw index, whether it is flipped, its raw label."""
        d = dnnlib.EasyDict()
        d.raw_idx = int(self._raw_idx[idx])
        d.xflip = int(self._xflip[idx]) != 0
        d.raw_label = self._get_raw_labels()[d.raw_idx].copy()
        return d

    @property
    def name(self) -> str:
        return self._name

    @property
    def image_shape(self) -> list[int]:  # [C, H, W]
        return list(self._raw_shape[1:])

    @property
    def num_channels(self) -> int:
        assert len(self.image_shape) == 3
        return self.image_shape[0]

    @property
    def resolution(self) -> int:
        assert len(self.image_shape) == 3 and self.image_shape[1] == self.image_shape[2]
        return self.image_shape[1]

    @property
    def label_shape(self) -> list[int]:
        if self._label_shape is None:
            raw_labels = self._get_raw_labels()
            if raw_labels.dtype == np.int64:
                self._label_shape = [int(np.max(raw_labels)) + 1]
            else:
                self._label_shape = list(raw_labels.shape[1:])
        return list(self._label_shape)

    @property
    def label_dim(self) -> int:
        assert len(self.label_shape) == 1
        return self.label_shape[0]

    @property
    def has_labels(self) -> bool:
        return any(x != 0 for x in self.label_shape)

    @property
    def has_onehot_labels(self) -> bool:
        return self._get_raw_labels().dtype == np.int64

#----------------------------------------------------------------------------
# Images (any format Pillow reads) or NPY arrays found recursively in a folder or a zip.

class ImageFolderDataset(Dataset):
    """Dataset read from a folder or zip written by dataset_tool.py (reference ImageFolderDataset)."""

    def __init__(self,
        path:           str,                # Folder or .zip archive.
        resolution:     Optional[int] = None, # Require this height and width. None = accept any.
        use_pyspng:     bool = True,        # Decode PNGs with pyspng when it is installed (EDM option; same pixels).
        **super_kwargs: Any,                # Arguments of Dataset: use_labels, max_size, xflip, random_seed, cache.
    ):
        self._path = os.fspath(path)
        self._use_pyspng = use_pyspng
        self._zipfile: Optional[zipfile.ZipFile] = None
        self._zipfile_pid: Optional[int] = None

        if os.path.isdir(self._path):
            self._type = 'dir'
            self._all_fnames = {os.path.relpath(os.path.join(root, fname), start=self._path).replace('\\', '/')
                                for root, _dirs, files in os.walk(self._path) for fname in files}
        elif self._file_ext(self._path) == '.zip' and os.path.isfile(self._path):
            self._type = 'zip'
            try:
                self._all_fnames = set(self._get_zipfile().namelist())
            except zipfile.BadZipFile as err:
                raise ValueError(f'dataset {self._path} is not a readable zip archive ({err})') from None
        elif not os.path.exists(self._path):
            raise FileNotFoundError(f'dataset not found: {self._path}; pass a folder or .zip made by dataset_tool.py')
        else:
            raise ValueError(f'dataset {self._path} must be a folder or a .zip archive')

        PIL.Image.init()
        supported_ext = set(PIL.Image.EXTENSION.keys()) | {'.npy'}
        self._image_fnames = sorted(f for f in self._all_fnames if self._file_ext(f) in supported_ext)
        if len(self._image_fnames) == 0:
            raise FileNotFoundError(f'no image or .npy files found in dataset {self._path}')

        name = os.path.splitext(os.path.basename(self._path.rstrip('/\\')))[0]
        raw_shape = [len(self._image_fnames)] + list(self._load_raw_image(0).shape)
        if resolution is not None and (raw_shape[2] != resolution or raw_shape[3] != resolution):
            raise ValueError(f'dataset {self._path} holds {raw_shape[3]}x{raw_shape[2]} images, '
                             f'but resolution {resolution} was requested')
        super().__init__(name=name, raw_shape=raw_shape, **super_kwargs)

    @staticmethod
    def _file_ext(fname: str) -> str:
        return os.path.splitext(fname)[1].lower()

    def _get_zipfile(self) -> zipfile.ZipFile:
        assert self._type == 'zip'
        # Each process needs its own handle: forked DataLoader workers would otherwise share the
        # parent's file offset and read each other's bytes ('Bad CRC-32').
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            self._zipfile = zipfile.ZipFile(self._path)
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _open_file(self, fname: str):
        if self._type == 'dir':
            return open(os.path.join(self._path, fname), 'rb')
        return self._get_zipfile().open(fname, 'r')

    def close(self) -> None:
        """Close the zip archive, if open (reopened lazily, e.g. in DataLoader workers)."""
        try:
            if self._zipfile is not None:
                self._zipfile.close()
        finally:
            self._zipfile = None

    def __getstate__(self) -> dict:
        return dict(super().__getstate__(), _zipfile=None, _zipfile_pid=None)

    def _describe(self, raw_idx: int) -> str:
        return f'{os.path.join(self._path, self._image_fnames[raw_idx])}'

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        fname = self._image_fnames[raw_idx]
        ext = self._file_ext(fname)
        try:
            with self._open_file(fname) as f:
                if ext == '.npy':
                    image = np.load(f)
                    return image.reshape(-1, *image.shape[-2:])  # latents are stored CHW already
                if ext == '.png' and self._use_pyspng and pyspng is not None:
                    image = pyspng.load(f.read())
                else:
                    image = np.array(PIL.Image.open(f))
        except (OSError, ValueError, SyntaxError, PIL.UnidentifiedImageError) as err:
            raise ValueError(f'cannot read {self._describe(raw_idx)}: {err}') from None
        return image.reshape(*image.shape[:2], -1).transpose(2, 0, 1)  # HW or HWC => CHW

    def _load_raw_labels(self) -> Optional[np.ndarray]:
        fname = 'dataset.json'
        if fname not in self._all_fnames:
            return None
        try:
            with self._open_file(fname) as f:
                labels = json.load(f)['labels']
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f'cannot read the labels in {os.path.join(self._path, fname)}: {err!r}') from None
        if labels is None:
            return None
        labels = dict(labels)
        missing = [f for f in self._image_fnames if f not in labels]
        if missing:
            raise ValueError(f'{os.path.join(self._path, fname)} has no label for {len(missing)} of the '
                             f'{len(self._image_fnames)} images (first: {missing[0]}); use use_labels=False or fix the file')
        labels = np.array([labels[f] for f in self._image_fnames])
        return labels.astype({1: np.int64, 2: np.float32}[labels.ndim])

#----------------------------------------------------------------------------
