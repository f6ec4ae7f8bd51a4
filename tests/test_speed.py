"""training/speed.py: regional compilation keeps outputs and state_dict keys; --fast and the device checks."""

import itertools

import pytest
import torch

from training import (guidance, networks, networks_cifar_edm2, networks_ddpm, networks_edm2, preconditioning, presets,
                      presets_generate, speed)


def _tiny_edm(**kwargs):
    torch.manual_seed(0)
    return networks.EDMPrecond(img_resolution=16, img_channels=3, label_dim=4, model_type='SongUNet',
                               model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], **kwargs)


def test_compile_regions_same_outputs_gradients_and_keys():
    net, ref = _tiny_edm(), _tiny_edm()
    keys = list(net.state_dict())
    names = speed.compile_regions(net, backend='aot_eager')
    assert names and all(isinstance(net.get_submodule(n), networks.UNetBlock) for n in names)
    assert list(net.state_dict()) == keys  # no _orig_mod. prefixes: training states stay loadable
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0])
    labels = torch.eye(4)[[1, 3]]
    out, out_ref = net(x, sigma, labels), ref(x, sigma, labels)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-5)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    reduction = 2 * 16 * 16  # weight gradients sum over batch x pixels; decompositions reorder those sums
    scale = max(q.grad.abs().max().item() for q in ref.parameters())
    bound = reduction * torch.finfo(torch.float32).eps * scale
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=bound)


def _edm_inputs():
    return torch.randn(2, 3, 16, 16), torch.ones(2), torch.eye(4)[:2]


# Tiny networks of every backbone family: (build, inputs).
_BACKBONES = {
    'songunet': (_tiny_edm, _edm_inputs),
    'dhariwalunet': (lambda: networks.EDMPrecond(img_resolution=16, img_channels=3, label_dim=4, model_type='DhariwalUNet',
                                                 model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]),
                     _edm_inputs),
    'edm2': (lambda: networks_edm2.Precond(img_resolution=8, img_channels=4, label_dim=0, model_channels=16,
                                           channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8),
             lambda: (torch.randn(2, 4, 8, 8), torch.ones(2), None)),
    'ddpm': (lambda: networks_ddpm.UNet(in_channels=3, hid_channels=32, out_channels=3, ch_multipliers=(1, 2),
                                        num_res_blocks=1, apply_attn=(False, True), drop_rate=0.0),
             lambda: (torch.randn(2, 3, 16, 16), torch.ones(2))),
    'cifar-edm2': (lambda: networks_cifar_edm2.CifarPrecond(img_resolution=8, img_channels=3, config='E', n_channels=32,
                                                            ch_mults=[1, 1], is_attn=[False, True], dropout=0, n_blocks=2),
                   lambda: (torch.randn(2, 3, 8, 8), torch.ones(2))),
}


@pytest.mark.parametrize('name, block_type', [('edm2', networks_edm2.Block), ('ddpm', networks_ddpm.ResidualBlock)])
def test_compile_regions_finds_the_blocks_of_each_backbone(name, block_type):
    net = _BACKBONES[name][0]()
    names = speed.compile_regions(net, backend='eager')
    assert any(isinstance(net.get_submodule(n), block_type) for n in names)
    assert not any(a != b and b.startswith(a + '.') for a in names for b in names)  # no block inside a compiled one


def test_compile_traces_the_network_once():
    """EDM's UNetBlock keeps skip_scale as np.float64 (also in published pickles); dynamo traced it as a tensor,
    gave up on the graph and traced the whole network a second time. compile_network makes it a float."""
    from torch._dynamo.utils import compilation_time_metrics
    net, ref = _tiny_edm(), _tiny_edm()
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0]), torch.eye(4)[[1, 3]]
    torch._dynamo.reset()
    compilation_time_metrics.clear()
    speed.compile_network(net, backend='aot_eager')(x, sigma, labels).sum().backward()
    assert sorted(k for k in compilation_time_metrics if k.startswith('compile_attempt')) == ['compile_attempt_0']
    block = net.model.enc['16x16_block0']
    assert type(block.skip_scale) is float and type(ref.model.enc['16x16_block0'].skip_scale) is not float
    net.eval(), ref.eval()  # no dropout
    assert torch.equal(net(x, sigma, labels), ref(x, sigma, labels))  # eager results unchanged


