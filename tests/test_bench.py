"""The benchmark command: --quick runs, checks every output against the oracle, refuses bad flags."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longnet_ref import geometric_mixture
from longnet_ref.bench.__main__ import RATIO, W0, main
from longnet_ref.bench.measure import attention_flops


def test_quick_benchmark_runs_and_checks_outputs():
    done = subprocess.run([sys.executable, "-m", "longnet_ref.bench", "--quick"], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "all outputs match the oracle" in done.stdout
    lines = [line for line in done.stdout.splitlines() if "GFLOP/s" in line]
    assert len(lines) == 20  # 2 N x 2 modes x 2 causal x (dense, fast) + readable at N = 2^10 (4)


def test_geometric_mixture_and_flops():
    # the bench's mixtures: w0 = 2048, a = 2 up to the first w >= N
    assert (W0, RATIO) == (2048, 2)
    assert geometric_mixture(W0, RATIO, seq_len=16384) == ([2048, 4096, 8192, 16384], [1, 2, 4, 8])
    assert geometric_mixture(W0, RATIO, seq_len=1000) == ([2048], [1])  # w >= N: one dense segment
    for log2 in range(4, 25):  # every N the bench accepts (powers of two): the w0 a^i <= max(N, w0)
        ws, rs = geometric_mixture(W0, RATIO, seq_len=2**log2)
        assert ws == [w for w in (2048 * 2**i for i in range(21)) if w <= max(2**log2, 2048)]
        assert rs == [w // 2048 for w in ws]
    cfg = dict(path="fast", N=16384, B=1, H=8, D=64, ws=[2048, 4096, 8192, 16384], rs=[1, 2, 4, 8], causal=False,
               backward=False)  # fmt: skip
    dense = dict(cfg, path="dense")
    assert attention_flops(cfg) / attention_flops(dense) == pytest.approx(3840 / 16384)
    assert attention_flops(dict(cfg, causal=True, backward=True)) == pytest.approx(attention_flops(cfg) / 2 * 3.5)


@pytest.mark.parametrize(
    "argv, message",
    [(["--repeats", "1"], "--repeats must be at least 3"), (["--max-log2", "30"], "--max-log2"),
     (["--sections", "glue,speed"], "--sections"), (["--device", "tpu"], "--device"),
     (["--device", "cuda", "--sections", "glue,parallel"], "--device cuda cannot run the parallel section")],
)  # fmt: skip
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error for a machine without CUDA")
def test_device_cuda_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda was asked for, but torch sees no CUDA GPU" in capsys.readouterr().err


def test_sweep_csv_round_trip_and_table(tmp_path, monkeypatch):
    import longnet_ref.analysis.viz as viz
    from longnet_ref.bench.measure import measure
    from longnet_ref.bench.report import read_csv, sweep_table, write_csv

    monkeypatch.setattr(viz, "figures_dir", lambda: tmp_path)
    ws, rs = geometric_mixture(W0, RATIO, seq_len=2**11)
    base = dict(N=2**11, B=1, H=2, D=16, ws=ws, rs=rs, causal=False, repeats=3)
    results = []
    for backward in (False, True):
        pair = [dict(base, path="dense", backward=backward), dict(base, path="fast", backward=backward)]
        results += [dict(r, extrapolated=False) for r in measure(pair)]
    write_csv(results, "bench")
    back = read_csv("bench")
    for got, want in zip(back, results):
        assert {k: got[k] for k in ("path", "N", "causal", "backward", "extrapolated")} == {
            k: want[k] for k in ("path", "N", "causal", "backward", "extrapolated")
        }
        assert got["seconds"] == pytest.approx(want["seconds"], rel=1e-12)
        assert got["ideal_flop_ratio"] == pytest.approx(
            attention_flops(want) / attention_flops(dict(want, path="dense"))
        )
    header, rows = sweep_table(back)
    assert len(rows) == 1 and rows[0][0] == "2^11"
    dense_fwd, fast_fwd = back[0]["seconds"], back[1]["seconds"]
    assert rows[0][header.index("fast / dense fwd")] == f"{fast_fwd / dense_fwd:.3f}"


def test_the_readme_shows_the_table_the_sweep_wrote():
    """The README's sweep table is figures/bench_table.md as `python -m longnet_ref.bench` wrote it."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    between = readme.split("<!-- bench:sweep -->\n", 1)[1].split("<!-- /bench:sweep -->", 1)[0]
    assert between == (root / "figures" / "bench_table.md").read_text()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backward", [False, True])
