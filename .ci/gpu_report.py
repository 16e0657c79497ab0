"""The report of `bash .ci/gpu`: report.md and report.json from the steps it ran.

    python .ci/gpu_report.py STATE OUT

STATE is the script's scratch folder: steps.tsv (one line per step: name, start and end times
in epoch seconds, exit code, time limit, command) and NAME.log (each step's output). OUT is the
report's folder; the training step's metrics are read from OUT/gpu-run/metrics.json. Prints the
number of failed steps as its last line (0 when every step passed).

The key numbers, per step: pytest's summary counts (and the failed tests' ids), the bench's
timings with fast / dense and readable / dense ratios computed from its printed lines, and the
training run's final loss, validation bits per byte and tokens per second (from metrics.json).
"""

from __future__ import annotations

import json
import math
import platform
import re
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 10  # training steps left out of the steady tokens/s (first CUDA calls, allocator growth)
COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)\b")
# a line of `python -m longnet_ref.bench` (bench/__main__.py `describe`)
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # IPython colours the tracebacks that nbval prints
BENCH_LINE = re.compile(
    r"^\s*(?P<path>\S+) N=2\^(?P<log2>\d+)\s+H=(?P<H>\d+) (?P<mode>fwd\+bwd|fwd)(?P<causal> causal)?\s+"
    r"~?\s*(?P<seconds>[\d.]+) s\s+(?P<gflops>[\d.]+) GFLOP/s\s+err (?P<err>\S+)"
)


def environment():
    """What ran: the GPU, torch, CUDA, Python, the commit (when the tree is a git checkout)."""
    import torch

    env = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        env["device"] = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        env.update(
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            memory_gib=round(props.total_memory / 2**30, 1),
            bf16_native=torch.cuda.is_bf16_supported(including_emulation=False),
        )
    except Exception as error:  # noqa: BLE001 - the report is still written, saying what failed
        env["device_error"] = f"{type(error).__name__}: {error}"
    env["driver"] = _output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    env["commit"] = _output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    return env


