"""Reading image datasets in their download formats and writing them as PNG folders or zips.

The library behind `dataset_tool.py convert` (EDM2) and `dataset_tool.py --source --dest` (EDM). For
the same input and options the output pixels, file names and labels equal those of the reference
tools: the same Pillow resize filters, the same crop arithmetic and PNG compression level 0. What
we add: work spread over processes, every output written to a temporary sibling of --dest and
moved into place only when complete, and one clear error line for bad input.

Deviations, all for input the reference tools reject or misread: images that are neither RGB nor
grayscale (palette, RGBA, 16-bit) are converted to RGB or 8-bit grayscale; a dataset.json that
misses labels of some images is an error (the reference silently drops all labels).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import io
import json
import multiprocessing
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import zipfile
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import PIL.Image

import dnnlib

TRANSFORMS = ('center-crop', 'center-crop-wide', 'center-crop-dhariwal')

#----------------------------------------------------------------------------
# Small helpers.

def parse_resolution(text: str) -> tuple[int, int]:
    """Parse 'WxH' or 'W,H' into (W, H) (reference parse_tuple)."""
    m = re.match(r'^(\d+)[x,](\d+)$', text.strip())
    if not m:
        raise ValueError(f'cannot parse resolution {text!r}; expected WxH, e.g. 64x64')
    return int(m.group(1)), int(m.group(2))

def file_ext(name: str) -> str:
    """Text after the last dot (reference file_ext)."""
    return str(name).split('.')[-1]

def is_image_ext(fname: str) -> bool:
    """True for file names with an extension that Pillow registers (reference is_image_ext)."""
    PIL.Image.init()
    return f'.{file_ext(fname).lower()}' in PIL.Image.EXTENSION

def archive_fname(idx: int, prefix: str = 'img', ext: str = 'png') -> str:
    """Output name of item `idx`, e.g. '00012/img00012345.png': 1000 files per folder."""
    idx_str = f'{idx:08d}'
    return f'{idx_str[:5]}/{prefix}{idx_str}.{ext}'

def _read_labels_json(data: bytes | str, where: str) -> dict:
    """{relative path: label} from dataset.json contents; {} when its labels are null."""
    try:
        labels = json.loads(data)['labels']
        return {} if labels is None else {x[0]: x[1] for x in labels}
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise ValueError(f'cannot read the labels in {where}: {type(err).__name__}: {err}; expected '
                         '{"labels": [["path/img.png", 3], ...]} or {"labels": null}') from None

#----------------------------------------------------------------------------
# Sources. A source lists its items as picklable payloads, so that worker
# processes can decode them: ('file', path), ('zip', zip_path, member),
# ('lmdb', lmdb_dir, key) or ('array', ndarray).

@dataclasses.dataclass
class Source:
    """Items of an input dataset, their labels and names for messages."""
    description:    str                         # What the source is, e.g. 'CIFAR-10 archive x.tar.gz'.
    payloads:       Sequence[tuple]             # One payload per item, in output order.
    labels:         Optional[Sequence[Any]]     # One label per item (int or list of floats); None = unlabeled.
    item_names:     Optional[Sequence[str]] = None  # Names of the items for messages. None = '<description>: image <i>'.

    def __len__(self) -> int:
        return len(self.payloads)

    def names(self, idx: int) -> str:
        """Name of item `idx` in error messages: its file, or its place in the archive."""
        return self.item_names[idx] if self.item_names is not None else f'{self.description}: image {idx}'


def _label_list(names: Sequence[str], labels: dict, where: str, all_names: Optional[Sequence[str]] = None) -> Optional[list]:
    """Labels in item order; error if some items have none (reference: silently unlabeled) or some
    labels name files that the source does not hold (reference: silently ignored)."""
    if not labels:
        return None
    unknown = sorted(set(labels) - set(all_names if all_names is not None else names))
    if unknown:
        raise ValueError(f'{where} labels {len(unknown)} files that are not images of the source (first: {unknown[0]}); '
                         'fix the paths (relative to the source, with /) or remove those entries')
    missing = [name for name in names if name not in labels]
    if missing:
        raise ValueError(f'{where} has labels for {len(names) - len(missing)} of the {len(names)} images '
                         f'(first without one: {missing[0]}); add the missing entries or set "labels": null')
    return [labels[name] for name in names]

def _folder_labels(arch_fnames: Sequence[str]) -> dict:
    """Class index of every file from its top-level folder, when there are several (reference)."""
    toplevel = {f: f.split('/')[0] if '/' in f else '' for f in arch_fnames}
    indices = {name: idx for idx, name in enumerate(sorted(set(toplevel.values())))}
    return {f: indices[t] for f, t in toplevel.items()} if len(indices) > 1 else {}

def open_image_folder(source_dir: str, max_images: Optional[int], edm_order: bool = False,
                      is_item: Callable[[str], bool] = is_image_ext, folder_labels: bool = True) -> Source:
    """All images (files where `is_item`) below a folder; labels from dataset.json, else top-level folders."""
    files = []
    for root, _dirs, fnames in os.walk(source_dir, followlinks=True):
        files += [os.path.join(root, f) for f in fnames if is_item(f)]
    # EDM sorted pathlib paths (part by part), EDM2 sorts strings; they differ for names like 'a' and 'a-b'.
    files.sort(key=(lambda f: os.path.relpath(f, source_dir).split(os.sep)) if edm_order else None)
    arch_fnames = [os.path.relpath(f, source_dir).replace('\\', '/') for f in files]
    labels = {}
    meta_fname = os.path.join(source_dir, 'dataset.json')
    if os.path.isfile(meta_fname):
        try:
            with open(meta_fname, 'rb') as f:
                labels = _read_labels_json(f.read(), meta_fname)
        except OSError as err:
            raise ValueError(f'cannot read {meta_fname}: {err}') from None
    if not labels and folder_labels:
        labels = _folder_labels(arch_fnames)
    count = len(files) if max_images is None else min(len(files), max_images)
    return Source(description=f'image folder {source_dir}', payloads=[('file', f) for f in files[:count]],
                  labels=_label_list(arch_fnames[:count], labels, meta_fname, arch_fnames), item_names=files[:count])

def open_image_zip(source: str, max_images: Optional[int], is_item: Callable[[str], bool] = is_image_ext) -> Source:
    """All images (members where `is_item`) in a zip archive; labels from its dataset.json."""
    try:
        with zipfile.ZipFile(source, mode='r') as z:
            members = sorted(f for f in z.namelist() if is_item(f))
            labels = {}
            if 'dataset.json' in z.namelist():
                labels = _read_labels_json(z.read('dataset.json'), f'{source}/dataset.json')
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f'cannot read zip archive {source}: {err}') from None
    count = len(members) if max_images is None else min(len(members), max_images)
    return Source(description=f'zip archive {source}', payloads=[('zip', source, m) for m in members[:count]],
                  labels=_label_list(members[:count], labels, f'{source}/dataset.json', members),
                  item_names=[f'{source}/{m}' for m in members[:count]])

def open_lmdb(lmdb_dir: str, max_images: Optional[int]) -> Source:
    """LSUN scene categories stored as an LMDB database of encoded images (unlabeled)."""
    try:
        import lmdb
    except ImportError:
        raise ValueError(f'reading the LSUN database {lmdb_dir} needs the lmdb package: pip install lmdb') from None
    keys = []
    with lmdb.open(lmdb_dir, readonly=True, lock=False) as env, env.begin(write=False) as txn:
        for key in txn.cursor().iternext(keys=True, values=False):
            if max_images is not None and len(keys) >= max_images:
                break
            keys.append(bytes(key))
    return Source(description=f'LSUN database {lmdb_dir}', payloads=[('lmdb', lmdb_dir, k) for k in keys],
                  labels=None, item_names=[f'{lmdb_dir} key {k!r}' for k in keys])

#----------------------------------------------------------------------------
# CIFAR and MNIST archives.

class _ArrayUnpickler(pickle.Unpickler):
    """Reads the CIFAR batch pickles without running code: only numpy arrays are rebuilt."""
    _ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
                ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode')}  # the last: Python 3 protocol-2 bytes

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f'unexpected object {module}.{name} in a CIFAR batch')
        return super().find_class(module, name)

def _read_tar_pickles(tarball: str, wanted: Sequence[str], what: str) -> dict:
    """{member name: unpickled dict} for the wanted members of a .tar.gz; error naming any missing one."""
    found = {}
    try:
        with tarfile.open(tarball, 'r:*') as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    with tar.extractfile(member) as f:
                        found[member.name] = _ArrayUnpickler(f, encoding='latin1').load()
    except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError, ValueError) as err:
        raise ValueError(f'cannot read {what} archive {tarball}: {type(err).__name__}: {err}; '
                         'is the download complete?') from None
    missing = [name for name in wanted if name not in found]
    if missing:
        raise ValueError(f'{what} archive {tarball} lacks {", ".join(missing)}; is the download complete?')
    return found

def _array_source(description: str, images: np.ndarray, labels: np.ndarray, max_images: Optional[int]) -> Source:
    if len(images) != len(labels):
        raise ValueError(f'{description} holds {len(images)} images but {len(labels)} labels')
    count = len(images) if max_images is None else min(len(images), max_images)
    return Source(description=description, payloads=[('array', img) for img in images[:count]],
                  labels=[int(x) for x in labels[:count]])

def open_cifar(tarball: str, max_images: Optional[int], kind: str) -> Source:
    """CIFAR-10 (5 training batches) or CIFAR-100 (training set, fine labels) python-format archive."""
    if kind == 'cifar10':
        wanted, label_key, num_classes = [f'cifar-10-batches-py/data_batch_{i}' for i in range(1, 6)], 'labels', 10
    else:
        wanted, label_key, num_classes = ['cifar-100-python/train'], 'fine_labels', 100
    what = kind.replace('cifar', 'CIFAR-')
    batches = _read_tar_pickles(tarball, wanted, what)
    try:
        images = np.concatenate([batches[name]['data'].reshape(-1, 3, 32, 32) for name in wanted])
        labels = np.concatenate([np.asarray(batches[name][label_key], dtype=np.int64) for name in wanted])
    except (KeyError, ValueError, AttributeError) as err:
        raise ValueError(f'{what} archive {tarball} has an unexpected batch layout: {err!r}') from None
    if images.dtype != np.uint8 or labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes:
        raise ValueError(f'{what} archive {tarball} holds {images.dtype} pixels or labels outside 0..{num_classes - 1}')
    images = images.transpose(0, 2, 3, 1)  # NCHW => NHWC
    return _array_source(f'{what} archive {tarball}', images, labels, max_images)

def _read_idx(path: str, magic: int, what: str) -> np.ndarray:
    """Array stored in an MNIST idx file (big-endian header: magic, then one int32 per dimension)."""
    try:
        with (gzip.open(path, 'rb') if path.endswith('.gz') else open(path, 'rb')) as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f'cannot read MNIST {what} file {path}: {err}') from None
    ndim = magic & 0xff
    header = np.frombuffer(data[:4 + 4 * ndim], dtype='>u4') if len(data) >= 4 + 4 * ndim else None
    if header is None or header[0] != magic or len(data) != 4 + 4 * ndim + int(np.prod(header[1:])):
        raise ValueError(f'MNIST {what} file {path} is truncated or not in idx format')
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(header[1:].astype(np.int64))

def open_mnist(images_gz: str, max_images: Optional[int], pad: bool = True) -> Source:
    """MNIST-format images (zero-padded from 28x28 to 32x32 unless pad=False, as the reference) and their labels."""
    labels_gz = re.sub(r'-images-idx3-ubyte(\.gz)?$', r'-labels-idx1-ubyte\1', images_gz)
    if not os.path.isfile(labels_gz):
        raise FileNotFoundError(f'MNIST labels {labels_gz} not found next to {images_gz}')
    images = _read_idx(images_gz, 0x803, 'images')
    labels = _read_idx(labels_gz, 0x801, 'labels')
    if pad:
        images = np.pad(images, [(0, 0), (2, 2), (2, 2)], mode='constant', constant_values=0)
    return _array_source(f'MNIST file {images_gz}', images, labels, max_images)

#----------------------------------------------------------------------------
# Guessing the source format.

def _tar_kind(path: str) -> Optional[str]:
    """'cifar10' or 'cifar100' from the archive's name, else from its first member."""
    base = os.path.basename(path)
    if base.startswith('cifar-10-python'):
        return 'cifar10'
    if base.startswith('cifar-100-python'):
        return 'cifar100'
    try:
        with tarfile.open(path, 'r:*') as tar:
            first = tar.next()
    except (tarfile.TarError, OSError, EOFError):
        return None
    top = first.name.split('/')[0] if first is not None else ''
    return {'cifar-10-batches-py': 'cifar10', 'cifar-100-python': 'cifar100'}.get(top)

