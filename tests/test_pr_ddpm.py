"""Precision/recall settings of the DDPM codebase (tqch/ddpm-torch eval.py): --nhood-size, float16
distances that reproduce its numbers exactly, and the row/column blocks of its distance matrices."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import fid
from tests.test_detector_vgg16 import NARROW, narrow_vgg16_archive
from training import detectors, metrics

FIXTURE = Path(__file__).parent / 'fixtures' / 'ddpm' / 'precision_recall.pt'

@pytest.fixture(scope='module')
def reference():
    return torch.load(FIXTURE, weights_only=True)

def as_count(fraction: float, num: int = 500) -> int:
    """The reference stores exact fractions of 500 as float32; compare whole counts."""
    count = round(fraction * num)
    assert abs(fraction * num - count) < 1e-3
    return count

#----------------------------------------------------------------------------
# The library.

@pytest.mark.parametrize('k', [3, 5])
def test_float16_reproduces_ddpm_torch_exactly(reference, k):
    expected = reference['results'][f'k{k}']
    precision, recall = metrics.precision_recall(reference['real'].float(), reference['fake'].float(), k=k, dtype='float16')
    assert (as_count(precision), as_count(recall)) == (as_count(expected['precision']), as_count(expected['recall']))

def test_float32_default_differs_from_float16_on_the_reference_sets(reference):
    # The spec: computing in float32 changes the result by a few points per 500. The default stays float32.
    real, fake = reference['real'].float(), reference['fake'].float()
    default = metrics.precision_recall(real, fake, k=3)
    assert default == metrics.precision_recall(real, fake, k=3, dtype='float32')
    expected = reference['results']['k3']
    diffs = [abs(as_count(ours) - as_count(theirs)) for ours, theirs in zip(default, (expected['precision'], expected['recall']))]
    assert max(diffs) > 0 and max(diffs) <= 10

@pytest.mark.parametrize('dtype', ['float32', 'float16'])
def test_row_and_column_blocks_do_not_change_results(reference, dtype):
    real, fake = reference['real'][:200].float(), reference['fake'][:150].float()
    whole = metrics.precision_recall(real, fake, k=3, dtype=dtype)
    assert metrics.precision_recall(real, fake, k=3, dtype=dtype, row_batch_size=37, col_batch_size=64) == whole
    assert metrics.precision_recall(real, fake, k=3, dtype=dtype, row_batch_size=150, col_batch_size=29) == whole

def test_float16_radii_are_kth_distances_in_half_precision(reference):
    feats = reference['real'][:100]
    radii = metrics.knn_radii(feats, k=4, row_batch_size=30, col_batch_size=40)
    assert radii.dtype == torch.float16
    dists = torch.cdist(feats.double(), feats.double())
    expected = dists.sort(dim=1).values[:, 4] # column 0 is the point itself
    torch.testing.assert_close(radii.double(), expected, rtol=2e-3, atol=0) # float16 keeps ~3 digits

def test_nhood_size_grows_both_metrics(reference):
    real, fake = reference['real'].float(), reference['fake'].float()
    small, large = metrics.precision_recall(real, fake, k=1), metrics.precision_recall(real, fake, k=8)
    assert large[0] > small[0] and large[1] > small[1] # larger balls contain more points

def test_pr_config_rejects_bad_values():
    with pytest.raises(ValueError, match='--pr-dtype=bfloat16 is not one of float32, float16'):
        metrics.PRConfig(dtype='bfloat16')
    with pytest.raises(ValueError, match='--nhood-size=0 must be a positive integer'):
        metrics.PRConfig(nhood_size=0)
    with pytest.raises(ValueError, match='--row-batch-size=0'):
        metrics.PRConfig(row_batch_size=0)
    with pytest.raises(ValueError, match='--nhood-size=5 needs more than 5 features per set'):
        metrics.precision_recall(torch.zeros(5, 2), torch.zeros(9, 2), k=5)

#----------------------------------------------------------------------------
# fid.py calc with a stand-in detector (the pixels of 4x4 images as 48-d features).

class PixelDetector(detectors.Detector):
    def __init__(self):
        super().__init__(name='pixels', feature_dim=48)

    def __call__(self, images):
        return images.float().flatten(1) / 255

@pytest.fixture
def pixel_detector(monkeypatch):
    monkeypatch.setattr(metrics, 'build_detectors', lambda m, **kwargs: {'inception': PixelDetector()})

def write_images(folder: Path, num: int, seed: int, scale: float) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(num):
        pixels = np.clip(128 + scale * rng.standard_normal((4, 4, 3)), 0, 255).astype(np.uint8)
        PIL.Image.fromarray(pixels).save(folder / f'{i:03d}.png')
    return folder

def run_fid(*args):
    return CliRunner().invoke(fid.main, [str(a) for a in args])

def test_cli_nhood_size_and_dtype_reach_the_metric(tmp_path, pixel_detector):
    real = write_images(tmp_path / 'real', 40, seed=0, scale=40)
    fake = write_images(tmp_path / 'fake', 40, seed=1, scale=60)
    ref = tmp_path / 'ref.pkl'
    assert run_fid('ref', '--data', real, '--dest', ref, '--metrics', 'pr', '--workers', 0).exit_code == 0
    stats = metrics.load_stats(str(ref))
    real_feats = torch.from_numpy(stats['pr']['features']).float()
    results = {}
    for k, dtype in ((3, None), (1, None), (5, 'float16')):
        log = tmp_path / f'k{k}.jsonl'
        extra = ['--nhood-size', k] + (['--pr-dtype', dtype] if dtype else [])
        result = run_fid('calc', '--images', fake, '--ref', ref, '--num', 40, '--workers', 0, '--row-batch-size', 16,
                         '--col-batch-size', 8, '--metrics-file', log, *extra)
        assert result.exit_code == 0, result.output
        records = {r['metric']: r for r in map(json.loads, log.read_text().splitlines())}
        assert records['precision']['nhood_size'] == k and records['precision']['pr_dtype'] == (dtype or 'float32')
        results[k] = (records['precision']['value'], records['recall']['value'])
    fake_feats = torch.stack([torch.from_numpy(np.array(PIL.Image.open(p)).transpose(2, 0, 1).copy()).flatten().float() / 255
                              for p in sorted(fake.iterdir())]).half().float()
    for k, dtype in ((3, 'float32'), (1, 'float32'), (5, 'float16')):
        assert results[k] == metrics.precision_recall(real_feats, fake_feats, k=k, dtype=dtype)
    assert results[1] != results[5]

def test_cli_pr_options_without_pr_are_one_line_errors(tmp_path, pixel_detector):
    images = write_images(tmp_path / 'images', 4, seed=0, scale=40)
    ref = tmp_path / 'ref.pkl'
    assert run_fid('ref', '--data', images, '--dest', ref, '--metrics', 'fid,pr', '--workers', 0).exit_code == 0
    cases = [
        (['--metrics', 'fid', '--nhood-size', 2], 'add pr to --metrics'),
        (['--pr-dtype', 'float16', '--metrics', 'fid'], 'precision/recall options'),
        (['--nhood-size', 4], '--nhood-size=4 needs more than 4 features per set, but --num gives 4'),
        (['--nhood-size', 0], "Invalid value for '--nhood-size'"),
        (['--pr-dtype', 'float64'], "Invalid value for '--pr-dtype'"),
    ]
    for extra, match in cases:
        result = run_fid('calc', '--images', images, '--ref', ref, '--num', 4, '--workers', 0, *extra)
        errors = [line for line in result.output.splitlines() if 'Error' in line]
        assert result.exit_code != 0 and len(errors) == 1 and match in errors[0], result.output
        assert 'Traceback' not in result.output

#----------------------------------------------------------------------------
# --pr-detector=vgg16 with a random-weight VGG-16 of tiny widths in vgg16.pt's layout (tests/test_detector_vgg16.py).

@pytest.fixture
def tiny_vgg(tmp_path):
    path = tmp_path / 'vgg16.pt'
    narrow_vgg16_archive(path)
    return path

def test_cli_vgg16_pr_detector(tmp_path, tiny_vgg):
    real = write_images(tmp_path / 'real', 24, seed=2, scale=40)
    fake = write_images(tmp_path / 'fake', 24, seed=3, scale=60)
    ref = tmp_path / 'ref.pkl'
    result = run_fid('ref', '--data', real, '--dest', ref, '--metrics', 'pr', '--pr-detector', 'vgg16', '--vgg16', tiny_vgg, '--workers', 0)
    assert result.exit_code == 0, result.output
    real_feats = torch.from_numpy(metrics.load_stats(str(ref))['pr']['features']).float()
    assert real_feats.shape == (24, NARROW['fc_features'])
    log = tmp_path / 'm.jsonl'
    result = run_fid('calc', '--images', fake, '--ref', ref, '--num', 24, '--workers', 0, '--pr-detector', 'vgg16',
                     '--vgg16', tiny_vgg, '--pr-dtype', 'float16', '--metrics-file', log)
    assert result.exit_code == 0, result.output
    records = {r['metric']: r for r in map(json.loads, log.read_text().splitlines())}
    assert records['precision']['pr_detector'] == 'vgg16'
    detector = detectors.VGG16Detector(path=str(tiny_vgg))
    images = torch.stack([torch.from_numpy(np.array(PIL.Image.open(p)).transpose(2, 0, 1).copy()) for p in sorted(fake.iterdir())])
    fake_feats = detector(images).half().float()
    expected = metrics.precision_recall(real_feats, fake_feats, k=3, dtype='float16')
    assert (records['precision']['value'], records['recall']['value']) == expected

def test_vgg16_lookup_and_errors(tmp_path, tiny_vgg, monkeypatch):
    monkeypatch.setenv(detectors.VGG16_ENV, str(tiny_vgg))
    assert detectors.find_vgg16() == str(tiny_vgg)
    monkeypatch.delenv(detectors.VGG16_ENV)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'dnnlib'))
    with pytest.raises(Exception, match='no VGG-16 detector available'):
        detectors.find_vgg16(allow_download=False)
    hub = tmp_path / 'torch_home' / 'hub'
    hub.mkdir(parents=True)
    (hub / 'vgg16.pt').write_bytes(tiny_vgg.read_bytes()) # where ddpm-torch keeps it
    assert detectors.find_vgg16(allow_download=False) == str(hub / 'vgg16.pt')
    with pytest.raises(FileNotFoundError, match='--vgg16=.*no such file'):
        detectors.find_vgg16(str(tmp_path / 'missing.pt'))

def test_cli_vgg16_without_pr_is_one_line_error(tmp_path, tiny_vgg):
    images = write_images(tmp_path / 'images', 4, seed=0, scale=40)
    result = run_fid('ref', '--data', images, '--dest', tmp_path / 'r.pkl', '--metrics', 'fd_dinov2',
                     '--pr-detector', 'vgg16', '--vgg16', tiny_vgg)
    errors = [line for line in result.output.splitlines() if 'Error' in line]
    assert result.exit_code != 0 and len(errors) == 1 and '--pr-detector=vgg16 was given' in errors[0], result.output

def test_cli_bad_vgg16_file_is_one_line_error(tmp_path):
    images = write_images(tmp_path / 'images', 4, seed=0, scale=40)
    bad = tmp_path / 'vgg16.pt'
    bad.write_bytes(b'<html>proxy login page</html>')
    result = run_fid('ref', '--data', images, '--dest', tmp_path / 'r.pkl', '--metrics', 'pr', '--pr-detector', 'vgg16',
                     '--vgg16', bad, '--workers', 0)
    errors = [line for line in result.output.splitlines() if 'Error' in line]
    assert result.exit_code != 0 and len(errors) == 1 and 'cannot load the VGG-16 detector' in errors[0], result.output
    assert 'Traceback' not in result.output and not (tmp_path / 'r.pkl').exists()
