"""Torch's fused attention kernel, with its log-sum-exp and an exact backward.

The public `torch.nn.functional.scaled_dot_product_attention` returns only the output, but
LongNet's merge (Eq. 10) needs each branch's log-sum-exp (LSE) too. The fused kernels compute
it anyway; we call them through their ATen ops:

- CPU:  `_scaled_dot_product_flash_attention_for_cpu` (float64, float32, bfloat16, float16);
- CUDA: `_scaled_dot_product_efficient_attention` (float32, float16, bfloat16). Written with
  care but not run here: the project's machines have no GPU.

Both kernels take any strides except on the last dim, which is what lets the fast path pass
strided views of q, k, v without copying them.

The backward. Write x_ij for the scaled scores, prob_ij = softmax_j(x_ij) for the attention
probabilities, and `Delta_i = dO_i . O_i`. The kernels' backward computes
`dx_ij = prob_ij (dO_i . v_j - Delta_i)` and uses the `out` it is given only to form Delta. A
gradient `dlse_i` flowing into the LSE adds `prob_ij dlse_i` to dx (since d lse_i / d x_ij = prob_ij),
i.e. it replaces Delta_i by `Delta_i - dlse_i`.
`attention_backward` folds dlse into the kernel call by appending one column:
q' = [q, 0], k' = [k, 0], v' = [v, 0], out' = [O, -dlse], dO' = [dO, 1] gives
dO'.out' = Delta - dlse and dO'.v'_j = dO.v_j, so one kernel call is exact.

Letters: the package legend (`longnet_ref/__init__.py`).
"""

from __future__ import annotations

import torch


def attention_forward(q, k, v, causal: bool, scale: float):
    """Fused attention of 4-D (B, H, N, D) tensors: returns `(out, lse, saved)`.

    `lse` is (B, H, N) (float32 for half inputs); `saved` is what `attention_backward` needs.
    """
    if q.device.type == "cuda":
        if q.dtype == torch.float64:
            raise ValueError(
                "the fast path has no float64 CUDA kernel; use implementation='readable' for float64 on CUDA"
            )
        out, lse_raw, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=scale
        )
        # Some versions pad the LSE's last dim to a multiple of 32: keep the raw one for
        # the backward, hand out the first N entries.
        return out, lse_raw[..., : q.shape[2]], (lse_raw, seed, offset)
    if q.device.type != "cpu":
        raise ValueError(f"the fast path supports cpu and cuda tensors, got device {q.device}")
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse, (lse,)


def _kernel_backward(dout, q, k, v, out, saved, causal: bool, scale: float):
    if q.device.type == "cuda":
        lse_raw, seed, offset = saved
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse_raw, seed, offset, 0.0, [True, True, True, False], causal, scale=scale
        )
        return dq, dk, dv
    (lse,) = saved
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale
    )


def attention_backward(dout, q, k, v, out, saved, causal: bool, scale: float, dlse=None):
    """Gradients (dq, dk, dv) of fused attention, given dout (B, H, N, D) and optionally dlse (B, H, N).

    `out` must be the tensor whose dot product with `dout` gives Delta (see the module
    docstring): normally the attention's own output. The mixture's backward passes the
    merged output instead, which folds the merge weights' gradient in for free.
    """
    dout = dout.to(q.dtype).contiguous()
    out = out.to(q.dtype).contiguous()
    if dlse is None:
        return _kernel_backward(dout, q, k, v, out, saved, causal, scale)

    # One extra column carries the LSE gradient through the kernel (module docstring).
    def widen(x, column):  # (B, H, N, D) -> (B, H, N, D + 1)
        return torch.cat([x, column.to(x.dtype)], dim=-1)

    def zeros(x):  # (B, H, N, 1), N of x: keys may be more or fewer than queries
        return x.new_zeros(*x.shape[:-1], 1)

    dq, dk, dv = _kernel_backward(
        widen(dout, torch.ones_like(zeros(q))),
        widen(q, zeros(q)),
        widen(k, zeros(k)),
        widen(v, zeros(v)),
        widen(out, -dlse.unsqueeze(-1)),
        saved,
        causal,
        scale,
    )
    return dq[..., :-1], dk[..., :-1], dv[..., :-1]


class FusedAttention(torch.autograd.Function):
    """(q, k, v) -> (out, lse) through the fused kernel, differentiable in both outputs."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):
        # Unused outputs then get a None gradient instead of zeros, so an unused LSE costs nothing.
        ctx.set_materialize_grads(False)
        out, lse, saved = attention_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, *saved)
        ctx.causal, ctx.scale = causal, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, *saved = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = attention_backward(dout, q, k, v, out, saved, ctx.causal, ctx.scale, dlse=dlse)
        return dq, dk, dv, None, None


def fused_attention(q, k, v, *, causal: bool = False, scale: float | None = None):
    """Fused attention with its log-sum-exp: `(out (B, H, N, D), lse (B, H, N))`, differentiable in both."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return FusedAttention.apply(q, k, v, causal, scale)
