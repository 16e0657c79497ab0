"""Sequence parallelism, simulated in one process (LongNet Sec. 3.1): exact, accounted, fault-safe.

Every test runs the same per-rank code as torch.distributed (tests/test_parallel_distributed.py
runs it on real gloo processes), with each rank a thread of a `SimulatedGroup`.
"""

import inspect
import math
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import rand_qkv

from longnet_ref import (
    MultiheadDilatedAttention,
    dense_attention,
    dilated_attention,
    fused_attention,
    head_offset,
    keeps,
    oracle_attention,
)
from longnet_ref.parallel import (
    SequenceParallelDilatedAttention,
    SimulatedGroup,
    plan_branches,
    sequence_parallel_attention,
    simulate_sequence_parallel,
)
from longnet_ref.parallel.fused import distributed_calls, key_runs, sparse_rows
from longnet_ref.parallel.plan import kept_run

# (world size P, segment lengths, dilation rates, what it exercises); N = 64 everywhere.
CONFIGS = [
    (1, [8, 32, 64], [1, 2, 4], "one rank: every branch local"),
    (2, [8, 32, 64, 128], [1, 2, 4, 8], "P = 2: local branches, one segment over both ranks, w > N"),
    (4, [8, 32], [1, 2], "a segment spanning 2 of 4 ranks"),
    (4, [16, 64], [1, 4], "a segment spanning all 4 ranks"),
    (4, [16, 256], [2, 8], "w > N: one segment over all ranks"),
    (8, [8, 32, 64, 128], [1, 2, 4, 8], "P = 8: segments over 4 and 8 ranks, w > N"),
    (8, [48], [3], "ragged last segment (N % w != 0): 6 ranks, then 2"),
    (8, [32, 64], [3, 16], "r does not divide l (padded rows), r > l (ranks with no row)"),
    (8, [40], [3], "ragged: segments of 5 ranks, then a last one of 3"),
    (8, [56], [20], "a last segment of one rank that is not local; r > l"),
    (4, [16, 64], [16, 64], "r >= l: ranks with no call at all"),
]


def grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def assert_matches_single_device(
    P, ws, rs, *, causal, dtype, tol, H=4, head_offsets="paper", B=2, N=64, D=8, implementation="fast"
):
    q, k, v = rand_qkv(B, H, N, D, dtype=dtype, requires_grad=True)
    out, _ = simulate_sequence_parallel(
        q, k, v, P, ws, rs, causal=causal, head_offsets=head_offsets, implementation=implementation
    )
    ref = dilated_attention(q, k, v, ws, rs, causal=causal, head_offsets=head_offsets)
    torch.testing.assert_close(out, ref, rtol=0, atol=tol)
    dout = torch.randn_like(out)
    for got, want in zip(grads(out, (q, k, v), dout), grads(ref, (q, k, v), dout)):
        torch.testing.assert_close(got, want, rtol=0, atol=tol)


