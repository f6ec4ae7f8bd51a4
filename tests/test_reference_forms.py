"""Reference behaviours that no other test pins: the ablation sampler's VP noise range, EDM's
tick-counted intervals, EDM2's data order and seeding (each test fails without its fix)."""

import numpy as np
import pytest
import torch

from training import sampling


class _RecordingDenoiser:
    """D(x; sigma) = 0 that records the noise levels it is asked for."""
    sigma_min, sigma_max = 0, float('inf')

    def __init__(self):
        self.sigmas = []

    def __call__(self, x, sigma, labels=None):
        self.sigmas.append(float(torch.as_tensor(sigma).reshape(-1)[0]))
        return torch.zeros_like(x)


def test_ablation_vp_discretization_spans_the_vp_sde_of_vpprecond():
    # EDM Table 1: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), beta_d = 19.9, beta_min = 0.1, t in [1e-3, 1].
    expected_max, expected_min = np.sqrt(np.expm1(0.5 * 19.9 + 0.1)), np.sqrt(np.expm1(0.5 * 19.9e-6 + 0.1e-3))
    assert sampling.default_sigma_range('vp') == (pytest.approx(expected_min, rel=1e-12), pytest.approx(expected_max, rel=1e-12))
    assert expected_max == pytest.approx(152.167, abs=1e-3)
    net = _RecordingDenoiser()
    sampling.ablation_sampler(net, torch.zeros([1, 1, 2, 2]), num_steps=4, solver='euler', discretization='vp',
                              schedule='vp', scaling='vp')
    assert net.sigmas[0] == pytest.approx(expected_max, rel=1e-9)
    assert net.sigmas[-1] == pytest.approx(expected_min, rel=1e-9)
    # VPPrecond's own sigma_max uses the same constants, so the default no longer undercuts it.
    from training.preconditioning import VPPrecond
    vp = VPPrecond(img_resolution=4, img_channels=1, model_type='SongUNet', model_channels=16, channel_mult=[1],
                   num_blocks=1, attn_resolutions=[])
    assert vp.sigma_max == pytest.approx(expected_max, rel=1e-6)


def _dry_run_config(*args):
    import json
    from click.testing import CliRunner
    import train
    result = CliRunner().invoke(train.main, ['-n', *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output.split('Training config:', 1)[1].rsplit('Dry run', 1)[0])


def test_edm_tick_alone_scales_snapshot_and_state_intervals():
    # EDM's ImageNet row: --tick=200 with the default --snap=50 --dump=500 ticks = 10M / 100M images.
    cfg = _dry_run_config('--preset=edm-cifar10-32x32-cond-vp', '--tick=200')
    assert (cfg['status_nimg'], cfg['snapshot_nimg'], cfg['checkpoint_nimg']) == (200_000, 10_000_000, 100_000_000)
    cfg = _dry_run_config('--preset=edm-cifar10-32x32-cond-vp', '--tick=200', '--snap=10', '--checkpoint=1M')
    assert (cfg['status_nimg'], cfg['snapshot_nimg'], cfg['checkpoint_nimg']) == (200_000, 2_000_000, 1_000_000)
    cfg = _dry_run_config('--preset=edm-cifar10-32x32-cond-vp', '--dump=4')
    assert (cfg['status_nimg'], cfg['snapshot_nimg'], cfg['checkpoint_nimg']) == (50_000, 2_500_000, 200_000)
