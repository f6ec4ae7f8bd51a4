"""dataset_tool.py convert: real CIFAR-10 data, MNIST files, image folders, every transform, bad input."""

import gzip
import io
import json
import os
import pickle
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

from dataset_tool import cmdline
from training.dataset import ImageFolderDataset
from training.dataset_convert import convert_dataset
from tests.conftest import cifar_batch

#----------------------------------------------------------------------------
# Helpers.

def run_tool(*args):
    """Run dataset_tool.py in-process; returns the click Result."""
    return CliRunner().invoke(cmdline, [str(a) for a in args], catch_exceptions=False)

def read_dataset(dest):
    """{name: bytes} of every file in an output folder or zip."""
    if str(dest).endswith('.zip'):
        with zipfile.ZipFile(dest) as z:
            return {name: z.read(name) for name in z.namelist()}
    return {os.path.relpath(os.path.join(root, f), dest).replace(os.sep, '/'): open(os.path.join(root, f), 'rb').read()
            for root, _dirs, files in os.walk(dest) for f in files}

def png_pixels(data):
    img = PIL.Image.open(io.BytesIO(data))
    assert img.format == 'PNG'
    return np.array(img)

def save_image(path, array, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(array).save(path, format=fmt)

def assert_clean_failure(result, tmp_path, dest, *phrases):
    """One 'Error:' line, exit code != 0, and nothing left at --dest or as a temporary next to it."""
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip() and 'img/s]' not in line]  # minus tqdm
    assert len(lines) == 1 and lines[0].startswith('Error: '), result.output
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert not os.path.exists(dest) or os.listdir(dest) == []
    leftovers = [f for f in os.listdir(os.path.dirname(dest)) if f.endswith('.tmp')]
    assert leftovers == []

#----------------------------------------------------------------------------
# CIFAR-10 archives in the official layout, built from real images (quickstart/cifar10-mini.zip).

def make_cifar_archive(path, batches, skip=()):
    """cifar-10-python.tar.gz with the given {member name: batch dict} (official pickle format)."""
    with tarfile.open(path, 'w:gz', compresslevel=1) as tar:
        for name, batch in batches.items():
            if name in skip:
                continue
            data = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

_small_cifar_cache = {}

@pytest.fixture
def small_cifar(tmp_path_factory):
    """A 200-image CIFAR-10 archive: 40 real images in each of the 5 training batches (built once)."""
    if 'archive' not in _small_cifar_cache:
        _small_cifar_cache['archive'] = build_small_cifar(tmp_path_factory.mktemp('cifar'))
    return _small_cifar_cache['archive']

def build_small_cifar(folder):
    batches = {f'data_batch_{i}': cifar_batch(40 * (i - 1), 40, f'training batch {i} of 5') for i in range(1, 6)}
    path = folder / 'cifar-10-python.tar.gz'
    make_cifar_archive(path, batches)
    images = np.concatenate([b['data'] for b in batches.values()]).reshape(-1, 3, 32, 32)
    labels = sum([b['labels'] for b in batches.values()], [])
    return path, batches, images, labels

@pytest.mark.parametrize('dest_name', ['out', 'out.zip'])
def test_cifar10_convert(small_cifar, tmp_path, dest_name):
    path, _batches, images, labels = small_cifar
    dest = tmp_path / dest_name
    result = run_tool('convert', '--source', path, '--dest', dest, '--workers', 2)  # 200 items: uses the process pool
    assert result.exit_code == 0, result.output
    files = read_dataset(dest)
    names = [f'00000/img{i:08d}.png' for i in range(200)]
    assert sorted(files) == sorted(names + ['dataset.json'])
    assert json.loads(files['dataset.json']) == {'labels': [[n, l] for n, l in zip(names, labels)]}
    for i in (0, 39, 40, 123, 199):
        np.testing.assert_array_equal(png_pixels(files[names[i]]), images[i].transpose(1, 2, 0))

    # Round trip through the training dataset class.
    ds = ImageFolderDataset(str(dest), use_labels=True)
    assert len(ds) == 200 and ds.image_shape == [3, 32, 32] and ds.label_dim == 10 and ds.name == 'out'
    image, label = ds[123]
    np.testing.assert_array_equal(image, images[123])
    assert label.argmax() == labels[123] and label.sum() == 1

