"""Communicators: the collectives the per-rank algorithm needs, and a record of every call.

The sequence-parallel algorithm (`algorithm.py`, LongNet Sec. 3.1) talks to its peers
through a tiny interface:

- `rank`, `world_size`;
- `all_gather(x, ranks)`: every rank in `ranks` gives a tensor of one shape (*shape) and gets
  all of them, stacked in rank order: (g, *shape) for g = len(ranks);
- `reduce_scatter(y, ranks)`: the backward of `all_gather`: every rank gives (g, *shape), and
  the i-th rank of `ranks` gets the sum over ranks of y[i], (*shape);
- `all_gather_object(obj)`: small Python objects from every rank of the world (input checks).

`AllGather` wraps the first two in one autograd Function: the forward gathers, the backward
reduce-scatters. Whatever the communicator, the algorithm's forward *and* backward are the
same code. Two communicators implement the interface:

- `TorchDistributed`: any torch.distributed process group (gloo on CPU, nccl on GPU);
- `simulated.SimulatedComm`: every rank a thread of one process (for notebooks and tests).

Both append a `Collective` to `records` for every call, with the traffic of a
bandwidth-optimal (ring) implementation: gathering chunks of n elements among g ranks sends
and receives (g - 1) n elements per rank, and so does the reduce-scatter that is its backward.

Letters: the package legend (`longnet_ref/__init__.py`); g = len(ranks), the ranks taking part.
"""

from __future__ import annotations

import pickle
import weakref
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Collective:
    """One rank's part in one collective call."""

    op: str  # "all_gather", "reduce_scatter" or "all_gather_object"
    phase: str  # "forward" or "backward"
    branch: int | None  # index of the dilated branch; None for the input check
    ranks: tuple  # the ranks taking part
    rank: int  # the rank this record belongs to
    elements_sent: int
    elements_received: int
    bytes_sent: int
    bytes_received: int


class CommStats(list):
    """A list of `Collective` records, with sums over them."""

    def traffic(self, *, phase=None, op=None):
        """{(rank, branch): (bytes_sent, bytes_received)}, summed over the records of one phase / op (or all)."""
        totals = defaultdict(lambda: [0, 0])
        for rec in self:
            if (phase is None or rec.phase == phase) and (op is None or rec.op == op):
                totals[rec.rank, rec.branch][0] += rec.bytes_sent
                totals[rec.rank, rec.branch][1] += rec.bytes_received
        return {key: tuple(value) for key, value in totals.items()}

    def bytes_per_rank(self, *, phase="forward", op="all_gather"):
        """{rank: bytes sent} of the branches' collectives in one phase (the input check excluded)."""
        totals = defaultdict(int)
        for (rank, branch), (sent, _) in self.traffic(phase=phase, op=op).items():
            if branch is not None:
                totals[rank] += sent
        return dict(sorted(totals.items()))


class Communicator:
    """Base class: rank, world size, and the record of every collective (subclasses move the data)."""

    rank: int
    world_size: int

    def __init__(self):
        self.records = CommStats()

    def _record(self, op, phase, branch, ranks, chunk_elements, element_size):
        moved = (len(ranks) - 1) * chunk_elements  # ring traffic, sent and received alike
        self.records.append(
            Collective(
                op, phase, branch, tuple(ranks), self.rank, moved, moved, moved * element_size, moved * element_size
            )
        )

    def all_gather(self, x, ranks, branch=None):  # (*shape) -> (g, *shape)
        raise NotImplementedError

    def reduce_scatter(self, y, ranks, branch=None):  # (g, *shape) -> (*shape)
        raise NotImplementedError

    def all_gather_object(self, obj) -> list:
        raise NotImplementedError

    def prepare(self, rank_sets) -> None:
        """Called by every rank with the same sets of ranks before their first collective."""


class AllGather(torch.autograd.Function):
    """Differentiable all-gather among `ranks`: (*shape) -> (g, *shape). Its backward is a reduce-scatter.

    Slot i of the result is the x of ranks[i], so the gradient of that x is the sum, over every
    rank that used the gathered tensor, of its gradient for slot i: a reduce-scatter.
    """

    @staticmethod
    def forward(ctx, x, comm, ranks, branch):
        ctx.comm, ctx.ranks, ctx.branch = comm, tuple(ranks), branch
        return comm.all_gather(x.contiguous(), ctx.ranks, branch=branch)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.reduce_scatter(grad.contiguous(), ctx.ranks, branch=ctx.branch), None, None, None


class JoinBackward(torch.autograd.Function):
    """Identity on `(out, lse)` whose backward also reaches `gathered` (with a zero gradient).

    The reduce-scatter in the all-gather's backward is a collective: every rank of the
    segment must run it, even a rank whose output does not read the gathered keys (the first
    rank of a causal segment, or a rank that keeps no row of a head offset when r > l).
    Autograd skips nodes the output does not depend on, so we make both outputs depend on
    them (a loss may use the log-sum-exp alone).
    """

    @staticmethod
    def forward(ctx, out, lse, gathered):
        ctx.gathered_shape = gathered.shape
        return out.clone(), lse.clone()

    @staticmethod
    def backward(ctx, dout, dlse):
        return dout, dlse, dout.new_zeros(ctx.gathered_shape)


