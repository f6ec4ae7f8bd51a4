"""Tests of the EDM2 network (training/networks_edm2.py): magnitude preservation, presets, compile."""

import numpy as np
import pytest
import torch

from training import networks, networks_edm2
from training.networks_edm2 import MPConv, mp_cat, mp_silu, mp_sum, normalize, resample

RTOL, ATOL = 1e-4, 1e-5


def tiny_precond(label_dim=4, **kwargs):
    defaults = dict(img_resolution=8, img_channels=3, label_dim=label_dim, model_channels=16, channel_mult=[1, 2],
        num_blocks=1, attn_resolutions=[4], channels_per_head=8, logvar_channels=8, dropout=0)
    return networks_edm2.Precond(**{**defaults, **kwargs})


def tiny_inputs(batch=3, label_dim=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn([batch, 3, 8, 8], generator=gen)
    sigma = torch.tensor([0.02, 0.7, 20.0, 3.0][:batch])
    labels = torch.eye(label_dim)[torch.arange(batch) % label_dim] if label_dim else None
    return x, sigma, labels


def perturb_(net, scale=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return net


def rms(x):
    return x.square().mean().sqrt().item()

#----------------------------------------------------------------------------
# Magnitude preservation (EDM2 Appendix B).

def test_fixed_function_layers_preserve_unit_magnitude():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn([2, 64, 32, 32], generator=gen), torch.randn([2, 192, 32, 32], generator=gen)
    assert abs(rms(mp_silu(a)) - 1) < 0.03
    for t in (0.1, 0.3, 0.5, 0.9):
        assert abs(rms(mp_sum(a, b[:, :64], t=t)) - 1) < 0.02
        cat = mp_cat(a, b, t=t)
        assert cat.shape[1] == 256 and abs(rms(cat) - 1) < 0.02
    torch.testing.assert_close(mp_sum(a, b[:, :64], t=0), a)
    assert abs(rms(normalize(a * 7)) - 1) < 1e-3
    torch.testing.assert_close(normalize(a * 7, dim=1).square().mean(dim=1), torch.ones([2, 32, 32]), rtol=1e-3, atol=1e-3)


def test_mpconv_preserves_magnitude_and_forces_weight_norm():
    torch.manual_seed(0)
    x = torch.randn([4, 32, 16, 16])
    for kernel in ([], [1, 1], [3, 3]):
        conv = MPConv(32, 48, kernel=kernel)
        with torch.no_grad():
            conv.weight.mul_(5)  # any stored scale: the layer normalizes it away
        inputs = x.mean(dim=[2, 3]) * 4 if not kernel else x
        out = conv.eval()(inputs)
        assert abs(rms(out) - rms(inputs)) < 0.1 * rms(inputs)
        row_rms = conv.weight.flatten(1).square().mean(dim=1).sqrt()
        assert row_rms.min() > 2  # eval mode leaves the stored weight alone

        conv.train()(inputs).square().mean().backward()
        row_rms = conv.weight.flatten(1).square().mean(dim=1).sqrt()
        torch.testing.assert_close(row_rms, torch.ones(48), rtol=1e-3, atol=1e-3)
        with torch.no_grad():
            conv.weight.add_(conv.weight.grad * -0.5)  # an optimizer step moves the norm ...
            conv.train()(inputs)  # ... and the next training forward restores it
        torch.testing.assert_close(conv.weight.flatten(1).square().mean(dim=1).sqrt(), torch.ones(48), rtol=1e-3, atol=1e-3)


def test_resample_keeps_constants_and_shapes():
    x = torch.full([1, 2, 8, 8], 3.0)
    down = resample(x, f=[1, 3, 3, 1], mode='down')
    assert down.shape == (1, 2, 4, 4) and torch.allclose(down[..., 1:-1, 1:-1], torch.tensor(3.0))
    up = resample(x, f=[1, 1], mode='up')
    assert up.shape == (1, 2, 16, 16) and torch.allclose(up, torch.tensor(3.0))
    assert resample(x, mode='keep') is x
    with pytest.raises(ValueError, match='resample mode'):
        resample(x, mode='sideways')


def test_unit_magnitude_through_the_network_at_init():
    torch.manual_seed(0)
    net = tiny_precond(model_channels=32, channels_per_head=16).eval()
    x, sigma, labels = tiny_inputs(batch=4)
    acts = []
    hooks = [m.register_forward_hook(lambda m, i, o: acts.append(rms(o))) for m in net.unet.enc.values()]
    with torch.no_grad():
        net(x * (0.25 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt(), sigma, labels)
    for h in hooks:
        h.remove()
    assert len(acts) == len(net.unet.enc) and all(0.5 < a < 2 for a in acts), acts

#----------------------------------------------------------------------------
# Network behaviour.

def test_sdpa_matches_reference_attention():
    torch.manual_seed(0)
    net = perturb_(tiny_precond()).eval()
    assert max(b.num_heads for b in net.unet.dec.values()) == 4
    x, sigma, labels = tiny_inputs()
    with torch.no_grad():
        with networks.attention_impl('reference'):
            expected, logvar_ref = net(x, sigma, labels, return_logvar=True)
        out, logvar = net(x, sigma, labels, return_logvar=True)
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(logvar, logvar_ref)


def test_channels_last_and_batch_independence():
    torch.manual_seed(0)
    net = perturb_(tiny_precond()).eval()
    x, sigma, labels = tiny_inputs()
    with torch.no_grad():
        expected = net(x, sigma, labels)
        single = torch.cat([net(x[i:i + 1], sigma[i:i + 1], labels[i:i + 1]) for i in range(3)])
        channels_last = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), sigma, labels)
    torch.testing.assert_close(single, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(channels_last, expected, rtol=RTOL, atol=ATOL)


def test_training_forward_backward_and_bf16():
    torch.manual_seed(0)
    net = perturb_(tiny_precond(dropout=0.1)).train()
    x, sigma, labels = tiny_inputs()
    out, logvar = net(x, sigma, labels, return_logvar=True)
    (out.square().mean() + logvar.mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    net.eval()
    with torch.no_grad():
        expected = net(x, sigma, labels)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = net(x, sigma, labels)
    assert out.dtype == torch.float32 and (out - expected).abs().max() < 0.05 * expected.abs().max()


def test_bad_inputs_raise_value_error_naming_the_shape():
    net = tiny_precond().eval()
    x, sigma, labels = tiny_inputs()
    with pytest.raises(ValueError, match=r'x must have shape \[N, 3, 8, 8\], got \[3, 4, 8, 8\]'):
        net(torch.zeros([3, 4, 8, 8]), sigma, labels)
    with pytest.raises(ValueError, match=r'x must have shape \[N, 3, 8, 8\]'):
        net(torch.zeros([3, 3, 4, 4]), sigma, labels)
    with pytest.raises(ValueError, match=r'class_labels must have shape \[N, 4\]'):
        net(x, sigma, torch.zeros([3, 3]))
    with pytest.raises(ValueError, match=r'class_labels must have shape \[N, 4\]'):
        net.unet(x, sigma, torch.zeros([3, 8]))
    with pytest.raises(ValueError, match='flavor'):
        networks_edm2.Block(8, 8, 8, flavor='middle')


def test_compile_fullgraph_and_error_message_under_compile():
    torch.manual_seed(0)
    net = perturb_(tiny_precond()).eval()
    x, sigma, labels = tiny_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend='eager')
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, sigma, labels), net(x, sigma, labels), rtol=RTOL, atol=ATOL)
        # Under fullgraph, dynamo wraps the ValueError but keeps its message (torch 2.13). Older dynamo
        # (2.9) shows only the message's constant parts: 'x must have shape [N, ', '3, 8, 8', ...
        version = tuple(int(v) for v in torch.__version__.split('.')[:2])
        message = r'x must have shape \[N, 3, 8, 8\]' if version >= (2, 13) else r"x must have shape \[N, '.*'3, 8, 8'"
        with pytest.raises(Exception, match=message):
            compiled(torch.zeros([3, 3, 8, 6]), sigma, labels)


