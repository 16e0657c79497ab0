"""Sequence parallelism for dilated attention: the per-rank algorithm (LongNet Sec. 3.1).

The paper's distributed algorithm: the N tokens are split into P contiguous chunks of
l = N / P, one per device (rank): rank p holds positions [p l, (p + 1) l), its own chunk of q,
k and v, (B, H, l, D). Every rank runs `sequence_parallel_attention` on its chunk. For each
branch (w, r), with w clipped to N (`plan.plan_branches`):

- w <= l: the chunk holds whole segments (l % w == 0), so the branch is computed locally by
  the single-device `dilated_branch` (Eqs. 3-8): no communication.
- w > l: a segment spans g = w / l ranks (w % l == 0, so segments start on rank borders).
  1. Sparsify (Eqs. 3-5): each rank keeps the rows of its chunk that each head keeps,
     `plan.kept_run`, a gathered form of the keep rule `patterns.keeps` (positions count from
     the segment's start, not the chunk's).
  2. All-gather the sparse K and V among the segment's g ranks only: about w / r rows per
     head in total, whatever N is. That is the paper's point: communication does not grow
     with the sequence.
  3. Attend: the rank's sparse queries attend the gathered keys. In position order the keys
     are three blocks: earlier ranks' (all in the query's past), the rank's own (causal: a
     lower triangle), later ranks' (all in the future: dropped when causal). One fused-kernel
     call per block; the blocks are merged by their log-sum-exps, which is exactly one softmax
     over their union (the identity behind Eq. 10, used here inside a branch). The outputs are
     scattered back to their rows (Eqs. 7-8).

The branches are then merged as on one device (`merge_branches`, Eq. 10). The backward is
autograd's; the all-gather's backward is a reduce-scatter (`comm.AllGather`). Together the
ranks compute exactly `dilated_attention` of the whole sequence, forward and backward.

Where the official code differs (torchscale's `DilatedAttention.gather_kv`): its causal path
keeps only the gathered keys of the ranks *before* this one (`x[:current_rank]`), so a rank
drops its own keys, a rank that starts a segment gets none, and rank 0 attends one block of
zeros (`x[:1] * 0`), which still takes softmax mass. Here the own block is attended with its
causal mask and nothing is ever padded with attended keys: the result is exact.

Before any of this, `consensus.check_world` checks every rank's input on every rank: all
ranks raise the same ValueError, or none does, so no rank is left waiting in a collective.

That is `implementation="readable"`, this module's code. The default, "fast", does the same
work as one list of fused-kernel calls merged as they finish (`fused.py`): same collectives,
same result, without autograd's bookkeeping of every slice.

Letters: the package legend (`longnet_ref/__init__.py`), plus n_kept = ceil(l / r), the
rows each head keeps on one rank (padded), and `me`, this rank's index among the g ranks of
its segment (`peer`: any of them).
"""

from __future__ import annotations

import math

import torch

