"""Every memory layout is exact: q, k, v with any strides give the oracle's out, lse and gradients.

The fused kernels read the last dim as contiguous whatever its stride (kernels.py); before the
fix, channels-first features came out of the fast path wrong by up to 3.4 with no error.
"""

import pytest
import torch

from longnet_ref import dilated_attention, dilated_branch
from longnet_ref.oracle import oracle_attention

B, H, N, D = 2, 4, 48, 6
WS, RS = [8, 16, 48], [1, 2, 4]


def padded(t):  # a view into a larger buffer, at an offset
    big = torch.zeros(B + 1, H, N + 5, D + 3, dtype=t.dtype)
    big[1:, :, 3 : 3 + N, 2 : 2 + D] = t
    return big[1:, :, 3 : 3 + N, 2 : 2 + D]


LAYOUTS = {
    "contiguous": lambda t: t,
    "channels-first (B, H, D, N).T": lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2),
    "the layer's (B, N, H, D).T": lambda t: t.transpose(1, 2).contiguous().transpose(1, 2),
    "reversed strides": lambda t: t.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0),
    "stride 2 on D": lambda t: t.repeat_interleave(2, dim=-1)[..., ::2],
    "stride 3 on N": lambda t: t.repeat_interleave(3, dim=2)[:, :, ::3],
    "a slice of a larger buffer": padded,
    "expanded over the batch": lambda t: t[:1].expand(B, H, N, D),
    "expanded over the heads": lambda t: t[:, :1].expand(B, H, N, D),
    "expanded over D (stride 0)": lambda t: t[..., :1].expand(B, H, N, D),
    "flipped along N (a copy)": lambda t: t.flip(2).flip(2),
}


def inputs(layout, seed):
    generator = torch.Generator().manual_seed(seed)
    bases = [torch.randn(B, H, N, D, dtype=torch.float64, generator=generator) for _ in range(3)]
    leaves = [base.requires_grad_() for base in bases]
    return leaves, [LAYOUTS[layout](leaf) for leaf in leaves]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("implementation", ["fast", "readable"])
@pytest.mark.parametrize("causal", [False, True])
def test_any_layout_gives_the_oracle_out_lse_and_gradients(layout, implementation, causal):
    leaves, (q, k, v) = inputs(layout, seed=len(layout))
    if layout != "contiguous":
        assert not all(x.is_contiguous() for x in (q, k, v)) or layout.startswith("flipped")
    out, lse = dilated_attention(q, k, v, WS, RS, causal=causal, implementation=implementation, return_lse=True)
    same = [x.detach().contiguous().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = oracle_attention(*same, WS, RS, causal=causal)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)
    weights = torch.randn(B, H, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    lse_weights = torch.randn(B, H, N, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    grads = torch.autograd.grad((out * weights).sum() + (lse * lse_weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weights).sum() + (ref_lse * lse_weights).sum(), same)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11, msg=f"d{name}")


@pytest.mark.parametrize("layout", ["channels-first (B, H, D, N).T", "stride 2 on D", "expanded over D (stride 0)"])
def test_one_branch_in_any_layout(layout):
    _, (q, k, v) = inputs(layout, seed=3)
    out, lse = dilated_branch(q, k, v, 16, 2, causal=True)
    ref, ref_lse = oracle_attention(*(x.detach().contiguous() for x in (q, k, v)), [16], [2], causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)
