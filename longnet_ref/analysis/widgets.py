"""Interactive explorers (core ipywidgets that exist in 7.7 and 8: JupyterLab and Colab alike).

- `pattern_explorer()`: sliders for N, w0, the ratio a, the number of branches, heads and the
  head shown; a checkbox for causal and a menu for the head-offset rule. It shows the pattern (from
  `attention_pattern`), the FLOP ratio against dense (Eq. 17) and coverage / overlap numbers.
- `path_explorer()`: the same knobs for dependency paths (`dependency_paths`): the distribution of
  path lengths of the mixture against a sliding window, with Eq. 20's prediction.

Each explorer is a plain function `view(**values) -> (figure, numbers)` plus an `Explorer`
widget that calls it whenever a control changes and shows the figure as a PNG
(`ipywidgets.Image`) next to the numbers. Tests set a control's value and check that the
picture and the numbers change; no browser needed (tests/test_browser.py does use one).

`explore(plot, make_controls, tries=...)` is the notebooks' slider cell. Live, it shows the
controls and redraws `plot(**values)` on every change. Under SMOKE (CI, headless runs) it makes
no widget at all and calls `plot` itself, with its defaults and then each of `tries`: the calls
a learner's slider moves would make. A live widget in a kernel with no browser attached can
stall nbclient/nbconvert (jupyter/nbclient#312), and a widget that is never shown still opens
a comm; `live_widgets()` says which case this is.
"""

from __future__ import annotations

import html
import inspect
import os

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np

from ..checks import HEAD_OFFSET_RULES, as_positive_int, check_flag, check_instance
from ..patterns import attention_pattern, geometric_mixture
from .complexity import flop_ratio
from .dependency_paths import eq19_layers, eq20_max_path, path_length_stats, window_path_stats
from .viz import BRANCH_COLORS, blend, check_head, count_style, png_bytes


def pattern_view(seq_len=64, w0=8, ratio=2, branches=3, heads=4, head=0, causal=False, offsets="paper"):
    """Picture and numbers of a geometric mixture: (figure, numbers).

    numbers: flop_ratio (Eq. 17, w clipped to N), work_ratio (exact: sum of c over heads
    and pairs / H / allowed pairs), coverage (allowed pairs the head attends), coverage_all_heads
    (pairs at least one head attends) and overlap (attended pairs of the head seen by 2+ branches).
    """
    ws, rs = geometric_mixture(w0, ratio, branches=branches)
    head = check_head(head, as_positive_int("heads", heads))  # refused, not clamped: the explorer's slider follows H
    c = attention_pattern(seq_len, ws, rs, heads, causal=causal, head_offsets=offsets)  # (H, N, N)
    # The picture needs head `head` of each branch alone. Under the "paper" and "none" rules head h
    # has the same offsets whatever H, so h + 1 heads suffice (the redraw stays fast).
    needed = heads if offsets == "torchscale" else head + 1
    per_branch = [
        attention_pattern(seq_len, [w], [r], needed, causal=causal, head_offsets=offsets)[head].numpy()
        for w, r in zip(ws, rs)
    ]  # each (N, N) in {0, 1}
    allowed = seq_len * (seq_len + 1) // 2 if causal else seq_len * seq_len  # pairs dense attention computes
    kept = c[head] > 0  # (N, N)
    numbers = dict(
        flop_ratio=flop_ratio(seq_len, ws, rs),
        work_ratio=c.sum().item() / (heads * allowed),
        coverage=kept.sum().item() / allowed,
        coverage_all_heads=(c > 0).any(dim=0).sum().item() / allowed,
        overlap=(c[head] >= 2).sum().item() / max(kept.sum().item(), 1),
    )
    colors = [BRANCH_COLORS[i % len(BRANCH_COLORS)] for i in range(branches)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.6))
    left.imshow(blend(per_branch, colors), interpolation="nearest")
    left.set_title(f"head {head}: " + ", ".join(f"({w},{r})" for w, r in zip(ws, rs)), fontsize=9)
    image = right.imshow(c[head].numpy(), interpolation="nearest", **count_style(branches))
    right.set_title("multiplicity c(h, q, k)", fontsize=9)
    fig.colorbar(image, ax=right, shrink=0.8, ticks=range(branches + 1))
    for ax in (left, right):
        ax.set_xlabel("key k")
        ax.set_ylabel("query q")
    fig.subplots_adjust(left=0.07, right=0.95, bottom=0.12, top=0.9, wspace=0.25)  # fixed: no layout search
    return fig, numbers