from ..attention import lse_dtype, repeat_kv_heads
from ..checks import check_flag, check_head_offsets, check_key_padding_mask, check_qkv
from ..kernels import fused_attention, require_fused_kernel
from ..mixture import dilated_branch, merge_branches
from ..patterns import head_groups
from .comm import JoinBackward, all_gather, as_communicator
from .consensus import check_world
from .fused import fused_rank_attention
from .plan import BranchPlan, kept_run


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
    key_padding_mask=None,
):
    """Dilated attention (Eqs. 3-10) of this rank's chunk of a sequence split over P ranks (Sec. 3.1).

    Every rank of the group must call it, with the same branches and options and chunks of
    one shape; together they compute exactly `dilated_attention` of the whole sequence.

    Args:
        q_local, k_local, v_local: (B, H, l, D), this rank's contiguous chunk; N = l * P. k and v
            may have H_kv heads dividing H (grouped-query attention, as in `dilated_attention`); a
            distributed branch then gathers, per query head, its kv head's kept rows.
        segment_lengths, dilation_rates: the branches (w_i, r_i). A branch with w <= l needs
            l % w == 0; one with l < w < N needs w % l == 0 (segments start on rank borders).
        causal, head_offsets: as in `dilated_attention`.
        group: None (torch.distributed's default group), a torch.distributed ProcessGroup of
            every process of the job, or a `Communicator` (e.g. a rank of a `SimulatedGroup`).
        return_lse: also return the merged log-sum-exp (B, H, l).
        implementation: "fast" (default: the rank's whole mixture as one list of fused-kernel
            calls merged as they finish, `fused.py`) or "readable" (branch by branch as below:
            `dilated_branch` step by step, `distributed_branch`, then `merge_branches`).
        key_padding_mask: None, or this rank's chunk of the (B, N) mask, (B, l) bool, True for the
            keys to ignore (as in `dilated_attention`); on every rank or on none. The kept rows'
            flags travel with the kept keys (one more all-gather per distributed branch, of
            B H w / r flags).

    Returns:
        out_local (B, H, l, D), or `(out_local, lse_local)`.

    Raises:
        ValueError on every rank (never on some ranks only) for bad or inconsistent input.
    """
    comm = as_communicator(group)
    check_flag("return_lse", return_lse)  # the same on every rank: a bad one raises everywhere before any collective
    plans = check_world(  # consensus.py: the same ValueError on every rank, or none
        comm, q_local, k_local, v_local, segment_lengths, dilation_rates, causal, head_offsets, implementation,
        key_padding_mask,
    )  # fmt: skip
    require_fused_kernel(q_local.device.type)  # both paths call the kernel; every rank has the same torch
    if implementation == "fast":
        out, lse = fused_rank_attention(
            q_local, k_local, v_local, plans, comm, causal=causal, head_offsets=head_offsets,
            key_padding_mask=key_padding_mask,
        )  # fmt: skip
        return (out, lse) if return_lse else out

    outs, lses = [], []  # out_i (B, H, l, D) and lse_i (B, H, l) of every branch i
    for plan in plans:
        if plan.local:
            out_i, lse_i = dilated_branch(
                q_local,
                k_local,
                v_local,
                plan.segment_length,
                plan.dilation_rate,
                causal=causal,
                head_offsets=head_offsets,
                implementation="readable",
                key_padding_mask=key_padding_mask,
            )
        else:
            out_i, lse_i = distributed_branch(
                q_local, k_local, v_local, plan, comm, causal=causal, head_offsets=head_offsets,
                key_padding_mask=key_padding_mask,
            )  # fmt: skip
        outs.append(out_i)
        lses.append(lse_i)
    out, lse = merge_branches(outs, lses)  # Eq. 10, exactly as on one device
    return (out, lse) if return_lse else out


