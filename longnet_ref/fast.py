"""The fast path: strided views of q, k, v fed to torch's fused attention kernel.

Which rows each kernel call reads, as views of q, k and v (`Piece`, `Call`, `branch_calls`),
is `fast_pieces.py`; here the calls run, merge and scatter back (Eqs. 7-8).

`dilated_attention` merges branches as they finish (Eq. 10) in running sums, normalised once
at the end (`RunningSums`), so memory does not grow with the number of branches: `RunningMerge`, one
autograd node for a list of kernel `Call`s (query rows attend key rows). On one device every
call reads its keys from the same rows of k as its queries; a sequence-parallel rank adds calls
whose keys come from other ranks (`parallel/fused.py`). The backward uses the
identity of `kernels.py`: a branch's kernel backward, given the merged output O in place of
its own and `alpha_i dO` as gradient (alpha_i = exp(lse_i - LSE), the branch's merge weight),
returns exactly the gradient that flows through the branch *and* its merge weight
(alpha_i is computed as `RunningSums` weighs, so the weights of a row sum to 1, and O is
kept in float32 for half inputs; `kernels.attention_backward`):
Delta = alpha_i dO.O = alpha_i dO.O_i - dlse_i, where dlse_i = alpha_i dO.(O_i - O) is the
gradient of lse_i. No branch output needs to be kept for the backward. A gradient dLSE of
the merged log-sum-exp reaches branch i as alpha_i dLSE and goes through the kernel's extra
column (`kernels.attention_backward`).

Letters: the package legend (`longnet_ref/__init__.py`).
"""

from __future__ import annotations

import math

import torch

from .attention import lse_dtype, softmax_scale
from .fast_pieces import branch_calls, fold, fold_axes, merge_offset_groups, piece_key_mask, unfold
from .kernels import FusedAttention, attention_backward, attention_forward, nan_unless_finite


def fast_branch(q, k, v, segment_length, dilation_rate, *, causal=False, head_offsets="paper", key_padding_mask=None):
    """One branch (validated inputs), differentiable in out and lse; see `mixture.dilated_branch`."""
    B, H, N, D = q.shape
    out = q.new_zeros(B, H, N, D)
    lse = torch.full((B, H, N), -math.inf, dtype=lse_dtype(q), device=q.device)
    for call in branch_calls(N, H, [(segment_length, dilation_rate)], causal, head_offsets, k.shape[1], B):
        axis = fold_axes(call.queries.view(q))
        out_p, lse_p = FusedAttention.apply(
            fold(call.queries.view(q), axis),  # (B*h, S, K, D) or (B*S, h, K, D)
            fold(call.keys.view(k), axis),  # autograd sums the gradient of a repeated kv head
            fold(call.keys.view(v), axis),
            causal,
            softmax_scale(D),
            piece_key_mask(call.keys, key_padding_mask, H, axis),  # the keys' flags, as RunningMerge reads them
            False,  # finiteness: checked once below, not per piece
        )
        call.queries.view(out).copy_(unfold(out_p, axis, B))  # scatter, Eqs. 7-8 (autograd records the copy)
        call.queries.view(lse).copy_(unfold(lse_p, axis, B))
    poison = nan_unless_finite((q, k, v))  # (B,): NaN in, NaN out (`kernels.nan_unless_finite`)
    return out + poison.to(out.dtype)[:, None, None, None], lse + poison.to(lse.dtype)[:, None, None]


class RunningMerge(torch.autograd.Function):
    """Attention calls merged as they finish (Eq. 10) in one autograd node: (q, k, v, *kv) -> (out, lse).

    `kv` are extra key/value sources, each (2, B, H, n, D) (keys, values). `masks` is None, or
    one key padding mask per source (True = ignore): (B, N) for k itself, (B, H, n) for an extra
    source, or None. A row of q that no call reads, or whose keys are all masked, gets out 0 and lse -inf.
    """

    @staticmethod
    def forward(ctx, calls, masks, q, k, v, *kv):
        ctx.set_materialize_grads(False)
        B, H, N, D = q.shape
        scale = softmax_scale(D)
        acc = lse_dtype(q)
        sources = [(k, v), *((x[0], x[1]) for x in kv)]
        merge = RunningSums(B, H, N, D, acc, q.device)
        saved = []
        for call in calls:
            keys, values = sources[call.source]
            axis = fold_axes(call.queries.view(q))
            out_c, lse_c, kernel_saved = attention_forward(
                fold(call.queries.view(q), axis),  # (B*h, S, K, D) or (B*S, h, K, D)
                fold(call.keys.view(keys), axis),
                fold(call.keys.view(values), axis),
                call.causal,
                scale,
                None if masks is None else piece_key_mask(call.keys, masks[call.source], H, axis),
            )
            merge.add(call.queries, unfold(out_c, axis, B), unfold(lse_c, axis, B))
            saved.append((lse_c, *kernel_saved))
        out_acc, lse = merge.result()  # out_acc in float32 for half inputs
        poison = nan_unless_finite((q, k, v, *kv), [0, 0, 0] + [1] * len(kv))  # (B,): kv are (2, B, ...)
        out_acc.add_(poison.to(out_acc.dtype)[:, None, None, None])  # NaN in, NaN out (`kernels.nan_unless_finite`)
        lse.add_(poison.to(lse.dtype)[:, None, None])
        ctx.calls, ctx.scale, ctx.batch = calls, scale, B
        ctx.saved_sizes = [len(group) for group in saved]
        # The backward's Delta = dO.O takes the merged O before its rounding to q's dtype: from
        # the rounded one, bf16 gradients at logit scale 1e4 erred 1.2x past flash-attn's rule.
        ctx.save_for_backward(q, k, v, out_acc, merge.top, merge.total, *kv, *[t for group in saved for t in group])
        ctx.num_kv = len(kv)
        return out_acc.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, top, total, *rest = ctx.saved_tensors
        kv, flat = rest[: ctx.num_kv], rest[ctx.num_kv :]
        acc = lse_dtype(q)
        sources = [(k, v), *((x[0], x[1]) for x in kv)]
        dq, dk, dv = (torch.zeros_like(x, dtype=acc) for x in (q, k, v))
        dkv = [torch.zeros_like(x, dtype=acc) for x in kv]
        grads = [(dk, dv), *((d[0], d[1]) for d in dkv)]
        if dout is None:  # only the LSE was used
            dout = torch.zeros_like(out)
        saved = _regroup(flat, ctx.saved_sizes)  # one kernel_saved per call, in forward order
        for call in ctx.calls:
            keys, values = sources[call.source]
            dkeys, dvalues = grads[call.source]
            rows = call.queries
            axis = fold_axes(rows.view(q))  # the forward's fold: it depends on q's strides alone
            lse_c, *kernel_saved = next(saved)
            alpha = merge_weight(lse_c, fold(rows.view(top), axis), fold(rows.view(total), axis))
            dq_c, dk_c, dv_c = attention_backward(
                fold(rows.view(dout), axis) * alpha.unsqueeze(-1),
                fold(rows.view(q), axis),
                fold(call.keys.view(keys), axis),
                fold(call.keys.view(values), axis),
                fold(rows.view(out), axis),
                kernel_saved,
                call.causal,
                ctx.scale,
                dlse=None if dlse is None else fold(rows.view(dlse), axis) * alpha,
            )
            rows.view(dq).add_(unfold(dq_c, axis, ctx.batch))
            call.keys.add_into(dkeys, unfold(dk_c, axis, ctx.batch))
            call.keys.add_into(dvalues, unfold(dv_c, axis, ctx.batch))
        return None, None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *(d.to(x.dtype) for d, x in zip(dkv, kv))


