"""Sequence parallelism for LongNet's dilated attention (paper Sec. 3.1), simulated and real.

The sequence is cut into P chunks of l = N / P tokens, one per rank. A branch (w, r) with
w <= l is computed locally; one with w > l has segments spanning w / l ranks: each rank keeps
its sparse rows of K and V (Eqs. 3-5), all-gathers them among its segment's ranks only, attends
its own sparse queries to them, and the branches merge as on one device (Eq. 10). Exact,
forward and backward (the all-gather's backward is a reduce-scatter).

Public names:

- `sequence_parallel_attention`: the per-rank algorithm, on this rank's chunk (B, H, l, D).
- `SequenceParallelDilatedAttention`: `MultiheadDilatedAttention` on a chunk (B, l, E).
- `simulate_sequence_parallel`: all P ranks as threads of one process, with every collective
  recorded; the same per-rank code.
- `SimulatedGroup`: P simulated ranks that run any per-rank function, `group.run(fn)`.
- `plan_branches`: how a rank meets each branch: local, or the ranks sharing its segment.
- `distributed_branch`: one branch whose segment spans ranks, step by step (the notebook's).

`python -m longnet_ref.parallel` (under torchrun) is the launcher (`__main__.py`).

Modules: `algorithm` (the readable per-rank algorithm), `consensus` (the ranks' input
validation: every rank raises the same ValueError, or none), `plan` (branch plans, kept
rows), `fused` (the fast per-rank path), `comm` (communicators and the record of every
collective), `simulated` (ranks as threads), `layer` (the layer on a chunk).
"""

from .algorithm import distributed_branch, sequence_parallel_attention
from .layer import SequenceParallelDilatedAttention
from .plan import plan_branches
from .simulated import SimulatedGroup, simulate_sequence_parallel

__all__ = [
    "SequenceParallelDilatedAttention",
    "SimulatedGroup",
    "distributed_branch",
    "plan_branches",
    "sequence_parallel_attention",
    "simulate_sequence_parallel",
]
