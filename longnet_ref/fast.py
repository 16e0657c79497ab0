"""The fast path: strided views of q, k, v fed to torch's fused attention kernel.

For a branch `(w, r)` and the heads that share offset o, the kept rows of every segment are
a strided view, with no copy and no index tensor:

    x[:, heads]                       (B, h, N, D)       heads: a slice (patterns.head_groups)
      [:, :, start : start + S*W]     (B, h, S*W, D)     full segments (the ragged tail is its own piece)
      .unflatten(2, (S, W))           (B, h, S, W, D)    segment, Eq. 3
      [:, :, :, o::r]                 (B, h, S, K, D)    sparsify, Eqs. 3-5

and one fused-kernel call reads it as a batch of B*h "sequences" of S "heads" of K rows (or
B*S of h: `fold`, whichever the strides allow as a view). Outputs go back through the same
views (scatter, Eqs. 7-8).

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

`Piece.view` and `branch_pieces` are a gathered form of the keep rule `patterns.keeps`: the
rows a branch's pieces select for a head are exactly the positions pos with `keeps(pos, pos, w, r, o)`,
and two rows meet in one kernel call exactly when `keeps` pairs them (tests/test_patterns.py).

Letters: the package legend (`longnet_ref/__init__.py`); W = w and R = r in shape tuples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .attention import lse_dtype, softmax_scale
from .kernels import FusedAttention, attention_backward, attention_forward, nan_unless_finite
from .patterns import head_groups


@dataclass(frozen=True)
class Piece:
    """Rows that one fused-kernel call attends: one head group, segments of one length.

    In general: S blocks of W rows from `start`, keeping rows offset, offset + R, ... of each
    block. A sequence-parallel rank also uses it for a single run of rows (S = 1, offset 0):
    kept rows first, first + R, ... of its chunk, or R = 1 for a run of gathered keys.
    """

    start: int  # first position covered
    num_segments: int  # S
    segment_length: int  # W (the ragged tail's own length for the last piece)
    offset: int  # o, the heads' offset
    dilation_rate: int  # R
    heads: slice  # heads sharing the offset
    kv_heads: tuple | None = None  # grouped-query keys: (first, step, count) heads of k, v; step 0 repeats one

    def view(self, x):
        """Kept rows of every batch element: (B, H, N, *rest) -> (B, h, S, K, *rest), a view of x.

        With `kv_heads` (first, step, count) it selects those heads of x instead (x is k or v with
        H_kv heads); step 0 is one head read by `count` query heads, a stride-0 view, not a copy.
        """
        if self.kv_heads is None:
            heads = x[:, self.heads]
        else:
            first, step, count = self.kv_heads
            heads = (
                x[:, first : first + 1].expand(-1, count, *x.shape[2:]) if step == 0 else x[:, first::step][:, :count]
            )
        rows = heads[:, :, self.start : self.start + self.num_segments * self.segment_length]
        rows = rows.unflatten(2, (self.num_segments, self.segment_length))  # (B, h, S, W, *rest)
        return rows[:, :, :, self.offset :: self.dilation_rate]  # (B, h, S, K, *rest)

    def add_into(self, grad, value):
        """grad[this piece's rows] += value (B, h, S, K, *rest); query heads that share one kv head add up."""
        if self.kv_heads is not None and self.kv_heads[1] == 0 and self.kv_heads[2] > 1:
            one = replace(self, kv_heads=(self.kv_heads[0], 1, 1))
            one.view(grad).add_(value.sum(dim=1, keepdim=True))
        else:
            self.view(grad).add_(value)


# The kernels take 4-D (batch, heads, rows, D) tensors, and a piece's view is 5-D (B, h, S, K, D):
# every (b, head, segment) is an independent attention, so two of B, h, S are folded into the
# kernel's batch axis. One call per piece instead of one per batch element (fewer, larger kernel
# calls; the per-(b, head, segment) arithmetic is unchanged, so results are bit-identical). B is
# folded with h when x's strides allow a view (contiguous (B, H, N, D) and the paper's offsets),
# else with S (the layer's (B, N, H, D).transpose(1, 2) over whole segments); failing both, the
# fold copies the rows, which only kernel inputs ever need.
def fold_axes(x5):
    """Which axis of (B, h, S, K, ...) to fold B with: 1 (h) or 2 (S), a view when x5's strides allow."""
    if x5.shape[0] == 1 or x5.stride(0) == x5.shape[1] * x5.stride(1):
        return 1
    if x5.stride(0) == x5.shape[2] * x5.stride(2):
        return 2
    return 1


def fold(x5, axis):
    """(B, h, S, K, *rest) -> (B*h, S, K, *rest) (axis 1) or (B*S, h, K, *rest) (axis 2)."""
    return (x5 if axis == 1 else x5.transpose(1, 2)).flatten(0, 1)


def unfold(y, axis, batch):
    """The inverse of `fold`: a kernel result back to (B, h, S, K, *rest)."""
    y = y.unflatten(0, (batch, -1))
    return y if axis == 1 else y.transpose(1, 2)


def branch_pieces(seq_len, num_heads, segment_length, dilation_rate, head_offsets):
    """Split one branch into pieces: full segments, then the ragged last segment if any."""
    N, W, R = seq_len, min(segment_length, seq_len), dilation_rate
    full = N // W
    parts = [(0, full, W)] if full else []
    if N - full * W:
        parts.append((full * W, 1, N - full * W))  # the last segment, shorter than W
    return [
        Piece(start, S, length, offset, R, heads)
        for start, S, length in parts
        for offset, heads in head_groups(num_heads, R, head_offsets)
        if offset < length  # a short tail may hold no row of this offset
    ]


def piece_key_mask(piece, key_padding_mask, num_heads, axis):
    """The piece's keys' padding flags, folded like its keys: (B, N) or per head (B, H, N) -> (B*h, S, K)
    or (B*S, h, K); None stays None."""
    if key_padding_mask is None:
        return None
    if key_padding_mask.dim() == 2:
        key_padding_mask = key_padding_mask[:, None, :].expand(-1, num_heads, -1)  # (B, H, N), a view
    return fold(piece.view(key_padding_mask), axis)  # (B, h, S, K) folded (a small copy: B*N/R flags)


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
            piece_key_mask(call.queries, key_padding_mask, H, axis),
            False,  # finiteness: checked once below, not per piece
        )
        call.queries.view(out).copy_(unfold(out_p, axis, B))  # scatter, Eqs. 7-8 (autograd records the copy)
        call.queries.view(lse).copy_(unfold(lse_p, axis, B))
    poison = nan_unless_finite((q, k, v))  # (B,): NaN in, NaN out (`kernels.nan_unless_finite`)
    return out + poison.to(out.dtype)[:, None, None, None], lse + poison.to(lse.dtype)[:, None, None]


