"""Parity of every fast path the benchmark uses (bench/fastpaths.py) with the reference numerics, on CPU.

Forward-pass parity of SDPA, channels-last, bf16 autocast and torch.compile(backend='eager') is
tested in tests/test_networks.py and tests/test_networks_edm2.py; here we test what they do not:
gradients, whole training steps, optimizer and EMA implementations, preconditioning precision
under autocast, AOT-autograd compilation and batched guidance.
"""

import dataclasses

import pytest
import torch

from bench import cases, configs
from bench.fastpaths import (BatchedGuidance, LoopEMA, make_adam, make_variants, prepare_network,
                             same_architecture, variant_scope)
from training import networks, phema, sampling

CPU = torch.device('cpu')
REFERENCE, FAST = make_variants(CPU, compile=False)


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def randomize_(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, including the zero-initialised gains and output layers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    return net


def quick_net(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_(configs.net_spec(name, 'quick').build(CPU), seed)


def net_inputs(net, batch: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], generator=gen)
    sigma = torch.tensor([0.05, 1.0, 20.0][:batch])
    labels = torch.eye(net.label_dim)[torch.randint(net.label_dim, [batch], generator=gen)] if net.label_dim else None
    return x, sigma, labels


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5, msg: str = '') -> None:
    """max |actual - expected| <= tol * max |expected|: fp32 rounding relative to the tensor's scale."""
    error, scale = (actual - expected).abs().max(), expected.abs().max()
    assert error <= tol * scale, f'{msg}: max error {error:.3g} vs scale {scale:.3g}'


def gradients(net, impl: str) -> dict:
    net.zero_grad(set_to_none=True)
    x, sigma, labels = net_inputs(net)
    with networks.attention_impl(impl):
        net(x, sigma, labels).square().mean().backward()
    return {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}

#----------------------------------------------------------------------------
# Attention gradients (forward parity is in test_networks*.py).

