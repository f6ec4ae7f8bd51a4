"""The CIFAR EDM2 reimplementation's configs and schedule (training/recipe_cifar_edm2.py) against the facts of
FutureXiang/edm2 (config YAMLs, train.py, ema-pytorch, EDM.edm_sample)."""

import numpy as np
import pytest
import torch

from training import recipe_cifar_edm2 as rc
from training.loss import CifarEDM2Loss, random_flip
from training import sampling

# configs.md: (n_epoch, batch_size, lrate, warm_epoch, tref_epoch, flip, linear.timestep) per YAML.
YAML = {
    'cifar10-c':        (1000, 512, 4e-4,   200, None, True,  4),
    'cifar10-e':        (2000, 512, 2e-2,   200, 400,  True,  4),
    'cifar100-c':       (1000, 512, 4e-4,   200, None, True,  4),
    'cifar100-e':       (2000, 512, 2e-2,   200, 400,  True,  4),
    'tinyimagenet-c':   (2000, 192, 1.5e-4, 200, None, False, 5),
    'tinyimagenet-e':   (2000, 192, 7.5e-3, 200, 400,  False, 5),
}


def test_configs_match_the_yaml_files():
    for name, (n_epoch, batch, lrate, warm, tref, flip, t) in YAML.items():
        for cfg in (rc.reference_config(name), rc.reference_config(name[:-1] + 'g')) if name.endswith('e') else (rc.reference_config(name),):
            assert (cfg.n_epoch, cfg.batch_size, cfg.lrate, cfg.warm_epoch, cfg.tref_epoch, cfg.flip, cfg.probe_t) == \
                (n_epoch, batch, lrate, warm, tref, flip, t), cfg
            assert (cfg.ema, cfg.P_mean, cfg.P_std, cfg.sigma_data, cfg.probe_block) == (0.9993, -1.2, 1.2, 0.5, 'out_6')
    assert len(rc.REFERENCE_CONFIGS) == 9 and rc.reference_config('cifar100/G').config == 'G'
    assert rc.reference_config('tinyimagenet-e').network_kwargs()['n_blocks'] == 5
    assert {c.classes for c in rc.REFERENCE_CONFIGS.values()} == {10, 100, 200}


def test_epochs_are_counted_like_a_distributed_sampler():
    assert rc.steps_per_epoch(50_000, 512) == 98          # 97 full batches and one of 336
    assert rc.steps_per_epoch(50_000, 512, world_size=4) == 98
    assert rc.steps_per_epoch(100_000, 192) == 521
    assert rc.epoch_of_step(97, 50_000, 512) == 0 and rc.epoch_of_step(98, 50_000, 512) == 1
    with pytest.raises(ValueError, match='not divisible by 3'):
        rc.steps_per_epoch(50_000, 512, world_size=3)


def test_learning_rate_warms_up_then_decays_per_epoch():
    c, e = rc.reference_config('cifar10-c'), rc.reference_config('cifar10-e')
    lr = lambda cfg, ep: rc.learning_rate(ep, cfg.lrate, cfg.warm_epoch, cfg.tref_epoch, cfg.n_epoch)  # noqa: E731
    assert lr(c, 0) == pytest.approx(4e-4 / 200) and lr(c, 199) == pytest.approx(4e-4)
    assert lr(c, 200) == lr(c, 999) == 4e-4                # C: constant after warm-up (tref = n_epoch)
    assert type(lr(e, 800)) is float  # numpy scalars in an optimizer state_dict break torch.load(weights_only=True)
    assert lr(e, 399) == 2e-2 and lr(e, 1600) == pytest.approx(1e-2) and lr(e, 800) == pytest.approx(2e-2 / np.sqrt(2))


def test_ema_warm_up_and_cap():
    ema = rc.WarmupEMA(torch.nn.Linear(2, 2), beta=0.9993)
    assert ema.decay(1) == 0 and ema.decay(2) == pytest.approx(1 - 2 ** (-2 / 3), rel=1e-6)
    assert ema.decay(53_000) < np.float32(0.9993) and ema.decay(55_000) == np.float32(0.9993)  # cap after ~54000 updates


def test_ema_follows_ema_pytorch_update_rule():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = rc.WarmupEMA(net, beta=0.9)
    expected = None
    for k in range(1, 40):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        ema.update()
        w = net.weight.detach().double()
        # 1st update copies; the 2nd copies again and averages with decay 1 - 2^(-2/3); then min(beta, 1 - k^(-2/3)).
        decay = 0 if k <= 2 else min(0.9, 1 - k ** (-2 / 3))
        expected = w if k <= 2 else decay * expected + (1 - decay) * w
        torch.testing.assert_close(ema.get().weight.double(), expected, rtol=1e-5, atol=1e-6)
    state = ema.state_dict()
    assert list(state)[:2] == ['initted', 'step'] and int(state['step']) == 39 and bool(state['initted'])
    assert sorted(k for k in state if k.startswith('ema_model.')) == ['ema_model.bias', 'ema_model.weight']
    other = rc.WarmupEMA(torch.nn.Linear(3, 2), beta=0.9)
    other.load_state_dict(state)
    assert other.step == 39 and torch.equal(other.get().weight, ema.get().weight)


