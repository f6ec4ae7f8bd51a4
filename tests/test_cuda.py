"""CUDA-only paths: fp16 and bf16, SDPA vs reference attention, channels-last, compile, fused Adam.

These need a CUDA GPU and skip on CPU-only machines (the CPU equivalents are in test_networks.py
and test_fastpaths.py); the GPU validation run executes them.
"""

import copy

import pytest
import torch

from training import networks, networks_edm2
from training.networks import EDMPrecond

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (runs in the GPU validation)')

DEVICE = torch.device('cuda')


def ddpmpp(**kwargs):
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=16, img_channels=3, label_dim=10, model_type='SongUNet', embedding_type='positional',
                     encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                     model_channels=32, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0, **kwargs)
    return net.to(DEVICE).eval()


def edm2(**kwargs):
    torch.manual_seed(0)
    net = networks_edm2.Precond(img_resolution=16, img_channels=4, label_dim=10, model_channels=32,
                                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], **kwargs)
    return net.to(DEVICE).eval()


def inputs(channels=3, n=8):
    g = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(n, channels, 16, 16, device=DEVICE, generator=g)
    sigma = torch.exp(torch.randn(n, device=DEVICE, generator=g))
    labels = torch.nn.functional.one_hot(torch.arange(n, device=DEVICE) % 10, 10).float()
    return x, sigma, labels


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def test_fp16_reference_path_close_to_fp32():
    x, sigma, labels = inputs()
    ref = ddpmpp()(x, sigma, labels)
    half = ddpmpp(use_fp16=True)(x, sigma, labels)
    assert half.dtype == torch.float32  # preconditioning returns fp32
    assert rel_err(half, ref) < 1e-2


@torch.no_grad()
@pytest.mark.parametrize('make, channels', [(ddpmpp, 3), (edm2, 4)])
def test_bf16_autocast_close_to_fp32(make, channels):
    net = make()
    x, sigma, labels = inputs(channels)
    ref = net(x, sigma, labels)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out = net(x, sigma, labels)
    assert rel_err(out, ref) < 3e-2


@torch.no_grad()
@pytest.mark.parametrize('make, channels', [(ddpmpp, 3), (edm2, 4)])
def test_sdpa_matches_reference_attention(make, channels):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    net = make()
    x, sigma, labels = inputs(channels)
    with networks.attention_impl('reference'):
        ref = net(x, sigma, labels)
    with networks.attention_impl('sdpa'):
        out = net(x, sigma, labels)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize('make, channels', [(ddpmpp, 3), (edm2, 4)])
@pytest.mark.parametrize('compiled', [False, True])
def test_box_resampling_matches_reference_convolutions_in_bf16_channels_last(make, channels, compiled):
    """Pooling / copying (resample 'auto') against cuDNN's depthwise convolutions: bf16 autocast, channels-last,
    outputs and weight gradients, eager and compiled."""
    torch.backends.cudnn.allow_tf32 = False
    base = make().train().to(memory_format=torch.channels_last)
    with torch.no_grad():
        for gain in [p for p in base.parameters() if p.ndim == 0]:  # EDM2's gains start at 0 (a zero output)
            gain.fill_(0.5)
    x, sigma, labels = inputs(channels)
    results = {}
    for impl in networks.RESAMPLE_IMPLS:
        torch._dynamo.reset()
        net = copy.deepcopy(base)  # EDM2's forced weight normalization rewrites the weights in a training forward
        call = torch.compile(net) if compiled else net
        with networks.resample_impl(impl), torch.autocast('cuda', dtype=torch.bfloat16):
            out = call(x.to(memory_format=torch.channels_last), sigma, labels)
            grads = torch.autograd.grad(out.float().square().mean(), list(net.parameters()), allow_unused=True)
        results[impl] = [out] + [g for g in grads if g is not None]
    for a, b in zip(results['auto'], results['reference']):
        assert (a.float() - b.float()).norm() <= 1e-2 * b.float().norm()  # zero gradients compare equal too


@torch.no_grad()
def test_channels_last_matches():
    torch.backends.cudnn.allow_tf32 = False
    net = ddpmpp()
    x, sigma, labels = inputs()
    ref = net(x, sigma, labels)
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    out = net_cl(x.to(memory_format=torch.channels_last), sigma, labels)
    assert rel_err(out, ref) < 1e-5


def test_compile_matches_eager():
    net = edm2()
    x, sigma, labels = inputs(4)
    with torch.no_grad():
        ref = net(x, sigma, labels)
        out = torch.compile(net)(x, sigma, labels)
    assert rel_err(out, ref) < 1e-3


