"""Worker processes for tests/test_parallel_distributed.py: real torch.distributed (gloo) ranks.

`worker(rank, world_size, init_file, cases, queue)` joins a gloo group through a file on
disk (no port to collide with other test runs), runs every case with
`sequence_parallel_attention` on its chunk, compares against the single-device result it
computes itself (the oracle, for cases with a key padding mask), and puts one result dict per
case on `queue`. Cases run in order in one
group, so an error case that left a rank behind in a collective would break the next case.
"""

from __future__ import annotations

import os
import signal
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from longnet_ref import MultiheadDilatedAttention, dilated_attention, oracle_attention
from longnet_ref.parallel import SequenceParallelDilatedAttention, comm, sequence_parallel_attention


def padding_mask(kind, B, N):
    """(B, N) bool, True = ignore: "left" or "right" padding by a different amount per sequence, or "arbitrary"."""
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        n = N - 3 - (N // 2) * b  # real length: N - 3, then about half of N
        if kind == "left":
            mask[b, : N - n] = True
        elif kind == "right":
            mask[b, n:] = True
    if kind == "arbitrary":
        mask = torch.rand(B, N, generator=torch.Generator().manual_seed(5)) < 0.4
    return mask


def exact_case(rank, P, case):
    """Outputs and gradients of q, k, v on this rank's chunk vs one device: max abs errors.

    Options: "heads", "kv_heads" (grouped-query k, v), "dtype", "head_offsets", "implementation", and
    "padding" (a key padding mask of that kind; the reference is then the oracle with those keys removed).
    """
    torch.manual_seed(case.get("seed", 0))
    B, H, N, D = 2, case.get("heads", 4), case["N"], 8
    H_kv = case.get("kv_heads", H)
    dtype = getattr(torch, case.get("dtype", "float64"))
    q, dout = (torch.randn(B, H, N, D, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(B, H_kv, N, D, dtype=dtype) for _ in range(2))
    options = {"causal": case["causal"], "head_offsets": case.get("head_offsets", "paper")}
    mask = padding_mask(case["padding"], B, N) if "padding" in case else None
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    if mask is None:
        ref = dilated_attention(*full, case["ws"], case["rs"], **options)
    else:
        ref, _ = oracle_attention(*full, case["ws"], case["rs"], **options, key_padding_mask=mask)
    ref.backward(dout)
    l = N // P
    mine = slice(rank * l, (rank + 1) * l)
    local = [x[:, :, mine].clone().requires_grad_() for x in (q, k, v)]
    out = sequence_parallel_attention(
        *local,
        case["ws"],
        case["rs"],
        **options,
        implementation=case.get("implementation", "fast"),
        key_padding_mask=None if mask is None else mask[:, mine],
    )
    out.backward(dout[:, :, mine])
    errors = {"out": (out - ref[:, :, mine]).abs().max().item()}
    for name, x, x_full in zip("qkv", local, full):
        errors["d" + name] = (x.grad - x_full.grad[:, :, mine]).abs().max().item()
    return {"errors": errors}


def error_case(rank, P, case):
    """Bad input (on one rank or all): report the exception every rank raised."""
    q = torch.randn(1, 4, case["N"] // P if rank != case.get("odd_rank") else case["N"] // P // 2, 8)
    try:
        sequence_parallel_attention(q, q, q, case["ws"], case["rs"], group=case.get("group"))
    except ValueError as error:
        return {"raised": "ValueError", "message": str(error)}
    return {"raised": None}


def layer_case(rank, P, case):
    """The sequence-parallel layer vs the layer: output, input and (all-reduced) parameter gradients.

    Options: "kv_heads" (the layer's num_kv_heads) and "padding" (a key padding mask of that kind)."""
    torch.manual_seed(0)
    layer = MultiheadDilatedAttention(
        32, 4, case["ws"], case["rs"], causal=case["causal"], num_kv_heads=case.get("kv_heads")
    ).double()
    parallel = SequenceParallelDilatedAttention.from_layer(layer)
    x, dy = torch.randn(2, case["N"], 32, dtype=torch.float64), torch.randn(2, case["N"], 32, dtype=torch.float64)
    mask = padding_mask(case["padding"], 2, case["N"]) if "padding" in case else None
    x_ref = x.clone().requires_grad_()
    layer(x_ref, key_padding_mask=mask).backward(dy)
    l = case["N"] // P
    mine = slice(rank * l, (rank + 1) * l)
    x_local = x[:, mine].clone().requires_grad_()
    y = parallel(x_local, key_padding_mask=None if mask is None else mask[:, mine])
    y.backward(dy[:, mine])
    errors = {
        "y": (y - layer(x, key_padding_mask=mask)[:, mine]).abs().max().item(),
        "dx": (x_local.grad - x_ref.grad[:, mine]).abs().max().item(),
    }
    for (name, param), param_ref in zip(parallel.named_parameters(), layer.parameters()):
        grad = param.grad.clone()
        dist.all_reduce(grad)  # each rank holds its tokens' share of the parameter gradient
        errors[name] = (grad - param_ref.grad).abs().max().item()
    return {"errors": errors}


def subgroup_case(rank, P, case):
    """A process group of half the processes: refused with a ValueError, before any collective."""
    half = dist.new_group(list(range(P // 2)))  # every process takes part in creating it
    if rank >= P // 2:
        return {"raised": None}
    return error_case(rank, P // 2, {"N": case["N"] // 2, "ws": [8], "rs": [1], "group": half})


def die_case(rank, P, case):
    """Fault injection: `case["rank"]` dies (SIGKILL) between two collectives; the others carry on into one."""
    if rank == case["rank"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return exact_case(rank, P, case)


CASES = {"exact": exact_case, "error": error_case, "layer": layer_case, "subgroup": subgroup_case, "die": die_case}


def worker(rank, world_size, init_file, cases, queue, timeout_s=20.0):
    torch.set_num_threads(1)  # P processes share the machine's cores
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        for index, case in enumerate(cases):
            result = CASES[case["kind"]](rank, world_size, case)
            queue.put({"rank": rank, "case": index, **result})
        dist.barrier()
        kept = comm.as_communicator(None)
        dist.destroy_process_group()
        # Nothing of the package may keep a group alive past destroy_process_group: gloo groups
        # destroyed at interpreter exit can abort the process after a successful run.
        released = {"groups kept": len(comm._SUBGROUPS) + len(comm._COMMUNICATORS)}
        try:
            kept.all_gather_object(rank)
        except RuntimeError as error:  # a communicator kept by the user says what happened
            released["stale use"] = str(error)
        queue.put({"rank": rank, "case": "released", **released})
    except BaseException as error:  # report, then fail the process
        queue.put(
            {
                "rank": rank,
                "case": "crash",
                "error": f"{type(error).__name__}: {error}",
                "trace": traceback.format_exc(),
            }
        )
        raise SystemExit(1) from None