@pytest.mark.parametrize("implementation", ["fast", "readable"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("P, ws, rs, what", CONFIGS, ids=[c[3] for c in CONFIGS])
def test_simulated_equals_single_device_float64(P, ws, rs, what, causal, implementation):
    assert_matches_single_device(
        P, ws, rs, causal=causal, dtype=torch.float64, tol=1e-10, implementation=implementation
    )


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("P", [2, 4, 8])
def test_simulated_equals_single_device_float32(P, causal):
    assert_matches_single_device(P, [8, 32, 64, 128], [1, 2, 4, 8], causal=causal, dtype=torch.float32, tol=1e-5)


@pytest.mark.parametrize("implementation", ["fast", "readable"])
@pytest.mark.parametrize("head_offsets", ["torchscale", "none"])
def test_simulated_other_head_offset_rules(head_offsets, implementation):
    # H = 6 with r = 4: the torchscale rule leaves residue 3 uncovered; rows no head keeps stay 0.
    assert_matches_single_device(
        4, [16, 64], [2, 4], causal=True, dtype=torch.float64, tol=1e-10, H=6, head_offsets=head_offsets,
        implementation=implementation,
    )  # fmt: skip


@pytest.mark.parametrize("implementation", ["fast", "readable"])
def test_simulated_equals_the_oracle(implementation):
    """Independent of `dilated_attention`: the dense softmax with multiplicity bias log c."""
    q, k, v = rand_qkv(1, 4, 64, 8, requires_grad=True)
    ws, rs = [8, 32, 128], [1, 2, 8]
    out, _ = simulate_sequence_parallel(q, k, v, 4, ws, rs, causal=True, implementation=implementation)
    ref, _ = oracle_attention(q, k, v, ws, rs, causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    dout = torch.randn_like(out)
    for got, want in zip(grads(out, (q, k, v), dout), grads(ref, (q, k, v), dout)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_return_lse_is_the_merged_log_sum_exp():
    q, k, v = rand_qkv(1, 4, 64, 8)
    ws, rs = [16, 64], [1, 4]
    _, ref_lse = dilated_attention(q, k, v, ws, rs, causal=True, return_lse=True)
    chunks = [tuple(x.chunk(4, dim=2)[p] for x in (q, k, v)) for p in range(4)]
    results = SimulatedGroup(4).run(
        lambda comm: sequence_parallel_attention(*chunks[comm.rank], ws, rs, causal=True, group=comm, return_lse=True)
    )
    torch.testing.assert_close(torch.cat([lse for _, lse in results], dim=2), ref_lse, rtol=0, atol=1e-10)


@pytest.mark.parametrize("implementation", ["fast", "readable"])
def test_gradients_through_out_and_lse(implementation):
    """A loss on the merged lse as well as on out (and on lse alone) is differentiated exactly."""
    q, k, v = rand_qkv(2, 4, 64, 8, requires_grad=True)
    ws, rs = [8, 32, 64], [1, 2, 4]
    ref = dilated_attention(q, k, v, ws, rs, causal=True, return_lse=True)
    douts = torch.randn_like(ref[0]), torch.randn_like(ref[1])
    chunks = [tuple(x.detach().chunk(4, dim=2)[p].requires_grad_() for x in (q, k, v)) for p in range(4)]

    def rank(comm, use_out):
        out, lse = sequence_parallel_attention(
            *chunks[comm.rank], ws, rs, causal=True, group=comm, return_lse=True, implementation=implementation
        )
        p = comm.rank
        loss = (lse * douts[1].chunk(4, dim=2)[p]).sum()
        if use_out:
            loss = loss + (out * douts[0].chunk(4, dim=2)[p]).sum()
        return torch.autograd.grad(loss, chunks[p])

    for use_out in (True, False):
        loss = (ref[1] * douts[1]).sum() + ((ref[0] * douts[0]).sum() if use_out else 0)
        want = torch.autograd.grad(loss, (q, k, v), retain_graph=True)
        got = SimulatedGroup(4).run(lambda comm, use_out=use_out: rank(comm, use_out))
        for i in range(3):
            torch.testing.assert_close(
                torch.cat([rank_grads[i] for rank_grads in got], dim=2), want[i], rtol=0, atol=1e-10
            )


def test_key_runs_skip_padding_and_empty_ranks():
    # n_kept = 4 rows per rank slot; rank 1 holds 3 real rows (one padding row), rank 2 none
    assert key_runs([4, 3, 0, 4], 4, range(4)) == [(0, 7), (12, 4)]
    assert key_runs([4, 4, 4], 4, range(3)) == [(0, 12)]  # no padding: one block, one kernel call
    assert key_runs([4, 4, 4], 4, range(0)) == []  # the first rank of a causal segment: no earlier keys


# ---------------------------------------------------------------- the keep rule, gathered


def test_kept_run_is_the_keep_rule():
    """`plan.kept_run` is a gathered form of `patterns.keeps`: its run is the rows x with keeps(x, x, w, r, o)."""
    for w in range(1, 11):
        for r in range(1, w + 1):
            for offset in range(r):
                for start in range(w):  # the chunk's first position, counted from its segment's start
                    for length in range(w - start + 1):  # the chunk stays inside its segment
                        first, count = kept_run(start, length, r, offset)
                        for m in (0, 3):  # segment m: positions count from the segment's start
                            x0 = m * w + start
                            want = [i for i in range(length) if keeps(x0 + i, x0 + i, w, r, offset)]
                            got = list(range(first, first + count * r, r))
                            assert got == want, (start, length, r, offset, w, m)


def test_plan_ranks_are_the_ranks_of_one_segment():
    """`plan_branches`: the ranks j sharing rank p's segment are those with keeps(j l, p l, w, 1, 0) (Eq. 3)."""
    for P in range(1, 9):
        for l in range(1, 5):
            N = P * l
            ws = [w for w in range(1, 2 * N + 1) if l % min(w, N) == 0 or min(w, N) % l == 0]  # checked ones
            for p in range(P):
                for w, plan in zip(ws, plan_branches(p, P, l, [(w, 1) for w in ws])):
                    assert plan.segment_length == min(w, N) and plan.local_length == l
                    assert plan.local == (min(w, N) <= l)
                    assert plan.ranks == tuple(j for j in range(P) if keeps(j * l, p * l, w, 1, 0)), (P, l, w, p)


def kept_positions(rank, plan, offset):
    """Positions of the rows that `rank` keeps for a head offset in `plan`'s segment, from its `kept_run`."""
    l, r = plan.local_length, plan.dilation_rate
    start = (rank - plan.ranks[0]) * l  # the chunk's first position, counted from the segment's start
    first, count = kept_run(start, l, r, offset)
    return [rank * l + first + i * r for i in range(count)]


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_distributed_key_blocks_are_the_keep_rule(causal):
    """The blocks of `distributed_branch` (earlier ranks, own, later ranks) hold exactly the keys `keeps` gives.

    For every rank of a segment spanning ranks and every head offset: the queries are the
    chunk's kept rows (`kept_run`), and each one's keys, in position order, are the earlier
    ranks' kept rows, its own rank's (causal: those up to the query), and, when not causal,
    the later ranks': that is `keeps(query, key, w, r, o, causal)` over the whole sequence.
    The fast path (`fused.distributed_calls`) attends the same keys in fewer calls.
    """
    for P, l in [(2, 4), (4, 3), (8, 2), (6, 5)]:
        N = P * l
        for w in [g * l for g in range(2, P + 1)] + [2 * N]:  # segments over g ranks, and w > N
            for r in range(1, min(w, N) + 1):
                for offset in range(r):
                    for p in range(P):
                        (plan,) = plan_branches(p, P, l, [(w, r)])
                        me = plan.ranks.index(p)
                        kept = [kept_positions(rank, plan, offset) for rank in plan.ranks]  # per peer
                        own = kept[me]
                        assert own == [x for x in range(p * l, (p + 1) * l) if keeps(x, x, w, r, offset)]
                        earlier = [x for peer in range(me) for x in kept[peer]]
                        later = [x for peer in range(me + 1, len(plan.ranks)) for x in kept[peer]]
                        for query in own:
                            keys = earlier + [x for x in own if x <= query or not causal] + ([] if causal else later)
                            want = [x for x in range(N) if keeps(query, x, w, r, offset, causal=causal)]
                            assert keys == want, (P, l, w, r, offset, p, query)


def piece_rows(piece):
    """Rows of a one-segment `fast_pieces.Piece` (a run of a rank's rows, or of gathered rows)."""
    assert piece.num_segments == 1
    return list(range(piece.start + piece.offset, piece.start + piece.segment_length, piece.dilation_rate))


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("head_offsets", ["paper", "torchscale"])
def test_fused_calls_attend_the_keep_rule(causal, head_offsets):
    """The fast path's calls (`fused.distributed_calls`) give each query exactly the keys `keeps` gives it, once."""
    H = 6
    for P, l in [(2, 4), (4, 3), (8, 2), (6, 5)]:
        N = P * l
        for w in [g * l for g in range(2, P + 1)] + [2 * N]:
            for r in range(1, min(w, N) + 1):
                n_kept = math.ceil(l / r)
                for p in range(P):
                    (plan,) = plan_branches(p, P, l, [(w, r)])
                    _, groups = sparse_rows(plan, p, H, head_offsets, torch.device("cpu"))
                    seen = {}  # (head, query position) -> key positions
                    for call in distributed_calls(plan, p, groups, 1, causal):
                        heads = range(H)[call.queries.heads]
                        offset = head_offset(heads[0], H, r, head_offsets)
                        slots = []  # position of each row of the gathered source; None: padding
                        for rank in plan.ranks:
                            rows = kept_positions(rank, plan, offset)
                            slots += rows + [None] * (n_kept - len(rows))
                        for query in (p * l + row for row in piece_rows(call.queries)):
                            if call.source == 0:  # own keys, read from k itself
                                own = (p * l + row for row in piece_rows(call.keys))
                                keys = [x for x in own if x <= query or not call.causal]
                            else:
                                keys = [slots[row] for row in piece_rows(call.keys)]
                            for head in heads:
                                seen.setdefault((head, query), []).extend(keys)
                    for head in range(H):
                        offset = head_offset(head, H, r, head_offsets)
                        for query in range(p * l, (p + 1) * l):
                            want = [x for x in range(N) if keeps(query, x, w, r, offset, causal=causal)]
                            assert sorted(seen.get((head, query), [])) == want, (P, l, w, r, p, head, query)


def test_public_names_are_what_users_call():
    import longnet_ref.parallel as parallel

    public = [
        "SequenceParallelDilatedAttention",
        "SimulatedGroup",
        "distributed_branch",
        "plan_branches",
        "sequence_parallel_attention",
        "simulate_sequence_parallel",
    ]
    assert sorted(parallel.__all__) == public
    assert all(f"`{name}`" in parallel.__doc__ for name in public)
    assert sorted(name for name in vars(parallel) if not name.startswith("_") and name not in public) == [
        "algorithm",
        "comm",
        "consensus",
        "fused",
        "layer",
        "plan",
        "simulated",
    ]  # the rest lives in the submodules


def test_ranks_take_turns_and_the_timeout_counts_idle_time_only():
    busy, most = [0], [0]
    lock = threading.Lock()

    def fn(comm):
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        time.sleep(0.4)  # "compute" while holding the turn: 4 x 0.4 s > timeout
        with lock:
            busy[0] -= 1
        return comm.all_gather_object(comm.rank)

    assert SimulatedGroup(4, timeout=1.0).run(fn) == [[0, 1, 2, 3]] * 4
    assert most[0] == 1  # never two ranks computing at once

    def skips(comm):  # rank 3 never joins: the others give up once nobody computes for 1 s
        return None if comm.rank == 3 else comm.all_gather_object(comm.rank)

    start = time.monotonic()
    results = SimulatedGroup(4, timeout=1.0).run(skips, return_exceptions=True)
    assert all(isinstance(r, threading.BrokenBarrierError) for r in results[:3]) and results[3] is None
    assert time.monotonic() - start < 10


def test_collectives_outside_run_are_refused():
    group = SimulatedGroup(2)
    with pytest.raises(ValueError, match="inside group.run"):
        group.comms[0].all_gather_object(1)
    with pytest.raises(ValueError, match="called from inside one of its own ranks"):
        group.run(lambda comm: group.run(lambda c: None))


def test_fused_attention_gradient_with_more_or_fewer_keys_than_queries():
    """The distributed branch attends its queries to blocks of other lengths: out and lse gradients are exact."""
    for n_queries, n_keys in [(4, 12), (12, 4)]:
        q = torch.randn(2, 3, n_queries, 8, dtype=torch.float64, requires_grad=True)
        k, v = (torch.randn(2, 3, n_keys, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
        (out, lse), (out_ref, lse_ref) = fused_attention(q, k, v), dense_attention(q, k, v)
        dout, dlse = torch.randn_like(out), torch.randn_like(lse)
        got = grads((out * dout).sum() + (lse * dlse).sum(), (q, k, v), None)
        want = grads((out_ref * dout).sum() + (lse_ref * dlse).sum(), (q, k, v), None)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- communication accounting


def expected_traffic(N, P, ws, rs, *, B, H, D, itemsize):
    """Closed form: {(rank, branch): bytes} sent (= received) by the all-gather of each distributed branch.

    Branch (w, r) with w' = min(w, N) > l = N / P: the segment of rank p holds g ranks; every
    rank sends its K and V rows, padded to ceil(l / r) per head, to the g - 1 others.
    """
    l, table = N // P, {}
    for i, (w, r) in enumerate(zip(ws, rs)):
        w = min(w, N)
        if w <= l:
            continue
        for p in range(P):
            first = p // (w // l) * (w // l)
            g = min(first + w // l, P) - first
            if g > 1:
                table[p, i] = (g - 1) * 2 * B * H * math.ceil(l / r) * D * itemsize
    return table


@pytest.mark.parametrize("P, ws, rs", [(4, [8, 32, 64], [1, 2, 4]), (8, [48, 128], [3, 16])])
def test_stats_match_the_closed_form(P, ws, rs):
    B, H, N, D = 2, 4, 64, 8
    q, k, v = rand_qkv(B, H, N, D, requires_grad=True)
    out, stats = simulate_sequence_parallel(q, k, v, P, ws, rs, causal=True)
    want = expected_traffic(N, P, ws, rs, B=B, H=H, D=D, itemsize=8)
    forward = {key: sent for key, (sent, received) in stats.traffic(op="all_gather").items() if sent == received}
    assert forward == want
    out.backward(torch.randn_like(out))  # the backward's reduce-scatters join the same list
    assert {key: sent for key, (sent, _) in stats.traffic(op="reduce_scatter").items()} == want
    # the ranks taking part are exactly the segment's ranks, never the whole world
    l = N // P
    for rec in stats:
        if rec.branch is None:
            assert rec.op == "all_gather_object" and rec.ranks == tuple(range(P))
            continue
        per_segment = min(ws[rec.branch], N) // l
        first = rec.rank // per_segment * per_segment
        assert rec.ranks == tuple(range(first, min(first + per_segment, P)))
    assert sum(rec.op == "all_gather_object" for rec in stats) == P  # one input check per rank


def test_bytes_per_rank_stay_constant_when_n_and_p_double():
    """The paper's claim (Sec. 3.1): with w / r bounded, each rank's traffic does not grow with N."""
    B, H, D, l = 1, 4, 8, 16
    ws, rs = [16, 64, 128], [1, 4, 8]  # w / r = 16 for every branch
    per_rank, dense = {}, {}
    for P in (8, 16, 32):
        N = l * P
        q, k, v = rand_qkv(B, H, N, D)
        _, stats = simulate_sequence_parallel(q, k, v, P, ws, rs)
        sent = stats.bytes_per_rank()
        assert len(set(sent.values())) == 1, sent  # every rank moves the same
        per_rank[N] = sent[0]
        dense[N] = (P - 1) * 2 * B * H * l * D * 8  # all-gathering whole K and V
    assert len(set(per_rank.values())) == 1, per_rank
    # gathered rows per head: (w/l - 1) * l/r < w / r per branch, nowhere near the dense (P - 1) l
    assert per_rank[128] == sum((w // l - 1) * 2 * B * H * (l // r) * D * 8 for w, r in zip(ws[1:], rs[1:]))
    assert per_rank[128] < dense[128] < dense[256] < dense[512]  # dense K/V would grow like N


# ---------------------------------------------------------------- bad input, on every rank


def run_every_rank(P, make_args, **kwargs):
    """Call sequence_parallel_attention on P simulated ranks with per-rank arguments; results or exceptions."""
    group = SimulatedGroup(P, timeout=20)
    return group.run(
        lambda comm: sequence_parallel_attention(*make_args(comm.rank), group=comm, **kwargs), return_exceptions=True
    )


def chunk_args(P, ws, rs, N=64):
    q, k, v = rand_qkv(1, 4, N, 8)
    return lambda p: (*(x.chunk(P, dim=2)[p] for x in (q, k, v)), ws, rs)


@pytest.mark.parametrize(
    "ws, message",
    [
        ([12], r"segment_lengths\[0\] = 12 must divide the local length l = N / P = 16"),
        ([8, 24], r"segment_lengths\[1\] = 24 is longer than the local length l = N / P = 16 .* not a multiple"),
    ],
)
def test_bad_divisibility_raises_on_every_rank(ws, message):
    results = run_every_rank(4, chunk_args(4, ws, [1] * len(ws)))
    assert all(isinstance(r, ValueError) and re.search(message, str(r)) for r in results), results


def test_shapes_that_differ_between_ranks_raise_on_every_rank():
    q, k, v = rand_qkv(1, 4, 64, 8)

    def args(p):  # rank 2 holds 8 rows instead of 16
        n = 8 if p == 2 else 16
        return q[:, :, :n], k[:, :, :n], v[:, :, :n], [16], [1]

    results = run_every_rank(4, args)
    assert all(isinstance(r, ValueError) and "every rank must pass the same shape" in str(r) for r in results)
    assert "rank 2: (1, 4, 8, 8)" in str(results[0])


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda a: (a[0][0], *a[1:]), r"invalid input on rank 1: q must be 4-D"),
        (lambda a: (*a[:3], [32], [2]), r"every rank must pass the same segment_lengths and dilation_rates"),
        (lambda a: (*a[:3], [16], [32]), r"invalid input on rank 1: dilation_rate\[0\] 32 is larger"),
        (lambda a: (a[0].requires_grad_(), *a[1:]), r"every rank must pass the same requires_grad"),
    ],
    ids=["one-rank-3d", "branches-differ", "one-rank-bad-branch", "requires-grad-differs"],
)
def test_one_rank_with_bad_input_makes_every_rank_raise(spoil, message):
    base = chunk_args(4, [16], [1])

    def args(p):
        a = base(p)
        return spoil((a[0].clone(), *a[1:])) if p == 1 else a

    results = run_every_rank(4, args)
    assert all(isinstance(r, ValueError) and re.search(message, str(r)) for r in results), results


def test_a_rank_that_fails_releases_the_others():
    """A rank that raises outside the checks (a bug, an OOM) must not leave the others in a barrier."""
    make = chunk_args(4, [16, 64], [1, 4])

    def fn(comm):
        if comm.rank == 3:
            raise RuntimeError("rank 3 crashed")
        return sequence_parallel_attention(*make(comm.rank), group=comm)

    start = time.perf_counter()
    results = SimulatedGroup(4, timeout=30).run(fn, return_exceptions=True)
    assert time.perf_counter() - start < 10
    assert isinstance(results[3], RuntimeError)
    assert all(isinstance(r, threading.BrokenBarrierError) for r in results[:3])
    with pytest.raises(RuntimeError, match="rank 3 crashed"):  # run() raises the root cause
        SimulatedGroup(4, timeout=30).run(fn)


def test_bad_arguments_of_the_entry_points():
    q, k, v = rand_qkv(1, 4, 64, 8)
    with pytest.raises(ValueError, match="not divisible by world_size 5"):
        simulate_sequence_parallel(q, k, v, 5, [16], [1])
    with pytest.raises(ValueError, match="world_size must be a positive integer, got 0"):
        simulate_sequence_parallel(q, k, v, 0, [16], [1])
    with pytest.raises(ValueError, match="implementation must be one of .* got 'cuda'"):
        simulate_sequence_parallel(q, k, v, 4, [16], [1], implementation="cuda")
    with pytest.raises(ValueError, match="group must be None, a torch.distributed ProcessGroup or a Communicator"):
        sequence_parallel_attention(q, k, v, [16], [1], group="world")
    if not torch.distributed.is_initialized():
        with pytest.raises(ValueError, match="needs an initialised torch.distributed process group"):
            sequence_parallel_attention(q, k, v, [16], [1])


def test_implementation_that_differs_between_ranks_raises_on_every_rank():
    args = chunk_args(4, [16, 64], [1, 4])
    results = SimulatedGroup(4, timeout=20).run(
        lambda comm: sequence_parallel_attention(
            *args(comm.rank), group=comm, implementation="readable" if comm.rank == 1 else "fast"
        ),
        return_exceptions=True,
    )
    message = "every rank must pass the same implementation, got rank 0: fast, rank 1: readable"
    assert all(isinstance(r, ValueError) and message in str(r) for r in results), results


# ---------------------------------------------------------------- the layer


@pytest.mark.parametrize("P, causal", [(2, False), (4, True)])
def test_sequence_parallel_layer_equals_the_layer(P, causal):
    torch.manual_seed(1)
    layer = MultiheadDilatedAttention(32, 4, [8, 32, 64], [1, 2, 4], causal=causal).double()
    parallel = SequenceParallelDilatedAttention.from_layer(layer)
    x = torch.randn(2, 64, 32, dtype=torch.float64)
    dy = torch.randn_like(x)
    chunks = [c.clone().requires_grad_() for c in x.chunk(P, dim=1)]

    def step(comm):  # one rank: forward and backward of its chunk
        y = parallel(chunks[comm.rank], group=comm)
        y.backward(dy.chunk(P, dim=1)[comm.rank])
        return y.detach()

    y = torch.cat(SimulatedGroup(P).run(step), dim=1)
    x_ref = x.clone().requires_grad_()
    y_ref = layer(x_ref)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.cat([c.grad for c in chunks], dim=1), x_ref.grad, rtol=0, atol=1e-10)
    # threads share the parameters, so their .grad already holds the sum over ranks
    for (name, param), param_ref in zip(parallel.named_parameters(), layer.parameters()):
        torch.testing.assert_close(param.grad, param_ref.grad, rtol=0, atol=1e-10, msg=name)
    with pytest.raises(ValueError, match=r"x must be \(B, N/P, 32\)"):
        parallel(torch.randn(2, 16, 8))


def test_readme_sequence_parallel_example_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    match = re.search(r"<!-- readme-parallel-example -->\n```python\n(.*?)```", readme, re.S)
    assert match, "README.md has no <!-- readme-parallel-example --> block"
    exec(compile(match.group(1), "README.md", "exec"), {})


@pytest.mark.skipif(
    "rotary" not in inspect.signature(MultiheadDilatedAttention).parameters, reason="the layer has no rotary option"
)
def test_sequence_parallel_layer_gives_rotary_global_positions():
    def rotary(q, k, positions):  # any position-dependent map shows whether positions are global
        angle = positions.to(q.dtype)[:, None] * 0.1  # (N, 1)
        return q * torch.cos(angle) + q.roll(1, dims=-1) * torch.sin(angle), k * torch.cos(angle)

    torch.manual_seed(2)
    layer = MultiheadDilatedAttention(32, 4, [8, 32, 64], [1, 2, 4], causal=True, rotary=rotary).double()
    parallel = SequenceParallelDilatedAttention.from_layer(layer)
    x = torch.randn(2, 64, 32, dtype=torch.float64)
    y = torch.cat(SimulatedGroup(4).run(lambda comm: parallel(x.chunk(4, dim=1)[comm.rank], group=comm)), dim=1)
    torch.testing.assert_close(y, layer(x), rtol=0, atol=1e-10)
