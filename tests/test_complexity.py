"""The cost model: the paper's numbers (Eqs. 16-18), exact pair counts against keeps and attention_pattern, the CLI."""

import subprocess
import sys

import numpy as np
import pytest

from longnet_ref import attention_pattern, geometric_mixture, head_offset, keeps
from longnet_ref.analysis.complexity import (
    TABLE2_DILATION_RATES,
    TABLE2_SEGMENT_LENGTHS,
    BranchCost,
    attended_pairs,
    branch_cost,
    branch_flops,
    cost_table,
    dense_flops,
    flop_ratio,
    format_table,
    geometric_bound,
    human,
    main,
    mixture_flops,
    reduction,
)
from longnet_ref.checks import HEAD_OFFSET_RULES

WS, RS = list(TABLE2_SEGMENT_LENGTHS), list(TABLE2_DILATION_RATES)


def test_table2_flop_ratios():
    # Eqs. 16-17 (Sec. 2.4) for the Table 2 mixture (Sec. 4.1) against dense, w clipped to N
    assert round(flop_ratio(8192, WS, RS), 3) == 0.472
    assert round(flop_ratio(16384, WS, RS), 4) == 0.2535
    assert round(flop_ratio(32768, WS, RS), 4) == 0.1302
    assert round(flop_ratio(2048, WS, RS), 3) == 1.347  # more than dense


def test_table2_per_branch_reductions():
    # N r^2 / w: how many times cheaper than dense each branch of Eq. 16 is, at N = 32768
    assert [reduction(32768, w, r) for w, r in zip(WS, RS)] == [16, 32, 64, 72, 144]


def test_flop_formula():
    B, H, D, N = 2, 3, 5, 4096
    assert dense_flops(N, batch=B, heads=H, head_dim=D) == 4 * B * H * D * N * N
    assert branch_flops(N, 512, 4, batch=B, heads=H, head_dim=D) == 4 * B * H * D * N * 512 / 16
    assert branch_flops(N, 10**6, 1) == dense_flops(N)  # w clipped to N
    assert branch_flops(N, 512, 4, causal=True) == branch_flops(N, 512, 4) / 2
    assert sum(mixture_flops(N, [512, 1024], [1, 2])) == branch_flops(N, 512, 1) + branch_flops(N, 1024, 2)


@pytest.mark.parametrize(
    "n, w, r, heads, causal, rule",
    [
        (64, 16, 4, 4, False, "paper"),
        (64, 16, 4, 4, True, "paper"),
        (50, 12, 5, 3, False, "paper"),  # ragged segment, w not a multiple of r
        (50, 12, 5, 3, True, "torchscale"),
        (37, 40, 3, 2, False, "none"),  # w > N
        (33, 7, 7, 5, True, "paper"),
    ],
)
def test_attended_pairs_is_the_pattern_sum(n, w, r, heads, causal, rule):
    pattern = attention_pattern(n, [w], [r], heads, causal=causal, head_offsets=rule)
    assert attended_pairs(n, w, r, heads, causal=causal, head_offsets=rule) == pattern.sum().item()


@pytest.mark.parametrize("rule", HEAD_OFFSET_RULES)
@pytest.mark.parametrize("causal", [False, True])
def test_attended_pairs_is_keeps_summed_exhaustively(rule, causal):
    # attended_pairs is the closed form of the keep rule: count keeps(q, k, w, r, o_h) over every
    # pair, for every head, of every small branch (ragged segments, r not dividing w, w > N)
    for n in range(1, 17):
        pos = np.arange(n)
        for w in range(1, n + 3):
            for r in range(1, w + 1):
                for heads in range(1, 6):
                    offsets = np.array([head_offset(j, heads, r, rule) for j in range(heads)])  # (H,)
                    kept = keeps(pos[None, :, None], pos[None, None, :], w, r, offsets[:, None, None], causal=causal)
                    got = attended_pairs(n, w, r, heads, causal=causal, head_offsets=rule)
                    assert got == kept.sum().item(), (n, w, r, heads)


