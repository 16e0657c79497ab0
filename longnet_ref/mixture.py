"""The mixture of dilated branches (LongNet Eqs. 9-10), and the public entry points.

Each branch i returns its output O_i and the log-sum-exp lse_i of its scores, the log of its
softmax denominator. The paper (Eq. 10) merges them by those denominators:

    O = sum_i alpha_i O_i,    alpha_i = exp(lse_i) / sum_j exp(lse_j) = exp(lse_i - LSE)

with LSE = log sum_j exp(lse_j). That is one softmax over the multiset union of the branches'
keys (see `oracle.py`). The official code computes alpha under `torch.no_grad()`;
`detach_weights=True` reproduces that, and its gradient is not the gradient of the forward
it computes.

`merge_branches` is the readable merge (no fast-path code). `dilated_branch` and
`dilated_attention` validate their inputs and then pick the implementation in one place,
`_IMPLEMENTATIONS`: "readable" (`dilated.readable_branch`, then `merge_branches`) or "fast"
(`fast.py`: strided views into the fused kernel, branches merged as they finish by
`fast.RunningMerge`, the same Eq. 10 in running form). On a torch without the fused kernel's
op (older than 2.3, `kernels.fused_kernel_available`) "fast" runs as "readable", with one warning.

Letters: the package legend (`longnet_ref/__init__.py`).
"""

from __future__ import annotations

import math
import warnings

import torch

from . import kernels
from .attention import lse_dtype
from .checks import (
    check_branch,
    check_branches,
    check_flag,
    check_head_offsets,
    check_implementation,
    check_key_padding_mask,
    check_qkv,
)
from .dilated import readable_branch
from .fast import fast_branch, fast_dilated_attention