@pytest.mark.slow
def test_compile_inductor_training_step():
    torch.manual_seed(0)
    net = perturb_(tiny_precond()).train()
    x, sigma, labels = tiny_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True)
    out, logvar = compiled(x, sigma, labels, return_logvar=True)
    (out.square().mean() + logvar.mean()).backward()
    assert torch.isfinite(out).all() and all(p.grad is not None for p in net.parameters())
    weight = net.unet.enc['8x8_conv'].weight  # forced weight normalization also runs when compiled
    torch.testing.assert_close(weight.flatten(1).square().mean(dim=1), torch.ones(weight.shape[0]), rtol=1e-3, atol=1e-3)

#----------------------------------------------------------------------------
# Size presets.

@pytest.mark.parametrize('name, params_m', [('xs', 124.7), ('s', 280.2), ('m', 497.8), ('l', 777.5),
                                           ('xl', 1119.3), ('xxl', 1523.2), ('img64-s', 280.2)])
def test_preset_parameter_counts(name, params_m):
    with torch.device('meta'):
        net = networks_edm2.build_preset(name)
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 1) == params_m


def test_preset_lookup():
    assert networks_edm2.preset_kwargs('edm2-img512-s') == networks_edm2.preset_kwargs('S')
    kwargs = networks_edm2.preset_kwargs('img64-m', dropout=0)
    assert kwargs['img_channels'] == 3 and kwargs['model_channels'] == 256 and kwargs['dropout'] == 0
    with pytest.raises(ValueError, match='edm2-img512-s'):
        networks_edm2.preset_kwargs('huge')


