"""One dilated branch `(w, r)`, the readable way: segment, sparsify, attend, scatter (LongNet Eqs. 3-8).

The paper (arXiv 2307.02486, Sec. 2.2) splits Q, K, V into segments of length w (Eq. 3),
keeps every r-th row of each segment (Eqs. 3-5), attends inside each sparsified segment
(Eq. 6), and scatters the results back to their positions, zeros elsewhere (Eqs. 7-8).
Sec. 2.3: head j starts at offset o_j (`patterns.head_offset`), so different heads keep
different rows.

Two details the paper leaves open, fixed here as the definition (the official torchscale code
differs on both): positions are counted from each segment's own start, so a w that is not a
multiple of r does not shift later segments; and the last segment, when N is not a multiple
of w, is a shorter segment of its own: the padding that `segment` adds is masked, never
attended (the official non-causal path attends its padding keys).

This file is `implementation="readable"`: pad, reshape, gather, dense attention with a mask,
scatter. Every step is a tensor you can print; the notebooks build it, and it is a second check
of the default `implementation="fast"` (`fast.py`: strided views into q, k, v and torch's fused
kernel). It imports nothing from the fast path; `mixture.dilated_branch` validates the inputs
and picks the implementation.

`segment` + `sparsify` + `kept_row_mask` are a gathered form of the keep rule
`patterns.keeps`: the rows they keep for head h in segment m are exactly the positions pos of
that segment with `keeps(pos, pos, w, r, o_h)` (tested in tests/test_patterns.py).

Letters: the package legend (`longnet_ref/__init__.py`); W = w and R = r in shape tuples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import dense_attention, repeat_kv_heads
from .checks import as_positive_int, check_key_padding_mask, check_qkv, check_tensor
from .patterns import head_offset


def check_offsets(offsets, num_heads, dilation_rate):
    """offsets: an (H,) integer tensor of head offsets in [0, r) (`patterns.head_offset`)."""
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.dtype.is_floating_point:
        raise ValueError(f"offsets must be a 1-D integer tensor of head offsets, got {offsets!r}")
    if offsets.shape[0] != num_heads or (offsets.numel() and (offsets.min() < 0 or offsets.max() >= dilation_rate)):
        raise ValueError(f"offsets must be {num_heads} head offsets in [0, {dilation_rate}), got {offsets.tolist()}")


def segment(x, segment_length):
    """Eq. 3: (B, H, N, D) -> (B, H, S, W, D), zero-padding the last segment up to W.

    The padding rows are never attended: `kept_row_mask` marks them as not kept.
    """
    check_tensor("x", x, dims=4)
    W = as_positive_int("segment_length", segment_length)
    B, H, N, D = x.shape
    S = math.ceil(N / W)
    x = F.pad(x, (0, 0, 0, S * W - N))  # (B, H, S*W, D)
    return x.view(B, H, S, W, D)


def sparsify(x_seg, dilation_rate, offsets):
    """Eqs. 3-5: keep rows o_h, o_h + R, o_h + 2R, ... of each segment: (B, H, S, W, D) -> (B, H, S, K, D).

    Padding W up to K*R lets one reshape line the candidates up as (K, R); each head then
    picks its residue o_h along the R axis.
    """
    check_tensor("x_seg", x_seg, dims=5)
    B, H, S, W, D = x_seg.shape
    R = as_positive_int("dilation_rate", dilation_rate)
    check_offsets(offsets, H, R)
    K = math.ceil(W / R)
    x = F.pad(x_seg, (0, 0, 0, K * R - W)).view(B, H, S, K, R, D)
    index = offsets.view(1, H, 1, 1, 1, 1).expand(B, H, S, K, 1, D)
    return x.gather(4, index).squeeze(4)  # (B, H, S, K, D)


def kept_row_mask(seq_len, segment_length, dilation_rate, offsets):
    """Boolean (H, S, K): row i of segment m is a real position kept by head h (not padding)."""
    N = as_positive_int("seq_len", seq_len)
    W, R = as_positive_int("segment_length", segment_length), as_positive_int("dilation_rate", dilation_rate)
    check_offsets(offsets, offsets.shape[0] if isinstance(offsets, torch.Tensor) else -1, R)
    S, K = math.ceil(N / W), math.ceil(W / R)
    within = torch.arange(K)[None, :] * R + offsets[:, None]  # (H, K) position inside the segment
    position = torch.arange(S)[None, :, None] * W + within[:, None, :]  # (H, S, K) absolute position
    return (within[:, None, :] < W) & (position < N)


def scatter(rows, dilation_rate, offsets, seq_len, fill=0.0):
    """Eqs. 7-8, the inverse of `sparsify`: (B, H, S, K, *rest) back to (B, H, N, *rest), `fill` elsewhere."""
    check_tensor("rows", rows, dims=None)
    if rows.dim() < 4:
        raise ValueError(f"rows must be (B, H, S, K, *rest), got shape {tuple(rows.shape)}")
    B, H, S, K = rows.shape[:4]
    extra = rows.shape[4:]  # (D,) for outputs, () for log-sum-exps
    R = as_positive_int("dilation_rate", dilation_rate)
    check_offsets(offsets, H, R)
    as_positive_int("seq_len", seq_len)
    full = rows.new_full((B, H, S, K, R, *extra), fill)
    index = offsets.view(1, H, 1, 1, 1, *[1] * len(extra)).expand(B, H, S, K, 1, *extra)
    full = full.scatter(4, index, rows.unsqueeze(4))  # (B, H, S, K, R, *rest)
    return full.view(B, H, S * K * R, *extra), K * R  # caller trims each segment to W


READABLE_ACCUMULATION = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float64}


def readable_branch(
    q, k, v, segment_length, dilation_rate, *, causal=False, head_offsets="paper", key_padding_mask=None
):
    """One branch (validated inputs), step by step with dense attention: `(out, lse)`; see `mixture.dilated_branch`.

    out is in q's dtype; lse one precision up (`READABLE_ACCUMULATION`), for the merge.
    key_padding_mask: None or (B, N) bool, True for the keys to ignore.
    """
    check_qkv(q, k, v, grouped=True)  # cheap, and this step-by-step path is called directly too
    as_positive_int("segment_length", segment_length)  # r may exceed min(w, N): the mixture clips w to N
    as_positive_int("dilation_rate", dilation_rate)
    check_key_padding_mask(key_padding_mask, k)
    B, H, N, D = q.shape
    k, v = repeat_kv_heads(k, v, H)  # grouped-query keys: kv head c serves query heads c * H / H_kv, ...
    W = min(segment_length, N)  # w >= N: the whole sequence is one segment
    R = dilation_rate
    S, K = math.ceil(N / W), math.ceil(W / R)
    offsets = torch.tensor([head_offset(j, H, R, head_offsets) for j in range(H)], device=q.device)  # (H,)

    # Segment (Eq. 3) and sparsify (Eqs. 3-5) queries, keys and values alike.
    qs, ks, vs = (sparsify(segment(x, W), R, offsets) for x in (q, k, v))  # each (B, H, S, K, D)
    assert qs.shape == (B, H, S, K, D)
    kept = kept_row_mask(N, W, R, offsets.cpu()).to(q.device)  # (H, S, K)

    # Attend (Eq. 6): every segment of every head is an independent attention over K rows,
    # so fold S into the head axis. Padding keys are masked with -inf; rows stay in position
    # order, so causal is the usual lower-triangular mask in K.
    # Attend one precision up (half -> float32, float32 -> float64): the merge (Eq. 10) weighs
    # branches by exp(lse_i - lse), and at large scores an lse rounded to q's dtype would make
    # those weights, and the output, less exact than PyTorch's own attention in that dtype.
    acc = READABLE_ACCUMULATION.get(q.dtype, q.dtype)
    bias = torch.zeros(H, S, 1, K, dtype=acc, device=q.device)
    bias = bias.masked_fill(~kept[:, :, None, :], -math.inf).view(1, H * S, 1, K)
    if key_padding_mask is not None:
        # Padding keys are removed the same way: their flags go through the same segment and
        # sparsify as the keys (a flag per row: D = 1), then mask with -inf.
        flags = key_padding_mask[:, None, :, None].expand(B, H, N, 1).to(acc)  # (B, H, N, 1)
        padded = sparsify(segment(flags, W), R, offsets) > 0  # (B, H, S, K, 1)
        bias = bias + torch.zeros_like(padded, dtype=acc).masked_fill(padded, -math.inf).view(B, H * S, 1, K)
    out, lse = dense_attention(
        *(x.reshape(B, H * S, K, D).to(acc) for x in (qs, ks, vs)), causal=causal, bias=bias
    )  # out (B, H*S, K, D), lse (B, H*S, K): in acc
    out = out.to(q.dtype).view(B, H, S, K, D).masked_fill(~kept[..., None], 0.0)
    lse = lse.view(B, H, S, K).masked_fill(~kept, -math.inf)

    # Scatter (Eqs. 7-8): kept rows back to their positions; rows this branch skips get
    # out 0 and lse -inf, so the merge gives them weight 0.
    out, padded_w = scatter(out, R, offsets, N)  # (B, H, S*K*R, D)
    lse, _ = scatter(lse, R, offsets, N, fill=-math.inf)  # (B, H, S*K*R)
    out = out.view(B, H, S, padded_w, D)[:, :, :, :W].reshape(B, H, S * W, D)[:, :, :N]
    lse = lse.view(B, H, S, padded_w)[:, :, :, :W].reshape(B, H, S * W)[:, :, :N]
    return out, lse
