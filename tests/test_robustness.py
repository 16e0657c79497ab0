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


# flash-attn's rule for lower precision: the error against float64 is at most twice that of
# PyTorch's own attention in the same dtype (SDPA with the oracle's log c mask), forward and
# backward. Plus one term: the error of the exact result rounded to the dtype, which no
# implementation in that dtype can beat. Without it the rule is a coin toss wherever the
# reference happens to return exactly representable values (a one-hot softmax returns v_j
# itself): measured, the readable path, which attends in float32 and rounds once, then "fails"
# at 2.6x. The maxima are taken over 64 x 4 x 96 rows: over one sequence's 384 rows, which rows
# hold a near tie decides the ratio (0.2x to 12x at logit scale 1e4 between seeds).
SHAPE = (64, 4, 96, 16)
PRECISION_WS = WS[:2] + [96]  # the last branch covers the whole sequence


def scaled_inputs(dtype, scale, causal, shape=SHAPE):
    """q, k, v and an output gradient g, `shape`, in `dtype`; the scores about `scale` in size; seeded per case."""
    generator = torch.Generator().manual_seed(int(scale) + causal)
    q, k, v, g = (torch.randn(*shape, generator=generator) for _ in range(4))
    return (q * scale / 4).to(dtype), k.to(dtype), v.to(dtype), g.to(dtype)


def out_and_grads(attention, q, k, v, g):
    """[out, dq, dk, dv] of `attention(q, k, v)` with output gradient g."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = attention(q, k, v)
    out.backward(g.to(out.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


def oracle_mask(dtype, causal):
    """The oracle's bias log c (H, N, N) in `dtype`: -inf where no branch pairs the rows."""
    from longnet_ref import attention_pattern

    counts = attention_pattern(SHAPE[2], PRECISION_WS, RS, SHAPE[1], causal=causal)
    return torch.log(counts.to(torch.float32)).to(dtype)


def precision_allowances(q, k, v, g, causal):
    """The exact [out, dq, dk, dv] in float64, and for each the allowed error: twice the
    same-dtype reference's plus the rounding of the exact value to the dtype."""
    import torch.nn.functional as F

    from longnet_ref import oracle_attention

    def oracle(*x):
        return oracle_attention(*x, PRECISION_WS, RS, causal=causal)[0]

    exact = out_and_grads(oracle, *(x.double() for x in (q, k, v, g)))
    mask = oracle_mask(q.dtype, causal)[None]
    reference = out_and_grads(lambda *x: F.scaled_dot_product_attention(*x, attn_mask=mask), q, k, v, g)
    allowed = [
        2 * (r.double() - e).abs().max().item() + (e.to(q.dtype).double() - e).abs().max().item()
        for r, e in zip(reference, exact)
    ]
    return exact, allowed