def test_autocast_switching_graphs_stay_in_the_compile_cache(tmp_path, monkeypatch):
    """GroupNorm turns autocast off inside a bf16 graph; AOTAutograd's cache used to bypass such graphs, so every
    start traced and partitioned the network again. The second compile must be a cache hit."""
    if speed.compiler_missing('cpu'):
        pytest.skip(f'inductor needs a C++ compiler here: {speed.compiler_missing("cpu")}')
    from torch._dynamo.utils import counters
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), networks.GroupNorm(8, num_groups=2))
    x = torch.randn(2, 8, 4, 4)
    for _attempt in range(2):
        torch._dynamo.reset()
        counters.clear()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = speed.compile_network(net, backend='inductor')(x)
        assert out.dtype == torch.bfloat16  # group norm ran in the input's dtype, autocast off around it
        out.float().sum().backward()
    assert counters['aot_autograd'].get('autograd_cache_hit') == 1, dict(counters['aot_autograd'])


@pytest.mark.parametrize('name', sorted(_BACKBONES))
def test_every_backbone_graph_can_live_in_the_compile_cache(name):
    """What dynamo captures of each backbone, bf16 or not, training or sampling, must be cacheable by AOTAutograd,
    or every start recompiles from scratch (the EDM2 network's np.sqrt calls on Python numbers were traced as numpy
    ops, which the cache refuses; GroupNorm's autocast switch likewise until speed.cacheable_autocast)."""
    from torch._functorch._aot_autograd.autograd_cache import check_cacheable
    build, inputs = _BACKBONES[name]
    speed.cacheable_autocast()
    # EDM's backbones run wide heads (DDPM++: one of 256 channels) through the einsum with float32 weights
    attentions = ('auto', 'reference') if name in ('songunet', 'dhariwalunet') else ('auto',)
    for attention, train, bf16 in itertools.product(attentions, (True, False), (False, True)):
        graphs = []
        torch._dynamo.reset()
        net = build().train(train)
        speed.plain_scalars(net)
        compiled = torch.compile(net, backend=lambda gm, _inputs: graphs.append(gm) or gm.forward, dynamic=False)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(train), \
                networks.attention_impl(attention):
            compiled(*inputs())
        assert len(graphs) == 1, f'{name}: {len(graphs)} graphs (graph breaks)'
        check_cacheable(graphs[0])  # raises BypassAOTAutogradCache with the reason


def test_compiled_einsum_attention_gives_the_eager_gradients():
    """Under torch.compile the float32-weight attention runs in plain ops instead of its autograd.Function (which
    keeps graphs out of the compile cache); outputs and gradients must stay the eager network's."""
    net, ref = _tiny_edm(), _tiny_edm()
    net.eval(), ref.eval()
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0]), torch.eye(4)[[1, 3]]
    with networks.attention_impl('reference'):
        torch._dynamo.reset()
        out = speed.compile_network(net, backend='aot_eager')(x, sigma, labels)
        out_ref = ref(x, sigma, labels)
        out.square().sum().backward()
        out_ref.square().sum().backward()
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-5)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_compile_network_rejects_unknown_mode():
    with pytest.raises(ValueError, match='compile mode'):
        speed.compile_network(_tiny_edm(), 'everything')


def test_group_norm_keeps_reduced_precision_under_autocast():
    norm = networks.GroupNorm(num_channels=32)
    x = torch.randn(2, 32, 4, 4).to(torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    expected = torch.nn.functional.group_norm(x.float(), norm.num_groups, eps=norm.eps)
    torch.testing.assert_close(y.float(), expected, rtol=0, atol=2 ** -7 * expected.abs().max().item() * 2)
    assert norm(torch.randn(2, 32, 4, 4)).dtype == torch.float32


def test_fast_fills_only_what_was_not_given():
    cfg = presets.build_config('edm-cifar10-32x32-cond-vp', fast=True)
    assert (cfg.bf16, cfg.fp16, cfg.compile) == (True, False, True)
    cfg = presets.build_config('edm-cifar10-32x32-cond-vp', fast=True, fp16=True)  # the reference path, compiled
    assert (cfg.bf16, cfg.fp16, cfg.compile) == (False, True, True)
    cfg = presets.build_config('edm-cifar10-32x32-cond-vp', fast=True, compile=False)
    assert (cfg.bf16, cfg.compile) == (True, False)
    gen = presets_generate.build_config(net='x.pkl', outdir='out', fast=True)
    assert (gen.precision, gen.compile) == ('bf16', True)


def test_fast_turns_nothing_on_off_cuda(capsys):
    cfg = speed.resolve_switches(presets.build_config('edm-cifar10-32x32-cond-vp', fast=True), torch.device('cpu'))
    assert (cfg.bf16, cfg.compile) == (False, False)
    assert capsys.readouterr().err.count('\n') == 1  # one line


def test_device_checks_stop_explicit_flags_and_drop_fast_ones(monkeypatch, capsys):
    monkeypatch.setattr(speed, 'bf16_missing', lambda device: 'GPU X has no native bf16')
    monkeypatch.setattr(speed, 'compiler_missing', lambda device_type: 'torch.compile needs Triton')
    cuda = torch.device('cuda')
    with pytest.raises(ValueError, match=r'^--bf16=1: GPU X has no native bf16\. Drop --bf16=1'):
        speed.usable_switches(cuda, fast=False, bf16=True, compile=False, bf16_flag='--bf16=1')
    with pytest.raises(ValueError, match=r'^--compile: torch.compile needs Triton'):
        speed.usable_switches(cuda, fast=False, bf16=False, compile=True, bf16_flag='--bf16=1')
    assert speed.usable_switches(cuda, fast=True, bf16=True, compile=True, bf16_flag='--bf16=1') == (False, False)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith('Warning: ') for line in err)


