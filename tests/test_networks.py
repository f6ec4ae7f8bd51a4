"""Tests of the EDM networks (training/networks.py), preconditioning and their reference parity."""

import gzip
import json
import pickle

import pytest
import torch

from torch_utils import persistence
from training import networks, networks_edm2, preconditioning

RTOL, ATOL = 1e-4, 1e-5
SPEC_CTORS = {'EDM2UNet': networks_edm2.UNet, 'EDM2Precond': networks_edm2.Precond}


def spec_class(ctor: str) -> type:
    return SPEC_CTORS.get(ctor) or getattr(networks, ctor)


def load_spec_net(path):
    data = torch.load(path, weights_only=False)
    case, tensors = data['case'], data['tensors']
    net = spec_class(case['ctor'])(**case['kwargs']).eval()
    net.load_state_dict(tensors['state_dict'])
    return net, case, tensors


def perturb_(net: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Move every parameter away from its (often zero) init so that each branch affects the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return net


def tiny_edm(model_type='SongUNet', label_dim=4, **kwargs):
    song = dict(embedding_type='fourier', encoder_type='residual', channel_mult_noise=2, resample_filter=[1, 3, 3, 1])
    defaults = dict(img_resolution=8, img_channels=3, label_dim=label_dim, model_type=model_type,
        model_channels=8 if model_type == 'SongUNet' else 16, channel_mult=[1, 2] if model_type == 'SongUNet' else [1, 4],
        num_blocks=1, attn_resolutions=[4], dropout=0, **(song if model_type == 'SongUNet' else {}))
    return networks.EDMPrecond(**{**defaults, **kwargs})


def tiny_inputs(batch=3, label_dim=4, resolution=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn([batch, 3, resolution, resolution], generator=gen)
    sigma = torch.tensor([0.02, 0.7, 20.0, 3.0, 0.1][:batch])
    labels = torch.eye(label_dim)[torch.arange(batch) % label_dim] if label_dim else None
    return x, sigma, labels

#----------------------------------------------------------------------------
# Reference parity.

def test_state_dict_keys_and_shapes_match_reference(spec_dir):
    entries = json.loads(gzip.decompress((spec_dir / 'state_dicts.json.gz').read_bytes()))
    assert len(entries) >= 39
    for name, entry in entries.items():
        net = spec_class(entry['ctor'])(**entry['kwargs'])
        ours = {k: list(v.shape) for k, v in net.state_dict().items()}
        theirs = {k: list(shape) for k, shape in entry['keys']}
        assert ours == theirs, f'{name}: only ours {sorted(set(ours) - set(theirs))}, only reference {sorted(set(theirs) - set(ours))}'


@pytest.mark.parametrize('impl', networks.ATTENTION_IMPLS)
def test_outputs_match_reference(spec_dir, impl):
    files = sorted((spec_dir / 'networks').glob('*.pt'))
    assert files
    for path in files:
        net, case, tensors = load_spec_net(path)
        inputs = tensors['inputs']
        with networks.attention_impl(impl), torch.no_grad():
            torch.testing.assert_close(net(**inputs), tensors['out'], rtol=RTOL, atol=ATOL, msg=path.name)
            no_labels = net(**{**inputs, 'class_labels': None})
            torch.testing.assert_close(no_labels, tensors['out_nolabels'], rtol=RTOL, atol=ATOL, msg=path.name)
            if 'logvar' in tensors:
                _, logvar = net(**inputs, return_logvar=True)
                torch.testing.assert_close(logvar, tensors['logvar'], rtol=RTOL, atol=ATOL, msg=path.name)
        for attr, value in case.get('attr_values', {}).items():
            assert getattr(net, attr) == value, f'{path.name}: {attr}'
        for call, arg, expected in zip(case.get('attr_calls', []), tensors.get('attr_in', []), tensors.get('attr_out', [])):
            result = getattr(net, call['name'])(arg)
            assert result.dtype == expected.dtype and torch.equal(result, expected), f'{path.name}: {call}'


def test_channels_last_gives_same_outputs(spec_dir):
    for path in sorted((spec_dir / 'networks').glob('*.pt')):
        net, _, tensors = load_spec_net(path)
        net = perturb_(net).to(memory_format=torch.channels_last)
        inputs = dict(tensors['inputs'])
        with torch.no_grad():
            expected = net(**inputs)
            inputs['x'] = inputs['x'].to(memory_format=torch.channels_last)
            torch.testing.assert_close(net(**inputs), expected, rtol=RTOL, atol=ATOL, msg=path.name)


@pytest.mark.parametrize('name', ['edm', 'edm2', 'edm2-uncond'])
def test_reference_snapshot_pickles_load_and_reproduce(spec_dir, name):
    snapshot = persistence.load_pickle(spec_dir / 'pickles' / f'{name}-snapshot.pkl')
    expected = torch.load(spec_dir / 'pickles' / f'{name}-snapshot.forward.pt', weights_only=False)
    ema = snapshot['ema']
    assert type(ema).__name__ == expected['ema_class']
    assert dict(ema.init_kwargs) == expected['init_kwargs']
    with torch.no_grad():
        out = ema.eval()(expected['x'], expected['sigma'], expected['class_labels'])
    torch.testing.assert_close(out, expected['out'], rtol=RTOL, atol=ATOL)

#----------------------------------------------------------------------------
# Attention backends.

def test_attention_backends_agree_with_gradients():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn([2, 3, 8, 16], generator=gen, requires_grad=True) for _ in range(3))
    results = {}
    for impl in networks.ATTENTION_IMPLS:
        for fp32_weights in (True, False):
            with networks.attention_impl(impl):
                out = networks.attention(q, k, v, fp32_weights=fp32_weights)
            grads = torch.autograd.grad((out * torch.linspace(-1, 1, 16)).sum(), [q, k, v])
            results[impl, fp32_weights] = (out, *grads)
    first = results['reference', False]
    for key, value in results.items():
        for a, b in zip(value, first):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=str(key))
    with pytest.raises(ValueError, match='sdpa'):
        networks.set_attention_impl('flash')
    assert networks.get_attention_impl() == 'auto'


