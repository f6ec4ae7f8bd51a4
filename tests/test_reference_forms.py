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


def test_edm2_infinite_sampler_order():
    # EDM2: epoch e is a permutation by RandomState(hash((seed, e)) % 2**31); rank r starts at start_idx + r.
    from torch_utils import misc
    perms = [np.random.RandomState(hash((7, epoch)) % (1 << 31)).permutation(10).tolist() for epoch in (0, 1)]
    assert perms == [[9, 8, 2, 1, 4, 6, 0, 5, 3, 7], [6, 4, 8, 9, 0, 5, 7, 2, 3, 1]]  # literal: pins hash + RandomState
    for rank, expected in [(0, [0, 3, 6, 8, 0, 7, 3, 9]), (1, [5, 7, 4, 9, 5, 2, 1, 2])]:
        items = iter(misc.EDM2InfiniteSampler(range(10), rank=rank, num_replicas=2, seed=7, start_idx=6))
        assert [next(items) for _ in range(8)] == expected


def test_edm2_recipe_draws_data_in_edm2_order_and_seeds_like_edm2():
    import dnnlib
    from torch_utils import misc
    from training import training_loop as tl
    from training.presets import build_config
    from training.recipes import make_recipe

    class Indices(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, idx):
            return np.array([idx]), np.zeros([0], dtype=np.float32)

    for preset, order in [('tiny-edm2', 'edm2'), ('tiny-edm', 'ours')]:
        cfg = build_config(preset, seed=7)
        ctx = dnnlib.EasyDict(cfg=cfg, recipe=make_recipe(cfg), dataset=Indices(), rank=0, world=1, cur_nimg=6,
                              batch_gpu=4, device=torch.device('cpu'))
        tl._make_iterators(ctx)
        drawn = next(ctx.data_iter)[0].flatten().tolist()
        edm2 = [next(it) for it in [iter(misc.EDM2InfiniteSampler(range(10), seed=7, start_idx=6))] for _ in range(4)]
        assert (drawn == edm2) == (order == 'edm2'), (preset, drawn, edm2)
    # EDM2's per-step seed: set_random_seed(seed, rank, cur_nimg) seeds torch and numpy with hash(args) % 2**31.
    make_recipe(build_config('tiny-edm2', seed=7)).seed_rng(0, 2048)
    a, b = torch.rand(3), np.random.rand(3)
    torch.manual_seed(hash((7, 0, 2048)) % (1 << 31))
    np.random.seed(hash((7, 0, 2048)) % (1 << 31))
    assert torch.equal(a, torch.rand(3)) and np.array_equal(b, np.random.rand(3))


def test_stf_reference_batch_is_augmented_after_the_network_call():
    # STF fork (EDMLoss with stf): sigma, augment(batch), noise, D(x), then augment(reference images).
    from training.loss import STFLoss
    calls = []

    def augment_pipe(images):
        calls.append(('augment', images.shape[0]))
        return images + 5, torch.zeros([images.shape[0], 9])

    def net(x, sigma, labels=None, augment_labels=None):
        calls.append(('net', x.shape[0]))
        return torch.zeros_like(x)

    sigma = 1e4  # posterior weights are uniform: the target is the mean of the reference batch
    loss_fn = STFLoss(base='edm', rbatch=3, P_mean=float(np.log(sigma)), P_std=0.0)
    images, refs = torch.zeros([1, 1, 2, 2]), torch.zeros([2, 1, 2, 2])
    loss = loss_fn(net=net, images=images, augment_pipe=augment_pipe, ref_images=refs)
    assert calls == [('augment', 1), ('net', 1), ('augment', 2)]
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    assert torch.allclose(loss, torch.full_like(loss, weight * 5.0 ** 2), rtol=1e-5)  # every reference at 5, not 0
