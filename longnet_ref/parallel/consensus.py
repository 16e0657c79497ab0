"""The ranks' input validation: every rank raises the same ValueError, or none does.

Sequence parallelism (LongNet Sec. 3.1) runs collectives, and a collective waits for every
rank of its group. A rank that raised on its own bad input while the others went on into the
next collective would leave them waiting (until a timeout, or forever). So no rank raises on
what only it sees:

1. each rank checks its own input without raising (`own_record`): the error, if any, becomes a
   string in one small metadata record, with the shape, dtype and options it was called with;
2. the ranks exchange that record, `comm.all_gather_object`: the only collective before the
   checks;
3. every rank decides from the same list of records (`check_records`, then `check_segments`),
   so every rank raises the same ValueError, or none does: an error on any rank, a shape or
   option that differs between ranks, or a branch whose segments would straddle two ranks.

`check_world` does the three steps and returns this rank's branch plans (`plan.py`); it also
creates the segments' sub-groups, in one order on every rank (`Communicator.prepare`).
"""

from __future__ import annotations

import torch

from ..checks import (
    check_branches,
    check_flag,
    check_head_offsets,
    check_implementation,
    check_key_padding_mask,
    check_qkv,
)
from .plan import plan_branches

# The fields of the record every rank must agree on, and how an error names them.
AGREED = [
    ("shape", "shape (B, H, N / P, D) for q, k and v"),
    ("kv_heads", "number of k and v heads H_kv"),
    ("dtype", "dtype"),
    ("device", "device type"),
    ("branches", "segment_lengths and dilation_rates"),
    ("causal", "causal"),
    ("head_offsets", "head_offsets"),
    ("implementation", "implementation"),
    ("requires_grad", "requires_grad for (q, k, v)"),
    ("padded", "key_padding_mask: a (B, N / P) bool tensor on every rank, or None on every rank"),
]


def own_record(q, k, v, segment_lengths, dilation_rates, causal, head_offsets, implementation, key_padding_mask=None):
    """Step 1: check this rank's own input without raising; the record this rank sends the others."""
    try:
        check_qkv(q, k, v, grouped=True)  # k and v may have H_kv heads dividing H
        check_key_padding_mask(key_padding_mask, k)
        branches = check_branches(segment_lengths, dilation_rates)
        check_head_offsets(head_offsets)
        check_implementation(implementation)
        check_flag("causal", causal)
    except (ValueError, TypeError) as problem:  # recorded, and raised on every rank alike (check_records)
        return {"error": str(problem), "error_type": type(problem).__name__}
    return {
        "error": None,
        "shape": tuple(q.shape),
        "kv_heads": k.shape[1],
        "dtype": str(q.dtype),
        "device": q.device.type,
        "branches": branches,
        "causal": bool(causal),
        "head_offsets": head_offsets,
        "implementation": implementation,
        # Ranks must agree on which inputs get gradients, or only some would join the
        # backward's reduce-scatters.
        "requires_grad": tuple(torch.is_grad_enabled() and x.requires_grad for x in (q, k, v)),
        "padded": key_padding_mask is not None,  # with a mask the branches gather its rows too
    }


def check_records(records):
    """Step 3a, the same on every rank: no rank failed its own check, and every rank passed the same."""
    failed = [(p, record) for p, record in enumerate(records) if record["error"] is not None]
    if failed:
        message = "invalid input on " + "; ".join(f"rank {p}: {record['error']}" for p, record in failed)
        # a TypeError only when every failing rank's is one (a non-bool causal, say)
        raise (TypeError if all(r["error_type"] == "TypeError" for _, r in failed) else ValueError)(message)
    for key, what in AGREED:
        values = [record[key] for record in records]
        if any(value != values[0] for value in values):
            listing = ", ".join(f"rank {p}: {value}" for p, value in enumerate(values))
            raise ValueError(f"every rank must pass the same {what}, got {listing}")


def check_segments(branches, local_length, world_size):
    """Step 3b: every segment starts on a rank border (l % w == 0 for w <= l, w % l == 0 for l < w < N)."""
    l, P = local_length, world_size
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


def check_world(
    comm, q, k, v, segment_lengths, dilation_rates, causal, head_offsets, implementation, key_padding_mask=None
):
    """Check the input of every rank, on every rank; return this rank's branch plans.

    Raises the same ValueError on every rank (or none): see the module docstring.
    """
    record = own_record(
        q, k, v, segment_lengths, dilation_rates, causal, head_offsets, implementation, key_padding_mask
    )
    records = comm.all_gather_object(record)  # the one exchange; from here on every rank sees the same list
    check_records(records)
    branches, l, P = records[0]["branches"], records[0]["shape"][2], comm.world_size
    check_segments(branches, l, P)
    all_plans = [plan_branches(p, P, l, branches) for p in range(P)]
    comm.prepare([plan.ranks for plans in all_plans for plan in plans])  # sub-groups, in one order everywhere
    return all_plans[comm.rank]
