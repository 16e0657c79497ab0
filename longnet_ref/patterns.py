"""Which (query, key) pairs dilated attention keeps: head offsets and the multiplicity pattern.

Definition (LongNet, arXiv 2307.02486, Sec. 2.2-2.3, Eqs. 3-5): a branch `(w, r)` cuts the
sequence into segments of length `w` (the last one may be shorter) and, inside each segment,
keeps every `r`-th position starting at the head's offset `o_j`. A kept query attends the
kept keys of its own segment. The mixture (Eq. 10) is equivalent to one softmax in which key
`k` is counted `c(h, q, k)` times: once for every branch in which query `q` of head `h` sees it.

Everything here is computed from positions by broadcasting, independently of the strided
gather code in `dilated.py` and `fast.py`: this is what the oracle and the pictures use.

Shape legend: H heads, N sequence length, w segment length, r dilation rate.
"""

from __future__ import annotations

import torch

from .checks import as_positive_int, check_branches, check_head_offsets


def head_offset(head: int, num_heads: int, dilation_rate: int, rule: str = "paper") -> int:
    """Offset `o_j` of head `j` for dilation rate `r`.

    - "paper":      o_j = j mod r (Sec. 2.3), so the heads cover every residue when H >= r;
    - "torchscale": o_j = floor(j / ceil(H / r)), the official code's blocks of heads; when r
      does not divide H some residues are never covered;
    - "none":       o_j = 0 for every head.
    """
    check_head_offsets(rule)
    if rule == "paper":
        return head % dilation_rate
    if rule == "torchscale":
        heads_per_offset = -(-num_heads // dilation_rate)  # ceil(H / r)
        return head // heads_per_offset
    return 0


def head_groups(num_heads: int, dilation_rate: int, rule: str = "paper") -> list[tuple[int, slice]]:
    """Heads that share an offset, as `(offset, slice over heads)`.

    Under all three rules the heads with one offset form an arithmetic progression
    (paper: o, o+r, o+2r, ...; torchscale: a contiguous block; none: all heads), so a slice
    selects them as a view, without an index tensor. That is what lets the fast path hand
    one strided view per group to the fused kernel.
    """
    groups = []
    for offset in sorted({head_offset(j, num_heads, dilation_rate, rule) for j in range(num_heads)}):
        heads = [j for j in range(num_heads) if head_offset(j, num_heads, dilation_rate, rule) == offset]
        step = heads[1] - heads[0] if len(heads) > 1 else 1
        assert heads == list(range(heads[0], heads[-1] + 1, step)), "heads of one offset must be a progression"
        groups.append((offset, slice(heads[0], heads[-1] + 1, step)))
    return groups


def branch_mask(seq_len, segment_length, dilation_rate, num_heads, *, causal=False, head_offsets="paper"):
    """Boolean (H, N, N): True where query q of head h attends key k in the branch `(w, r)`."""
    n = as_positive_int("seq_len", seq_len)
    w, r = segment_length, dilation_rate
    pos = torch.arange(n)  # (N,)
    segment = pos // w  # (N,) which segment each position falls in
    within = pos - segment * w  # (N,) position inside its segment
    offsets = torch.tensor([head_offset(j, num_heads, r, head_offsets) for j in range(num_heads)])  # (H,)
    kept = (within[None, :] % r) == offsets[:, None]  # (H, N): position kept by head h
    same_segment = segment[:, None] == segment[None, :]  # (N, N)
    mask = kept[:, :, None] & kept[:, None, :] & same_segment[None]  # (H, N, N)
    if causal:
        mask &= pos[None, :] <= pos[:, None]  # key not after query
    return mask


def attention_pattern(seq_len, segment_lengths, dilation_rates, num_heads, *, causal=False, head_offsets="paper"):
    """Branch multiplicity c(h, q, k): in how many branches query q of head h attends key k.

    Returns a LongTensor (H, N, N); 0 means the pair is masked. Keys seen by two branches
    count twice, which is exactly how the softmax-denominator merge (Eq. 10) weighs them.
    """
    branches = check_branches(segment_lengths, dilation_rates)
    num_heads = as_positive_int("num_heads", num_heads)
    check_head_offsets(head_offsets)
    n = as_positive_int("seq_len", seq_len)
    counts = torch.zeros(num_heads, n, n, dtype=torch.long)
    for w, r in branches:
        counts += branch_mask(n, w, r, num_heads, causal=causal, head_offsets=head_offsets)
    return counts
