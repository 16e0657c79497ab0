"""Explorers: moving a control redraws the picture and changes the numbers, and the numbers are right."""

import matplotlib

matplotlib.use("Agg")

import ipywidgets as widgets  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from longnet_ref import attention_pattern, geometric_mixture  # noqa: E402
from longnet_ref.analysis.dependency_paths import eq20_max_path, path_length_stats  # noqa: E402
from longnet_ref.analysis.widgets import (  # noqa: E402
    explore,
    format_numbers,
    live_widgets,
    path_explorer,
    pattern_explorer,
)
from longnet_ref.checks import HEAD_OFFSET_RULES  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    assert plt.get_fignums() == [], "a callback left a figure open"


def expected_pattern_numbers(n, w0, a, k, heads, head, causal, offsets):
    ws, rs = geometric_mixture(w0, a, branches=k)
    c = attention_pattern(n, ws, rs, heads, causal=causal, head_offsets=offsets)
    allowed = n * (n + 1) // 2 if causal else n * n
    return dict(
        flop_ratio=sum(min(w, n) / r**2 for w, r in zip(ws, rs)) / n,
        coverage=(c[head] > 0).sum().item() / allowed,
        coverage_all_heads=(c > 0).any(0).sum().item() / allowed,
        overlap=(c[head] >= 2).sum().item() / (c[head] > 0).sum().item(),
        work_ratio=c.sum().item() / (heads * allowed),
    )


def check_pattern_numbers(explorer):
    v = explorer.values()
    expected = expected_pattern_numbers(
        v["seq_len"], v["w0"], v["ratio"], v["branches"], v["heads"], v["head"], v["causal"], v["offsets"]
    )
    assert explorer.numbers == pytest.approx(expected)


def test_pattern_explorer_slider_changes_picture_and_numbers():
    explorer = pattern_explorer()
    check_pattern_numbers(explorer)
    picture, numbers = bytes(explorer.image.value), dict(explorer.numbers)
    assert picture[:4] == b"\x89PNG"
    explorer.controls["w0"].value = 16  # what the browser test does with the mouse
    assert bytes(explorer.image.value) != picture and explorer.numbers["flop_ratio"] != numbers["flop_ratio"]
    check_pattern_numbers(explorer)
    assert f'<span class="longnet-flop_ratio">{explorer.numbers["flop_ratio"]:.4f}</span>' in explorer.table.value


@pytest.mark.parametrize(
    "name, value, picture_changes, numbers_change",
    [
        ("seq_len", 96, True, True),
        ("ratio", 3, True, True),
        ("branches", 2, True, True),
        ("heads", 5, False, True),  # head 1 keeps its offsets; all heads together now cover r = 4
        ("head", 1, True, False),  # heads are symmetric: the picture moves, the fractions do not
        ("causal", True, True, True),
        ("offsets", "torchscale", True, True),  # with 3 heads head 1 gets offset 0 instead of 1 for r = 2
    ],
)
def test_every_control_redraws(name, value, picture_changes, numbers_change):
    explorer = pattern_explorer(heads=3)
    explorer.controls["head"].value = 2 if name == "head" else 1
    picture, numbers = bytes(explorer.image.value), dict(explorer.numbers)
    explorer.controls[name].value = value
    assert (bytes(explorer.image.value) != picture) == picture_changes
    assert (explorer.numbers != numbers) == numbers_change
    check_pattern_numbers(explorer)


def test_head_slider_follows_the_number_of_heads():
    explorer = pattern_explorer(heads=4)
    explorer.controls["head"].value = 3
    explorer.controls["heads"].value = 2
    assert explorer.controls["head"].max == 1 and explorer.controls["head"].value == 1
    check_pattern_numbers(explorer)