@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
def test_sdpa_matches_reference_attention_in_network(model_type):
    torch.manual_seed(0)
    net = perturb_(tiny_edm(model_type, **({} if model_type == 'SongUNet' else dict(model_channels=32)))).eval()
    heads = [m.num_heads for m in net.modules() if isinstance(m, networks.UNetBlock) and m.num_heads]
    assert heads and (model_type == 'SongUNet' or max(heads) == 2)
    x, sigma, labels = tiny_inputs()
    with torch.no_grad():
        with networks.attention_impl('reference'):
            expected = net(x, sigma, labels)
        torch.testing.assert_close(net(x, sigma, labels), expected, rtol=RTOL, atol=ATOL)

#----------------------------------------------------------------------------
# Resampling backends.

def _reference_conv2d(conv: networks.Conv2d, x: torch.Tensor, fir: list) -> torch.Tensor:
    """NVlabs/edm's Conv2d.forward written out from its definition (depthwise FIR convolutions, its paddings)."""
    F = torch.nn.functional
    f = torch.outer(torch.tensor(fir, dtype=torch.float32), torch.tensor(fir, dtype=torch.float32))
    f = (f / f.sum())[None, None].to(x.dtype)
    w = conv.weight.to(x.dtype) if conv.weight is not None else None
    w_pad, f_pad = (w.shape[-1] // 2 if w is not None else 0), (len(fir) - 1) // 2
    if conv.fused_resample and conv.up and w is not None:
        x = F.conv_transpose2d(x, (f * 4).tile([x.shape[1], 1, 1, 1]), groups=x.shape[1], stride=2, padding=max(f_pad - w_pad, 0))
        x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
    elif conv.fused_resample and conv.down and w is not None:
        x = F.conv2d(x, w, padding=w_pad + f_pad)
        x = F.conv2d(x, f.tile([x.shape[1], 1, 1, 1]), groups=x.shape[1], stride=2)
    else:
        if conv.up:
            x = F.conv_transpose2d(x, (f * 4).tile([x.shape[1], 1, 1, 1]), groups=x.shape[1], stride=2, padding=f_pad)
        if conv.down:
            x = F.conv2d(x, f.tile([x.shape[1], 1, 1, 1]), groups=x.shape[1], stride=2, padding=f_pad)
        if w is not None:
            x = F.conv2d(x, w, padding=w_pad)
    return x + conv.bias.to(x.dtype).reshape(1, -1, 1, 1) if conv.bias is not None else x


class _AtenCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Names of the aten ops run below it."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def box_resampling_on_cpu(monkeypatch):
    """Pooling and copying on the CPU both ways, as on CUDA (the CPU convolves its downsampling: it is faster)."""
    monkeypatch.setitem(networks.BOX_RESAMPLE_MODES, 'cpu', ('up', 'down'))


def test_box_resampling_runs_pooling_and_copying_only_where_chosen(box_resampling_on_cpu):
    x = torch.randn(2, 4, 8, 8)
    for impl, expected in (('auto', {'avg_pool2d', 'upsample_nearest2d'}), ('reference', set())):
        with networks.resample_impl(impl), _AtenCalls() as calls:
            networks.Conv2d(4, 4, 0, up=True)(networks.Conv2d(4, 4, 0, down=True)(x))
        assert calls.names & {'avg_pool2d', 'upsample_nearest2d'} == expected
        assert ('convolution' in calls.names) == (impl == 'reference')
        with networks.resample_impl(impl), _AtenCalls() as calls:
            networks.Conv2d(4, 4, 0, down=True, resample_filter=[1, 3, 3, 1])(x)
        assert 'convolution' in calls.names and 'avg_pool2d' not in calls.names  # not a box filter


@pytest.mark.parametrize('fir', [[1, 1], [1, 3, 3, 1]])
@pytest.mark.parametrize('kernel', [0, 1, 3])
@pytest.mark.parametrize('mode', ['up', 'down', 'fused_up', 'fused_down'])
def test_conv2d_resampling_matches_reference_in_both_backends(fir, kernel, mode, box_resampling_on_cpu):
    """Every resampling path of Conv2d, fused ones included, gives NVlabs/edm's shapes and values, with the
    box filter's pooling / copying ('auto') and with the convolutions ('reference'), in float32 and channels-last."""
    torch.manual_seed(0)
    conv = networks.Conv2d(6, 6, kernel, up='up' in mode, down='down' in mode, fused_resample='fused' in mode,
                           resample_filter=fir, init_bias=1)
    assert conv.box_filter == (fir == [1, 1])
    x = torch.randn(2, 6, 8, 8)
    expected = _reference_conv2d(conv, x, fir)
    assert expected.shape[-1] == (16 if 'up' in mode else 4)
    # A 2x2 mean may round differently from the convolution's sum (a few float32 ulps), and a 3x3 convolution over
    # 6 channels after it sums 54 such values: 1e-5 bounds that; a wrong resampling is off by O(1).
    for impl in networks.RESAMPLE_IMPLS:
        with networks.resample_impl(impl):
            for layout in (torch.contiguous_format, torch.channels_last):
                out = conv(x.to(memory_format=layout))
                torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=impl)


