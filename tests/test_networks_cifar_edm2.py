"""The CIFAR EDM2 reimplementation's networks (training/networks_cifar_edm2.py) against FutureXiang/edm2
facts: state_dict layouts and parameter counts, forward outputs, probe features, checkpoint loading."""

import json
import pathlib

import pytest
import torch

from torch_utils import persistence
from training import networks_cifar_edm2 as fx
from training import probe

FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'fx_edm2'
RTOL, ATOL = 1e-4, 1e-5  # float32 on CPU, as the reference tensors were made

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


@pytest.fixture(scope='module')
def layouts():
    return json.loads((FIXTURES / 'unet_layouts.json').read_text())


@pytest.fixture(scope='module')
def tiny():
    return torch.load(FIXTURES / 'unet_tiny_forward.pt', weights_only=False)


def tiny_kwargs(tiny):
    kwargs = dict(tiny['case']['kwargs'])
    shape = kwargs.pop('image_shape')
    return dict(img_channels=shape[0], img_resolution=shape[1], **kwargs)


def tiny_precond(tiny, config):
    net = fx.CifarPrecond(config=config, **tiny_kwargs(tiny)).eval()
    net.nn_model.load_state_dict(tiny['tensors']['weights']['G' if config == 'G' else 'CE'])
    return net

#----------------------------------------------------------------------------
# Layouts.

@pytest.mark.parametrize('name', ['UNetC/cifar10', 'UNetE/cifar10', 'UNetG/cifar10',
                                  'UNetC/tinyimagenet', 'UNetE/tinyimagenet', 'UNetG/tinyimagenet'])
def test_state_dict_layout_and_parameter_counts(layouts, name):
    ref = layouts[name]
    with torch.device('meta'):
        net = fx.UNETS[name[4]](**ref['kwargs'])
    assert [f'{k} {list(v.shape)}' for k, v in net.state_dict().items()] == ref['layout']
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == ref['n_trainable']
    assert sum(p.numel() for p in net.parameters()) == ref['n_total']


def test_readme_parameter_counts():
    # README of the reference: 39.5 M trainable parameters on CIFAR, 62.4 M on Tiny-ImageNet (C and E).
    for dataset, millions in (('cifar10', 39.5), ('cifar100', 39.5), ('tinyimagenet', 62.4)):
        for config in 'CE':
            with torch.device('meta'):
                net = fx.CifarPrecond(**fx.network_kwargs(dataset, config)).nn_model
            assert round(sum(p.numel() for p in net.parameters() if p.requires_grad) / 1e6, 1) == millions


@pytest.mark.parametrize('name', ['UNetC/cifar10', 'UNetG/tinyimagenet'])
def test_decoder_block_outputs(layouts, name):
    ref = layouts[name]
    with torch.device('meta'):
        net = fx.UNETS[name[4]](**ref['kwargs']).eval()
        _, acts = net(torch.zeros([1, *ref['kwargs']['image_shape']]), torch.zeros([1]), ret_activation=True)
    assert {k: list(v.shape[1:]) for k, v in acts.items()} == ref['decoder_block_outputs']

#----------------------------------------------------------------------------
# Numbers.

