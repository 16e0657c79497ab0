"""Dependency paths: in how many stacked layers information gets from key j to query i (Eqs. 19-20).

What is counted, exactly:
- One attention layer is one *hop*. Information moves from key position j to query position i
  in one hop when some head of some branch lets query i attend key j, i.e. c(h, i, j) > 0 for
  some h (`attention_pattern`). The union over heads is right because the output projection
  mixes all heads before the next layer reads them.
- The residual stream keeps a token's own state, so what has reached position i stays there:
  the set of positions reached from j only grows with depth.
- `distance(j -> i)` is the least number of layers after which i depends on j; infinite when no
  number of layers connects them. Non-causal: all ordered pairs (j, i) with j != i, N (N - 1)
  of them. Causal: pairs with j < i only (information never flows backwards), N (N - 1) / 2.

The paper's estimate (Sec. 2.4): with w_i = w0 a^i, layer t adds w0 a^t to the distance a token
reaches, so after L layers it reaches reach(L) = sum_{t<L} w0 a^t = w0 (a^L - 1) / (a - 1) (Eq. 19),
and covering N tokens takes about L = log_a(N (a - 1) / w0) layers (Eq. 20).

How it scales to N = 2^16 without an N x N matrix: a dilated branch (w, r) splits the positions
it keeps into *classes* (segment m, offset o): class (m, o) holds the positions pos of segment m
with `patterns.keeps(pos, pos, w, r, o)`, and `keeps(q, k, w, r, o)` holds for every two of them
(causal: k <= q). A class is thus the keep rule in gathered form (`branch_classes`, and the
strided view `_Branch.classes`; tests/test_dependency_paths.py checks both against `keeps` over
every pair of small cases). One hop is, per class, an OR over its members (causal: a running OR
along the class in position order), and the reached sets of 64 sources travel together as the
bits of one uint64 word. `path_length_stats` runs this breadth-first search for all N sources, a
batch of 64 * words at a time: memory O(N * words), work O(N^2 k L / 64) for k branches and L
layers; `distances_from` runs it for chosen sources and keeps every distance. Sliding windows
are not classes; `window_path_stats` gives their distribution in closed form.

Shape legend (adds to the package's): G classes of a branch, Noff offsets some head keeps (they
are 0 .. Noff - 1), A classes one hop works on, Nsrc sources, Wd words of source bits per position.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field

import numpy as np

from ..checks import as_count, as_positive_int, check_branch, check_branches, check_flag, check_head_offsets
from ..patterns import as_positions, as_ratio, head_offset

DENSE_FRACTION = 0.25  # above this fraction of busy classes, a hop runs on strided views instead of gathers


def _as_length(name: str, value) -> float:
    """A positive finite number. Eqs. 19-20 are formulas in N: the figures evaluate them on a float grid."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


@dataclass
class PathStats:
    """Distribution of dependency-path lengths over all counted pairs (see the module docstring).

    `counts[d]` is the number of pairs at distance exactly d (counts[0] = 0: a pair has j != i).
    """

    seq_len: int
    causal: bool
    counts: np.ndarray
    unreachable: int
    seconds: float = 0.0
    label: str = ""
    pairs: int = field(init=False)

    def __post_init__(self):
        n = self.seq_len = as_positive_int("seq_len", self.seq_len)
        check_flag("causal", self.causal)
        counts = self.counts
        if not isinstance(counts, np.ndarray) or counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer):
            raise TypeError(f"counts must be a 1-D integer numpy array, got {counts!r}")
        if counts.size and counts.min() < 0:
            raise ValueError(f"counts must not be negative, got {counts.tolist()}")
        self.unreachable = as_count("unreachable", self.unreachable)
        self.pairs = n * (n - 1) // 2 if self.causal else n * (n - 1)
        if int(counts.sum()) + self.unreachable != self.pairs:  # every counted pair has one distance
            raise ValueError(
                f"counts (sum {int(counts.sum())}) and unreachable ({self.unreachable}) must add up to the "
                f"{self.pairs} pairs of seq_len {n} (causal={self.causal})"
            )

    @property
    def max(self) -> float:
        """Longest distance over all pairs: the maximum path length (inf if some pair is never connected)."""
        if self.unreachable:
            return math.inf
        nonzero = np.flatnonzero(self.counts)
        return int(nonzero[-1]) if len(nonzero) else 0

    @property
    def max_reachable(self) -> int:
        """Longest finite distance (ignores unreachable pairs)."""
        nonzero = np.flatnonzero(self.counts)
        return int(nonzero[-1]) if len(nonzero) else 0

    @property
    def mean(self) -> float:
        """Mean distance over the connected pairs."""
        reached = self.counts.sum()
        return float((np.arange(len(self.counts)) * self.counts).sum() / reached) if reached else math.nan


