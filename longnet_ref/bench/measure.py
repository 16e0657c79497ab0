"""Timing and checking one configuration: inputs, one timed step, the oracle check, interleaved rounds.

A configuration is a dict: `path` ("dense", "fast", "readable", "parallel" or "floor"), B, H, N, D,
the mixture `ws`, `rs`, `causal`, `backward`, `repeats`, and optionally `device` and `world_size`.
`measure` times a list of them round-robin in this process and returns one result dict each
(median seconds, GFLOP/s from the cost model, the error against the float64 oracle, peak memory).
"""

from __future__ import annotations

import math
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from ..analysis.complexity import dense_flops, mixture_flops
from ..mixture import dilated_attention
from ..oracle import oracle_rows
from .floor import check_floor, prepare_floor

BACKWARD_FLOP_FACTOR = 2.5


def attention_flops(cfg):
    """Forward (+ backward) FLOPs of one configuration, from the cost model (`analysis.complexity`)."""
    shape = dict(batch=cfg["B"], heads=cfg["H"], head_dim=cfg["D"], causal=cfg["causal"])
    if cfg["path"] == "dense":
        flops = dense_flops(cfg["N"], **shape)
    else:
        flops = sum(mixture_flops(cfg["N"], cfg["ws"], cfg["rs"], **shape))
    return flops * (1 + BACKWARD_FLOP_FACTOR) if cfg["backward"] else flops


def ideal_flop_ratio(cfg):
    """FLOPs of the configuration over dense attention's on the same input (causal-aware)."""
    return attention_flops(cfg) / attention_flops(dict(cfg, path="dense"))


def run_path(cfg, q, k, v):
    if cfg["path"] == "dense":
        return F.scaled_dot_product_attention(q, k, v, is_causal=cfg["causal"])
    if cfg["path"] == "parallel":  # simulated sequence parallelism: P ranks as threads of this process
        from ..parallel import simulate_sequence_parallel

        return simulate_sequence_parallel(q, k, v, cfg["world_size"], cfg["ws"], cfg["rs"], causal=cfg["causal"])[0]
    impl = "readable" if cfg["path"] == "readable" else "fast"
    return dilated_attention(q, k, v, cfg["ws"], cfg["rs"], causal=cfg["causal"], implementation=impl)


def _device(cfg):
    return torch.device(cfg.get("device", "cpu"))  # configurations without "device" run on the CPU


def _synchronize(device):
    """Wait for the GPU's queued work, so that a timer measures it (CPU work is done when the call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prepare(cfg):
    """Inputs and one timed step (forward, or forward+backward) for a configuration."""
    B, H, N, D = cfg["B"], cfg["H"], cfg["N"], cfg["D"]
    device = _device(cfg)
    generator = torch.Generator().manual_seed(0)  # on the CPU: the same inputs on every device
    q, k, v = (
        torch.randn(B, H, N, D, generator=generator).to(device).requires_grad_(cfg["backward"]) for _ in range(3)
    )
    if cfg["path"] == "floor":
        return (q, k, v), prepare_floor(cfg, q, k, v, generator)
    grad = torch.randn(B, H, N, D, generator=generator).to(device) if cfg["backward"] else None

    def step():
        with torch.no_grad() if grad is None else torch.enable_grad():
            out = run_path(cfg, q, k, v)
            if grad is not None:
                out.backward(grad)
                for x in (q, k, v):
                    x.grad = None
        return out

    return (q, k, v), step


def _check(cfg, inputs, out):
    """Max abs error of sampled query rows against the float64 oracle (dense = one branch w = N, r = 1).

    The kernel floor computes each branch alone: its rows are checked against the oracle of that branch.
    """
    N = cfg["N"]
    rows = sorted({0, N - 1, *torch.randint(0, N, (6,), generator=torch.Generator().manual_seed(1)).tolist()})
    if cfg["path"] == "floor":
        return check_floor(cfg, inputs, out, rows)
    ws, rs = ([N], [1]) if cfg["path"] == "dense" else (cfg["ws"], cfg["rs"])
    ref, _lse = oracle_rows(*(x.detach().cpu().double() for x in inputs), rows, ws, rs, causal=cfg["causal"])
    return (out.detach().cpu().double()[:, :, rows] - ref).abs().max().item()


def measure(cfgs):
    """Time configurations round-robin in this process, with a matmul between rounds; check each output.

    Interleaving makes the machine's drift (other jobs, clock changes) hit every configuration
    of one call alike, so their ratios are fair even where absolute times are not.
    """
    device = _device(cfgs[0])
    prepared = [_prepare(cfg) for cfg in cfgs]
    outs = [step() for _, step in prepared]  # warm-up; also the outputs checked below
    errors = [_check(cfg, inputs, out) for cfg, (inputs, _), out in zip(cfgs, prepared, outs)]
    del outs
    times, matmul = [[] for _ in cfgs], []
    for _ in range(cfgs[0]["repeats"]):
        for i, (_, step) in enumerate(prepared):
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            times[i].append(time.perf_counter() - start)
        matmul.append(matmul_gflops(repeats=1, n=cfgs[0].get("matmul_size", 2048), device=device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results = []
    for cfg, cfg_times, error in zip(cfgs, times, errors):
        median = statistics.median(cfg_times)
        results.append(dict(cfg, seconds=median, times=cfg_times, gflops=attention_flops(cfg) / median / 1e9,
                            max_error=error, peak_rss_mb=peak, matmul_gflops=statistics.median(matmul),
                            ideal_flop_ratio=ideal_flop_ratio(cfg), threads=torch.get_num_threads()))  # fmt: skip
    return results


def matmul_gflops(repeats=5, n=2048, device="cpu"):
    """The machine's ceiling in this run: fp32 matmul throughput on `device` (median of `repeats`)."""
    device = torch.device(device)
    lhs, rhs = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    lhs @ rhs
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        lhs @ rhs
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def tolerance(cfg):
    # fp32 against a float64 oracle: the error grows slowly with the number of keys summed.
    return 1e-4 if cfg["N"] <= 2**16 else 3e-4


def describe(result):
    mode = ("fwd+bwd" if result["backward"] else "fwd") + (" causal" if result["causal"] else "")
    path = f"P={result['world_size']}" if result["path"] == "parallel" else result["path"]
    mark = "~" if result.get("extrapolated") else " "
    digits = 6 if result.get("device", "cpu") != "cpu" else 3  # a GPU's small calls take well under 1 ms
    return (f"{path:>8} N=2^{int(math.log2(result['N'])):<2} H={result['H']} {mode:<14} "
            f"{mark}{result['seconds']:9.{digits}f} s {result['gflops']:7.1f} GFLOP/s  "
            f"err {result['max_error']:.1e}  peak {result['peak_rss_mb']:7.0f} MB")  # fmt: skip
