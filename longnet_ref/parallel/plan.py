"""How a rank's chunk meets each branch (LongNet Sec. 3.1): local, or a segment spanning ranks.

Shape legend: l = N / P local length, W segment length, R dilation rate, g ranks per segment.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BranchPlan:
    """How one rank computes one branch."""

    index: int  # position in the list of branches (labels the collectives)
    segment_length: int  # W, clipped to N
    dilation_rate: int  # R
    ranks: tuple  # ranks holding this rank's segment, in order (just this rank when local)
    local_length: int  # l

    @property
    def local(self):
        """The segment fits in the chunk: the single-device branch applies as is."""
        return self.segment_length <= self.local_length


def plan_branches(rank, world_size, local_length, branches):
    """The `BranchPlan` of every branch for one rank (branches already checked by `check_world`)."""
    l, N = local_length, local_length * world_size
    plans = []
    for index, (w, r) in enumerate(branches):
        w = min(w, N)  # w >= N: the whole sequence is one segment
        if w <= l:
            ranks = (rank,)
        else:
            per_segment = w // l  # g; the last segment may hold fewer ranks (N % w != 0)
            first = rank // per_segment * per_segment
            ranks = tuple(range(first, min(first + per_segment, world_size)))
        plans.append(BranchPlan(index, w, r, ranks, l))
    return plans


def kept_rows(start, length, dilation_rate, offset):
    """Rows of a chunk kept by head offset `offset`: `(first, count)`, rows first, first + r, ...

    `start` is the chunk's first position counted from its segment's start (Eq. 4 keeps the
    positions whose distance to the segment start is offset mod r).
    """
    first = (offset - start) % dilation_rate
    count = max(0, -(-(length - first) // dilation_rate))  # ceil((length - first) / r)
    return first, count