def test_fused_adam_matches_foreach():
    results = []
    for fused in (False, True):
        net = edm2().train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=fused, foreach=not fused)
        x, sigma, labels = inputs(4)
        for _ in range(3):
            loss = (net(x, sigma, labels) - x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        results.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    assert rel_err(results[1], results[0]) < 1e-4


def test_training_loop_bf16_on_cuda(tmp_path):
    import numpy as np
    import PIL.Image
    from training import training_loop as tl
    from training.presets import build_config
    data = tmp_path / 'data'
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(32):
        PIL.Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(data / f'{i:05d}.png')
    for preset in ('tiny-edm', 'tiny-edm2'):
        cfg = build_config(preset, data=str(data), bf16=True, device='cuda', total_nimg=128, status_nimg=64)
        result = tl.training_loop(cfg, str(tmp_path / preset), DEVICE)
        assert result.cur_nimg >= 128


@torch.no_grad()
def test_overlapped_guidance_matches_sequential():
    from training.guidance import OverlappedGuidance
    net = edm2()
    torch.manual_seed(5)
    gnet = networks_edm2.Precond(img_resolution=16, img_channels=4, label_dim=10, model_channels=16,
                                 channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]).to(DEVICE).eval()
    x, sigma, labels = inputs(4)
    expected = gnet(x, sigma, labels).lerp(net(x, sigma, labels), 2.5)
    out = OverlappedGuidance(net, gnet, 2.5)(x, sigma, labels)
    torch.cuda.synchronize()
    assert rel_err(out, expected) < 1e-6


def test_fid_setup_device_on_cuda():
    # fid.py once passed a bare 'cuda' to torch.cuda.set_device(), which refuses it.
    import fid
    for name in ('cuda', 'auto'):
        device = fid.setup_device(name)
        assert device.type == 'cuda' and device.index == torch.cuda.current_device()
    assert not torch.backends.cuda.matmul.allow_tf32


