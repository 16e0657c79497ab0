"""longnet_ref: an exact, readable reference implementation of LongNet's dilated attention.

Paper: Ding et al., "LongNet: Scaling Transformers to 1,000,000,000 Tokens", arXiv 2307.02486.
Tensors are (B, H, N, D), the layout of `torch.nn.functional.scaled_dot_product_attention`.
"""

from .attention import causal_mask, dense_attention
from .dilated import dilated_branch
from .kernels import fused_attention
from .layer import MultiheadDilatedAttention
from .mixture import dilated_attention, merge_branches
from .oracle import oracle_attention, oracle_rows
from .patterns import attention_pattern, head_groups, head_offset, pattern_rows

__all__ = [
    "MultiheadDilatedAttention",
    "attention_pattern",
    "causal_mask",
    "dense_attention",
    "dilated_attention",
    "dilated_branch",
    "fused_attention",
    "head_groups",
    "head_offset",
    "merge_branches",
    "oracle_attention",
    "oracle_rows",
    "pattern_rows",
]
__version__ = "0.1.0"
