"""One rank's whole mixture in one running merge: the fast path of `sequence_parallel_attention`.

`algorithm.py` computes a rank's branches one by one (`dilated_branch` for a local branch,
`distributed_branch` for one whose segment spans ranks) and merges them with
`merge_branches`: the steps of Sec. 3.1 as the paper states them. Run that way, autograd
records every slice and scatter of every head group and block, and each branch's log-sum-exp
takes a gradient of its own; on a CPU that glue costs more than the small kernels of the
sparse branches.

Here the same work is one list of fused-kernel calls (`fast_pieces.Call`) merged as they finish in
one autograd node (`fast.RunningMerge`), exactly as the single-device fast path does:

- a local branch (w <= l): its pieces, as on one device (`fast_pieces.branch_calls`);
- a distributed branch: the rank's kept rows (Eqs. 3-5, `plan.kept_run`, a gathered form of
  `patterns.keeps`) of k and v gathered by index into a (2, B, H, n_kept, D) buffer,
  all-gathered among the segment's g ranks (`comm.all_gather`, the only collective; its
  backward is the reduce-scatter), laid out as one (2, B, H, g n_kept, D) key/value source;
  then per head group, the kept queries attend
  - non-causal: every gathered key of the segment, in one call (runs of ranks without
    padding rows between them are one contiguous block);
  - causal: their own rank's keys (the causal diagonal block, read from k itself) and the
    keys of the earlier ranks of the segment (all in the past).

Grouped-query keys (k, v with H_kv heads): the local calls and the causal diagonal block read the
query heads' kv heads in place, as on one device (`fast_pieces.gqa_calls`); the gathered buffer
holds, for each query head, its kv head's rows at that head's offset, so the gathered calls are
those of H_kv = H. Query heads that share a kv head but not an offset need different rows of it.

The keys each kept query attends are those of `algorithm.py`'s three blocks, in fewer calls,
so they are exactly the keys `patterns.keeps` gives it (tests/test_parallel.py).

The backward needs no branch output and no log-sum-exp gradient: each call's kernel backward
takes the merged output and `alpha dO` (`fast.py`), so the result is exact.

Letters: the package legend (`longnet_ref/__init__.py`), plus n_kept = ceil(l / r), the rows
each head keeps on one rank (padded), `me`, this rank's index among the g ranks of its
segment, and `peer`, any of them.
"""

from __future__ import annotations

import math

import torch

from ..fast import RunningMerge
from ..fast_pieces import Call, Piece, branch_calls, gqa_calls
from ..patterns import head_groups
from .comm import all_gather
from .plan import kept_run


def sparse_rows(plan, rank, num_heads, head_offsets, device):
    """Row index (H, n_kept) of the keys each head keeps on `rank` (Eqs. 3-5), and the groups'
    `(offset, heads, first, count)`.

    The rows of a group are its `kept_run`. A head group that keeps fewer than n_kept rows here
    (only when r does not divide l) is padded with row l - 1, whatever it holds: padding rows
    are never attended (`key_runs`).
    """
    l, r = plan.local_length, plan.dilation_rate
    me = plan.ranks.index(rank)
    n_kept = math.ceil(l / r)
    index = torch.zeros(num_heads, n_kept, dtype=torch.long, device=device)
    groups = []
    for offset, heads in head_groups(num_heads, r, head_offsets):
        first, count = kept_run(me * l, l, r, offset)
        index[heads] = torch.arange(first, first + r * n_kept, r, device=device).clamp(max=l - 1)
        groups.append((offset, heads, first, count))
    return index, groups


def key_runs(counts, n_kept, peers):
    """Rows of the gathered (g n_kept)-row source holding the real keys of the ranks `peers`: `[(start, n)]`.

    Slot `peer`'s rows are [peer n_kept, peer n_kept + counts[peer]); neighbours with no padding
    between them merge.
    """
    runs = []
    for peer in peers:
        if counts[peer] == 0:
            continue
        if runs and runs[-1][0] + runs[-1][1] == peer * n_kept:
            runs[-1] = (runs[-1][0], runs[-1][1] + counts[peer])
        else:
            runs.append((peer * n_kept, counts[peer]))
    return runs