def test_kernel_floor_computes_each_branch_against_the_oracle(causal, backward):
    """The floor's contiguous SDPA calls compute every branch's kept rows (checked against the oracle)."""
    from longnet_ref.bench.floor import floor_rows
    from longnet_ref.bench.measure import measure

    base = dict(N=256, B=1, H=4, D=8, ws=[64, 128, 256], rs=[1, 2, 4], causal=causal, backward=backward, repeats=1)
    fast, floor = measure([dict(base, path="fast"), dict(base, path="floor")])
    assert floor["max_error"] < 1e-5 and fast["max_error"] < 1e-5
    assert floor["ideal_flop_ratio"] == fast["ideal_flop_ratio"]
    x = torch.arange(2 * 8, dtype=torch.float32).view(1, 2, 8, 1)  # (B, H, N, D): value = position + 8 h
    rows = floor_rows(x, 4, 2)  # (B*S, H, K, D): head 0 keeps offset 0, head 1 offset 1
    assert rows[..., 0].tolist() == [[[0, 2], [9, 11]], [[4, 6], [13, 15]]]
    with pytest.raises(ValueError, match="N % w == 0 and w % r == 0"):
        floor_rows(x, 3, 1)


def test_an_interrupted_sweep_leaves_the_committed_csv_whole(tmp_path, monkeypatch):
    import argparse

    import longnet_ref.analysis.viz as viz
    from longnet_ref.bench.__main__ import run_sweep

    monkeypatch.setattr(viz, "figures_dir", lambda: tmp_path)
    committed = "path,N\nfast,1024\n" * 50
    (tmp_path / "bench.csv").write_text(committed)
    args = argparse.Namespace(min_log2=10, max_log2=11, heads=2, repeats=3, readable_max_n=2**10, quick=False,
                              dense_limit=1e9, csv="bench")  # fmt: skip

    def measured(cfgs):  # a stand-in for a measurement: one result per configuration
        return [dict(cfgs[0], seconds=1.0, gflops=1.0, max_error=0.0, peak_rss_mb=1.0, ideal_flop_ratio=1.0)]

    calls = []

    def interrupted_after_three(cfgs):  # Ctrl-C during the fourth measurement
        calls.append(cfgs)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return measured(cfgs)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(args, interrupted_after_three, lambda result: None)
    assert (tmp_path / "bench.csv").read_text() == committed  # untouched
    partial = (tmp_path / "bench.partial.csv").read_text().splitlines()
    assert len(partial) == 1 + 3  # the header and what was measured, beside it

    results = run_sweep(args, measured, lambda result: None)  # a complete sweep
    assert not (tmp_path / "bench.partial.csv").exists()  # it replaced bench.csv
    assert len((tmp_path / "bench.csv").read_text().splitlines()) == 1 + len(results)


def test_lm_step_profile_counts_its_flops_and_splits_its_time():
    from longnet_ref.bench.lm_step import profile_lm_steps, step_flops

    results = {r["kind"]: r for r in profile_lm_steps(repeats=1, shapes=((64, 1),))}
    assert set(results) == {"dense", "local", "dilated"}
    E, L, N = 128, 2, 64
    weights = L * 12 * E * E + 256 * E  # per layer: q, k, v, out (4 E^2) and the MLP (8 E^2); the tied head
    dense_attention = L * 4 * 4 * 32 * N * N / 2 * 3.5  # 4 B H D N^2, causal halves, forward+backward x 3.5
    from longnet_ref.lm.model import LongNetLM, ModelConfig

    model = LongNetLM(ModelConfig(attention="dense", embed_dim=E, num_heads=4, num_layers=L))
    assert step_flops(model, N, 1) == 6 * weights * N + dense_attention
    for result in results.values():
        assert abs(sum(result["shares"].values()) - 1) < 1e-9 and min(result["shares"].values()) >= 0
        assert result["tokens_per_s"] == pytest.approx(N / result["seconds"])
    assert results["dense"]["kernel_calls"] == 2 * L  # one forward and one backward kernel call per layer
    assert results["dilated"]["kernel_calls"] > results["dense"]["kernel_calls"]  # a call per offset group


