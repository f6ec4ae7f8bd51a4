"""DDPM UNet (training/networks_ddpm.py) against tqch/ddpm-torch: constructor arguments, state_dict layout,
a tiny forward pass, the asymmetric SAME padding, and checkpoints in the published layout."""

import argparse
import json
from pathlib import Path

import pytest
import torch

from training import ddpm
from training.networks_ddpm import UNet, SamePad2d, load_checkpoint, unet_kwargs_from_state_dict

FIXTURES = Path(__file__).parent / 'fixtures' / 'ddpm'
LAYOUTS = json.loads((FIXTURES / 'unet_layouts.json').read_text())


@pytest.mark.parametrize('config', sorted(LAYOUTS))
def test_state_dict_layout_matches_the_reference(config):
    with torch.device('meta'):
        net = UNet(**LAYOUTS[config]['kwargs'])
    layout = [f'{k} {"x".join(map(str, v.shape))}' for k, v in net.state_dict().items()]
    assert layout == LAYOUTS[config]['layout']
    assert sum(p.numel() for p in net.parameters()) == LAYOUTS[config]['n_params']
    inferred = unet_kwargs_from_state_dict(net.state_dict())
    assert {k: inferred[k] for k in LAYOUTS[config]['kwargs'] if k != 'drop_rate'} == \
           {k: v for k, v in LAYOUTS[config]['kwargs'].items() if k != 'drop_rate'}


@pytest.fixture(scope='module')
def tiny():
    return torch.load(FIXTURES / 'unet_tiny_forward.pt', weights_only=True)


def test_tiny_forward_matches_the_reference(tiny):
    net = UNet(**tiny['case']['kwargs']).eval()
    net.load_state_dict(tiny['tensors']['state_dict'])
    with torch.no_grad():
        out = net(tiny['tensors']['x'], tiny['tensors']['t'])
    torch.testing.assert_close(out, tiny['tensors']['out'], rtol=1e-4, atol=1e-5)


def test_stride_two_conv_pads_bottom_right_only():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    padded = SamePad2d(3, 2)(x)
    assert padded.shape == (1, 1, 5, 5)
    assert torch.equal(padded[0, 0, :4, :4], x[0, 0]) and padded[0, 0, 4].abs().sum() == 0 and padded[0, 0, :, 4].abs().sum() == 0
    assert SamePad2d(3, 2)(torch.zeros(1, 1, 5, 5)).shape == (1, 1, 7, 7)   # Odd sizes pad one on each side.


def write_published_checkpoint(path, net, ddp=False):
    """The layout ddpm-torch train.py saves: model / optimizer / scheduler / ema {decay, shadow, num_updates} / epoch."""
    prefix = 'module.' if ddp else ''
    shadow = {prefix + k: v.clone() + 0.01 for k, v in net.state_dict().items()}
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)
    torch.save(dict(model={prefix + k: v for k, v in net.state_dict().items()}, optimizer=optimizer.state_dict(),
                    scheduler=dict(last_epoch=3, base_lrs=[2e-4]), ema=dict(decay=0.9999, shadow=shadow, num_updates=7),
                    epoch=3), path)
    return shadow


@pytest.mark.parametrize('ddp', [False, True])
def test_published_checkpoint_loads_safely_and_samples_identically(tiny, tmp_path, ddp):
    reference = UNet(**tiny['case']['kwargs']).eval()
    reference.load_state_dict(tiny['tensors']['state_dict'])
    shadow = write_published_checkpoint(tmp_path / 'ddpm_cifar10.pt', reference, ddp)
    net, checkpoint = load_checkpoint(str(tmp_path / 'ddpm_cifar10.pt'), use_ema=True)
    assert checkpoint['epoch'] == 3
    reference.load_state_dict({k.removeprefix('module.'): v for k, v in shadow.items()})
    diffusion = ddpm.DDIM(ddpm.get_beta_schedule('linear', 1e-4, 0.02, 1000),
                          ddpm.get_selection_schedule('linear', 4, 1000), eta=0.0)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    samples = [diffusion.p_sample(model, noise, randn_like=lambda x: torch.zeros_like(x)) for model in (net, reference)]
    assert torch.equal(samples[0], samples[1])
    raw, _ = load_checkpoint(str(tmp_path / 'ddpm_cifar10.pt'), use_ema=False)
    assert not torch.equal(raw.in_conv.weight, net.in_conv.weight)


def test_mismatched_checkpoint_names_missing_and_extra_keys(tmp_path):
    net = UNet(3, 32, 3, [1, 2], 1, [False, True])
    state = net.state_dict()
    state['extra.weight'] = state.pop('out_conv.2.bias')
    torch.save(dict(model=state, ema=dict(shadow=state)), tmp_path / 'bad.pt')
    with pytest.raises(ValueError, match=r'missing keys: out_conv\.2\.bias; unexpected keys: extra\.weight'):
        load_checkpoint(str(tmp_path / 'bad.pt'), unet_kwargs=dict(in_channels=3, hid_channels=32, out_channels=3,
                        ch_multipliers=[1, 2], num_res_blocks=1, apply_attn=[False, True]))


def test_checkpoint_that_needs_code_to_load_is_refused(tmp_path):
    torch.save(dict(model=argparse.Namespace(weights=1)), tmp_path / 'code.pt')
    with pytest.raises(ValueError, match='not a DDPM checkpoint readable without running code'):
        load_checkpoint(str(tmp_path / 'code.pt'))
