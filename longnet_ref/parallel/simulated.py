"""Sequence parallelism in one process: every rank is a thread (for notebooks and tests).

`SimulatedGroup(P)` runs a function once per rank, each rank in its own thread with its own
`SimulatedComm`. The communicator moves tensors through shared memory (a rendezvous per collective), so
the per-rank code is exactly the code that runs on torch.distributed; only the few lines
that move bytes differ. Every collective is recorded in `group.records` (`comm.Collective`).

`simulate_sequence_parallel` cuts full (B, H, N, D) tensors into P chunks, runs
`sequence_parallel_attention` on every simulated rank and concatenates the outputs. It is
differentiable: its backward runs every rank's backward in that rank's thread again, so the
all-gathers' reduce-scatters happen between threads as they would between processes.

A rank that raises aborts the group: the other ranks fail at their next collective instead
of waiting forever (and a collective also gives up once no rank has computed for `timeout`
seconds: every rank is waiting, so one of them skipped a collective).

Ranks take turns: a rank computes only while it holds the group's turn, and it hands the turn
on while it waits in a collective. P real devices compute at once; P threads of one process
computing at once would only fight over the same cores (each thread starting its own team of
intra-op threads: 8 ranks x 2 threads on 2 cores), so the simulation would cost far more than
the work it does. Taking turns, it costs the same work as one process, plus the collectives.
"""

from __future__ import annotations

import copy
import pickle
import threading
import time

import torch

from ..checks import (
    as_positive_int,
    as_positive_number,
    check_flag,
    check_implementation,
    check_key_padding_mask,
    check_qkv,
)
from .algorithm import sequence_parallel_attention
from .comm import CommStats, Communicator