@pytest.mark.parametrize("implementation", ["fast", "readable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scale", [1.0, 1e2, 1e3, 1e4])
@pytest.mark.parametrize("causal", [False, True])
def test_error_is_within_twice_a_same_dtype_reference(implementation, dtype, scale, causal):
    """flash-attn's rule (above), for the output and the gradients of q, k and v."""
    q, k, v, g = scaled_inputs(dtype, scale, causal)
    exact, allowed = precision_allowances(q, k, v, g, causal)

    def attention(*x):
        return dilated_attention(*x, PRECISION_WS, RS, causal=causal, implementation=implementation)

    results = out_and_grads(attention, q, k, v, g)
    for name, result, e, bound in zip(("out", "dq", "dk", "dv"), results, exact, allowed):
        assert result.dtype == dtype and torch.isfinite(result).all(), name
        error = (result.double() - e).abs().max().item()
        assert error <= bound, (name, error, bound)


def test_lses_are_float32_for_half_inputs():
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v, _ = scaled_inputs(dtype, 1.0, True, shape=(1, 4, 96, 16))
        for implementation in ("fast", "readable"):
            _, lse = dilated_attention(
                q, k, v, PRECISION_WS, RS, causal=True, implementation=implementation, return_lse=True
            )
            assert lse.dtype == torch.float32, implementation


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


@pytest.mark.parametrize("implementation", ["fast", "readable"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_a_nan_input_gives_nan_not_a_plausible_zero(implementation, where):
    """The fused CPU kernel maps a NaN row to zeros; the package keeps a NaN input visible in the output."""
    q, k, v = rand_qkv(1, 4, 32, 8)
    bad = {"q": q, "k": k, "v": v}[where]
    bad[0, :, 5] = float("nan")
    out = dilated_attention(q, k, v, WS, RS, implementation=implementation)
    assert torch.isnan(out).any()
    assert torch.isnan(out[0, :, 5]).all() if where == "q" else True  # the NaN query's own rows are NaN


def test_a_nan_in_fused_attention_is_nan():
    from longnet_ref.kernels import fused_attention

    q, k, v = rand_qkv(1, 2, 16, 8)
    q[0, 0, 3] = float("nan")
    out, lse = fused_attention(q, k, v)
    assert torch.isnan(out[0, 0, 3]).all() and torch.isnan(lse[0, 0, 3])


def test_a_nan_poisons_only_its_own_batch_element_on_the_fast_path():
    q, k, v = rand_qkv(3, 4, 32, 8)
    k[1, 2, 7] = float("nan")
    for detach in (False, True):
        out = dilated_attention(q, k, v, WS, RS, detach_weights=detach)
        assert torch.isnan(out[1]).any() and torch.isfinite(out[[0, 2]]).all(), detach


@pytest.mark.parametrize("value", [float("inf"), -float("inf")])
def test_an_infinite_input_poisons_its_batch_element_on_the_fast_path(value):
    q, k, v = rand_qkv(3, 4, 32, 8)
    v[1, 0, 3] = value
    out = dilated_attention(q, k, v, WS, RS)
    assert torch.isnan(out[1]).any() and torch.isfinite(out[[0, 2]]).all()


def test_the_finiteness_check_reads_extremes_exactly():
    from longnet_ref.kernels import nan_unless_finite

    huge = torch.full((2, 3, 4, 5), 3e38)  # finite, but a float32 sum of it would overflow
    assert nan_unless_finite((huge, -huge)).tolist() == [0.0, 0.0]
    bad = huge.clone()
    bad[1, 2, 3, 4] = float("nan")
    assert nan_unless_finite((bad,)).isnan().tolist() == [False, True]
    kv = torch.zeros(2, 2, 3, 4)  # (2, B, ...): the batch is dim 1
    kv[0, 1, 0, 0] = float("inf")
    assert nan_unless_finite((kv,), [1]).isnan().tolist() == [False, True]
    assert nan_unless_finite((torch.empty(2, 0, 4),)).tolist() == [0.0, 0.0]  # nothing to check


def test_merge_branches_passes_a_nan_lse_on_as_nan():
    from longnet_ref import merge_branches

    outs = [torch.randn(1, 1, 3, 2) for _ in range(2)]
    lses = [torch.zeros(1, 1, 3), torch.tensor([[[0.0, float("nan"), float("inf")]]])]
    out, lse = merge_branches(outs, lses)
    assert torch.isfinite(out[0, 0, 0]).all() and torch.isnan(out[0, 0, 1:]).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_a_head_dim_of_one_with_odd_strides_is_exact(dtype):
    """D = 1: a tensor counts as contiguous whatever its last stride, which the kernels read as 1."""
    from longnet_ref import oracle_attention

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 4, 1, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 1, 1, 4, generator=g, dtype=torch.float64).transpose(
        -1, -2
    )  # (1, 1, 4, 1), strides (4, 4, 1, 4)
    inputs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    exact = [x.detach().double().requires_grad_() for x in inputs]
    out, lse = dilated_attention(*inputs, [1, 4], [1, 2], return_lse=True)
    (out.double().sum() + lse.double().sum()).backward()
    want, want_lse = oracle_attention(*exact, [1, 4], [1, 2])
    (want.sum() + want_lse.sum()).backward()
    tol = 1e-12 if dtype == torch.float64 else 5e-2
    for got, ref in zip(inputs, exact):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=0, atol=tol)