def test_cifar10_real_batch(tmp_path):
    """A 1,000-image real data_batch_1 inside an archive, first 500 converted (EDM command line)."""
    batches = {f'data_batch_{i}': cifar_batch(0, 1000) if i == 1 else
               {'batch_label': 'x', 'labels': [0], 'data': np.zeros([1, 3072], np.uint8)} for i in range(1, 6)}
    path = tmp_path / 'cifar-10-python.tar.gz'
    make_cifar_archive(path, batches)
    result = run_tool('--source', path, '--dest', tmp_path / 'c10.zip', '--max-images', 500)
    assert result.exit_code == 0, result.output
    files = read_dataset(tmp_path / 'c10.zip')
    assert len(files) == 501
    real = batches['data_batch_1']
    assert [l for _n, l in json.loads(files['dataset.json'])['labels']] == real['labels'][:500]
    pixels = np.stack([png_pixels(files[f'00000/img{i:08d}.png']) for i in range(500)])
    np.testing.assert_array_equal(pixels, real['data'][:500].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))

def test_cifar10_missing_batch(small_cifar, tmp_path):
    _path, batches, _images, _labels = small_cifar
    path = tmp_path / 'cifar-10-python.tar.gz'
    make_cifar_archive(path, batches, skip=['data_batch_3'])
    dest = tmp_path / 'out'
    assert_clean_failure(run_tool('convert', '--source', path, '--dest', dest), tmp_path, dest, 'data_batch_3')

#----------------------------------------------------------------------------
# MNIST.

def write_idx(path, array, magic):
    header = np.array([magic, *array.shape], dtype='>u4').tobytes()
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())

def test_mnist(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=[30, 28, 28], dtype=np.uint8)
    labels = rng.integers(0, 10, size=[30])
    write_idx(tmp_path / 'train-images-idx3-ubyte.gz', images, 0x803)
    write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', labels, 0x801)
    padded = np.pad(images, [(0, 0), (2, 2), (2, 2)])

    # EDM form: grayscale PNGs, as the EDM reference writes MNIST.
    assert run_tool('--source', tmp_path / 'train-images-idx3-ubyte.gz', '--dest', tmp_path / 'gray').exit_code == 0
    files = read_dataset(tmp_path / 'gray')
    assert len(files) == 31 and PIL.Image.open(io.BytesIO(files['00000/img00000007.png'])).mode == 'L'
    np.testing.assert_array_equal(png_pixels(files['00000/img00000007.png']), padded[7])
    assert [l for _n, l in json.loads(files['dataset.json'])['labels']] == labels.tolist()
    ds = ImageFolderDataset(str(tmp_path / 'gray'))
    assert ds.num_channels == 1 and ds.resolution == 32

    # convert (EDM2): RGB.
    assert run_tool('convert', '--source', tmp_path / 'train-images-idx3-ubyte.gz', '--dest', tmp_path / 'rgb.zip',
                    '--max-images', 5).exit_code == 0
    files = read_dataset(tmp_path / 'rgb.zip')
    assert len(files) == 6
    np.testing.assert_array_equal(png_pixels(files['00000/img00000004.png']), np.repeat(padded[4][:, :, None], 3, axis=2))

    # Fewer labels than images.
    write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', labels[:29], 0x801)
    dest = tmp_path / 'bad'
    assert_clean_failure(run_tool('--source', tmp_path / 'train-images-idx3-ubyte.gz', '--dest', dest),
                         tmp_path, dest, '30 images but 29 labels')

#----------------------------------------------------------------------------
# LSUN: an LMDB database of encoded images (the optional lmdb package).

