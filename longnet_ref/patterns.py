"""Which (query, key) pairs dilated attention keeps: head offsets and the multiplicity pattern.

Definition (LongNet, arXiv 2307.02486, Sec. 2.2-2.3, Eqs. 3-5): a branch `(w, r)` cuts the
sequence into segments of length `w` (the last one may be shorter) and, inside each segment,
keeps every `r`-th position starting at the head's offset `o_j`. A kept query attends the
kept keys of its own segment. The mixture (Eq. 10) is equivalent to one softmax in which key
`k` is counted `c(h, q, k)` times: once for every branch in which query `q` of head `h` sees it.

Everything here is computed from positions by broadcasting, independently of the strided
gather code in `dilated.py` and `fast.py`: this is what the oracle and the pictures use.

Letters: the package legend (`longnet_ref/__init__.py`).
"""

from __future__ import annotations

import operator

import numpy as np
import torch

from .checks import (
    HEAD_OFFSET_RULES,
    as_positive_int,
    check_branch,
    check_branches,
    check_flag,
    check_head_offsets,
)


def _check_rule(rule) -> str:
    """Like `check_head_offsets`, but the message names `rule`, this module's name for the parameter."""
    if not isinstance(rule, str) or rule not in HEAD_OFFSET_RULES:
        raise ValueError(f"rule must be one of {HEAD_OFFSET_RULES} (a head_offsets rule), got {rule!r}")
    return rule


def _as_index(name: str, value, size: int) -> int:
    """`value` as an int in [0, size); bools and floats refused (head 1.5 or True is a caller's mistake)."""
    try:
        index = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        index = None
    if index is None or not 0 <= index < size:
        raise ValueError(f"{name} must be an integer in [0, {size}), got {value!r}")
    return index


def _check_positions(name: str, value, size: int | None = None):
    """`value`: a non-negative int, or an integer tensor / numpy array of them (all below `size` if given).

    Floats and bools are refused rather than truncated: position 1.5 or True is a caller's mistake.
    """
    bound = f"in [0, {size})" if size is not None else ">= 0"
    if not isinstance(value, (torch.Tensor, np.ndarray)):
        try:
            as_int = None if isinstance(value, bool) else operator.index(value)
        except TypeError:
            as_int = None
        if as_int is None or as_int < 0 or (size is not None and as_int >= size):
            raise ValueError(f"{name} must be an integer position {bound}, got {value!r}")
        return value
    if isinstance(value, torch.Tensor):
        integer = not (value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex)
    else:
        integer = np.issubdtype(value.dtype, np.integer)
    if not integer:
        raise ValueError(f"{name} must hold integer positions {bound}, got dtype {value.dtype}")
    if 0 in tuple(value.shape):  # no position at all
        return value
    low, high = int(value.min()), int(value.max())
    if low < 0 or (size is not None and high >= size):
        raise ValueError(f"{name} must hold integer positions {bound}, got values from {low} to {high}")
    return value


def as_positions(name: str, positions, n: int) -> torch.Tensor:
    """`positions` as a 1-D LongTensor of positions in [0, n): an int, or a 1-D list / array / tensor
    of ints; never floats or bools (1.5 is no row, and truncating it would hide the mistake)."""
    message = f"{name} must be an integer position or a 1-D list of them in [0, {n}), got"
    try:
        rows = torch.as_tensor(positions)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{message} {positions!r}") from None
    if rows.numel() == 0:
        rows = rows.long()  # [] is a float tensor, but holds no position to truncate
    if rows.dtype == torch.bool or rows.dtype.is_floating_point or rows.dtype.is_complex:
        raise ValueError(f"{message} {rows.tolist()} of dtype {rows.dtype}")
    if rows.dim() > 1 or (rows.numel() and (rows.min() < 0 or rows.max() >= n)):  # [[0, 1], [2, 3]] is not flattened
        raise ValueError(f"{message} {rows.tolist()}")
    return rows.long().reshape(-1)


def as_ratio(ratio) -> int:
    """The ratio a of a geometric mixture w_i = w0 a^i, r_i = a^i: an integer >= 2.

    a = 1 never grows the segments (and divides by a - 1 = 0 in Eqs. 18-20); a < 1 shrinks them,
    so a loop "until w covers N" would never end.
    """
    try:
        a = as_positive_int("ratio", ratio)
    except ValueError:
        a = None
    if a is None or a < 2:
        raise ValueError(f"ratio must be an integer >= 2, got {ratio!r}")
    return a


def head_offset(head: int, num_heads: int, dilation_rate: int, rule: str = "paper") -> int:
    """Offset `o_j` of head `j` for dilation rate `r`.

    - "paper":      o_j = j mod r (Sec. 2.3), so the heads cover every residue when H >= r;
    - "torchscale": o_j = floor(j / ceil(H / r)), the official code's blocks of heads; when r
      does not divide H some residues are never covered;
    - "none":       o_j = 0 for every head.
    """
    num_heads = as_positive_int("num_heads", num_heads)
    dilation_rate = as_positive_int("dilation_rate", dilation_rate)
    head = _as_index("head", head, num_heads)  # else a head that does not exist still gets an offset
    _check_rule(rule)
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
    num_heads = as_positive_int("num_heads", num_heads)  # 0 heads would silently give no group at all
    dilation_rate = as_positive_int("dilation_rate", dilation_rate)
    _check_rule(rule)
    groups = []
    for offset in sorted({head_offset(j, num_heads, dilation_rate, rule) for j in range(num_heads)}):
        heads = [j for j in range(num_heads) if head_offset(j, num_heads, dilation_rate, rule) == offset]
        step = heads[1] - heads[0] if len(heads) > 1 else 1
        assert heads == list(range(heads[0], heads[-1] + 1, step)), "heads of one offset must be a progression"
        groups.append((offset, slice(heads[0], heads[-1] + 1, step)))
    return groups


