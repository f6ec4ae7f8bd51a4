"""training.dataset: the reference ImageFolderDataset semantics on folders and zips of PNG and NPY files."""

import io
import json
import os
import pickle
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from training.dataset import ImageFolderDataset

#----------------------------------------------------------------------------

def make_png_dataset(root, images, labels=None, as_zip=False):
    """dataset_tool layout: 00000/img00000000.png ... and dataset.json."""
    files = {}
    for i, img in enumerate(images):
        path = f'{i // 1000:05d}/img{i:08d}.png'
        buf = io.BytesIO()
        PIL.Image.fromarray(img).save(buf, format='png', compress_level=0)
        files[path] = buf.getvalue()
    names = sorted(files)
    meta = {'labels': None if labels is None else [[n, l] for n, l in zip(names, labels)]}
    files['dataset.json'] = json.dumps(meta).encode()
    if as_zip:
        path = str(root) + '.zip'
        with zipfile.ZipFile(path, 'w') as z:
            for name, data in files.items():
                z.writestr(name, data)
        return path
    for name, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, name)) or root, exist_ok=True)
        with open(os.path.join(root, name), 'wb') as f:
            f.write(data)
    return str(root)

@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, size=[12, 8, 8, 3], dtype=np.uint8)

@pytest.mark.parametrize('as_zip', [False, True])
def test_images_and_labels(tmp_path, images, as_zip):
    labels = [3, 0, 1, 2, 4, 1, 0, 0, 2, 3, 1, 2]
    path = make_png_dataset(tmp_path / 'ds', images, labels, as_zip=as_zip)
    ds = ImageFolderDataset(path, use_labels=True)
    assert (len(ds), ds.name, ds.image_shape, ds.num_channels, ds.resolution) == (12, 'ds', [3, 8, 8], 3, 8)
    assert ds.label_shape == [5] and ds.label_dim == 5 and ds.has_labels and ds.has_onehot_labels
    for i in range(12):
        image, label = ds[i]
        assert image.dtype == np.uint8
        np.testing.assert_array_equal(image, images[i].transpose(2, 0, 1))
        np.testing.assert_array_equal(label, np.eye(5, dtype=np.float32)[labels[i]])
    no_labels = ImageFolderDataset(path, use_labels=False)
    assert no_labels.label_shape == [0] and not no_labels.has_labels and no_labels[0][1].shape == (0,)

    # Pickles (DataLoader workers) without the open zip handle, and keep working.
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[5][0], images[5].transpose(2, 0, 1))
    batch_images, batch_labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch_images.shape == (4, 3, 8, 8) and batch_labels.shape == (4, 5)

@pytest.mark.skipif('fork' not in torch.multiprocessing.get_all_start_methods(), reason='fork start method is POSIX-only')
def test_zip_reads_in_forked_workers(tmp_path):
    # The parent has the zip open (the constructor reads image 0); forked workers must not share
    # its file offset, or concurrent reads mix bytes (Bad CRC-32 / wrong pixels).
    images = np.random.default_rng(1).integers(0, 256, size=[240, 16, 16, 3], dtype=np.uint8)
    ds = ImageFolderDataset(make_png_dataset(tmp_path / 'ds', images, as_zip=True), use_labels=False)
    ds[7]
    loader = torch.utils.data.DataLoader(ds, batch_size=6, num_workers=2, multiprocessing_context='fork')
    got = torch.cat([batch for batch, _labels in loader]).numpy()
    np.testing.assert_array_equal(got, images.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(ds[239][0], images[239].transpose(2, 0, 1)) # the parent's handle still reads

def test_max_size_and_xflip(tmp_path, images):
    path = make_png_dataset(tmp_path / 'ds', images)
    ds = ImageFolderDataset(path, max_size=5, xflip=True, random_seed=7)
    perm = np.arange(12)
    np.random.RandomState(7).shuffle(perm)
    subset = np.sort(perm[:5])
    assert len(ds) == 10
    for i in range(10):
        details = ds.get_details(i)
        assert details.raw_idx == subset[i % 5] and details.xflip == (i >= 5)
        expected = images[subset[i % 5]].transpose(2, 0, 1)
        np.testing.assert_array_equal(ds[i][0], expected[:, :, ::-1] if i >= 5 else expected)
    assert [ImageFolderDataset(path, max_size=5, random_seed=7).get_details(i).raw_idx for i in range(5)] == subset.tolist()
    assert len(ImageFolderDataset(path, max_size=100)) == 12

def test_cache(tmp_path, images):
    path = make_png_dataset(tmp_path / 'ds', images)
    cached, uncached = ImageFolderDataset(path, cache=True), ImageFolderDataset(path, cache=False)
    first = cached[3][0]
    uncached[3]
    os.remove(os.path.join(path, '00000', 'img00000003.png'))
    np.testing.assert_array_equal(cached[3][0], first)  # served from memory
    with pytest.raises(ValueError, match='img00000003'):
        uncached[3]

def test_npy_latents_and_float_labels(tmp_path):
    latents = np.random.default_rng(1).standard_normal([3, 8, 4, 4]).astype(np.float32)
    os.makedirs(tmp_path / 'lat' / '00000')
    names = [f'00000/img-mean-std-{i:08d}.npy' for i in range(3)]
    for name, latent in zip(names, latents):
        np.save(tmp_path / 'lat' / name, latent)
    vectors = [[0.5, 1.0], [0.0, 2.0], [1.5, -1.0]]
    (tmp_path / 'lat' / 'dataset.json').write_text(json.dumps({'labels': [[n, v] for n, v in zip(names, vectors)]}))
    ds = ImageFolderDataset(str(tmp_path / 'lat'))
    assert ds.image_shape == [8, 4, 4] and ds.label_shape == [2] and not ds.has_onehot_labels
    image, label = ds[2]
    assert image.dtype == np.float32 and label.dtype == np.float32
    np.testing.assert_array_equal(image, latents[2])
    np.testing.assert_array_equal(label, vectors[2])

def test_bad_datasets(tmp_path, images):
    with pytest.raises(FileNotFoundError, match='not found'):
        ImageFolderDataset(str(tmp_path / 'nothing'))
    os.makedirs(tmp_path / 'empty')
    with pytest.raises(FileNotFoundError, match='no image'):
        ImageFolderDataset(str(tmp_path / 'empty'))
    path = make_png_dataset(tmp_path / 'ds', images)
    with pytest.raises(ValueError, match='resolution 16'):
        ImageFolderDataset(path, resolution=16)
    assert ImageFolderDataset(path, resolution=8).resolution == 8
    PIL.Image.fromarray(np.zeros([16, 16, 3], np.uint8)).save(os.path.join(path, '00000', 'img00000005.png'))
    with pytest.raises(ValueError, match='img00000005.png'):
        ImageFolderDataset(path)[5]
    (tmp_path / 'ds' / 'dataset.json').write_text(json.dumps({'labels': [['00000/img00000000.png', 1]]}))
    with pytest.raises(ValueError, match='no label for 11 of the 12'):
        ImageFolderDataset(path, use_labels=True).label_shape

#----------------------------------------------------------------------------
