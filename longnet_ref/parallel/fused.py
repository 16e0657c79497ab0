"""One rank's whole mixture in one running merge: the fast path of `sequence_parallel_attention`.

`algorithm.py` computes a rank's branches one by one (`dilated_branch` for a local branch,
`distributed_branch` for one whose segment spans ranks) and merges them with
`merge_branches`: the steps of Sec. 3.1 as the paper states them. Run that way, autograd
records every slice and scatter of every head group and block, and each branch's log-sum-exp
takes a gradient of its own; on a CPU that glue costs more than the small kernels of the
sparse branches.

Here the same work is one list of fused-kernel calls (`fast.Call`) merged as they finish in
one autograd node (`fast.RunningMerge`), exactly as the single-device fast path does:

- a local branch (w <= l): its pieces, as on one device (`fast.branch_calls`);
- a distributed branch: the rank's kept rows (Eq. 4) of k and v gathered by index into a
  (2, B, H, K, D) buffer, all-gathered among the segment's g ranks (`comm.all_gather`, the
  only collective; its backward is the reduce-scatter), laid out as one (2, B, H, g K, D)
  key/value source; then per head group, the kept queries attend
  - non-causal: every gathered key of the segment, in one call (runs of ranks without
    padding rows between them are one contiguous block);
  - causal: their own rank's keys (the causal diagonal block, read from k itself) and the
    keys of the earlier ranks of the segment (all in the past).

The backward needs no branch output and no log-sum-exp gradient: each call's kernel backward
takes the merged output and `alpha dO` (`fast.py`), so the result is exact.

Shape legend: B batch, H heads, l local length, D head dim, R dilation rate,
K = ceil(l / R) kept rows per head on one rank, g ranks per segment, h heads in a group.
"""

from __future__ import annotations

import math

import torch

from ..fast import Call, Piece, RunningMerge, branch_calls
from ..patterns import head_groups
from .comm import all_gather
from .plan import kept_rows


def sparse_rows(plan, rank, num_heads, head_offsets, device):
    """Row index (H, K) of the keys each head keeps on `rank` (Eq. 4), and the groups' `(offset, heads, first, count)`.

    A head group that keeps fewer than K rows here (only when r does not divide l) is padded
    with row l - 1, whatever it holds: padding rows are never attended (`key_runs`).
    """
    l, r = plan.local_length, plan.dilation_rate
    me = plan.ranks.index(rank)
    K = math.ceil(l / r)
    index = torch.zeros(num_heads, K, dtype=torch.long, device=device)
    groups = []
    for offset, heads in head_groups(num_heads, r, head_offsets):
        first, count = kept_rows(me * l, l, r, offset)
        index[heads] = torch.arange(first, first + r * K, r, device=device).clamp(max=l - 1)
        groups.append((offset, heads, first, count))
    return index, groups


def key_runs(counts, K, ranks):
    """Rows of the gathered (g K)-row source holding the real keys of `ranks`: `[(start, n)]`.

    Rank j's rows are [j K, j K + counts[j]); neighbours with no padding between them merge.
    """
    runs = []
    for j in ranks:
        if counts[j] == 0:
            continue
        if runs and runs[-1][0] + runs[-1][1] == j * K:
            runs[-1] = (runs[-1][0], runs[-1][1] + counts[j])
        else:
            runs.append((j * K, counts[j]))
    return runs


def distributed_calls(plan, rank, groups, source, causal):
    """The kernel calls of one distributed branch on `rank`; keys of source `source` are the gathered ones."""
    l, r, g = plan.local_length, plan.dilation_rate, len(plan.ranks)
    me, K = plan.ranks.index(rank), math.ceil(l / r)
    calls = []
    for offset, heads, first, count in groups:
        if count == 0:  # r > l: this chunk may hold no row of this offset
            continue
        rows = Piece(first, 1, l - first, 0, r, heads)  # one run: rows first, first + r, ... -> (h, 1, count, D)
        counts = [kept_rows(j * l, l, r, offset)[1] for j in range(g)]  # real rows per rank of the segment
        if causal:  # own keys: the causal diagonal block; earlier ranks: all in the past
            calls.append(Call(rows, rows, 0, True))
        for start, n in key_runs(counts, K, range(me) if causal else range(g)):
            calls.append(Call(rows, Piece(start, 1, n, 0, 1, heads), source, False))  # n gathered rows from start
    return calls


def fused_rank_attention(q, k, v, plans, comm, *, causal, head_offsets):
    """This rank's (out, lse), (B, H, l, D) and (B, H, l): every branch in one `RunningMerge`."""
    B, H, l, D = q.shape
    local = [(plan.segment_length, plan.dilation_rate) for plan in plans if plan.local]
    calls = branch_calls(l, H, local, causal, head_offsets)
    sources = []  # (2, B, H, g K, D) per distributed branch
    for plan in plans:
        if plan.local:
            continue
        index, groups = sparse_rows(plan, comm.rank, H, head_offsets, q.device)
        K, g = index.shape[1], len(plan.ranks)
        rows = index[None, :, :, None].expand(B, H, K, D)
        sparse = torch.stack([k.gather(2, rows), v.gather(2, rows)])  # (2, B, H, K, D), Eq. 4
        gathered = all_gather(sparse, comm, plan.ranks, plan.index) if g > 1 else sparse[None]  # (g, 2, B, H, K, D)
        sources.append(gathered.permute(1, 2, 3, 0, 4, 5).reshape(2, B, H, g * K, D))  # rank-major rows
        calls += distributed_calls(plan, comm.rank, groups, len(sources), causal)
    return RunningMerge.apply(calls, q, k, v, *sources)