def test_box_resampling_matches_convolutions_under_bf16_autocast_with_gradients(box_resampling_on_cpu):
    """DDPM++'s down and up blocks under bf16 autocast: pooling / copying give the convolutions' dtype, values and
    gradients (the products with 1/4 and 1 are exact), also for a float32 input that autocast would cast."""
    torch.manual_seed(0)
    down, up, aux = networks.Conv2d(8, 16, 3, down=True), networks.Conv2d(16, 8, 1, up=True), networks.Conv2d(3, 3, 0, down=True)
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    results = {}
    for impl in networks.RESAMPLE_IMPLS:
        with networks.resample_impl(impl), torch.autocast('cpu', dtype=torch.bfloat16):
            y = up(down(x))
            assert y.dtype == aux(torch.randn(2, 3, 8, 8)).dtype == torch.bfloat16
            results[impl] = (y, *torch.autograd.grad(y.float().square().sum(), [x, down.weight, up.weight]))
    for a, b in zip(results['auto'], results['reference']):  # at most a rare bf16 rounding apart (none on our CPUs)
        assert a.dtype == b.dtype and ((a.float() - b.float()).norm() / b.float().norm()).item() <= 2**-8


@pytest.mark.parametrize('mode', ['up', 'down'])
def test_edm2_resample_backends_agree(mode, box_resampling_on_cpu):
    x = torch.randn(2, 5, 8, 8)
    for fir in ([1, 1], (1, 1), [1, 3, 3, 1]):
        with networks.resample_impl('reference'):
            expected = networks_edm2.resample(x, fir, mode)
        eps = torch.finfo(torch.float32).eps  # a mean of 4 (or a copy) against the convolution's sum: a few ulps
        torch.testing.assert_close(networks_edm2.resample(x, fir, mode), expected, rtol=4 * eps, atol=4 * eps)
    # Eager convolutions reuse one filter tensor per filter, dtype and device, as the reference's const_like does
    assert networks_edm2._fir_kernel([1, 3, 3, 1], x).data_ptr() == networks_edm2._fir_kernel((1, 3, 3, 1), x).data_ptr()
    assert networks_edm2._fir_kernel([1, 3, 3, 1], x.double()).dtype == torch.float64


