"""Launch sequence-parallel dilated attention on real processes (LongNet Sec. 3.1).

    torchrun --nproc-per-node 4 -m longnet_ref.parallel --seq-len 65536 --causal

Every rank builds the same `MultiheadDilatedAttention` (same seed), holds its own chunk of
the input x (B, N/P, E), and runs forward and backward of `SequenceParallelDilatedAttention`
over torch.distributed (gloo on CPU, nccl with --device cuda). Rank 0 then prints, per rank,
the time of the forward and backward and the bytes each rank's collectives moved, and checks
the result against the single-device layer on the whole sequence (when it fits, --check):
outputs, input gradients and parameter gradients (summed over ranks).

Faults: --kill-rank R makes rank R kill itself (SIGKILL) just before its forward; the other
ranks are then waiting for it in a collective and fail (gloo reports the closed connection,
or gives up after --timeout seconds), so the launch exits non-zero instead of hanging.
Without torchrun, `python -m longnet_ref.parallel` runs a single rank (P = 1).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from ..cli import HelpFormatter
from ..layer import MultiheadDilatedAttention
from .comm import as_communicator
from .layer import SequenceParallelDilatedAttention

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-2}  # max error / max |reference|


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m longnet_ref.parallel",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--seq-len", type=int, default=65536, help="N, the whole sequence (divisible by the number of ranks)"
    )
    parser.add_argument("--batch", type=int, default=1, help="B, sequences per step")
    parser.add_argument("--embed-dim", type=int, default=64, help="E, the layer's width")
    parser.add_argument("--heads", type=int, default=4, help="H, attention heads (E divisible by H)")
    parser.add_argument(
        "--segment-lengths", type=int, nargs="+", default=[2048, 8192, 32768, 65536], help="the branches' w_i"
    )
    parser.add_argument(
        "--dilation-rates", type=int, nargs="+", default=[1, 4, 8, 16], help="the branches' r_i, one per w_i"
    )
    parser.add_argument("--causal", action="store_true", help="causal (decoder) attention")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the layer and inputs")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per rank, nccl")
    parser.add_argument(
        "--check", choices=["auto", "yes", "no"], default="auto", help="compare with one device (auto: if small)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds a collective may wait before failing (also for rank 0's check)",
    )
    parser.add_argument("--kill-rank", type=int, default=-1, help="fault injection: this rank dies before its forward")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (gloo connects lazily)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (the same on every rank)")
    return parser.parse_args(argv)


def init(args):
    """Join the process group torchrun describes in the environment, or be a group of one."""
    backend = "nccl" if args.device == "cuda" else "gloo"
    timeout = timedelta(seconds=args.timeout)
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:  # plain `python -m longnet_ref.parallel`: a single rank
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timeout)
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def megabytes(n):
    return f"{n / 2**20:8.2f}"


def report(args, P, reports, layer):
    """Rank 0's table: time and traffic per rank, per branch."""
    N, l, B, E = args.seq_len, args.seq_len // P, args.batch, args.embed_dim
    print(
        f"LongNet sequence parallelism: N = {N:,} tokens over P = {P} ranks (l = {l:,} each), "
        f"{dist.get_backend()} on {args.device}, {args.dtype}, {'causal' if args.causal else 'non-causal'}"
    )
    kinds = []
    for w, r in zip(layer.segment_lengths, layer.dilation_rates):
        w = min(w, N)
        kinds.append(f"({w}, {r}) " + ("local" if w <= l else f"{w // l} ranks/segment"))
    print(f"layer: B = {B}, E = {E}, H = {layer.num_heads}; branches (w, r): " + " | ".join(kinds))
    branches = sorted({branch for rep in reports for branch in rep["branch_sent"]})
    header = "rank  forward s  backward s  all-gather MB sent/recv  reduce-scatter MB sent/recv"
    print(header + "".join(f"  branch {branch} MB" for branch in branches))
    for rep in reports:
        line = (
            f"{rep['rank']:4d}  {rep['forward']:9.3f}  {rep['backward']:10.3f}  "
            f"{megabytes(rep['gather'][0])} / {megabytes(rep['gather'][1])}       "
            f"{megabytes(rep['scatter'][0])} / {megabytes(rep['scatter'][1])}"
        )
        print(line + "".join(f"  {megabytes(rep['branch_sent'].get(branch, 0))}   " for branch in branches))
    itemsize = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    dense = (P - 1) * 2 * B * l * E * itemsize  # all-gathering every rank's whole K and V
    print(f"for comparison, all-gathering dense K and V would send {megabytes(dense).strip()} MB per rank")


