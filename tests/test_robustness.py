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


def scaled_inputs(dtype, scale, causal):
    """q, k, v (1, 4, 96, 16) in `dtype`, the scores about `scale` in size; seeded per case."""
    generator = torch.Generator().manual_seed(int(scale) + causal)
    q, k, v = (torch.randn(1, 4, 96, 16, generator=generator) for _ in range(3))
    return (q * scale / 4).to(dtype), k.to(dtype), v.to(dtype)


def same_dtype_reference_error(q, k, v, ws, rs, causal):
    """Errors against float64 of: SDPA with the oracle's log c mask in the inputs' dtype, and a function."""
    import torch.nn.functional as F

    from longnet_ref import attention_pattern, oracle_attention

    exact, _ = oracle_attention(*(x.double() for x in (q, k, v)), ws, rs, causal=causal)
    counts = attention_pattern(q.shape[2], ws, rs, q.shape[1], causal=causal)
    mask = torch.log(counts.to(torch.float32)).to(q.dtype)[None]
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return (reference.double() - exact).abs().max().item(), lambda out: (out.double() - exact).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scale", [1.0, 1e2, 1e3, 1e4])
@pytest.mark.parametrize("causal", [False, True])
def test_readable_error_is_within_twice_a_same_dtype_reference(dtype, scale, causal):
    """flash-attn's rule, forward: at most 2x the error of PyTorch's own attention in the same dtype."""
    q, k, v = scaled_inputs(dtype, scale, causal)
    reference, error = same_dtype_reference_error(q, k, v, WS[:2] + [96], RS, causal)
    out, lse = dilated_attention(q, k, v, WS[:2] + [96], RS, causal=causal, implementation="readable", return_lse=True)
    assert torch.isfinite(out).all() and lse.dtype == torch.float32  # fp32, or half inputs' lse in fp32
    assert error(out) <= 2 * reference + 1e-6, (error(out), reference)


def test_a_row_no_branch_covers_has_zero_gradient_not_nan():
    from longnet_ref import merge_branches

    outs = [torch.randn(1, 1, 3, 2, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    lses = [torch.tensor([[[0.5, -torch.inf, 1.0]]], dtype=torch.float64, requires_grad=True) for _ in range(2)]
    lses[1].data[0, 0, 2] = -torch.inf
    out, lse = merge_branches(outs, lses)
    assert torch.equal(out[0, 0, 1], torch.zeros(2)) and lse[0, 0, 1] == -torch.inf
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    for x in (*outs, *lses):
        assert torch.isfinite(x.grad).all()
    assert lses[0].grad[0, 0, 1] == 0 and lses[1].grad[0, 0, 1] == 0
    assert lses[0].grad[0, 0, 2] == 1 and lses[1].grad[0, 0, 2] == 0  # the only branch there takes it all


FAST_WITHIN_TWICE = {torch.float32: 1e2, torch.bfloat16: 1e4, torch.float16: 1e3}  # the README's Guarantees


@pytest.mark.parametrize(
    "dtype, scale",
    [(dtype, scale) for dtype, top in FAST_WITHIN_TWICE.items() for scale in (1.0, 1e2, 1e3, 1e4) if scale <= top],
    ids=str,
)
@pytest.mark.parametrize("causal", [False, True])
def test_fast_error_is_within_twice_a_same_dtype_reference_where_the_readme_says(dtype, scale, causal):
    q, k, v = scaled_inputs(dtype, scale, causal)
    reference, error = same_dtype_reference_error(q, k, v, WS[:2] + [96], RS, causal)
    out = dilated_attention(q, k, v, WS[:2] + [96], RS, causal=causal, implementation="fast")
    assert error(out) <= 2 * reference + 1e-6, (error(out), reference)