def path_view(seq_len=256, w0=4, ratio=2, heads=1, window=16, causal=False, offsets="paper"):
    """Dependency paths of the geometric mixture that covers N, against a sliding window: (figure, numbers)."""
    ws, rs = geometric_mixture(w0, ratio, seq_len=seq_len)
    mixture = path_length_stats(seq_len, ws, rs, heads, causal=causal, head_offsets=offsets)
    local = window_path_stats(seq_len, window, causal=causal)
    numbers = dict(
        max_path=mixture.max,
        mean_path=mixture.mean,
        unreachable=mixture.unreachable / mixture.pairs,
        eq20=eq20_max_path(seq_len, w0, ratio),
        eq19_layers=eq19_layers(seq_len, w0, ratio),
        window_max_path=local.max,
        flop_ratio=flop_ratio(seq_len, ws, rs),
        window_flop_ratio=flop_ratio(seq_len, [window], [1]),
    )
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for stats, color, name in ((mixture, BRANCH_COLORS[0], "dilated mixture"), (local, BRANCH_COLORS[1], "window")):
        layers = np.arange(len(stats.counts))
        connected = np.cumsum(stats.counts) / stats.pairs  # pairs within that many layers
        ax.step(layers, connected, where="post", color=color, label=f"{name} (max {stats.max})")
    ax.axvline(numbers["eq20"], color="k", ls="--", lw=1, label=f"Eq. 20: {numbers['eq20']:.2f}")
    ax.set_xscale("log")
    ax.set_xlim(0.9, None)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("layers L")
    ax.set_ylabel("fraction of pairs connected within L")
    ax.set_title(f"N={seq_len}, branches " + ", ".join(f"({w},{r})" for w, r in zip(ws, rs)), fontsize=8)
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.15, top=0.9)
    return fig, numbers


def format_numbers(numbers: dict) -> str:
    """HTML list; every value in a span with class `longnet-<name>` (what the browser test reads)."""
    items = []
    for name, value in check_instance("numbers", numbers, dict, "a dict {name: value}").items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        items.append(f'<li>{html.escape(name)}: <span class="longnet-{name}">{text}</span></li>')
    return "<ul>" + "".join(items) + "</ul>"


class Explorer(widgets.VBox):
    """Controls, a picture and numbers: `view(**values)` runs whenever a control changes.

    `controls` (name -> widget), `numbers` (the last numbers) and `image` (the PNG) are public so
    that tests can move a slider and check what changed.
    """

    def __init__(self, view, controls: dict, title: str, css_class: str):
        self.view, self.controls, self.numbers = view, controls, {}
        self.image = widgets.Image(format="png", layout=widgets.Layout(max_width="620px"))
        self.table = widgets.HTML()
        self.image.add_class("longnet-picture")
        self.table.add_class("longnet-numbers")
        super().__init__(
            [
                widgets.HTML(f"<b>{html.escape(title)}</b>"),
                widgets.HBox([widgets.VBox(list(controls.values())), self.table]),
                self.image,
            ]
        )
        self.add_class(css_class)
        for control in controls.values():
            control.observe(self.redraw, names="value")
        self.redraw()

    def values(self) -> dict:
        return {name: control.value for name, control in self.controls.items()}

    def redraw(self, change=None):
        fig, self.numbers = self.view(**self.values())
        self.image.value = png_bytes(fig, tight=False)
        plt.close(fig)  # the PNG is shown; keep no figure open (and none printed twice)
        self.table.value = format_numbers(self.numbers)


