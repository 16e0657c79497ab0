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