def test_path_explorer_slider_changes_picture_and_numbers():
    explorer = path_explorer(seq_len=128, w0=4, heads=1, window=8)
    picture, numbers = bytes(explorer.image.value), dict(explorer.numbers)
    stats = path_length_stats(128, *geometric_mixture(4, 2, seq_len=128), 1)
    assert numbers["max_path"] == stats.max and numbers["mean_path"] == pytest.approx(stats.mean)
    assert numbers["window_max_path"] == 19  # ceil(127 / 7)
    explorer.controls["w0"].value = 16
    assert bytes(explorer.image.value) != picture
    assert explorer.numbers["eq20"] == pytest.approx(eq20_max_path(128, 16, 2)) != numbers["eq20"]
    stats = path_length_stats(128, *geometric_mixture(16, 2, seq_len=128), 1)
    assert explorer.numbers["max_path"] == stats.max
    explorer.controls["causal"].value = True
    stats = path_length_stats(128, *geometric_mixture(16, 2, seq_len=128), 1, causal=True)
    assert explorer.numbers["unreachable"] == stats.unreachable / stats.pairs


def test_numbers_html():
    html = format_numbers({"flop_ratio": 0.25, "max_path": 3, "a<b": 1.0})
    assert '<span class="longnet-flop_ratio">0.2500</span>' in html and "max_path: <span" in html
    assert "a&lt;b" in html


def test_explorers_use_the_package_mixture_and_offset_rules():
    # the pattern explorer's mixture of k branches: w_i = w0 a^i, r_i = a^i for i < k
    for w0, a, k in ((8, 2, 3), (16, 3, 2), (1, 4, 5)):
        assert geometric_mixture(w0, a, branches=k) == ([w0 * a**i for i in range(k)], [a**i for i in range(k)])
    for explorer in (pattern_explorer(), path_explorer(seq_len=64)):
        assert tuple(explorer.controls["offsets"].options) == HEAD_OFFSET_RULES


def recording_plot(calls):
    def plot(w=16, r=4, causal=False):
        calls.append(dict(w=w, r=r, causal=causal))

    return plot


def controls():
    return {"w": widgets.IntSlider(value=16, min=2, max=44), "r": widgets.IntSlider(value=4, min=1, max=16)}


def test_explore_under_smoke_calls_the_callback_and_makes_no_widget():
    calls, made = [], []
    explore(recording_plot(calls), lambda: made.append(1), tries=[{"w": 8}, {"r": 2, "causal": True}], live=False)
    assert made == []  # no widget was created, so no comm was opened
    assert calls == [dict(w=16, r=4, causal=False), dict(w=8, r=4, causal=False), dict(w=16, r=2, causal=True)]


def test_explore_live_shows_controls_that_start_at_the_defaults():
    calls = []
    shown = explore(recording_plot(calls), controls, live=True)
    assert set(shown) == {"w", "r"}
    assert calls == [dict(w=16, r=4, causal=False)]  # interactive_output draws the first picture
    shown["w"].value = 20
    assert calls[-1] == dict(w=20, r=4, causal=False)


def test_explore_refuses_controls_and_tries_the_plot_does_not_match():
    with pytest.raises(ValueError, match="tries names \\['head'\\], which plot plot\\(\\) does not take"):
        explore(recording_plot([]), controls, tries=[{"head": 1}], live=False)
    with pytest.raises(ValueError, match="control 'w' starts at 30 but plot plot\\(\\) defaults to 16"):
        explore(recording_plot([]), lambda: {"w": widgets.IntSlider(value=30, max=44)}, live=True)
    with pytest.raises(ValueError, match="control 'head'"):
        explore(recording_plot([]), lambda: {"head": widgets.IntSlider()}, live=True)


def test_live_widgets_follows_ci_and_the_browser_switch(monkeypatch):
    monkeypatch.delenv("LONGNET_REF_LIVE_WIDGETS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert live_widgets()
    monkeypatch.setenv("CI", "true")
    assert not live_widgets()
    monkeypatch.setenv("LONGNET_REF_LIVE_WIDGETS", "1")
    assert live_widgets()