def test_reference_code_resamples_by_convolution_on_our_pickled_source(box_resampling_on_cpu):
    """Where the reference code executes networks.py stored in our pickles (perhaps under an older torch), its
    Conv2d resamples by the convolutions, as the reference's does, whatever BOX_RESAMPLE_MODES says."""
    import inspect
    from tests.test_pickle_compat import _exec_as_reference_would
    namespace = _exec_as_reference_would(inspect.getsource(networks), 'training.networks')
    assert not namespace['_IN_PROJECT']
    namespace['BOX_RESAMPLE_MODES']['cpu'] = ('up', 'down')
    x = torch.randn(2, 4, 8, 8)
    with _AtenCalls() as calls:
        namespace['Conv2d'](4, 4, 0, up=True)(namespace['Conv2d'](4, 4, 0, down=True)(x))
    assert 'convolution' in calls.names and not calls.names & {'avg_pool2d', 'upsample_nearest2d'}


def test_our_pickled_source_runs_under_a_torch_without_compiler_is_compiling(monkeypatch):
    """The reference code may run our pickled networks under torch < 2.3, which has no torch.compiler.is_compiling:
    attention and EDM2 resampling must not need it outside a compile."""
    import inspect
    from tests.test_pickle_compat import _exec_as_reference_would
    edm = _exec_as_reference_would(inspect.getsource(networks), 'training.networks')
    edm2 = _exec_as_reference_would(inspect.getsource(networks_edm2), 'training.networks_edm2')
    monkeypatch.delattr(torch.compiler, 'is_compiling')
    q = torch.randn(2, 256, 8)  # a DDPM++ head: the einsum path, not SDPA
    assert edm['attention'](q, q, q).shape == (2, 256, 8)
    x = torch.randn(2, 4, 8, 8)
    assert edm2['resample'](x, [1, 1], 'down').shape == (2, 4, 4, 4)
    assert edm2['resample'](x, [1, 3, 3, 1], 'up').shape == (2, 4, 16, 16)
    conv, ours = edm2['MPConv'](4, 4, [3, 3]).eval(), networks_edm2.MPConv(4, 4, [3, 3]).eval()
    ours.load_state_dict(conv.state_dict())
    with torch.no_grad():
        assert torch.equal(conv(x), ours(x))  # its weight derived in every call, as the reference


