"""Pictures of LongNet (matplotlib). Every picture of a pattern is drawn from `attention_pattern`.

- `plot_branches`: which (query, key) pairs each branch keeps for one head, one colour per
  branch, and their union (overlaps blend the colours), like the paper's Figure 2.
- `plot_heads`: one branch, one colour per head: the heads' offsets tile the segment (Figure 3).
- `plot_multiplicity`: c(h, q, k), in how many branches q attends k (the merge's weights, Eq. 10).

Up to `DETAIL_LIMIT` tokens every pair is a pixel. Beyond, the picture is block-summarised:
each pixel is the mean of c over a block x block tile, computed from stripes of rows of the
pattern (`patterns.pattern_rows`, the rows of `attention_pattern`), so memory stays
O(H * stripe * N); `MAX_PATTERN_WORK` caps H * N^2, the time it takes.

`save_fig(fig, name)` writes a PNG into the repository's figures/ folder whatever the working
directory (nbval runs a notebook from its own folder; scripts run from anywhere); an installed
copy writes only where it is told (`figures_dir`).

Shape legend (adds to the package's): blk tokens per pixel side, nb = ceil(N / blk) pixels per side.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..checks import (
    as_path,
    as_positive_int,
    check_branches,
    check_file_name,
    check_flag,
    check_head_offsets,
    check_instance,
    is_sequence,
)
from ..files import write_atomic
from ..patterns import attention_pattern, pattern_rows

# One colour per branch, as in the paper's figures (matplotlib's tab10).
BRANCH_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
DETAIL_LIMIT = 384  # tokens: full detail up to here, block-summarised beyond
MAX_PIXELS = 256  # pixels per side of a block summary
MAX_PATTERN_WORK = 2**28  # H * N^2 entries of c a picture may compute (about 10 s)
STRIPE_ENTRIES = 2**23  # H * rows * N entries held at once


def checkout_root() -> Path | None:
    """The git checkout this package runs from (it holds pyproject.toml and figures/); None for an installed copy."""
    repo = Path(__file__).resolve().parents[2]  # longnet_ref/analysis/viz.py -> the checkout
    if (repo / "pyproject.toml").is_file() and (repo / "figures").is_dir() and (repo / "longnet_ref").is_dir():
        return repo
    return None


FIGURES_ENV = "LONGNET_REF_FIGURES"  # where an installed copy may write figures and tables


def figures_dir() -> Path | None:
    """Where figures and tables go: the checkout's figures/ folder, else the folder named by the
    environment variable LONGNET_REF_FIGURES, else None. An installed copy (Colab, a wheel)
    writes results only where it is told, never into whatever folder it was started from."""
    repo = checkout_root()
    if repo is not None:
        return repo / "figures"
    told = os.environ.get(FIGURES_ENV)
    if told:
        folder = Path(told)
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return None


def required_figures_dir(what: str) -> Path:
    """`figures_dir()`, or a ValueError saying how to name one, for commands whose output is files."""
    folder = figures_dir()
    if folder is None:
        raise ValueError(
            f"{what}: this copy of longnet_ref is installed, not a checkout, and writes files only where it "
            f"is told; set {FIGURES_ENV}=DIR (e.g. {FIGURES_ENV}=./figures) to write them there"
        )
    return folder


def save_fig(fig, name: str, *, dpi: int = 120, folder=None) -> Path | None:
    """Save `fig` as figures/<name>.png (PNG: nbval compares SVG text, not PNG) and return the path.

    `folder` replaces figures/ (tests and `figures --out` write elsewhere). Without `folder`, an
    installed copy with no LONGNET_REF_FIGURES writes nothing and returns None (`figures_dir`):
    a notebook's picture is then only shown.
    """
    check_instance("fig", fig, Figure, "a matplotlib Figure")
    check_file_name("name", name)
    folder = figures_dir() if folder is None else as_path("folder", folder)
    if folder is None:
        return None
    path = folder / (name if name.endswith(".png") else f"{name}.png")
    # metadata without a Software/date stamp keeps the bytes stable across runs and versions
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return write_atomic(path, buffer.getvalue())


def png_bytes(fig, *, dpi: int = 80, tight: bool = True) -> bytes:
    """The figure as PNG bytes (for `ipywidgets.Image`), without a timestamp; tight=False draws once, faster."""
    check_instance("fig", fig, Figure, "a matplotlib Figure")
    check_flag("tight", tight)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight" if tight else None, metadata={"Software": None})
    return buffer.getvalue()


def block_size(seq_len: int) -> int:
    """Tokens per pixel side: 1 up to DETAIL_LIMIT, else enough for at most MAX_PIXELS pixels."""
    seq_len = as_positive_int("seq_len", seq_len)
    return 1 if seq_len <= DETAIL_LIMIT else -(-seq_len // MAX_PIXELS)


def alias_free_block(seq_len: int, dilation_rates) -> int:
    """`block_size(seq_len)` rounded up to a multiple of every rate r (1 stays 1: full detail).

    A tile whose side r divides holds the same number of a branch's kept rows and columns
    wherever it lies, so a sparse branch shows as an even tint. With tiles smaller than r (8 x 8
    tiles of an r = 16 branch) some tiles hold a kept pair and others none: a moire of the
    stride, not the pattern.
    """
    blk = block_size(seq_len)
    if not is_sequence(dilation_rates) or not dilation_rates:
        raise ValueError(f"dilation_rates must be a non-empty list of positive integers, got {dilation_rates!r}")
    step = math.lcm(*(as_positive_int(f"dilation_rates[{i}]", r) for i, r in enumerate(dilation_rates)))
    return 1 if blk == 1 else -(-blk // step) * step


def pattern_blocks(
    seq_len, segment_lengths, dilation_rates, num_heads, *, causal=False, head_offsets="paper", block=None
) -> torch.Tensor:
    """Mean of c(h, q, k) over block x block tiles: float64 (H, ceil(N / blk), ceil(N / blk)).

    block = 1 gives `attention_pattern` itself (as float). A ragged last tile is averaged
    over its real pairs only.
    """
    n = as_positive_int("seq_len", seq_len)
    check_branches(segment_lengths, dilation_rates)
    num_heads = as_positive_int("num_heads", num_heads)
    check_head_offsets(head_offsets)
    blk = block_size(n) if block is None else as_positive_int("block", block)
    if num_heads * n * n > MAX_PATTERN_WORK:
        raise ValueError(
            f"seq_len {n} with num_heads {num_heads} needs {num_heads * n * n:.3g} pattern entries, more than "
            f"MAX_PATTERN_WORK = {MAX_PATTERN_WORK}; draw a shorter sequence (the pattern repeats every max(w))"
        )
    if blk == 1 and num_heads * n * n <= STRIPE_ENTRIES:
        return attention_pattern(
            n, segment_lengths, dilation_rates, num_heads, causal=causal, head_offsets=head_offsets
        ).double()
    nb = -(-n // blk)  # pixels per side
    sums = torch.zeros(num_heads, nb, nb, dtype=torch.float64)
    rows_per_stripe = max(blk, STRIPE_ENTRIES // (num_heads * n) // blk * blk)  # whole blocks of rows
    for start in range(0, n, rows_per_stripe):
        queries = torch.arange(start, min(start + rows_per_stripe, n))
        c = pattern_rows(
            n, queries, segment_lengths, dilation_rates, num_heads, causal=causal, head_offsets=head_offsets
        )
        c = torch.nn.functional.pad(c.double(), (0, nb * blk - n, 0, (-len(queries)) % blk))  # (H, Q + pad, nb * blk)
        tiles = c.view(num_heads, -1, blk, nb, blk).sum(dim=(2, 4))  # (H, (Q + pad) / blk, nb)
        sums[:, start // blk : start // blk + tiles.shape[1]] += tiles
    sizes = torch.full((nb,), blk, dtype=torch.float64)
    sizes[-1] = n - (nb - 1) * blk  # the ragged last tile
    return sums / (sizes[:, None] * sizes[None, :])


def check_colored(densities, colors) -> tuple[np.ndarray, np.ndarray]:
    """densities: one (nb, nb) picture per branch (a list, or an array (branches, nb, nb)); colors: one
    matplotlib colour each. Returns them as arrays (branches, nb, nb) float and (branches, 3) RGB."""
    try:
        weights = np.asarray(densities, dtype=float)
    except (TypeError, ValueError):
        weights = None  # not numbers, or pictures of different sizes
    if weights is None or weights.ndim != 3 or len(weights) == 0:
        raise ValueError(f"densities must be one or more (nb, nb) pictures of one size, got {densities!r:.80}")
    if not is_sequence(colors) or len(colors) != len(weights):
        raise ValueError(f"colors must be a list of {len(weights)} colours, one per density, got {colors!r}")
    rgb = []
    for i, color in enumerate(colors):
        try:
            rgb.append(to_rgb(color))
        except ValueError:
            raise ValueError(f"colors[{i}] must be a matplotlib colour such as '#1f77b4', got {color!r}") from None
    return weights, np.array(rgb)


def blend(densities, colors) -> np.ndarray:
    """Ink on white: each branch darkens a pixel towards its colour by its density; (nb, nb, 3) RGB in [0, 1]."""
    weights, rgb = check_colored(densities, colors)
    image = np.ones((*weights.shape[1:], 3))
    for density, color in zip(weights, rgb):
        ink = 1.0 - color  # (3,) what the colour removes from white
        image *= 1.0 - density[..., None].clip(0, 1) * ink
    return image


def dominant(densities, colors) -> np.ndarray:
    """Block summaries: each pixel in the colours of the branches that keep pairs there, weighted by how many."""
    weights, colors = check_colored(densities, colors)  # (branches, nb, nb), (branches, 3)
    total = weights.sum(axis=0)  # (nb, nb)
    rgb = np.einsum("kpq,kc->pqc", weights, colors)  # (nb, nb, 3)
    return np.where(total[..., None] > 0, rgb / np.maximum(total, 1e-300)[..., None], 1.0)


def _axes(count, size=2.6, ax=None):
    if ax is not None:
        return ax.figure, np.atleast_1d(ax)
    fig, axes = plt.subplots(1, count, figsize=(size * count, size + 0.3), squeeze=False)
    return fig, axes[0]


def _show(ax, image, seq_len, title, blk=None, **kwargs):
    blk = block_size(seq_len) if blk is None else blk
    extent = (-0.5, seq_len - 0.5, seq_len - 0.5, -0.5)  # axes in token positions, summarised or not
    ax.imshow(image, extent=extent, interpolation="nearest", **kwargs)
    ax.set_title(title + (f"\n(mean over {blk}x{blk} blocks)" if blk > 1 else ""), fontsize=9)
    ax.set_xlabel("key k", fontsize=8)
    ax.set_ylabel("query q", fontsize=8)
    ax.tick_params(labelsize=7)


def check_head(head, num_heads) -> int:
    """`head` as an int in [0, num_heads), or a ValueError naming it."""
    if isinstance(head, bool) or not isinstance(head, (int, np.integer)) or not 0 <= head < num_heads:
        raise ValueError(f"head must be an integer in [0, num_heads) = [0, {num_heads}), got {head!r}")
    return int(head)


def plot_branches(
    seq_len, segment_lengths, dilation_rates, num_heads=1, *, head=0, causal=False, head_offsets="paper", union=True
):
    """One panel per branch (its colour) for head `head`, then their union: the paper's Figure 2."""
    branches = check_branches(segment_lengths, dilation_rates)
    check_flag("union", union)
    head = check_head(head, as_positive_int("num_heads", num_heads))
    colors = [BRANCH_COLORS[i % len(BRANCH_COLORS)] for i in range(len(branches))]
    blk = alias_free_block(seq_len, [r for _, r in branches])  # tiles a multiple of every r: no moire
    per_branch = [
        pattern_blocks(seq_len, [w], [r], num_heads, causal=causal, head_offsets=head_offsets, block=blk)[head].numpy()
        for w, r in branches
    ]  # each (nb, nb): the fraction of each tile this branch keeps
    summarised = blk > 1
    fig, axes = _axes(len(branches) + bool(union))
    for ax, density, color, (w, r) in zip(axes, per_branch, colors, branches):
        # summarised, a sparse branch keeps 1/r^2 of a tile: scale it to full colour to see where it acts
        scaled = density / density.max() if summarised and density.max() > 0 else density
        title = f"w={w}, r={r}" + (" (colour scaled)" if summarised else "")
        _show(ax, blend([scaled], [color]), seq_len, title, blk)
    if union:
        if summarised:
            _show(axes[-1], dominant(per_branch, colors), seq_len, "union, by pairs per branch", blk)
        else:
            _show(axes[-1], blend(per_branch, colors), seq_len, "union (overlaps blend)", blk)
        legend = [Patch(facecolor=color, label=f"w={w}, r={r}") for color, (w, r) in zip(colors, branches)]
        how = "mixed by pairs kept" if summarised else "overlaps darken"
        axes[-1].legend(
            handles=legend,
            title=f"branch ({how})",
            fontsize=6,
            title_fontsize=6,
            loc="upper left",
            bbox_to_anchor=(1.02, 1),
        )
    fig.suptitle(f"dilated attention, head {head}, N={seq_len}" + (", causal" if causal else ""), fontsize=10)
    fig.tight_layout()
    return fig


