"""Float32 attention logits q^T k of bf16 q and k, for EDM's float32-weight attention under bf16 autocast.

EDM computes the logits of its wide heads in float32, einsum(q.float(), k.float()), so that the softmax sees
float32 logits; its fp16 path does so by explicit casts. Under autocast that einsum runs as a bf16 GEMM with bf16
output: the casts are undone and the logits are rounded to bf16. When q and k hold bf16 values, every product of
two of them is exact in float32, so a bf16 GEMM that accumulates in float32 and returns float32
(torch.bmm(out_dtype=torch.float32), CUDA) gives the float32 logits at the speed of the bf16 GEMM. The gradients of
q and k are bf16 GEMMs of the float32 logit gradient rounded to bf16, as autocast computes them for every matmul.

networks.py reaches this module through a guarded import: where the reference code runs the source stored in our
pickles, the module does not exist and the einsum runs. A custom op (not an autograd.Function) keeps compiled
graphs in AOTAutograd's cache.
"""

import warnings

import torch

_fast_gemm = {'ok': True}  # False once torch has refused a bf16 GEMM with float32 output on this device


def _logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    q_t = q.transpose(1, 2)
    with torch.autocast(device_type=q.device.type, enabled=False):  # the op runs under the caller's autocast
        if q.device.type != 'cuda':
            return torch.bmm(q_t.float(), k.float())
        if _fast_gemm['ok']:
            try:
                return torch.bmm(q_t, k, out_dtype=torch.float32)
            except (RuntimeError, TypeError) as err:  # torch without bmm(out_dtype=) for this device or dtype
                _fast_gemm['ok'] = False
                warnings.warn(f'attention logits fall back to bf16 GEMMs with bf16 output: {str(err).splitlines()[0]}')
        return torch.bmm(q_t, k).float()  # as autocast ran the einsum; float32 FMA GEMMs would be several times slower


@torch.library.custom_op('edm::attention_logits', mutates_args=())
def attention_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Float32 logits [B, Lq, Lk] = q^T k of q [B, C, Lq] and k [B, C, Lk] (EDM's AttentionOp, before the softmax)."""
    return _logits(q, k)


@attention_logits.register_fake
def _attention_logits_shape(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[2], k.shape[2]), dtype=torch.float32)


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_logits: torch.Tensor):
    q, k = ctx.saved_tensors
    grad = grad_logits.to(q.dtype)
    return torch.bmm(k, grad.transpose(1, 2)), torch.bmm(q, grad)


attention_logits.register_autograd(_backward, setup_context=_save_inputs)


def supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether attention_logits gives the float32 logits of these inputs as the einsum does (bf16, 3-D)."""
    return q.dtype == torch.bfloat16 and k.dtype == torch.bfloat16 and q.ndim == 3 and k.ndim == 3
