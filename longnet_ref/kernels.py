"""Torch's fused attention kernel, with its log-sum-exp and an exact backward.

The public `torch.nn.functional.scaled_dot_product_attention` returns only the output, but
LongNet's merge (Eq. 10) needs each branch's log-sum-exp (LSE) too. The fused kernels compute
it anyway; we call them through their ATen ops:

- CPU:  `_scaled_dot_product_flash_attention_for_cpu` (float64, float32, bfloat16, float16);
- CUDA: `_scaled_dot_product_efficient_attention` (float32, float16, bfloat16). Written with
  care but not yet run on a GPU (`bash .ci/gpu` checks it where there is one). Its recent builds
  take only aligned head dims, so narrower or odd ones are zero-padded (`head_dim_multiple`).

Both kernels take any strides except on the last dim, which is what lets the fast path pass
strided views of q, k, v without copying them. They read the last dim as if its stride were 1
whatever it is (channels-first features `(B, H, D, N).transpose(-1, -2)` came out wrong by up
to 3.4, silently), so `_unit_last_stride` copies exactly the inputs whose last stride is not 1.

The backward. Write x_ij for the scaled scores, prob_ij = softmax_j(x_ij) for the attention
probabilities, and `Delta_i = dO_i . O_i`. The kernels' backward computes
`dx_ij = prob_ij (dO_i . v_j - Delta_i)` and uses the `out` it is given only to form Delta. A
gradient `dlse_i` flowing into the LSE adds `prob_ij dlse_i` to dx (since d lse_i / d x_ij = prob_ij),
i.e. it replaces Delta_i by `Delta_i - dlse_i`.
`attention_backward` folds dlse into the kernel call by appending one column:
q' = [q, 0], k' = [k, 0], v' = [v, 0], out' = [O, -dlse], dO' = [dO, 1] gives
dO'.out' = Delta - dlse and dO'.v'_j = dO.v_j, so one kernel call is exact.

The ops are private: torch 2.3 is the oldest release with both (2.1 and 2.2 lack the CPU one).
`fused_kernel_available` says whether this torch has them; without them `mixture.pick_implementation`
runs the readable path instead (one warning), and the kernel calls here raise a RuntimeError
naming the torch version (`require_fused_kernel`).

Letters: the package legend (`longnet_ref/__init__.py`).
"""

from __future__ import annotations

import math

import torch

from .attention import dense_attention, lse_dtype, softmax_scale
from .checks import check_flag, check_key_padding_mask, check_qkv

# The ATen ops the kernels below call, forward and backward, by device type.
FUSED_OPS = {
    "cpu": ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"),
    "cuda": ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward"),
}
OLDEST_TORCH = "2.3"  # the oldest release with every op of FUSED_OPS (pyproject's floor)


def fused_kernel_available(device_type: str = "cpu") -> bool:
    """Whether this torch has the fused ops the fast path calls on `device_type` ("cpu" or "cuda"; other
    device types have no ops to miss: `attention_forward` refuses them by name)."""
    return all(hasattr(torch.ops.aten, name) for name in FUSED_OPS.get(device_type, ()))


def require_fused_kernel(device_type: str) -> None:
    """A clear RuntimeError, naming the torch version, when this torch lacks the fused ops."""
    if device_type in FUSED_OPS and not fused_kernel_available(device_type):
        missing = [name for name in FUSED_OPS[device_type] if not hasattr(torch.ops.aten, name)]
        raise RuntimeError(
            f"torch {torch.__version__} has no fused attention op torch.ops.aten.{missing[0]}, which the fast "
            f"path calls on {device_type}: it needs torch >= {OLDEST_TORCH}. Upgrade torch, or use "
            "implementation='readable' (dilated_attention falls back to it by itself)"
        )


def head_dim_multiple(x) -> int:
    """The head dims the kernel accepts are multiples of this: 1 on the CPU (any D). CUDA's
    memory-efficient kernels are built only for aligned head dims on recent GPUs (sm80+: multiples
    of 4 in float32, 8 in half precision), so narrower or odd ones are zero-padded up to it."""
    if x.device.type != "cuda":
        return 1
    return 4 if x.dtype == torch.float32 else 8


