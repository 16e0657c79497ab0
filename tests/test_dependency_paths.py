"""Dependency paths: the structured search against a brute-force BFS on attention_pattern's N x N graph."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from longnet_ref import attention_pattern, geometric_mixture, head_offset, keeps
from longnet_ref.analysis import dependency_paths
from longnet_ref.analysis.dependency_paths import (
    PathStats,
    branch_classes,
    distances_from,
    eq19_layers,
    eq19_reach,
    eq20_max_path,
    kept_offsets,
    path_length_stats,
    window_path_stats,
)
from longnet_ref.checks import HEAD_OFFSET_RULES


def bfs_distances(adjacent: torch.Tensor) -> torch.Tensor:
    """All-pairs hop counts from a boolean (N query, N key) one-layer graph; -1 when never connected.

    dist[j, i]: layers until query i depends on key j. Reached sets grow by one boolean
    matrix product per layer (the residual keeps what was reached).
    """
    n = adjacent.shape[0]
    step = (adjacent | torch.eye(n, dtype=torch.bool)).T.double()  # step[j, i]: i attends j
    reach = torch.eye(n, dtype=torch.bool)
    dist = torch.where(reach, 0, -1)
    for layer in range(1, n + 1):
        new = (reach.double() @ step) > 0
        if torch.equal(new, reach):
            break
        dist[new & ~reach] = layer
        reach = new
    return dist


def histogram(dist: torch.Tensor, causal: bool):
    """(counts[d], unreachable) over the pairs dependency_paths counts: j != i, and j < i when causal."""
    n = dist.shape[0]
    pairs = ~torch.eye(n, dtype=torch.bool)
    if causal:
        pairs &= torch.ones(n, n, dtype=torch.bool).triu(1)  # dist[j, i] with j < i
    values = dist[pairs]
    return np.bincount(values[values >= 0].numpy(), minlength=1), int((values < 0).sum())


def brute_force(n, ws, rs, heads, causal, rule):
    adjacent = attention_pattern(n, ws, rs, heads, causal=causal, head_offsets=rule).sum(0) > 0  # union over heads
    return histogram(bfs_distances(adjacent), causal)


def same_counts(a, b):
    size = max(len(a), len(b))
    return np.array_equal(np.pad(a, (0, size - len(a))), np.pad(b, (0, size - len(b))))


branch = st.integers(1, 48).flatmap(lambda w: st.tuples(st.just(w), st.integers(1, w)))  # (w, r <= w)
configs = st.integers(1, 40).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.lists(
            st.integers(1, 48).flatmap(lambda w: st.tuples(st.just(w), st.integers(1, w))), min_size=1, max_size=3
        ),
        st.integers(1, 5),
        st.booleans(),
        st.sampled_from(["paper", "torchscale", "none"]),
    )
)


@given(configs, st.sampled_from([0.25, -1.0, 2.0]))
def test_matches_brute_force_any_configuration(config, dense_fraction):
    n, branches, heads, causal, rule = config
    ws, rs = [w for w, _ in branches], [r for _, r in branches]
    saved = dependency_paths.DENSE_FRACTION
    dependency_paths.DENSE_FRACTION = dense_fraction  # -1: always views, 2: always gathers
    try:
        stats = path_length_stats(n, ws, rs, heads, causal=causal, head_offsets=rule, words=1)
    finally:
        dependency_paths.DENSE_FRACTION = saved
    counts, unreachable = brute_force(n, ws, rs, heads, causal, rule)
    assert same_counts(stats.counts, counts) and stats.unreachable == unreachable


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("w0, ratio, heads, rule", [(4, 2, 1, "paper"), (2, 2, 4, "paper"), (8, 4, 3, "torchscale")])
def test_geometric_mixtures_match_brute_force(w0, ratio, heads, rule, causal):
    for n in (16, 64, 128):  # powers of two: every branch takes the strided-view path
        ws, rs = geometric_mixture(w0, ratio, seq_len=n)
        stats = path_length_stats(n, ws, rs, heads, causal=causal, head_offsets=rule, words=2)
        counts, unreachable = brute_force(n, ws, rs, heads, causal, rule)
        assert same_counts(stats.counts, counts) and stats.unreachable == unreachable


def test_batches_of_sources_add_up():
    # 70 sources with words=1: two batches, the second partial
    n, ws, rs = 70, [8, 16, 70], [1, 2, 4]
    small = path_length_stats(n, ws, rs, 4, words=1)
    large = path_length_stats(n, ws, rs, 4, words=4)
    counts, unreachable = brute_force(n, ws, rs, 4, False, "paper")
    assert same_counts(small.counts, counts) and same_counts(large.counts, counts) and small.unreachable == unreachable


@pytest.mark.parametrize("causal", [False, True])
def test_dense_is_one_hop(causal):
    stats = path_length_stats(50, [50], [1], 1, causal=causal)
    pairs = 50 * 49 // (2 if causal else 1)
    assert stats.counts.tolist() == [0, pairs] and stats.max == 1 and stats.pairs == pairs


def test_local_segments_never_cross():
    n, w = 100, 30  # segments 30, 30, 30, 10
    stats = path_length_stats(n, [w], [1], 2)
    within = sum(s * (s - 1) for s in (30, 30, 30, 10))
    assert stats.counts.tolist() == [0, within] and stats.unreachable == n * (n - 1) - within
    assert stats.max == math.inf and stats.max_reachable == 1


@pytest.mark.parametrize("n, window", [(1, 2), (2, 2), (37, 2), (64, 5), (100, 40), (30, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_window_closed_form_matches_brute_force(n, window, causal):
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    adjacent = (i - j).abs() < window  # (N query, N key)
    if causal:
        adjacent &= j <= i
    counts, unreachable = histogram(bfs_distances(adjacent), causal)
    stats = window_path_stats(n, window, causal=causal)
    assert same_counts(stats.counts, counts) and unreachable == 0
    assert stats.max == (math.ceil((n - 1) / (window - 1)) if n > 1 else 0)


def test_statistics():
    stats = window_path_stats(10, 4)  # distance ceil(d / 3)
    d = np.abs(np.arange(10)[:, None] - np.arange(10)[None, :])
    hops = -(-d[d > 0] // 3)
    assert stats.mean == pytest.approx(hops.mean()) and stats.max == hops.max() == 3


def test_geometric_mixture_until_one_segment_covers_n():
    # the mixtures the figures and explorers search: w_i = w0 a^i, r_i = a^i up to the first w >= N
    assert geometric_mixture(2048, 2, seq_len=32768) == ([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16])
    assert geometric_mixture(64, 4, seq_len=1000) == ([64, 256, 1024], [1, 4, 16])
    assert geometric_mixture(64, 2, seq_len=10) == ([64], [1])  # one segment already covers N
    with pytest.raises(ValueError, match="ratio"):
        geometric_mixture(4, 1, seq_len=100)
    with pytest.raises(ValueError, match="w0"):
        geometric_mixture(0, 2, seq_len=100)


def keep_union(n, w, r, heads, rule, causal):
    """(N query, N key) bool: pairs that `keeps` lets some head attend in the branch (w, r)."""
    pos = np.arange(n)
    offsets = np.array([head_offset(j, heads, r, rule) for j in range(heads)])  # (H,)
    return keeps(pos[None, :, None], pos[None, None, :], w, r, offsets[:, None, None], causal=causal).any(0)


def class_union(members, n, causal):
    """(N query, N key) bool: every two positions of one class (causal: key <= query)."""
    adjacent = np.zeros((n + 1, n + 1), dtype=bool)  # row and column N: the padding
    adjacent[members[:, :, None], members[:, None, :]] = True  # (G, K, K) pairs inside each class
    adjacent = adjacent[:n, :n]
    return adjacent & np.tri(n, dtype=bool) if causal else adjacent


@pytest.mark.parametrize("rule", HEAD_OFFSET_RULES)
def test_classes_are_keeps_gathered_exhaustively(rule):
    # branch_classes is the keep rule in gathered form: class (m, o) is the positions p of segment m
    # with keeps(p, p, w, r, o), and the pairs inside classes are exactly the pairs keeps allows
    for n in range(1, 21):
        for w in range(1, n + 3):
            for r in range(1, w + 1):
                for heads in range(1, 6):
                    members = branch_classes(n, w, r, heads, rule)  # (G, K) padded with N
                    pos = np.arange(n)
                    expected = sorted(
                        tuple(pos[keeps(pos, pos, w, r, o) & (pos // w == m)].tolist())
                        for m in range(-(-n // w))
                        for o in kept_offsets(heads, r, rule)
                    )
                    got = sorted(tuple(p for p in row if p < n) for row in members.tolist())
                    assert got == [c for c in expected if c], (n, w, r, heads)
                    for causal in (False, True):
                        union = class_union(members, n, causal)
                        assert np.array_equal(union, keep_union(n, w, r, heads, rule, causal)), (n, w, r, heads, causal)


@pytest.mark.parametrize("rule", HEAD_OFFSET_RULES)
def test_strided_classes_are_keeps_gathered_exhaustively(rule):
    # when r | w | N the search reads the classes as a strided view: entry [m, i, o] = m w + i r + o
    for n in range(1, 33):
        for w in (d for d in range(1, n + 1) if n % d == 0):
            for r in (d for d in range(1, w + 1) if w % d == 0):
                for heads in range(1, 6):
                    plan = dependency_paths._plan(n, w, r, heads, rule)
                    assert plan.members is None
                    view = plan.classes(np.arange(n + 1))  # (S, K, O)
                    members = np.moveaxis(view, 1, 2).reshape(-1, view.shape[1])  # (S * O, K)
                    gathered = branch_classes(n, w, r, heads, rule)  # the same classes, by index
                    assert sorted(map(tuple, members.tolist())) == sorted(map(tuple, gathered.tolist()))
                    for causal in (False, True):
                        union = class_union(members, n, causal)
                        assert np.array_equal(union, keep_union(n, w, r, heads, rule, causal)), (n, w, r, heads, causal)


def test_paper_equations():
    # Eq. 20 with w0 = 2048, a = 2: log2(32768 / 2048) = 4 layers at N = 32768, about 19 at N = 1e9
    assert eq20_max_path(32768, 2048, 2) == pytest.approx(4)
    assert round(eq20_max_path(1e9, 2048, 2)) == 19
    assert eq19_reach(3, 2048, 2) == 2048 + 4096 + 8192
    # the fewest layers whose reach covers N agrees with Eq. 20 rounded up, up to the -1 of Eq. 19
    for n in (2**12, 2**15, 10**6, 10**9):
        layers = eq19_layers(n, 2048, 2)
        assert eq19_reach(layers, 2048, 2) >= n - 1 > eq19_reach(layers - 1, 2048, 2)
        assert layers - 1 <= eq20_max_path(n, 2048, 2) <= layers + 1


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: path_length_stats(0, [4], [1]), "seq_len"),
        (lambda: path_length_stats(10, [4], [5]), "dilation_rate"),
        (lambda: path_length_stats(10, [4], [1], 0), "num_heads"),
        (lambda: path_length_stats(10, [4], [1], head_offsets="odd"), "head_offsets"),
        (lambda: path_length_stats(10, [4], [1], words=0), "words"),
        (lambda: window_path_stats(10, 1), "window"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.timeout(10)  # w0 = 0 and ratio = 0.5 used to loop forever
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: eq19_layers(64, 0, 2), "w0 must be a positive integer, got 0"),
        (lambda: eq19_layers(64, 4, 0.5), "ratio must be an integer >= 2, got 0.5"),
        (lambda: eq19_layers(64, 4, 1), "ratio must be an integer >= 2, got 1"),  # was ZeroDivisionError
        (lambda: eq19_layers(math.inf, 4, 2), "seq_len must be a positive finite number, got inf"),
        (lambda: eq19_layers(math.nan, 4, 2), "seq_len must be a positive finite number, got nan"),
        (lambda: eq19_layers(0, 4, 2), "seq_len must be a positive finite number, got 0"),
        (lambda: eq19_reach(3, 4, 1), "ratio must be an integer >= 2, got 1"),
        (lambda: eq19_reach(-1, 4, 2), "layers must be a non-negative integer, got -1"),  # was -2.0
        (lambda: eq19_reach(2.5, 4, 2), "layers must be a non-negative integer, got 2.5"),
        (lambda: eq19_reach(3, -4, 2), "w0 must be a positive integer, got -4"),
        (lambda: eq20_max_path(64, 0, 2), "w0 must be a positive integer, got 0"),  # was ZeroDivisionError
        (lambda: eq20_max_path(0, 4, 2), "seq_len must be a positive finite number, got 0"),  # math domain error
        (lambda: eq20_max_path(64, 4, -2), "ratio must be an integer >= 2, got -2"),
        (lambda: kept_offsets(4, 0), "dilation_rate must be a positive integer, got 0"),
        (lambda: kept_offsets(0, 2), "num_heads must be a positive integer, got 0"),  # was []
        (lambda: branch_classes(16, 0, 2, 2), "segment_length must be a positive integer, got 0"),
        (lambda: branch_classes(16, 8, 16, 2), "dilation_rate 16 is larger than segment_length 8"),
        (lambda: branch_classes(0, 8, 2, 2), "seq_len must be a positive integer, got 0"),
    ],
)
def test_equations_and_classes_refuse_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_equations_take_a_float_sequence_length():
    # the figures evaluate Eqs. 19-20 on a float grid of N
    assert eq19_layers(1000.0, 4, 2) == eq19_layers(1000, 4, 2) and eq19_layers(1, 4, 2) == 0
    assert eq20_max_path(np.float64(64.0), 4, 2) == pytest.approx(4) and eq19_reach(0, 4, 2) == 0


@pytest.mark.parametrize("sources", [[1.5], [0.9], 3.7, [[0, 1], [2, 3]], "x", [True], [math.nan], None])
def test_distances_from_refuses_non_integer_sources(sources):
    # 1.5 used to be truncated to 1 and a 2-D list flattened: now refused
    with pytest.raises(ValueError, match=r"sources must be an integer position or a 1-D list of them in \[0, 32\)"):
        distances_from(32, [8, 16], [1, 2], 2, sources=sources)


def test_distances_from_takes_integer_lists_arrays_and_one_position():
    want = distances_from(32, [8, 16], [1, 2], 2, sources=[0, 5])
    assert np.array_equal(distances_from(32, [8, 16], [1, 2], 2, sources=np.array([0, 5])), want)
    assert np.array_equal(distances_from(32, [8, 16], [1, 2], 2, sources=torch.tensor([0, 5])), want)
    assert np.array_equal(distances_from(32, [8, 16], [1, 2], 2, sources=5), want[1:])
    assert distances_from(32, [8, 16], [1, 2], 2, sources=[]).shape == (0, 32)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(counts=np.array([0, 5])), ValueError, "counts .* and unreachable .* must add up to the 12 pairs"),
        (dict(counts=[0, 12]), TypeError, r"counts must be a 1-D integer numpy array, got \[0, 12\]"),
        (dict(counts=np.array([0.0, 12.0])), TypeError, "counts must be a 1-D integer numpy array"),
        (dict(counts=np.array([0, 14, -2])), ValueError, "counts must not be negative"),
        (dict(seq_len=-3), ValueError, "seq_len must be a positive integer, got -3"),
        (dict(unreachable=-1, counts=np.array([0, 13])), ValueError, "unreachable must be a non-negative integer"),
        (dict(causal="False"), TypeError, "causal must be True or False"),
    ],
)
def test_path_stats_refuses_inconsistent_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        PathStats(**{**dict(seq_len=4, causal=False, counts=np.array([0, 12]), unreachable=0), **kwargs})


def test_max_layers_stops_early():
    ws, rs = geometric_mixture(2, 2, seq_len=64)
    full = path_length_stats(64, ws, rs, 1)
    cut = path_length_stats(64, ws, rs, 1, max_layers=2)
    assert full.max > 2 and cut.counts.tolist() == full.counts[:3].tolist()
    assert cut.unreachable == full.counts[3:].sum()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "n, ws, rs, heads, rule",
    [(64, [4, 8, 16, 32, 64], [1, 2, 4, 8, 16], 1, "paper"), (70, [6, 20, 70], [1, 3, 7], 4, "torchscale")],
)
def test_distances_from_match_brute_force(n, ws, rs, heads, rule, causal):
    adjacent = attention_pattern(n, ws, rs, heads, causal=causal, head_offsets=rule).sum(0) > 0
    expected = bfs_distances(adjacent)  # (N, N): [j, i]
    sources = [0, 5, n - 1, 33, 5, *range(n)]  # repeats, and more than one word (64) of sources
    got = distances_from(n, ws, rs, heads, sources=sources, causal=causal, head_offsets=rule)
    assert np.array_equal(got, expected[sources].numpy())
    with pytest.raises(ValueError, match="sources"):
        distances_from(n, ws, rs, heads, sources=[n])