def _regroup(flat, sizes):
    """Split a flat tuple back into consecutive groups of the given sizes."""
    at = 0
    for size in sizes:
        yield flat[at : at + size]
        at += size


class RunningSums:
    """Eq. 10 accumulated one call at a time, normalised once at the end.

    For each row it keeps the largest lse seen so far, `top`, and in units of exp(top) the
    running sums total = sum_i exp(lse_i - top) and acc = sum_i exp(lse_i - top) out_i (as
    flash attention does with its scores). `result` divides acc by total, so the merge weights
    alpha_i = exp(lse_i - top) / total sum to 1 up to one rounding. (Weighing by
    exp(lse_i - LSE) with the merged LSE rounded to float32 does not: at lses near 4500 an ulp is
    5e-4, and the weights summed to 1 +- 5e-4, an error 700x PyTorch's own at logit scale 1e4.)
    """

    def __init__(self, B, H, N, D, dtype, device):
        self.acc = torch.zeros(B, H, N, D, dtype=dtype, device=device)  # sum_i exp(lse_i - top) out_i
        self.total = torch.zeros(B, H, N, dtype=dtype, device=device)  # sum_i exp(lse_i - top)
        self.top = torch.full((B, H, N), -math.inf, dtype=dtype, device=device)  # max_i lse_i

    def add(self, rows, out_new, lse_new):
        """Fold one call's (out_new (B, h, S, K, D), lse_new (B, h, S, K)) into the rows `rows` (a Piece)."""
        acc, total, top = rows.view(self.acc), rows.view(self.total), rows.view(self.top)
        new_top = torch.maximum(top, lse_new)
        shift = _finite_or_zero(new_top)  # -inf - -inf would be NaN; a row nothing reached keeps 0s
        old_scale = torch.exp(top - shift)  # rescales what was summed in units of the old top
        weight = torch.exp(lse_new - shift)
        # In place, with no temporary of the rows' size: at N = 16384 a fresh (B, H, N, D) product
        # per call and a fresh quotient at the end were 3 % of a causal forward (page faults).
        acc.mul_(old_scale.unsqueeze(-1)).addcmul_(out_new, weight.unsqueeze(-1))
        total.mul_(old_scale).add_(weight)
        top.copy_(new_top)

    def result(self):
        """(out, lse): acc / total and top + log(total); 0 and -inf on rows no call reached.

        `out` is `acc` itself, divided in place: the sums are not used after."""
        covered = self.total > 0
        safe_total = torch.where(covered, self.total, torch.ones_like(self.total))
        out = self.acc.div_(safe_total.unsqueeze(-1))
        lse = torch.where(covered, _finite_or_zero(self.top) + torch.log(safe_total), -math.inf)
        return out, lse


def _finite_or_zero(x):
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def merge_weight(lse_c, top, total):
    """A call's merge weight alpha = exp(lse_c - top) / total (`RunningSums`); 0 where lse_c = -inf."""
    covered = total > 0
    return torch.exp(lse_c - _finite_or_zero(top)) / torch.where(covered, total, torch.ones_like(total))


def fast_dilated_attention(q, k, v, branches, *, causal=False, head_offsets="paper", key_padding_mask=None):
    """The mixture (Eqs. 3-10) through one `RunningMerge` (validated inputs): `(out, lse)`."""
    B, H, N, D = q.shape
    calls = merge_offset_groups(branch_calls(N, H, branches, causal, head_offsets, k.shape[1], B), (q, k, v))
    return RunningMerge.apply(calls, None if key_padding_mask is None else [key_padding_mask], q, k, v)