class SimulatedGroup:
    """P ranks in one process, one thread each: `group.run(fn)` calls `fn(comm)` on every rank."""

    def __init__(self, world_size, *, timeout=120.0):
        self.world_size = as_positive_int("world_size", world_size)
        self.timeout = as_positive_number("timeout", timeout)
        self.records = CommStats()  # shared by every rank's communicator, in the order of the calls
        self.comms = [SimulatedComm(self, rank) for rank in range(self.world_size)]
        self._reset()

    def _reset(self):
        self._cond = threading.Condition()
        self._rounds = {}  # (ranks, n) -> {rank: value}: the n-th collective among `ranks`
        self._readers = {}  # (ranks, n) -> ranks that still have to read that round
        self._count = {}  # (ranks, rank) -> how many collectives among `ranks` this rank has entered
        self._aborted = False
        self._turn = threading.Lock()  # held by the one rank that computes now
        self._holder = None  # that rank (None: every rank waits, or none runs)
        self._activity = time.monotonic()  # when a rank last took or gave up the turn

    def _take_turn(self, rank):
        self._turn.acquire()
        with self._cond:
            self._holder, self._activity = rank, time.monotonic()

    def _give_turn(self):
        with self._cond:
            self._holder, self._activity = None, time.monotonic()
            self._cond.notify_all()  # waiting ranks re-check, and start counting idle time
        self._turn.release()

    def exchange(self, ranks, rank, value):
        """Every rank in `ranks` gives a value and gets all of them, in the order of `ranks`.

        Rounds are numbered per set of ranks, so a fast rank's next collective never mixes with
        the current one. The caller holds the turn; it gives the turn up while it waits, and
        takes it back before it returns. A rank waits until every rank of the round has arrived,
        or the group is aborted (another rank failed), or no rank has computed for `timeout`
        seconds (every rank waits: some rank skipped a collective or called them in another
        order). Time other ranks spend computing never counts: they take turns, so a large
        problem may keep a rank waiting far longer than `timeout`.
        """
        if self._holder != rank:  # only the rank that holds the turn computes, and reaches collectives
            raise ValueError(
                f"simulated rank {rank}'s collectives must be called from its own thread inside group.run(fn)"
            )
        self._give_turn()  # let another rank compute (or reach this collective) meanwhile
        try:
            return self._exchange(ranks, rank, value)
        finally:
            self._take_turn(rank)

    def _exchange(self, ranks, rank, value):
        with self._cond:
            n = self._count.get((ranks, rank), 0)
            self._count[ranks, rank] = n + 1
            slots = self._rounds.setdefault((ranks, n), {})
            slots[rank] = value
            self._cond.notify_all()
            while len(slots) < len(ranks) and not self._aborted:
                idle = time.monotonic() - self._activity
                if self._holder is None and idle >= self.timeout:
                    break
                # someone computes: wait for a notification; nobody does: until the idle time runs out
                self._cond.wait(None if self._holder is not None else self.timeout - idle)
            if len(slots) < len(ranks):  # a completed round is delivered even if the group aborts later
                self._aborted = True
                self._cond.notify_all()
                raise threading.BrokenBarrierError(
                    f"simulated rank {rank} gave up waiting for ranks {ranks}: another rank failed, or no rank "
                    f"computed for {self.timeout:g} s while some did not come"
                )
            values = [slots[peer] for peer in ranks]
            readers = self._readers.setdefault((ranks, n), set(ranks))
            readers.discard(rank)
            if not readers:  # everyone has read: forget the round
                del self._rounds[ranks, n], self._readers[ranks, n]
            return values

    def abort(self):
        """Release every rank waiting in a collective (they raise BrokenBarrierError)."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def run(self, fn, *, return_exceptions=False):
        """Call `fn(comm)` for every rank, each in its own thread; the results in rank order.

        If a rank raises, the others are released from their collectives and the first real
        error (not a consequence of the abort) is raised; `return_exceptions=True` returns
        every rank's exception in place of its result instead.
        """
        if not callable(fn):
            raise TypeError(f"fn must be a callable fn(comm), got {type(fn).__name__}")
        check_flag("return_exceptions", return_exceptions)
        if self._holder is not None:  # a rank computes: this call comes from inside it (or runs alongside)
            raise ValueError(
                "group.run was called from inside one of its own ranks (or while the group runs); "
                "use another SimulatedGroup"
            )
        results = [None] * self.world_size
        failed = [False] * self.world_size

        def target(rank):
            self._take_turn(rank)
            try:
                results[rank] = fn(self.comms[rank])
            except BaseException as error:  # noqa: BLE001 - handed to the caller below
                results[rank], failed[rank] = error, True
                self.abort()
            finally:
                self._give_turn()

        threads = [
            threading.Thread(target=target, args=(rank,), name=f"rank {rank}") for rank in range(self.world_size)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self._reset()  # a fresh start for the next run
        if return_exceptions or not any(failed):
            return results
        errors = [error for error, bad in zip(results, failed) if bad]
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])


class SimulatedComm(Communicator):
    """One rank of a `SimulatedGroup`: the communicator interface over shared memory."""

    def __init__(self, group, rank):
        super().__init__()
        self.group, self.rank, self.world_size = group, rank, group.world_size
        self.records = group.records

    def all_gather(self, x, ranks, branch=None):
        parts = self.group.exchange(ranks, self.rank, x.detach().clone())
        self._record("all_gather", "forward", branch, ranks, x.numel(), x.element_size())
        return torch.stack(parts)  # (g, *shape)

    def reduce_scatter(self, y, ranks, branch=None):
        parts = self.group.exchange(ranks, self.rank, y.detach().clone())  # g tensors (g, *shape)
        me = ranks.index(self.rank)
        self._record("reduce_scatter", "backward", branch, ranks, y[0].numel(), y.element_size())
        return torch.stack([part[me] for part in parts]).sum(0)  # (*shape), summed in rank order

    def all_gather_object(self, obj):
        objects = self.group.exchange(tuple(range(self.world_size)), self.rank, copy.deepcopy(obj))
        self._record("all_gather_object", "forward", None, range(self.world_size), len(pickle.dumps(obj)), 1)
        return objects


class _Simulation(torch.autograd.Function):
    """(q, k, v) -> out over simulated ranks; the backward runs every rank's backward in its thread."""

    @staticmethod
    def forward(ctx, q, k, v, group, options):
        P = group.world_size
        needs_grad = any(ctx.needs_input_grad[:3])
        chunks = [  # rank p's (q, k, v): (B, H, l, D) each, leaves of that rank's graph
            tuple(x.detach().chunk(P, dim=2)[p].requires_grad_(needs_grad) for x in (q, k, v)) for p in range(P)
        ]

        mask = options[2].get("key_padding_mask")  # (B, N) or None: rank p gets its (B, l) chunk
        masks = [None] * P if mask is None else list(mask.chunk(P, dim=1))

        def rank_forward(comm):
            with torch.enable_grad():
                kwargs = dict(options[2], key_padding_mask=masks[comm.rank])
                return sequence_parallel_attention(*chunks[comm.rank], *options[:2], **kwargs, group=comm)

        outs = group.run(rank_forward)
        ctx.group, ctx.chunks, ctx.outs = group, chunks, outs
        return torch.cat([out.detach() for out in outs], dim=2)  # (B, H, N, D)

    @staticmethod
    def backward(ctx, dout):
        douts = dout.chunk(ctx.group.world_size, dim=2)

        def rank_backward(comm):
            p = comm.rank
            # a rank may keep no query row of any branch (r > l), so its output need not depend on q
            grads = torch.autograd.grad(ctx.outs[p], ctx.chunks[p], douts[p], allow_unused=True)
            return tuple(torch.zeros_like(x) if grad is None else grad for grad, x in zip(grads, ctx.chunks[p]))

        grads = ctx.group.run(rank_backward)  # per rank (dq, dk, dv), each (B, H, l, D)
        dq, dk, dv = (torch.cat([rank_grads[i] for rank_grads in grads], dim=2) for i in range(3))
        return dq, dk, dv, None, None