def merge_branches(outs, lses, *, detach_weights=False):
    """Merge branch outputs by their softmax denominators (Eq. 10); returns `(out, lse)`.

    Args:
        outs: list of (B, H, N, D) branch outputs; lses: list of matching (B, H, N) log-sum-exps.
        detach_weights: compute alpha without gradient, as the official code does.

    Returns:
        out (B, H, N, D) and the merged lse = log sum_i exp(lse_i), (B, H, N). A row that no
        branch covers (all lse -inf) gets out 0 and lse -inf, never NaN.
    """
    check_flag("detach_weights", detach_weights)
    for name, items in (("outs", outs), ("lses", lses)):
        if not isinstance(items, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(items).__name__}")
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(
            f"outs and lses must be non-empty lists of one length, got {len(outs)} outs and {len(lses)} lses"
        )
    for i, (out_i, lse_i) in enumerate(zip(outs, lses)):
        for name, x in ((f"outs[{i}]", out_i), (f"lses[{i}]", lse_i)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if not x.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if out_i.dim() != 4 or out_i.shape != outs[0].shape:
            raise ValueError(f"outs[{i}] has shape {tuple(out_i.shape)}, expected 4-D {tuple(outs[0].shape)}")
        if lse_i.shape != out_i.shape[:-1]:
            raise ValueError(f"lses[{i}] has shape {tuple(lse_i.shape)}, expected {tuple(out_i.shape[:-1])}")
        if out_i.dtype != outs[0].dtype or lse_i.dtype != lses[0].dtype:
            raise ValueError(
                f"outs[{i}] / lses[{i}] have dtypes {out_i.dtype} / {lse_i.dtype}, but outs[0] / lses[0] have "
                f"{outs[0].dtype} / {lses[0].dtype}: every branch must come in one dtype"
            )
        if out_i.device != outs[0].device or lse_i.device != outs[0].device:
            raise ValueError(
                f"outs[{i}] and lses[{i}] must be on {outs[0].device}, got {out_i.device} and {lse_i.device}"
            )

    # The merge runs in at least float32: half-precision lses and weights would round the
    # weights of branches whose lses differ by a few units in the last place.
    acc = torch.promote_types(torch.promote_types(outs[0].dtype, lses[0].dtype), torch.float32)
    lse = torch.stack(list(lses)).to(acc)  # (n_branches, B, H, N)
    # Like dense_attention's softmax: subtract each row's largest lse (0 where every branch is
    # -inf, so exp gives 0, not NaN) and guard the log, so that a row no branch covers gets out
    # 0, lse -inf and gradient 0, never NaN (logsumexp's gradient there would be 0/0).
    top = lse.detach().amax(dim=0)  # (B, H, N); a stabiliser only: the results do not depend on it
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(lse - top)  # (n_branches, B, H, N): exp(lse_i - top), 0 for -inf
    total = weights.sum(dim=0)  # (B, H, N)
    covered = total > 0
    safe_total = torch.where(covered, total, torch.ones_like(total))
    merged_lse = torch.where(covered, torch.log(safe_total) + top, -math.inf)  # (B, H, N)
    alpha = weights / safe_total  # (n_branches, B, H, N): exp(lse_i - merged_lse), sums to 1 where covered
    if detach_weights:
        alpha = alpha.detach()
    out = sum(alpha_i.unsqueeze(-1) * out_i.to(acc) for alpha_i, out_i in zip(alpha, outs))  # (B, H, N, D)
    return out.to(outs[0].dtype), merged_lse.to(lses[0].dtype)


# The one place where the implementation is chosen: name -> (one branch, the mixture). Both
# take validated inputs. The readable mixture is its branches merged by `merge_branches`.
_IMPLEMENTATIONS = {
    "readable": (readable_branch, None),
    "fast": (fast_branch, fast_dilated_attention),
}


_warned_no_kernel = set()  # device types whose missing fused kernel has been warned about (once each)


def pick_implementation(q, implementation):
    """The implementation to run: the one asked for, or "readable" for D = 0 (no kernel takes an empty head)
    and, with one warning, when this torch lacks the fused kernel's op (`kernels.fused_kernel_available`)."""
    implementation = check_implementation(implementation)
    if q.shape[-1] == 0:
        return "readable"
    if implementation == "fast" and not kernels.fused_kernel_available(q.device.type):
        if q.device.type not in _warned_no_kernel:
            _warned_no_kernel.add(q.device.type)
            warnings.warn(
                f"torch {torch.__version__} has no fused attention kernel on {q.device.type} (the fast path needs "
                f"torch >= {kernels.OLDEST_TORCH}): implementation='fast' runs as 'readable' (exact, slower). "
                "Shown once.",
                RuntimeWarning,
                stacklevel=3,
            )
        return "readable"
    return implementation


def nothing_to_attend(q):
    """B, H or N is 0: the result is empty, as scaled_dot_product_attention's."""
    B, H, N, _ = q.shape
    return B == 0 or H == 0 or N == 0


def empty_result(q, k, v):
    """(out, lse) for `nothing_to_attend` inputs: (B, H, N, D) and (B, H, N), no elements, in q, k, v's graph."""
    out = q * 0 + (k.sum() + v.sum()) * 0  # (B, H, N, D), empty; q, k and v get (empty) gradients
    lse = (q.sum(-1) * 0).to(lse_dtype(q))
    return out, lse


def dilated_branch(
    q,
    k,
    v,
    segment_length,
    dilation_rate,
    *,
    causal=False,
    head_offsets="paper",
    implementation="fast",
    key_padding_mask=None,
):
    """One dilated branch `(w, r)` of LongNet (Eqs. 3-8) on (B, H, N, D) tensors.

    Args:
        q, k, v: (B, H, N, D), same dtype and device; k and v may have H_kv heads with
            H % H_kv == 0 (grouped-query attention: kv head c serves the H / H_kv consecutive
            query heads from c * H / H_kv, as `k.repeat_interleave(H // H_kv, dim=1)` would, but
            the fast path reads k and v in place).
        segment_length: w; w >= N makes the whole sequence one segment. The last segment may
            be shorter than w; it is never padded with attended keys.
        dilation_rate: r <= w; head j keeps the rows pos with (pos - m*w) mod r == o_j in segment m
            (`patterns.keeps`).
        causal: a kept query attends only kept keys at or before it.
        head_offsets: "paper" (o_j = j mod r), "torchscale" or "none" (`patterns.head_offset`).
        implementation: "fast" (strided views + fused kernel, `fast.fast_branch`) or "readable"
            (`dilated.readable_branch`).
        key_padding_mask: None or (B, N) bool, True for the keys to ignore (nn.MultiheadAttention's
            rule): they are removed from the branch (padding, left, right or anywhere).

    Returns:
        out (B, H, N, D) and lse (B, H, N). Rows the branch does not keep, or whose kept keys
        are all masked: out 0, lse -inf.
    """
    check_qkv(q, k, v, grouped=True)
    check_flag("causal", causal)
    key_padding_mask = check_key_padding_mask(key_padding_mask, k)
    w, r = check_branch(segment_length, dilation_rate)
    check_head_offsets(head_offsets)
    branch, _ = _IMPLEMENTATIONS[pick_implementation(q, implementation)]
    if nothing_to_attend(q):
        return empty_result(q, k, v)
    out, lse = branch(q, k, v, w, r, causal=causal, head_offsets=head_offsets, key_padding_mask=key_padding_mask)
    return out, lse.to(lse_dtype(q))


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
    key_padding_mask=None,
):
    """LongNet's dilated attention: a mixture of branches `(w_i, r_i)` merged by Eq. 10.

    Args:
        q, k, v: (B, H, N, D), same dtype and device; k and v may have H_kv heads dividing H
            (grouped-query attention, as in `dilated_branch`).
        segment_lengths, dilation_rates: the branches, e.g. [2048, 4096], [1, 2].
        causal: each query attends only keys at or before it.
        head_offsets: "paper", "torchscale" or "none" (`patterns.head_offset`).
        detach_weights: merge weights without gradient, as the official code does (branches then run
            one by one and are merged by `merge_branches`).
        return_lse: also return the merged log-sum-exp (B, H, N).
        implementation: "fast" (default; fused kernel on strided views, branches merged as
            they finish) or "readable" (`dilated.readable_branch` step by step, then `merge_branches`).
        key_padding_mask: None or (B, N) bool, True for the keys to ignore (nn.MultiheadAttention's
            rule). The definition: the oracle with those keys removed from every branch. A row
            left without keys gets out 0 (and lse -inf). The fast path masks inside the kernel
            call of each piece: no N x N mask is built.

    Returns:
        out (B, H, N, D), or `(out, lse)` with `return_lse=True`.
    """
    check_qkv(q, k, v, grouped=True)
    for name, flag in (("causal", causal), ("detach_weights", detach_weights), ("return_lse", return_lse)):
        check_flag(name, flag)
    key_padding_mask = check_key_padding_mask(key_padding_mask, k)
    branches = check_branches(segment_lengths, dilation_rates)
    check_head_offsets(head_offsets)
    branch, mixture = _IMPLEMENTATIONS[pick_implementation(q, implementation)]
    if nothing_to_attend(q):
        out, lse = empty_result(q, k, v)
    elif mixture is not None and not detach_weights:
        out, lse = mixture(
            q, k, v, branches, causal=causal, head_offsets=head_offsets, key_padding_mask=key_padding_mask
        )
    else:
        # detach_weights changes the backward only; with implementation="fast" the per-branch
        # fast kernels still run, merged by the readable merge.
        results = [
            branch(q, k, v, w, r, causal=causal, head_offsets=head_offsets, key_padding_mask=key_padding_mask)
            for w, r in branches
        ]
        out, lse = merge_branches(
            [out_i for out_i, _ in results], [lse_i for _, lse_i in results], detach_weights=detach_weights
        )
    return (out, lse.to(lse_dtype(q))) if return_lse else out