def test_lsun_lmdb(tmp_path):
    folder = tmp_path / 'cat_lmdb'
    dest = tmp_path / 'out'
    try:
        import lmdb
    except ImportError:  # without the package: one clear line naming it
        os.makedirs(folder)
        assert_clean_failure(run_tool('convert', '--source', folder, '--dest', dest), tmp_path, dest, 'pip install lmdb')
        return
    arrays = np.random.default_rng(7).integers(0, 256, size=[3, 12, 10, 3], dtype=np.uint8)
    with lmdb.open(str(folder), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for i, array in enumerate(arrays):
            buf = io.BytesIO()
            PIL.Image.fromarray(array).save(buf, format='png')
            txn.put(f'key{i}'.encode(), buf.getvalue())
    assert run_tool('convert', '--source', folder, '--dest', dest, '--transform', 'center-crop', '--resolution', '8x8').exit_code == 0
    files = read_dataset(dest)
    assert json.loads(files['dataset.json']) == {'labels': None}
    expected = lanczos(PIL.Image.fromarray(arrays[2]).crop((0, 1, 10, 11)), (8, 8))
    np.testing.assert_array_equal(png_pixels(files['00000/img00000002.png']), np.array(expected))

#----------------------------------------------------------------------------
# Image folders and zips: labels, ordering, transforms.

def test_folder_labels_and_zip_source(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / 'src'
    arrays = {}
    for name in ['cat/b.png', 'cat/a.jpg', 'dog/x/c.png', 'dog-2/d.png', 'top.png']:
        arrays[name] = rng.integers(0, 256, size=[8, 8, 3], dtype=np.uint8)
        save_image(src / name, arrays[name], fmt='PNG')  # PNG content even for .jpg: lossless check
    (src / 'notes.txt').write_text('not an image')

    assert run_tool('convert', '--source', src, '--dest', tmp_path / 'out').exit_code == 0
    files = read_dataset(tmp_path / 'out')
    order = ['cat/a.jpg', 'cat/b.png', 'dog-2/d.png', 'dog/x/c.png', 'top.png']  # string order (EDM2)
    classes = {'': 0, 'cat': 1, 'dog': 2, 'dog-2': 3}  # top-level folder names, sorted
    expected = [[f'00000/img{i:08d}.png', classes[n.split('/')[0] if '/' in n else '']] for i, n in enumerate(order)]
    assert json.loads(files['dataset.json'])['labels'] == expected
    for i, name in enumerate(order):
        np.testing.assert_array_equal(png_pixels(files[f'00000/img{i:08d}.png']), arrays[name])

    # The EDM form sorts paths part by part, as pathlib does: 'dog' comes before 'dog-2'.
    assert run_tool('--source', src, '--dest', tmp_path / 'edm').exit_code == 0
    edm = read_dataset(tmp_path / 'edm')
    np.testing.assert_array_equal(png_pixels(edm['00000/img00000002.png']), arrays['dog/x/c.png'])

    # A zip source takes its labels from its dataset.json; the output zip converts back identically.
    assert run_tool('convert', '--source', tmp_path / 'out', '--dest', tmp_path / 'out.zip').exit_code == 0
    assert run_tool('convert', '--source', tmp_path / 'out.zip', '--dest', tmp_path / 'again').exit_code == 0
    assert read_dataset(tmp_path / 'again') == files

def lanczos(img, size):
    return img.resize(size, PIL.Image.Resampling.LANCZOS)

def test_transforms(tmp_path):
    rng = np.random.default_rng(3)
    shapes = {'a.png': (37, 50), 'b.png': (20, 20), 'c.png': (61, 40), 'd.png': (100, 70), 'e.png': (16, 16)}  # (H, W)
    arrays = {n: rng.integers(0, 256, size=[h, w, 3], dtype=np.uint8) for n, (h, w) in shapes.items()}
    src = tmp_path / 'src'
    for name, array in arrays.items():
        save_image(src / name, array)
    pil = {n: PIL.Image.fromarray(a) for n, a in arrays.items()}

    def convert(transform, resolution):
        dest = tmp_path / f'{transform}-{resolution[0]}'
        convert_dataset(str(src), str(dest), transform=transform, resolution=resolution, workers=1, progress=False)
        files = read_dataset(dest)
        assert json.loads(files.pop('dataset.json')) == {'labels': None}
        return {k: png_pixels(v) for k, v in files.items()}

    # Plain resize.
    out = convert(None, (16, 16))
    for i, name in enumerate(sorted(shapes)):
        np.testing.assert_array_equal(out[f'00000/img{i:08d}.png'], np.array(lanczos(pil[name], (16, 16))))

    # center-crop: the largest centered square, then Lanczos.
    out = convert('center-crop', (16, 16))
    for i, name in enumerate(sorted(shapes)):
        w, h = pil[name].size
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        np.testing.assert_array_equal(out[f'00000/img{i:08d}.png'], np.array(lanczos(pil[name].crop(box), (16, 16))))

    # center-crop-wide to 32x16 on a 32x32 black canvas; b and e are narrower than 32: skipped, names keep the gap.
    out = convert('center-crop-wide', (32, 16))
    assert sorted(out) == ['00000/img00000000.png', '00000/img00000002.png', '00000/img00000003.png']
    for i, name in [(0, 'a.png'), (2, 'c.png'), (3, 'd.png')]:
        w, h = pil[name].size
        ch = int(np.round(32 * h / w))
        strip = lanczos(pil[name].crop((0, (h - ch) // 2, w, (h - ch) // 2 + ch)), (32, 16))
        canvas = PIL.Image.new('RGB', (32, 32))
        canvas.paste(strip, (0, 8))
        np.testing.assert_array_equal(out[f'00000/img{i:08d}.png'], np.array(canvas))

    # center-crop-dhariwal (ADM): BOX halvings while the short side >= 32, BICUBIC to short side 16, center crop.
    out = convert('center-crop-dhariwal', (16, 16))
    expected_sizes = {'a.png': (22, 16), 'b.png': (16, 16), 'c.png': (16, 24), 'd.png': (16, 24), 'e.png': (16, 16)}
    for i, name in enumerate(sorted(shapes)):
        img = pil[name]
        while min(img.size) >= 32:
            img = img.resize((img.width // 2, img.height // 2), PIL.Image.Resampling.BOX)
        img = img.resize(expected_sizes[name], PIL.Image.Resampling.BICUBIC)
        left, top = (img.width - 16) // 2, (img.height - 16) // 2
        np.testing.assert_array_equal(out[f'00000/img{i:08d}.png'], np.array(img.crop((left, top, left + 16, top + 16))))

def test_dhariwal_halves(tmp_path):
    """A large image takes three BOX halvings (ADM's loop) before the BICUBIC resize."""
    array = np.random.default_rng(4).integers(0, 256, size=[128, 96, 3], dtype=np.uint8)
    save_image(tmp_path / 'src' / 'a.png', array)
    convert_dataset(str(tmp_path / 'src'), str(tmp_path / 'out'), transform='center-crop-dhariwal',
                    resolution=(8, 8), workers=1, progress=False)
    staged = PIL.Image.fromarray(array)
    for size in [(48, 64), (24, 32), (12, 16)]:
        staged = staged.resize(size, PIL.Image.Resampling.BOX)
    expected = staged.resize((8, 11), PIL.Image.Resampling.BICUBIC).crop((0, 1, 8, 9))
    np.testing.assert_array_equal(png_pixels(read_dataset(tmp_path / 'out')['00000/img00000000.png']), np.array(expected))

def test_grayscale_and_palette_images(tmp_path):
    rng = np.random.default_rng(5)
    gray = rng.integers(0, 256, size=[8, 8], dtype=np.uint8)
    save_image(tmp_path / 'src' / 'g.png', gray)
    rgb = rng.integers(0, 256, size=[8, 8, 3], dtype=np.uint8)
    PIL.Image.fromarray(rgb).convert('P').save(tmp_path / 'src' / 'p.png')
    palette_rgb = np.array(PIL.Image.open(tmp_path / 'src' / 'p.png').convert('RGB'))
    # EDM keeps grayscale; a palette image next to it is then an error (mixed channels).
    dest = tmp_path / 'edm'
    assert_clean_failure(run_tool('--source', tmp_path / 'src', '--dest', dest), tmp_path, dest, 'p.png')
    # EDM2 converts everything to RGB.
    assert run_tool('convert', '--source', tmp_path / 'src', '--dest', tmp_path / 'rgb').exit_code == 0
    files = read_dataset(tmp_path / 'rgb')
    np.testing.assert_array_equal(png_pixels(files['00000/img00000000.png']), np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(png_pixels(files['00000/img00000001.png']), palette_rgb)

#----------------------------------------------------------------------------
# Bad input: one clear line, exit code != 0, nothing at --dest.

@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(6)
    for name in ['a/0.png', 'a/1.png', 'b/2.png']:
        save_image(tmp_path / 'src' / name, rng.integers(0, 256, size=[8, 8, 3], dtype=np.uint8))
    return tmp_path / 'src'

def test_bad_images(image_folder, tmp_path):
    dest = tmp_path / 'out.zip'
    (image_folder / 'b' / '3.png').write_bytes(b'this is not a png')
    assert_clean_failure(run_tool('convert', '--source', image_folder, '--dest', dest), tmp_path, dest, '3.png')
    good = (image_folder / 'a' / '0.png').read_bytes()
    (image_folder / 'b' / '3.png').write_bytes(good[:len(good) // 2])  # truncated
    assert_clean_failure(run_tool('convert', '--source', image_folder, '--dest', dest), tmp_path, dest, '3.png')
    save_image(image_folder / 'b' / '3.png', np.zeros([16, 16, 3], np.uint8))  # another size
    assert_clean_failure(run_tool('convert', '--source', image_folder, '--dest', dest), tmp_path, dest, '3.png', '--resolution')
    assert run_tool('convert', '--source', image_folder, '--dest', dest, '--resolution', '8x8').exit_code == 0

def test_bad_output_size(image_folder, tmp_path):
    dest = tmp_path / 'out'
    assert_clean_failure(run_tool('convert', '--source', image_folder, '--dest', dest, '--resolution', '16x8'),
                         tmp_path, dest, 'square')
    assert_clean_failure(run_tool('convert', '--source', image_folder, '--dest', dest, '--resolution', '24x24'),
                         tmp_path, dest, 'power-of-two')
    assert_clean_failure(run_tool('convert', '--source', image_folder, '--dest', dest, '--transform', 'center-crop'),
                         tmp_path, dest, '--resolution')
    for name in ['a/0.png', 'a/1.png', 'b/2.png']:
        save_image(image_folder / name, np.zeros([8, 16, 3], np.uint8))
    assert_clean_failure(run_tool('convert', '--source', image_folder, '--dest', dest), tmp_path, dest, '16x8')

def test_bad_source_and_dest(image_folder, tmp_path):
    dest = tmp_path / 'out'
    (tmp_path / 'data.txt').write_text('hello')
    assert_clean_failure(run_tool('convert', '--source', tmp_path / 'data.txt', '--dest', dest), tmp_path, dest, 'format')
    assert_clean_failure(run_tool('convert', '--source', tmp_path / 'missing', '--dest', dest), tmp_path, dest, 'missing')
    os.makedirs(dest)
    (dest / 'keep.txt').write_text('precious')
    result = run_tool('convert', '--source', image_folder, '--dest', dest)
    assert result.exit_code != 0 and 'not empty' in result.output
    assert os.listdir(dest) == ['keep.txt']

def test_bad_labels(image_folder, tmp_path):
    dest = tmp_path / 'out'
    (image_folder / 'dataset.json').write_text('{"labels": [["a/0.png", 1], ')
    assert_clean_failure(run_tool('convert', '--source', image_folder, '--dest', dest), tmp_path, dest, 'dataset.json')
    (image_folder / 'dataset.json').write_text(json.dumps({'labels': [['a/0.png', 1], ['b/2.png', 0]]}))
    assert_clean_failure(run_tool('convert', '--source', image_folder, '--dest', dest), tmp_path, dest,
                         'dataset.json', '2 of the 3', 'a/1.png')
    (image_folder / 'dataset.json').write_text(json.dumps({'labels': [['a/0.png', 1], ['b/2.png', 0], ['a/1.png', 5]]}))
    assert run_tool('convert', '--source', image_folder, '--dest', dest).exit_code == 0
    assert [l for _n, l in json.loads(read_dataset(dest)['dataset.json'])['labels']] == [1, 5, 0]

#----------------------------------------------------------------------------
