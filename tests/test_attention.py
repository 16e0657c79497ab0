"""dense_attention: the readable from-scratch attention, against torch's SDPA and by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import rand_qkv

from longnet_ref import dense_attention


@pytest.mark.parametrize("causal", [False, True])
def test_equals_torch_sdpa(causal):
    q, k, v = rand_qkv(2, 3, 17, 8)
    out, lse = dense_attention(q, k, v, causal=causal)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), rtol=0, atol=1e-12)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    if causal:
        scores = scores.masked_fill(torch.ones(17, 17, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=0, atol=1e-12)


def test_bias_is_added_to_scores_and_fully_masked_rows_are_zero():
    q, k, v = rand_qkv(1, 2, 5, 4)
    bias = torch.zeros(5, 5, dtype=torch.float64)
    bias[2] = -math.inf  # query 2 sees nothing
    bias[3, 1] = math.log(2.0)  # key 1 counted twice for query 3
    out, lse = dense_attention(q, k, v, bias=bias)
    assert torch.all(out[:, :, 2] == 0) and torch.all(lse[:, :, 2] == -math.inf)
    # query 3 by hand: key 1 weighted twice
    s = (q[:, :, 3:4] @ k.transpose(-1, -2)).squeeze(2) / 2.0  # (B, H, N)
    w = torch.exp(s) * torch.tensor([1, 2, 1, 1, 1], dtype=torch.float64)
    expected = (w.unsqueeze(-1) * v).sum(2) / w.sum(-1, keepdim=True)
    torch.testing.assert_close(out[:, :, 3], expected, rtol=0, atol=1e-12)
    assert torch.isfinite(out).all()


def test_fully_masked_rows_have_zero_gradient_not_nan():
    q, k, v = rand_qkv(1, 1, 4, 2, requires_grad=True)
    bias = torch.zeros(4, 4, dtype=torch.float64)
    bias[1] = -math.inf
    out, lse = dense_attention(q, k, v, bias=bias)
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert torch.all(q.grad[0, 0, 1] == 0)


def test_cross_attention_lengths():
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    k, v = torch.randn(1, 2, 7, 4, dtype=torch.float64), torch.randn(1, 2, 7, 5, dtype=torch.float64)
    out, lse = dense_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        dense_attention(q, k, v, causal=True)