def _slider(name, description, value, low, high, step=1):
    """An IntSlider for parameter `name`; a start outside [low, high] is refused (the slider would clamp it)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}] (its slider's range), got {value!r}")
    return widgets.IntSlider(
        value=value, min=low, max=high, step=step, description=description, continuous_update=False
    )


def pattern_explorer(seq_len=64, w0=8, ratio=2, branches=3, heads=4) -> Explorer:
    """Sliders and toggles over `pattern_view`; keep N <= 512 for redraws under half a second."""
    controls = dict(
        seq_len=_slider("seq_len", "N", seq_len, 8, 512, 8),
        w0=_slider("w0", "w0", w0, 1, 128),
        ratio=_slider("ratio", "ratio a", ratio, 2, 4),
        branches=_slider("branches", "branches", branches, 1, 5),
        heads=_slider("heads", "heads H", heads, 1, 8),
        head=_slider("head", "head", 0, 0, 7),
        causal=widgets.Checkbox(value=False, description="causal"),
        offsets=widgets.Dropdown(options=HEAD_OFFSET_RULES, value="paper", description="offsets"),
    )

    def follow_heads(change):  # the head slider only offers heads that exist
        controls["head"].max = change["new"] - 1

    controls["heads"].observe(follow_heads, names="value")
    controls["head"].max = heads - 1
    return Explorer(pattern_view, controls, "Dilated attention pattern", "longnet-pattern-explorer")


def path_explorer(seq_len=256, w0=4, ratio=2, heads=1, window=16) -> Explorer:
    """Sliders and toggles over `path_view` (dependency paths); N <= 512 redraws in well under a second."""
    controls = dict(
        seq_len=_slider("seq_len", "N", seq_len, 16, 2048, 16),
        w0=_slider("w0", "w0", w0, 1, 64),
        ratio=_slider("ratio", "ratio a", ratio, 2, 4),
        heads=_slider("heads", "heads H", heads, 1, 16),
        window=_slider("window", "window", window, 2, 256),
        causal=widgets.Checkbox(value=False, description="causal"),
        offsets=widgets.Dropdown(options=HEAD_OFFSET_RULES, value="paper", description="offsets"),
    )
    return Explorer(path_view, controls, "Dependency paths", "longnet-path-explorer")


def live_widgets() -> bool:
    """Whether the notebook shows live widgets: yes, except under SMOKE (the CI variable set:
    CI, headless runs), unless LONGNET_REF_LIVE_WIDGETS=1 says a browser is attached
    (tests/test_browser.py drives JupyterLab in CI)."""
    return "CI" not in os.environ or os.environ.get("LONGNET_REF_LIVE_WIDGETS") == "1"


def explore(plot, make_controls, *, tries=(), per_row=3, live=None):
    """Controls over `plot(**values)`: live sliders in a notebook, their callback alone under SMOKE.

    make_controls() -> {parameter of plot: widget}; each widget starts at that parameter's
    default, so the first picture is `plot()` either way. tries: dicts of parameter values,
    drawn in turn when not live (what moving the sliders would draw). per_row: controls per
    row. live: None asks `live_widgets()`. Returns the controls when live, else None.
    """
    for name, function in (("plot", plot), ("make_controls", make_controls)):
        if not callable(function):
            raise TypeError(f"{name} must be a callable, got {function!r} ({type(function).__name__})")
    per_row = as_positive_int("per_row", per_row)
    live = live_widgets() if live is None else check_flag("live", live)
    parameters = inspect.signature(plot).parameters
    for values in tries:
        unknown = sorted(set(values) - set(parameters))
        if unknown:
            raise ValueError(f"tries names {unknown}, which plot {plot.__name__}() does not take: {list(parameters)}")
    if not live:
        plot()
        for values in tries:
            plot(**values)
        return None
    controls = make_controls()
    for name, control in controls.items():
        if name not in parameters:
            raise ValueError(f"make_controls() returned a control {name!r}, which plot {plot.__name__}() does not take")
        default = parameters[name].default
        if default is inspect.Parameter.empty or default != control.value:
            raise ValueError(
                f"control {name!r} starts at {control.value!r} but plot {plot.__name__}() defaults to "
                f"{default!r}: the first picture must be the same live and under SMOKE"
            )
    items = list(controls.values())
    rows = [widgets.HBox(items[i : i + per_row]) for i in range(0, len(items), per_row)]
    from IPython.display import display

    display(widgets.VBox(rows), widgets.interactive_output(plot, controls))
    return controls