def _padded_width(width, multiple):
    return -(-width // multiple) * multiple  # the next multiple of `multiple`, >= width


def _widen(x, width, column=None):
    """(B, H, N, D) -> (B, H, N, width): zero columns after D, and `column` (B, H, N) at D if given.

    Zero columns in q, k, v, out and dout change no dot product, and the scale is passed to the
    kernels explicitly, so attention and gradients are unchanged (tests/test_kernels.py)."""
    D = x.shape[-1]
    if width == D:
        return x
    # A fresh tensor with standard strides: F.pad may keep odd strides of size-1 dims, and the
    # kernels read the last dim as if its stride were 1 (D = 1 inputs came out wrong).
    wide = x.new_zeros(*x.shape[:-1], width)
    wide[..., :D] = x
    if column is not None:
        wide[..., D] = column.to(x.dtype)
    return wide


def _fresh_copy(x):
    """A copy with standard strides. Not x.contiguous(): with D = 1 a tensor counts as contiguous
    whatever its last stride, which the kernels read as 1."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)


def _standard_strides(x):
    """x when it is contiguous with last stride 1, else a fresh copy (dout and out)."""
    return x if x.is_contiguous() and x.stride(-1) == 1 else _fresh_copy(x)


def _unit_last_stride(x):
    """x itself when its last dim has stride 1 (what the kernels assume), else a fresh copy."""
    return x if x.stride(-1) == 1 else _fresh_copy(x)


def nan_unless_finite(inputs, batch_dims=None):
    """(B,): 0 for each batch element whose inputs are all finite, else NaN; add it to the outputs.

    The fused CPU kernel turns a NaN in q, k or v into rows of zeros (and lse 0), silently, where
    dense attention gives NaN: a broken model would train on plausible numbers. Per batch element
    and tensor, the largest and the smallest element (amax, amin: read in place, no copy, and NaN
    whenever an element is NaN) are both finite exactly when every element is, and x * 0 is 0 for
    a finite x and NaN for inf or NaN. No device sync, no bool copies, no overflow of a sum.
    Per batch element, so one bad sequence does not poison the others. `batch_dims`: each
    tensor's batch dim (0). (A float64 sum did the same at 17x the cost: 52 ms against 3 ms for
    one (1, 8, 16384, 64) fp32 tensor on one core, 10 % of a causal forward at N = 16384.)
    """
    total = 0
    with torch.no_grad():
        for x, dim in zip(inputs, batch_dims or [0] * len(inputs)):
            others = [d for d in range(x.dim()) if d != dim]
            if not others:
                extremes = (x,)  # (B,) itself
            elif x.numel() == 0:
                extremes = (x.new_zeros(x.shape[dim]),)  # nothing to check (B may be 0 too)
            else:
                extremes = (x.amax(dim=others), x.amin(dim=others))  # (B,) each
            for extreme in extremes:
                total = total + extreme.float() * 0
    return total * 0  # a Python 0 when there are no inputs


def no_rows_or_keys(q, k):
    """B, H or Nq is 0 (no query row) or Nk is 0 (no key): shapes the kernels must not see."""
    B, H, Nq, _ = q.shape
    return B * H * Nq == 0 or k.shape[2] == 0


def key_bias(key_mask, q):
    """The additive bias of a key mask: (B, H, Nk) bool, True = ignore -> (B, H, 1, Nk) 0 / -inf in q's
    dtype, broadcast over the query rows by the kernels (no Nq x Nk mask is built)."""
    if key_mask is None:
        return None
    Nk = key_mask.shape[-1]
    if q.device.type == "cuda":  # the CUDA kernel wants the bias's rows 16-aligned: pad, then view
        wide = q.new_zeros(*key_mask.shape[:-1], 1, _padded_width(Nk, 16))
        wide[..., :Nk].masked_fill_(key_mask[..., None, :], -math.inf)
        return wide[..., :Nk].expand(*key_mask.shape[:-1], q.shape[2], Nk)
    return q.new_zeros(*key_mask.shape[:-1], 1, Nk).masked_fill_(key_mask[..., None, :], -math.inf)


def rows_with_a_key(key_mask, causal: bool):
    """(B, H, Nq or 1) bool: the query rows that keep at least one key under `key_mask` (and causality)."""
    visible = ~key_mask
    return visible.cumsum(-1) > 0 if causal else visible.any(-1, keepdim=True)


def attention_forward(q, k, v, causal: bool, scale: float, key_mask=None):
    """Fused attention of 4-D (B, H, N, D) tensors: returns `(out, lse, saved)`.

    `lse` is (B, H, N) (float32 for half inputs); `saved` is what `attention_backward` needs.
    `key_mask`: None or (B, H, Nk) bool, True for the keys to ignore; a row left without keys
    gets out 0 and lse -inf.
    """
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"the fast path supports cpu and cuda tensors, got device {q.device}")
    if q.device.type == "cuda" and q.dtype == torch.float64:
        raise ValueError("the fast path has no float64 CUDA kernel; use implementation='readable' for float64 on CUDA")
    require_fused_kernel(q.device.type)
    D = q.shape[-1]
    if no_rows_or_keys(q, k):
        # No query or no key: the CPU kernel divides by zero (SIGFPE) on such shapes. A row with
        # no key gets out 0 and lse -inf, as everywhere in the package; nothing to save.
        B, H, Nq, _ = q.shape
        return q.new_zeros(B, H, Nq, v.shape[-1]), q.new_full((B, H, Nq), -float("inf"), dtype=lse_dtype(q)), ()
    width = _padded_width(D, head_dim_multiple(q))
    q, k, v = (_widen(_unit_last_stride(x), width) for x in (q, k, v))
    bias = key_bias(key_mask, q)
    if q.device.type == "cuda":
        out, lse_raw, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, causal, scale=scale
        )
        # Some versions pad the LSE's last dim to a multiple of 32: keep the raw one for
        # the backward, hand out the first N entries.
        out, lse, saved = out[..., :D], lse_raw[..., : q.shape[2]], (lse_raw, seed, offset, bias)
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias, scale=scale
        )
        out, saved = out[..., :D], (lse, bias)
    if key_mask is not None:
        # A row whose keys are all masked: the kernels give lse 0 (CPU) or +-inf and out 0 or NaN.
        # The definition is out 0, lse -inf; the backward keeps the kernel's own lse (`saved`),
        # with which every probability of such a row, exp(-inf - lse), is 0.
        keyed = rows_with_a_key(key_mask, causal)  # (B, H, Nq or 1)
        lse = torch.where(keyed, lse, -math.inf)
        # Some torch releases (2.4) save lse -inf for such rows, so that the backward's
        # exp(-inf - lse) is NaN: any finite lse makes those probabilities 0, as they are.
        kernel_lse, *rest = saved
        saved = (torch.where(torch.isfinite(kernel_lse), kernel_lse, torch.zeros_like(kernel_lse)), *rest)
        out = torch.where(keyed[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out, lse, saved


def _kernel_backward(dout, q, k, v, out, saved, causal: bool, scale: float):
    if q.device.type == "cuda":
        lse_raw, seed, offset, bias = saved
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, bias, out, lse_raw, seed, offset, 0.0, [True, True, True, False], causal, scale=scale
        )
        return dq, dk, dv
    lse, bias = saved
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, attn_mask=bias, scale=scale
    )


def attention_backward(dout, q, k, v, out, saved, causal: bool, scale: float, dlse=None):
    """Gradients (dq, dk, dv) of fused attention, given dout (B, H, N, D) and optionally dlse (B, H, N).

    `out` must be the tensor whose dot product with `dout` gives Delta (see the module
    docstring): normally the attention's own output. The mixture's backward passes the
    merged output instead, which folds the merge weights' gradient in for free, and passes it
    in float32 for half inputs. The kernel takes out in q's dtype, so the part of Delta that
    rounding would lose, dO.(out - rounded out), travels in the LSE column (as -dlse does).
    """
    if no_rows_or_keys(q, k):  # the forward's empty case: no gradient flows anywhere
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dout = _standard_strides(dout.to(q.dtype))
    D, multiple = q.shape[-1], head_dim_multiple(q)
    # On CUDA the column may push D past an aligned block (D = 128 -> 136), off the fast kernels:
    # there the correction is skipped (the rounded out's Delta, as before) unless a column is needed anyway.
    affordable = (
        q.device.type == "cpu" or dlse is not None or _padded_width(D + 1, multiple) == _padded_width(D, multiple)
    )
    if out.dtype != q.dtype and not affordable:
        out = out.to(q.dtype)
    if out.dtype != q.dtype:
        rounded = out.to(q.dtype)
        lost = (dout.to(out.dtype) * (out - rounded.to(out.dtype))).sum(-1)  # (B, H, N): dO.(out - rounded)
        dlse = -lost if dlse is None else dlse.to(out.dtype) - lost  # the kernel's Delta - dlse gains `lost`
        out = rounded
    out = _standard_strides(out)
    q, k, v = (_unit_last_stride(x) for x in (q, k, v))
    # One extra column carries the LSE gradient through the kernel (module docstring); the kernel's
    # head-dim alignment may add zero columns after it (`head_dim_multiple`).
    width = _padded_width(D + (dlse is not None), multiple)
    if width == D:
        return _kernel_backward(dout, q, k, v, out, saved, causal, scale)
    ones = None if dlse is None else torch.ones_like(dlse)
    dq, dk, dv = _kernel_backward(
        _widen(dout, width, ones),  # dO' = [dO, 1, 0...]
        _widen(q, width),  # q' = [q, 0, 0...]; k', v' alike
        _widen(k, width),
        _widen(v, width),
        _widen(out, width, None if dlse is None else -dlse),  # out' = [O, -dlse, 0...]
        saved,
        causal,
        scale,
    )
    return dq[..., :D], dk[..., :D], dv[..., :D]


class FusedAttention(torch.autograd.Function):
    """(q, k, v) -> (out, lse) through the fused kernel, differentiable in both outputs."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, key_mask, check_finite=True):
        # Unused outputs then get a None gradient instead of zeros, so an unused LSE costs nothing.
        ctx.set_materialize_grads(False)
        ctx.check_finite = check_finite  # fast_branch checks its whole inputs once instead
        out, lse, saved = attention_forward(q, k, v, causal, scale, key_mask)
        if ctx.check_finite:
            poison = nan_unless_finite((q, k, v))  # (B,)
            out, lse = out + poison.to(out.dtype)[:, None, None, None], lse + poison.to(lse.dtype)[:, None, None]
        ctx.save_for_backward(q, k, v, out, *saved)
        ctx.causal, ctx.scale = causal, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, *saved = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = attention_backward(dout, q, k, v, out, saved, ctx.causal, ctx.scale, dlse=dlse)
        return dq, dk, dv, None, None, None, None


def fused_attention(q, k, v, *, causal: bool = False, scale: float | None = None, key_padding_mask=None):
    """Fused attention with its log-sum-exp: `(out (B, H, N, D), lse (B, H, N))`, differentiable in both.

    key_padding_mask: None or (B, Nk) bool, True for the keys to ignore (nn.MultiheadAttention's
    rule); a row left without keys gets out 0 and lse -inf.
    """
    check_qkv(q, k, v, same_length=False, causal=check_flag("causal", causal))  # causal: Nq = Nk
    key_padding_mask = check_key_padding_mask(key_padding_mask, k)
    if q.shape[-1] == 0:  # D = 0: every score is 0; no kernel takes an empty head, the definition does
        bias = None if key_padding_mask is None else key_bias(key_padding_mask[:, None], q)
        return dense_attention(q, k, v, causal=causal, bias=bias)
    if scale is None:
        scale = softmax_scale(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    key_mask = None if key_padding_mask is None else key_padding_mask[:, None].expand(-1, q.shape[1], -1)
    return FusedAttention.apply(q, k, v, causal, float(scale), key_mask)