def all_gather(x, comm, ranks, branch=None):
    """`AllGather.apply` with keyword arguments: the gathered (g, *x.shape), differentiable."""
    return AllGather.apply(x, comm, tuple(ranks), branch)


# torch >= 2.10 renamed the single-tensor collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)

# Per default group: its segments' sub-groups, created once ({global ranks: sub-group}, or
# new_group's NON_GROUP_MEMBER on a process outside it); and one communicator per group. Both
# hold the groups weakly: torch.distributed owns a group until destroy_process_group, and a
# group this package kept alive past it would be destroyed at interpreter exit instead, where
# gloo's worker threads can abort the process (SIGABRT, "terminate called without an active
# exception") after a run that succeeded.
_SUBGROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMMUNICATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class TorchDistributed(Communicator):
    """The interface over a torch.distributed process group of every process of the job.

    A segment's ranks get their own sub-group, created once by `prepare` and cached.
    `dist.new_group` is a collective of the whole job: every process must call it for every
    sub-group, member or not, in the same order. `prepare` does exactly that, as every rank
    derives the same sorted list of rank sets from the same (checked) arguments.
    (`use_local_synchronization=True` would let non-members skip the call, but torch then
    names a group after how many groups each member already has, so members that created
    different groups before disagree on the name and wait for each other forever.)
    """

    def __init__(self, group=None):
        super().__init__()
        group = dist.group.WORLD if group is None else group
        self._group = weakref.ref(group)  # not ours to keep alive (see _SUBGROUPS)
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        if self.world_size != dist.get_world_size():
            raise ValueError(
                f"group holds {self.world_size} of the job's {dist.get_world_size()} processes; sequence "
                "parallelism needs a group of every process (it creates its segments' sub-groups with "
                "torch.distributed.new_group, which every process of the job must call)"
            )

    @property
    def group(self):
        group = self._group()
        if group is None:
            raise RuntimeError(
                "this communicator's process group was destroyed (torch.distributed.destroy_process_group); "
                "after a new init_process_group, pass group=None or the new group"
            )
        return group

    def _global_ranks(self, ranks):
        group = self.group
        return tuple(rank if group is dist.group.WORLD else dist.get_global_rank(group, rank) for rank in ranks)

    def _subgroup(self, ranks):
        if len(ranks) == self.world_size:
            return self.group
        return _SUBGROUPS[dist.group.WORLD][self._global_ranks(ranks)]

    def prepare(self, rank_sets):
        subgroups = _SUBGROUPS.setdefault(dist.group.WORLD, {})
        for ranks in sorted(set(map(tuple, rank_sets))):  # the same list, in the same order, on every rank
            key = self._global_ranks(ranks)
            if 1 < len(ranks) < self.world_size and key not in subgroups:
                subgroups[key] = dist.new_group(list(key))  # every process calls, members or not

    def all_gather(self, x, ranks, branch=None):
        out = x.new_empty(len(ranks) * x.numel())  # (g * x.numel(),)
        _all_gather_single(out, x.reshape(-1), group=self._subgroup(ranks))
        self._record("all_gather", "forward", branch, ranks, x.numel(), x.element_size())
        return out.view(len(ranks), *x.shape)  # (g, *shape)

    def reduce_scatter(self, y, ranks, branch=None):
        out = y.new_empty(y.shape[1:])  # (*shape)
        _reduce_scatter_single(out.view(-1), y.reshape(-1), group=self._subgroup(ranks))
        self._record("reduce_scatter", "backward", branch, ranks, out.numel(), y.element_size())
        return out

    def all_gather_object(self, obj):
        objects = [None] * self.world_size
        dist.all_gather_object(objects, obj, group=self.group)
        self._record("all_gather_object", "forward", None, range(self.world_size), len(pickle.dumps(obj)), 1)
        return objects


def as_communicator(group) -> Communicator:
    """A `Communicator` as is; None (the default group) or a ProcessGroup wrapped, once, in `TorchDistributed`."""
    if isinstance(group, Communicator):
        return group
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "group=None needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group, or launch with torchrun); to run the "
                "algorithm in one process use simulate_sequence_parallel or SimulatedGroup"
            )
        group = dist.group.WORLD
    elif not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise ValueError(
            f"group must be None, a torch.distributed ProcessGroup or a Communicator, got {type(group).__name__}"
        )
    if group not in _COMMUNICATORS:
        _COMMUNICATORS[group] = TorchDistributed(group)
    return _COMMUNICATORS[group]