def test_resample_and_reference_kernel_switches():
    with pytest.raises(ValueError, match="'auto', 'reference'"):
        networks.set_resample_impl('pool')
    with networks.reference_kernels():
        assert (networks.get_attention_impl(), networks.get_resample_impl()) == ('reference', 'reference')
        assert networks._backend['weights'] == 'reference'  # EDM2's weights derived in every call
    assert (networks.get_attention_impl(), networks.get_resample_impl()) == ('auto', 'auto')
    assert networks._backend['weights'] == 'auto'
    assert networks.is_box_filter([1, 1]) and networks.is_box_filter((2.0, 2)) and not networks.is_box_filter([1, 2])
    assert not networks.is_box_filter([1, 3, 3, 1])

def test_label_dropout_draws_one_mask_per_image_as_the_reference():
    """NVlabs/edm draws torch.rand([x.shape[0], 1]) for label dropout, also for a broadcast [1, label_dim] label."""
    labels = torch.ones(1, 4)
    torch.manual_seed(1)
    expected = labels * (torch.rand([6, 1]) >= 0.5).to(labels.dtype)
    torch.manual_seed(1)
    dropped = networks._drop_labels(labels, 0.5, True, 6)
    assert dropped.shape == (6, 4) and torch.equal(dropped, expected) and 0 < dropped[:, 0].sum() < 6
    for model_type in ('SongUNet', 'DhariwalUNet'):
        net = tiny_edm(model_type, label_dropout=0.5).model.train()
        x, sigma, _ = tiny_inputs(batch=5)
        torch.manual_seed(0)
        net(x, sigma, labels)  # one label for the batch
        after_one = torch.rand(1)
        torch.manual_seed(0)
        torch.rand([5, 1])
        assert torch.equal(after_one, torch.rand(1))  # the forward drew five numbers: one per image


#----------------------------------------------------------------------------
# Preconditioning, training mode, dtypes, batching.

@pytest.mark.parametrize('precond', ['VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond'])
def test_preconditioners_run_and_round_sigma(precond):
    torch.manual_seed(0)
    net = getattr(networks, precond)(img_resolution=8, img_channels=3, label_dim=0, model_type='DhariwalUNet',
        model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[]).eval()
    assert getattr(networks, precond) is getattr(preconditioning, precond)
    assert 0 <= net.sigma_min < net.sigma_max
    x, sigma, _ = tiny_inputs(label_dim=0)
    with torch.no_grad():
        out = net(x, sigma)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    rounded = net.round_sigma(sigma)
    if precond == 'iDDPMPrecond':
        assert torch.all(net.u[:-1] > net.u[1:])  # u_0 > u_1 > ... > u_M = 0
        assert all(float(s) in net.u.tolist() for s in rounded)
        assert net.sigma_max == float(net.u[0]) and net.sigma_min == float(net.u[net.M - 1])
    else:
        assert torch.equal(rounded, sigma)
    if precond == 'VPPrecond':
        t = torch.tensor([1e-5, 0.1, 0.5, 1.0], dtype=torch.float64)
        torch.testing.assert_close(net.sigma_inv(net.sigma(t)), t)


def test_training_mode_backward_and_label_dropout():
    torch.manual_seed(0)
    for model_type in ('SongUNet', 'DhariwalUNet'):
        net = perturb_(tiny_edm(model_type, label_dropout=1, augment_dim=9)).train()
        x, sigma, labels = tiny_inputs()
        out = net(x, sigma, labels, augment_labels=torch.zeros([3, 9]))
        out.square().mean().backward()
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        with torch.no_grad():  # label dropout 1 in training == no label; dropout is 0 so nothing else is random
            torch.testing.assert_close(net(x, sigma, labels), net(x, sigma, torch.zeros_like(labels)))