def check(args, P, rank, layer, sp, x_local, y_local, dy_local):
    """Gather x, y, dy, dx to rank 0 and compare with the single-device layer. True if within tolerance."""
    grads = [param.grad.clone() for param in sp.parameters()]
    for grad in grads:  # the full parameter gradient is the sum of every rank's part
        dist.all_reduce(grad)

    def gather(t):
        parts = [torch.empty_like(t) for _ in range(P)] if rank == 0 else None
        dist.gather(t.contiguous(), parts, dst=0)
        return torch.cat(parts, dim=1) if rank == 0 else None

    x, y, dy, dx = (gather(t) for t in (x_local.detach(), y_local.detach(), dy_local, x_local.grad))
    if rank != 0:
        return True
    start = time.perf_counter()
    x_ref = x.clone().requires_grad_()
    y_ref = layer(x_ref)
    y_ref.backward(dy)
    errors = {
        "y": (y - y_ref).abs().max() / y_ref.abs().max(),
        "dx": (dx - x_ref.grad).abs().max() / x_ref.grad.abs().max(),
        # k_proj.bias has a zero gradient in exact arithmetic (softmax ignores a shift shared by
        # every key): measure every parameter against the largest parameter gradient.
        "dW": max((grad - param.grad).abs().max() for grad, param in zip(grads, layer.parameters()))
        / max(param.grad.abs().max() for param in layer.parameters()),
    }
    tol = TOLERANCE[DTYPES[args.dtype]]
    ok = all(e <= tol for e in errors.values())
    print(
        f"check vs one device ({time.perf_counter() - start:.1f} s): max error / max |reference|: "
        + ", ".join(f"{name} {value:.1e}" for name, value in errors.items())
        + f" (tolerance {tol:.0e}) "
        + ("OK" if ok else "FAILED")
    )
    return ok


def run(args, rank, P):
    if args.seq_len % P:
        raise SystemExit(f"--seq-len {args.seq_len} is not divisible by the number of ranks {P}")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(args.seed)  # the same parameters on every rank
    layer = MultiheadDilatedAttention(
        args.embed_dim, args.heads, args.segment_lengths, args.dilation_rates, causal=args.causal
    ).to(device, dtype)
    sp = SequenceParallelDilatedAttention.from_layer(layer)
    l = args.seq_len // P
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)  # each rank its own chunk
    x_local = torch.randn(args.batch, l, args.embed_dim, generator=generator).to(device, dtype).requires_grad_()
    dy_local = torch.randn(args.batch, l, args.embed_dim, generator=generator).to(device, dtype)

    dist.barrier()
    if rank == args.kill_rank:
        print(f"rank {rank}: --kill-rank {rank}: dying before the forward", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    for _ in range(args.warmup):
        sp(x_local).backward(dy_local)
    sp.zero_grad(set_to_none=True)
    x_local.grad = None
    as_communicator(None).records.clear()  # count the timed step only
    dist.barrier()
    start = time.perf_counter()
    y_local = sp(x_local)
    middle = time.perf_counter()
    y_local.backward(dy_local)
    end = time.perf_counter()

    records = as_communicator(None).records
    branch_sent = {}
    for (_, branch), (sent, _) in records.traffic(phase="forward", op="all_gather").items():
        branch_sent[branch] = sent
    totals = {
        op: [
            sum(rec.bytes_sent for rec in records if rec.op == op),
            sum(rec.bytes_received for rec in records if rec.op == op),
        ]
        for op in ("all_gather", "reduce_scatter")
    }
    mine = {
        "rank": rank,
        "forward": middle - start,
        "backward": end - middle,
        "branch_sent": branch_sent,
        "gather": totals["all_gather"],
        "scatter": totals["reduce_scatter"],
    }
    reports = [None] * P
    dist.all_gather_object(reports, mine)
    if rank == 0:
        report(args, P, reports, layer)
    do_check = args.check == "yes" or (args.check == "auto" and args.batch * args.seq_len * args.embed_dim <= 2**24)
    if do_check and not check(args, P, rank, layer, sp, x_local, y_local, dy_local):
        return 1
    if not do_check and rank == 0:
        print("check vs one device skipped (--check auto: too large; use --check yes)")
    return 0


def main(argv=None):
    args = parse_args(argv)
    rank, P = init(args)
    try:
        code = run(args, rank, P)
    except ValueError as error:  # bad configuration: every rank raises the same error
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        code = 2
    # Leave together: a rank that tears its connections down while rank 0 still checks can
    # abort the others' gloo threads.
    dist.barrier()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