def open_source(source: str, max_images: Optional[int] = None, edm_order: bool = False) -> Source:
    """Open --source, guessing its format from the path (reference open_dataset)."""
    if max_images is not None and max_images < 0:
        raise ValueError(f'--max-images={max_images} must be >= 0')
    if os.path.isdir(source):
        if source.rstrip('/\\').endswith('_lmdb') or os.path.isfile(os.path.join(source, 'data.mdb')):
            return open_lmdb(source, max_images)
        return open_image_folder(source, max_images, edm_order=edm_order)
    if not os.path.isfile(source):
        raise FileNotFoundError(f'--source {source} does not exist')
    name = os.path.basename(source).lower()
    if name.endswith('-images-idx3-ubyte.gz'):
        return open_mnist(source, max_images)
    if name.endswith('.zip'):
        return open_image_zip(source, max_images)
    if name.endswith(('.tar.gz', '.tgz', '.tar')):
        kind = _tar_kind(source)
        if kind is not None:
            return open_cifar(source, max_images, kind)
    raise ValueError(f'cannot tell the format of --source {source}: expected a folder or .zip of images, '
                     'cifar-10-python.tar.gz, cifar-100-python.tar.gz, *-images-idx3-ubyte.gz (MNIST) '
                     'or a *_lmdb folder (LSUN)')