def keeps(query, key, segment_length, dilation_rate, offset, *, causal=False):
    """THE keep rule: does branch `(w, r)` let `query` attend `key`, for a head with offset `o`?

    A branch cuts positions into segments [m w, (m + 1) w) (Eq. 3; the last may be shorter) and,
    in each segment, keeps the positions whose distance to the segment start is o mod r (Eqs. 3-5,
    Sec. 2.3). A pair is kept when both positions are kept and lie in the same segment (Eq. 6);
    causal attention also drops keys after the query. A position pos is a row of the branch at
    all exactly when `keeps(pos, pos, ...)`.

    Works on ints and on broadcasting LongTensors of positions (then returns a bool tensor),
    like attention-gym's `mask_mod(b, h, q_idx, kv_idx)`. Every other place that knows which
    pairs a branch keeps either calls this function or is a gathered form of it that says so
    and is tested equal to it (`dilated.sparsify`, `fast_pieces.Piece`, `parallel.plan.kept_run`,
    `parallel.plan.plan_branches`, `parallel.fused.distributed_calls`, `analysis.complexity`,
    `analysis.dependency_paths`).
    """
    check_flag("causal", causal)
    w, r = check_branch(segment_length, dilation_rate)
    _check_positions("query", query)
    _check_positions("key", key)
    _check_positions("offset", offset, r)  # an offset >= r matches no position: a silently empty branch
    same_segment = (query // w) == (key // w)
    kept = ((query % w) % r == offset) & ((key % w) % r == offset) & same_segment
    if causal:
        kept = kept & (key <= query)  # no key after the query
    return kept


def branch_mask(seq_len, segment_length, dilation_rate, num_heads, *, causal=False, head_offsets="paper", queries=None):
    """Boolean (H, Q, N): `keeps` for every head, query row and key of the branch `(w, r)`.

    `queries` (a 1-D LongTensor of positions) selects query rows; all N by default (Q = N).
    Selecting rows lets the oracle check a few rows of a very long sequence exactly.
    """
    n = as_positive_int("seq_len", seq_len)
    check_branch(segment_length, dilation_rate)
    num_heads = as_positive_int("num_heads", num_heads)
    check_head_offsets(head_offsets)
    check_flag("causal", causal)
    pos = torch.arange(n)  # (N,) key positions
    qpos = pos if queries is None else as_positions("queries", queries, n)  # (Q,)
    offsets = torch.tensor([head_offset(j, num_heads, dilation_rate, head_offsets) for j in range(num_heads)])  # (H,)
    return keeps(
        qpos[None, :, None],  # (1, Q, 1)
        pos[None, None, :],  # (1, 1, N)
        segment_length,
        dilation_rate,
        offsets[:, None, None],  # (H, 1, 1)
        causal=causal,
    )  # (H, Q, N)


def pattern_rows(seq_len, queries, segment_lengths, dilation_rates, num_heads, *, causal=False, head_offsets="paper"):
    """Rows `queries` of `attention_pattern`: LongTensor (H, Q, N), without building N x N."""
    branches = check_branches(segment_lengths, dilation_rates)
    num_heads = as_positive_int("num_heads", num_heads)
    check_head_offsets(head_offsets)
    check_flag("causal", causal)
    n = as_positive_int("seq_len", seq_len)
    queries = as_positions("queries", queries, n)
    counts = torch.zeros(num_heads, len(queries), n, dtype=torch.long)
    for w, r in branches:
        counts += branch_mask(n, w, r, num_heads, causal=causal, head_offsets=head_offsets, queries=queries)
    return counts


def attention_pattern(seq_len, segment_lengths, dilation_rates, num_heads, *, causal=False, head_offsets="paper"):
    """Branch multiplicity c(h, q, k): in how many branches query q of head h attends key k.

    Returns a LongTensor (H, N, N); 0 means the pair is masked. Keys seen by two branches
    count twice, which is exactly how the softmax-denominator merge (Eq. 10) weighs them.
    """
    n = as_positive_int("seq_len", seq_len)
    return pattern_rows(
        n, torch.arange(n), segment_lengths, dilation_rates, num_heads, causal=causal, head_offsets=head_offsets
    )


def geometric_mixture(w0, ratio, *, seq_len=None, branches=None) -> tuple[list[int], list[int]]:
    """The paper's geometric mixture (Sec. 2.4): w_i = w0 a^i, r_i = a^i, as `(ws, rs)`.

    Give exactly one of `seq_len` (branches until one segment covers the sequence: the last w
    is the first one >= N) or `branches` (that many branches).
    """
    w0, a = as_positive_int("w0", w0), as_ratio(ratio)
    if (seq_len is None) == (branches is None):
        raise ValueError(f"give exactly one of seq_len and branches, got seq_len={seq_len!r}, branches={branches!r}")
    if branches is not None:
        count = as_positive_int("branches", branches)
    else:
        n, count = as_positive_int("seq_len", seq_len), 1
        while w0 * a ** (count - 1) < n:
            count += 1
    return [w0 * a**i for i in range(count)], [a**i for i in range(count)]