def test_random_flip_flips_about_half():
    images = torch.arange(4.0).reshape(1, 1, 1, 4).repeat(1000, 1, 1, 1)
    flipped = random_flip(images, torch.Generator().manual_seed(0))
    is_flipped = flipped[:, 0, 0, 0] == 3
    assert torch.equal(flipped[is_flipped], images[is_flipped].flip(3)) and torch.equal(flipped[~is_flipped], images[~is_flipped])
    assert 400 < int(is_flipped.sum()) < 600


class ConstantNet(torch.nn.Module):
    img_resolution, img_channels, label_dim = 4, 3, 0

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x, sigma, class_labels=None):
        return torch.full_like(x, self.value)


def test_sampler_clips_the_denoised_image_and_matches_edm_sampler_otherwise():
    noise = torch.randn([2, 3, 4, 4], generator=torch.Generator().manual_seed(0))
    out = sampling.cifar_edm2_sampler(ConstantNet(5.0), noise)
    torch.testing.assert_close(out, torch.ones_like(out, dtype=torch.float64))  # D clipped to 1: the ODE ends at 1
    inside = sampling.cifar_edm2_sampler(ConstantNet(0.25), noise)
    torch.testing.assert_close(inside, sampling.edm_sampler(ConstantNet(0.25), noise, num_steps=18))
    with pytest.raises(ValueError, match='eta=2'):
        sampling.cifar_edm2_sampler(ConstantNet(0.25), noise, eta=2)


def test_generate_uses_the_reference_sampler_for_the_cifar_nets():
    from training.networks_cifar_edm2 import CifarPrecond
    net = CifarPrecond(img_resolution=8, img_channels=3, config='G', n_channels=16, ch_mults=[1], is_attn=[False], n_blocks=2)
    assert sampling.resolve_sampler('edm', net) is sampling.cifar_edm2_sampler
    images = sampling.generate_images(net.eval(), seeds=[0, 1], batch_size=2, num_steps=4)
    for batch in images:
        assert batch.images.shape == (2, 3, 8, 8) and batch.images.dtype == torch.uint8


def test_reference_checkpoint_exports_to_a_snapshot_that_generates(tmp_path):
    from tests.test_networks_cifar_edm2 import reference_checkpoint
    from training.networks_cifar_edm2 import CifarPrecond
    tiny = dict(img_resolution=8, n_channels=16, ch_mults=[1], is_attn=[True], n_blocks=2, dropout=0)
    torch.manual_seed(0)
    net = CifarPrecond(img_channels=3, config='G', **tiny)
    torch.save(reference_checkpoint(net), tmp_path / 'model_0.pth')
    rc.export_reference_checkpoint(tmp_path / 'model_0.pth', 'cifar10-g', tmp_path / 'net.pkl', **tiny)
    loaded, encoder = sampling.load_network(tmp_path / 'net.pkl')  # the safe loader
    assert encoder is None and type(loaded).__name__ == 'CifarPrecond'
    x, sigma = torch.randn([2, 3, 8, 8]), torch.tensor([0.5, 5.0])
    assert torch.equal(loaded(x, sigma), net.eval()(x, sigma))
    batches = list(sampling.generate_images(loaded, seeds=[0, 1], batch_size=2, num_steps=3))
    assert batches[0].images.shape == (2, 3, 8, 8)


def test_loss_is_the_mean_over_elements_of_the_edm2_loss(tmp_path):
    from torch_utils import persistence
    from training.loss import EDM2Loss
    from training.networks_cifar_edm2 import CifarPrecond
    torch.manual_seed(0)
    net = CifarPrecond(img_resolution=8, img_channels=3, config='G', n_channels=16, ch_mults=[1], is_attn=[False], n_blocks=2)
    images = torch.randn([4, 3, 8, 8])
    loss_fn = CifarEDM2Loss(flip=False)
    torch.manual_seed(1)
    loss = loss_fn(net, images)
    torch.manual_seed(1)
    expected = EDM2Loss(P_mean=-1.2, P_std=1.2)(net, images).mean(dim=(1, 2, 3))
    assert loss.shape == (4,) and torch.equal(loss, expected)
    persistence.save_pickle(dict(loss_fn=CifarEDM2Loss()), tmp_path / 'loss.pkl')
    assert persistence.load_pickle(tmp_path / 'loss.pkl')['loss_fn'].flip is True  # the safe loader knows it


def test_config_network_table_mirrors_the_network_module():
    from training import cifar_edm2_configs, networks_cifar_edm2
    assert cifar_edm2_configs.NETWORKS == networks_cifar_edm2.NETWORKS
    for name, ref in cifar_edm2_configs.REFERENCE_CONFIGS.items():
        assert ref.network_kwargs() == networks_cifar_edm2.network_kwargs(ref.dataset, ref.config), name