def plot_heads(seq_len, segment_length, dilation_rate, num_heads, *, causal=False, head_offsets="paper"):
    """One branch (w, r), one colour per head, then all heads together: the paper's Figure 3."""
    w, r = check_branches([segment_length], [dilation_rate])[0]
    num_heads = as_positive_int("num_heads", num_heads)
    check_flag("causal", causal)
    density = pattern_blocks(seq_len, [w], [r], num_heads, causal=causal, head_offsets=head_offsets).numpy()
    colors = [BRANCH_COLORS[h % len(BRANCH_COLORS)] for h in range(num_heads)]
    fig, axes = _axes(num_heads + 1)
    for h in range(num_heads):
        _show(axes[h], blend([density[h]], [colors[h]]), seq_len, f"head {h}")
    _show(axes[-1], blend(list(density), colors), seq_len, "all heads")
    fig.suptitle(f"one branch w={w}, r={r}, offsets '{head_offsets}'", fontsize=10)
    fig.tight_layout()
    return fig


def count_style(most: int) -> dict:
    """imshow style for counts 0 .. most: white where masked, then one colour per value, darker = counted more."""
    most = as_positive_int("most", most)
    shades = plt.get_cmap("viridis_r")(np.linspace(0.15, 1.0, most))  # (most, 4) RGBA
    return dict(cmap=ListedColormap(["white", *shades]), vmin=-0.5, vmax=most + 0.5)


