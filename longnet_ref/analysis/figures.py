"""Every picture of the README, by one command: `python -m longnet_ref.analysis.figures`.

- patterns (from `attention_pattern`, via `viz`): branches coloured like the paper's Figure 2,
  heads like Figure 3, multiplicities, a block-summarised long sequence;
- the path-length law (`dependency_paths`): the longest dependency path against N for dense
  attention, a sliding window (N / w) and dilated mixtures (log N), against Eqs. 19-20; and what
  causal attention leaves unconnected;
- the cost model (`complexity`): FLOPs and memory against N for the paper's configuration
  (Sec. 4.1, Table 2), with its FLOP ratios to dense from Eqs. 16-17 marked at N = 2K, 8K, 16K, 32K.

`--notebooks` also re-runs every notebook (in CI mode, outputs discarded) so that their figures
(figures/NN_*.png) are regenerated too: then every PNG in figures/ comes from this one command.
Pictures are deterministic (no timings), so rerunning changes no committed file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import matplotlib

if __name__ == "__main__":
    matplotlib.use("Agg")  # a script draws into files, never onto a screen

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..checks import as_path, as_positive_int, as_positive_number, check_flag, check_instance
from ..cli import HelpFormatter
from ..patterns import geometric_mixture  # noqa: E402
from .complexity import (  # noqa: E402
    TABLE2_DILATION_RATES,
    TABLE2_SEGMENT_LENGTHS,
    branch_flops,
    cost_table,
    dense_flops,
    flop_ratio,
    mixture_flops,
)
from .dependency_paths import eq19_layers, eq20_max_path, path_length_stats, window_path_stats  # noqa: E402
from .viz import BRANCH_COLORS, plot_branches, plot_heads, plot_multiplicity, required_figures_dir, save_fig  # noqa: E402

# Mixtures whose dependency paths are plotted: (w0, a, heads, label).
PATH_MIXTURES = (
    (4, 2, 1, "dilated w0=4, a=2, 1 head"),
    (8, 2, 8, "dilated w0=8, a=2, 8 heads"),
)
WINDOW = 64  # the sliding window the mixtures are compared with


def check_sizes(sizes, integer=True) -> list:
    """A non-empty list of sequence lengths N, as ints (or, `integer=False`, positive floats: a
    curve of FLOPs against N takes np.geomspace's)."""
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__len__") or len(sizes) == 0:
        raise ValueError(f"sizes must be a non-empty list of sequence lengths, got {sizes!r}")
    check = as_positive_int if integer else as_positive_number
    return [check(f"sizes[{i}]", n) for i, n in enumerate(sizes)]


def path_law(sizes, mixtures=PATH_MIXTURES, window=WINDOW, verbose=False) -> dict:
    """Longest path (non-causal) and unconnected fraction (causal) against N, for every configuration."""
    sizes = check_sizes(sizes)
    rows = {"N": list(sizes), "dense": [], f"window {window}": [], f"segments {window}": []}
    rows.update({label: [] for *_, label in mixtures})
    rows.update({label + " causal": [] for *_, label in mixtures})
    for n in sizes:
        rows["dense"].append(1)
        rows[f"window {window}"].append(window_path_stats(n, window).max)
        rows[f"segments {window}"].append(path_length_stats(n, [window], [1]).max)  # inf when N > w
        for w0, a, heads, label in mixtures:
            ws, rs = geometric_mixture(w0, a, seq_len=n)
            start = time.perf_counter()
            rows[label].append(path_length_stats(n, ws, rs, heads).max)
            causal = path_length_stats(n, ws, rs, heads, causal=True)
            rows[label + " causal"].append(causal.unreachable / causal.pairs)
            if verbose:
                print(f"  paths N={n:6d} {label}: {time.perf_counter() - start:5.1f} s (both)", flush=True)
    return rows


def plot_path_law(rows, mixtures=PATH_MIXTURES, window=WINDOW):
    """Left: the longest path against N on log axes, with Eq. 20; right: causal pairs never connected."""
    wanted = ["N", "dense", f"window {window}", *(label for *_, label in mixtures)]
    wanted += [label + " causal" for *_, label in mixtures]
    missing = [key for key in wanted if key not in check_instance("rows", rows, dict, "the dict path_law returns")]
    if missing:
        raise ValueError(f"rows must be what path_law returns for these mixtures and window; it lacks {missing}")
    n = np.array(rows["N"], dtype=float)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(n, rows["dense"], "k-", label="dense: 1")
    left.plot(n, rows[f"window {window}"], "o-", color="gray", label=f"sliding window {window}: ~N / w")
    for i, (w0, a, _, label) in enumerate(mixtures):
        color = BRANCH_COLORS[i]
        left.plot(n, rows[label], "s-", color=color, label=label)
        grid = np.geomspace(n[0], n[-1], 200)
        eq20 = [eq20_max_path(x, w0, a) for x in grid]
        left.plot(grid, np.maximum(eq20, 0.5), "--", color=color, lw=1, label=f"Eq. 20, w0={w0}, a={a}")
        left.plot(n, [eq19_layers(x, w0, a) for x in n], ":", color=color, lw=1.5, label="Eq. 19: layers to reach N")
    left.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="longest dependency path (layers)")
    left.set_title(f"non-causal; local segments of {window}: never connected across segments", fontsize=9)
    left.legend(fontsize=7)
    for i, (*_, label) in enumerate(mixtures):
        right.plot(n, 100 * np.array(rows[label + " causal"]), "s-", color=BRANCH_COLORS[i], label=label)
    right.set(xscale="log", xlabel="sequence length N", ylabel="% of pairs j < i never connected")
    right.set_title("causal: a token at the end of a segment is kept by no larger branch", fontsize=9)
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_path_distribution(n=4096, window=WINDOW, w0=4, a=2, heads=1):
    """Fraction of pairs connected within L layers: the mixture against a sliding window of the same N."""
    ws, rs = geometric_mixture(w0, a, seq_len=n)
    mixture, local = path_length_stats(n, ws, rs, heads), window_path_stats(n, window)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for stats, color, name in ((mixture, BRANCH_COLORS[0], f"dilated w0={w0}, a={a}"), (local, "gray", "window")):
        layers = np.arange(len(stats.counts))
        ax.step(
            layers, np.cumsum(stats.counts) / stats.pairs, where="post", color=color, label=f"{name}: max {stats.max}"
        )
    ax.axvline(eq20_max_path(n, w0, a), color="k", ls="--", lw=1, label="Eq. 20")
    ax.set(xscale="log", xlabel="layers L", ylabel="fraction of pairs (j, i) connected", xlim=(0.9, None))
    ax.set_title(f"N = {n}, non-causal, every pair counted", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_flops(sizes=None):
    """FLOPs per head-dim against N: dense, the paper's mixture (Table 2), local attention, Eq. 18."""
    sizes = np.geomspace(2**10, 2**30, 81) if sizes is None else np.asarray(check_sizes(sizes, integer=False))
    ws, rs = list(TABLE2_SEGMENT_LENGTHS), list(TABLE2_DILATION_RATES)
    dense = [dense_flops(int(n)) for n in sizes]
    dilated = [sum(mixture_flops(int(n), ws, rs)) for n in sizes]
    local = [branch_flops(int(n), 2048, 1) for n in sizes]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(sizes, dense, "k-", label="dense: 4 N^2")
    left.plot(sizes, dilated, color=BRANCH_COLORS[0], label="dilated, Table 2 (w clipped to N)")
    left.plot(sizes, local, color="gray", ls=":", label="local segments w=2048")
    left.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="FLOPs per (batch, head, head dim)")
    left.legend(fontsize=8)
    marks = (2048, 8192, 16384, 32768)
    right.plot(sizes, np.array(dilated) / np.array(dense), color=BRANCH_COLORS[0])
    for n in marks:
        ratio = flop_ratio(n, ws, rs)
        right.plot(n, ratio, "o", color=BRANCH_COLORS[1])
        right.annotate(f"{ratio:.4g} at {n}", (n, ratio), textcoords="offset points", xytext=(6, 4), fontsize=8)
    right.axhline(1, color="k", lw=0.8)
    right.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="dilated / dense FLOPs")
    right.set_title("Table 2 mixture, Eqs. 16-17 (marked: N = 2K, 8K, 16K, 32K)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_memory(sizes=None, heads=12, head_dim=64, chunk=8192, bytes_per_element=2):
    """One layer's memory against N: readable scores (dense vs dilated), activations, gathered K/V per device."""
    sizes = [2**e for e in range(13, 31)] if sizes is None else check_sizes(sizes)
    chunk, bytes_per = as_positive_int("chunk", chunk), as_positive_int("bytes_per_element", bytes_per_element)
    ws, rs = list(TABLE2_SEGMENT_LENGTHS), list(TABLE2_DILATION_RATES)
    tables = [cost_table(n, ws, rs, heads=heads, head_dim=head_dim, devices=max(n // chunk, 1)) for n in sizes]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(sizes, [t["dense"].score_elements * bytes_per for t in tables], "k-", label="dense scores (N x N)")
    ax.plot(
        sizes, [t["total"].score_elements * bytes_per for t in tables], color=BRANCH_COLORS[0], label="dilated scores"
    )
    ax.plot(sizes, [t["activation_elements"] * bytes_per for t in tables], color="gray", ls=":", label="q, k, v, out")
    gathered = [t["total"].gathered_elements * bytes_per for t in tables]
    label = f"gathered K/V per device, {chunk} tokens each (0 while segments fit a device)"
    ax.plot(sizes, gathered, color=BRANCH_COLORS[1], label=label)
    ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="bytes (one layer, fp16)")
    ax.set_title(f"H={heads}, D={head_dim}, Table 2 branches", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def pattern_figures() -> dict:
    """The pattern pictures, small enough for full detail except the last (block-summarised)."""
    return {
        "patterns_branches": lambda: plot_branches(32, [8, 16, 32], [1, 2, 4], 4, head=0),
        "patterns_heads": lambda: plot_heads(32, 16, 4, 4),
        "patterns_multiplicity": lambda: plot_multiplicity(64, [8, 16, 32, 64], [1, 2, 4, 8], 4, head=1, causal=True),
        "patterns_long": lambda: plot_branches(4096, [256, 512, 1024, 2048, 4096], [1, 2, 4, 8, 16], 1),
    }


def all_figures(quick=False) -> dict:
    """name -> function that builds the figure. quick: smaller sweeps (for tests)."""
    check_flag("quick", quick)
    top = 10 if quick else 16
    figures = pattern_figures()
    figures["path_law"] = lambda: plot_path_law(path_law([2**e for e in range(4, top + 1)], verbose=not quick))
    figures["path_distribution"] = lambda: plot_path_distribution(1024 if quick else 4096)
    figures["flops_vs_length"] = plot_flops
    figures["memory_vs_length"] = plot_memory
    return figures


def run_notebooks(folder: Path) -> None:
    """Execute every notebook in CI mode (their figures are the same in every mode); outputs are discarded."""
    import nbformat
    from nbclient import NotebookClient

    folder = as_path("folder", folder)
    if not folder.is_dir():
        raise ValueError(f"folder must be a folder of notebooks, got {str(folder)!r}")
    os.environ.setdefault("CI", "true")
    for path in sorted(folder.glob("[0-9][0-9]_*.ipynb")):
        start = time.perf_counter()
        notebook = nbformat.read(path, as_version=4)
        NotebookClient(notebook, timeout=1200, resources={"metadata": {"path": str(folder)}}).execute()
        print(f"ran {path.name} in {time.perf_counter() - start:.0f} s (its figures/{path.stem[:2]}_*.png)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m longnet_ref.analysis.figures",
        description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("names", nargs="*", help="only these figures (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sweeps (seconds, for a smoke test)")
    parser.add_argument("--notebooks", action="store_true", help="also run every notebook to redo their figures")
    parser.add_argument("--out", type=Path, default=None, help="write here instead of the repository's figures/")
    args = parser.parse_args(argv)
    figures = all_figures(quick=args.quick)
    unknown = sorted(set(args.names) - set(figures))
    if unknown:
        parser.error(f"unknown figure names {unknown}; choose from {sorted(figures)}")
    if args.out is not None and not args.out.is_dir():
        parser.error(f"--out {args.out} is not a folder")
    if args.out is None:
        try:  # an installed copy writes only where it is told
            required_figures_dir("the figures")
        except ValueError as error:
            parser.error(f"{error}, or pass --out DIR")
    from tqdm.auto import tqdm

    names = args.names or list(figures)
    for name in tqdm(names, desc="figures", unit="figure", disable=None, leave=False):  # off without a terminal
        start = time.perf_counter()
        fig = figures[name]()
        path = save_fig(fig, name, folder=args.out)
        plt.close(fig)
        tqdm.write(f"{path} ({time.perf_counter() - start:.1f} s)")
    if args.notebooks:
        run_notebooks(Path(__file__).resolve().parents[2] / "notebooks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
