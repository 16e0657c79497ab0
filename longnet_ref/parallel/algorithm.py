"""Sequence parallelism for dilated attention: the per-rank algorithm (LongNet Sec. 3.1).

The N tokens are split into P contiguous chunks of l = N / P, one per rank: rank p holds
positions [p l, (p + 1) l). Every rank runs `sequence_parallel_attention` on its own chunk.
For each branch (w, r), with w clipped to N:

- w <= l: the chunk holds whole segments (l % w == 0), so the branch is computed locally by
  the single-device `dilated_branch`: no communication.
- w > l: a segment spans g = w / l ranks (w % l == 0, so segments start on chunk borders).
  1. Sparsify (Eq. 4): each rank keeps the rows of its chunk that each head keeps. A row's
     residue counts from the *segment* start, t = p l - s w on this rank, so a head with
     offset o keeps local rows (o - t) mod r, + r, + 2r, ...
  2. All-gather the sparse K and V among the segment's g ranks only: about w / r rows per
     head in total, whatever N is. That is the paper's point: communication does not grow
     with the sequence.
  3. Attend: the local sparse queries attend the gathered keys. In position order the keys
     are three blocks: earlier ranks' (all in the query's past), the rank's own (causal: a
     lower triangle), later ranks' (all in the future: dropped when causal). One fused-kernel
     call per block; the blocks are merged by their log-sum-exps, which is exactly one softmax
     over their union (the identity behind Eq. 10, used here inside a branch).

The branches are then merged as on one device (`merge_branches`, Eq. 10). The backward is
autograd's; the all-gather's backward is a reduce-scatter (`comm.AllGather`).

That is `implementation="readable"`, this module's code. The default, "fast", does the same
work as one list of fused-kernel calls merged as they finish (`fused.py`): same collectives,
same result, without autograd's bookkeeping of every slice.

Faults: every check that can fail is made before the first collective that could wait on
it. Each rank checks its own input without raising, the ranks exchange one small metadata
record, and from then on every rank sees the same facts and raises the same ValueError (or
none). No rank is left waiting in a collective for a rank that gave up.

Shape legend: B batch, H heads, N length, l = N / P local length, D head dim, W segment
length, R dilation rate, K = ceil(l / R) kept rows per head on one rank, g ranks per
segment, h heads in an offset group.
"""

from __future__ import annotations

import math

import torch

from ..checks import check_branches, check_head_offsets, check_implementation, check_qkv
from ..fast import _lse_dtype
from ..kernels import fused_attention
from ..mixture import dilated_branch, merge_branches
from ..patterns import head_groups
from .comm import JoinBackward, all_gather, as_communicator
from .fused import fused_rank_attention
from .plan import kept_rows, plan_branches


def distributed_branch(q, k, v, plan, comm, *, causal=False, head_offsets="paper"):
    """One branch whose segment spans `plan.ranks`: this rank's `(out, lse)`, (B, H, l, D) and (B, H, l)."""
    B, H, l, D = q.shape
    r, ranks = plan.dilation_rate, plan.ranks
    g, me = len(ranks), ranks.index(comm.rank)
    groups = head_groups(H, r, head_offsets)  # [(offset, heads slice)]
    K = math.ceil(l / r)

    # 1. Sparsify this rank's keys and values (Eq. 4) into one buffer. Rank j of the segment
    # starts j*l after the segment start; a head group that keeps fewer than K rows here is
    # zero-padded (only when r does not divide l), and the padding is never attended.
    sparse = k.new_zeros(2, B, H, K, D)
    for offset, heads in groups:
        first, count = kept_rows(me * l, l, r, offset)
        sparse[0, :, heads, :count] = k[:, heads, first::r]  # (B, h, count, D)
        sparse[1, :, heads, :count] = v[:, heads, first::r]

    # 2. All-gather among the segment's ranks only: (g, 2, B, H, K, D), slot j from rank j.
    gathered = all_gather(sparse, comm, ranks, plan.index) if g > 1 else sparse[None]

    # 3. Attend, one head group at a time, block by block.
    out = q.new_zeros(B, H, l, D)
    lse = torch.full((B, H, l), -math.inf, dtype=_lse_dtype(q), device=q.device)
    for offset, heads in groups:
        first, count = kept_rows(me * l, l, r, offset)
        if count == 0:  # r > l: this chunk may hold no row of this offset
            continue
        rows = slice(first, None, r)
        queries = q[:, heads, rows]  # (B, h, count, D)

        counts = [kept_rows(j * l, l, r, offset)[1] for j in range(g)]  # real rows per rank
        blocks = [(k[:, heads, rows], v[:, heads, rows], causal)]  # own keys: the causal diagonal block
        if me > 0:  # earlier ranks: every key is in the past
            blocks.append((*gathered_rows(gathered, range(me), heads, counts), False))
        if me < g - 1 and not causal:  # later ranks: every key is in the future
            blocks.append((*gathered_rows(gathered, range(me + 1, g), heads, counts), False))
        results = [fused_attention(queries, kb, vb, causal=c) for kb, vb, c in blocks if kb.shape[2] > 0]
        o, s = merge_branches([o for o, _ in results], [s for _, s in results])  # (B, h, count, D), (B, h, count)
        out[:, heads, rows] = o  # scatter (Eqs. 6-8)
        lse[:, heads, rows] = s
    if g > 1 and gathered.requires_grad:
        out, lse = JoinBackward.apply(out, lse, gathered)  # every rank takes part in the backward's reduce-scatter
    return out, lse