def eq19_reach(layers, w0, ratio) -> float:
    """Eq. 19: distance a token's information travels in L = `layers` layers, w0 (a^L - 1) / (a - 1)."""
    layers, w0, ratio = as_count("layers", layers), as_positive_int("w0", w0), as_ratio(ratio)
    return w0 * (ratio**layers - 1) / (ratio - 1)


def eq19_layers(seq_len, w0, ratio) -> int:
    """Fewest layers L whose Eq. 19 reach spans the sequence, reach(L) >= N - 1."""
    # the loop ends only if the reach grows without bound: w0 >= 1, a >= 2 and N finite
    seq_len, w0, ratio = _as_length("seq_len", seq_len), as_positive_int("w0", w0), as_ratio(ratio)
    layers = 0
    while eq19_reach(layers, w0, ratio) < seq_len - 1:
        layers += 1
    return layers


def eq20_max_path(seq_len, w0, ratio) -> float:
    """Eq. 20: maximum path length L = log_a(N (a - 1) / w0)."""
    seq_len, w0, ratio = _as_length("seq_len", seq_len), as_positive_int("w0", w0), as_ratio(ratio)
    return math.log(seq_len * (ratio - 1) / w0, ratio)


def kept_offsets(num_heads, dilation_rate, head_offsets="paper") -> list[int]:
    """Offsets o some head keeps for dilation rate r (union over heads): always 0, 1, ..., Noff - 1."""
    num_heads = as_positive_int("num_heads", num_heads)  # 0 heads would keep no offset: an empty branch
    dilation_rate = as_positive_int("dilation_rate", dilation_rate)
    check_head_offsets(head_offsets)
    return sorted({head_offset(h, num_heads, dilation_rate, head_offsets) for h in range(num_heads)})


