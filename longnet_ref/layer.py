"""`MultiheadDilatedAttention`: LongNet's attention as a drop-in Transformer layer.

(B, N, E) -> project to q, k, v -> split heads (B, H, N, D) -> dilated attention -> merge
heads -> output projection. With one branch covering the sequence (w >= N, r = 1) it is
ordinary multi-head attention (Vaswani et al. 2017), which a test checks against
`torch.nn.MultiheadAttention`.

Letters: the package legend (`longnet_ref/__init__.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from .checks import as_positive_int, check_branches, check_flag, check_head_offsets, check_implementation
from .mixture import dilated_attention


class MultiheadDilatedAttention(nn.Module):
    """Multi-head dilated attention over (B, N, E) inputs (LongNet Sec. 2.3).

    Args:
        embed_dim: E, divisible by num_heads.
        num_heads: H; head j uses offset o_j for every branch (`head_offsets`).
        segment_lengths, dilation_rates: the branches (w_i, r_i).
        causal: decoder-style attention.
        dropout: dropout probability on the attention output (per head, before the output
            projection), in training mode only. Dropping attention probabilities instead
            would need the fused kernel's random state per branch piece; dropping the output
            regularises the same layer and keeps the merge exact.
        bias: biases on the four projections.
        head_offsets: "paper", "torchscale" or "none".
        implementation: "fast" (default) or "readable".
        rotary: optional callable `rotary(q, k, positions) -> (q, k)` on (B, H, N, D) tensors,
            applied after the projections and before attention, with `positions` the (N,)
            absolute positions of the rows (0..N-1 here). Relative position schemes such as
            RoPE (`longnet_ref.lm.model.RotaryEmbedding`) live here, because they must rotate q and
            k, not the layer's input. Default None: no positions (the layer is permutation
            equivariant apart from its causal mask and segments).
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        segment_lengths,
        dilation_rates,
        *,
        causal=False,
        dropout=0.0,
        bias=True,
        head_offsets="paper",
        implementation="fast",
        rotary=None,
    ):
        super().__init__()
        embed_dim = as_positive_int("embed_dim", embed_dim)
        num_heads = as_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        branches = check_branches(segment_lengths, dilation_rates)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.segment_lengths = [w for w, _ in branches]
        self.dilation_rates = [r for _, r in branches]
        self.causal = check_flag("causal", causal)
        self.head_offsets = check_head_offsets(head_offsets)
        self.implementation = check_implementation(implementation)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.dropout = nn.Dropout(float(dropout))
        if rotary is not None and not callable(rotary):
            raise ValueError(f"rotary must be None or a callable (q, k, positions) -> (q, k), got {rotary!r}")
        self.rotary = rotary  # an nn.Module is registered as a submodule by this assignment

    def split_heads(self, x):
        B, N, E = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)

    def forward(self, x):
        """x: (B, N, E) -> (B, N, E)."""
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, N, {self.embed_dim}), got shape {tuple(x.shape)}")
        B, N, E = x.shape
        q, k, v = (self.split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, N, D)
        if self.rotary is not None:
            q, k = self.rotary(q, k, torch.arange(N, device=x.device))  # positions 0..N-1
        out = dilated_attention(
            q,
            k,
            v,
            self.segment_lengths,
            self.dilation_rates,
            causal=self.causal,
            head_offsets=self.head_offsets,
            implementation=self.implementation,
        )
        out = self.dropout(out)  # identity in eval mode
        out = out.transpose(1, 2).reshape(B, N, E)  # (B, N, H*D)
        return self.out_proj(out)

    def extra_repr(self):
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, segment_lengths={self.segment_lengths}, "
            f"dilation_rates={self.dilation_rates}, causal={self.causal}, head_offsets={self.head_offsets!r}"
        )
