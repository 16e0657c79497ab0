"""Causality, numerical robustness and precision."""

import pytest
import torch
from conftest import rand_qkv

from longnet_ref import dilated_attention

WS, RS = [4, 8, 32], [1, 2, 4]


@pytest.mark.parametrize("implementation", ["fast", "readable"])
def test_future_tokens_do_not_change_the_past(implementation):
    q, k, v = rand_qkv(1, 4, 40, 4)
    out = dilated_attention(q, k, v, WS, RS, causal=True, implementation=implementation)
    t = 23
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :])
    out2 = dilated_attention(q2, k2, v2, WS, RS, causal=True, implementation=implementation)
    assert torch.equal(out[:, :, : t + 1], out2[:, :, : t + 1])
    assert not torch.equal(out[:, :, t + 1 :], out2[:, :, t + 1 :])  # the change did reach later rows


@pytest.mark.parametrize("implementation", ["fast", "readable"])
def test_gradient_of_output_t_ignores_later_inputs(implementation):
    q, k, v = rand_qkv(1, 4, 40, 4, requires_grad=True)
    out = dilated_attention(q, k, v, WS, RS, causal=True, implementation=implementation)
    t = 17
    out[:, :, t].sum().backward()
    for x in (q, k, v):
        assert torch.all(x.grad[:, :, t + 1 :] == 0)
        assert x.grad[:, :, : t + 1].abs().sum() > 0


@pytest.mark.parametrize("implementation", ["fast", "readable"])
@pytest.mark.parametrize("causal", [False, True])
def test_fp32_agrees_with_fp64_and_large_scores_stay_finite(implementation, causal):
    q, k, v = rand_qkv(2, 4, 96, 16)
    ref = dilated_attention(q, k, v, WS, RS, causal=causal, implementation=implementation)
    out32 = dilated_attention(q.float(), k.float(), v.float(), WS, RS, causal=causal, implementation=implementation)
    torch.testing.assert_close(out32.double(), ref, rtol=1e-5, atol=1e-5)
    # x30: scores of order 30^2 * sqrt(16) = 3600, where an unguarded exp overflows. The
    # softmax is then nearly one-hot, so fp32 rounding of the scores moves it visibly: check
    # finiteness and that every output is a convex combination of values (inside their range).
    big = [x.float() * 30 for x in (q, k, v)]
    out_big = dilated_attention(*big, WS, RS, causal=causal, implementation=implementation)
    assert torch.isfinite(out_big).all()
    v_big = big[2]
    slack = 1e-4 * v_big.abs().max()  # fp32 rounding of sums of values of size ~100
    assert (out_big <= v_big.amax(dim=2, keepdim=True) + slack).all()
    assert (out_big >= v_big.amin(dim=2, keepdim=True) - slack).all()


@pytest.mark.parametrize("implementation", ["fast", "readable"])
def test_bf16_is_finite_and_close(implementation):
    q, k, v = rand_qkv(1, 4, 64, 16)
    out = dilated_attention(*(x.bfloat16() for x in (q, k, v)), WS, RS, causal=True, implementation=implementation)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = dilated_attention(q, k, v, WS, RS, causal=True)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=5e-2)
    big = dilated_attention(*(x.bfloat16() * 30 for x in (q, k, v)), WS, RS, implementation=implementation)
    assert torch.isfinite(big).all()


def test_bf16_fast_backward_is_finite():
    q, k, v = (x.bfloat16().requires_grad_() for x in rand_qkv(1, 4, 64, 16))
    dilated_attention(q, k, v, WS, RS, causal=True).float().sum().backward()
    for x in (q, k, v):
        assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
