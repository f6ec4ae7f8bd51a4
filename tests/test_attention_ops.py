"""training/attention_ops.py: float32 attention logits of bf16 q, k (EDM's wide heads under bf16 autocast)."""

import inspect

import pytest
import torch

from training import attention_ops, networks, speed
from tests.test_pickle_compat import _exec_as_reference_would


def _qkv(channels=256, length=20, batch=3, dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, channels, length, generator=generator).to(dtype) for _ in range(3)]


def test_logits_are_the_float32_einsum_of_the_bf16_values():
    q, k, _ = _qkv()
    logits = attention_ops.attention_logits(q, k)
    assert logits.dtype == torch.float32
    expected = torch.einsum('ncq,nck->nqk', q.float(), k.float())
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-5)


def test_logit_gradients_are_the_float32_gradients_rounded_to_bf16():
    """The backward runs bf16 GEMMs on the float32 logit gradient rounded to bf16, as autocast does for matmuls."""
    q, k, _ = _qkv()
    q.requires_grad_(), k.requires_grad_()
    grad_logits = torch.randn(3, 20, 20, generator=torch.Generator().manual_seed(1))
    attention_ops.attention_logits(q, k).backward(grad_logits)
    q32, k32 = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    torch.einsum('ncq,nck->nqk', q32, k32).backward(grad_logits)
    for ours, ref in ((q.grad, q32.grad), (k.grad, k32.grad)):
        assert ours.dtype == torch.bfloat16
        bound = 2 ** -7 * ref.abs().max().item()  # two bf16 roundings: the logit gradient and the result
        torch.testing.assert_close(ours.float(), ref, rtol=0, atol=bound)


def test_bf16_attention_keeps_float32_logits_under_autocast():
    """Under autocast the einsum of float32-cast q, k runs as a bf16 GEMM with bf16 logits. 'auto' computes them in
    float32 as EDM's attention intends; 'reference' keeps the einsum."""
    q, k, v = _qkv()
    scale = 1 / 16  # 1 / sqrt(256 channels)
    weights = torch.einsum('ncq,nck->nqk', q.float(), (k * scale).float()).softmax(dim=-1).to(torch.bfloat16)
    expected = torch.einsum('nqk,nck->ncq', weights, v)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with networks.attention_impl('auto'):
            out = networks.attention(q, k, v)
        with networks.attention_impl('reference'):
            out_einsum = networks.attention(q, k, v)
    assert torch.equal(out, expected)
    assert not torch.equal(out_einsum, expected)  # bf16 logits: what the op exists to avoid


def test_float32_and_fp16_attention_keep_their_paths():
    for dtype in (torch.float32, torch.float16):
        q, k, v = _qkv(dtype=dtype)
        assert not attention_ops.supports(q, k)
        with networks.attention_impl('auto'):
            out = networks.attention(q, k, v)
        with networks.attention_impl('reference'):
            assert torch.equal(out, networks.attention(q, k, v))


def test_compiled_network_uses_the_op_and_stays_in_the_compile_cache(monkeypatch):
    """A custom op rather than an autograd.Function: AOTAutograd's cache keeps graphs that call it."""
    from torch._functorch._aot_autograd.autograd_cache import check_cacheable
    monkeypatch.setattr(networks, 'SDPA_MAX_HEAD_CHANNELS', 0)  # the tiny net's 32-channel heads take the einsum
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=16, img_channels=3, label_dim=4, model_type='SongUNet', model_channels=16,
                              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]).train()
    speed.plain_scalars(net)
    speed.cacheable_autocast()
    graphs = []
    torch._dynamo.reset()
    compiled = torch.compile(net, backend=lambda gm, _inputs: graphs.append(gm) or gm.forward, dynamic=False)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        compiled(torch.randn(2, 3, 16, 16), torch.ones(2), torch.eye(4)[:2]).float().sum().backward()
    assert len(graphs) == 1
    targets = [str(node.target) for node in graphs[0].graph.nodes]
    assert any('attention_logits' in t for t in targets)
    check_cacheable(graphs[0])


def test_inductor_graph_with_the_op_is_a_cache_hit_on_the_second_start(tmp_path, monkeypatch):
    if speed.compiler_missing('cpu'):
        pytest.skip(f'inductor needs a C++ compiler here: {speed.compiler_missing("cpu")}')
    from torch._dynamo.utils import counters
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path))
    speed.cacheable_autocast()
    torch.manual_seed(0)
    qkv = torch.nn.Conv1d(256, 768, 1)
    x = torch.randn(2, 256, 6)

    def attend(x):
        return networks.attention(*qkv(x).chunk(3, dim=1))
    for _attempt in range(2):
        torch._dynamo.reset()
        counters.clear()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = torch.compile(attend, backend='inductor')(x)
        out.float().sum().backward()
    assert counters['aot_autograd'].get('autograd_cache_hit') == 1, dict(counters['aot_autograd'])
    assert counters['inductor'].get('fxgraph_cache_hit') == 2, dict(counters['inductor'])


def test_reference_code_runs_the_einsum_on_our_pickled_source():
    """Where the reference code executes networks.py stored in our pickles, training.attention_ops is missing."""
    namespace = _exec_as_reference_would(inspect.getsource(networks), 'training.networks')
    assert namespace['_attention_ops'] is None
    q, k, v = _qkv()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert namespace['attention'](q, k, v).shape == (3, 256, 20)
