"""MultiheadDilatedAttention: equal to torch.nn.MultiheadAttention with one full branch."""

import pytest
import torch
from torch import nn

from longnet_ref import MultiheadDilatedAttention, dilated_attention


def _copy_weights(ours, theirs):
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        theirs.out_proj.bias.copy_(ours.out_proj.bias)


@pytest.mark.parametrize("implementation", ["fast", "readable"])
@pytest.mark.parametrize("causal", [False, True])
def test_one_full_branch_equals_torch_multihead_attention(implementation, causal):
    E, H, N = 24, 4, 19
    ours = MultiheadDilatedAttention(E, H, [32], [1], causal=causal, implementation=implementation).double()
    theirs = nn.MultiheadAttention(E, H, batch_first=True).double()
    _copy_weights(ours, theirs)
    x = torch.randn(2, N, E, dtype=torch.float64)
    mask = nn.Transformer.generate_square_subsequent_mask(N, dtype=torch.float64) if causal else None
    expected, _ = theirs(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-12)


def test_layer_is_heads_of_dilated_attention():
    E, H, N = 16, 4, 33
    layer = MultiheadDilatedAttention(E, H, [8, 16], [1, 2], causal=True).double()
    x = torch.randn(2, N, E, dtype=torch.float64)
    q, k, v = (p(x).view(2, N, H, E // H).transpose(1, 2) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    attn = dilated_attention(q, k, v, [8, 16], [1, 2], causal=True)
    expected = layer.out_proj(attn.transpose(1, 2).reshape(2, N, E))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_dropout_only_in_training():
    layer = MultiheadDilatedAttention(16, 2, [8], [1], dropout=0.5)
    x = torch.randn(1, 12, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_layer_trains():
    layer = MultiheadDilatedAttention(16, 4, [4, 8], [1, 2], causal=True, bias=False)
    assert layer.q_proj.bias is None
    x = torch.randn(2, 20, 16)
    layer(x).pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def _right_padding(B, N):
    """(B, N) bool, True = padding: batch element b has N - 3b real tokens (every query keeps a key)."""
    return torch.arange(N)[None, :] >= torch.tensor([N - 3 * b for b in range(B)])[:, None]


@pytest.mark.parametrize("implementation", ["fast", "readable"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_from_torch_equals_the_module_it_was_built_from(implementation, causal, bias):
    """One branch covering the sequence: the same output as nn.MultiheadAttention, padding mask included,
    and the same gradients of the input."""
    E, H, N, B = 24, 4, 19, 3
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(E, H, batch_first=True, bias=bias, dtype=torch.float64)
    layer = MultiheadDilatedAttention.from_torch(mha, [32], [1], causal=causal, implementation=implementation)
    assert layer.q_proj.weight.dtype == torch.float64 and (layer.q_proj.bias is not None) == bias
    padding = _right_padding(B, N) if causal else torch.rand(B, N, generator=torch.Generator().manual_seed(0)) < 0.3
    attn_mask = torch.ones(N, N, dtype=torch.bool).triu(1) if causal else None  # True: not attended, as the padding
    x = torch.randn(B, N, E, dtype=torch.float64, requires_grad=True)
    for mask in (None, padding):
        expected, _ = mha(x, x, x, key_padding_mask=mask, attn_mask=attn_mask, need_weights=False, is_causal=causal)
        got = layer(x, key_padding_mask=mask)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        (grad_expected,) = torch.autograd.grad(expected.sum(), x)
        (grad_got,) = torch.autograd.grad(got.sum(), x)
        torch.testing.assert_close(grad_got, grad_expected, rtol=0, atol=1e-12)


def test_from_torch_refuses_what_it_cannot_take():
    with pytest.raises(TypeError, match="mha must be a torch.nn.MultiheadAttention, got Linear"):
        MultiheadDilatedAttention.from_torch(nn.Linear(4, 4), [8], [1])
    for kwargs, what in (
        ({}, "batch_first=False"),
        ({"batch_first": True, "kdim": 6, "vdim": 6}, "kdim or vdim"),
        ({"batch_first": True, "add_bias_kv": True}, "add_bias_kv=True"),
        ({"batch_first": True, "add_zero_attn": True}, "add_zero_attn=True"),
    ):
        with pytest.raises(ValueError, match=f"mha: cannot take {what}"):
            MultiheadDilatedAttention.from_torch(nn.MultiheadAttention(8, 2, **kwargs), [8], [1])


def test_factory_arguments_make_the_parameters_in_that_dtype_and_device():
    layer = MultiheadDilatedAttention(16, 4, [8], [1], device="cpu", dtype=torch.float64)
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    assert {p.device.type for p in layer.parameters()} == {"cpu"}
    meta = MultiheadDilatedAttention(16, 4, [8], [1], device="meta")
    assert {p.device.type for p in meta.parameters()} == {"meta"}


def test_a_padded_query_without_keys_gets_the_output_bias_not_nan():
    layer = MultiheadDilatedAttention(8, 2, [4, 8], [1, 2], causal=True).double()
    x = torch.randn(1, 8, 8, dtype=torch.float64)
    left = torch.tensor([[True, True, True, False, False, False, False, False]])  # left padding
    out = layer(x, key_padding_mask=left)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, :3], layer.out_proj.bias.expand(3, -1), rtol=0, atol=0)


@pytest.mark.parametrize("implementation", ["fast", "readable"])
def test_grouped_query_layer_is_the_layer_with_its_kv_heads_repeated(implementation):
    """num_kv_heads = 2 of 6: k and v projections of 2 heads, each serving 3 consecutive query heads."""
    E, H, N = 24, 6, 21
    layer = MultiheadDilatedAttention(E, H, [8, 16], [1, 2], causal=True, num_kv_heads=2, implementation=implementation)
    layer = layer.double()
    assert layer.k_proj.out_features == layer.v_proj.out_features == 2 * (E // H)
    x = torch.randn(2, N, E, dtype=torch.float64)
    q = layer.q_proj(x).view(2, N, H, E // H).transpose(1, 2)
    k, v = (
        p(x).view(2, N, 2, E // H).transpose(1, 2).repeat_interleave(3, dim=1) for p in (layer.k_proj, layer.v_proj)
    )
    attn = dilated_attention(q, k, v, [8, 16], [1, 2], causal=True)
    torch.testing.assert_close(layer(x), layer.out_proj(attn.transpose(1, 2).reshape(2, N, E)), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="num_kv_heads 4 must divide num_heads 6"):
        MultiheadDilatedAttention(E, H, [8], [1], num_kv_heads=4)
    with pytest.raises(ValueError, match="num_kv_heads must be a positive integer, got 0"):
        MultiheadDilatedAttention(E, H, [8], [1], num_kv_heads=0)