def test_formula_is_exact_when_everything_divides():
    # r | w | N and every head keeps K = w / r rows per segment: N / w segments of K^2 pairs
    n, w, r, heads = 256, 32, 4, 4
    assert branch_flops(n, w, r, heads=heads) == 4 * attended_pairs(n, w, r, heads)
    # and the mixture's work is the pattern's total multiplicity (keys seen twice count twice)
    ws, rs = [16, 64, 256], [1, 4, 16]
    total = sum(attended_pairs(n, w, r, 16) for w, r in zip(ws, rs))
    assert total == attention_pattern(n, ws, rs, 16).sum().item()
    assert flop_ratio(n, ws, rs) == total / (16 * n * n)


def test_geometric_bound_eq18():
    for n in (2**12, 2**16, 2**20):
        for w0, a in ((2048, 2), (512, 4), (64, 3)):
            ws, rs = geometric_mixture(w0, a, seq_len=n)  # up to the first w >= N
            assert ws[-1] >= n > (ws[-2] if len(ws) > 1 else 0)
            assert flop_ratio(n, ws, rs) <= geometric_bound(n, w0, a) + 1e-12


def test_cost_table():
    B, H, D, P = 2, 12, 64, 8
    table = cost_table(32768, WS, RS, batch=B, heads=H, head_dim=D, devices=P)
    assert table["total"].ratio == pytest.approx(flop_ratio(32768, WS, RS))
    assert table["dense"].score_elements == B * H * 32768**2
    assert table["activation_elements"] == 4 * B * H * 32768 * D
    # readable scores: B H S K^2; w = 16384, r = 6: S = 2, K = ceil(16384 / 6) = 2731
    assert table["branches"][3].score_elements == B * H * 2 * 2731**2
    # chunks of 4096 tokens: branches with w <= 4096 are local, the others gather 2 B H K D
    assert [b.gathered_elements for b in table["branches"]] == [0, 0] + [
        2 * B * H * -(-w // r) * D for w, r in zip(WS[2:], RS[2:])
    ]
    assert table["local"].ratio == pytest.approx(2048 / 32768)


def test_cost_table_bad_input():
    with pytest.raises(ValueError, match="devices"):
        cost_table(1000, devices=3)
    with pytest.raises(ValueError, match="heads"):
        cost_table(1000, heads=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ratio=1), "ratio must be an integer >= 2, got 1"),  # was ZeroDivisionError
        (dict(ratio=0), "ratio must be an integer >= 2, got 0"),  # was a negative bound
        (dict(ratio=1.5), "ratio must be an integer >= 2, got 1.5"),
        (dict(seq_len=0), "seq_len must be a positive integer, got 0"),  # was ZeroDivisionError
        (dict(seq_len=-64), "seq_len must be a positive integer, got -64"),
        (dict(w0=0), "w0 must be a positive integer, got 0"),
    ],
)
def test_geometric_bound_refuses_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        geometric_bound(**{**dict(seq_len=64, w0=4, ratio=2), **kwargs})


