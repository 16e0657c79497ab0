"""How a rank's chunk meets each branch (LongNet Sec. 3.1): local, or a segment spanning ranks.

Rank p holds positions [p l, (p + 1) l). For a branch (w, r), w clipped to N:

- w <= l (and l % w == 0): the chunk holds whole segments, and the branch is local;
- w > l (and w % l == 0, or w = N): a segment spans g = w / l ranks, and starts on a rank
  border; the last segment may hold fewer ranks when N % w != 0.

Both functions here are gathered forms of the one keep rule, `patterns.keeps`, and
tests/test_parallel.py checks them equal to it:

- `plan_branches`: the ranks sharing rank p's segment are the ranks j whose chunks lie in the
  same segment (Eq. 3), `keeps(j l, p l, w, 1, 0)`: the same-segment part of the rule;
- `kept_run`: the rows of a chunk that a head keeps (Eqs. 3-5), the positions pos of the chunk
  with `keeps(pos, pos, w, r, o)`, as one strided run.

Letters: the package legend (`longnet_ref/__init__.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import as_positive_int, check_branches


@dataclass(frozen=True)
class BranchPlan:
    """How one rank computes one branch."""

    index: int  # position in the list of branches (labels the collectives)
    segment_length: int  # w, clipped to N
    dilation_rate: int  # r
    ranks: tuple  # the g ranks holding this rank's segment, in order (just this rank when local)
    local_length: int  # l

    @property
    def local(self):
        """The segment fits in the chunk: the single-device branch applies as is."""
        return self.segment_length <= self.local_length


def plan_branches(rank, world_size, local_length, branches):
    """The `BranchPlan` of every branch for one rank (branches already checked by `consensus.check_world`).

    `ranks` are the ranks j with `keeps(j * l, rank * l, w, 1, 0)`: chunks start on segment
    borders or inside one segment, so a chunk's first position decides its segment (Eq. 3).
    """
    world_size = as_positive_int("world_size", world_size)
    l = as_positive_int("local_length", local_length)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    if not isinstance(branches, (list, tuple)) or not all(
        isinstance(b, (list, tuple)) and len(b) == 2 for b in branches
    ):
        raise ValueError(f"branches must be a list of (segment_length, dilation_rate) pairs, got {branches!r}")
    check_branches([w for w, _ in branches], [r for _, r in branches])
    N = l * world_size
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


def kept_run(start, length, dilation_rate, offset):
    """The rows of a chunk that a head with offset o keeps, as one run: `(first, count)`.

    The kept rows are first, first + r, ..., first + (count - 1) r of the chunk. This is a
    gathered form of `patterns.keeps`: for a chunk at positions [m w + start, m w + start +
    length) of segment m (start + length <= w), row i is in the run exactly when
    `keeps(x, x, w, r, o)` for its position x = m w + start + i, i.e. when its distance to the
    segment start, start + i, is o mod r (Eqs. 3-5). So first = (o - start) mod r, and count =
    ceil((length - first) / r), 0 when the chunk ends before first (r > l).
    """
    first = (offset - start) % dilation_rate
    count = max(0, -(-(length - first) // dilation_rate))  # ceil((length - first) / r)
    return first, count
