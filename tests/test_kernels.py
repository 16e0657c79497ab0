"""kernels.py: the fused kernel's output, log-sum-exp and exact backward against dense attention, and
the zero-padding of head dims that CUDA's kernels need (`head_dim_multiple`), exercised on the CPU."""

import re

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


@pytest.fixture
def torch_without_the_fused_op(monkeypatch):
    """This torch as one older than 2.3 looks: the CPU op names point at ops that do not exist."""
    import longnet_ref.mixture as mixture

    monkeypatch.setitem(kernels.FUSED_OPS, "cpu", ("_no_such_flash_op", "_no_such_flash_op_backward"))
    monkeypatch.setattr(mixture, "_warned_no_kernel", set())  # as in a fresh process
    assert not kernels.fused_kernel_available("cpu")


def test_without_the_fused_op_the_fast_path_falls_back_with_one_warning(torch_without_the_fused_op):
    """dilated_attention and dilated_branch run the readable path (a kernel call would raise), warning once."""
    import warnings

    from longnet_ref import dilated_branch

    ws, rs = [8, 16, 32], [1, 2, 4]
    q, k, v = (torch.randn(2, 4, 40, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 40, generator=torch.Generator().manual_seed(0)) < 0.3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [dilated_attention(q, k, v, ws, rs, causal=True, key_padding_mask=mask) for _ in range(3)]
        branch_out, _ = dilated_branch(q, k, v, 16, 2)
    fallbacks = [w for w in caught if "no fused attention kernel" in str(w.message)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    assert issubclass(fallbacks[0].category, RuntimeWarning)
    message = str(fallbacks[0].message)
    assert f"torch {torch.__version__}" in message and "torch >= 2.3" in message and "'readable'" in message
    want, _ = oracle_attention(q, k, v, ws, rs, causal=True, key_padding_mask=mask)
    for out in outs:
        torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(branch_out, oracle_attention(q, k, v, [16], [2])[0], rtol=0, atol=1e-12)
    dout = torch.randn_like(want)
    for got, ref in zip(torch.autograd.grad(outs[0], (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-11)


def test_without_the_fused_op_fused_attention_names_the_torch_version(torch_without_the_fused_op):
    q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    version = re.escape(torch.__version__)  # "2.13.0+cpu": the + is no quantifier
    with pytest.raises(RuntimeError, match=rf"torch {version} has no fused attention op .*torch >= 2\.3"):
        fused_attention(q, k, v)


def test_without_the_fused_op_every_sequence_parallel_rank_names_the_torch_version(torch_without_the_fused_op):
    """Both per-rank paths call the kernel: every rank raises the same clear error, before any all-gather of keys."""
    from longnet_ref.parallel import SimulatedGroup, sequence_parallel_attention

    q = torch.randn(1, 2, 16, 4, dtype=torch.float64)
    group = SimulatedGroup(2)
    for implementation in ("fast", "readable"):
        errors = group.run(
            lambda comm: sequence_parallel_attention(
                *(q[:, :, comm.rank * 8 : comm.rank * 8 + 8] for _ in range(3)),
                [16],
                [2],
                group=comm,
                implementation=implementation,  # noqa: B023 - run() returns before the loop goes on
            ),
            return_exceptions=True,
        )
        assert all(isinstance(e, RuntimeError) and "torch >= 2.3" in str(e) for e in errors), errors
        assert {r.op for r in group.records} == {"all_gather_object"}  # the input check only