def test_mp_cat_weights_follow_eq_103():
    a, b = torch.ones([1, 2]), torch.ones([1, 6])
    out = mp_cat(a, b, t=0.25)
    scale = np.sqrt(8 / (0.75 ** 2 + 0.25 ** 2))
    torch.testing.assert_close(out[0, :2], torch.full([2], scale / np.sqrt(2) * 0.75, dtype=torch.float32))
    torch.testing.assert_close(out[0, 2:], torch.full([6], scale / np.sqrt(6) * 0.25, dtype=torch.float32))

#----------------------------------------------------------------------------
# Ablation configs B-G of EDM2 Table 1.

@pytest.mark.parametrize('config', list(networks_edm2.CONFIGS))
def test_config_builds_and_trains(config):
    torch.manual_seed(0)
    net = perturb_(tiny_precond(config=config, dropout=0.1), scale=0.05).train()
    x, sigma, labels = tiny_inputs()
    out, logvar = net(x, sigma, labels, return_logvar=True)
    (out.square().mean() + logvar.mean()).backward()
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    keys = net.state_dict().keys()
    assert any(k.endswith('.bias') for k in keys) == (config == 'B')
    assert any('norm' in k for k in keys) == (config == 'B')  # C-E normalize without parameters
    assert ('unet.out_gain' in keys) == (config == 'G')
    assert any(isinstance(m, MPConv) for m in net.unet.modules()) == (config in 'DEFG')


def test_config_g_is_the_reference_network():
    torch.manual_seed(0)
    default = tiny_precond()
    torch.manual_seed(0)
    explicit = tiny_precond(config='G')
    assert default.state_dict().keys() == explicit.state_dict().keys()
    assert 'config' not in default.unet.enc['8x8_block0'].init_kwargs  # reference init kwargs
    x, sigma, labels = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(default.eval()(x, sigma, labels), explicit.eval()(x, sigma, labels), rtol=0, atol=0)
    with pytest.raises(ValueError, match="config must be one of"):
        tiny_precond(config='H')


@pytest.mark.parametrize('config', ['D', 'E', 'F', 'G'])
def test_weight_normalization_by_config(config):
    torch.manual_seed(0)
    net = tiny_precond(config=config).train()
    x, sigma, labels = tiny_inputs()
    convs = [m for m in net.unet.modules() if isinstance(m, MPConv)]
    for _ in range(2):  # forward, then an optimizer-like step that inflates every weight
        net(x, sigma, labels).square().mean().backward()
        with torch.no_grad():
            for conv in convs:
                conv.weight.add_(conv.weight.grad).mul_(1.5)
    net(x, sigma, labels)
    row_rms = torch.cat([c.weight.flatten(1).square().mean(dim=1).sqrt() for c in convs])
    if config == 'D':  # standard weight normalization: the stored weights drift, the used ones do not
        assert row_rms.mean() > 1.5
    else:  # forced weight normalization (E+): stored weights back at unit RMS
        torch.testing.assert_close(row_rms, torch.ones_like(row_rms), rtol=1e-3, atol=1e-3)


