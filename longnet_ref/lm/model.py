"""A small decoder-only LongNet language model (LongNet Sec. 4, Table 2, in miniature).

    bytes (B, N) -> token embedding (B, N, E)
                 -> L x [ x + Attention(LN(x)),  x + MLP(LN(x)) ]      pre-norm blocks
                 -> LN -> tied output head (B, N, V)

The attention is `MultiheadDilatedAttention` (causal), of one of three kinds:

- "dilated": LongNet's mixture of branches (w_i, r_i) (Eqs. 9-10);
- "dense":   one branch w = infinity, r = 1: ordinary causal attention at any length;
- "local":   the mixture's first branch alone (w_0, r = 1): attention inside fixed windows,
             the cheap baseline that cannot see past its window.

Positions: rotary embeddings (RoPE, Su et al. 2021) rotate q and k by their absolute
positions, so q.k depends only on the distance between them. The paper used XPOS (Sun et al.
2022), which is RoPE times an exponential decay per dimension that damps far-away scores. We
use plain RoPE because (1) it is the relative scheme every reader will meet elsewhere, (2) it
needs no decay scale tuned to the training length, and (3) with dilated attention the far
context is already thinned out by the sparse branches, which is the effect we want to see, not
a decay that hides it. Both run at test lengths longer than training; neither needs a learned
table that stops at the training length.

Shape legend (the package's, plus): L layers, V vocabulary.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import (
    as_positive_int,
    as_positive_number,
    check_branches,
    check_head_offsets,
    check_implementation,
    is_number,
)
from ..layer import MultiheadDilatedAttention

ATTENTION_KINDS = ("dilated", "dense", "local")
UNBOUNDED = sys.maxsize  # "dense" attention: one segment longer than any sequence


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; saved in checkpoints as a dict."""

    attention: str = "dilated"
    segment_lengths: list = field(default_factory=lambda: [256, 512, 1024])
    dilation_rates: list = field(default_factory=lambda: [1, 2, 4])
    vocab_size: int = 256  # bytes
    embed_dim: int = 128
    num_heads: int = 4
    num_layers: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    rope_base: float = 10000.0
    head_offsets: str = "paper"
    implementation: str = "fast"
    num_kv_heads: int | None = None  # grouped-query attention: kv heads, dividing num_heads (None: num_heads)

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        check_branches(self.segment_lengths, self.dilation_rates)
        self.segment_lengths, self.dilation_rates = list(self.segment_lengths), list(self.dilation_rates)
        for name in ("vocab_size", "embed_dim", "num_heads", "num_layers", "mlp_ratio"):
            as_positive_int(name, getattr(self, name))
        # checked here, not when a model is built: a bad config must not reach a checkpoint
        if not (is_number(self.dropout) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        as_positive_number("rope_base", self.rope_base)  # 0, < 0, NaN or inf: every angle NaN or 0
        check_head_offsets(self.head_offsets)
        check_implementation(self.implementation)
        if self.num_kv_heads is not None and self.num_heads % as_positive_int("num_kv_heads", self.num_kv_heads):
            raise ValueError(f"num_kv_heads {self.num_kv_heads} must divide num_heads {self.num_heads}")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 2:
            raise ValueError(
                f"embed_dim {self.embed_dim} must split into num_heads {self.num_heads} heads of even size (RoPE)"
            )

    def branches(self):
        """The (segment_lengths, dilation_rates) the attention kind actually uses."""
        if self.attention == "dense":
            return [UNBOUNDED], [1]
        if self.attention == "local":
            return [self.segment_lengths[0]], [1]
        return list(self.segment_lengths), list(self.dilation_rates)

    def to_dict(self):
        return asdict(self)


class RotaryEmbedding(nn.Module):
    """RoPE: rotate each pair of dims (i, i + D/2) of q and k by the angle `position * base^(-2i/D)`.

    Then q_m . k_n depends on m - n only, so a cached key rotated once at its own position is
    valid for every later query. No parameters and no buffers: angles are computed from the
    positions each call, so nothing limits the length and checkpoints carry nothing for it.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        head_dim = as_positive_int("head_dim", head_dim)
        if head_dim % 2:  # dims are rotated in pairs (i, i + D/2)
            raise ValueError(f"head_dim must be even (RoPE rotates pairs of dims), got {head_dim}")
        self.head_dim, self.base = head_dim, as_positive_number("base", base)

    def check(self, name, x, positions):
        """x: a (B, H, N, head_dim) floating tensor; positions: N integer positions on its device."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            what = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 4-D floating tensor (B, H, N, D), got {what}")
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"{name} must have head_dim = {self.head_dim} dims per head, got D = {x.shape[-1]}")
        if (
            not isinstance(positions, torch.Tensor)
            or positions.dtype.is_floating_point
            or positions.dtype == torch.bool
        ):
            what = f"dtype {positions.dtype}" if isinstance(positions, torch.Tensor) else type(positions).__name__
            raise ValueError(f"positions must be an integer tensor (N,) of token positions, got {what}")
        if tuple(positions.shape) != (x.shape[2],) or positions.device != x.device:
            raise ValueError(
                f"positions must be one per token of {name}: shape ({x.shape[2]},) on {x.device}, "
                f"got shape {tuple(positions.shape)} on {positions.device}"
            )

    def rotate(self, x, positions):
        """x (B, H, N, D) at positions (N,) -> rotated x, same shape and dtype."""
        self.check("x", x, positions)
        return self._rotate(x, positions)

    def _rotate(self, x, positions):
        D = x.shape[-1]
        # float64 angles for float64 inputs (exact tests), float32 otherwise (bf16 would lose the angle)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        inv_freq = self.base ** (-torch.arange(0, D, 2, device=x.device, dtype=dtype) / D)  # (D/2,)
        angles = positions.to(dtype)[:, None] * inv_freq[None, :]  # (N, D/2)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]  # (B, H, N, D/2) each
        # Written into x's own memory layout (the layer's (B, N, H, D).transpose(1, 2), as v has), not
        # torch.cat's fresh (B, H, N, D): with q, k and v laid out alike, the fast path's kernel calls
        # read all three as views in the LM's shapes (fast_pieces.fold) instead of copying v's rows.
        out = torch.empty_like(x)  # (B, H, N, D), x's strides
        out[..., : D // 2] = x1 * cos - x2 * sin
        out[..., D // 2 :] = x1 * sin + x2 * cos
        return out

    def forward(self, q, k, positions):
        self.check("q", q, positions)
        self.check("k", k, positions)
        return self._rotate(q, positions), self._rotate(k, positions)

    def extra_repr(self):
        return f"head_dim={self.head_dim}, base={self.base}"


class Block(nn.Module):
    """Pre-norm Transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        E = config.embed_dim
        segment_lengths, dilation_rates = config.branches()
        self.ln_attn = nn.LayerNorm(E)
        self.attn = MultiheadDilatedAttention(
            E,
            config.num_heads,
            segment_lengths,
            dilation_rates,
            causal=True,
            dropout=config.dropout,
            head_offsets=config.head_offsets,
            implementation=config.implementation,
            rotary=rotary,
            num_kv_heads=config.num_kv_heads,
        )
        self.ln_mlp = nn.LayerNorm(E)
        self.mlp = nn.Sequential(
            nn.Linear(E, config.mlp_ratio * E),
            nn.GELU(),
            nn.Linear(config.mlp_ratio * E, E),
            nn.Dropout(config.dropout),
        )

    def forward(self, x, attend=None, key_padding_mask=None):
        """x (B, N, E) -> (B, N, E). `attend(attn, hidden)` replaces `attn(hidden)` (cached decoding)."""
        hidden = self.ln_attn(x)
        if attend is not None:
            x = x + attend(self.attn, hidden)
        elif key_padding_mask is None:
            x = x + self.attn(hidden)
        else:  # keyword only: a sequence-parallel layer's second argument is its group
            x = x + self.attn(hidden, key_padding_mask=key_padding_mask)
        return x + self.mlp(self.ln_mlp(x))


def check_tokens(name, tokens, vocab_size, ignore=None):
    """tokens: a (B, N) integer tensor of ids in [0, vocab_size) (or `ignore`); else a ValueError naming them."""
    vocab_size = as_positive_int("vocab_size", vocab_size)  # a bad size must not be blamed on the ids
    if ignore is not None and (isinstance(ignore, bool) or not isinstance(ignore, int)):
        raise ValueError(f"ignore must be None or an int token id to skip, got {ignore!r}")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"{name} must be a (B, N) tensor of token ids, got {shape}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    ids = tokens if ignore is None else tokens[tokens != ignore]
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        raise ValueError(f"{name} must be ids in [0, {vocab_size}), got {bad[:5].tolist()} among them")


class LongNetLM(nn.Module):
    """Decoder-only byte-level LM with dilated (or dense, or local) attention."""

    def __init__(self, config: ModelConfig | None = None, **overrides):
        super().__init__()
        if config is not None and not isinstance(config, ModelConfig):
            raise TypeError(
                f"config must be None or a ModelConfig (ModelConfig(**d) for a dict), got {type(config).__name__}"
            )
        if config is not None and overrides:  # they would be ignored silently
            raise TypeError(f"pass config or keyword overrides, not both; got config and {sorted(overrides)}")
        config = ModelConfig(**overrides) if config is None else config
        self.config = config
        E = config.embed_dim
        self.embed = nn.Embedding(config.vocab_size, E)
        self.rotary = RotaryEmbedding(E // config.num_heads, config.rope_base)  # shared by every layer
        self.blocks = nn.ModuleList(Block(config, self.rotary) for _ in range(config.num_layers))
        self.ln_final = nn.LayerNorm(E)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch adds to the stream, so shrink its output
        # projection by sqrt(2L) to keep the stream's variance flat in depth.
        for block in self.blocks:
            for proj in (block.attn.out_proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * config.num_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, *, attend=None, key_padding_mask=None):
        """idx (B, N) int64 -> logits (B, N, V); with targets (B, N), also the mean cross-entropy.

        Targets equal to -100 are ignored (the recall task scores only its answers).
        `attend` is forwarded to every block; `generate.KVCache` uses it.
        key_padding_mask: None or (B, N) bool, True at padding (a batch of sequences of different
        lengths, padded on either side): no token attends a padding token, in any layer, so the
        logits of real tokens do not depend on what the padding holds. Give padding targets -100.
        """
        check_tokens("idx", idx, self.config.vocab_size)
        if attend is not None and not callable(attend):
            raise TypeError(f"attend must be None or a callable (layer_index, attn, hidden) -> output, got {attend!r}")
        if key_padding_mask is not None and attend is not None:
            raise ValueError("key_padding_mask is not supported with attend (cached decoding decodes one sequence)")
        if targets is not None:
            check_tokens("targets", targets, self.config.vocab_size, ignore=-100)
            if targets.shape != idx.shape:
                raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
        x = self.embed(idx)  # (B, N, E)
        for i, block in enumerate(self.blocks):
            x = block(
                x, None if attend is None else lambda attn, hidden, i=i: attend(i, attn, hidden), key_padding_mask
            )
        logits = F.linear(self.ln_final(x), self.embed.weight)  # (B, N, V), head tied to the embedding
        if targets is None:
            return logits
        flat = logits.flatten(0, 1)  # (B*N, V)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()  # the softmax of a half-precision autocast run, in float32
        loss = F.cross_entropy(flat, targets.flatten(), ignore_index=-100)
        return logits, loss

    def num_parameters(self):
        return sum(param.numel() for param in self.parameters())


def sequence_parallel(model, group=None):
    """A copy of `model` whose attention layers are `SequenceParallelDilatedAttention` (paper Sec. 3).

    Same weights; embeddings, MLPs, norms and the head act token by token, so each rank runs
    the copy on its own chunk (B, N/P) of the tokens and gets its chunk of the logits. The
    layers use `group` (torch.distributed's default when None); a simulated rank passes its
    communicator per call: `parallel(chunk, attend=lambda i, attn, hidden: attn(hidden, group=comm))`.
    """
    from ..parallel import SequenceParallelDilatedAttention  # imported here: the model itself needs no parallel code
    from ..parallel.comm import as_communicator

    if not isinstance(model, LongNetLM):
        raise TypeError(f"model must be a LongNetLM, got {type(model).__name__}")
    if group is not None:
        as_communicator(group)  # a ValueError naming group now, not at the first forward
    parallel = copy.deepcopy(model)
    for block in parallel.blocks:
        block.attn = SequenceParallelDilatedAttention.from_layer(block.attn, group)
    return parallel