def test_output_independent_of_batch_size():
    torch.manual_seed(0)
    net = perturb_(tiny_edm('SongUNet')).eval()
    x, sigma, labels = tiny_inputs(batch=3)
    with torch.no_grad():
        full = net(x, sigma, labels)
        single = torch.cat([net(x[i:i + 1], sigma[i:i + 1], labels[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(full, single, rtol=RTOL, atol=ATOL)


def test_bf16_autocast_runs_and_stays_close():
    torch.manual_seed(0)
    for model_type in ('SongUNet', 'DhariwalUNet'):
        net = perturb_(tiny_edm(model_type)).eval()
        x, sigma, labels = tiny_inputs()
        with torch.no_grad():
            expected = net(x, sigma, labels)
            with torch.autocast('cpu', dtype=torch.bfloat16):
                out = net(x, sigma, labels)
        assert out.dtype == torch.float32
        assert (out - expected).abs().max() < 0.05 * expected.abs().max()


def test_bad_inputs_raise_value_error_naming_the_shape():
    net = tiny_edm('SongUNet').eval()
    x, sigma, labels = tiny_inputs()
    with pytest.raises(ValueError, match=r'x must have shape \[N, 3, 8, 8\], got \[3, 1, 8, 8\]'):
        net(x[:, :1], sigma, labels)
    with pytest.raises(ValueError, match=r'\[N, 3, 8, 8\], got \[3, 3, 16, 16\]'):
        net(torch.zeros([3, 3, 16, 16]), sigma, labels)
    with pytest.raises(ValueError, match=r'class_labels must have shape \[N, 4\]'):
        net(x, sigma, torch.zeros([3, 5]))
    with pytest.raises(ValueError, match='class_labels has batch size 2'):
        net(x, sigma, labels[:2])
    with pytest.raises(ValueError, match='sigma must have 1 or N=3'):
        net(x, sigma[:2], labels)
    with pytest.raises(ValueError, match=r'class_labels is required'):
        net.model(x, sigma, None)
    with pytest.raises(ValueError, match='encoder_type'):
        networks.SongUNet(img_resolution=8, in_channels=3, out_channels=3, encoder_type='fancy')
    with pytest.raises(ValueError, match='model_type'):
        networks.EDMPrecond(img_resolution=8, img_channels=3, model_type='UNet')
    with pytest.raises(ValueError, match='init_mode'):
        networks.Linear(2, 2, init_mode='orthogonal')


def test_scalar_sigma_and_missing_labels_broadcast():
    net = tiny_edm('DhariwalUNet').eval()
    x, sigma, labels = tiny_inputs()
    with torch.no_grad():
        scalar = net(x, torch.tensor(0.7))
        per_sample = net(x, torch.full([3], 0.7), torch.zeros([3, 4]))
    torch.testing.assert_close(scalar, per_sample, rtol=RTOL, atol=ATOL)

#----------------------------------------------------------------------------
# Persistence and torch.compile.

def test_persistence_pickle_round_trip(tmp_path):
    torch.manual_seed(0)
    net = perturb_(tiny_edm('SongUNet')).eval()
    x, sigma, labels = tiny_inputs()
    with torch.no_grad():
        expected = net(x, sigma, labels)
    path = tmp_path / 'net.pkl'
    persistence.save_pickle(dict(ema=net), path)
    for trust in (False, True):
        loaded = persistence.load_pickle(path, trust=trust)['ema']
        assert type(loaded).__name__ == 'EDMPrecond' and persistence.is_persistent(loaded)
        assert dict(loaded.init_kwargs) == dict(net.init_kwargs)
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(x, sigma, labels), expected, rtol=0, atol=0)
    clone = pickle.loads(pickle.dumps(net))
    assert clone.state_dict().keys() == net.state_dict().keys()


def test_compile_fullgraph_captures_without_graph_breaks():
    torch.manual_seed(0)
    net = perturb_(tiny_edm('SongUNet')).eval()
    x, sigma, labels = tiny_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend='eager')
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, sigma, labels), net(x, sigma, labels), rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    torch.manual_seed(0)
    net = perturb_(tiny_edm('DhariwalUNet')).eval()
    x, sigma, labels = tiny_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, sigma, labels), net(x, sigma, labels), rtol=1e-3, atol=1e-4)
