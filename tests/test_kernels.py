"""kernels.py: the fused kernel's output, log-sum-exp and exact backward against dense attention, and
the zero-padding of head dims that CUDA's kernels need (`head_dim_multiple`), exercised on the CPU."""

import pytest
import torch

import longnet_ref.kernels as kernels
from longnet_ref import dense_attention, dilated_attention, fused_attention, oracle_attention


def _loss_and_grads(fn, q, k, v):
    """A loss through both outputs (out and lse), so the backward's LSE column is exercised."""
    out, lse = fn(q, k, v)
    finite = torch.isfinite(lse)
    loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum() + (lse[finite] ** 2).sum()
    return (out.detach(), lse.detach(), *torch.autograd.grad(loss, (q, k, v)))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [1, 5, 8])
def test_fused_attention_equals_dense_attention_with_gradients(D, causal):
    q, k, v = (torch.randn(2, 3, 33, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    got = _loss_and_grads(lambda q, k, v: fused_attention(q, k, v, causal=causal), q, k, v)
    want = _loss_and_grads(lambda q, k, v: dense_attention(q, k, v, causal=causal), q, k, v)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("multiple", [4, 8, 16])
@pytest.mark.parametrize("D", [1, 5, 8, 12])
def test_padding_the_head_dim_changes_nothing(monkeypatch, D, multiple):
    """What CUDA's aligned kernels get (zero columns up to a multiple of 8), on the CPU kernel: same
    out, lse and gradients, through the LSE column too, for one call and for the whole mixture."""
    q, k, v = (torch.randn(2, 4, 40, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ws, rs = [8, 16, 40], [1, 2, 4]

    def mixture(q, k, v):
        return dilated_attention(q, k, v, ws, rs, causal=True, return_lse=True)

    def one_call(q, k, v):
        return fused_attention(q, k, v, causal=True)

    plain = [_loss_and_grads(fn, q, k, v) for fn in (one_call, mixture)]
    widths = []
    real_widen = kernels._widen
    monkeypatch.setattr(kernels, "head_dim_multiple", lambda x: multiple)
    monkeypatch.setattr(
        kernels, "_widen", lambda x, width, column=None: widths.append(width) or real_widen(x, width, column)
    )
    padded = [_loss_and_grads(fn, q, k, v) for fn in (one_call, mixture)]
    # every kernel call saw an aligned head dim; the backward's LSE column always pads past D
    assert widths and all(width % multiple == 0 and width >= D for width in widths)
    assert any(width > D for width in widths)
    for got_all, want_all in zip(padded, plain):
        for got, want in zip(got_all, want_all):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    ref_out, _ = oracle_attention(q, k, v, ws, rs, causal=True)
    torch.testing.assert_close(padded[1][0], ref_out.detach(), rtol=0, atol=1e-10)


def test_head_dim_multiple_is_one_on_the_cpu():
    assert kernels.head_dim_multiple(torch.zeros(1, dtype=torch.float32)) == 1
    assert kernels.head_dim_multiple(torch.zeros(1, dtype=torch.bfloat16)) == 1
