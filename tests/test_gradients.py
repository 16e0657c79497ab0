"""Gradients: gradcheck, fast path against the oracle, and the official detached-weight gradient."""

import pytest
import torch
from conftest import rand_qkv

from longnet_ref import dilated_attention, dilated_branch, merge_branches, oracle_attention


def _grads(fn, q, k, v, seed=1):
    """Gradient of a random linear function of (out, finite lse) with respect to q, k, v."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v)
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    loss = (
        loss + (torch.where(torch.isfinite(lse), lse, 0) * torch.randn(lse.shape, generator=g, dtype=lse.dtype)).sum()
    )
    return torch.autograd.grad(loss, (q, k, v))


@pytest.mark.parametrize("implementation", ["fast", "readable"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_mixture(implementation, causal):
    q, k, v = rand_qkv(1, 3, 11, 3, requires_grad=True)

    def fn(q, k, v):
        return dilated_attention(
            q, k, v, [3, 6, 20], [1, 2, 3], causal=causal, return_lse=True, implementation=implementation
        )

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradcheck_branch_through_lse():
    q, k, v = rand_qkv(2, 2, 9, 3, requires_grad=True)

    # the LSE of rows not kept is -inf; gradcheck the kept rows' lse (head 0: even, head 1: odd)
    def kept_lse(q, k, v):
        lse = dilated_branch(q, k, v, 4, 2)[1]
        return torch.cat([lse[:, 0, 0::2], lse[:, 1, 1::2]], dim=-1)

    assert torch.autograd.gradcheck(kept_lse, (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: dilated_branch(q, k, v, 4, 2)[0], (q, k, v))


@pytest.mark.parametrize("implementation", ["fast", "readable"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_offsets", ["paper", "torchscale", "none"])
def test_gradients_equal_oracle_gradients(implementation, causal, head_offsets):
    q, k, v = rand_qkv(2, 5, 37, 4)
    ws, rs = [4, 16, 64], [1, 4, 8]
    kw = dict(causal=causal, head_offsets=head_offsets)
    ref = _grads(lambda q, k, v: oracle_attention(q, k, v, ws, rs, **kw), q, k, v)
    got = _grads(
        lambda q, k, v: dilated_attention(q, k, v, ws, rs, return_lse=True, implementation=implementation, **kw),
        q,
        k,
        v,
    )
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_branch_gradients_through_out_and_lse_equal_oracle():
    q, k, v = rand_qkv(1, 3, 30, 4)
    ref = _grads(lambda q, k, v: oracle_attention(q, k, v, [8], [2], causal=True), q, k, v)
    got = _grads(lambda q, k, v: dilated_branch(q, k, v, 8, 2, causal=True), q, k, v)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_detached_weights_give_the_documented_gradient():
    """detach_weights=True: same forward, gradient = sum_i alpha_i dO_i/dx with alpha held fixed.

    Closed form: the branches' own gradients (outputs only, lse not differentiated) weighted by
    the constant alpha_i. It differs from the exact gradient by the d alpha / dx term.
    """
    q, k, v = rand_qkv(1, 2, 24, 4)
    ws, rs = [4, 8], [1, 2]
    g = torch.randn(1, 2, 24, 4, dtype=torch.float64)

    def grad_of(fn):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad((fn(*x) * g).sum(), x)

    detached = grad_of(lambda q, k, v: dilated_attention(q, k, v, ws, rs, detach_weights=True))
    exact = grad_of(lambda q, k, v: dilated_attention(q, k, v, ws, rs))
    # same forward
    torch.testing.assert_close(
        dilated_attention(q, k, v, ws, rs, detach_weights=True), dilated_attention(q, k, v, ws, rs), rtol=0, atol=1e-12
    )

    # closed form: alpha from the forward, as constants
    branches = [dilated_branch(q, k, v, w, r) for w, r in zip(ws, rs)]
    lse = torch.stack([l for _, l in branches])
    alpha = torch.exp(lse - torch.logsumexp(lse, 0))  # (n_branches, B, H, N)

    def weighted(q, k, v):
        return sum(a.unsqueeze(-1) * dilated_branch(q, k, v, w, r)[0] for a, (w, r) in zip(alpha, zip(ws, rs)))

    closed_form = grad_of(weighted)
    for a, b in zip(detached, closed_form):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    gap = max((a - b).abs().max().item() for a, b in zip(detached, exact))
    assert gap > 1e-3, f"detached and exact gradients should differ, max gap {gap}"


def test_merge_weights_carry_gradient_only_when_not_detached():
    outs = [torch.randn(1, 1, 3, 2, dtype=torch.float64) for _ in range(2)]
    lses = [torch.randn(1, 1, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    out, _ = merge_branches(outs, lses)
    out.sum().backward()
    assert lses[0].grad.abs().sum() > 0
    lses2 = [l.detach().clone().requires_grad_() for l in lses]
    out, _ = merge_branches(outs, lses2, detach_weights=True)
    assert out.grad_fn is None  # nothing left to differentiate: the weights were the only path