#----------------------------------------------------------------------------
# Decoding one item (in a worker process).

_handles: dict = {}  # open zip archives and LMDB environments of this process

def get_handle(kind: str, path: str) -> Any:
    """This process's open zip archive ('zip') or LMDB environment ('lmdb') at `path`."""
    key = (os.getpid(), kind, path)
    if key not in _handles:
        if kind == 'zip':
            _handles[key] = zipfile.ZipFile(path, 'r')
        else:
            import lmdb
            _handles[key] = lmdb.open(path, readonly=True, lock=False)
    return _handles[key]

def close_handles() -> None:
    """Close the archives that decoding opened in this process."""
    for key, handle in list(_handles.items()):
        handle.close()
        del _handles[key]

def _decode_lmdb(value: bytes) -> np.ndarray:
    try:  # The reference decodes LSUN with OpenCV when it can; use it too for identical pixels.
        import cv2
        img = cv2.imdecode(np.frombuffer(value, dtype=np.uint8), 1)
        if img is not None:
            return img[:, :, ::-1]  # BGR => RGB
    except ImportError:
        pass
    return np.array(PIL.Image.open(io.BytesIO(value)).convert('RGB'))

def _to_array(img: PIL.Image.Image, rgb: bool) -> np.ndarray:
    """Pixels of a decoded image as HW (grayscale, kept unless `rgb`) or HWC RGB uint8."""
    if rgb:
        return np.array(img.convert('RGB'))
    if img.mode in ('L', 'RGB'):
        return np.array(img)
    return np.array(img.convert('L' if img.mode in ('1', 'LA', 'La', 'I', 'I;16', 'F') else 'RGB'))

