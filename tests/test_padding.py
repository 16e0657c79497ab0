"""key_padding_mask: the oracle with the masked keys removed from every branch, exact on every path."""

import math

import pytest
import torch
from conftest import rand_qkv

from longnet_ref import dilated_attention, dilated_branch, oracle_attention
from longnet_ref.attention import dense_attention
from longnet_ref.kernels import fused_attention

CONFIGS = {  # name: (N, H, segment_lengths, dilation_rates, head_offsets)
    "paper": (40, 4, [4, 8, 32], [1, 2, 4], "paper"),
    "ragged": (37, 4, [8, 16], [2, 4], "paper"),
    "torchscale": (40, 3, [8, 40], [2, 4], "torchscale"),
}


def padding(kind, B, N):
    """(B, N) bool, True = ignore: right or left padding of each row by a different amount, or arbitrary."""
    mask = torch.zeros(B, N, dtype=torch.bool)
    lengths = [N - 1 - 7 * b for b in range(B)]  # a different real length per batch element
    for b, n in enumerate(lengths):
        if kind == "right":
            mask[b, n:] = True
        elif kind == "left":
            mask[b, : N - n] = True
    if kind == "arbitrary":
        mask = torch.rand(B, N, generator=torch.Generator().manual_seed(3)) < 0.4
    return mask


