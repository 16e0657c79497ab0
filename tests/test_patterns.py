"""Head offsets and the multiplicity pattern c(h, q, k), checked against hand-written cases."""

import pytest
import torch

from longnet_ref import attention_pattern, head_groups, head_offset, pattern_rows


def test_head_offset_rules():
    assert [head_offset(j, 6, 4, "paper") for j in range(6)] == [0, 1, 2, 3, 0, 1]
    # torchscale: blocks of ceil(6/4) = 2 heads; residue 3 is never covered
    assert [head_offset(j, 6, 4, "torchscale") for j in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [head_offset(j, 6, 4, "none") for j in range(6)] == [0] * 6
    with pytest.raises(ValueError, match="head_offsets"):
        head_offset(0, 2, 2, "diagonal")


@pytest.mark.parametrize("rule", ["paper", "torchscale", "none"])
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
