"""Head offsets, the keep rule and the multiplicity pattern c(h, q, k), checked against hand-written
cases; the gathered forms of the keep rule (dilated.py's sparsify, fast_pieces.py) checked equal to it."""

import numpy as np
import pytest
import torch

from longnet_ref import attention_pattern, geometric_mixture, head_groups, head_offset, keeps, pattern_rows
from longnet_ref.checks import HEAD_OFFSET_RULES
from longnet_ref.dilated import kept_row_mask, segment, sparsify
from longnet_ref.fast_pieces import branch_calls, branch_pieces, merge_offset_groups
from longnet_ref.patterns import branch_mask


def test_head_offset_rules():
    assert [head_offset(j, 6, 4, "paper") for j in range(6)] == [0, 1, 2, 3, 0, 1]
    # torchscale: blocks of ceil(6/4) = 2 heads; residue 3 is never covered
    assert [head_offset(j, 6, 4, "torchscale") for j in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [head_offset(j, 6, 4, "none") for j in range(6)] == [0] * 6
    with pytest.raises(ValueError, match="rule must be one of .* got 'diagonal'"):
        head_offset(0, 2, 2, "diagonal")


@pytest.mark.parametrize("rule", HEAD_OFFSET_RULES)
@pytest.mark.parametrize("H,r", [(1, 1), (1, 3), (6, 4), (8, 2), (5, 3), (12, 12)])
def test_head_groups_partition_heads(rule, H, r):
    seen = []
    for offset, heads in head_groups(H, r, rule):
        for j in range(H)[heads]:
            assert head_offset(j, H, r, rule) == offset
            seen.append(j)
    assert sorted(seen) == list(range(H))


def test_single_branch_pattern_by_hand():
    # N = 7, w = 4, r = 2, head 0 offset 0, head 1 offset 1: segments [0..3], [4..6]
    c = attention_pattern(7, [4], [2], 2)
    kept0, kept1 = [0, 2, 4, 6], [1, 3, 5]
    for h, kept in ((0, kept0), (1, kept1)):
        for i in range(7):
            for j in range(7):
                expected = int(i in kept and j in kept and i // 4 == j // 4)
                assert c[h, i, j] == expected, (h, i, j)


def test_overlap_counts_twice_and_causal_masks_future():
    c = attention_pattern(8, [4, 8], [1, 2], 2, causal=True)
    assert c.dtype == torch.long and c.shape == (2, 8, 8)
    assert c[0, 2, 0] == 2  # head 0: dense branch and the r=2 branch both keep 0 and 2
    assert c[0, 3, 1] == 1  # only the dense branch
    assert c[0, 6, 2] == 1  # different w=4 segments; the w=8 branch keeps both
    assert torch.all(c.triu(1) == 0)  # nothing in the future


def test_pattern_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        attention_pattern(8, [4], [1], 0)
    with pytest.raises(ValueError, match="seq_len"):
        attention_pattern(-1, [4], [1], 2)


def test_pattern_rows_are_rows_of_the_pattern():
    full = attention_pattern(50, [8, 16, 64], [1, 2, 4], 3, causal=True, head_offsets="torchscale")
    rows = [0, 7, 8, 33, 49]
    got = pattern_rows(50, rows, [8, 16, 64], [1, 2, 4], 3, causal=True, head_offsets="torchscale")
    assert torch.equal(got, full[:, rows])
    with pytest.raises(ValueError, match=r"queries must be .* \[0, 50\), got \[50\]"):
        pattern_rows(50, [50], [8], [1], 3)


def test_keeps_by_hand_on_ints_and_tensors():
    # w = 6, r = 4, offset 1: segment [0, 6) keeps 1 and 5, segment [6, 12) keeps 7 and 11
    kept = [p for p in range(12) if keeps(p, p, 6, 4, 1)]
    assert kept == [1, 5, 7, 11]  # counted from each segment's start: 7 = 6 + 1, not 9
    assert keeps(5, 1, 6, 4, 1) and keeps(1, 5, 6, 4, 1)
    assert not keeps(7, 5, 6, 4, 1)  # both kept, different segments
    assert not keeps(1, 5, 6, 4, 1, causal=True) and keeps(5, 1, 6, 4, 1, causal=True)
    q, k = torch.arange(12)[:, None], torch.arange(12)[None, :]
    grid = keeps(q, k, 6, 4, 1)
    assert grid.dtype == torch.bool and grid.shape == (12, 12)
    assert [(i, j) for i in range(12) for j in range(12) if grid[i, j]] == [
        (i, j) for i in kept for j in kept if i // 6 == j // 6
    ]


CASES = [(N, w, r) for N in (1, 5, 12, 17) for w in (1, 3, 4, 6, 8, 32) for r in (1, 2, 3, 4) if r <= w]


@pytest.mark.parametrize("rule", HEAD_OFFSET_RULES)
def test_readable_gather_is_the_keep_rule(rule):
    """dilated.segment + sparsify + kept_row_mask select, per head and segment, exactly the rows keeps() keeps."""
    H = 5
    for N, w, r in CASES:
        W = min(w, N)
        positions = torch.arange(N, dtype=torch.float64).view(1, 1, N, 1).expand(1, H, N, 1)  # (B, H, N, 1)
        offsets = torch.tensor([head_offset(j, H, r, rule) for j in range(H)])
        rows = sparsify(segment(positions, W), r, offsets)[0, ..., 0]  # (H, S, K) positions
        mask = kept_row_mask(N, W, r, offsets)  # (H, S, K)
        for h in range(H):
            for m in range(rows.shape[1]):
                got = rows[h, m][mask[h, m]].long().tolist()
                want = [p for p in range(N) if p // W == m and keeps(p, p, w, r, int(offsets[h]))]
                assert got == want, (N, w, r, rule, h, m)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rule", HEAD_OFFSET_RULES)
def test_fast_pieces_are_the_keep_rule(rule, causal):
    """fast_pieces.branch_pieces: the (query, key) pairs that meet in one kernel call are exactly keeps()'s pairs."""
    H = 5
    for N, w, r in CASES:
        positions = torch.arange(N).view(1, 1, N).expand(1, H, N)  # (B, H, N)
        met = torch.zeros(H, N, N, dtype=torch.long)
        for piece in branch_pieces(N, H, w, r, rule):
            rows = piece.view(positions)[0]  # (h, S, K) positions of batch element 0
            for h, head_rows in zip(range(H)[piece.heads], rows):
                for block in head_rows:  # one segment: a kernel call attends all of it (causal: k <= q)
                    for i in block.tolist():
                        for j in block.tolist():
                            met[h, i, j] += (j <= i) or not causal
        expected = branch_mask(N, w, r, H, causal=causal, head_offsets=rule)  # keeps() for every head
        assert torch.equal(met, expected.long()), (N, w, r, rule)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rule", HEAD_OFFSET_RULES)
def test_merged_offset_groups_are_the_keep_rule(rule, causal):
    """fast_pieces.merge_offset_groups: a merged call's view (several offset groups side by side,
    Piece.grouped_view) makes exactly the pairs of keeps(), with every head in its own block."""
    merged = 0
    for H in (2, 4, 8):
        for N, w, r in [(N, w, r) for N in (8, 16, 24) for w in (4, 8, 16) for r in (1, 2, 4, 8) if r <= w]:
            codes = (torch.arange(H)[:, None] * N + torch.arange(N)).view(1, H, N)  # head * N + position
            met = torch.zeros(H, N, N, dtype=torch.long)
            calls = merge_offset_groups(branch_calls(N, H, [(w, r)], causal, rule), [codes])
            merged += sum(call.queries.groups > 1 for call in calls)
            for call in calls:
                for block in call.queries.view(codes)[0].flatten(0, 1):  # (K,): one kernel "sequence"
                    heads, rows = (block // N).unique(), (block % N).tolist()
                    assert len(heads) == 1, (H, N, w, r)  # a block never mixes heads
                    for i in rows:
                        for j in rows:
                            met[heads.item(), i, j] += (j <= i) or not causal
            expected = branch_mask(N, w, r, H, causal=causal, head_offsets=rule)
            assert torch.equal(met, expected.long()), (H, N, w, r, rule)
    assert merged == 0 if rule == "none" else merged > 20  # "none": one group per branch, nothing to merge


def test_offset_groups_merge_only_into_views():
    """Groups merge when S = 1 or one head per group, and only if the kernel's batch then folds as a view."""
    H, N = 8, 256
    branches = [(32, 1), (64, 2), (128, 4), (256, 8)]  # 1 + 2 + 4 + 8 offset groups
    calls = branch_calls(N, H, branches, False, "paper")
    single = torch.zeros(1, H, N, 4)
    merged = merge_offset_groups(calls, [single])
    # (256, 8): S = 1, its 8 one-head groups become one call; (64, 2) and (128, 4) have S > 1 and
    # several heads per group: no view holds them, they stay
    assert [(c.queries.dilation_rate, c.queries.groups) for c in merged] == [(1, 1)] + [(2, 1)] * 2 + [(4, 1)] * 4 + [
        (8, 8)
    ]
    # (B, H, N, D) with B = 3 and one head per group over 2 segments (H = 4, (128, 4)): the merged
    # view (B, G, S, K) folds B with neither axis as a view, so the 4 calls are kept
    calls = branch_calls(N, 4, [(128, 4)], False, "paper", batch=3)
    assert merge_offset_groups(calls, [torch.zeros(3, 4, N, 4)]) == calls
    layer = torch.zeros(3, N, 4, 4).transpose(1, 2)  # the layer's layout: B folds with the segments
    assert [c.queries.groups for c in merge_offset_groups(calls, [layer])] == [4]


def test_geometric_mixture():
    assert geometric_mixture(2048, 2, seq_len=32768) == ([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16])
    assert geometric_mixture(64, 4, seq_len=1000) == ([64, 256, 1024], [1, 4, 16])  # last w: first >= N
    assert geometric_mixture(64, 2, seq_len=10) == ([64], [1])  # one segment already covers N
    assert geometric_mixture(8, 2, branches=3) == ([8, 16, 32], [1, 2, 4])
    with pytest.raises(ValueError, match="ratio must be an integer >= 2, got 1"):
        geometric_mixture(4, 1, seq_len=100)
    with pytest.raises(ValueError, match="w0 must be a positive integer, got 0"):
        geometric_mixture(0, 2, seq_len=100)
    with pytest.raises(ValueError, match="exactly one of seq_len and branches"):
        geometric_mixture(4, 2)
    with pytest.raises(ValueError, match="exactly one of seq_len and branches"):
        geometric_mixture(4, 2, seq_len=8, branches=2)
    with pytest.raises(ValueError, match="branches must be a positive integer, got 0"):
        geometric_mixture(4, 2, branches=0)


@pytest.mark.parametrize(
    "args, match",
    [
        ((1, 4, 0), "dilation_rate must be a positive integer, got 0"),  # was ZeroDivisionError
        ((1, 4, -2), "dilation_rate must be a positive integer, got -2"),
        ((1, 4, 2.5), "dilation_rate must be a positive integer, got 2.5"),
        ((1, 0, 2, "torchscale"), "num_heads must be a positive integer, got 0"),  # was ZeroDivisionError
        ((1, None, 2), "num_heads must be a positive integer, got None"),
        (("1", 4, 2), r"head must be an integer in \[0, 4\), got '1'"),
        ((-1, 4, 2), r"head must be an integer in \[0, 4\), got -1"),
        ((7, 4, 2), r"head must be an integer in \[0, 4\), got 7"),
        ((1.5, 4, 2), r"head must be an integer in \[0, 4\), got 1.5"),
        ((True, 4, 2), r"head must be an integer in \[0, 4\), got True"),
        ((1, 4, 2, "bogus"), "rule must be one of .* got 'bogus'"),
    ],
)
def test_head_offset_refuses_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        head_offset(*args)


@pytest.mark.parametrize(
    "args, match",
    [
        ((4, 0), "dilation_rate must be a positive integer, got 0"),
        ((4, float("nan")), "dilation_rate must be a positive integer, got nan"),  # was IndexError
        ((0, 2), "num_heads must be a positive integer, got 0"),  # was [] silently
        ((4, 2, None), "rule must be one of .* got None"),
    ],
)
def test_head_groups_refuses_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        head_groups(*args)


@pytest.mark.parametrize(
    "args, match",
    [
        ((3, 1, 0, 2, 1), "segment_length must be a positive integer, got 0"),
        ((3, 1, 4, 0, 1), "dilation_rate must be a positive integer, got 0"),
        ((torch.arange(4), torch.arange(4), 0, 1, 0), "segment_length must be a positive integer, got 0"),
        ((3, 1, 4, 8, 1), "dilation_rate 8 is larger than segment_length 4"),
        ((3, 1, 4, 2, 5), r"offset must be an integer position in \[0, 2\), got 5"),
        ((3, 1, 4, 2, None), r"offset must be an integer position in \[0, 2\), got None"),
        ((3, 1, 4, 2, torch.tensor([0, 2])), r"offset must hold integer positions in \[0, 2\), got values from 0 to 2"),
        ((-1, 1, 4, 2, 1), "query must be an integer position >= 0, got -1"),
        ((2.5, 1, 4, 2, 1), "query must be an integer position >= 0, got 2.5"),
        ((3, torch.tensor([0.5]), 4, 2, 1), "key must hold integer positions >= 0, got dtype torch.float32"),
        ((3, np.array([True]), 4, 2, 1), "key must hold integer positions >= 0, got dtype bool"),
    ],
)
def test_keeps_refuses_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        keeps(*args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(segment_length=0), "segment_length must be a positive integer, got 0"),
        (dict(dilation_rate=0), "dilation_rate must be a positive integer, got 0"),
        (dict(num_heads=0), "num_heads must be a positive integer, got 0"),  # was an empty (0, N, N) mask
        (dict(queries=[9]), r"queries must be .* in \[0, 8\), got \[9\]"),
        (dict(queries=[1.5]), r"queries must be .* got \[1.5\] of dtype torch.float32"),
    ],
)
def test_branch_mask_refuses_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        branch_mask(**{**dict(seq_len=8, segment_length=4, dilation_rate=2, num_heads=2), **kwargs})


@pytest.mark.parametrize(
    "queries", [[1.5], [0.9], [True], torch.tensor([2.7]), np.array([1.9]), [float("nan")], [[0, 1]], "x", None]
)
def test_pattern_rows_refuses_non_integer_queries(queries):
    # 1.5 used to be truncated to row 1 and True read as row 1: now refused, never guessed
    with pytest.raises(ValueError, match=r"queries must be an integer position or a 1-D list of them in \[0, 8\)"):
        pattern_rows(8, queries, [4, 8], [1, 2], 2)


def test_pattern_rows_takes_integer_lists_tensors_and_arrays():
    want = pattern_rows(8, [1, 6], [4, 8], [1, 2], 2)
    for queries in (torch.tensor([1, 6]), np.array([1, 6]), torch.tensor([1, 6], dtype=torch.int32)):
        assert torch.equal(pattern_rows(8, queries, [4, 8], [1, 2], 2), want)
    assert pattern_rows(8, [], [4], [1], 2).shape == (2, 0, 8)