def read_pixels(payload: tuple, rgb: bool) -> np.ndarray:
    """Decode one source item into an HW or HWC uint8 array; ValueError names an unreadable file."""
    kind = payload[0]
    if kind == 'array':
        img = payload[1]
        return np.repeat(img[:, :, None], 3, axis=2) if rgb and img.ndim == 2 else img
    if kind == 'lmdb':
        with get_handle('lmdb', payload[1]).begin(write=False) as txn:
            return _decode_lmdb(txn.get(payload[2]))
    if kind == 'zip':
        with get_handle('zip', payload[1]).open(payload[2], 'r') as f:
            img = PIL.Image.open(io.BytesIO(f.read()))
            return _to_array(img, rgb)
    with PIL.Image.open(payload[1]) as img:
        return _to_array(img, rgb)

#----------------------------------------------------------------------------
# Transforms (reference make_transform). Module-level functions, so that
# worker processes can receive them.

_LANCZOS = PIL.Image.Resampling.LANCZOS

def _scale(width: Optional[int], height: Optional[int], img: np.ndarray) -> np.ndarray:
    """Resize to width x height with Lanczos; a missing side keeps its size."""
    h, w = img.shape[:2]
    size = (width if width is not None else w, height if height is not None else h)
    if size == (w, h):
        return img
    return np.array(PIL.Image.fromarray(img).resize(size, _LANCZOS))

