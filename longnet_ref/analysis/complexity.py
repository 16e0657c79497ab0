"""Cost model: FLOPs and memory of dense, dilated and local attention (LongNet Eqs. 16-18, Sec. 3).

FLOPs (LongNet, arXiv 2307.02486, Sec. 2.4): in each of the N / w segments a branch (w, r) attends
w / r kept queries to w / r kept keys, for QK^T and for PV. Eq. 16 counts that as 2 N w D / r^2
multiply-adds per head; at 2 FLOPs per multiply-add, over B batch rows and H heads:

    branch (w, r):   4 B H D N w / r^2      (w clipped to N: a longer segment is the whole sequence)
    dense:           4 B H D N^2
    mixture:         the sum over branches (Eq. 17); geometric w, r: <= 2a / (a - 1) * w0 ... (Eq. 18)

Causal attention halves every term, so ratios do not change. For the paper's language-model
mixture (`TABLE2_SEGMENT_LENGTHS`, `TABLE2_DILATION_RATES`) Eqs. 16-17 give the FLOP ratios to
dense 0.472, 0.2535 and 0.1302 at N = 8K, 16K and 32K (1.347 at 2K: more than dense), and
per-branch reductions N r^2 / w of 16, 32, 64, 72 and 144 at 32K. The formula is the paper's;
`attended_pairs` counts the pairs exactly (ragged segments, w not a multiple of r, head
offsets): it is the closed form of `patterns.keeps`, tested equal to it.

Memory, in elements of one layer's forward (multiply by bytes per element):
- activations: q, k, v and the output, 4 B H N D, for every method;
- scores of the readable path: dense materialises B H N^2; a readable branch B H S K^2 with
  S = ceil(N / w) segments of K = ceil(w / r) kept rows (the fast path's fused kernel never
  stores them);
- gathered K/V of the sequence-parallel path (Sec. 3): with P devices of l = N / P tokens, a
  branch with w > l all-gathers the sparse keys and values of its segment, 2 B H K D per device,
  a size that does not grow with N; a branch with w <= l is local and gathers nothing.

`python -m longnet_ref.analysis.complexity --seq-len 32768` prints the table for the paper's Table 2 mixture.
"""

from __future__ import annotations

import argparse
import math
import numbers
import sys
from dataclasses import dataclass

from ..checks import as_positive_int, check_branches, check_flag, check_head_offsets
from ..cli import HelpFormatter
from ..patterns import as_ratio, head_offset

# The paper's language-model mixture (Sec. 4.1, the LongNet rows of Table 2): w_i and r_i.
TABLE2_SEGMENT_LENGTHS = (2048, 4096, 8192, 16384, 32768)
TABLE2_DILATION_RATES = (1, 2, 4, 6, 12)
# What `format_table` reads from a `cost_table` dict.
TABLE_KEYS = (
    "seq_len",
    "batch",
    "heads",
    "head_dim",
    "causal",
    "devices",
    "branches",
    "total",
    "dense",
    "local",
    "activation_elements",
)


def _check_shape(batch, heads, head_dim) -> tuple[int, int, int]:
    """B, H, D: positive integers; a negative, NaN or fractional one would give a meaningless FLOP count."""
    return as_positive_int("batch", batch), as_positive_int("heads", heads), as_positive_int("head_dim", head_dim)


def branch_flops(seq_len, segment_length, dilation_rate, *, batch=1, heads=1, head_dim=1, causal=False) -> float:
    """Eq. 16: 4 B H D N w / r^2 FLOPs of one branch, w clipped to N; causal halves it."""
    n = as_positive_int("seq_len", seq_len)
    check_flag("causal", causal)
    w, r = check_branches([segment_length], [dilation_rate])[0]
    batch, heads, head_dim = _check_shape(batch, heads, head_dim)
    flops = 4 * batch * heads * head_dim * n * min(w, n) / r**2
    return flops / 2 if causal else flops