@dataclass(frozen=True)
class Call:
    """One fused-kernel call of a running merge: rows of q attend rows of one key/value source.

    `queries` selects rows of q (and of the merged out and lse they update); `keys` selects
    rows of source `source`: 0 is (k, v) themselves, i >= 1 the i-th extra (keys, values)
    tensor (the sequence-parallel rank's gathered keys, `parallel/fused.py`).
    """

    queries: Piece
    keys: Piece
    source: int
    causal: bool


def kv_runs(heads, num_heads, group):
    """Grouped-query attention: split a piece's query heads into runs whose kv heads (head j reads
    kv head j // group) form one arithmetic progression: [(query heads slice, (first, step, count))]."""
    js = list(range(num_heads))[heads]
    step_q = heads.step or 1
    runs, i = [], 0
    while i < len(js):
        first = js[i] // group
        step = js[i + 1] // group - first if i + 1 < len(js) else 1
        end = i + 1
        while end < len(js) and js[end] // group == first + (end - i) * step:
            end += 1
        runs.append((slice(js[i], js[end - 1] + 1, step_q), (first, step, end - i)))
        i = end
    return runs


def gqa_calls(piece, causal, num_heads, num_kv_heads, batch):
    """The calls of one piece whose keys come from k, v with `num_kv_heads` heads (`kv_runs`).

    A run of query heads that all read one kv head is one call with a stride-0 view of it when
    B = 1 (the kernel's batch axis is then the heads'), else one call per query head: folding
    B with a repeated head is no view, and a copy of k's rows is what grouped-query attention
    is there to avoid.
    """
    if num_kv_heads == num_heads:
        return [Call(piece, piece, 0, causal)]
    calls = []
    for heads, (first, step, count) in kv_runs(piece.heads, num_heads, num_heads // num_kv_heads):
        if step == 0 and count > 1 and batch > 1:
            for i in range(count):
                one = slice(heads.start + i * heads.step, heads.start + i * heads.step + 1)
                calls.append(
                    Call(replace(piece, heads=one), replace(piece, heads=one, kv_heads=(first, 1, 1)), 0, causal)
                )
        else:
            calls.append(
                Call(replace(piece, heads=heads), replace(piece, heads=heads, kv_heads=(first, step, count)), 0, causal)
            )
    return calls


def branch_calls(seq_len, num_heads, branches, causal, head_offsets, num_kv_heads=None, batch=1):
    """The calls of a mixture on one device: every piece of every branch attends its own rows
    (its own kv heads' rows with grouped-query keys, `gqa_calls`)."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    return [
        call
        for w, r in branches
        for piece in branch_pieces(seq_len, num_heads, w, r, head_offsets)
        for call in gqa_calls(piece, causal, num_heads, num_kv_heads, batch)
    ]


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
        acc.mul_(old_scale.unsqueeze(-1)).add_(out_new * weight.unsqueeze(-1))
        total.mul_(old_scale).add_(weight)
        top.copy_(new_top)

    def result(self):
        """(out, lse): acc / total and top + log(total); 0 and -inf on rows no call reached."""
        covered = self.total > 0
        safe_total = torch.where(covered, self.total, torch.ones_like(self.total))
        out = self.acc / safe_total.unsqueeze(-1)
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
    calls = branch_calls(N, H, branches, causal, head_offsets, k.shape[1], B)
    return RunningMerge.apply(calls, None if key_padding_mask is None else [key_padding_mask], q, k, v)
