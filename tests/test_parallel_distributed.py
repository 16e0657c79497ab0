"""Sequence parallelism on real torch.distributed processes (gloo on loopback, CPU).

Each test starts P worker processes (tests/parallel_worker.py) or the torchrun launcher, with
timeouts everywhere, so a hang fails the test instead of blocking CI. Worker groups meet
through a file, so parallel test runs cannot collide on a port.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import parallel_worker
import pytest
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo on loopback, POSIX signals")


def launch(P, cases, tmp_path, *, timeout=120.0):
    """Run `cases` on P gloo processes; returns (results by (rank, case), exit codes, seconds)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init_file = tmp_path / "gloo_init"
    procs = [
        ctx.Process(target=parallel_worker.worker, args=(rank, P, str(init_file), cases, queue)) for rank in range(P)
    ]
    start = time.monotonic()
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join(max(1.0, timeout - (time.monotonic() - start)))
        elapsed = time.monotonic() - start
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    results = {}
    while not queue.empty():
        item = queue.get(timeout=5)
        results[item["rank"], item["case"]] = item
    return results, [proc.exitcode for proc in procs], elapsed


def assert_exact(results, P, n_cases, tol):
    for rank in range(P):
        for case in range(n_cases):
            errors = results[rank, case]["errors"]
            assert max(errors.values()) <= tol, (rank, case, errors)


def exact_cases(P):
    N = 16 * P  # l = 16 on every rank
    configs = [
        ([8, 2 * 16], [1, 2]),  # a segment spans 2 ranks
        ([16, N], [1, 4]),  # a segment spans every rank
        ([8, 4 * N], [1, 8]),  # w > N
        ([8, 32, N, 2 * N], [1, 2, 4, 8]),  # the mixture
        ([32, 48], [1, 2]),  # P = 4: segments of ranks (0, 1), (2, 3), then (0, 1, 2), (3): sub-groups in one order
    ]
    cases = [
        {"kind": "exact", "N": N, "ws": ws, "rs": rs, "causal": causal}
        for ws, rs in configs
        for causal in (False, True)
    ]
    cases.append(
        {"kind": "exact", "N": N, "ws": [16, N], "rs": [2, 4], "causal": True, "heads": 6, "head_offsets": "torchscale"}
    )
    # Key padding masks against the oracle with the masked keys removed: left, right and arbitrary,
    # causal or not, both per-rank paths, and grouped-query keys (H_kv < H).
    mixture = {"kind": "exact", "N": N, "ws": [8, 32, N], "rs": [1, 2, 4]}
    cases += [
        {**mixture, "causal": False, "padding": "left"},
        {**mixture, "causal": True, "padding": "left", "implementation": "readable"},
        {**mixture, "causal": True, "padding": "right"},
        {**mixture, "causal": False, "padding": "arbitrary", "implementation": "readable"},
        {**mixture, "causal": True, "padding": "arbitrary", "heads": 6, "kv_heads": 2},
        {**mixture, "causal": False, "padding": "right", "heads": 6, "kv_heads": 3, "head_offsets": "torchscale"},
    ]
    return cases