def test_lm_steps_against_another_checkout(tmp_path, capsys):
    """--against: another checkout's code (here a copy of this one's package) is imported beside this
    one, not in its place, and timed interleaved with it; shares of matmul follow the tokens/s."""
    import shutil

    import longnet_ref
    from longnet_ref.bench.lm_step import compare_lm_steps, load_against

    shutil.copytree(Path(longnet_ref.__file__).parent, tmp_path / "longnet_ref")
    against = load_against(tmp_path)
    assert against.__name__ == "longnet_against.bench.lm_step"
    assert Path(against.__file__).is_relative_to(tmp_path) and sys.modules["longnet_ref"] is longnet_ref
    results = compare_lm_steps(against, repeats=1, shapes=((64, 1),), kinds=("dense", "dilated"))
    assert [r["kind"] for r in results] == ["dense", "dilated"]
    for r in results:
        assert r["share_after"] / r["share_before"] == pytest.approx(r["after"] / r["before"])
    against.SIZES = dict(against.SIZES, embed_dim=64)  # the other side trains another model: refused
    with pytest.raises(ValueError, match=r"against's dense model at N = 64 differs from this one's in \['embed_dim'\]"):
        compare_lm_steps(against, repeats=1, shapes=((64, 1),), kinds=("dense",))
    assert load_against(tmp_path).SIZES["embed_dim"] == 128  # loaded afresh, not the cached module
    with pytest.raises(ValueError, match="against must be a checkout of this project"):
        load_against(tmp_path / "nowhere")
    for flags in (["--sections", "glue", "--against", str(tmp_path)], ["--sections", "lm", "--against", "/"]):
        with pytest.raises(SystemExit):
            main(flags)
    assert "--against" in capsys.readouterr().err


def test_lm_and_tiles_sections_refuse_quick_and_cuda(capsys):
    for name in ("lm", "tiles"):
        for flags in (["--quick"], ["--device", "cuda"]):
            with pytest.raises(SystemExit):
                main(["--sections", name, *flags])
            assert f"--sections {name} times the CPU kernel" in capsys.readouterr().err


def test_tiles_ratios_come_from_the_timings_and_the_kernel_is_checked(monkeypatch, capsys):
    from longnet_ref.bench import tiles

    # made-up times: non-causal 1 per row-key pair, causal 0.6 of it
    fake = {K: {(c, b): K * (0.6 if c else 1.0) * (3 if b else 1) for c in (False, True) for b in (False, True)}
            for K in (64, 128)}  # fmt: skip
    monkeypatch.setattr(tiles, "tile_times", lambda K, D, repeats: (fake[K], 0.0))
    rows = tiles.run_tiles(piece_rows=(64, 128), head_dims=(32,))
    assert [row["forward"] for row in rows] == pytest.approx([0.6, 0.6])
    assert rows[1]["ideal"] == pytest.approx(129 / 256)
    # split 128 into two causal 64s (0.6 x 64) plus half the rows on 64 keys (64 / 2): over 0.6 x 128
    assert rows[1]["split forward"] == pytest.approx((0.6 * 64 + 64 / 2) / (0.6 * 128))
    assert math.isnan(rows[0]["split forward"])  # no K / 2 row measured
    assert "D = 32" in capsys.readouterr().out


def test_tiles_times_and_checks_the_real_kernel(monkeypatch):
    from longnet_ref.bench import tiles

    times, error = tiles.tile_times(32, 8, total_rows=64, repeats=1)
    assert set(times) == {(c, b) for c in (False, True) for b in (False, True)} and min(times.values()) > 0
    assert error < 1e-5
    # a kernel that ignored causality would be caught by the check
    real = tiles.attention_forward
    monkeypatch.setattr(tiles, "attention_forward", lambda q, k, v, causal, scale: real(q, k, v, False, scale))
    assert tiles.tile_times(32, 8, total_rows=64, repeats=1)[1] > 1e-2