def distributed_calls(plan, rank, groups, source, causal, num_heads=None, num_kv_heads=None, batch=1):
    """The kernel calls of one distributed branch on `rank`; keys of source `source` are the gathered ones.

    The causal diagonal block reads k itself, with `num_kv_heads` heads (`fast_pieces.gqa_calls`)."""
    l, r, g = plan.local_length, plan.dilation_rate, len(plan.ranks)
    me, n_kept = plan.ranks.index(rank), math.ceil(l / r)
    H, H_kv = (num_heads, num_kv_heads or num_heads) if num_heads else (1, 1)  # None: k has q's heads
    calls = []
    for offset, heads, first, count in groups:
        if count == 0:  # r > l: this chunk may hold no row of this offset
            continue
        rows = Piece(first, 1, l - first, 0, r, heads)  # the kept_run: rows first, first + r, ... -> (h, 1, count, D)
        counts = [kept_run(peer * l, l, r, offset)[1] for peer in range(g)]  # real rows per rank of the segment
        if causal:  # own keys: the causal diagonal block (of its kv heads); earlier ranks: all in the past
            calls += gqa_calls(rows, True, H, H_kv, batch)
        for start, n in key_runs(counts, n_kept, range(me) if causal else range(g)):
            calls.append(Call(rows, Piece(start, 1, n, 0, 1, heads), source, False))  # n gathered rows from start
    return calls


def fused_rank_attention(q, k, v, plans, comm, *, causal, head_offsets, key_padding_mask=None):
    """This rank's (out, lse), (B, H, l, D) and (B, H, l): every branch in one `RunningMerge`.

    `key_padding_mask` (B, l) or None: the local keys' flags; a distributed branch gathers the
    flags of its kept keys with them (`RunningMerge`'s per-source masks).
    """
    B, H, l, D = q.shape
    H_kv = k.shape[1]  # grouped-query keys: kv head j // (H / H_kv) serves query head j
    local = [(plan.segment_length, plan.dilation_rate) for plan in plans if plan.local]
    calls = branch_calls(l, H, local, causal, head_offsets, H_kv, B)
    kv_head = torch.arange(H, device=q.device) // (H // max(H_kv, 1))  # (H,); H = H_kv = 0: empty
    sources = []  # (2, B, H, g n_kept, D) per distributed branch
    masks = [key_padding_mask]  # per source: (B, l) for k itself, (B, H, g n_kept) for gathered keys
    for plan in plans:
        if plan.local:
            continue
        index, groups = sparse_rows(plan, comm.rank, H, head_offsets, q.device)
        n_kept, g = index.shape[1], len(plan.ranks)
        if H_kv == H:
            rows = index[None, :, :, None].expand(B, H, n_kept, D)
            sparse = torch.stack([k.gather(2, rows), v.gather(2, rows)])  # (2, B, H, n_kept, D), Eqs. 3-5
        else:  # query head j's rows of its kv head: (B, H, n_kept, D) each
            sparse = torch.stack([k[:, kv_head[:, None], index], v[:, kv_head[:, None], index]])
        gathered = (
            all_gather(sparse, comm, plan.ranks, plan.index) if g > 1 else sparse[None]
        )  # (g, 2, B, H, n_kept, D)
        sources.append(gathered.permute(1, 2, 3, 0, 4, 5).reshape(2, B, H, g * n_kept, D))  # rank-major rows
        if key_padding_mask is not None:  # the kept keys' flags, gathered the same way (0/1 in k's dtype)
            flags = key_padding_mask.to(k.dtype)[:, None, :].expand(B, H, l).gather(2, index[None].expand(B, H, n_kept))
            gathered_flags = (
                all_gather(flags, comm, plan.ranks, plan.index) if g > 1 else flags[None]
            )  # (g, B, H, n_kept)
            masks.append(gathered_flags.permute(1, 2, 0, 3).reshape(B, H, g * n_kept) > 0)
        calls += distributed_calls(plan, comm.rank, groups, len(sources), causal, H, H_kv, B)
    return RunningMerge.apply(calls, None if key_padding_mask is None else masks, q, k, v, *sources)
