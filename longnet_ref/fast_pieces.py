"""The fast path's pieces: which rows of q, k and v each fused-kernel call reads, as views.

For a branch `(w, r)` and the heads that share offset o, the kept rows of every segment are
a strided view, with no copy and no index tensor:

    x[:, heads]                       (B, h, N, D)       heads: a slice (patterns.head_groups)
      [:, :, start : start + S*W]     (B, h, S*W, D)     full segments (the ragged tail is its own piece)
      .unflatten(2, (S, W))           (B, h, S, W, D)    segment, Eq. 3
      [:, :, :, o::r]                 (B, h, S, K, D)    sparsify, Eqs. 3-5

and one fused-kernel call reads it as a batch of B*h "sequences" of S "heads" of K rows (or
B*S of h: `fold`, whichever the strides allow as a view). Outputs go back through the same
views (scatter, Eqs. 7-8).

With grouped-query keys (k, v with H_kv heads) a call's keys are its query heads' kv heads,
also as views (`kv_runs`, `gqa_calls`).

`Piece.view` and `branch_pieces` are a gathered form of the keep rule `patterns.keeps`: the
rows a branch's pieces select for a head are exactly the positions pos with `keeps(pos, pos, w, r, o)`,
and two rows meet in one kernel call exactly when `keeps` pairs them (tests/test_patterns.py).

Letters: the package legend (`longnet_ref/__init__.py`); W = w and R = r in shape tuples.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .patterns import head_groups


@dataclass(frozen=True)
class Piece:
    """Rows that one fused-kernel call attends: one head group, segments of one length.

    In general: S blocks of W rows from `start`, keeping rows offset, offset + R, ... of each
    block. A sequence-parallel rank also uses it for a single run of rows (S = 1, offset 0):
    kept rows first, first + R, ... of its chunk, or R = 1 for a run of gathered keys.
    """

    start: int  # first position covered
    num_segments: int  # S
    segment_length: int  # W (the ragged tail's own length for the last piece)
    offset: int  # o, the heads' offset
    dilation_rate: int  # R
    heads: slice  # heads sharing the offset
    kv_heads: tuple | None = None  # grouped-query keys: (first, step, count) heads of k, v; step 0 repeats one
    groups: int = 1  # offset groups side by side (`merge_offset_groups`): offsets offset, offset + 1, ...
    group_heads: int = 0  # how far apart the heads of consecutive groups start

    def view(self, x):
        """Kept rows of every batch element: (B, H, N, *rest) -> (B, h, S, K, *rest), a view of x.

        With `kv_heads` (first, step, count) it selects those heads of x instead (x is k or v with
        H_kv heads); step 0 is one head read by `count` query heads, a stride-0 view, not a copy.
        With `groups` > 1 it is several offset groups at once (`grouped_view`).
        """
        if self.groups > 1:
            return self.grouped_view(x)
        if self.kv_heads is None:
            heads = x[:, self.heads]
        else:
            first, step, count = self.kv_heads
            heads = (
                x[:, first : first + 1].expand(-1, count, *x.shape[2:]) if step == 0 else x[:, first::step][:, :count]
            )
        rows = heads[:, :, self.start : self.start + self.num_segments * self.segment_length]
        rows = rows.unflatten(2, (self.num_segments, self.segment_length))  # (B, h, S, W, *rest)
        return rows[:, :, :, self.offset :: self.dilation_rate]  # (B, h, S, K, *rest)

    def grouped_view(self, x):
        """`groups` offset groups as one view: (B, H, N, *rest) -> (B, h, G, K, *rest) when S = 1,
        (B, G, S, K, *rest) when each group has one head (h = 1).

        Group g has offset o + g and heads heads.start + g * group_heads + i * heads.step, so the
        element (b, i, g, s, k) of the kept rows lies at
            b sB + (heads.start + g group_heads + i heads.step) sH + (start + s W + o + g + k R) sN:
        the group index has a stride of its own, group_heads sH + sN (a step along the heads and
        one along the rows at once), which no slice can take but as_strided can. With S = 1 or
        h = 1 that leaves two batch-like axes, what one 4-D kernel call takes.
        """
        assert self.kv_heads is None, "offset groups are merged only for calls that read their own keys"
        sB, sH, sN, *rest = x.stride()
        first, step, h, K = self.heads.start, self.heads.step or 1, _num_heads(self), _num_rows(self)
        group = self.group_heads * sH + sN
        if self.num_segments == 1:
            size, stride = (h, self.groups, K), (step * sH, group, self.dilation_rate * sN)
        else:
            size = (self.groups, self.num_segments, K)
            stride = (group, self.segment_length * sN, self.dilation_rate * sN)
        at = x.storage_offset() + first * sH + (self.start + self.offset) * sN
        return x.as_strided((x.shape[0], *size, *x.shape[3:]), (sB, *stride, *rest), at)

    def add_into(self, grad, value):
        """grad[this piece's rows] += value (B, h, S, K, *rest); query heads that share one kv head add up."""
        if self.kv_heads is not None and self.kv_heads[1] == 0 and self.kv_heads[2] > 1:
            one = replace(self, kv_heads=(self.kv_heads[0], 1, 1))
            one.view(grad).add_(value.sum(dim=1, keepdim=True))
        else:
            self.view(grad).add_(value)


# The kernels take 4-D (batch, heads, rows, D) tensors, and a piece's view is 5-D (B, h, S, K, D):
# every (b, head, segment) is an independent attention, so two of B, h, S are folded into the
# kernel's batch axis. One call per piece instead of one per batch element (fewer, larger kernel
# calls; the per-(b, head, segment) arithmetic is unchanged, so results are bit-identical). B is
# folded with h when x's strides allow a view (contiguous (B, H, N, D) and the paper's offsets),
# else with S (the layer's (B, N, H, D).transpose(1, 2) over whole segments); failing both, the
# fold copies the rows, which only kernel inputs ever need.
def fold_axes(x5):
    """Which axis of (B, h, S, K, ...) to fold B with: 1 (h) or 2 (S), a view when x5's strides allow."""
    if x5.shape[0] == 1 or x5.stride(0) == x5.shape[1] * x5.stride(1):
        return 1
    if x5.stride(0) == x5.shape[2] * x5.stride(2):
        return 2
    return 1


def fold(x5, axis):
    """(B, h, S, K, *rest) -> (B*h, S, K, *rest) (axis 1) or (B*S, h, K, *rest) (axis 2)."""
    return (x5 if axis == 1 else x5.transpose(1, 2)).flatten(0, 1)


def folds_as_view(x5):
    """Whether `fold(x5, fold_axes(x5))` is a view of x5 (else it copies the rows)."""
    B, h, S = x5.shape[:3]
    return B == 1 or h == 1 or x5.stride(0) == h * x5.stride(1) or x5.stride(0) == S * x5.stride(2)


def unfold(y, axis, batch):
    """The inverse of `fold`: a kernel result back to (B, h, S, K, *rest)."""
    y = y.unflatten(0, (batch, -1))
    return y if axis == 1 else y.transpose(1, 2)


def branch_pieces(seq_len, num_heads, segment_length, dilation_rate, head_offsets):
    """Split one branch into pieces: full segments, then the ragged last segment if any."""
    N, W, R = seq_len, min(segment_length, seq_len), dilation_rate
    full = N // W
    parts = [(0, full, W)] if full else []
    if N - full * W:
        parts.append((full * W, 1, N - full * W))  # the last segment, shorter than W
    return [
        Piece(start, S, length, offset, R, heads)
        for start, S, length in parts
        for offset, heads in head_groups(num_heads, R, head_offsets)
        if offset < length  # a short tail may hold no row of this offset
    ]


def piece_key_mask(piece, key_padding_mask, num_heads, axis):
    """The piece's keys' padding flags, folded like its keys: (B, N) or per head (B, H, N) -> (B*h, S, K)
    or (B*S, h, K); None stays None."""
    if key_padding_mask is None:
        return None
    if key_padding_mask.dim() == 2:
        key_padding_mask = key_padding_mask[:, None, :].expand(-1, num_heads, -1)  # (B, H, N), a view
    return fold(piece.view(key_padding_mask), axis)  # (B, h, S, K) folded (a small copy: B*N/R flags)


@dataclass(frozen=True)
class Call:
    """One fused-kernel call of a running merge: rows of q attend rows of one key/value source.

    `queries` selects rows of q (and of the merged out and lse they update); `keys` selects
    rows of source `source`: 0 is (k, v) themselves, i >= 1 the i-th extra (keys, values)
    tensor (the sequence-parallel rank's gathered keys, `parallel/fused.py`).
    """

    queries: Piece
    keys: Piece
    source: int
    causal: bool


def kv_runs(heads, num_heads, group):
    """Grouped-query attention: split a piece's query heads into runs whose kv heads (head j reads
    kv head j // group) form one arithmetic progression: [(query heads slice, (first, step, count))]."""
    js = list(range(num_heads))[heads]
    step_q = heads.step or 1
    runs, i = [], 0
    while i < len(js):
        first = js[i] // group
        step = js[i + 1] // group - first if i + 1 < len(js) else 1
        end = i + 1
        while end < len(js) and js[end] // group == first + (end - i) * step:
            end += 1
        runs.append((slice(js[i], js[end - 1] + 1, step_q), (first, step, end - i)))
        i = end
    return runs


def gqa_calls(piece, causal, num_heads, num_kv_heads, batch):
    """The calls of one piece whose keys come from k, v with `num_kv_heads` heads (`kv_runs`).

    A run of query heads that all read one kv head is one call with a stride-0 view of it when
    B = 1 (the kernel's batch axis is then the heads'), else one call per query head: folding
    B with a repeated head is no view, and a copy of k's rows is what grouped-query attention
    is there to avoid.
    """
    if num_kv_heads == num_heads:
        return [Call(piece, piece, 0, causal)]
    calls = []
    for heads, (first, step, count) in kv_runs(piece.heads, num_heads, num_heads // num_kv_heads):
        if step == 0 and count > 1 and batch > 1:
            for i in range(count):
                one = slice(heads.start + i * heads.step, heads.start + i * heads.step + 1)
                calls.append(
                    Call(replace(piece, heads=one), replace(piece, heads=one, kv_heads=(first, 1, 1)), 0, causal)
                )
        else:
            calls.append(
                Call(replace(piece, heads=heads), replace(piece, heads=heads, kv_heads=(first, step, count)), 0, causal)
            )
    return calls


def branch_calls(seq_len, num_heads, branches, causal, head_offsets, num_kv_heads=None, batch=1):
    """The calls of a mixture on one device: every piece of every branch attends its own rows
    (its own kv heads' rows with grouped-query keys, `gqa_calls`)."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    return [
        call
        for w, r in branches
        for piece in branch_pieces(seq_len, num_heads, w, r, head_offsets)
        for call in gqa_calls(piece, causal, num_heads, num_kv_heads, batch)
    ]


def merge_offset_groups(calls, tensors):
    """Calls of one piece's offset groups merged into one call where one view can hold them.

    `branch_pieces` makes a piece per group of heads that share an offset (15 kernel calls for
    branches r = 1, 2, 4, 8 over 8 heads). Group g's rows are offset + g, + R, ... and its heads
    start g * group_heads further on, so consecutive groups are one strided view
    (`Piece.grouped_view`) when they have as many heads and rows each, and S = 1 or one head
    per group. Merged only when that view folds into the kernel's 4-D batch without a copy for
    every tensor in `tensors` (q, k, v): a copy of the rows would cost more than the calls saved.
    The kernel attends each (batch, head) on its own, so the forward is bit-identical; the
    backward's gradients agree to rounding (tests/test_dilated.py). Fewer, larger calls: at
    N = 16384 the bench's mixture takes 8 calls instead of 15, the LM's recall mixture 6 per layer
    instead of 15.
    """
    merged, i = [], 0
    while i < len(calls):
        run = _group_run(calls, i)
        if len(run) > 1:
            head = run[0].queries
            piece = replace(head, groups=len(run), group_heads=run[1].queries.heads.start - head.heads.start)
            if all(folds_as_view(piece.view(x)) for x in tensors):
                merged.append(Call(piece, piece, 0, run[0].causal))
                i += len(run)
                continue
        merged.append(calls[i])
        i += 1
    return merged


def _group_run(calls, i):
    """The longest run of calls from i that `merge_offset_groups` may put side by side."""
    first, p = calls[i], calls[i].queries
    if not _mergeable(first, first) or (p.num_segments > 1 and _num_heads(p) > 1):
        return [first]
    run = [first]
    for call in calls[i + 1 :]:
        q, g = call.queries, len(run)
        if not _mergeable(call, first) or q.offset != p.offset + g or _num_heads(q) != _num_heads(p):
            break
        if g > 1 and q.heads.start - run[-1].queries.heads.start != run[1].queries.heads.start - p.heads.start:
            break  # the groups' first heads must be evenly spaced (group_heads)
        run.append(call)
    return run


def _mergeable(call, first):
    """call reads its own rows of k, v (not a GQA or gathered source), laid out as `first`'s."""
    q, p = call.queries, first.queries
    layout = (q.start, q.num_segments, q.segment_length, q.dilation_rate, q.heads.step, _num_rows(q))
    same = layout == (p.start, p.num_segments, p.segment_length, p.dilation_rate, p.heads.step, _num_rows(p))
    return same and call.source == 0 and call.keys == q and q.kv_heads is None and call.causal == first.causal


def _num_heads(piece):
    return len(range(piece.heads.start, piece.heads.stop, piece.heads.step or 1))


def _num_rows(piece):
    return len(range(piece.offset, piece.segment_length, piece.dilation_rate))  # K
