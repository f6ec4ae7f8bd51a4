"""dataset_tool.py convert --ddpm-dataset: MNIST, CIFAR-10, CelebA and CelebA-HQ prepared as
tqch/ddpm-torch prepares them, on tiny synthetic inputs in the download formats."""

import gzip
import json

import numpy as np
import PIL.Image
import pytest

from training import dataset_ddpm
from tests.test_dataset_tool import assert_clean_failure, png_pixels, read_dataset, run_tool

BILINEAR = PIL.Image.Resampling.BILINEAR

def write_idx(path, array, magic, compress=True):
    header = np.array([magic, *array.shape], dtype='>u4').tobytes()
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, 'wb') as f:
            f.write(data)
    else:
        path.write_bytes(data)

def images_in_order(dest):
    files = read_dataset(dest)
    names = sorted(name for name in files if name.endswith('.png'))
    return [png_pixels(files[name]) for name in names], json.loads(files['dataset.json'])['labels']

#----------------------------------------------------------------------------
# MNIST: bilinear 28 -> 32 (torchvision Resize of a PIL 'L' image), grayscale, not zero-padded.

@pytest.mark.parametrize('compress', [True, False])
def test_mnist_is_resized_bilinearly_to_32_and_stays_grayscale(tmp_path, compress):
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    suffix = '.gz' if compress else ''
    write_idx(tmp_path / f'train-images-idx3-ubyte{suffix}', digits, 0x803, compress)
    write_idx(tmp_path / f'train-labels-idx1-ubyte{suffix}', np.array([7, 0, 3]), 0x801, compress)
    dest = tmp_path / 'mnist.zip'
    result = run_tool('convert', '--source', tmp_path / f'train-images-idx3-ubyte{suffix}', '--dest', dest,
                      '--ddpm-dataset', 'mnist', '--workers', 1)
    assert result.exit_code == 0, result.output
    images, labels = images_in_order(dest)
    assert [label for _name, label in labels] == [7, 0, 3]
    for digit, image in zip(digits, images):
        assert image.shape == (32, 32) # one channel even under `convert` (EDM2: RGB)
        np.testing.assert_array_equal(image, np.array(PIL.Image.fromarray(digit, 'L').resize((32, 32), BILINEAR)))
    assert min(int(image[0].max()) for image in images) > 0 # a padded border would be black

#----------------------------------------------------------------------------
# CelebA: list_eval_partition.txt order, crop (top 40, left 15, 148x148), bilinear to 64x64.

def make_celeba(root, names, images):
    folder = root / 'celeba'
    (folder / 'img_align_celeba').mkdir(parents=True)
    lines = [f'{name} {i % 3}' for i, name in enumerate(names)]
    (folder / 'list_eval_partition.txt').write_text('\n'.join(lines) + '\n')
    for name, image in zip(names, images):
        PIL.Image.fromarray(image).save(folder / 'img_align_celeba' / name, format='png') # lossless under a .jpg name
    return folder

def test_celeba_crop_box_and_order(tmp_path):
    rng = np.random.default_rng(1)
    boxed = rng.integers(0, 256, size=(218, 178, 3), dtype=np.uint8)
    boxed[40:188, 15:163] = (200, 30, 90) # one colour exactly inside the reference's crop box
    textured = rng.integers(0, 256, size=(218, 178, 3), dtype=np.uint8)
    names = ['000002.jpg', '000001.jpg'] # the partition file's order wins over the names' order
    make_celeba(tmp_path, names, [boxed, textured])
    dest = tmp_path / 'out'
    result = run_tool('convert', '--source', tmp_path, '--dest', dest, '--ddpm-dataset', 'celeba', '--workers', 1)
    assert result.exit_code == 0, result.output
    images, labels = images_in_order(dest)
    assert labels is None and [image.shape for image in images] == [(64, 64, 3)] * 2
    assert (images[0] == np.array([200, 30, 90], dtype=np.uint8)).all() # a crop one pixel off would bleed in noise
    expected = np.array(PIL.Image.fromarray(textured[40:188, 15:163]).resize((64, 64), BILINEAR))
    np.testing.assert_array_equal(images[1], expected)