def gathered_rows(gathered, ranks, heads, counts):
    """Keys and values of `ranks` (slots of `gathered`) for one head group, padding dropped: 2 x (B, h, n, D).

    Slots are in rank order and rows in position order, so the result is in position order.
    """
    keys = torch.cat([gathered[j, 0, :, heads, : counts[j]] for j in ranks], dim=2)
    values = torch.cat([gathered[j, 1, :, heads, : counts[j]] for j in ranks], dim=2)
    return keys, values


def check_world(comm, q, k, v, segment_lengths, dilation_rates, causal, head_offsets, implementation):
    """Check the input of every rank, on every rank; return this rank's branch plans.

    One `all_gather_object` of a small record is the only collective before the checks: a
    rank whose own input is bad reports it instead of raising, so every rank reaches the
    exchange and every rank then raises the same ValueError.
    """
    error, branches = None, None
    try:
        check_qkv(q, k, v)
        branches = check_branches(segment_lengths, dilation_rates)
        check_head_offsets(head_offsets)
        check_implementation(implementation)
    except ValueError as problem:
        error = str(problem)
    meta = {"error": error}
    if error is None:
        meta.update(shape=tuple(q.shape), dtype=str(q.dtype), device=q.device.type)
        meta.update(branches=branches, causal=bool(causal), head_offsets=head_offsets, implementation=implementation)
        # Ranks must agree on which inputs get gradients, or only some would join the
        # backward's reduce-scatters.
        meta.update(requires_grad=tuple(torch.is_grad_enabled() and x.requires_grad for x in (q, k, v)))
    metas = comm.all_gather_object(meta)

    # From here on every rank decides from the same list `metas`.
    errors = [f"rank {j}: {m['error']}" for j, m in enumerate(metas) if m["error"] is not None]
    if errors:
        raise ValueError("invalid input on " + "; ".join(errors))
    for key, what in [
        ("shape", "shape (B, H, N / P, D) for q, k and v"),
        ("dtype", "dtype"),
        ("device", "device type"),
        ("branches", "segment_lengths and dilation_rates"),
        ("causal", "causal"),
        ("head_offsets", "head_offsets"),
        ("implementation", "implementation"),
        ("requires_grad", "requires_grad for (q, k, v)"),
    ]:
        values = [m[key] for m in metas]
        if any(value != values[0] for value in values):
            listing = ", ".join(f"rank {j}: {value}" for j, value in enumerate(values))
            raise ValueError(f"every rank must pass the same {what}, got {listing}")

    P, l = comm.world_size, metas[0]["shape"][2]
    N = l * P
    for i, (w, _) in enumerate(branches):
        w_eff = min(w, N)
        if w_eff <= l and l % w_eff:
            raise ValueError(
                f"segment_lengths[{i}] = {w} must divide the local length l = N / P = {l} (N = {N}, P = {P}): "
                "a segment would straddle two ranks"
            )
        if w_eff > l and w_eff % l:
            raise ValueError(
                f"segment_lengths[{i}] = {w} is longer than the local length l = N / P = {l} (N = {N}, P = {P}) "
                f"but not a multiple of it, nor >= N: segments must start on rank borders"
            )
    all_plans = [plan_branches(rank, P, l, branches) for rank in range(P)]
    comm.prepare([plan.ranks for plans in all_plans for plan in plans])  # sub-groups, in one order everywhere
    return all_plans[comm.rank]


def sequence_parallel_attention(
    q_local,
    k_local,
    v_local,
    segment_lengths,
    dilation_rates,
    *,
    causal=False,
    head_offsets="paper",
    group=None,
    return_lse=False,
    implementation="fast",
):
    """Dilated attention (Eqs. 3-10) of this rank's chunk of a sequence split over P ranks (Sec. 3.1).

    Every rank of the group must call it, with the same branches and options and chunks of
    one shape; together they compute exactly `dilated_attention` of the whole sequence.

    Args:
        q_local, k_local, v_local: (B, H, l, D), this rank's contiguous chunk; N = l * P.
        segment_lengths, dilation_rates: the branches (w_i, r_i). A branch with w <= l needs
            l % w == 0; one with l < w < N needs w % l == 0 (segments start on rank borders).
        causal, head_offsets: as in `dilated_attention`.
        group: None (torch.distributed's default group), a torch.distributed ProcessGroup of
            every process of the job, or a `Communicator` (e.g. a rank of a `SimulatedGroup`).
        return_lse: also return the merged log-sum-exp (B, H, l).
        implementation: "fast" (default: the rank's whole mixture as one list of fused-kernel
            calls merged as they finish, `fused.py`) or "readable" (branch by branch as below:
            `dilated_branch` step by step, `distributed_branch`, then `merge_branches`).

    Returns:
        out_local (B, H, l, D), or `(out_local, lse_local)`.

    Raises:
        ValueError on every rank (never on some ranks only) for bad or inconsistent input.
    """
    comm = as_communicator(group)
    plans = check_world(
        comm, q_local, k_local, v_local, segment_lengths, dilation_rates, causal, head_offsets, implementation
    )
    if implementation == "fast":
        out, lse = fused_rank_attention(
            q_local, k_local, v_local, plans, comm, causal=causal, head_offsets=head_offsets
        )
        return (out, lse) if return_lse else out

    outs, lses = [], []
    for plan in plans:
        if plan.local:
            o, s = dilated_branch(
                q_local,
                k_local,
                v_local,
                plan.segment_length,
                plan.dilation_rate,
                causal=causal,
                head_offsets=head_offsets,
                implementation="readable",
            )
        else:
            o, s = distributed_branch(q_local, k_local, v_local, plan, comm, causal=causal, head_offsets=head_offsets)
        outs.append(o)
        lses.append(s)
    out, lse = merge_branches(outs, lses)  # Eq. 10, exactly as on one device
    return (out, lse) if return_lse else out