def simulate_sequence_parallel(
    q,
    k,
    v,
    world_size,
    segment_lengths,
    dilation_rates,
    *,
    causal=False,
    head_offsets="paper",
    implementation="fast",
    timeout=120.0,
    key_padding_mask=None,
):
    """Run `sequence_parallel_attention` on `world_size` simulated ranks: `(out, stats)`.

    Args:
        q, k, v: (B, H, N, D), the whole sequence; rank p gets positions [p N/P, (p+1) N/P).
            k and v may have H_kv heads dividing H (grouped-query attention).
        world_size: P, dividing N. The other arguments (implementation: "fast" or "readable") as
            in `sequence_parallel_attention`. timeout: as in `SimulatedGroup`.
        key_padding_mask: None or the whole (B, N) bool mask; rank p gets its (B, N/P) chunk.

    Returns:
        out (B, H, N, D), differentiable in q, k and v, and `stats`: the `CommStats` list of
        every collective (forward ones now; the backward's reduce-scatters are appended when
        the backward runs).
    """
    check_qkv(q, k, v, grouped=True)  # k and v may have H_kv heads dividing H
    check_flag("causal", causal)
    check_key_padding_mask(key_padding_mask, k)
    as_positive_number("timeout", timeout)
    P = as_positive_int("world_size", world_size)
    if q.shape[2] % P:
        raise ValueError(f"the sequence length N = {q.shape[2]} is not divisible by world_size {P}")
    if q.device.type != "cpu" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        # autograd runs a CUDA graph's backward on one device thread shared by every simulated rank,
        # so the first rank to wait in a reduce-scatter would stall all the others
        raise ValueError(
            f"the simulated backward runs on cpu tensors only, got device {q.device}; on GPUs use "
            "torchrun -m longnet_ref.parallel with nccl, or simulate without gradients"
        )
    group = SimulatedGroup(P, timeout=timeout)
    check_implementation(implementation)
    options = (
        segment_lengths,
        dilation_rates,
        {
            "causal": causal,
            "head_offsets": head_offsets,
            "implementation": implementation,
            "key_padding_mask": key_padding_mask,
        },
    )
    out = _Simulation.apply(q, k, v, group, options)
    return out, group.records