BRANCH = dict(name="b", seq_len=64, w=16, r=2, batch=1, heads=1, head_dim=1, causal=False, devices=1)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(w=0), ValueError, "w must be a positive integer, got 0"),  # was ZeroDivisionError
        (dict(w=-16), ValueError, "w must be a positive integer, got -16"),  # was "segment_length[0]"
        (dict(r=0), ValueError, "r must be a positive integer, got 0"),
        (dict(r=64), ValueError, r"r 64 is larger than min\(w, seq_len\) = 16"),  # was "dilation_rate[0]"
        (dict(devices=0), ValueError, "devices must be a positive integer, got 0"),
        (dict(devices=3), ValueError, "seq_len 64 must be a multiple of devices 3"),
        (dict(seq_len=0), ValueError, "seq_len must be a positive integer, got 0"),
        (dict(batch=-1), ValueError, "batch must be a positive integer, got -1"),
        (dict(causal="False"), TypeError, "causal must be True or False, got 'False'"),
    ],
)
def test_branch_cost_refuses_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        branch_cost(**{**BRANCH, **kwargs})


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: dense_flops(64, batch="2"), "batch must be a positive integer, got '2'"),  # returned a string
        (lambda: dense_flops(64, heads=-1), "heads must be a positive integer, got -1"),
        (lambda: branch_flops(64, 16, 2, batch=2.5), "batch must be a positive integer, got 2.5"),
        (lambda: branch_flops(64, 16, 2, heads=float("nan")), "heads must be a positive integer, got nan"),
        (lambda: branch_flops(64, 16, 2, head_dim=-1), "head_dim must be a positive integer, got -1"),
        (lambda: mixture_flops(64, [4, 8], [1, 2], batch=-1), "batch must be a positive integer, got -1"),
        (lambda: cost_table(64, None, [1]), "segment_lengths must be a list of positive integers, got None"),
        (lambda: cost_table(64, 5, [1]), "segment_lengths must be a list of positive integers, got 5"),
        (lambda: cost_table(64, [4], None), "dilation_rates must be a list of positive integers, got None"),
    ],
)
def test_flop_counts_refuse_bad_shapes(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("causal", ["False", None, 1, 0])
def test_cost_table_causal_must_be_a_bool(causal):
    with pytest.raises(TypeError, match="causal must be True or False"):  # "False" used to count as causal
        cost_table(64, [4, 8], [1, 2], causal=causal)


def test_format_table_and_human_refuse_bad_input():
    table = cost_table(64, [4, 8], [1, 2])
    for size in (0, -2, 2.5, "2", None):
        with pytest.raises(ValueError, match="bytes_per_element must be a positive integer"):
            format_table(table, size)
    with pytest.raises(ValueError, match=r"table must be the dict cost_table returns; it has no \['seq_len'"):
        format_table({})
    with pytest.raises(TypeError, match="table must be the dict cost_table returns, got NoneType"):
        format_table(None)
    with pytest.raises(TypeError, match="unit must be a string, got None"):
        human(1234.0, unit=None)
    with pytest.raises(ValueError, match="x must be a finite number, got nan"):
        human(float("nan"))
    with pytest.raises(ValueError, match="x must be a finite number, got '1234'"):
        human("1234")
    assert human(1234.0) == "1.23 K" and human(2048, "B") == "2 KB"
    assert "4 bytes per element" in format_table(table, 4)


def test_branch_cost_fields_are_counts():
    with pytest.raises(ValueError, match="flops must be a non-negative finite number, got 'lots'"):
        BranchCost("x", 4, 1, "lots", 0.5, 5, 0)
    with pytest.raises(ValueError, match="score_elements must be a non-negative integer, got -5"):
        BranchCost("x", 4, 1, 1.0, 0.5, -5, 0)


def test_cli_prints_the_table(capsys):
    assert main(["--seq-len", "32768"]) == 0
    out = capsys.readouterr().out
    assert "0.1302" in out and "dense" in out and "local (w=2048)" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seq-len", "0"], "seq_len must be a positive integer, got 0"),
        (["--seq-len", "64", "--segment-lengths", "8", "16", "--dilation-rates", "1"], "same length"),
        (["--seq-len", "64", "--segment-lengths", "8", "--dilation-rates", "9"], "dilation_rate[0] 9"),
        (["--seq-len", "100", "--devices", "3"], "multiple of devices 3"),
        (["--seq-len", "abc"], "invalid int value: 'abc'"),
    ],
)
def test_cli_errors_are_clear(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_module_runs():
    result = subprocess.run(
        [sys.executable, "-m", "longnet_ref.analysis.complexity", "--seq-len", "8192", "--causal"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "0.4722" in result.stdout
