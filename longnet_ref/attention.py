"""Dense scaled dot-product attention, written out from scratch.

This is the readable reference every other piece of the package is compared against (the
oracle is this function with a bias). Vaswani et al. (2017), Eq. 1; LongNet (arXiv 2307.02486)
Eq. 1-2:

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V

Besides the output we return the log-sum-exp (LSE) of every row of scores,
`lse_i = log sum_j exp(x_ij)` (x_ij the scaled scores), the log of the softmax denominator. LongNet needs it: the
mixture of dilated branches weights each branch by its denominator (Eq. 10), and
sequence parallelism merges partial results the same way.

Letters: the package legend (`longnet_ref/__init__.py`); here Nq, Nk are the query and key
lengths (N each in self-attention) and Dv the value head dim.
"""

from __future__ import annotations

import math

import torch

from .checks import as_count, check_flag, check_qkv


def causal_mask(n_queries: int, n_keys: int, device=None) -> torch.Tensor:
    """Boolean (Nq, Nk) mask, True where key `j` is not in the future of query `i` (j <= i)."""
    as_count("n_queries", n_queries)
    as_count("n_keys", n_keys)
    i = torch.arange(n_queries, device=device)[:, None]  # (Nq, 1)
    j = torch.arange(n_keys, device=device)[None, :]  # (1, Nk)
    return j <= i


def lse_dtype(q):
    """The dtype log-sum-exps are handed out in: float32 for half-precision q (as the fused kernels
    return them), else q's own."""
    return torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype


def softmax_scale(head_dim):
    """1/sqrt(D), the scale of the scores; 1 for D = 0, where every score is an empty sum, 0, at any scale."""
    as_count("head_dim", head_dim)
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def repeat_kv_heads(k, v, num_heads):
    """Grouped-query attention's definition: k, v with H_kv heads -> H heads, kv head c serving the
    H / H_kv consecutive query heads c * H / H_kv, ... (SDPA's enable_gqa rule). A copy: for the readable paths."""
    group = num_heads // k.shape[1] if k.shape[1] else 1
    return (k, v) if group == 1 else (k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))


def check_bias(bias, q, shape):
    """An additive float bias broadcastable to `shape` (B, H, Nq, Nk). A bool mask is refused: added
    to the scores it would shift them by 1 or 0, not mask them."""
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be None or a float tensor, got {type(bias).__name__}")
    if not bias.is_floating_point():
        raise TypeError(
            f"bias must be a floating-point tensor added to the scores (-inf masks a pair), got dtype {bias.dtype}; "
            "for a bool mask use torch.zeros(mask.shape).masked_fill(~mask, -inf), or causal=True"
        )
    try:
        fits = bias.dim() <= 4 and torch.broadcast_shapes(bias.shape, shape) == shape
    except RuntimeError:  # not broadcastable at all
        fits = False
    if not fits:
        raise ValueError(f"bias must broadcast to (B, H, Nq, Nk) = {shape}, got shape {tuple(bias.shape)}")
    if bias.device != q.device:
        raise ValueError(f"bias is on device {bias.device} but q is on device {q.device}")


def dense_attention(q, k, v, *, causal=False, bias=None):
    """Softmax attention of every query over every key; returns `(out, lse)`.

    Args:
        q: (B, H, Nq, D) queries; k: (B, H, Nk, D) keys; v: (B, H, Nk, Dv) values.
        causal: query i sees only keys j <= i (needs Nq == Nk).
        bias: optional additive bias broadcastable to (B, H, Nq, Nk), added to the scaled
            scores; `-inf` masks a pair. The oracle passes `log c` here (c = branch count).

    Returns:
        out: (B, H, Nq, Dv); lse: (B, H, Nq), the log of each row's softmax denominator.
        A row with every key masked gets out 0 and lse -inf (never NaN).
    """
    check_qkv(q, k, v, same_length=False, causal=check_flag("causal", causal))
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if bias is not None:
        check_bias(bias, q, (B, H, Nq, Nk))

    # Scores, scaled by 1/sqrt(D) so their variance does not grow with the head dim.
    scores = (q @ k.transpose(-2, -1)) * softmax_scale(D)  # (B, H, Nq, Nk)
    if bias is not None:
        scores = scores + bias
    if causal:
        scores = scores.masked_fill(~causal_mask(Nq, Nk, q.device), -math.inf)

    # Softmax by hand, with the row maximum subtracted so exp never overflows. A row where
    # every score is -inf has max -inf; we use 0 there so that exp gives 0 instead of NaN.
    # (No keys at all, Nk = 0, is the same case: every row is empty.)
    row_max = scores.amax(dim=-1, keepdim=True) if Nk else scores.new_full((B, H, Nq, 1), -math.inf)  # (B, H, Nq, 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)  # (B, H, Nq, Nk), unnormalised
    denom = weights.sum(dim=-1, keepdim=True)  # (B, H, Nq, 1)

    # Weighted sum of values; rows with nothing to attend (denom 0) give 0.
    safe_denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    out = (weights @ v) / safe_denom  # (B, H, Nq, Dv)

    # lse = log(denom) + max. Empty rows get -inf, written with `where` rather than log(0) so
    # that their backward is 0 too (the derivative of log at 0 would turn 0 * inf into NaN).
    lse = torch.where(denom > 0, torch.log(safe_denom) + row_max, -math.inf).squeeze(-1)  # (B, H, Nq)
    return out, lse