def test_compiler_check_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(speed.shutil, 'which', lambda name: None)
    speed.compiler_missing.cache_clear()
    try:
        assert 'C++ compiler' in speed.compiler_missing('cpu')
    finally:
        speed.compiler_missing.cache_clear()
    assert speed.compiler_missing('xla') is not None


def test_auto_attention_takes_sdpa_only_for_narrow_heads(monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention', lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    assert networks.get_attention_impl() == 'auto'
    for channels, expect_sdpa in ((64, True), (networks.SDPA_MAX_HEAD_CHANNELS, True), (256, False)):
        calls.clear()
        q, k, v = torch.randn(3, 2, channels, 16).unbind(0)
        out = networks.attention(q, k, v)
        with networks.attention_impl('reference'):
            torch.testing.assert_close(out, networks.attention(q, k, v), rtol=1e-4, atol=1e-5)
        assert bool(calls) == expect_sdpa, channels


def test_train_compile_gives_the_eager_first_step_gradients(tmp_path, monkeypatch):
    from tests.test_train import assert_gradients_match, cifar_mini, deterministic_noise, record_gradients, train
    from tests.test_train import write_dataset
    import numpy as np
    images, labels = cifar_mini()
    small = images[:32].reshape(32, 8, 4, 8, 4, 3).mean(axis=(2, 4)).astype(np.uint8)
    data = write_dataset(tmp_path / 'data', small, labels[:32])
    monkeypatch.setattr(speed, 'DEFAULT_BACKEND', 'aot_eager')
    monkeypatch.setattr(speed, 'compiler_missing', lambda device_type: None)
    compiled = []
    compile_network = speed.compile_network
    monkeypatch.setattr(speed, 'compile_network', lambda net, *a, **k: compiled.append(net) or compile_network(net, *a, **k))
    deterministic_noise(monkeypatch)
    grads = []
    record_gradients(monkeypatch.setattr, grads)
    common = dict(data=data, total_nimg=16, batch_size=16, P_mean=-0.5, P_std=0.0, status_nimg=None, snapshot_nimg=None)
    train(tmp_path / 'eager', 'tiny-edm', **common)
    train(tmp_path / 'compiled', 'tiny-edm', compile=True, **common)
    assert len(compiled) == 1
    assert len(grads) == 2
    assert_gradients_match(grads[1], grads[0], batch_size=16, resolution=8)


def test_generate_compile_gives_the_same_images(monkeypatch):
    from training import sampling
    monkeypatch.setattr(speed, 'DEFAULT_BACKEND', 'aot_eager')
    net = _tiny_edm().eval().requires_grad_(False)
    images = {}
    for compile in (False, True):
        batches = sampling.generate_images(net, seeds=range(3), batch_size=2, num_steps=3, compile=compile)
        images[compile] = torch.cat([batch.images for batch in batches]).to(torch.int16)
    assert (images[True] - images[False]).abs().max() <= 1  # uint8 rounding of fp32-identical math
    assert (images[True] == images[False]).float().mean() > 0.99


def test_bf16_training_keeps_the_augmentation_in_fp32(tmp_path, monkeypatch):
    """Only the network runs under autocast: the augmented images of a --bf16=1 step equal the fp32 step's."""
    from tests.test_train import cifar_mini, train, write_dataset
    from training import augment
    images, labels = cifar_mini()
    data = write_dataset(tmp_path / 'data', images[:32], labels[:32])
    seen = {}
    pipe_call = augment.AugmentPipe.__call__
    def record(self, x):
        out = pipe_call(self, x)
        seen.setdefault(key, out[0].detach().clone())
        return out
    monkeypatch.setattr(augment.AugmentPipe, '__call__', record)
    common = dict(data=data, total_nimg=8, batch_size=8, status_nimg=None, snapshot_nimg=None, augment=0.5)
    for key in ('fp32', 'bf16'):
        train(tmp_path / key, 'tiny-edm', bf16=(key == 'bf16'), **common)
    assert seen['bf16'].dtype == torch.float32
    assert torch.equal(seen['bf16'], seen['fp32'])


def test_generate_compile_pads_the_last_batch_instead_of_recompiling(monkeypatch):
    from training import sampling
    compiled = []
    def counting_backend(graph, example_inputs):
        compiled.append(example_inputs[0].shape if example_inputs else None)
        return graph.forward
    monkeypatch.setattr(speed, 'DEFAULT_BACKEND', counting_backend)
    torch._dynamo.reset()
    net = _tiny_edm().eval().requires_grad_(False)
    batches = list(sampling.generate_images(net, seeds=range(5), batch_size=2, num_steps=2, compile=True))
    assert [len(batch.images) for batch in batches] == [2, 2, 1]
    assert len(compiled) == 1  # the batch of one ran padded to two: no second graph
    reference = list(sampling.generate_images(_tiny_edm().eval().requires_grad_(False), seeds=[4], num_steps=2))
    assert torch.equal(batches[-1].images, reference[0].images)


def test_fid_gen_passes_the_speed_switches(monkeypatch):
    from click.testing import CliRunner
    import fid
    seen = {}
    from training import metrics
    monkeypatch.setattr(metrics, 'gen', lambda *args, **kwargs: seen.update(kwargs) or [])
    monkeypatch.setattr(speed, 'compiler_missing', lambda device_type: None)
    base = ['gen', '--net=x.pkl', '--ref=ref.npz', '--device=cpu']
    result = CliRunner().invoke(fid.main, base + ['--compile', '--precision=bf16'])
    assert result.exit_code == 0, result.output
    assert (seen['precision'], seen['compile']) == ('bf16', True)
    result = CliRunner().invoke(fid.main, base + ['--fast'])  # on a CPU --fast turns nothing on, in one line
    assert result.exit_code == 0, result.output
    assert (seen['precision'], seen['compile']) == ('fp32', False)
    assert result.output.count('Warning: --fast turns nothing on') == 1


def test_compiled_songunet_training_runs_convolutions_channels_last_on_cuda_only():
    """train.py's compile forces inductor's channels-last convolutions for SongUNet on CUDA (measured on DDPM++);
    other devices and the other backbones keep inductor's own choice."""
    cuda, cpu = torch.device('cuda'), torch.device('cpu')
    assert speed.train_compile_options(_tiny_edm(), cuda) == dict(force_layout_optimization=True)
    assert speed.train_compile_options(_tiny_edm(), cpu) is None
    for name in ('dhariwalunet', 'edm2', 'ddpm', 'cifar-edm2'):
        assert speed.train_compile_options(_BACKBONES[name][0](), cuda) is None, name


def test_network_forward_code_calls_no_numpy():
    """torch 2.11's dynamo traces a numpy call on Python numbers (np.sqrt(2)) into the graph as a numpy op, and
    AOTAutograd's cache refuses such graphs: on an H200 every warm start of a compiled DDPM++ paid the whole trace
    and partition again. torch 2.13 folds them, so no captured-graph test here can see it; the networks' code must
    not call numpy outside construction."""
    import ast
    import inspect
    construction = {'__init__', 'weight_init', 'learned_layer'}  # run when a network is built, never compiled
    found = []
    for module in (networks, networks_edm2, networks_ddpm, networks_cifar_edm2, preconditioning, guidance):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.FunctionDef) and node.name not in construction:
                found += [f'{module.__name__}.{node.name}, line {call.lineno}: np.{call.func.attr}'
                          for call in ast.walk(node) if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                          and isinstance(call.func.value, ast.Name) and call.func.value.id == 'np']
    assert not found, found