def plot_multiplicity(
    seq_len, segment_lengths, dilation_rates, num_heads=1, *, head=0, causal=False, head_offsets="paper", ax=None
):
    """c(h, q, k) for one head: 0 masked, 2 = seen by two branches (it weighs twice in the merge)."""
    branches = check_branches(segment_lengths, dilation_rates)
    if ax is not None and not isinstance(ax, plt.Axes):
        raise TypeError(f"ax must be None or a matplotlib Axes, got {type(ax).__name__}")
    head = check_head(head, as_positive_int("num_heads", num_heads))
    c = pattern_blocks(seq_len, segment_lengths, dilation_rates, num_heads, causal=causal, head_offsets=head_offsets)
    fig, (ax,) = _axes(1, size=3.6, ax=ax)
    most = len(branches)  # c counts at most one per branch
    style = count_style(most) if block_size(seq_len) == 1 else dict(cmap="viridis_r", vmin=0, vmax=most)  # fractional
    _show(ax, c[head].numpy(), seq_len, f"multiplicity c(h={head}, q, k)", **style)
    bar = fig.colorbar(ax.images[-1], ax=ax, shrink=0.8, label="branches that keep (q, k)")
    if block_size(seq_len) == 1:
        bar.set_ticks(range(most + 1))
    return fig
