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
