"""longnet_ref: an exact, readable reference implementation of LongNet's dilated attention.

Paper: Ding et al., "LongNet: Scaling Transformers to 1,000,000,000 Tokens", arXiv 2307.02486.
Tensors are (B, H, N, D), the layout of `torch.nn.functional.scaled_dot_product_attention`.

Concept map (where each idea lives; the paper's sections and equations in brackets):

    head offsets o_j            patterns.py   head_offset, head_groups            [Sec. 2.3]
    the keep rule               patterns.py   keeps (the one predicate)           [Eqs. 3-5]
    multiplicity c(h, q, k)     patterns.py   attention_pattern, pattern_rows     [Eq. 10]
    geometric mixtures          patterns.py   geometric_mixture                   [Sec. 2.4]
    dense attention + its lse   attention.py  dense_attention                     [Eqs. 1-2]
    the oracle                  oracle.py     oracle_attention, oracle_rows       [Eq. 10 as one softmax]
    a branch, step by step      dilated.py    segment, sparsify, scatter, readable_branch  [Eqs. 3-8]
    causal inside a segment     dilated.py    readable_branch: kept rows stay in position order, so the
                                              mask is the lower triangle over K rows (fast: the kernel's flag)
    the merge                   mixture.py    merge_branches                      [Eq. 10]
    the entry points            mixture.py    dilated_branch, dilated_attention   (the one place that
                                              picks implementation="fast" or "readable")
    the running merge           fast.py       RunningMerge, RunningSums           [Eq. 10, fused]
    the kernel calls' rows      fast_pieces.py Piece, Call, branch_calls (views; GQA runs)
    kernels, exact backward     kernels.py    fused_attention, attention_backward
    the layer                   layer.py      MultiheadDilatedAttention           [Sec. 2.3]
    input checks                checks.py     every ValueError names its parameter
    all-gather of sparse K, V   parallel/algorithm.py distributed_branch, via parallel/comm.py all_gather  [Sec. 3.1]

    parallel/   sequence parallelism over P devices, simulated in one process or on
                torch.distributed: local branches, all-gather of sparse keys and values [Sec. 3.1];
                consensus.py: every rank raises the same ValueError, or none
    lm/         a small byte-level language model on the layer: train, checkpoint, generate, evaluate,
                and the Table 2 / recall experiment with its report
    analysis/   numbers and pictures about the pattern: FLOPs and memory [Eqs. 16-18], dependency
                paths [Eqs. 19-20], the pattern pictures and the notebooks' explorers
    bench/      `python -m longnet_ref.bench`: measured speed against dense attention

The top level imports nothing from lm/, analysis/ or bench/ (and so neither matplotlib nor
ipywidgets); the readable path (attention, patterns, dilated, the merge) imports nothing from
fast.py, fast_pieces.py or kernels.py.

Notation legend (every module uses these letters with these meanings; a module's own legend
only adds letters):

    B  batch size; b  a batch index   H  query heads; h  a head (c(h, q, k)); in shape tuples,
                                      h is the axis of the heads of one offset group
    N  sequence length                D  head dim; E = H * D  embedding dim
    w  segment length (W in shape tuples)   r  dilation rate (R in shape tuples)
    o  a head's offset, o_j for head j      S = ceil(N / w) segments; m  a segment's index
    K = ceil(w / r) rows kept per segment   c  multiplicity c(h, q, k) of a (query, key) pair
    w0, a  first segment length and ratio of a geometric mixture (w_i = w0 a^i, r_i = a^i)
    lse  log-sum-exp of a row of scores (log of its softmax denominator); s_i = exp(lse_i) the
         denominator of branch i (the paper's s_i, Eq. 10); alpha_i = s_i / sum_j s_j  its merge weight
    P  devices (ranks); p  a rank's index; l = N / P  local length; g  ranks sharing a segment
    pos  a position in the sequence, 0 <= pos < N (a word: p is a rank)
    Q  number of selected query rows (oracle_rows, pattern_rows)
"""

from .attention import causal_mask, dense_attention
from .kernels import fused_attention
from .layer import MultiheadDilatedAttention
from .mixture import dilated_attention, dilated_branch, merge_branches
from .oracle import oracle_attention, oracle_rows
from .patterns import attention_pattern, geometric_mixture, head_groups, head_offset, keeps, pattern_rows

__all__ = [
    "MultiheadDilatedAttention",
    "attention_pattern",
    "causal_mask",
    "dense_attention",
    "dilated_attention",
    "dilated_branch",
    "fused_attention",
    "geometric_mixture",
    "head_groups",
    "head_offset",
    "keeps",
    "merge_branches",
    "oracle_attention",
    "oracle_rows",
    "pattern_rows",
]
__version__ = "0.1.0"