def dense_flops(seq_len, *, batch=1, heads=1, head_dim=1, causal=False) -> float:
    """4 B H D N^2 FLOPs of dense attention; causal halves it."""
    n = as_positive_int("seq_len", seq_len)
    check_flag("causal", causal)
    batch, heads, head_dim = _check_shape(batch, heads, head_dim)  # batch="2" would repeat a string
    flops = 4 * batch * heads * head_dim * n * n
    return flops / 2 if causal else flops


def mixture_flops(seq_len, segment_lengths, dilation_rates, **shape) -> list[float]:
    """Eq. 17: FLOPs of each branch of the mixture (their sum is the total)."""
    return [branch_flops(seq_len, w, r, **shape) for w, r in check_branches(segment_lengths, dilation_rates)]


def flop_ratio(seq_len, segment_lengths, dilation_rates) -> float:
    """FLOPs of the mixture over dense FLOPs: sum_i min(w_i, N) / (r_i^2 N)."""
    return sum(mixture_flops(seq_len, segment_lengths, dilation_rates)) / dense_flops(seq_len)


def reduction(seq_len, segment_length, dilation_rate) -> float:
    """How many times cheaper than dense one branch is: N r^2 / w (w clipped to N)."""
    return dense_flops(seq_len) / branch_flops(seq_len, segment_length, dilation_rate)


def geometric_bound(seq_len, w0, ratio) -> float:
    """Eq. 18 as a ratio to dense: 2a / (a - 1) * w0 / (2 N) bounds any geometric mixture from w0."""
    n, w0, a = as_positive_int("seq_len", seq_len), as_positive_int("w0", w0), as_ratio(ratio)
    return a / (a - 1) * w0 / n