@pytest.mark.parametrize('name', ['ddpmpp-cifar10', 'adm-imagenet64', 'edm2-s'])
def test_sdpa_gradients_match_reference_attention(name):
    net = quick_net(name).train()  # the quick configs have no dropout
    assert any(getattr(m, 'num_heads', 0) for m in net.modules())
    reference = gradients(net, 'reference')
    fast = gradients(net, 'sdpa')
    assert reference.keys() == fast.keys() and len(reference) > 10
    for key in reference:
        torch.testing.assert_close(fast[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)

#----------------------------------------------------------------------------
# Whole training steps: channels-last + SDPA + foreach Adam + foreach EMA vs the reference.

def run_training_steps(spec, variant, num_steps: int = 3):
    """(first-step gradients, [net params, EMA params...]) after num_steps TrainSteps with fixed seeds."""
    with variant_scope(variant):
        step = cases.TrainStep(spec, variant, CPU, batch=3, lr=1e-3)
        randomize_(step.net)  # zero-initialised output layers would leave only near-zero gradients
        for i in range(num_steps):
            torch.manual_seed(100 + i)  # the loop reseeds per step; both variants draw the same noise
            step()
            if i == 0:
                grads = {k: p.grad.clone() for k, p in step.net.named_parameters() if p.grad is not None}
    tracker = step.ema if variant.ema == 'foreach' else step.ema.tracker
    emas = tracker.emas if spec.edm2 else [tracker.ema]
    return grads, [dict(step.net.named_parameters())] + [dict(e.named_parameters()) for e in emas]


@pytest.mark.parametrize('name', ['ddpmpp-cifar10', 'edm2-xs'])
def test_fast_training_steps_match_reference(name):
    spec = configs.net_spec(name, 'quick')
    ref_grads, ref_params = run_training_steps(spec, REFERENCE)
    fast_grads, fast_params = run_training_steps(spec, FAST)
    assert ref_grads.keys() == fast_grads.keys()
    for key, grad in ref_grads.items():
        assert_close_scaled(fast_grads[key], grad, tol=1e-4, msg=key)
    # Adam turns gradients that are zero in exact arithmetic (key biases, which softmax ignores) into
    # +-lr steps of rounding noise; compare the weights only where the gradient is not such noise.
    for ref, fast in zip(ref_params, fast_params):
        for key, value in ref.items():
            mask = ref_grads[key].abs() > 1e-6 * ref_grads[key].abs().max() if key in ref_grads else torch.ones_like(value, dtype=torch.bool)
            torch.testing.assert_close(fast[key].detach()[mask], value.detach()[mask], rtol=1e-4, atol=2e-5, msg=key)
    conv = next(p for p in fast_params[0].values() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)


#----------------------------------------------------------------------------
# Optimizer and EMA implementations.

@pytest.mark.parametrize('adam', ['foreach', 'fused'])
def test_multi_tensor_adam_matches_for_loop_adam(adam):
    net = quick_net('edm2-xs')
    nets = {'loop': net, adam: randomize_(configs.net_spec('edm2-xs', 'quick').build(CPU))}
    nets[adam].load_state_dict(net.state_dict())
    x, sigma, labels = net_inputs(net)
    for impl, model in nets.items():
        optimizer = make_adam(model.parameters(), dataclasses.replace(REFERENCE, adam=impl), lr=1e-2, betas=(0.9, 0.99))
        for _ in range(4):
            optimizer.zero_grad()
            model(x, sigma, labels).square().mean().backward()
            optimizer.step()
    for (key, ref), fast in zip(nets['loop'].named_parameters(), nets[adam].parameters()):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(nets['loop'].unet.out_gain, torch.as_tensor(0.0))


@pytest.mark.parametrize('edm2', [True, False])
def test_foreach_ema_matches_per_parameter_loop(edm2):
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Conv2d(3, 4, 3))
    make = lambda: phema.PowerFunctionEMA(net, stds=[0.05, 0.10]) if edm2 else phema.TraditionalEMA(net, 0.01, 0.09)
    fast, loop = make(), LoopEMA(make())
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        with torch.no_grad():
            for param in net.parameters():
                param.add_(torch.randn(param.shape, generator=gen))
        fast.update(cur_nimg=step * 1000, batch_size=1000)
        loop.update(cur_nimg=step * 1000, batch_size=1000)
    fast_nets = fast.emas if edm2 else [fast.ema]
    loop_nets = loop.tracker.emas if edm2 else [loop.tracker.ema]
    for a, b in zip(fast_nets, loop_nets):
        for pa, pb, pn in zip(a.parameters(), b.parameters(), net.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(pa, pn)  # the EMA lags the net: the test is not vacuous

#----------------------------------------------------------------------------
# bf16 autocast keeps preconditioning and loss in fp32.

@pytest.mark.parametrize('name', ['ddpmpp-cifar10', 'edm2-s'])
def test_bf16_autocast_keeps_preconditioning_in_fp32(name):
    net = quick_net(name).eval()
    backbone = net.unet if name.startswith('edm2') else net.model
    seen = {}
    backbone.register_forward_hook(lambda m, args, out: seen.update(x=args[0].dtype, out=out.dtype))
    x, _, labels = net_inputs(net)
    x = x * 3 + 0.1
    sigma = torch.full([3], 1e-4)  # c_skip = 1 - 4e-8, c_out = 1e-4: D(x) is x plus a tiny correction
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        denoised = net(x, sigma, labels)
    assert denoised.dtype == torch.float32 and seen['out'] == torch.bfloat16
    # In bf16 (8 mantissa bits) x itself would be off by up to |x| / 256 ~ 0.03; in fp32 only c_out F(x) remains.
    assert (denoised - x).abs().max() < 2e-3
    bf16_error = (x.to(torch.bfloat16).to(torch.float32) - x).abs().max()
    assert bf16_error > 10 * (denoised - x).abs().max()


@pytest.mark.parametrize('name', ['adm-imagenet64', 'edm2-xs'])
def test_bf16_autocast_training_loss_is_fp32_and_close(name):
    spec = configs.net_spec(name, 'quick')
    losses = {}
    for bf16 in (False, True):
        step = cases.TrainStep(spec, dataclasses.replace(REFERENCE, bf16=bf16), CPU, batch=3)
        randomize_(step.net)
        torch.manual_seed(5)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            losses[bf16] = step.loss_fn(net=step.net, images=step.images, labels=step.labels)
    assert losses[True].dtype == torch.float32
    torch.testing.assert_close(losses[True].mean(), losses[False].mean(), rtol=0.05, atol=0.05)

#----------------------------------------------------------------------------
# torch.compile through AOT autograd (the inductor run is marked slow in test_networks*.py).

def test_compiled_training_step_matches_eager():
    spec = configs.net_spec('edm2-xs', 'quick')
    params = {}
    for compile in (False, True):
        torch._dynamo.reset()
        variant = dataclasses.replace(FAST, compile=compile, compile_backend='aot_eager')
        with variant_scope(variant):
            step = cases.TrainStep(spec, variant, CPU, batch=2, lr=1e-3)
            for i in range(2):
                torch.manual_seed(i)
                step()
        params[compile] = dict(step.net.named_parameters())
    for key, value in params[False].items():
        torch.testing.assert_close(params[True][key], value, rtol=1e-5, atol=1e-6, msg=key)

#----------------------------------------------------------------------------
# Batched guidance.

@pytest.mark.parametrize('name', ['edm2-s', 'ddpmpp-cifar10'])
def test_batched_guidance_equals_separate_calls(name):
    net, gnet = quick_net(name, seed=0).eval(), quick_net(name, seed=1).eval()
    assert same_architecture(net, gnet)
    x, sigma, labels = net_inputs(net)
    guided = BatchedGuidance(net, gnet, guidance=1.7)
    separate = sampling.guided_denoiser(net, gnet, labels, guidance=1.7, dtype=torch.float32)
    with torch.no_grad():
        for s in sigma:
            assert_close_scaled(guided(x, s, labels), separate(x, s), msg=f'sigma={float(s)}')
        noise = torch.randn_like(x)
        expected = sampling.edm2_sampler(net, noise, labels, gnet=gnet, guidance=1.7, num_steps=3)
        assert_close_scaled(sampling.edm2_sampler(guided, noise, labels, num_steps=3), expected, tol=1e-4, msg='sampler')


def test_batched_guidance_compiles_and_refuses_other_architectures():
    net, gnet = quick_net('edm2-xs', seed=0).eval(), quick_net('edm2-xs', seed=1).eval()
    x, sigma, labels = net_inputs(net)
    guided = BatchedGuidance(net, gnet, guidance=2.0)
    torch._dynamo.reset()
    compiled = torch.compile(guided, backend='eager')  # dynamo must trace vmap + functional_call
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, sigma[1], labels), guided(x, sigma[1], labels), rtol=1e-5, atol=1e-5)
    other = quick_net('edm2-s')
    assert not same_architecture(net, other)
    with pytest.raises(ValueError, match='same architecture'):
        BatchedGuidance(net, other, guidance=2.0)


def test_prepare_network_layout_and_variant_scope_restore_globals():
    net, call = prepare_network(quick_net('adm-imagenet64'), FAST)
    assert call is net and all(p.is_contiguous(memory_format=torch.channels_last) for p in net.parameters() if p.ndim == 4)
    before = networks.get_attention_impl()
    with variant_scope(REFERENCE):
        assert networks.get_attention_impl() == 'reference'
    assert networks.get_attention_impl() == before
