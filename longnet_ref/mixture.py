"""The mixture of dilated branches (LongNet Eqs. 9-10) and the public `dilated_attention`.

Each branch i returns its output O_i and the log of its softmax denominator lse_i
(s_i = exp(lse_i)). The paper merges them as

    O = sum_i alpha_i O_i,    alpha_i = s_i / sum_j s_j            (Eq. 10)

which is one softmax over the multiset union of the branches' keys (see `oracle.py`).
The official code computes alpha under `torch.no_grad()`; `detach_weights=True`
reproduces that, and its gradient is not the gradient of the forward it computes.

Shape legend: B batch, H heads, N length, D head dim.
"""

from __future__ import annotations

import torch

from .checks import check_branches, check_head_offsets, check_implementation, check_qkv
from .dilated import dilated_branch
from .fast import fast_dilated_attention


def merge_branches(outs, lses, *, detach_weights=False):
    """Merge branch outputs by their softmax denominators (Eq. 10); returns `(out, lse)`.

    Args:
        outs: list of (B, H, N, D) branch outputs; lses: list of matching (B, H, N) log-sum-exps.
        detach_weights: compute alpha without gradient, as the official code does.

    Returns:
        out (B, H, N, D) and the merged lse = log sum_i exp(lse_i), (B, H, N). A row that no
        branch covers (all lse -inf) gets out 0 and lse -inf, never NaN.
    """
    if not isinstance(outs, (list, tuple)) or not isinstance(lses, (list, tuple)):
        raise ValueError("outs and lses must be lists of tensors")
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(
            f"outs and lses must be non-empty lists of one length, got {len(outs)} outs and {len(lses)} lses"
        )
    for i, (o, l) in enumerate(zip(outs, lses)):
        if o.shape != outs[0].shape or o.dim() != 4:
            raise ValueError(f"outs[{i}] has shape {tuple(o.shape)}, expected 4-D {tuple(outs[0].shape)}")
        if l.shape != o.shape[:-1]:
            raise ValueError(f"lses[{i}] has shape {tuple(l.shape)}, expected {tuple(o.shape[:-1])}")

    lse = torch.stack(list(lses))  # (n_branches, B, H, N)
    merged_lse = torch.logsumexp(lse, dim=0)  # (B, H, N); -inf where no branch covers the row
    # alpha_i = exp(lse_i - merged_lse). Where every branch is -inf, -inf - -inf would be NaN:
    # subtract 0 there instead, which gives alpha = 0 for every branch and out = 0.
    safe = torch.where(torch.isfinite(merged_lse), merged_lse, torch.zeros_like(merged_lse))
    alpha = torch.exp(lse - safe)  # (n_branches, B, H, N), sums to 1 over branches on covered rows
    if detach_weights:
        alpha = alpha.detach()
    out = sum(a.unsqueeze(-1).to(o.dtype) * o for a, o in zip(alpha, outs))  # (B, H, N, D)
    return out, merged_lse


def dilated_attention(
    q,
    k,
    v,
    segment_lengths,
    dilation_rates,
    *,
    causal=False,
    head_offsets="paper",
    detach_weights=False,
    return_lse=False,
    implementation="fast",
):
    """LongNet's dilated attention: a mixture of branches `(w_i, r_i)` merged by Eq. 10.

    Args:
        q, k, v: (B, H, N, D), same shape, dtype and device.
        segment_lengths, dilation_rates: the branches, e.g. [2048, 4096], [1, 2].
        causal: each query attends only keys at or before it.
        head_offsets: "paper", "torchscale" or "none" (`patterns.head_offset`).
        detach_weights: merge weights without gradient, as the official code does (branches then run
            one by one, through `dilated_branch`, and are merged by `merge_branches`).
        return_lse: also return the merged log-sum-exp (B, H, N).
        implementation: "fast" (default; fused kernel on strided views, branches merged as
            they finish) or "readable" (`dilated_branch` step by step, then `merge_branches`).

    Returns:
        out (B, H, N, D), or `(out, lse)` with `return_lse=True`.
    """
    check_qkv(q, k, v)
    branches = check_branches(segment_lengths, dilation_rates)
    check_head_offsets(head_offsets)
    check_implementation(implementation)
    if implementation == "fast" and not detach_weights:
        out, lse = fast_dilated_attention(q, k, v, branches, causal=causal, head_offsets=head_offsets)
    else:
        # detach_weights changes the backward only; the per-branch fast kernels still run
        # when implementation="fast", merged by the readable merge.
        results = [
            dilated_branch(q, k, v, w, r, causal=causal, head_offsets=head_offsets, implementation=implementation)
            for w, r in branches
        ]
        out, lse = merge_branches([o for o, _ in results], [l for _, l in results], detach_weights=detach_weights)
    return (out, lse) if return_lse else out
