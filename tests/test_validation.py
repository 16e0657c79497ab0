"""Bad input: a ValueError that names the parameter and the value."""

import pytest
import torch

from longnet_ref import MultiheadDilatedAttention, attention_pattern, dilated_attention, dilated_branch

q = k = v = torch.zeros(1, 2, 8, 4)


@pytest.mark.parametrize(
    "ws, rs, match",
    [
        ([4, 8], [1], r"same length.*\[4, 8\].*\[1\]"),
        ([], [], r"segment_lengths must not be empty"),
        ([4], [], r"dilation_rates must not be empty"),
        ([0], [1], r"segment_length\[0\].*positive integer.*0"),
        ([4, -2], [1, 1], r"segment_length\[1\].*-2"),
        ([4.0], [1], r"segment_length\[0\].*4\.0"),
        ([4], [1.5], r"dilation_rate\[0\].*1\.5"),
        ([4], [0], r"dilation_rate\[0\].*0"),
        ([4], [True], r"dilation_rate\[0\].*True"),
        ([4, 2], [2, 3], r"dilation_rate\[1\] 3 is larger than segment_length\[1\] 2"),
        ("48", [1], r"segment_lengths must be a list"),
        (4, [1], r"segment_lengths must be a list"),
    ],
)
def test_bad_branches(ws, rs, match):
    with pytest.raises(ValueError, match=match):
        dilated_attention(q, k, v, ws, rs)
    with pytest.raises(ValueError, match=match):
        attention_pattern(8, ws, rs, 2)


def test_bad_single_branch():
    with pytest.raises(ValueError, match=r"dilation_rate 5 is larger than segment_length 4"):
        dilated_branch(q, k, v, 4, 5)
    with pytest.raises(ValueError, match=r"segment_length must be a positive integer, got 2\.5"):
        dilated_branch(q, k, v, 2.5, 1)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(2, 8, 4), k, v), r"q must be 4-D .*\(2, 8, 4\)"),
        ((q, torch.zeros(1, 2, 8), v), r"k must be 4-D"),
        ((q, k, [[0.0]]), r"v must be a torch.Tensor, got list"),
        ((q, torch.zeros(1, 2, 9, 4), v), r"same shape.*\(1, 2, 9, 4\)"),
        (
            (q, k, torch.zeros(1, 2, 8, 4, dtype=torch.float64)),
            r"v has dtype torch.float64 but q has dtype torch.float32",
        ),
        ((q.long(), k.long(), v.long()), r"q must be a floating-point tensor, got dtype torch.int64"),
        ((q, k, torch.zeros(1, 2, 8, 4, device="meta")), r"v is on device meta but q is on device cpu"),
    ],
)
def test_bad_tensors(args, match):
    with pytest.raises(ValueError, match=match):
        dilated_attention(*args, [4], [1])
    with pytest.raises(ValueError, match=match):
        dilated_branch(*args, 4, 1)


def test_bad_options():
    with pytest.raises(ValueError, match=r"head_offsets must be one of .*'diagonal'"):
        dilated_attention(q, k, v, [4], [2], head_offsets="diagonal")
    with pytest.raises(ValueError, match=r"implementation must be one of .*'flash'"):
        dilated_attention(q, k, v, [4], [2], implementation="flash")


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match=r"embed_dim 10 is not divisible by num_heads 4"):
        MultiheadDilatedAttention(10, 4, [4], [1])
    with pytest.raises(ValueError, match=r"num_heads must be a positive integer, got 0"):
        MultiheadDilatedAttention(8, 0, [4], [1])
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1\.5"):
        MultiheadDilatedAttention(8, 2, [4], [1], dropout=1.5)
    with pytest.raises(ValueError, match=r"head_offsets must be one of"):
        MultiheadDilatedAttention(8, 2, [4], [1], head_offsets="blocks")
    layer = MultiheadDilatedAttention(8, 2, [4], [1])
    with pytest.raises(ValueError, match=r"x must be \(B, N, 8\), got shape \(1, 5, 6\)"):
        layer(torch.zeros(1, 5, 6))