def test_config_g_keeps_unit_magnitude_in_every_block_at_init():
    torch.manual_seed(0)
    net = tiny_precond(config='G', model_channels=32, channels_per_head=16).eval()
    x, sigma, labels = tiny_inputs(batch=4)
    acts = {}
    blocks = {f'{part}.{name}': block for part in ('enc', 'dec') for name, block in getattr(net.unet, part).items()
              if isinstance(block, networks_edm2.Block)}
    hooks = [b.register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, rms(o))) for n, b in blocks.items()]
    with torch.no_grad():
        net(x * (0.25 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt(), sigma, labels)
    for h in hooks:
        h.remove()
    assert len(acts) == len(blocks) and all(0.5 < a < 2 for a in acts.values()), acts


def test_config_networks_pickle_safely(tmp_path):
    from torch_utils import persistence
    torch.manual_seed(0)
    for config in ('B', 'E'):
        net = perturb_(tiny_precond(config=config)).eval()
        x, sigma, labels = tiny_inputs()
        persistence.save_pickle(dict(ema=net), tmp_path / f'{config}.pkl')
        loaded = persistence.load_pickle(tmp_path / f'{config}.pkl')['ema']
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(x, sigma, labels), net(x, sigma, labels), rtol=0, atol=0)


def test_frozen_weights_derive_each_weight_once_with_the_same_outputs(monkeypatch):
    """networks.frozen_weights() (generate.py's sampling): in eval mode each MPConv derives its weight once and
    reuses it, bit for bit the same outputs; a parameter or gain changed in place is seen; training, 'reference'
    weights, vmap's batched parameters and torch.compile derive it in every call; the block leaves no cache."""
    torch.manual_seed(0)
    net = perturb_(tiny_precond()).eval()
    x, sigma, labels = tiny_inputs()
    calls = []
    weight = MPConv._weight
    monkeypatch.setattr(MPConv, '_weight', lambda self, *args: calls.append(self) or weight(self, *args))
    with torch.no_grad():
        expected = [net(x, sigma, labels), net(x * 2, sigma, labels)]
        used = len(set(calls))  # the layers of a forward (logvar_linear only with return_logvar)
        assert used > 10 and len(calls) == 2 * used
        calls.clear()
        with networks.frozen_weights():
            got = [net(x, sigma, labels), net(x * 2, sigma, labels)]
            assert len(calls) == used  # once per layer, not per call
            assert all(torch.equal(a, b) for a, b in zip(got, expected))
            net.unet.out_gain.add_(0.5)  # a gain (a tensor input of MPConv) changed in place
            layer = net.unet.enc['8x8_block0'].conv_res0
            layer.weight.mul_(-1)  # a parameter changed in place
            calls.clear()
            changed = net(x, sigma, labels)
            assert set(calls) == {net.unet.out_conv, layer}
        assert not networks._frozen['weights'] and not torch.equal(changed, expected[0])
        assert torch.equal(changed, net(x, sigma, labels))
        with networks.frozen_weights():
            with networks.frozen_weights():
                calls.clear()
                net(x, sigma, labels)
            assert networks._frozen['weights']  # kept until the outermost block ends
            net(x, sigma, labels)
            assert len(calls) == used
        with networks.reference_kernels(), networks.frozen_weights():
            calls.clear()
            net(x, sigma, labels), net(x, sigma, labels)
            assert len(calls) == 2 * used  # as the reference: in every call
        net.train()
        with networks.frozen_weights():
            calls.clear()
            net(x, sigma, labels), net(x, sigma, labels)
            assert len(calls) == 2 * used  # training: the forced normalization changes the weights every call
        net.eval()
    with torch.enable_grad(), networks.frozen_weights():  # gradients: each call builds its own graph
        calls.clear()
        net(x, sigma, labels).sum().backward(), net(x, sigma, labels).sum().backward()
        assert len(calls) == 2 * used
    with torch.no_grad():
        stacked = {k: torch.stack([v, v]) for k, v in net.named_parameters()}
        with networks.frozen_weights():
            out = torch.func.vmap(lambda p: torch.func.functional_call(net, p, (x, sigma, labels)))(stacked)
        torch.testing.assert_close(out[0], net(x, sigma, labels), rtol=RTOL, atol=ATOL)
        from torch._dynamo.testing import CompileCounter
        monkeypatch.setattr(MPConv, '_weight', weight)  # the counting one would be traced, and its list guarded
        counter = CompileCounter()
        torch._dynamo.reset()
        compiled = torch.compile(net, fullgraph=True, backend=counter)
        for _ in range(2):  # a new block per batch, as generate.py: no recompilation
            with networks.frozen_weights():
                compiled(x, sigma, labels)
        assert counter.frame_count == 1