def test_celeba_resolution_override_keeps_crop_and_filter(tmp_path):
    image = np.random.default_rng(2).integers(0, 256, size=(218, 178, 3), dtype=np.uint8)
    folder = make_celeba(tmp_path, ['000001.jpg'], [image])
    dest = tmp_path / 'out.zip'
    result = run_tool('convert', '--source', folder / 'img_align_celeba', '--dest', dest, '--ddpm-dataset', 'celeba',
                      '--resolution', '32x32', '--max-images', 1, '--workers', 1)
    assert result.exit_code == 0, result.output
    (out,), _ = images_in_order(dest)
    np.testing.assert_array_equal(out, np.array(PIL.Image.fromarray(image[40:188, 15:163]).resize((32, 32), BILINEAR)))

def test_celeba_bad_input_is_one_line(tmp_path):
    folder = make_celeba(tmp_path, ['000001.jpg'], [np.zeros((100, 100, 3), dtype=np.uint8)])
    dest = tmp_path / 'out'
    assert_clean_failure(run_tool('convert', '--source', folder, '--dest', dest, '--ddpm-dataset', 'celeba', '--workers', 1),
                         tmp_path, dest, 'does not hold the CelebA crop box')
    (folder / 'list_eval_partition.txt').unlink()
    assert_clean_failure(run_tool('convert', '--source', folder, '--dest', dest, '--ddpm-dataset', 'celeba'),
                         tmp_path, dest, 'list_eval_partition.txt', 'not found')
    assert_clean_failure(run_tool('convert', '--source', folder, '--dest', dest, '--ddpm-dataset', 'celeba',
                                  '--transform', 'center-crop', '--resolution', '64x64'),
                         tmp_path, dest, '--transform=center-crop cannot be combined with --ddpm-dataset=celeba')

#----------------------------------------------------------------------------
# CelebA-HQ: N.png sorted by N, then numpy RandomState(123).shuffle (ProGAN's order), pixels as stored.

def test_celebahq_uses_the_progan_order(tmp_path):
    folder = tmp_path / 'celeba_hq' / 'img_celeba_hq'
    folder.mkdir(parents=True)
    num = 12
    for index in range(num):
        PIL.Image.fromarray(np.full((16, 16, 3), 10 * index, dtype=np.uint8)).save(folder / f'{index}.png')
    (folder / 'readme.txt').write_text('not an image')
    PIL.Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(folder / '99.PNG') # the reference lists '.png' only
    dest = tmp_path / 'hq.zip'
    result = run_tool('convert', '--source', tmp_path, '--dest', dest, '--ddpm-dataset', 'celebahq', '--workers', 1)
    assert result.exit_code == 0, result.output
    images, labels = images_in_order(dest)
    expected = [f'{i}.png' for i in range(num)] # numeric order: 2.png before 10.png
    np.random.RandomState(123).shuffle(expected) # the reference shuffles its list of names in place
    assert labels is None and len(images) == num
    assert [int(image[0, 0, 0]) // 10 for image in images] == [int(name[:-4]) for name in expected]

def test_celebahq_order_helper_and_bad_names():
    assert dataset_ddpm.celebahq_order(['1.png', '0.png']) in (['0.png', '1.png'], ['1.png', '0.png'])
    with pytest.raises(ValueError, match='expects PNGs named by their index'):
        dataset_ddpm.celebahq_order(['0.png', 'face.png'])

#----------------------------------------------------------------------------
# CIFAR-10 is the plain conversion; wrong sources are refused.

def test_cifar10_needs_the_cifar10_archive(tmp_path):
    folder = tmp_path / 'imgs'
    folder.mkdir()
    PIL.Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(folder / 'a.png')
    dest = tmp_path / 'out'
    assert_clean_failure(run_tool('convert', '--source', folder, '--dest', dest, '--ddpm-dataset', 'cifar10'),
                         tmp_path, dest, '--ddpm-dataset=cifar10 needs --source=cifar-10-python.tar.gz')
    assert_clean_failure(run_tool('convert', '--source', folder / 'a.png', '--dest', dest, '--ddpm-dataset', 'mnist'),
                         tmp_path, dest, '--ddpm-dataset=mnist needs --source=.../train-images-idx3-ubyte[.gz]')
