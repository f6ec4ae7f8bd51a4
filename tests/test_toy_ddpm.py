"""DDPM on 2-D toy data (training/toy_ddpm.py, toy_example.py ddpm): the reference Decoder layout, training
learns a two-mode distribution, and the command line trains, samples and plots."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import toy_example
from training import toy_ddpm

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py

# ddpm-torch toy_model.py Decoder(2, 128, 3): state_dict keys in order (temp_fc.* share one layer).
LAYER_KEYS = ['norm1.weight', 'norm1.bias', 'fc1.weight', 'norm2.weight', 'norm2.bias', 'fc2.weight', 'enc.weight', 'enc.bias']
DECODER_KEYS = (['in_fc.weight'] + [f'temp_fc.{i}.{k}' for i in range(3) for k in LAYER_KEYS]
                + ['out_norm.weight', 'out_norm.bias', 'out_fc.weight', 'out_fc.bias', 't_proj.0.weight', 't_proj.0.bias'])


def test_decoder_layout_matches_the_reference():
    model = toy_ddpm.Decoder(2, 128, 3)
    assert list(model.state_dict()) == DECODER_KEYS
    assert sum(p.numel() for p in model.parameters()) == 67074                       # unique parameters
    assert sum(v.numel() for v in model.state_dict().values()) == 166658            # state_dict entries
    assert model.temp_fc[0] is model.temp_fc[2]


def two_points(batches=20, batch=200, seed=0):
    """Data on the two points (+-1, 0) with a little noise, as a list of batches (one epoch)."""
    rng = np.random.RandomState(seed)
    x = np.stack([rng.choice([-1.0, 1.0], batches * batch), np.zeros(batches * batch)], 1) + rng.randn(batches * batch, 2) * 0.05
    return [torch.tensor(x[i * batch:(i + 1) * batch], dtype=torch.float32) for i in range(batches)]


@pytest.mark.parametrize('var_type,loss_type', [('fixed-large', 'mse'), ('learned', 'mse')])
def test_toy_ddpm_learns_two_modes(var_type, loss_type):
    diffusion = toy_ddpm.toy_diffusion(timesteps=50, beta_start=1e-3, beta_end=0.2, model_var_type=var_type,
                                       loss_type=loss_type)
    res = toy_ddpm.train_toy_ddpm(two_points(), diffusion, epochs=8, lr=3e-3, mid_features=32, num_layers=2, seed=0)
    assert res.losses[-1] < res.losses[0]
    samples = toy_ddpm.sample_toy_ddpm(res.model, diffusion, 2000, seed=1).numpy()
    near = np.minimum(np.abs(samples[:, 0] - 1), np.abs(samples[:, 0] + 1))
    assert np.median(near) < 0.2 and abs(np.mean(samples[:, 0] > 0) - 0.5) < 0.1
    assert toy_ddpm.histogram_kl(samples, np.concatenate([b.numpy() for b in two_points(seed=1)]), bins=20) < 1.0


def test_histogram_kl_is_zero_for_equal_sets_and_large_for_disjoint_ones():
    a = np.random.RandomState(0).randn(5000, 2) * 0.3
    assert toy_ddpm.histogram_kl(a, a) == pytest.approx(0.0, abs=1e-9)
    assert toy_ddpm.histogram_kl(a + 2.0, a) > 5


def test_cli_trains_samples_and_plots(tmp_path):
    result = CliRunner().invoke(toy_example.cmdline, [
        'ddpm', '--dataset=gaussian8', '--size=400', '--batch-size=100', '--epochs=2', '--timesteps=20',
        '--mid-features=16', '--num-temporal-layers=1', '--samples=200', f'--save={tmp_path / "toy.png"}', '--device=cpu'])
    assert result.exit_code == 0, result.output
    assert 'Histogram KL' in result.output and (tmp_path / 'toy.png').stat().st_size > 1000


def test_cli_size_must_be_a_multiple_of_the_batch():
    result = CliRunner().invoke(toy_example.cmdline, ['ddpm', '--size=450', '--batch-size=100', '--device=cpu'])
    assert result.exit_code != 0 and '--size=450 is not a multiple of --batch-size=100' in result.output
