"""EDM2 Table 1 configs B-G through the training loop, and the pixel-space CIFAR presets (issue 10)."""

import glob
import os

import numpy as np
import pytest
import torch

from tests.test_train import cifar, train  # noqa: F401  (fixture)
from torch_utils import persistence
from training import networks_edm2
from training.presets import PRESETS, build_config

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


@pytest.mark.parametrize('config', list('BCDEFG'))
def test_each_config_trains_a_few_steps(tmp_path, cifar, config):  # noqa: F811
    train(tmp_path, preset='tiny-edm2', data=cifar['c8'], edm2_config=config, total_nimg=96, status_nimg=32,
          snapshot_nimg=96, checkpoint_nimg=96)
    snapshots = sorted(glob.glob(os.path.join(tmp_path, 'network-snapshot-*.pkl')))
    assert snapshots
    net = persistence.load_pickle(snapshots[-1])['ema']
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert net.unet.config == config if config != 'G' else True
    with torch.no_grad():
        out = net.float()(torch.randn(2, 3, 8, 8), torch.full([2], 1.0))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize('config', list('EFG'))
def test_forced_weight_normalisation_keeps_weight_norms_fixed(config):
    torch.manual_seed(0)
    net = networks_edm2.Precond(img_resolution=8, img_channels=3, label_dim=0, model_channels=16, channel_mult=[1, 2],
                                num_blocks=1, attn_resolutions=[], config=config).train()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(3):
        loss = net(torch.randn(4, 3, 8, 8), torch.ones(4)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net(torch.randn(1, 3, 8, 8), torch.ones(1), return_logvar=True)  # a training-mode forward renormalises the weights
    for module in net.modules():
        if isinstance(module, networks_edm2.MPConv) and module.weight.ndim > 1 and getattr(module, 'forced', True):
            w = module.weight.detach().flatten(1)
            rms = w.square().mean(dim=1).sqrt()
            assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4), type(module)


def test_cifar_presets_match_the_public_configs():
    for data in ('cifar10', 'cifar100'):
        for c in 'CEG':
            cfg = build_config(f'edm2-{data}-32x32-uncond-{c.lower()}')
            assert (cfg.edm2_config, cfg.cond, cfg.resolution, cfg.model_channels) == (c, False, 32, 128)
            assert cfg.lr_decay_batches == (0 if c == 'C' else 39062)
    with torch.device('meta'):
        net = networks_edm2.Precond(img_resolution=32, img_channels=3, label_dim=0, model_channels=128,
                                    channel_mult=[1, 2, 2, 2], num_blocks=2, attn_resolutions=[16], config='E')
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(37.6e6, rel=0.01)
    assert 'quickstart' in PRESETS


def test_bad_config_is_one_clear_error():
    with pytest.raises(ValueError, match='--edm2-config=Z must be one of'):
        build_config('tiny-edm2', edm2_config='Z')
    with pytest.raises(ValueError, match='needs --arch=edm2'):
        build_config('tiny-edm', edm2_config='C')
