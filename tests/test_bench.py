"""The benchmark command: --quick runs, checks every output against the oracle, refuses bad flags."""

import subprocess
import sys

import pytest

from longnet_ref.bench import attention_flops, geometric_config, main


def test_quick_benchmark_runs_and_checks_outputs():
    done = subprocess.run([sys.executable, "-m", "longnet_ref.bench", "--quick"], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "all outputs match the oracle" in done.stdout
    lines = [line for line in done.stdout.splitlines() if "GFLOP/s" in line]
    assert len(lines) == 20  # 2 N x 2 modes x 2 causal x (dense, fast) + readable at N = 2^10 (4)


def test_geometric_config_and_flops():
    assert geometric_config(16384) == ([2048, 4096, 8192, 16384], [1, 2, 4, 8])
    assert geometric_config(1000) == ([2048], [1])  # w >= N: one dense segment
    cfg = dict(path="fast", N=16384, B=1, H=8, D=64, ws=[2048, 4096, 8192, 16384], rs=[1, 2, 4, 8], causal=False,
               backward=False)  # fmt: skip
    dense = dict(cfg, path="dense")
    assert attention_flops(cfg) / attention_flops(dense) == pytest.approx(3840 / 16384)
    assert attention_flops(dict(cfg, causal=True, backward=True)) == pytest.approx(attention_flops(cfg) / 2 * 3.5)


@pytest.mark.parametrize(
    "argv, message",
    [(["--repeats", "1"], "--repeats must be at least 3"), (["--max-log2", "30"], "--max-log2"),
     (["--sections", "glue,speed"], "--sections")],
)  # fmt: skip
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