@pytest.mark.parametrize('config', ['C', 'E', 'G'])
def test_forward_matches_reference(tiny, config):
    tensors = tiny['tensors']
    net = tiny_precond(tiny, config).nn_model
    with torch.no_grad():
        out = net(tensors['x'], tensors['c_noise'])
    torch.testing.assert_close(out, tensors['out'][config], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('config', ['C', 'E', 'G'])
def test_probe_features_match_reference(tiny, config, monkeypatch):
    tensors = tiny['tensors']
    net = tiny_precond(tiny, config)
    t = tiny['case']['t']
    features = probe.make_feature_fn(net, {t: probe.reference_sigma(t, tiny['case']['steps'])})
    monkeypatch.setattr(probe.torch, 'randn', lambda *args, **kwargs: tensors['noise'])  # the reference's draw
    feats = features(tensors['x01'], t)
    monkeypatch.undo()
    assert sorted(feats) == sorted(tensors['feats'][config])
    for name, ref in tensors['feats'][config].items():
        torch.testing.assert_close(feats[name], ref, rtol=RTOL, atol=ATOL)
    # The hooks see what the network's own ret_activation returns.
    with torch.no_grad():
        _, _, acts = net(tensors['x01'], torch.full([2], 0.5), return_logvar=True, ret_activation=True)
        with probe.capture_decoder_outputs(net) as hooked:
            net(tensors['x01'], torch.full([2], 0.5))
    assert all(torch.equal(acts[k], hooked[k]) for k in acts) and list(acts) == list(hooked)


def test_multi_head_attention_splits_qkv_per_head():
    # Head j's q, k, v are projected channels 3 d_k j + [0, d_k), [d_k, 2 d_k), [2 d_k, 3 d_k).
    torch.manual_seed(0)
    block = fx.AttentionBlock(32, d_k=8, config='C')
    x = torch.randn([2, 32, 4, 4])
    qkv = block.projection(x).flatten(2)
    heads = []
    for j in range(4):
        q, k, v = [fx.pix_norm(qkv[:, 24 * j + 8 * i: 24 * j + 8 * (i + 1)], dim=1) for i in range(3)]
        w = torch.einsum('bcq,bck->bqk', q, k / 8 ** 0.5).softmax(dim=2)
        heads.append(torch.einsum('bqk,bck->bcq', w, v))
    expected = x + block.output(torch.cat(heads, dim=1).reshape(x.shape))
    torch.testing.assert_close(block(x), expected, rtol=RTOL, atol=ATOL)


def test_forced_weight_normalisation_in_train_mode(tiny):
    # E and G rewrite each stored weight to unit RMS per output unit in a train-mode forward; C does not.
    for config in 'CEG':
        net = tiny_precond(tiny, config).train()
        before = {k: v.clone() for k, v in net.state_dict().items()}
        net(tiny['tensors']['x'], torch.full([2], 1.0))
        conv, old = net.nn_model.down[0].res.conv1.weight.detach(), before['nn_model.down.0.res.conv1.weight']
        if config == 'C':
            assert torch.equal(conv, old)
        else:  # w / (1e-4 + ||w_o|| / sqrt(fan_in)) per output unit o
            rms = old.flatten(1).square().mean(dim=1).sqrt()[:, None, None, None]
            torch.testing.assert_close(conv, old / (1e-4 + rms), rtol=1e-5, atol=1e-6)
            assert not torch.allclose(old, old / (1e-4 + rms), rtol=1e-3)  # the check has something to see

#----------------------------------------------------------------------------
# Checkpoints.

def reference_checkpoint(net, online=None):
    """{"MODEL", "EMA", "opt"} as FutureXiang/edm2 train.py writes it (DDP keys, ema-pytorch keys)."""
    online = net if online is None else online
    ema = {'initted': torch.tensor(True), 'step': torch.tensor(7)}
    ema.update({f'online_model.{k}': v for k, v in online.state_dict().items()})
    ema.update({f'ema_model.{k}': v for k, v in net.state_dict().items()})
    return dict(MODEL={f'module.{k}': v for k, v in online.state_dict().items()}, EMA=ema,
                opt=dict(state={}, param_groups=[dict(lr=0.02, params=[0])]))


def test_reference_checkpoint_loads_ema_weights(tiny, tmp_path):
    ema, online = tiny_precond(tiny, 'E'), tiny_precond(tiny, 'E')
    with torch.no_grad():
        online.nn_model.image_proj.weight.add_(1)
    torch.save(reference_checkpoint(ema, online), tmp_path / 'model_1999.pth')
    overrides = {k: v for k, v in tiny_kwargs(tiny).items() if k != 'img_channels'}
    for weights, source in (('ema', ema), ('online', online), ('model', online)):
        net = fx.load_reference_checkpoint(tmp_path / 'model_1999.pth', 'cifar10-e', weights=weights, **overrides)
        assert not net.training
        for key, value in source.state_dict().items():
            assert torch.equal(net.state_dict()[key], value), (weights, key)


def test_checkpoint_of_another_config_names_first_mismatching_keys(tiny, tmp_path):
    torch.save(reference_checkpoint(tiny_precond(tiny, 'C')), tmp_path / 'model_c.pth')
    overrides = {k: v for k, v in tiny_kwargs(tiny).items() if k != 'img_channels'}
    with pytest.raises(ValueError, match=r'missing: nn_model\.down\.0\.res\.gain\.g.*unexpected: nn_model\.embedding\.linear2\.weight') as err:
        fx.load_reference_checkpoint(tmp_path / 'model_c.pth', 'cifar10-g', **overrides)
    assert 'model_c.pth' in str(err.value) and '\n' not in str(err.value)
    with pytest.raises(ValueError, match='wrong shape: nn_model.image_proj.weight'):
        fx.load_reference_checkpoint(tmp_path / 'model_c.pth', 'cifar10-c', **dict(overrides, n_channels=64))
    with pytest.raises(ValueError, match='expected a dict with "EMA"'):
        torch.save(dict(state_dict={}), tmp_path / 'other.pth')
        fx.load_reference_checkpoint(tmp_path / 'other.pth', 'cifar10-c')
    with pytest.raises(ValueError, match='cifar10-e'):
        fx.parse_reference_config('cifar10-x')


def test_bad_network_arguments_are_one_line_errors():
    for config, kwargs, message in (('E', dict(n_channels=16), 'multiple of 32 channels'),
                                    ('C', dict(is_attn=[True]), 'one entry per ch_mults'),
                                    ('G', dict(n_blocks=1), 'at least 2'),
                                    ('G', dict(attn_channels_per_head=48), 'must divide the 256 channels')):
        with pytest.raises(ValueError, match=message):
            with torch.device('meta'):
                fx.UNETS[config](**kwargs)
    with pytest.raises(ValueError, match="config must be one of \\('C', 'E', 'G'\\)"):
        fx.CifarPrecond(img_resolution=32, img_channels=3, config='F')
    with pytest.raises(ValueError, match='unconditional'):
        fx.CifarPrecond(img_resolution=32, img_channels=3, label_dim=10)


@pytest.mark.parametrize('config', ['C', 'G'])
def test_pickle_round_trip_with_the_safe_loader(tiny, tmp_path, config):
    net = tiny_precond(tiny, config)
    persistence.save_pickle(dict(ema=net), tmp_path / 'net.pkl')
    loaded = persistence.load_pickle(tmp_path / 'net.pkl')['ema']
    x, sigma = tiny['tensors']['x'], torch.tensor([0.1, 3.0])
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma), net(x, sigma))
