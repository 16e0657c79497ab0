"""`MultiheadDilatedAttention`: LongNet's attention as a self-attention layer.

(B, N, E) -> project to q, k, v -> split heads (B, H, N, D) -> dilated attention -> merge
heads -> output projection. With one branch covering the sequence (w >= N, r = 1) it is
ordinary multi-head attention (Vaswani et al. 2017): `from_torch` builds one from a
`torch.nn.MultiheadAttention`, and tests check the two agree, with padding masks and causal.

What it replaces, exactly: a batch_first `nn.MultiheadAttention` used for self-attention,
`mha(x, x, x, key_padding_mask=m, need_weights=False)[0]` becomes `layer(x, key_padding_mask=m)`
(`is_causal=True` with its causal mask becomes `causal=True` at construction). It takes no
attn_mask (the branches are its mask), returns no attention weights, and is not a module
with `nn.MultiheadAttention`'s call signature: `nn.TransformerEncoderLayer` cannot hold it.

Letters: the package legend (`longnet_ref/__init__.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from .checks import as_positive_int, check_branches, check_flag, check_head_offsets, check_implementation
from .mixture import dilated_attention


def _autocast_on(device_type):
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


class MultiheadDilatedAttention(nn.Module):
    """Multi-head dilated attention over (B, N, E) inputs (LongNet Sec. 2.3); see the module docstring
    for what it is a drop-in for.

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
        num_kv_heads: H_kv heads of k and v (grouped-query attention; None: H). Each serves
            H / H_kv consecutive query heads; the k and v projections shrink to H_kv * D outputs.
        device, dtype: where and in what dtype the parameters are made (as torch's layers take them).
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
        num_kv_heads=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        embed_dim = as_positive_int("embed_dim", embed_dim)
        num_heads = as_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        check_flag("bias", bias)
        branches = check_branches(segment_lengths, dilation_rates)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else as_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads {self.num_kv_heads} must divide num_heads {num_heads}")
        kv_dim = self.num_kv_heads * self.head_dim  # grouped-query attention: smaller k and v projections
        self.segment_lengths = [w for w, _ in branches]
        self.dilation_rates = [r for _, r in branches]
        self.causal = check_flag("causal", causal)
        self.head_offsets = check_head_offsets(head_offsets)
        self.implementation = check_implementation(implementation)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.dropout = nn.Dropout(float(dropout))
        if rotary is not None and not callable(rotary):
            raise ValueError(f"rotary must be None or a callable (q, k, positions) -> (q, k), got {rotary!r}")
        self.rotary = rotary  # an nn.Module is registered as a submodule by this assignment

    @classmethod
    def from_torch(cls, mha, segment_lengths, dilation_rates, *, causal=False, **kwargs):
        """A layer with the weights of a batch_first `torch.nn.MultiheadAttention` (copied).

        With one branch covering the sequence (w >= N, r = 1) its output equals
        `mha(x, x, x, key_padding_mask=m, need_weights=False)[0]` (with `attn_mask` the causal
        mask and `causal=True`). `kwargs` go to the constructor (head_offsets, implementation, rotary).
        `mha.dropout` is copied, but this layer drops attention outputs, not attention probabilities
        (see `dropout` above), so in training mode with dropout > 0 the two modules differ.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        unsupported = {
            "batch_first=False (inputs (N, B, E)); build it with batch_first=True": not mha.batch_first,
            "kdim or vdim other than embed_dim (cross-attention)": not mha._qkv_same_embed_dim,
            "add_bias_kv=True": mha.bias_k is not None,
            "add_zero_attn=True": mha.add_zero_attn,
        }
        for what, present in unsupported.items():
            if present:
                raise ValueError(f"mha: cannot take {what}; the layer is self-attention over (B, N, E)")
        weight = mha.in_proj_weight
        layer = cls(
            mha.embed_dim,
            mha.num_heads,
            segment_lengths,
            dilation_rates,
            causal=causal,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            device=weight.device,
            dtype=weight.dtype,
            **kwargs,
        )
        with torch.no_grad():
            for proj, w in zip((layer.q_proj, layer.k_proj, layer.v_proj), weight.chunk(3)):  # (3E, E) -> 3 x (E, E)
                proj.weight.copy_(w)
            layer.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                for proj, b in zip((layer.q_proj, layer.k_proj, layer.v_proj), mha.in_proj_bias.chunk(3)):
                    proj.bias.copy_(b)
                layer.out_proj.bias.copy_(mha.out_proj.bias)
        return layer

    def split_heads(self, x):
        B, N, _ = x.shape
        heads = x.shape[-1] // self.head_dim  # H, or H_kv for k and v
        return x.view(B, N, heads, self.head_dim).transpose(1, 2)  # (B, heads, N, D)

    def forward(self, x, key_padding_mask=None):
        """x: (B, N, E) -> (B, N, E).

        key_padding_mask: None or (B, N) bool, True for the positions whose keys are ignored
        (nn.MultiheadAttention's rule); a query left without keys gets a zero attention output
        (then the output projection's bias), where nn.MultiheadAttention gives NaN.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be (B, N, {self.embed_dim}), got shape {shape}")
        weight = self.q_proj.weight
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        mismatch = x.device != weight.device or (x.dtype != weight.dtype and not _autocast_on(x.device.type))
        if mismatch:  # under autocast the projections take mixed dtypes by design
            raise ValueError(
                f"x is {x.dtype} on {x.device} but the layer's parameters are {weight.dtype} on {weight.device}; "
                "convert one of them (layer.to(x.dtype) or x.to(...))"
            )
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
            key_padding_mask=key_padding_mask,
        )
        out = self.dropout(out)  # identity in eval mode
        out = out.transpose(1, 2).reshape(B, N, E)  # (B, N, H*D)
        return self.out_proj(out)

    def extra_repr(self):
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"segment_lengths={self.segment_lengths}, "
            f"dilation_rates={self.dilation_rates}, causal={self.causal}, head_offsets={self.head_offsets!r}"
        )
