"""The fast path: strided views of q, k, v fed to torch's fused attention kernel.

For a branch `(w, r)` and the heads that share offset o, the kept rows of every segment are
a strided view, with no copy and no index tensor:

    x[b, heads]                    (h, N, D)       heads: a slice (patterns.head_groups)
      [:, start : start + S*W]     (h, S*W, D)     full segments (the ragged tail is its own piece)
      .unflatten(1, (S, W))        (h, S, W, D)    segment, Eq. 3
      [:, :, o::r]                 (h, S, K, D)    sparsify, Eq. 4

and the fused kernel reads it as a batch of h, S "heads" of K rows. Outputs go back through
the same views (scatter, Eqs. 6-8).

`dilated_attention` merges branches as they finish (Eq. 10) in a running output and
log-sum-exp, so memory does not grow with the number of branches: `RunningMerge`, one
autograd node for a list of kernel `Call`s (query rows attend key rows). On one device every
call reads its keys from the same rows of k as its queries; a sequence-parallel rank adds calls
whose keys come from other ranks (`parallel/fused.py`). The backward uses the
identity of `kernels.py`: a branch's kernel backward, given the merged output O in place of
its own and `alpha_i dO` as gradient (alpha_i = exp(lse_i - LSE), the branch's merge weight),
returns exactly the gradient that flows through the branch *and* its merge weight:
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
from dataclasses import dataclass

import torch

from .kernels import attention_backward, attention_forward, fused_attention
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

    def view(self, x, b):
        """Kept rows of batch element b: (B, H, N, *rest) -> (h, S, K, *rest), a view of x."""
        rows = x[b, self.heads, self.start : self.start + self.num_segments * self.segment_length]
        rows = rows.unflatten(1, (self.num_segments, self.segment_length))  # (h, S, W, *rest)
        return rows[:, :, self.offset :: self.dilation_rate]  # (h, S, K, *rest)


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


def fast_branch(q, k, v, segment_length, dilation_rate, *, causal=False, head_offsets="paper"):
    """One branch (validated inputs), differentiable in out and lse; see `mixture.dilated_branch`."""
    B, H, N, D = q.shape
    out = q.new_zeros(B, H, N, D)
    lse = torch.full((B, H, N), -math.inf, dtype=_lse_dtype(q), device=q.device)
    for piece in branch_pieces(N, H, segment_length, dilation_rate, head_offsets):
        for b in range(B):
            out_b, lse_b = fused_attention(piece.view(q, b), piece.view(k, b), piece.view(v, b), causal=causal)
            piece.view(out, b).copy_(out_b)  # scatter, Eqs. 6-8 (autograd records the copy)
            piece.view(lse, b).copy_(lse_b)
    return out, lse


def _lse_dtype(q):
    # The kernels return float32 log-sum-exps for half inputs; accumulate in that precision.
    return torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype


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


def branch_calls(seq_len, num_heads, branches, causal, head_offsets):
    """The calls of a mixture on one device: every piece of every branch attends its own rows."""
    return [
        Call(piece, piece, 0, causal)
        for w, r in branches
        for piece in branch_pieces(seq_len, num_heads, w, r, head_offsets)
    ]


class RunningMerge(torch.autograd.Function):
    """Attention calls merged as they finish (Eq. 10) in one autograd node: (q, k, v, *kv) -> (out, lse).

    `kv` are extra key/value sources, each (2, B, H, n, D) (keys, values). A row of q that no
    call reads gets out 0 and lse -inf.
    """

    @staticmethod
    def forward(ctx, calls, q, k, v, *kv):
        ctx.set_materialize_grads(False)
        B, H, N, D = q.shape
        scale = 1.0 / math.sqrt(D)
        acc = _lse_dtype(q)
        sources = [(k, v), *((x[0], x[1]) for x in kv)]
        out = torch.zeros(B, H, N, D, dtype=acc, device=q.device)  # running merged output
        lse = torch.full((B, H, N), -math.inf, dtype=acc, device=q.device)  # running merged LSE
        saved = []
        for call in calls:
            keys, values = sources[call.source]
            for b in range(B):
                out_b, lse_b, kernel_saved = attention_forward(
                    call.queries.view(q, b), call.keys.view(keys, b), call.keys.view(values, b), call.causal, scale
                )
                _merge_into(call.queries.view(out, b), call.queries.view(lse, b), out_b, lse_b)
                saved.append((lse_b, *kernel_saved))
        out = out.to(q.dtype)
        ctx.calls, ctx.scale, ctx.batch = calls, scale, B
        ctx.saved_sizes = [len(group) for group in saved]
        ctx.save_for_backward(q, k, v, out, lse, *kv, *[t for group in saved for t in group])
        ctx.num_kv = len(kv)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        kv, flat = rest[: ctx.num_kv], rest[ctx.num_kv :]
        acc = _lse_dtype(q)
        sources = [(k, v), *((x[0], x[1]) for x in kv)]
        dq, dk, dv = (torch.zeros_like(x, dtype=acc) for x in (q, k, v))
        dkv = [torch.zeros_like(x, dtype=acc) for x in kv]
        grads = [(dk, dv), *((d[0], d[1]) for d in dkv)]
        if dout is None:  # only the LSE was used
            dout = torch.zeros_like(out)
        saved = _regroup(flat, ctx.saved_sizes)  # one (lse, *kernel_saved) per (call, b), in forward order
        for call in ctx.calls:
            keys, values = sources[call.source]
            dkeys, dvalues = grads[call.source]
            rows = call.queries
            for b in range(ctx.batch):
                lse_b, *kernel_saved = next(saved)
                alpha = torch.exp(lse_b - rows.view(lse, b))  # (h, S, K): this call's merge weight
                # the merged out in place of the call's own: see the module docstring
                dq_b, dk_b, dv_b = attention_backward(
                    rows.view(dout, b) * alpha.unsqueeze(-1),
                    rows.view(q, b),
                    call.keys.view(keys, b),
                    call.keys.view(values, b),
                    rows.view(out, b),
                    kernel_saved,
                    call.causal,
                    ctx.scale,
                    dlse=None if dlse is None else rows.view(dlse, b) * alpha,
                )
                rows.view(dq, b).add_(dq_b)
                call.keys.view(dkeys, b).add_(dk_b)
                call.keys.view(dvalues, b).add_(dv_b)
        return None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *(d.to(x.dtype) for d, x in zip(dkv, kv))


def _regroup(flat, sizes):
    """Split a flat tuple back into consecutive groups of the given sizes."""
    at = 0
    for size in sizes:
        yield flat[at : at + size]
        at += size


def _merge_into(out_rows, lse_rows, out_new, lse_new):
    """Eq. 10, one branch at a time: fold (out_new, lse_new) into the running (out_rows, lse_rows), in place.

    With denominators exp(lse): out <- (exp(lse_old) out + exp(lse_new) out_new) / (exp(lse_old) +
    exp(lse_new)), computed from log-sum-exps so nothing overflows. Rows seen first have
    exp(lse_old) = exp(-inf) = 0 and simply take out_new.
    """
    new_lse = torch.logaddexp(lse_rows, lse_new)  # (h, S, K)
    out_rows.mul_(torch.exp(lse_rows - new_lse).unsqueeze(-1))
    out_rows.add_(out_new * torch.exp(lse_new - new_lse).unsqueeze(-1))
    lse_rows.copy_(new_lse)


def fast_dilated_attention(q, k, v, branches, *, causal=False, head_offsets="paper"):
    """The mixture (Eqs. 3-10) through one `RunningMerge` (validated inputs): `(out, lse)`."""
    B, H, N, D = q.shape
    return RunningMerge.apply(branch_calls(N, H, branches, causal, head_offsets), q, k, v)
