"""The DDPM codebase's 2-D toy datasets (training/toy_data.py) against the reference facts in
tests/fixtures/ddpm/toy_data.txt (tqch/ddpm-torch, size 10000, random_state 1234)."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from training import toy_data

FIXTURE = Path(__file__).parent / 'fixtures' / 'ddpm' / 'toy_data.txt'

def parse_summary() -> dict:
    """{dataset: {'stdev': text, 'mean': [..], ..., 'samples': [[x, y] as float32] x 6}} from the summary part."""
    sections, current = {}, None
    for line in FIXTURE.read_text().splitlines():
        if line.startswith('#') or not line.strip():
            continue
        head = re.match(r'^\[(\w+)\] stdev attribute = (.*)$', line)
        if head:
            current = sections.setdefault(head.group(1), {'stdev': head.group(2), 'samples': []})
            continue
        if current is None or not line.startswith('  '):
            continue
        key, *values = line.split()
        if key == 'sample':
            current['samples'].append([np.float32(v) for v in values])
        else:
            current[key] = [float(v) for v in values]
    return sections

SUMMARY = parse_summary()

def test_fixture_has_the_three_datasets():
    assert sorted(SUMMARY) == sorted(toy_data.TOY_DATASETS)
    assert all(len(s['samples']) == 6 for s in SUMMARY.values())

@pytest.mark.parametrize('name', toy_data.TOY_DATASETS)
def test_first_samples_are_bit_identical_to_the_reference(name):
    data = toy_data.make_toy_dataset(name, 10000, seed=1234)
    assert data.dtype == np.float32 and data.shape == (10000, 2)
    np.testing.assert_array_equal(data[:6], np.array(SUMMARY[name]['samples'], dtype=np.float32))

@pytest.mark.parametrize('name', toy_data.TOY_DATASETS)
def test_normalising_stdev_matches_the_reference(name):
    expected = [float(v) for v in re.findall(r'[-\d.e]+', SUMMARY[name]['stdev'])]
    np.testing.assert_array_equal(np.ravel(toy_data.toy_stdev(name)), expected) # printed with repr: exact

@pytest.mark.parametrize('name', toy_data.TOY_DATASETS)
def test_summary_statistics_match_the_reference(name):
    data = toy_data.make_toy_dataset(name, 10000, seed=1234).astype(np.float64)
    facts = SUMMARY[name]
    # The fixture prints 6 significant digits; float32 sums over 1e4 points agree to ~1e-7 relative.
    for key, value in (('mean', data.mean(0)), ('std', data.std(0)), ('min', data.min(0)), ('max', data.max(0)),
                       ('corr', [np.corrcoef(data.T)[0, 1]])):
        np.testing.assert_allclose(value, facts[key], rtol=5e-6, atol=5e-9, err_msg=key)
    if name != 'swissroll':
        modes = (toy_data.gaussian8_modes() if name == 'gaussian8' else toy_data.gaussian25_modes()) / toy_data.toy_stdev(name)
        nearest = np.linalg.norm(data[:, None] - modes[None], axis=2).argmin(1)
        fractions = np.bincount(nearest, minlength=len(modes)) / len(data)
        np.testing.assert_array_equal(fractions, facts['mode_fraction'])
        within = np.sqrt(np.mean(np.sum((data - modes[nearest]) ** 2, axis=1)) / 2)
        np.testing.assert_allclose(within, facts['within_mode_std'], rtol=5e-6)

def test_gaussian25_cycles_through_the_modes_in_grid_order():
    data = toy_data.make_toy_dataset('gaussian25', 50, seed=0, noise=0.0)
    expected = toy_data.gaussian25_modes() / toy_data.toy_stdev('gaussian25', 0.0)
    np.testing.assert_allclose(data[:25], expected, rtol=1e-6)
    np.testing.assert_array_equal(data[25:], data[:25])
    assert tuple(toy_data.gaussian25_modes()[1]) == (-4, -2) # i outer, j inner

def test_draws_do_not_touch_numpy_global_rng():
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    first = [toy_data.make_toy_dataset(name, 100, seed=7) for name in toy_data.TOY_DATASETS]
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    np.random.seed(99)
    for name, data in zip(toy_data.TOY_DATASETS, first):
        np.testing.assert_array_equal(toy_data.make_toy_dataset(name, 100, seed=7), data)
    assert not np.array_equal(toy_data.make_toy_dataset('gaussian8', 100, seed=8), first[0])

def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match='--dataset=moons is not a toy dataset; choose from gaussian8, gaussian25, swissroll'):
        toy_data.make_toy_dataset('moons', 10)
    with pytest.raises(ValueError, match='--size=0 must be a positive integer'):
        toy_data.make_toy_dataset('gaussian8', 0)
    with pytest.raises(ValueError, match='--batch-size=0'):
        toy_data.ToyDataStream('gaussian8', batch_size=0, num_batches=3)

def test_stream_serves_one_draw_in_order():
    stream = toy_data.ToyDataStream('swissroll', batch_size=8, num_batches=5, seed=3)
    batches = list(stream)
    assert len(stream) == 5 and all(b.shape == (8, 2) and b.dtype == torch.float32 for b in batches)
    np.testing.assert_array_equal(torch.cat(batches).numpy(), toy_data.make_toy_dataset('swissroll', 40, seed=3))
    assert all(torch.equal(a, b) for a, b in zip(list(stream), batches)) # no resampling: every epoch the same

def test_stream_resample_draws_new_points_reproducibly():
    stream = toy_data.ToyDataStream('gaussian8', batch_size=4, num_batches=2, seed=3, resample=True)
    epochs = [torch.cat(list(stream)) for _ in range(3)]
    np.testing.assert_array_equal(epochs[0].numpy(), toy_data.make_toy_dataset('gaussian8', 8, seed=3))
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    resumed = toy_data.ToyDataStream('gaussian8', batch_size=4, num_batches=2, seed=3, resample=True)
    resumed.set_epoch(2)
    assert torch.equal(torch.cat(list(resumed)), epochs[2])

def test_seed_none_draws_fresh_points_like_the_reference_streamer():
    first, second = (toy_data.make_toy_dataset('gaussian25', 50, seed=None) for _ in range(2))
    assert first.shape == (50, 2) and not np.array_equal(first, second)
    stream = toy_data.ToyDataStream('gaussian8', batch_size=5, num_batches=2, seed=None, resample=True)
    assert not torch.equal(torch.cat(list(stream)), torch.cat(list(stream)))