def distributed_branch(q, k, v, plan, comm, *, causal=False, head_offsets="paper", key_padding_mask=None):
    """One branch whose segment spans `plan.ranks`: this rank's `(out, lse)`, (B, H, l, D) and (B, H, l).

    `plan` is one of `plan_branches`'s for this rank. The checks here are this rank's own and come
    before any collective (`sequence_parallel_attention` checks every rank's input on every rank).
    `key_padding_mask`: this rank's (B, l) chunk of the mask, or None (on every rank alike).
    k and v may have H_kv heads (grouped-query attention): they are repeated to H heads first, the
    readable way (`repeat_kv_heads`), so each query head's slot of the gathered buffer holds its kv
    head's rows.
    """
    check_qkv(q, k, v, grouped=True)
    check_flag("causal", causal)
    key_padding_mask = check_key_padding_mask(key_padding_mask, k)
    check_head_offsets(head_offsets)
    if not isinstance(plan, BranchPlan):
        raise TypeError(f"plan must be a BranchPlan from plan_branches, got {type(plan).__name__}")
    comm = as_communicator(comm)
    if comm.rank not in plan.ranks:
        raise ValueError(f"this rank ({comm.rank}) is not in the plan's ranks {list(plan.ranks)}")
    B, H, l, D = q.shape
    k, v = repeat_kv_heads(k, v, H)  # grouped-query keys: (B, H_kv, l, D) -> (B, H, l, D), a copy
    r, ranks = plan.dilation_rate, plan.ranks
    g, me = len(ranks), ranks.index(comm.rank)
    groups = head_groups(H, r, head_offsets)  # [(offset, heads slice)]
    n_kept = math.ceil(l / r)

    # 1. Sparsify this rank's keys and values (Eqs. 3-5) into one buffer. This chunk starts me * l
    # after the segment start; a head group that keeps fewer than n_kept rows here is
    # zero-padded (only when r does not divide l), and the padding is never attended.
    sparse = k.new_zeros(2, B, H, n_kept, D)
    for offset, heads in groups:
        first, count = kept_run(me * l, l, r, offset)
        sparse[0, :, heads, :count] = k[:, heads, first::r]  # (B, h, count, D)
        sparse[1, :, heads, :count] = v[:, heads, first::r]

    # 2. All-gather among the segment's ranks only: (g, 2, B, H, n_kept, D), slot `peer` from rank ranks[peer].
    gathered = all_gather(sparse, comm, ranks, plan.index) if g > 1 else sparse[None]
    # The padding flags of the kept keys travel the same way (as 0/1 in k's dtype): (g, B, H, n_kept).
    flags = None
    if key_padding_mask is not None:
        sparse_flags = k.new_zeros(B, H, n_kept)
        for offset, heads in groups:
            first, count = kept_run(me * l, l, r, offset)
            sparse_flags[:, heads, :count] = key_padding_mask[:, None, first::r].to(k.dtype)  # (B, 1, count)
        flags = (all_gather(sparse_flags, comm, ranks, plan.index) if g > 1 else sparse_flags[None]) > 0

    # 3. Attend, one head group at a time, block by block.
    out = q.new_zeros(B, H, l, D)
    lse = torch.full((B, H, l), -math.inf, dtype=lse_dtype(q), device=q.device)
    for offset, heads in groups:
        first, count = kept_run(me * l, l, r, offset)
        if count == 0:  # r > l: this chunk may hold no row of this offset
            continue
        rows = slice(first, None, r)
        queries = q[:, heads, rows]  # (B, h, count, D)

        counts = [kept_run(peer * l, l, r, offset)[1] for peer in range(g)]  # real rows per rank
        own_mask = None if flags is None else key_padding_mask[:, rows]  # (B, count): one per group, every head alike
        blocks = [(k[:, heads, rows], v[:, heads, rows], own_mask, causal)]  # own keys: the causal diagonal block
        if me > 0:  # earlier ranks: every key is in the past
            blocks.append((*gathered_rows(gathered, range(me), heads, counts, flags), False))
        if me < g - 1 and not causal:  # later ranks: every key is in the future
            blocks.append((*gathered_rows(gathered, range(me + 1, g), heads, counts, flags), False))
        results = [
            fused_attention(queries, keys, values, causal=causal_block, key_padding_mask=mask)
            for keys, values, mask, causal_block in blocks
            if keys.shape[2] > 0
        ]
        block_outs, block_lses = zip(*results)  # per block: (B, h, count, D), (B, h, count)
        out_h, lse_h = merge_branches(block_outs, block_lses)  # one softmax over the blocks' union
        out[:, heads, rows] = out_h  # scatter (Eqs. 7-8): (B, h, count, D)
        lse[:, heads, rows] = lse_h  # (B, h, count)
    if g > 1 and gathered.requires_grad:
        out, lse = JoinBackward.apply(out, lse, gathered)  # every rank takes part in the backward's reduce-scatter
    return out, lse


def gathered_rows(gathered, peers, heads, counts, flags=None):
    """Keys and values of the ranks `peers` (slots of `gathered`) for one head group, padding dropped:
    2 x (B, h, n, D), and their key padding flags (B, n) (a group's heads keep the same rows), or None.

    Slots are in rank order and rows in position order, so the result is in position order.
    """
    keys = torch.cat([gathered[peer, 0, :, heads, : counts[peer]] for peer in peers], dim=2)
    values = torch.cat([gathered[peer, 1, :, heads, : counts[peer]] for peer in peers], dim=2)
    if flags is None:
        return keys, values, None
    first_head = heads.start
    return keys, values, torch.cat([flags[peer, :, first_head, : counts[peer]] for peer in peers], dim=1)
