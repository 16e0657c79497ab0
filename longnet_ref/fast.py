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
log-sum-exp, so memory does not grow with the number of branches. Its backward uses the
identity of `kernels.py`: a branch's kernel backward, given the merged output O in place of
its own and `alpha_i dO` as gradient (alpha_i = exp(lse_i - LSE), the branch's merge weight),
returns exactly the gradient that flows through the branch *and* its merge weight:
Delta = alpha_i dO.O = alpha_i dO.O_i - g_i, where g_i = alpha_i dO.(O_i - O) is the
gradient of lse_i. No branch output needs to be kept for the backward.

Shape legend: B batch, H heads, N length, D head dim, W segment length, R dilation rate,
S segments, K = ceil(W / R) rows kept per segment, h heads in a group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .kernels import attention_backward, attention_forward, fused_attention
from .patterns import head_groups


@dataclass(frozen=True)
class Piece:
    """Rows that one fused-kernel call attends: one head group, segments of one length."""

    start: int  # first position covered
    num_segments: int  # S
    segment_length: int  # W (the ragged tail's own length for the last piece)
    offset: int  # o, the heads' offset
    dilation_rate: int  # R
    heads: slice  # heads sharing the offset

    def view(self, x, b):
        """Kept rows of batch element b: (B, H, N, *E) -> (h, S, K, *E), a view of x."""
        rows = x[b, self.heads, self.start : self.start + self.num_segments * self.segment_length]
        rows = rows.unflatten(1, (self.num_segments, self.segment_length))  # (h, S, W, *E)
        return rows[:, :, self.offset :: self.dilation_rate]  # (h, S, K, *E)


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
    """One branch (validated inputs), differentiable in out and lse; see `dilated.dilated_branch`."""
    B, H, N, D = q.shape
    out = q.new_zeros(B, H, N, D)
    lse = torch.full((B, H, N), -math.inf, dtype=_lse_dtype(q), device=q.device)
    for piece in branch_pieces(N, H, segment_length, dilation_rate, head_offsets):
        for b in range(B):
            o, l = fused_attention(piece.view(q, b), piece.view(k, b), piece.view(v, b), causal=causal)
            piece.view(out, b).copy_(o)  # scatter, Eqs. 6-8 (autograd records the copy)
            piece.view(lse, b).copy_(l)
    return out, lse


def _lse_dtype(q):
    # The kernels return float32 log-sum-exps for half inputs; accumulate in that precision.
    return torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype


class FusedDilatedAttention(torch.autograd.Function):
    """The whole mixture (Eqs. 3-10) in one autograd node: (q, k, v) -> (out, lse)."""

    @staticmethod
    def forward(ctx, q, k, v, branches, causal, head_offsets):
        ctx.set_materialize_grads(False)
        B, H, N, D = q.shape
        scale = 1.0 / math.sqrt(D)
        acc = _lse_dtype(q)
        out = torch.zeros(B, H, N, D, dtype=acc, device=q.device)  # running merged output
        lse = torch.full((B, H, N), -math.inf, dtype=acc, device=q.device)  # running merged LSE
        pieces, saved = [], []
        for w, r in branches:
            for piece in branch_pieces(N, H, w, r, head_offsets):
                for b in range(B):
                    o, l, kernel_saved = attention_forward(
                        piece.view(q, b), piece.view(k, b), piece.view(v, b), causal, scale
                    )
                    _merge_into(piece.view(out, b), piece.view(lse, b), o, l)
                    pieces.append((piece, b))
                    saved.append((l, *kernel_saved))
        out = out.to(q.dtype)
        ctx.pieces, ctx.causal, ctx.scale = pieces, causal, scale
        ctx.saved_sizes = [len(s) for s in saved]
        ctx.save_for_backward(q, k, v, out, lse, *[t for s in saved for t in s])
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *flat = ctx.saved_tensors
        acc = _lse_dtype(q)
        dq, dk, dv = (torch.zeros_like(x, dtype=acc) for x in (q, k, v))
        if dout is None:  # only the LSE was used
            dout = torch.zeros_like(out)
        at = 0
        for (piece, b), size in zip(ctx.pieces, ctx.saved_sizes):
            l, *kernel_saved = flat[at : at + size]
            at += size
            alpha = torch.exp(l - piece.view(lse, b))  # (h, S, K): this branch's merge weight
            piece_dout = piece.view(dout, b) * alpha.unsqueeze(-1)
            piece_dlse = None if dlse is None else piece.view(dlse, b) * alpha
            grads = attention_backward(
                piece_dout,
                piece.view(q, b),
                piece.view(k, b),
                piece.view(v, b),
                piece.view(out, b),
                kernel_saved,
                ctx.causal,
                ctx.scale,
                dlse=piece_dlse,
            )
            for total, grad in zip((dq, dk, dv), grads):
                piece.view(total, b).add_(grad)
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), None, None, None


def _merge_into(out_rows, lse_rows, o, l):
    """Eq. 10, one branch at a time: fold (o, l) into the running (out_rows, lse_rows), in place.

    With s = exp(lse): out <- (s_old out + s_new o) / (s_old + s_new), computed from log-sum-exps
    so nothing overflows. Rows seen first get s_old = exp(-inf) = 0 and simply take o.
    """
    new_lse = torch.logaddexp(lse_rows, l)  # (h, S, K)
    out_rows.mul_(torch.exp(lse_rows - new_lse).unsqueeze(-1))
    out_rows.add_(o * torch.exp(l - new_lse).unsqueeze(-1))
    lse_rows.copy_(new_lse)


def fast_dilated_attention(q, k, v, branches, *, causal=False, head_offsets="paper"):
    """The mixture through `FusedDilatedAttention` (validated inputs): `(out, lse)`."""
    return FusedDilatedAttention.apply(q, k, v, branches, causal, head_offsets)