def branch_classes(seq_len, segment_length, dilation_rate, num_heads, head_offsets="paper") -> np.ndarray:
    """Positions of each class of the branch (w, r), union over heads: (G, K), padded with N.

    The keep rule `patterns.keeps` in gathered form: class (m, o), for segment m and an offset o
    that some head has, holds the positions pos = m w + o + i r inside the segment (i = 0, 1, ...),
    exactly those with `keeps(pos, pos, w, r, o)`, in increasing order; `keeps(q, k, w, r, o)` holds
    for every two of them, and for no pair outside a class. Tested equal to `keeps`.
    """
    n = as_positive_int("seq_len", seq_len)
    w, r = check_branch(segment_length, dilation_rate)
    offsets = np.array(kept_offsets(num_heads, r, head_offsets))  # (Noff,); checks num_heads, head_offsets
    S, K = -(-n // w), -(-w // r)
    m = np.arange(S)[:, None, None]  # (S, 1, 1) segment index
    within = offsets[None, :, None] + r * np.arange(K)[None, None, :]  # (1, Noff, K) position inside the segment
    pos = m * w + within  # (S, Noff, K)
    pos = np.where((within < w) & (pos < n), pos, n)  # ragged segment or residue: pad with N
    pos = pos.reshape(-1, K)  # (G, K), G = S * Noff
    return pos[pos[:, 0] < n]  # drop classes with no position at all


@dataclass(frozen=True)
class _Branch:
    """The classes of one branch, as a strided view of the position axis when (w, r) tile N exactly, else an index.

    Both are `patterns.keeps` in gathered form (see `branch_classes`; tested equal to it).
    """

    w: int
    r: int
    kept: int  # Noff: heads keep the offsets 0 .. Noff - 1
    members: np.ndarray | None  # (G, K) positions padded with N; None: use the view

    def classes(self, x):
        """x (N + 1, ...) -> a view (S, K, Noff, ...) of the kept positions: segment m, row i, offset o.

        Entry [m, i, o] is position m w + i r + o: with r | w | N, the rows of class (m, o).
        """
        n = x.shape[0] - 1
        return x[:n].reshape(n // self.w, self.w // self.r, self.r, *x.shape[1:])[:, :, : self.kept]

    def spread(self, frontier, active, out, causal):
        """OR into `out` what the queries of this branch see of the `frontier` bits (one hop).

        Only classes holding a frontier position do any work: late in the search there are few.
        """
        if self.members is None:
            busy = self.classes(active).any(axis=1)  # (S, Noff) classes holding a frontier position
            if busy.mean() > DENSE_FRACTION:  # most classes busy: strided views beat gathering
                bits, target = self.classes(frontier), (self.classes(out), np.s_[:])  # (S, K, Noff, Wd)
            else:
                m, o = np.nonzero(busy)  # (A,) active classes: segment, offset
                bits, target = self.classes(frontier)[m, :, o], (self.classes(out), np.s_[m, :, o])  # (A, K, Wd)
        else:
            members = self.members[active[self.members].any(axis=1)]  # (A, K)
            bits = frontier[members]  # (A, K, Wd)
            target = (out, members)
        if len(bits) == 0:
            return
        if causal:
            # a query sees the keys of its class at or before it: a running OR in position order
            seen = np.bitwise_or.accumulate(bits, axis=1)  # (A, K, Wd)
        else:
            seen = np.bitwise_or.reduce(bits, axis=1, keepdims=True)  # (A, 1, Wd): everyone sees everyone
        view, index = target
        view[index] |= seen  # each position is in one class of a branch: no index repeats but the padding N


def _plan(n, w, r, num_heads, head_offsets):
    offsets = kept_offsets(num_heads, r, head_offsets)
    kept = len(offsets)
    assert offsets == list(range(kept)), "every offset rule keeps the offsets 0 .. Noff - 1"
    if n % w == 0 and w % r == 0:
        return _Branch(w, r, kept, None)
    return _Branch(w, r, kept, branch_classes(n, w, r, num_heads, head_offsets))


def _search(sources, n, words, plans, causal, limit, on_layer):
    """Breadth-first search from up to 64 * words sources at once; calls on_layer(depth, new bits).

    reached (N + 1, Wd): bit src of word src // 64 at row pos says source src reaches position pos (row N is
    padding). A hop is OR-linear, so reached_{t+1} = reached_t | hop(frontier_t), with frontier_t
    the bits that are new at depth t: the search only spreads the frontier.
    """
    bit = np.left_shift(np.uint64(1), np.arange(64, dtype=np.uint64))  # (64,)
    src = np.arange(len(sources))
    reached = np.zeros((n + 1, words), dtype=np.uint64)  # (N + 1, Wd)
    np.bitwise_or.at(reached, (sources, src // 64), bit[src % 64])  # a source listed twice gets both bits
    frontier = reached.copy()
    for layer in range(1, limit + 1):
        active = frontier.any(axis=1)  # (N + 1,) positions with new bits
        nxt = np.zeros_like(reached)
        for plan in plans:
            plan.spread(frontier, active, nxt, causal)
        nxt[n] = 0
        nxt &= ~reached  # new at this depth only
        if not nxt.any():
            return
        on_layer(layer, nxt)
        reached |= nxt
        frontier = nxt


def _setup(seq_len, segment_lengths, dilation_rates, num_heads, head_offsets):
    n = as_positive_int("seq_len", seq_len)
    branches = check_branches(segment_lengths, dilation_rates)
    num_heads = as_positive_int("num_heads", num_heads)
    check_head_offsets(head_offsets)
    w_eff = [(min(w, n), r) for w, r in branches]  # one segment over everything when w >= N
    plans = [_plan(n, w, r, num_heads, head_offsets) for w, r in w_eff if -(-w // r) > 1]  # K = 1 moves nothing
    return n, branches, plans


def path_length_stats(
    seq_len,
    segment_lengths,
    dilation_rates,
    num_heads=1,
    *,
    causal=False,
    head_offsets="paper",
    words=16,
    max_layers=None,
) -> PathStats:
    """Exact distribution of dependency-path lengths of a dilated mixture, over all pairs.

    `segment_lengths=[N], dilation_rates=[1]` is dense attention; one branch `(w, 1)` is local
    segments (pairs in different segments are never connected). Breadth-first search from all N
    sources, 64 * `words` at a time (see the module docstring). `max_layers` stops early; pairs
    not reached by then count as unreachable.
    """
    start = time.perf_counter()
    n, branches, plans = _setup(seq_len, segment_lengths, dilation_rates, num_heads, head_offsets)
    words = as_positive_int("words", words)
    check_flag("causal", causal)
    limit = n if max_layers is None else as_positive_int("max_layers", max_layers)
    counts = np.zeros(limit + 1, dtype=np.int64)

    def count(layer, fresh):  # pairs first connected at this depth
        counts[layer] += int(np.bitwise_count(fresh).sum())

    for first in range(0, n, 64 * words):
        _search(np.arange(first, min(first + 64 * words, n)), n, words, plans, causal, limit, count)
    counts = np.trim_zeros(counts, "b") if counts.any() else counts[:1]
    pairs = n * (n - 1) // 2 if causal else n * (n - 1)
    label = ", ".join(f"({w},{r})" for w, r in branches)
    return PathStats(n, causal, counts, pairs - int(counts.sum()), time.perf_counter() - start, label)


def distances_from(
    seq_len, segment_lengths, dilation_rates, num_heads=1, *, sources, causal=False, head_offsets="paper"
) -> np.ndarray:
    """distance(j -> i) for the given sources j and every position i: int64 (len(sources), N), -1 if never.

    The same search as `path_length_stats`, keeping each distance instead of counting them.
    """
    n, _, plans = _setup(seq_len, segment_lengths, dilation_rates, num_heads, head_offsets)
    check_flag("causal", causal)
    sources = as_positions("sources", sources, n).numpy()  # (Nsrc,) int64
    dist = np.full((len(sources), n), -1, dtype=np.int64)  # (Nsrc, N)
    dist[np.arange(len(sources)), sources] = 0
    for first in range(0, len(sources), 64):
        batch = sources[first : first + 64]
        _search(batch, n, 1, plans, causal, n, _recorder(dist, first, len(batch)))
    return dist


def _recorder(dist, first, size):
    """on_layer for `_search` with one word of sources: write the depth at which each bit appears."""
    n = dist.shape[1]

    def record(layer, fresh):  # fresh (N + 1, 1) uint64
        words = fresh[:n].astype("<u8", copy=False).view(np.uint8)  # (N, 8) bytes, least significant first
        bits = np.unpackbits(words, axis=1, bitorder="little")[:, :size]  # (N, 64): bit src = source first + src
        position, source = np.nonzero(bits)
        dist[first + source, position] = layer

    return record


def window_path_stats(seq_len, window, *, causal=False) -> PathStats:
    """Sliding-window attention, in closed form: query i sees keys j with |i - j| < window (causal: j <= i).

    One layer moves information at most window - 1 positions, so distance(j -> i) =
    ceil(|i - j| / (window - 1)); the maximum is ceil((N - 1) / (window - 1)), about N / window.
    There are N - delta pairs at separation delta in each direction.
    """
    n = as_positive_int("seq_len", seq_len)
    w = as_positive_int("window", window)
    check_flag("causal", causal)
    if w < 2:
        raise ValueError(f"window must be >= 2 (a window of 1 connects nothing), got {window!r}")
    start = time.perf_counter()
    delta = np.arange(1, n, dtype=np.int64)  # (N - 1,) separations
    hops = -(-delta // (w - 1))  # (N - 1,) ceil(delta / (w - 1))
    per_direction = np.bincount(hops, weights=n - delta).astype(np.int64) if n > 1 else np.zeros(1, np.int64)
    counts = per_direction if causal else 2 * per_direction
    return PathStats(n, causal, counts, 0, time.perf_counter() - start, f"window {w}")