def _as_rgb(img: np.ndarray) -> PIL.Image.Image:
    img = np.ascontiguousarray(img if img.ndim == 3 else np.repeat(img[:, :, None], 3, axis=2))
    return PIL.Image.fromarray(img, 'RGB')

def _center_crop(width: int, height: int, img: np.ndarray) -> np.ndarray:
    """Crop the largest centered square, then resize to width x height with Lanczos."""
    h, w = img.shape[:2]
    crop = min(h, w)
    img = img[(h - crop) // 2:(h + crop) // 2, (w - crop) // 2:(w + crop) // 2]
    return np.array(_as_rgb(img).resize((width, height), _LANCZOS))

def _center_crop_wide(width: int, height: int, img: np.ndarray) -> Optional[np.ndarray]:
    """Crop rows to the aspect ratio width:height, resize, center on a black width x width canvas."""
    h, w = img.shape[:2]
    crop_h = int(np.round(width * h / w))
    if w < width or crop_h < height:
        return None  # too small: the reference skips such images
    img = img[(h - crop_h) // 2:(h + crop_h) // 2]
    img = np.array(_as_rgb(img).resize((width, height), _LANCZOS))
    canvas = np.zeros([width, width, 3], dtype=np.uint8)
    canvas[(width - height) // 2:(width + height) // 2, :] = img
    return canvas

def _center_crop_dhariwal(size: int, img: np.ndarray) -> np.ndarray:
    """ADM's ImageNet crop: halve with BOX while the short side >= 2*size, BICUBIC to size, center crop."""
    image = PIL.Image.fromarray(img)
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=PIL.Image.Resampling.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=PIL.Image.Resampling.BICUBIC)
    arr = np.array(image)
    crop_y, crop_x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[crop_y:crop_y + size, crop_x:crop_x + size]

def make_transform(transform: Optional[str], resolution: Optional[tuple[int, int]]) -> Callable:
    """The crop/resize of one image for --transform and --resolution=(W, H); checks the output size."""
    width, height = resolution if resolution is not None else (None, None)
    if transform is not None and transform not in TRANSFORMS:
        raise ValueError(f'--transform={transform} is not one of {", ".join(TRANSFORMS)}')
    if transform is not None and resolution is None:
        raise ValueError(f'--transform={transform} needs --resolution=WxH')
    if transform == 'center-crop-wide' and height > width:
        raise ValueError(f'--transform=center-crop-wide needs height <= width, got --resolution={width}x{height}')
    if transform == 'center-crop-dhariwal' and width != height:
        raise ValueError(f'--transform=center-crop-dhariwal needs a square --resolution, got {width}x{height}')
    if resolution is not None:
        out_w, out_h = (width, width) if transform == 'center-crop-wide' else (width, height)
        check_output_size(out_w, out_h, f'--resolution={width}x{height}' + (f' --transform={transform}' if transform else ''))
    if transform is None:
        return functools.partial(_scale, width, height)
    if transform == 'center-crop':
        return functools.partial(_center_crop, width, height)
    if transform == 'center-crop-wide':
        return functools.partial(_center_crop_wide, width, height)
    return functools.partial(_center_crop_dhariwal, width)

def check_output_size(width: int, height: int, what: str) -> None:
    """Output images must be square with a power-of-two side (reference dataset_tool)."""
    if width != height or width < 1 or width & (width - 1) != 0:
        raise ValueError(f'{what}: output images would be {width}x{height}, but they must be square with a '
                         'power-of-two side; use e.g. --resolution=64x64 (and --transform to crop)')

#----------------------------------------------------------------------------
# Worker: decode, transform, encode PNG.

def encode_png(img: np.ndarray) -> bytes:
    """Uncompressed PNG, as the reference writes (compress_level=0)."""
    buf = io.BytesIO()
    PIL.Image.fromarray(img, 'L' if img.ndim == 2 else 'RGB').save(buf, format='png', compress_level=0, optimize=False)
    return buf.getvalue()

def _process_item(task: tuple, transform: Callable, rgb: bool) -> tuple:
    """(index, (H, W, C) or None when skipped, PNG bytes) for one (index, payload, name) task."""
    idx, payload, name = task
    try:
        img = read_pixels(payload, rgb)
    except (OSError, ValueError, SyntaxError, EOFError, KeyError, PIL.Image.DecompressionBombError) as err:
        raise ValueError(f'cannot read image {name}: {type(err).__name__}: {err}') from None
    img = transform(img)
    if img is None:
        return idx, None, None
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    shape = (img.shape[0], img.shape[1], img.shape[2] if img.ndim == 3 else 1)
    return idx, shape, encode_png(img)

def process_items(source: Source, fn: Callable, workers: int, chunksize: int = 64) -> Iterator[tuple]:
    """Yield fn((index, payload, name)) for every item in order, using `workers` processes."""
    tasks = ((idx, payload, source.names(idx)) for idx, payload in enumerate(source.payloads))
    if workers <= 1 or len(source) < 2 * chunksize:
        yield from map(fn, tasks)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap(fn, tasks, chunksize=chunksize)

def default_workers() -> int:
    """Worker processes to use: the CPU cores available to us, at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 16))

#----------------------------------------------------------------------------
# Output: a folder or an uncompressed zip, complete or not at all.

class DatasetWriter:
    """Writes files into a temporary sibling of `dest`, moved over `dest` by commit()."""

    def __init__(self, dest: str, force: bool = False):
        if dest == '':
            raise ValueError('--dest must not be an empty string')
        self.dest = os.path.abspath(dest)
        self.is_zip = file_ext(dest).lower() == 'zip'
        self.replace_folder = False
        if self.is_zip and os.path.isdir(self.dest):
            raise ValueError(f'--dest {dest} is a folder; give a new .zip file name or a folder without .zip')
        if self.is_zip and os.path.exists(self.dest) and not force:
            raise ValueError(f'--dest {dest} already exists; choose another name, or pass --force to replace it')
        if not self.is_zip and os.path.exists(self.dest):
            if not os.path.isdir(self.dest):
                raise ValueError(f'--dest {dest} is an existing file; give a folder or a .zip name')
            if os.listdir(self.dest):
                if not (force and os.path.isfile(os.path.join(self.dest, 'dataset.json'))):
                    hint = 'pass --force to replace a dataset folder (one with a dataset.json)' if not force else \
                           '--force replaces only dataset folders (ones with a dataset.json)'
                    raise ValueError(f'--dest folder {dest} is not empty; choose a new folder or empty it, or {hint}')
                self.replace_folder = True
        self._tmp: Optional[str] = None

    def open(self) -> None:
        """Create the temporary output next to `dest` (checks ran in the constructor)."""
        parent = os.path.dirname(self.dest)
        prefix = f'.{os.path.basename(self.dest)}.'
        with dnnlib.util.writing(self.dest):
            os.makedirs(parent, exist_ok=True)
            _remove_stale_temps(parent, prefix)
            if self.is_zip:
                fd, self._tmp = tempfile.mkstemp(dir=parent, prefix=prefix, suffix='.tmp')
                os.close(fd)
                self._zip = zipfile.ZipFile(self._tmp, mode='w', compression=zipfile.ZIP_STORED)
            else:
                self._tmp = tempfile.mkdtemp(dir=parent, prefix=prefix, suffix='.tmp')

    def write(self, fname: str, data: bytes | str) -> None:
        """Add one file, `fname` relative to the dataset root."""
        data = data.encode('utf8') if isinstance(data, str) else data
        with dnnlib.util.writing(self.dest):
            if self.is_zip:
                self._zip.writestr(fname, data)
                return
            path = os.path.join(self._tmp, fname)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'wb') as f:
                f.write(data)

    def commit(self) -> None:
        """Move the finished dataset to `dest`."""
        with dnnlib.util.writing(self.dest):
            if self.is_zip:
                self._zip.close()
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self._tmp, (0o666 if self.is_zip else 0o777) & ~umask)  # mkstemp/mkdtemp made it private
            if self.replace_folder:  # --force: the old dataset moves aside, then goes
                old = tempfile.mkdtemp(dir=os.path.dirname(self.dest), prefix=f'.{os.path.basename(self.dest)}.', suffix='.tmp')
                os.replace(self.dest, os.path.join(old, 'old'))
                os.replace(self._tmp, self.dest)
                shutil.rmtree(old, ignore_errors=True)
                return
            if not self.is_zip and os.path.isdir(self.dest):
                os.rmdir(self.dest)  # checked empty above; rename cannot replace it on every OS
            os.replace(self._tmp, self.dest)

    def abort(self) -> None:
        """Delete everything written so far, first of all (closing a zip on a full disk fails); `dest` stays as it was."""
        if self._tmp is None:
            return
        if self.is_zip:
            for step in (os.remove, lambda _: self._zip.close(), os.remove):  # the second remove: where open files cannot go
                with contextlib.suppress(OSError, ValueError):
                    step(self._tmp)
        else:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> 'DatasetWriter':
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.commit() if exc_type is None else self.abort()

def _remove_stale_temps(parent: str, prefix: str) -> None:
    """Delete temporary outputs (files or folders) of earlier runs for the same --dest that a kill interrupted."""
    for name in os.listdir(parent):
        if name.startswith(prefix) and name.endswith('.tmp') and len(name) == len(prefix) + 12:  # mkstemp: 8 + '.tmp'
            path = os.path.join(parent, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)

def labels_json(labels: list) -> str:
    """dataset.json contents: labels null unless every written item has one (reference)."""
    return json.dumps({'labels': labels if all(x is not None for x in labels) else None})

#----------------------------------------------------------------------------
# The conversion.

def _check_shape(shape: tuple, first: Optional[tuple], fname: str, name: str) -> tuple:
    """Error unless `shape` is a valid first shape or equals the first one."""
    if first is None:
        check_output_size(shape[1], shape[0], f'first image {name}')
        return shape
    if shape[:2] == first[:2] and shape != first:
        raise ValueError(f'image {name} ({fname}) has {shape[2]} channels but earlier images have {first[2]}; '
                         'store all images as RGB or all as grayscale (`dataset_tool.py convert` makes every image RGB)')
    if shape != first:
        raise ValueError(f'image {name} ({fname}) is {shape[1]}x{shape[0]}x{shape[2]} but earlier images are '
                         f'{first[1]}x{first[0]}x{first[2]}; use --resolution=WxH (and --transform) to give all one size')
    return first

def convert_dataset(
    source:         str,                            # Folder, zip or archive of input images.
    dest:           str,                            # Output folder or .zip.
    max_images:     Optional[int] = None,           # Read at most this many input images. None = all.
    transform:      Optional[str] = None,           # One of TRANSFORMS. None = plain resize.
    resolution:     Optional[tuple[int, int]] = None, # Output (width, height). None = keep the input size.
    rgb:            bool = True,                    # True = always RGB (EDM2 convert); False = keep grayscale (EDM).
    workers:        Optional[int] = None,           # Processes that decode and encode. None = one per core.
    progress:       bool = True,                    # Show a tqdm progress bar?
    ddpm_dataset:   Optional[str] = None,           # Prepare as tqch/ddpm-torch (training/dataset_ddpm.py). None = no.
    force:          bool = False,                   # Replace an existing --dest zip or dataset folder?
) -> int:
    """Convert a dataset to PNGs + dataset.json (reference dataset_tool); returns the number written."""
    from tqdm import tqdm
    if ddpm_dataset is not None:
        from training import dataset_ddpm
        src, transform_fn, rgb = dataset_ddpm.prepare(ddpm_dataset, source, max_images, transform, resolution)
        writer = DatasetWriter(dest, force=force)
    else:
        transform_fn = make_transform(transform, resolution)
        writer = DatasetWriter(dest, force=force)
        src = open_source(source, max_images, edm_order=not rgb)
    if len(src) == 0:
        raise ValueError(f'--source {source} holds no images' + (' (--max-images=0)' if max_images == 0 else '') +
                         '; nothing to write')
    fn = functools.partial(_process_item, transform=transform_fn, rgb=rgb)
    labels, first = [], None
    with contextlib.ExitStack() as stack:
        stack.callback(close_handles)
        stack.enter_context(writer)
        results = stack.enter_context(contextlib.closing(process_items(src, fn, workers or default_workers())))
        for idx, shape, png in tqdm(results, total=len(src), disable=not progress, unit='img'):
            if shape is None:
                continue
            fname = archive_fname(idx)  # skipped images leave a gap in the names, as in the reference
            first = _check_shape(shape, first, fname, src.names(idx))
            writer.write(fname, png)
            labels.append([fname, src.labels[idx]] if src.labels is not None else None)
        if not labels:
            raise ValueError(f'none of the {len(src)} images of --source {source} was written: --transform={transform} '
                             'skipped every one (too small?); choose another --transform or --resolution')
        writer.write('dataset.json', labels_json(labels))
    return len(labels)

#----------------------------------------------------------------------------
