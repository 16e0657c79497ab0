"""The causal tile effect: what causality saves the fused CPU kernel on pieces of K rows.

`python -m longnet_ref.bench --sections tiles`. A dilated branch hands the kernel causal pieces
of K = w / r rows (Eqs. 3-4); dense attention is one piece of K = N. Causality halves the ideal
work of a piece ((K + 1) / 2K of its scores are kept), but the fused CPU kernel skips a block of
keys only when all of it lies above the diagonal, so short causal pieces cost what full ones
cost. For each K the kernel (`kernels.attention_forward` and `attention_backward`, the ones the
fast path calls) runs on (TOTAL_ROWS / K, H, K, D) inputs, the same rows in all for every K, so
the times compare per row; causal and non-causal are interleaved in one process, medians of
`repeats` runs (more for short pieces: `MIN_SECONDS`). Each forward output is checked against
dense attention in float64 on its first piece (the backward's gradients: tests/test_kernels.py).

Also printed, from the same run's rows and not timed on its own: what splitting a causal piece in
two would cost, its two diagonal halves as causal pieces of K / 2 plus the lower half's rows
against the upper half's keys without a mask (half the rows, K / 2 keys), merged by log-sum-exp
(the merge itself not counted). Where it is not below the causal piece's own time, splitting
gains nothing.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..attention import dense_attention, softmax_scale
from ..kernels import attention_backward, attention_forward

PIECE_ROWS = (64, 128, 256, 512, 1024, 2048, 4096)
TOTAL_ROWS = 2**15  # pieces x K, the same for every K
HEAD_DIMS = (32, 64)  # the recall models' heads (E = 128, H = 4) and the glue section's
MIN_SECONDS = 1.0  # of each mode's timed runs, at least (up to 200 runs)


def tile_times(K, head_dim, heads=1, total_rows=TOTAL_ROWS, repeats=5, seed=0):
    """({(causal, backward): median seconds}, the check's max error) of the kernel on (total_rows / K, heads, K, D)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (max(1, total_rows // K), heads, K, head_dim)
    q, k, v, dout = (torch.randn(shape, generator=generator) for _ in range(4))
    scale = softmax_scale(head_dim)
    error = 0.0
    for causal in (False, True):  # the check: the first piece against float64 dense attention
        out, _lse, _saved = attention_forward(q[:1], k[:1], v[:1], causal, scale)
        ref, _ = dense_attention(*(x[:1].double() for x in (q, k, v)), causal=causal)
        error = max(error, (out.double() - ref).abs().max().item())

    def step(causal, backward):
        start = time.perf_counter()
        out, _lse, saved = attention_forward(q, k, v, causal, scale)
        if backward:
            attention_backward(dout, q, k, v, out, saved, causal, scale)
        return time.perf_counter() - start

    modes = [(c, b) for b in (False, True) for c in (False, True)]
    warm = min(step(*mode) for mode in modes)  # warm-up
    # short pieces take milliseconds: at least MIN_SECONDS of each mode, so a median means something
    times = {mode: [] for mode in modes}
    for _ in range(max(repeats, min(200, int(MIN_SECONDS / max(warm, 1e-6))))):
        for mode in modes:  # interleaved: the ratios are measured under the same conditions
            times[mode].append(step(*mode))
    return {mode: statistics.median(ts) for mode, ts in times.items()}, error


def run_tiles(repeats=5, piece_rows=PIECE_ROWS, head_dims=HEAD_DIMS):
    """Time every K and D; returns rows of dicts and prints one table per D."""
    rows = []
    for D in head_dims:
        times = {}
        print(f"causal over non-causal time of the fused kernel, pieces of K rows, {TOTAL_ROWS} rows in all, D = {D}:")
        print("      K | ideal | forward | fwd+bwd | split in two / causal piece, fwd | fwd+bwd | max error")
        for K in piece_rows:
            times[K], error = tile_times(K, D, repeats=repeats)
            row = dict(K=K, D=D, ideal=(K + 1) / (2 * K), max_error=error)
            for backward, name in ((False, "forward"), (True, "fwd+bwd")):
                row[name] = times[K][(True, backward)] / times[K][(False, backward)]
                half = times.get(K // 2)
                # the diagonal halves (causal, K/2: all rows) + the lower half's rows on the upper keys (no mask)
                row[f"split {name}"] = (
                    (half[(True, backward)] + half[(False, backward)] / 2) / times[K][(True, backward)]
                    if half
                    else float("nan")
                )
            rows.append(row)
            print(f"  {K:5d} | {row['ideal']:.3f} | {row['forward']:7.3f} | {row['fwd+bwd']:7.3f} | "
                  f"{row['split forward']:32.3f} | {row['split fwd+bwd']:7.3f} | {error:.1e}", flush=True)  # fmt: skip
    return rows