def grads_of(fn, inputs):
    """(out, lse) of fn and the gradients of q, k, v under a loss on both."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out, lse = fn(*inputs)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    loss = (out * weights).sum() + torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).sum()
    loss.backward()
    return out.detach(), lse.detach(), [x.grad for x in inputs]


def assert_equal_to(got, want):
    (out, lse, dgrads), (out_w, lse_w, dgrads_w) = got, want
    torch.testing.assert_close(out, out_w, rtol=0, atol=1e-12)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_w))  # rows left without keys: -inf exactly there
    finite = torch.isfinite(lse_w)
    torch.testing.assert_close(lse[finite], lse_w[finite], rtol=0, atol=1e-12)
    for g, g_w in zip(dgrads, dgrads_w):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g_w, rtol=0, atol=1e-11)


@pytest.mark.parametrize("implementation", ["fast", "readable"])
@pytest.mark.parametrize("kind", ["right", "left", "arbitrary"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_mixture_equals_the_oracle_with_the_masked_keys_removed(config, causal, kind, implementation):
    N, H, ws, rs, offsets = CONFIGS[config]
    B = 3
    mask = padding(kind, B, N)
    inputs = rand_qkv(B, H, N, 8)

    def oracle(q, k, v):
        return oracle_attention(q, k, v, ws, rs, causal=causal, head_offsets=offsets, key_padding_mask=mask)

    def ours(q, k, v):
        return dilated_attention(
            q, k, v, ws, rs, causal=causal, head_offsets=offsets, return_lse=True,
            implementation=implementation, key_padding_mask=mask,
        )  # fmt: skip

    want = grads_of(oracle, inputs)
    assert_equal_to(grads_of(ours, inputs), want)
    if kind == "left" and causal:  # the first rows of a left-padded causal row have no key at all
        assert torch.isneginf(want[1][1:, :, 0]).all() and torch.equal(
            want[0][1:, :, 0], torch.zeros_like(want[0][1:, :, 0])
        )


@pytest.mark.parametrize("implementation", ["fast", "readable"])
@pytest.mark.parametrize("causal", [False, True])
def test_one_branch_equals_the_one_branch_oracle(causal, implementation):
    B, H, N = 2, 4, 37
    mask = padding("arbitrary", B, N)
    inputs = rand_qkv(B, H, N, 8)
    want = grads_of(lambda *x: oracle_attention(*x, [16], [2], causal=causal, key_padding_mask=mask), inputs)

    def ours(*x):
        return dilated_branch(*x, 16, 2, causal=causal, implementation=implementation, key_padding_mask=mask)

    assert_equal_to(grads_of(ours, inputs), want)


def test_detached_weights_with_padding_have_the_same_forward():
    B, H, N, ws, rs = 2, 4, 40, [4, 8, 32], [1, 2, 4]
    mask = padding("left", B, N)
    q, k, v = rand_qkv(B, H, N, 8)
    want, _ = oracle_attention(q, k, v, ws, rs, causal=True, key_padding_mask=mask)
    got = dilated_attention(q, k, v, ws, rs, causal=True, detach_weights=True, key_padding_mask=mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_no_padding_is_the_same_as_no_mask():
    q, k, v = rand_qkv(2, 4, 40, 8)
    none = torch.zeros(2, 40, dtype=torch.bool)
    for implementation in ("fast", "readable"):
        a = dilated_attention(q, k, v, [8, 32], [1, 4], implementation=implementation)
        b = dilated_attention(q, k, v, [8, 32], [1, 4], implementation=implementation, key_padding_mask=none)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("causal", [False, True])
def test_fused_attention_equals_dense_attention_with_the_keys_masked(causal):
    B, H, N = 3, 2, 24
    mask = padding("arbitrary", B, N)
    mask[0] = True  # every key of one batch element masked: its rows have out 0, lse -inf
    inputs = rand_qkv(B, H, N, 8)
    bias = torch.zeros(B, 1, 1, N, dtype=torch.float64).masked_fill(mask[:, None, None, :], -math.inf)
    want = grads_of(lambda *x: dense_attention(*x, causal=causal, bias=bias), inputs)
    got = grads_of(lambda *x: fused_attention(*x, causal=causal, key_padding_mask=mask), inputs)
    assert_equal_to(got, want)
    assert torch.isneginf(got[1][0]).all()


def test_the_fast_path_masks_keys_without_an_n_by_n_mask(monkeypatch):
    """Every kernel call gets a bias with one row, broadcast over its queries: the cost stays linear."""
    import longnet_ref.kernels as kernels

    biases = []
    real = kernels.key_bias

    def spy(key_mask, q):
        bias = real(key_mask, q)
        biases.append((tuple(bias.shape), q.shape[2]))
        return bias

    monkeypatch.setattr(kernels, "key_bias", spy)
    q, k, v = rand_qkv(2, 4, 64, 8)
    dilated_attention(q, k, v, [16, 64], [1, 4], key_padding_mask=padding("right", 2, 64))
    assert biases and all(shape[-2] == 1 and shape[-1] == rows for shape, rows in biases)


def test_bad_masks_name_the_parameter():
    q, k, v = rand_qkv(2, 4, 16, 8)
    cases = [
        (torch.zeros(2, 16), TypeError, "key_padding_mask must be a bool tensor .* got dtype torch.float32"),
        (torch.zeros(2, 15, dtype=torch.bool), ValueError, r"key_padding_mask must have shape \(B, N\) = \(2, 16\)"),
        (torch.zeros(16, dtype=torch.bool), ValueError, r"key_padding_mask must have shape .* got \(16,\)"),
        ([[False] * 16] * 2, TypeError, "key_padding_mask must be None or a bool tensor, got list"),
        (torch.zeros(2, 16, dtype=torch.bool, device="meta"), ValueError, "key_padding_mask is on device meta"),
    ]
    calls = (
        lambda mask: dilated_attention(q, k, v, [8], [1], key_padding_mask=mask),
        lambda mask: dilated_branch(q, k, v, 8, 1, key_padding_mask=mask),
        lambda mask: oracle_attention(q, k, v, [8], [1], key_padding_mask=mask),
        lambda mask: fused_attention(q, k, v, key_padding_mask=mask),
    )
    for mask, error, message in cases:
        for call in calls:
            with pytest.raises(error, match=message):
                call(mask)


PARALLEL_CONFIGS = [  # (P, segment_lengths, dilation_rates): local branches, segments over 2, 4 and 8 ranks
    (4, [8, 32], [1, 2]),
    (8, [8, 32, 64, 128], [1, 2, 4, 8]),
    (8, [32, 64], [3, 16]),  # r does not divide l (padded rows), r > l (ranks with no row)
]


@pytest.mark.parametrize("implementation", ["fast", "readable"])
@pytest.mark.parametrize("kind", ["left", "arbitrary"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("P, ws, rs", PARALLEL_CONFIGS)
def test_sequence_parallel_with_padding_equals_the_oracle(P, ws, rs, causal, kind, implementation):
    """The kept keys' flags travel with them: the simulated ranks give the oracle's out and gradients."""
    from longnet_ref.parallel import simulate_sequence_parallel

    B, H, N = 2, 4, 64
    mask = padding(kind, B, N)
    inputs = [x.requires_grad_() for x in rand_qkv(B, H, N, 8)]
    out, _ = simulate_sequence_parallel(
        *inputs, P, ws, rs, causal=causal, implementation=implementation, key_padding_mask=mask
    )
    want, _ = oracle_attention(*inputs, ws, rs, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, dout)
    for g, g_w in zip(got, torch.autograd.grad(want, inputs, dout)):
        torch.testing.assert_close(g, g_w, rtol=0, atol=1e-11)


def test_sequence_parallel_ranks_agree_on_whether_there_is_a_mask():
    from longnet_ref.parallel import SimulatedGroup, sequence_parallel_attention

    group = SimulatedGroup(2)
    q, k, v = rand_qkv(1, 2, 16, 4)

    def rank(comm):  # rank 1 forgets its mask
        mask = torch.zeros(1, 8, dtype=torch.bool) if comm.rank == 0 else None
        chunk = slice(comm.rank * 8, comm.rank * 8 + 8)
        return sequence_parallel_attention(
            q[:, :, chunk], k[:, :, chunk], v[:, :, chunk], [16], [2], group=comm, key_padding_mask=mask
        )

    errors = group.run(rank, return_exceptions=True)
    assert all(isinstance(e, ValueError) and "key_padding_mask" in str(e) for e in errors), errors
