"""Sequence parallelism for LongNet's dilated attention (paper Sec. 3.1), simulated and real.

- `sequence_parallel_attention`: the per-rank algorithm, on this rank's chunk (B, H, N/P, D).
- `simulate_sequence_parallel`: all P ranks as threads of one process, with every collective
  recorded; the same per-rank code (`SimulatedGroup` runs any per-rank function).
- `SequenceParallelDilatedAttention`: `MultiheadDilatedAttention` on a chunk (B, N/P, E).
- `python -m longnet_ref.parallel` (under torchrun): the launcher (`__main__.py`).
"""

from .algorithm import distributed_branch, sequence_parallel_attention
from .comm import AllGather, Collective, CommStats, Communicator, TorchDistributed, all_gather, as_communicator
from .layer import SequenceParallelDilatedAttention
from .plan import BranchPlan, kept_rows, plan_branches
from .simulated import SimulatedComm, SimulatedGroup, simulate_sequence_parallel

__all__ = [
    "AllGather",
    "BranchPlan",
    "Collective",
    "CommStats",
    "Communicator",
    "SequenceParallelDilatedAttention",
    "SimulatedComm",
    "SimulatedGroup",
    "TorchDistributed",
    "all_gather",
    "as_communicator",
    "distributed_branch",
    "kept_rows",
    "plan_branches",
    "sequence_parallel_attention",
    "simulate_sequence_parallel",
]
