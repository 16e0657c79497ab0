"""Exact resume with real signals: a run stopped by SIGINT, SIGTERM, SIGKILL or --pause-at, then resumed,
has the uninterrupted run's losses bit for bit (CPU, one thread)."""

import json
import signal
import subprocess
import sys
import time

import pytest

STEPS = 60
COMMAND = [sys.executable, "-m", "longnet_ref.lm.train", "--preset", "tiny", "--task", "recall", "--seq-len", "64"]
COMMAND += ["--num-pairs", "2", "--queries-per-pair", "4", "--eval-size", "2", "--threads", "1", "--no-progress"]
COMMAND += ["--steps", str(STEPS), "--eval-every", "15"]


def losses(out):
    metrics = json.loads((out / "metrics.json").read_text())
    return [record["loss"] for record in metrics["train"]], metrics


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    subprocess.run(COMMAND + ["--out", str(out)], check=True, capture_output=True, timeout=300)
    return losses(out)[0]


def wait_for(path, timeout=120):
    start = time.monotonic()
    while not path.is_file():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.005)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_a_run_stopped_by_a_signal_resumes_exactly(tmp_path, uninterrupted, signum):
    out = tmp_path / "run"
    process = subprocess.Popen(COMMAND + ["--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(out / "checkpoint.pt")  # the first save (step 15): the run is in the middle of its steps
    time.sleep(0.02)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    if signum == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:  # finished its step, saved, said how to resume, and exited with the shell's code
        assert process.returncode == 128 + signum, err.decode()
        assert f"{signum.name} at step" in err.decode() and "--resume" in err.decode()
    stopped, _ = losses(out)
    assert 0 < len(stopped) < STEPS  # it was stopped in the middle
    resumed = subprocess.run(
        COMMAND + ["--out", str(out), "--resume", str(out / "checkpoint.pt")], capture_output=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr.decode()
    after, metrics = losses(out)
    assert after == uninterrupted  # every loss, bit for bit (floats from JSON: the same repr)
    assert [record["step"] for record in metrics["train"]] == list(range(1, STEPS + 1))


def test_pause_at_then_resume_from_the_command_line_is_exact(tmp_path, uninterrupted):
    out = tmp_path / "run"
    subprocess.run(COMMAND + ["--out", str(out), "--pause-at", "23"], check=True, capture_output=True, timeout=300)
    assert len(losses(out)[0]) == 23
    subprocess.run(
        COMMAND + ["--out", str(out), "--resume", str(out / "checkpoint.pt")], check=True, capture_output=True
    )
    assert losses(out)[0] == uninterrupted
