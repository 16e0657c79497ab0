"""Pictures: every pixel comes from attention_pattern (exactly, or as a block mean); save_fig's folder."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402

from longnet_ref import attention_pattern  # noqa: E402
from longnet_ref.analysis import viz  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def block_mean(c: torch.Tensor, b: int) -> torch.Tensor:
    """Independent block mean of (H, N, N): average pooling over the real entries of each tile."""
    H, n, _ = c.shape
    nb = -(-n // b)
    out = torch.zeros(H, nb, nb, dtype=torch.float64)
    for i in range(nb):
        for j in range(nb):
            out[:, i, j] = c[:, i * b : (i + 1) * b, j * b : (j + 1) * b].double().mean(dim=(1, 2))
    return out


def test_full_detail_is_the_pattern():
    args = (40, [8, 16, 40], [1, 2, 4], 3)
    exact = attention_pattern(*args, causal=True, head_offsets="torchscale")
    got = viz.pattern_blocks(*args, causal=True, head_offsets="torchscale")
    torch.testing.assert_close(got, exact.double(), rtol=0, atol=0)


@pytest.mark.parametrize("n, block", [(100, 8), (99, 10), (64, 64)])
def test_block_summary_is_the_block_mean(n, block):
    args = (n, [6, 24, 100], [1, 3, 9], 2)
    got = viz.pattern_blocks(*args, causal=True, block=block)
    torch.testing.assert_close(got, block_mean(attention_pattern(*args, causal=True), block), rtol=0, atol=1e-12)


def test_large_sequences_are_summarised_in_stripes(monkeypatch):
    n = 600  # beyond DETAIL_LIMIT: ceil(600 / 256) = 3 tokens per pixel
    assert viz.block_size(n) == 3 and viz.block_size(viz.DETAIL_LIMIT) == 1
    monkeypatch.setattr(viz, "STRIPE_ENTRIES", 2 * n * 10)  # force many stripes of rows
    args = (n, [32, 128, 512], [1, 4, 16], 2)
    got = viz.pattern_blocks(*args)
    assert got.shape == (2, 200, 200)
    torch.testing.assert_close(got, block_mean(attention_pattern(*args), 3), rtol=0, atol=1e-12)


def test_too_large_is_refused():
    with pytest.raises(ValueError, match="seq_len 65536"):
        viz.pattern_blocks(65536, [2048], [1], 1)


def test_branch_panels_are_coloured_where_the_branch_attends():
    n, ws, rs, H, head = 32, [8, 16, 32], [1, 2, 4], 4, 1
    fig = viz.plot_branches(n, ws, rs, H, head=head)
    for i, (w, r) in enumerate(zip(ws, rs)):
        image = fig.axes[i].images[0].get_array()  # (N, N, 3)
        mask = attention_pattern(n, [w], [r], H)[head].numpy() > 0
        colour = np.array(to_rgb(viz.BRANCH_COLORS[i]))
        assert np.allclose(image[mask], colour) and np.allclose(image[~mask], 1.0)
    union = fig.axes[len(ws)].images[0].get_array()
    attended = attention_pattern(n, ws, rs, H)[head].numpy() > 0
    assert np.all((union < 1).any(axis=-1) == attended)  # white exactly where no branch attends


def test_heads_panels():
    n, w, r, H = 32, 16, 4, 4
    fig = viz.plot_heads(n, w, r, H)
    pattern = attention_pattern(n, [w], [r], H).numpy()
    for h in range(H):
        image = fig.axes[h].images[0].get_array()
        assert np.all((image < 1).any(axis=-1) == (pattern[h] > 0))


def test_multiplicity_panel():
    fig = viz.plot_multiplicity(48, [8, 16, 48], [1, 2, 4], 4, head=2, causal=True)
    expected = attention_pattern(48, [8, 16, 48], [1, 2, 4], 4, causal=True)[2].double().numpy()
    assert np.array_equal(np.asarray(fig.axes[0].images[0].get_array()), expected)


def test_summarised_union_is_white_only_where_nothing_is_kept():
    n, ws, rs = 512, [32, 128, 512], [1, 4, 16]
    fig = viz.plot_branches(n, ws, rs, 1)
    union = fig.axes[-1].images[0].get_array()
    means = block_mean(attention_pattern(n, ws, rs, 1), viz.alias_free_block(n, rs))[0].numpy()
    assert np.all((union < 1).any(axis=-1) == (means > 0))


def test_summaries_use_tiles_that_every_rate_divides():
    assert viz.block_size(2048) == 8 and viz.alias_free_block(2048, [1, 2, 4, 8, 16]) == 16
    assert viz.alias_free_block(2048, [1, 3]) == 9 and viz.alias_free_block(256, [16]) == 1  # full detail stays
    n, ws, rs = 2048, [128, 1024], [1, 16]
    fig = viz.plot_branches(n, ws, rs, 1)
    sparse = np.asarray(fig.axes[1].images[0].get_array())  # the r = 16 branch, colour scaled: (nb, nb, 3)
    assert sparse.shape[:2] == (n // 16, n // 16)
    tiles = np.arange(n // 16) * 16 // 1024  # the segment of each tile
    inside = tiles[:, None] == tiles[None, :]  # tiles within one segment of w = 1024
    tinted = (sparse < 1).any(axis=-1)
    assert np.array_equal(tinted, inside)  # every tile of a segment tinted, none outside: no moire
    assert len(np.unique(sparse[inside], axis=0)) == 1  # and evenly
    labels = [text.get_text() for text in fig.axes[-1].get_legend().get_texts()]
    assert labels == ["w=128, r=1", "w=1024, r=16"]  # the union's colours are named
    plt.close(fig)


def test_bad_head():
    with pytest.raises(ValueError, match="head must be an integer in"):
        viz.plot_branches(16, [4], [1], 2, head=2)
    with pytest.raises(ValueError, match="head must be an integer in"):
        viz.plot_multiplicity(16, [4], [1], 2, head=1.0)


def test_save_fig_writes_into_the_repo_figures_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    path = viz.save_fig(fig, "_test_save_fig")
    try:
        assert path == viz.figures_dir() / "_test_save_fig.png" and path.read_bytes()[:4] == b"\x89PNG"
        assert not (tmp_path / "figures").exists()
    finally:
        path.unlink()
    with pytest.raises(ValueError, match="name"):
        viz.save_fig(fig, "sub/dir")


def test_png_bytes_are_stable():
    fig, ax = plt.subplots()
    ax.imshow(np.eye(4))
    assert viz.png_bytes(fig) == viz.png_bytes(fig) and viz.png_bytes(fig)[:4] == b"\x89PNG"


def test_figures_command_writes_pngs_elsewhere(tmp_path, capsys):
    from longnet_ref.analysis import figures

    names = ["patterns_branches", "path_distribution", "flops_vs_length", "memory_vs_length"]
    assert figures.main(["--quick", "--out", str(tmp_path), *names]) == 0
    for name in names:
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit) as exit_info:
        figures.main(["no_such_figure"])
    assert exit_info.value.code == 2 and "unknown figure names ['no_such_figure']" in capsys.readouterr().err


def test_path_law_rows_are_the_path_statistics():
    from longnet_ref import geometric_mixture
    from longnet_ref.analysis import dependency_paths as paths
    from longnet_ref.analysis import figures

    rows = figures.path_law([16, 128], mixtures=[(4, 2, 1, "m")], window=8)
    assert rows["dense"] == [1, 1] and rows["window 8"] == [3, 19]  # ceil((N - 1) / 7)
    assert rows["segments 8"] == [float("inf")] * 2
    for n, longest, lost in zip([16, 128], rows["m"], rows["m causal"]):
        ws, rs = geometric_mixture(4, 2, seq_len=n)
        causal = paths.path_length_stats(n, ws, rs, 1, causal=True)
        assert longest == paths.path_length_stats(n, ws, rs, 1).max and lost == causal.unreachable / causal.pairs


def test_an_installed_copy_writes_figures_and_tables_only_where_it_is_told(tmp_path, monkeypatch, capsys):
    from longnet_ref.analysis import figures as figures_cli
    from longnet_ref.analysis.results import write_table
    from longnet_ref.bench.__main__ import main as bench_main
    from longnet_ref.lm.experiment import main as experiment_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(viz, "checkout_root", lambda: None)  # an installed copy
    monkeypatch.delenv(viz.FIGURES_ENV, raising=False)
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    assert viz.figures_dir() is None and viz.save_fig(fig, "shown_only") is None  # a notebook's picture: shown only
    with pytest.raises(ValueError, match=f"the table t: .* set {viz.FIGURES_ENV}=DIR"):
        write_table("t", ["a"], [[1]])
    for main, argv in (
        (bench_main, ["--replot"]),
        (bench_main, ["--sections", "sweep"]),
        (figures_cli.main, ["patterns_branches"]),
        (experiment_main, ["report", "--runs", str(tmp_path / "runs")]),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and viz.FIGURES_ENV in capsys.readouterr().err, argv
    assert list(tmp_path.iterdir()) == []  # nothing written in the working directory

    told = tmp_path / "told"
    monkeypatch.setenv(viz.FIGURES_ENV, str(told))
    assert viz.save_fig(fig, "kept") == told / "kept.png" and (told / "kept.png").read_bytes()[:4] == b"\x89PNG"
    write_table("t", ["a"], [[1]])
    assert sorted(p.name for p in told.iterdir()) == ["kept.png", "t.csv", "t.md"]
    plt.close(fig)
