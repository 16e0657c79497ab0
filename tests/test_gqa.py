"""Grouped-query attention: k and v with H_kv heads, each serving H / H_kv consecutive query heads."""

import pytest
import torch

from longnet_ref import dilated_attention, dilated_branch, oracle_attention

WS, RS = [4, 8, 24], [1, 2, 4]


def inputs(B, H, H_kv, N=24, D=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, dtype=torch.float64, generator=generator)
    k, v = (torch.randn(B, H_kv, N, D, dtype=torch.float64, generator=generator) for _ in range(2))
    return q, k, v


def out_lse_grads(fn, q, k, v):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    ((out * weights).sum() + torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).sum()).backward()
    return [out.detach(), lse.detach(), q.grad, k.grad, v.grad]


def assert_close(got, want):
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape, name
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite), name
        torch.testing.assert_close(a[finite], b[finite], rtol=0, atol=1e-11, msg=name)


@pytest.mark.parametrize("implementation", ["fast", "readable"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rule", ["paper", "torchscale", "none"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("H_kv", [1, 2, 4, 8])
def test_grouped_kv_heads_equal_the_oracle(H_kv, B, rule, causal, implementation):
    """H = 8: the oracle repeats k and v (its definition); both paths, every head-offset rule, B = 1 and 3."""
    q, k, v = inputs(B, 8, H_kv)

    def ours(*x):
        return dilated_attention(
            *x, WS, RS, causal=causal, head_offsets=rule, implementation=implementation, return_lse=True
        )

    want = out_lse_grads(lambda *x: oracle_attention(*x, WS, RS, causal=causal, head_offsets=rule), q, k, v)
    assert_close(out_lse_grads(ours, q, k, v), want)


def test_the_rule_is_repeat_interleave_and_the_kv_gradient_its_sum():
    q, k, v = inputs(2, 6, 3, N=21)
    group = out_lse_grads(lambda *x: dilated_attention(*x, [8, 16], [2, 3], return_lse=True), q, k, v)
    repeated = [x.repeat_interleave(2, dim=1) for x in (k, v)]
    full = out_lse_grads(lambda *x: dilated_attention(*x, [8, 16], [2, 3], return_lse=True), q, *repeated)
    torch.testing.assert_close(group[0], full[0], rtol=0, atol=1e-12)
    for grouped, dense in zip(group[3:], full[3:]):  # dk, dv: the query heads of one kv head add up
        torch.testing.assert_close(grouped, dense.unflatten(1, (3, 2)).sum(2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("implementation", ["fast", "readable"])
def test_one_branch_with_grouped_keys_and_padding(implementation):
    q, k, v = inputs(2, 4, 2, N=19)
    mask = torch.rand(2, 19, generator=torch.Generator().manual_seed(2)) < 0.3

    def ours(*x):
        return dilated_branch(*x, 8, 2, causal=True, implementation=implementation, key_padding_mask=mask)

    want = out_lse_grads(lambda *x: oracle_attention(*x, [8], [2], causal=True, key_padding_mask=mask), q, k, v)
    assert_close(out_lse_grads(ours, q, k, v), want)


@pytest.mark.parametrize("B", [1, 3])
def test_the_fast_path_reads_k_and_v_in_place(monkeypatch, B):
    """Every kernel call gets views of k and v (inside k's and v's memory), never a repeated copy."""
    import longnet_ref.fast as fast

    seen = []
    real = fast.attention_forward

    def spy(q, k, v, causal, scale, key_mask=None):
        seen.append((k.data_ptr(), v.data_ptr(), k.is_contiguous()))
        return real(q, k, v, causal, scale, key_mask)

    monkeypatch.setattr(fast, "attention_forward", spy)
    q, k, v = inputs(B, 8, 2, N=32)
    dilated_attention(q, k, v, [8, 32], [2, 4])
    for x, ptrs in ((k, [p for p, _, _ in seen]), (v, [p for _, p, _ in seen])):
        start, end = x.data_ptr(), x.data_ptr() + x.numel() * x.element_size()
        assert all(start <= p < end for p in ptrs)
    assert not any(contiguous for *_, contiguous in seen)  # strided views, not gathered copies


def test_kv_heads_must_divide_the_query_heads():
    q, _, _ = inputs(1, 6, 1)
    k = v = torch.randn(1, 4, 24, 8, dtype=torch.float64)
    for call in (
        lambda: dilated_attention(q, k, v, [8], [1]),
        lambda: dilated_branch(q, k, v, 8, 1),
        lambda: oracle_attention(q, k, v, [8], [1]),
    ):
        with pytest.raises(ValueError, match="k and v have 4 heads, which must divide q's 6"):
            call()


# ---------------------------------------------------------------- sequence parallelism

# (P, segment_lengths, dilation_rates): local branches, segments over 2 and 4 ranks, w > N, r > l
PARALLEL_CONFIGS = [(4, [8, 16, 32], [1, 2, 4]), (4, [16, 64], [2, 8]), (8, [32], [6])]


@pytest.mark.parametrize("implementation", ["fast", "readable"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("B, H_kv, rule", [(1, 1, "paper"), (2, 2, "paper"), (2, 3, "torchscale")])
@pytest.mark.parametrize("P, ws, rs", PARALLEL_CONFIGS)
def test_sequence_parallel_with_grouped_keys_equals_the_oracle(P, ws, rs, B, H_kv, rule, causal, implementation):
    """Simulated ranks with H_kv < H = 6 (and arbitrary padding): the oracle's out and gradients."""
    from longnet_ref.parallel import simulate_sequence_parallel

    q, k, v = (x.requires_grad_() for x in inputs(B, 6, H_kv, N=32))
    mask = torch.rand(B, 32, generator=torch.Generator().manual_seed(4)) < 0.3
    options = {"causal": causal, "head_offsets": rule, "key_padding_mask": mask}
    out, _ = simulate_sequence_parallel(q, k, v, P, ws, rs, implementation=implementation, **options)
    want, _ = oracle_attention(q, k, v, ws, rs, **options)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    dout = torch.randn_like(out)
    for name, g, g_w in zip(
        "qkv", torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)
    ):
        torch.testing.assert_close(g, g_w, rtol=0, atol=1e-11, msg=name)


def test_sequence_parallel_layer_with_grouped_keys_equals_the_layer():
    """`from_layer` keeps num_kv_heads (the k and v projections' sizes), and the ranks give the layer's output."""
    from longnet_ref import MultiheadDilatedAttention
    from longnet_ref.parallel import SequenceParallelDilatedAttention, SimulatedGroup

    torch.manual_seed(3)
    layer = MultiheadDilatedAttention(32, 4, [8, 32], [1, 2], causal=True, num_kv_heads=2).double()
    parallel = SequenceParallelDilatedAttention.from_layer(layer)
    assert parallel.num_kv_heads == 2
    x = torch.randn(2, 32, 32, dtype=torch.float64)
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[0, :5] = True  # left padding of one sequence
    y = SimulatedGroup(2).run(
        lambda comm: parallel(
            x.chunk(2, dim=1)[comm.rank], group=comm, key_padding_mask=mask.chunk(2, dim=1)[comm.rank]
        )
    )
    torch.testing.assert_close(torch.cat(y, dim=1), layer(x, key_padding_mask=mask), rtol=0, atol=1e-12)


def test_ranks_must_agree_on_the_kv_heads():
    from longnet_ref.parallel import SimulatedGroup, sequence_parallel_attention

    q, _, _ = inputs(1, 4, 1, N=16)

    def rank(comm):  # rank 1 passes 2 kv heads, rank 0 one
        k = v = torch.randn(1, 1 + comm.rank, 8, 8, dtype=torch.float64)
        return sequence_parallel_attention(q[:, :, comm.rank * 8 : comm.rank * 8 + 8], k, v, [16], [2], group=comm)

    errors = SimulatedGroup(2).run(rank, return_exceptions=True)
    assert all(isinstance(e, ValueError) and "same number of k and v heads H_kv" in str(e) for e in errors), errors