def _output(cmd):
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def pytest_numbers(log):
    """Counts from pytest's closing summary line, and the ids of failed or erroring tests."""
    summary = next((line for line in reversed(log.splitlines()) if COUNT.search(line) and " in " in line), None)
    numbers = {}
    if summary is not None:
        for count, word in COUNT.findall(summary):
            word = {"error": "errors", "warning": "warnings"}.get(word, word)
            numbers[word] = int(count)
        numbers["summary"] = summary.strip("= ")
    failed = [line.split(" ", 1)[1] for line in log.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    if failed:
        numbers["failed_tests"] = failed[:30]
    return numbers


def bench_numbers(log):
    """The bench's timed lines, and per (N, mode) the ratios fast / dense and readable / dense of their times."""
    rows = []
    for line in log.splitlines():
        match = BENCH_LINE.match(line)
        if match:
            rows.append(dict(path=match["path"], N=2 ** int(match["log2"]), H=int(match["H"]),
                             mode=match["mode"] + (" causal" if match["causal"] else ""),
                             seconds=float(match["seconds"]), gflops=float(match["gflops"]),
                             max_error=float(match["err"])))  # fmt: skip
    ratios = []
    for N, mode in dict.fromkeys((row["N"], row["mode"]) for row in rows):
        by_path = {row["path"]: row for row in rows if (row["N"], row["mode"]) == (N, mode)}
        dense = by_path.get("dense")
        entry = {"N": N, "mode": mode, **{f"{path} s": row["seconds"] for path, row in by_path.items()}}
        for path in ("fast", "readable"):
            if dense and path in by_path and dense["seconds"] > 0:
                entry[f"{path} / dense"] = round(by_path[path]["seconds"] / dense["seconds"], 3)
        ratios.append(entry)
    return {
        "lines": len(rows),
        "outputs_match_oracle": "all outputs match the oracle" in log,
        "check_failures": [line for line in log.splitlines() if line.startswith("CHECK FAILED")],
        "max_error": max((row["max_error"] for row in rows), default=None),
        "ratios": ratios,
    }


def train_numbers(metrics_path):
    """Final loss and validation bits per byte, and tokens per second, from the run's metrics.json."""
    if not metrics_path.is_file():
        return {"error": f"{metrics_path} was not written"}
    metrics = json.loads(metrics_path.read_text())
    train = metrics.get("train", [])
    numbers = {"steps": len(train), "device": metrics.get("device"), "parameters": metrics.get("parameters")}
    config = metrics.get("train_config", {})
    numbers.update({k: config.get(k) for k in ("seq_len", "batch_size", "embed_dim", "num_layers", "num_heads")})
    if train:
        last = train[-10:]
        numbers["final_loss"] = round(train[-1]["loss"], 4)
        numbers["loss_bits_per_byte_last_10_steps"] = round(statistics.mean(r["loss"] for r in last) / math.log(2), 4)
        steady = train[WARMUP_STEPS:] or train
        numbers["tokens_per_s_median"] = round(statistics.median(r["tokens_per_s"] for r in steady))
        tokens = len(train) * config.get("seq_len", 0) * config.get("batch_size", 0)
        numbers["tokens_per_s_overall"] = round(tokens / sum(r["seconds"] for r in train))
        numbers["train_seconds"] = round(sum(r["seconds"] for r in train), 1)
    evals = [e for e in metrics.get("eval", []) if "val_bpb" in e]
    if evals:
        numbers["val_bpb"] = {e["step"]: round(e["val_bpb"], 4) for e in evals}
        numbers["final_val_bpb"] = round(evals[-1]["val_bpb"], 4)
    return numbers


def read_steps(state, out):
    steps = []
    for line in (state / "steps.tsv").read_text().splitlines():
        name, start, end, rc, limit, command = line.split("\t", 5)
        start, end = (float(t.replace(",", ".")) for t in (start, end))  # a locale may write 1,5
        log_path = state / f"{name}.log"
        log = ANSI.sub("", log_path.read_text(errors="replace")) if log_path.is_file() else ""
        step = dict(name=name, command=command, seconds=round(end - start, 1),
                    exit_code=None if rc == "-" else int(rc), limit_s=int(limit))  # fmt: skip
        if rc == "-":
            step["status"] = "not run: the time budget was spent"
        elif int(rc) in (124, 137):
            step["status"] = f"timed out after {limit} s"
        else:
            step["status"] = "passed" if int(rc) == 0 else "FAILED"
        if name == "bench-quick":
            step["numbers"] = bench_numbers(log)
        elif name == "train-gpu":
            step["numbers"] = train_numbers(out / "gpu-run" / "metrics.json")
        else:
            step["numbers"] = pytest_numbers(log)
        if "No module named" in log:
            missing = sorted(set(re.findall(r"No module named '([\w.]+)'", log)))
            step["missing_modules"] = missing
        step["tail"] = excerpt(log) if step["status"] != "passed" else []
        steps.append(step)
    return steps


def excerpt(log, size=40):
    """What to show of a failed step: pytest's first failure (where the error is), else the output's end."""
    lines = log.splitlines()
    first = next((i for i, line in enumerate(lines) if re.match(r"^=+ (FAILURES|ERRORS) =+$", line)), None)
    return lines[first : first + size] if first is not None else lines[-size:]


def brief(step):
    """One cell: the step's key numbers."""
    numbers = step["numbers"]
    if step["name"] == "bench-quick":
        fast = [r["fast / dense"] for r in numbers["ratios"] if "fast / dense" in r]
        ok = "outputs match the oracle" if numbers["outputs_match_oracle"] else "outputs NOT checked ok"
        spread = f"fast / dense {min(fast):.2f}-{max(fast):.2f}" if fast else "no ratios"
        return f"{numbers['lines']} timings, {spread}, {ok}"
    if step["name"] == "train-gpu":
        if "error" in numbers:
            return numbers["error"]
        parts = [f"{numbers['steps']} steps"]
        if "final_loss" in numbers:
            parts.append(f"loss {numbers['final_loss']:.3f}")
        if "final_val_bpb" in numbers:
            parts.append(f"val {numbers['final_val_bpb']:.3f} bits/byte")
        if "tokens_per_s_median" in numbers:
            parts.append(f"{numbers['tokens_per_s_median']:,} tokens/s")
        return ", ".join(parts)
    return numbers.get("summary", "no pytest summary line")


def markdown(env, steps, argv):
    failed = [s["name"] for s in steps if s["status"] != "passed"]
    device = env.get("device", "no GPU")
    if "capability" in env:
        device += f" (compute capability {env['capability']}, {env['memory_gib']} GiB, driver {env['driver']})"
    command = " ".join(["bash .ci/gpu", *argv])
    result = f"all {len(steps)} steps passed" if not failed else f"{len(failed)} of {len(steps)} failed: "
    result += ", ".join(failed)
    lines = [
        f"# GPU check: {env.get('device', 'no GPU')}, {env['date_utc']}",
        "",
        f"- device: {device}" + (f" (the device query failed: {env['device_error']})" if "device_error" in env else ""),
        f"- torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, Python {env['python']}",
        f"- commit: {env['commit'] or 'unknown (not a git checkout)'}; command: `{command}`",
        f"- result: {result}",
        "",
        "| step | command | seconds | exit code | result |",
        "|---|---|---|---|---|",
    ]
    for s in steps:
        code = "-" if s["exit_code"] is None else s["exit_code"]
        result = s["status"] if s["status"] != "passed" else brief(s)
        if s["status"] != "passed" and s["exit_code"] is not None:
            result += f": {brief(s)}"
        lines.append(f"| {s['name']} | `{s['command']}` | {s['seconds']} | {code} | {result} |")
    for s in steps:
        code = "-" if s["exit_code"] is None else s["exit_code"]
        lines += ["", f"## {s['name']}", "", f"{s['status']}: exit code {code} after {s['seconds']} s", ""]
        numbers = s["numbers"]
        if s["name"] == "bench-quick":
            lines += ["Seconds per call (median of 3, in one process), and the ratios of those times:", ""]
            keys = ["N", "mode", "dense s", "readable s", "fast s", "fast / dense", "readable / dense"]
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            for row in numbers["ratios"]:
                cells = [f"2^{row['N'].bit_length() - 1}" if k == "N" else row.get(k, "") for k in keys]
                shown = [
                    f"{c:.6f}" if k.endswith(" s") and isinstance(c, float) else str(c) for c, k in zip(cells, keys)
                ]
                lines.append("| " + " | ".join(shown) + " |")
            lines += ["", f"largest error against the float64 oracle (sampled rows): {numbers['max_error']}"]
            lines += [f"- {line}" for line in numbers["check_failures"]]
        elif s["name"] == "train-gpu":
            lines += [f"- {key}: {value}" for key, value in numbers.items()]
            lines.append(f"- tokens/s: median over steps after the first {WARMUP_STEPS} (train.py's per-step "
                         "tokens_per_s), and overall = steps x batch x seq_len / summed step seconds")  # fmt: skip
        else:
            lines += [f"- {key}: {value}" for key, value in numbers.items() if key != "failed_tests"]
            lines += [f"- failed test: `{test}`" for test in numbers.get("failed_tests", [])]
        if s.get("missing_modules"):
            lines.append(
                f"- missing Python modules: {', '.join(s['missing_modules'])} (carry wheels: `bash .ci/gpu --help`)"
            )
        if s["tail"]:
            lines += ["", "Its output (the first failure, else the last lines):", "", "```", *s["tail"], "```"]
    return "\n".join(lines) + "\n"


def main(argv):
    state, out, *script_args = argv
    state, out = Path(state), Path(out)
    env = environment()
    steps = read_steps(state, out)
    report = {"environment": env, "steps": steps, "failed": [s["name"] for s in steps if s["status"] != "passed"]}
    report["ok"] = not report["failed"]
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(env, steps, script_args))
    print(f"wrote {out / 'report.md'} and {out / 'report.json'}")
    print(len(report["failed"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