class _TinyFeatures(torch.nn.Module):
    """Stand-in for the 87 MB Inception file: [N, 3, 299, 299] floats -> [N, 2048], like default_1.pt."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 8 * 8, 2048)

    def forward(self, x):
        return torch.relu(self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)))


def test_scripts_end_to_end_on_cuda(tmp_path):
    # The scripts as a user runs them, on the GPU: the quickstart (dataset_tool -> train -> generate ->
    # fid ref + calc), then an EDM2 run sampled with guidance, torchrun generate.py and fid.py gen.
    import glob
    import json
    import os
    import re
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    torch.manual_seed(0)
    detector = tmp_path / 'tiny-detector.pt'
    torch.jit.save(torch.jit.script(_TinyFeatures()), str(detector))
    env = dict(os.environ, EDM_FID_DETECTOR=str(detector))

    def script(*args, timeout=600):
        cmd = [sys.executable] + [str(a) for a in args]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, ' '.join(cmd) + '\n' + proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    qs = tmp_path / 'qs'
    script(os.path.join(root, 'quickstart.py'), f'--outdir={qs}', '--kimg=1', '--num=8', '--device=cuda')
    records = [json.loads(line) for line in (qs / 'metrics.jsonl').read_text().splitlines()]
    assert any(r.get('metric') == 'fid' and r['value'] >= 0 for r in records)

    run = tmp_path / 'edm2-run'
    script('train.py', '--preset=tiny-edm2', f'--data={qs / "dataset-16x16.zip"}', f'--outdir={run}', '--device=cuda')
    snapshot = sorted(glob.glob(str(run / '**' / 'network-snapshot-*.pkl'), recursive=True))[-1]
    script('generate.py', f'--net={snapshot}', f'--gnet={snapshot}', '--guidance=1.5', '--seeds=0-7', '--steps=8',
           f'--outdir={tmp_path / "guided"}', '--device=cuda', '--precision=bf16', '--batched-guidance')
    assert len(glob.glob(str(tmp_path / 'guided' / '*.png'))) == 8
    script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1', 'generate.py', f'--net={snapshot}',
           '--seeds=0-7', '--steps=8', f'--outdir={tmp_path / "torchrun"}', '--device=cuda')
    assert len(glob.glob(str(tmp_path / 'torchrun' / '*.png'))) == 8
    script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1', 'train.py', '--preset=tiny-edm',
           f'--data={qs / "dataset-16x16.zip"}', f'--outdir={tmp_path / "torchrun-train"}', '--duration=0.000256',
           '--device=cuda', '--workers=2')
    assert glob.glob(str(tmp_path / 'torchrun-train' / '**' / 'network-snapshot-*.pkl'), recursive=True)
    # '--' keeps torchrun from reading fid.py's --num as an abbreviation of its own --numa-binding.
    script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1', '--', 'fid.py', 'calc',
           f'--images={tmp_path / "torchrun"}', f'--ref={qs / "dataset-ref.npz"}', '--num=8', '--device=cuda')
    out = script('fid.py', 'gen', f'--net={snapshot}', f'--ref={qs / "dataset-ref.npz"}', '--num=8', '--steps=8', '--device=cuda')
    assert re.search(r'^fid = \d', out, re.MULTILINE), out[-2000:]


def test_encode_precision_sets_tf32_as_the_reference_does():
    """fp32 turns cuDNN's TF32 off; tf32 (the default) keeps torch's default (on), under which the reference encoder
    runs; either way cuDNN measures its algorithms (one shape per batch)."""
    import inspect
    from training import dataset_encode
    assert inspect.signature(dataset_encode.encode_dataset).parameters['precision'].default == 'tf32'
    for precision, tf32 in (('fp32', False), ('tf32', True)):
        torch.backends.cudnn.benchmark = False
        dataset_encode._setup('cuda', precision)
        assert torch.backends.cudnn.allow_tf32 == tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.benchmark


def test_compiled_training_graph_with_channels_last_layout_matches_eager():
    """train.py --compile on CUDA forces inductor's channels-last layout for EDM's networks
    (speed.train_compile_options); outputs and gradients stay those of the eager network."""
    from training import speed
    net, ref = ddpmpp().train(), ddpmpp().train()
    options = speed.train_compile_options(net, DEVICE)
    assert options == dict(force_layout_optimization=True)
    x, sigma, labels = inputs()
    torch.manual_seed(2)
    out = speed.compile_network(net, options=options)(x, sigma, labels)
    torch.manual_seed(2)
    out_ref = ref(x, sigma, labels)
    torch.testing.assert_close(out, out_ref, rtol=1e-3, atol=1e-3)
    out.square().mean().backward()
    out_ref.square().mean().backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-2, atol=1e-3)


def test_compiled_generation_autotunes_convolutions():
    from training import sampling
    torch.backends.cudnn.benchmark = False
    batches = sampling.generate_images(ddpmpp(), seeds=[0, 1], batch_size=2, sampler='edm', num_steps=2, compile=True)
    images = [batch.images for batch in batches]
    assert torch.backends.cudnn.benchmark and images[0].shape == (2, 3, 16, 16)


def test_bf16_attention_logits_come_from_a_bf16_gemm_with_float32_output():
    """training/attention_ops.py: torch.bmm(out_dtype=float32) on bf16 q, k gives the float32 einsum's logits,
    with no fallback to bf16 logits on this torch."""
    from training import attention_ops
    g = torch.Generator(device=DEVICE).manual_seed(0)
    qkv = torch.randn(4, 256, 3, 64, device=DEVICE, generator=g).bfloat16().requires_grad_()
    q, k, _v = qkv.unbind(2)  # strided views, as UNetBlock hands them over
    with torch.autocast('cuda', dtype=torch.bfloat16):
        logits = attention_ops.attention_logits(q, k)
    assert logits.dtype == torch.float32 and attention_ops._fast_gemm['ok']
    expected = torch.einsum('ncq,nck->nqk', q.float(), k.float())
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)
    logits.square().sum().backward()
    assert qkv.grad.dtype == torch.bfloat16 and torch.isfinite(qkv.grad.float()).all()


def test_compile_async_switches_to_a_cache_hit_on_cuda(tmp_path, monkeypatch):
    """train.py --compile-async on the GPU: the child compiles with Triton, the run's own compile is a cache hit."""
    import numpy as np
    from torch._dynamo.utils import counters
    from training import async_compile, presets
    from training import training_loop as tl
    from tests.test_train import cifar_mini, write_dataset
    images, labels = cifar_mini()
    small = images[:32].reshape(32, 8, 4, 8, 4, 3).mean(axis=(2, 4)).astype(np.uint8)
    data = write_dataset(tmp_path / 'data', small, labels[:32])
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path / 'inductor'))
    poll = async_compile.AsyncCompile.poll
    monkeypatch.setattr(async_compile.AsyncCompile, 'poll', lambda self: self.process.wait() is None or poll(self))
    torch._dynamo.reset()
    counters.clear()
    cfg = presets.build_config('tiny-edm', data=data, total_nimg=48, batch_size=16, status_nimg=16, snapshot_nimg=None,
                               fast=True, compile_async=True, device='cuda')
    result = tl.training_loop(cfg, str(tmp_path / 'run'), DEVICE)
    assert result.cur_nimg == 48
    assert 'switching to the compiled network' in (tmp_path / 'run' / 'log.txt').read_text()
    assert counters['aot_autograd'].get('autograd_cache_hit') == 1, dict(counters['aot_autograd'])
