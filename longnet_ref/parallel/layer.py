"""`SequenceParallelDilatedAttention`: the layer on this rank's chunk of the sequence.

The projections act token by token, so a rank projects its own chunk (B, N/P, E) with no
communication; only the attention needs the other ranks (`sequence_parallel_attention`).
With the same parameters on every rank, the P chunks of the output are the single-device
layer's output on the whole sequence. Parameter gradients are per-rank partial sums: add
them over the ranks (an all-reduce, as data parallelism does) to get the full gradient.

Letters: the package legend (`longnet_ref/__init__.py`): B batch, l = N / P local length, E = H * D.
"""

from __future__ import annotations

import torch

from ..layer import MultiheadDilatedAttention
from .algorithm import sequence_parallel_attention
from .comm import as_communicator


class SequenceParallelDilatedAttention(MultiheadDilatedAttention):
    """`MultiheadDilatedAttention` (same arguments, plus `group`) over this rank's chunk (B, l, E).

    `group`: None (torch.distributed's default group), a ProcessGroup of every process, or a `Communicator`
    (a rank of a `SimulatedGroup`); `forward(x, group=...)` overrides it for one call.
    `implementation` picks the per-rank path ("fast" or "readable", `sequence_parallel_attention`). A `rotary` position
    encoding (if the layer has one) gets global positions, rank * l + 0..l-1. Dropout draws
    from each rank's own random stream, so with dropout > 0 only the distribution matches one device.
    """

    def __init__(self, *args, group=None, **kwargs):
        super().__init__(*args, **kwargs)
        if group is not None:
            as_communicator(group)  # a bad group fails here, not at the first forward
        self.group = group

    @classmethod
    def from_layer(cls, layer, group=None):
        """A sequence-parallel copy of a `MultiheadDilatedAttention` (same configuration, copied parameters)."""
        if not isinstance(layer, MultiheadDilatedAttention):
            raise TypeError(f"layer must be a MultiheadDilatedAttention, got {type(layer).__name__}")
        parallel = cls(
            layer.embed_dim,
            layer.num_heads,
            layer.segment_lengths,
            layer.dilation_rates,
            causal=layer.causal,
            dropout=layer.dropout.p,
            bias=layer.q_proj.bias is not None,
            head_offsets=layer.head_offsets,
            implementation=layer.implementation,
            num_kv_heads=layer.num_kv_heads,
            group=group,
            **({} if getattr(layer, "rotary", None) is None else {"rotary": layer.rotary}),
        )
        reference = next(layer.parameters())
        parallel.to(reference.device, reference.dtype)
        parallel.load_state_dict(layer.state_dict())
        return parallel

    def forward(self, x, group=None, key_padding_mask=None):
        """x: (B, l, E), this rank's chunk -> (B, l, E); key_padding_mask: this chunk's (B, l) mask, or None."""
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, N/P, {self.embed_dim}), got shape {tuple(x.shape)}")
        B, l, E = x.shape
        group = self.group if group is None else group
        q, k, v = (self.split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, l, D)
        if getattr(self, "rotary", None) is not None:  # positions are global: this chunk starts at rank * l
            start = as_communicator(group).rank * l
            q, k = self.rotary(q, k, torch.arange(start, start + l, device=x.device))
        out = sequence_parallel_attention(
            q,
            k,
            v,
            self.segment_lengths,
            self.dilation_rates,
            causal=self.causal,
            head_offsets=self.head_offsets,
            group=group,
            implementation=self.implementation,
            key_padding_mask=key_padding_mask,
        )
        out = self.dropout(out)  # identity in eval mode
        out = out.transpose(1, 2).reshape(B, l, E)  # (B, l, H*D)
        return self.out_proj(out)