@pytest.mark.parametrize("P", [2, 4])
def test_gloo_processes_equal_single_device(P, tmp_path):
    N = 16 * P
    cases = exact_cases(P)
    n_exact = len(cases)
    cases.append({"kind": "exact", "N": N, "ws": [8, 32, N], "rs": [1, 2, 4], "causal": True, "dtype": "float32"})
    # bad input raises ValueError on every rank, and the group still works afterwards
    cases.append({"kind": "error", "N": N, "ws": [12], "rs": [1]})
    cases.append({"kind": "error", "N": N, "ws": [16], "rs": [1], "odd_rank": 1})
    cases.append({"kind": "layer", "N": N, "ws": [8, 32, N], "rs": [1, 2, 4], "causal": True})
    cases.append({"kind": "subgroup", "N": N})
    # the layer with a key padding mask (left, causal; arbitrary, grouped-query keys): cases from n_exact + 5
    cases.append({"kind": "layer", "N": N, "ws": [8, 32, N], "rs": [1, 2, 4], "causal": True, "padding": "left"})
    cases.append(
        {"kind": "layer", "N": N, "ws": [8, 32], "rs": [1, 2], "causal": False, "padding": "arbitrary", "kv_heads": 2}
    )
    results, codes, elapsed = launch(P, cases, tmp_path)
    crashes = [results[r, "crash"] for r in range(P) if (r, "crash") in results]
    assert not crashes, crashes[0]["trace"]
    assert codes == [0] * P, codes
    for rank in range(P):  # the package kept no group alive past destroy_process_group
        assert results[rank, "released"]["groups kept"] == 0
        assert "process group was destroyed" in results[rank, "released"]["stale use"]
    assert_exact(results, P, n_exact, 1e-10)
    for rank in range(P):
        assert max(results[rank, n_exact]["errors"].values()) <= 1e-5  # float32
        divisibility, shapes = results[rank, n_exact + 1], results[rank, n_exact + 2]
        assert (
            divisibility["raised"] == "ValueError" and "segment_lengths[0] = 12 must divide" in divisibility["message"]
        )
        assert shapes["raised"] == "ValueError" and "every rank must pass the same shape" in shapes["message"]
        assert max(results[rank, n_exact + 3]["errors"].values()) <= 1e-10  # the layer
        if rank < P // 2:  # a group of half the processes is refused before any collective
            assert "sequence parallelism needs a group of every process" in results[rank, n_exact + 4]["message"]
        for case in (n_exact + 5, n_exact + 6):  # the layer with padding
            assert max(results[rank, case]["errors"].values()) <= 1e-10, (rank, case, results[rank, case])
    print(f"P = {P}: {len(cases)} cases in {elapsed:.1f} s")


def test_a_dead_rank_makes_the_others_fail_fast(tmp_path):
    """Rank 1 is killed between collectives; rank 0 must fail on its own (gloo sees the lost peer), not hang."""
    N = 32
    cases = [
        {"kind": "exact", "N": N, "ws": [16, N], "rs": [1, 4], "causal": True},
        {"kind": "die", "rank": 1, "N": N, "ws": [16, N], "rs": [1, 4], "causal": True},
    ]
    results, codes, elapsed = launch(2, cases, tmp_path, timeout=60)
    assert elapsed < 60, elapsed
    assert codes[1] == -9  # SIGKILL
    assert codes[0] not in (0, None), codes  # exited by itself, with an error
    assert max(results[0, 0]["errors"].values()) <= 1e-10  # the first case ran fine
    assert "error" in results[0, "crash"]  # then its collective failed


def torchrun(*args, timeout):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


LAUNCH = ["--seq-len", "256", "--segment-lengths", "32", "128", "256", "--dilation-rates", "1", "2", "4", "--causal"]


def test_launcher_runs_forward_backward_and_checks(tmp_path):
    proc, elapsed = torchrun(
        "--nproc-per-node", "2", "-m", "longnet_ref.parallel", *LAUNCH, "--dtype", "float64", timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "N = 256 tokens over P = 2 ranks (l = 128 each)" in out
    assert "(256, 4) 2 ranks/segment" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert [row[0] for row in rows] == ["0", "1"]  # one line of time and traffic per rank
    assert "OK" in out.splitlines()[-1] and "check vs one device" in out


def test_launcher_exits_nonzero_fast_when_a_rank_dies():
    proc, elapsed = torchrun(
        "--nproc-per-node", "2", "-m", "longnet_ref.parallel", *LAUNCH, "--kill-rank", "1", timeout=90
    )
    assert proc.returncode != 0
    assert elapsed < 60, elapsed
    assert "dying before the forward" in proc.stdout
