"""The oracle: dilated attention as ONE dense softmax with a multiplicity bias.

The softmax-denominator merge of branches (LongNet Eq. 10) equals a single softmax over all
keys in which key k is counted c(h, q, k) times, c being the number of branches in which
query q of head h attends k (`patterns.attention_pattern`). Counting a key c times is the
same as adding `log c` to its score (c = 0 gives -inf: masked). Proof sketch, for one row:

    sum_i alpha_i O_i = sum_i (s_i / sum_j s_j) (sum_{k in i} e^{x_k} v_k / s_i)
                      = sum_k c_k e^{x_k} v_k / sum_k c_k e^{x_k}
                      = softmax(x + log c) v.

It is built from positions (broadcasting) and the readable `dense_attention`, so it shares
no code with the strided gathers it checks. It costs O(H N^2): use it for tests and small N.
"""

from __future__ import annotations

import torch

from .attention import dense_attention, repeat_kv_heads
from .checks import check_branches, check_flag, check_head_offsets, check_key_padding_mask, check_qkv
from .patterns import attention_pattern, pattern_rows


def oracle_attention(
    q, k, v, segment_lengths, dilation_rates, *, causal=False, head_offsets="paper", key_padding_mask=None
):
    """Dilated attention of the mixture, computed densely: `softmax(q k^T / sqrt(D) + log c) v`.

    key_padding_mask: None or (B, N) bool; True removes that key from every branch (its c is 0
    for every query). k and v may have H_kv heads dividing H (`repeat_kv_heads`).

    Returns `(out, lse)` like `dense_attention`: out (B, H, N, D), lse (B, H, N); rows that no
    branch covers, or whose keys are all removed, get out 0 and lse -inf.
    """
    check_qkv(q, k, v, grouped=True)
    check_flag("causal", causal)
    key_padding_mask = check_key_padding_mask(key_padding_mask, k)
    B, H, N, D = q.shape
    check_branches(segment_lengths, dilation_rates)
    check_head_offsets(head_offsets)
    k, v = repeat_kv_heads(k, v, H)
    if N == 0 or H == 0:  # nothing to attend: empty out and lse, as scaled_dot_product_attention
        return dense_attention(q, k, v)
    counts = attention_pattern(N, segment_lengths, dilation_rates, H, causal=causal, head_offsets=head_offsets)
    bias = torch.log(counts.to(device=q.device, dtype=q.dtype))[None]  # (1, H, N, N); log 0 = -inf masks
    if key_padding_mask is not None:
        bias = bias.masked_fill(key_padding_mask[:, None, None, :], -torch.inf)  # (B, H, N, N)
    return dense_attention(q, k, v, bias=bias)  # bias broadcast over the batch


def oracle_rows(
    q, k, v, rows, segment_lengths, dilation_rates, *, causal=False, head_offsets="paper", key_padding_mask=None
):
    """The oracle for selected query positions only: `(out (B, H, Q, D), lse (B, H, Q))`.

    Costs O(H Q N): exact checks of a few rows of sequences far too long for `oracle_attention`.
    """
    check_qkv(q, k, v, grouped=True)
    check_flag("causal", causal)
    key_padding_mask = check_key_padding_mask(key_padding_mask, k)
    B, H, N, D = q.shape
    k, v = repeat_kv_heads(k, v, H)
    counts = pattern_rows(N, rows, segment_lengths, dilation_rates, H, causal=causal, head_offsets=head_offsets)
    bias = torch.log(counts.to(device=q.device, dtype=q.dtype))[None]  # (1, H, Q, N)
    if key_padding_mask is not None:
        bias = bias.masked_fill(key_padding_mask[:, None, None, :], -torch.inf)  # (B, H, Q, N)
    rows = torch.as_tensor(rows, dtype=torch.long, device=q.device)
    return dense_attention(q[:, :, rows], k, v, bias=bias)