def attended_pairs(seq_len, segment_length, dilation_rate, num_heads=1, *, causal=False, head_offsets="paper") -> int:
    """Exact number of (head, query, key) triples one branch attends, summed over heads.

    The closed form of `patterns.keeps`, summed without building the pairs (tests/test_complexity.py
    checks it against `keeps` over every pair of small cases): in segment m a head with offset o
    keeps K_m rows (the positions pos of the segment with `keeps(pos, pos, w, r, o)`: o, o + r, ... from
    the segment start, fewer in a ragged last segment), and `keeps(q, k, ...)` holds for all K_m^2
    pairs of them (causal: the K_m (K_m + 1) / 2 with k <= q). Equals
    `attention_pattern(N, [w], [r], H).sum()`.
    """
    n = as_positive_int("seq_len", seq_len)
    check_flag("causal", causal)
    w, r = check_branches([segment_length], [dilation_rate])[0]
    num_heads = as_positive_int("num_heads", num_heads)
    check_head_offsets(head_offsets)
    total = 0
    for h in range(num_heads):
        o = head_offset(h, num_heads, r, head_offsets)
        for start in range(0, n, w):  # segment m = start // w
            length = min(w, n - start)  # the last segment may be shorter
            kept = max(0, -(-(length - o) // r))  # K_m: rows o, o + r, ... below `length`
            total += kept * (kept + 1) // 2 if causal else kept * kept
    return total


@dataclass
class BranchCost:
    """Cost of one branch (or of dense / local attention) in one layer's forward."""

    name: str
    segment_length: int  # clipped to N
    dilation_rate: int
    flops: float
    ratio: float  # flops / dense flops
    score_elements: int  # readable path: B H S K^2
    gathered_elements: int  # sequence-parallel path: K/V all-gathered per device

    def __post_init__(self):
        # Counts, not free-form values: a string or a negative number here would print as a cost.
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a string, got {self.name!r}")
        for field_name in ("segment_length", "dilation_rate", "flops", "ratio", "score_elements", "gathered_elements"):
            value, real = getattr(self, field_name), field_name in ("flops", "ratio")
            kind = numbers.Real if real else numbers.Integral
            if isinstance(value, bool) or not isinstance(value, kind) or not 0 <= value < math.inf:
                what = "finite number" if real else "integer"
                raise ValueError(f"{field_name} must be a non-negative {what}, got {value!r}")


def branch_cost(name, seq_len, w, r, *, batch, heads, head_dim, causal, devices) -> BranchCost:
    """Cost of the branch `(w, r)` (w clipped to N) in one layer's forward over `devices` chunks of N / P tokens."""
    n, w, r = as_positive_int("seq_len", seq_len), as_positive_int("w", w), as_positive_int("r", r)
    batch, heads, head_dim = _check_shape(batch, heads, head_dim)
    check_flag("causal", causal)
    devices = as_positive_int("devices", devices)
    if n % devices:
        raise ValueError(f"seq_len {n} must be a multiple of devices {devices} (chunks of N / P tokens)")
    if r > min(w, n):  # named here: branch_flops would call them segment_length[0] and dilation_rate[0]
        raise ValueError(f"r {r} is larger than min(w, seq_len) = {min(w, n)}; each segment must keep a row")
    w = min(w, n)
    S, K = math.ceil(n / w), math.ceil(w / r)  # segments, kept rows per segment
    local_length = n // devices
    gathered = 2 * batch * heads * K * head_dim if w > local_length else 0  # K and V of the segment
    flops = branch_flops(n, w, r, batch=batch, heads=heads, head_dim=head_dim, causal=causal)
    dense = dense_flops(n, batch=batch, heads=heads, head_dim=head_dim, causal=causal)
    return BranchCost(name, w, r, flops, flops / dense, batch * heads * S * K * K, gathered)


def cost_table(
    seq_len,
    segment_lengths=TABLE2_SEGMENT_LENGTHS,
    dilation_rates=TABLE2_DILATION_RATES,
    *,
    batch=1,
    heads=1,
    head_dim=1,
    causal=False,
    devices=1,
    local_window=None,
) -> dict:
    """Per-branch costs of the mixture, its total, dense attention and local attention (one branch (w, 1))."""
    n = as_positive_int("seq_len", seq_len)
    branches = check_branches(segment_lengths, dilation_rates)  # names None or 5, which list() would not
    shape = dict(
        batch=as_positive_int("batch", batch),
        heads=as_positive_int("heads", heads),
        head_dim=as_positive_int("head_dim", head_dim),
        causal=check_flag("causal", causal),  # bool("False") is True
        devices=as_positive_int("devices", devices),
    )
    if n % shape["devices"]:
        raise ValueError(f"seq_len {n} must be a multiple of devices {devices} (chunks of N / P tokens)")
    window = branches[0][0] if local_window is None else as_positive_int("local_window", local_window)
    rows = [branch_cost(f"branch {i}", n, w, r, **shape) for i, (w, r) in enumerate(branches)]
    total = BranchCost(
        "dilated (sum)",
        max(cost.segment_length for cost in rows),
        0,
        sum(cost.flops for cost in rows),
        sum(cost.ratio for cost in rows),
        sum(cost.score_elements for cost in rows),
        sum(cost.gathered_elements for cost in rows),
    )
    return dict(
        seq_len=n,
        branches=rows,
        total=total,
        dense=branch_cost("dense", n, n, 1, **shape),
        local=branch_cost(f"local (w={window})", n, window, 1, **shape),
        activation_elements=4 * shape["batch"] * shape["heads"] * n * shape["head_dim"],
        **shape,
    )


def human(x: float, unit: str = "") -> str:
    """1234567 -> '1.23 M' (powers of 1000; bytes use 1024 and 'B')."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
        raise ValueError(f"x must be a finite number, got {x!r}")
    if not isinstance(unit, str):
        raise TypeError(f"unit must be a string, got {unit!r}")
    base = 1024 if unit == "B" else 1000
    for prefix in ("", "K", "M", "G", "T", "P"):
        if abs(x) < base or prefix == "P":
            return f"{x:.3g} {prefix}{unit}".rstrip()
        x /= base
    raise AssertionError("unreachable")


def format_table(table: dict, bytes_per_element: int = 2) -> str:
    """The `cost_table` dict as text; memory in bytes at `bytes_per_element` (2 for fp16 / bf16, 4 for fp32)."""
    if not isinstance(table, dict):
        raise TypeError(f"table must be the dict cost_table returns, got {type(table).__name__}")
    missing = [key for key in TABLE_KEYS if key not in table]
    if missing:
        raise ValueError(f"table must be the dict cost_table returns; it has no {missing}")
    bytes_per = as_positive_int("bytes_per_element", bytes_per_element)  # 2.5 or 0 bytes is no element size
    lines = [
        f"LongNet cost model, one layer forward: N = {table['seq_len']}, B = {table['batch']}, "
        f"H = {table['heads']}, D = {table['head_dim']}, causal = {table['causal']}, "
        f"{bytes_per} bytes per element, P = {table['devices']} devices",
        f"{'':16} {'w':>7} {'r':>4} {'FLOPs':>10} {'/ dense':>9} {'dense / x':>9} "
        f"{'readable scores':>16} {'gathered K/V':>13}",
    ]
    rows = [*table["branches"], table["total"], table["dense"], table["local"]]
    for row in rows:
        red = f"{1 / row.ratio:.4g}" if row.ratio else "-"
        r = row.dilation_rate or "-"
        lines.append(
            f"{row.name:16} {row.segment_length:>7} {r:>4} {human(row.flops):>10} {row.ratio:>9.4f} {red:>9} "
            f"{human(row.score_elements * bytes_per, 'B'):>16} {human(row.gathered_elements * bytes_per, 'B'):>13}"
        )
    lines.append(f"activations q, k, v, out: {human(table['activation_elements'] * bytes_per, 'B')} for every method")
    lines.append("dense / x: times cheaper than dense (N r^2 / w for a branch); readable scores: B H S K^2")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m longnet_ref.analysis.complexity",
        description="FLOPs and memory of dilated, dense and local attention (LongNet Eqs. 16-18).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--seq-len", type=int, required=True, help="sequence length N")
    parser.add_argument(
        "--segment-lengths",
        type=int,
        nargs="+",
        default=list(TABLE2_SEGMENT_LENGTHS),
        help="the branches' segment lengths w_i (Table 2's mixture)",
    )
    parser.add_argument(
        "--dilation-rates",
        type=int,
        nargs="+",
        default=list(TABLE2_DILATION_RATES),
        help="the branches' dilation rates r_i, one per segment length",
    )
    parser.add_argument("--batch", type=int, default=1, help="B, sequences per batch")
    parser.add_argument("--heads", type=int, default=12, help="H (Table 2: 12)")
    parser.add_argument("--head-dim", type=int, default=64, help="D (Table 2: 768 / 12 = 64)")
    parser.add_argument("--causal", action="store_true", help="causal attention (only keys up to each query)")
    parser.add_argument("--devices", type=int, default=1, help="P for the sequence-parallel gathered K/V")
    parser.add_argument("--local-window", type=int, default=None, help="local attention's w (default: first w)")
    parser.add_argument("--bytes-per-element", type=int, default=2, help="2 for fp16/bf16, 4 for fp32")
    args = parser.parse_args(argv)
    try:
        table = cost_table(
            args.seq_len,
            args.segment_lengths,
            args.dilation_rates,
            batch=args.batch,
            heads=args.heads,
            head_dim=args.head_dim,
            causal=args.causal,
            devices=args.devices,
            local_window=args.local_window,
        )
        as_positive_int("bytes_per_element", args.bytes_per_element)
    except ValueError as error:
        parser.error(str(error))  # prints usage and the message, exits with status 2
    print(format_table(table, args.bytes_per_element))
    return 0


if __name__ == "__main__":
    sys.exit(main())
