"""`python -m longnet_ref.bench`: what dilated attention costs on this machine, measured.

For N = 2^10 ... 2^20 it times dense SDPA (torch's fused kernel), the readable dilated path
(small N) and the fast dilated path, forward and forward+backward, causal and not, each
configuration in a subprocess of its own (so peak memory is its own), medians of several runs.
Every timed path is checked in the same run against the oracle on sampled query rows
(`oracle_rows`, float64), so no speed-up can come from computing something else.

Reported as ratios measured in one run (the machine is shared and noisy):
- glue at N = 4096 and 16384, causal and not: fast time / (ideal FLOP ratio x dense time), and
  fast time / the kernel floor (one SDPA call per branch on contiguous rows; target <= 1.05);
- ceiling: the fast path's GFLOP/s / the same run's matmul GFLOP/s (target >= 0.7);
- scaling: t(2^20) / t(2^14) for forward+backward (target <= 64 x 1.25);
- sequence parallelism: simulated P = 8 against one process at N = 2^18 (target <= +10 %);
- tiles: the fused kernel's causal time over its non-causal time on pieces of K rows (`tiles.py`):
  why short causal pieces save nothing, the gap between the fast path and the FLOP ideal;
- lm: one training step of the small LM (dense, local, dilated at N = 1024, 4096, 8192): tokens/s,
  where its time goes, and its GFLOP/s as a share of the same run's matmul (`lm_step.py`); with
  `--against PATH`, the same steps with another checkout's code beside this one's: before and after.

`--quick` (CI) runs two small N in one process: timings are printed, outputs checked, no target.
`--device cuda` runs the same configurations on the GPU (inputs made on the CPU from the same seed,
then moved; torch.cuda.synchronize() before and after every timed step; the oracle check stays
float64 on the CPU); its sweep writes figures/bench_cuda*, never the CPU figures.

The mixture is the paper's geometric one with w0 = 2048, a = 2 (Sec. 2.4): w_i = 2048 * 2^i,
r_i = 2^i up to the first w >= N (`patterns.geometric_mixture`; one dense segment when N <= 2048).
FLOP count (`analysis.complexity`, from Eqs. 16-17 of arXiv 2307.02486): a branch costs
4 B H D N w / r^2 (QK^T and PV), dense 4 B H D N^2; causal halves both; the backward is counted
as 2.5 x the forward (5 matmuls against 2).

Here: the sections and the command line. `measure.py` times and checks configurations, `floor.py`
is the kernel floor, `tiles.py` the causal tile effect, `lm_step.py` profiles the LM's training
step, `report.py` writes the sweep's CSV, table and plot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from ..cli import HelpFormatter
from ..patterns import geometric_mixture
from .measure import attention_flops, describe, ideal_flop_ratio, measure, tolerance
from .report import finish_csv, read_csv, scaling_line, write_csv, write_outputs

W0, RATIO = 2048, 2  # every timed mixture: geometric_mixture(W0, RATIO, seq_len=N)


def in_subprocess(cfgs, timeout):
    """Run `measure(cfgs)` in a fresh interpreter: its own peak memory, no state shared with other runs."""
    cmd = [sys.executable, "-m", "longnet_ref.bench", "--worker", json.dumps(cfgs)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {cfgs}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def sweep_bar(args):
    """A progress bar over the sweep, in units of its FLOPs (a 2^20 run weighs 4^10 of a 2^10 one), so
    that its ETA means something; off when stderr is not a terminal (CI logs)."""
    from tqdm.auto import tqdm

    total = 0.0
    for log2 in range(args.min_log2, args.max_log2 + 1):
        ws, rs = geometric_mixture(W0, RATIO, seq_len=2**log2)
        for path in ("dense", "readable", "fast"):
            if path != "readable" or 2**log2 <= args.readable_max_n:
                cfg = dict(path=path, N=2**log2, B=1, H=args.heads, D=64, ws=ws, rs=rs, causal=False, backward=True)
                total += 4 * attention_flops(cfg) / 1e9  # fwd and fwd+bwd, causal and not: about 4x
    return tqdm(total=total, desc="sweep", unit="GFLOP", disable=None, leave=False)


def run_sweep(args, run, log):
    """Time vs N for every path; dense stops being run once one call would exceed --dense-limit s."""
    results, dense_last = [], {}
    bar = sweep_bar(args)
    for log2 in range(args.min_log2, args.max_log2 + 1):
        N = 2**log2
        ws, rs = geometric_mixture(W0, RATIO, seq_len=N)
        for backward in (False, True):
            for causal in (False, True):
                for path in ("dense", "readable", "fast"):
                    cfg = dict(path=path, N=N, B=1, H=args.heads, D=64, ws=ws, rs=rs, causal=causal,
                               backward=backward, repeats=args.repeats)  # fmt: skip
                    if args.quick:  # CI: no target, so a smaller ceiling matmul (2048^2 was 30 of its 43 s)
                        cfg["matmul_size"] = 1024
                    if path == "readable" and N > args.readable_max_n:
                        continue
                    last = dense_last.get((backward, causal))
                    if path == "dense" and last and last[1] * (N / last[0]) ** 2 > args.dense_limit:
                        # O(N^2): extrapolate from the largest N measured, and say so
                        seconds = last[1] * (N / last[0]) ** 2
                        result = dict(cfg, seconds=seconds, gflops=attention_flops(cfg) / seconds / 1e9,
                                      max_error=float("nan"), peak_rss_mb=float("nan"), extrapolated=True,
                                      ideal_flop_ratio=ideal_flop_ratio(cfg))  # fmt: skip
                    else:
                        result = dict(run([cfg])[0], extrapolated=False)
                        if path == "dense":
                            dense_last[(backward, causal)] = (N, result["seconds"])
                    results.append(result)
                    bar.update(attention_flops(dict(cfg, causal=False, backward=True)) / 1e9)
                    log(result)
                    if args.csv:
                        write_csv(results, args.csv, partial=True)  # figures/<csv>.csv stays as it was
    bar.close()
    if args.csv:
        finish_csv(args.csv)  # complete: the new results replace the old in one rename
    return results


def run_glue(args, run, log):
    """Glue and ceiling at N = 4096 and 16384, B = 1, H = 8, D = 64, fp32, causal and not.

    Two glues, each a ratio of one run's interleaved timings: the fast path over the FLOP ideal
    (ideal FLOP ratio x dense SDPA; the fused CPU kernel skips causal key tiles only when a whole
    tile lies above the diagonal, so short causal pieces cost about as much as full ones), and
    over the kernel floor (one SDPA call per branch on rows gathered contiguously beforehand,
    `floor_rows`): what the views, the running merge and the scatter add to the kernel's own work.
    """
    rows = []
    for N in (4096, 16384):
        ws, rs = geometric_mixture(W0, RATIO, seq_len=N)  # N = 16384: [2048 ... 16384], [1, 2, 4, 8]
        for causal in (False, True):
            for backward in (False, True):
                base = dict(N=N, B=1, H=8, D=64, ws=ws, rs=rs, causal=causal, backward=backward, repeats=args.repeats)
                # one process, dense, fast and floor interleaved: the ratios are measured under the same conditions
                dense, fast, floor = run([dict(base, path=path) for path in ("dense", "fast", "floor")])
                for result in (dense, fast, floor):
                    log(result)
                ideal = fast["ideal_flop_ratio"]  # causal-aware, from the cost model
                mode = ("forward+backward" if backward else "forward") + (", causal" if causal else "")
                print(f"N={N} w={ws} r={rs} {mode}:")
                print(f"  glue over the FLOP ideal: fast {fast['seconds']:.3f} s / (ideal {ideal:.4f} x dense "
                      f"{dense['seconds']:.3f} s) = {fast['seconds'] / (ideal * dense['seconds']):.3f}")  # fmt: skip
                print(f"  glue over the kernel floor: fast {fast['seconds']:.3f} s / floor {floor['seconds']:.3f} s "
                      f"= {fast['seconds'] / floor['seconds']:.3f}  (target <= 1.05)")  # fmt: skip
                print(f"  ceiling: fast {fast['gflops']:.1f} GFLOP/s / matmul {fast['matmul_gflops']:.1f} GFLOP/s "
                      f"= {fast['gflops'] / fast['matmul_gflops']:.3f}  (target >= 0.7)")  # fmt: skip
                rows += [dense, fast, floor]
    return rows


def run_scaling(args, run, log):
    """t(2^20) / t(2^14), forward+backward, geometric w0 = 2048, a = 2, B = 1, H = 4, D = 64."""
    times = {}
    for log2 in (14, 20):
        ws, rs = geometric_mixture(W0, RATIO, seq_len=2**log2)
        cfg = dict(path="fast", N=2**log2, B=1, H=4, D=64, ws=ws, rs=rs, causal=False, backward=True,
                   repeats=args.repeats)  # fmt: skip
        result = run([cfg])[0]
        log(result)
        times[log2] = result
    print(scaling_line(times[14], times[20], attention_flops(times[20]) / attention_flops(times[14])))
    return list(times.values())


def run_parallel(args, run, log):
    """Simulated sequence parallelism at P = 8 against one process, N = 2^18, interleaved in one process."""
    N, P = 2**18, 8
    ws, rs = geometric_mixture(W0, RATIO, seq_len=N)
    rows = []
    for backward in (False, True):
        base = dict(N=N, B=1, H=4, D=64, ws=ws, rs=rs, causal=False, backward=backward, repeats=args.repeats)
        single, parallel = run([dict(base, path="fast"), dict(base, path="parallel", world_size=P)])
        log(single)
        log(parallel)
        mode = "forward+backward" if backward else "forward"
        overhead = parallel["seconds"] / single["seconds"] - 1
        print(f"sequence parallel ({mode}): P={P} simulated {parallel['seconds']:.3f} s vs one process "
              f"{single['seconds']:.3f} s: {100 * overhead:+.1f} %  (target <= +10 %)")  # fmt: skip
        rows += [single, parallel]
    return rows


def report_sweep(name):
    """figures/<name>.png and <name>_table.md from figures/<name>.csv, with the scaling target read off it."""
    results = read_csv(name)
    fast = {row["N"]: row for row in results if row["path"] == "fast" and row["backward"] and not row["causal"]}
    footer = ""
    if {2**14, 2**20} <= set(fast):  # the scaling target's configuration is the sweep's
        mixtures = {N: geometric_mixture(W0, RATIO, seq_len=N) for N in (2**14, 2**20)}
        small, large = (dict(fast[N], ws=mixtures[N][0], rs=mixtures[N][1]) for N in (2**14, 2**20))
        line = scaling_line(small, large, attention_flops(large) / attention_flops(small))
        footer = f"\nforward+backward, non-causal, {line}\n"
    write_outputs(results, name, footer)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m longnet_ref.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="CI mode: N = 2^10, 2^11 in one process, checks only")
    parser.add_argument(
        "--sections",
        default="glue,scaling,parallel,sweep",
        help="comma list of glue, scaling, parallel, sweep, tiles, lm (tiles, lm: not in the default)",
    )
    parser.add_argument("--min-log2", type=int, default=10, help="the sweep's shortest N, as log2 N")
    parser.add_argument("--max-log2", type=int, default=20, help="the sweep's longest N, as log2 N")
    parser.add_argument("--heads", type=int, default=4, help="H of every timed configuration")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    parser.add_argument(
        "--dense-limit", type=float, default=60.0, help="extrapolate dense once a call would take longer"
    )
    parser.add_argument(
        "--readable-max-n", type=int, default=2**13, help="time the readable path only up to this N (it is slow)"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per configuration")
    parser.add_argument("--replot", action="store_true", help="redraw figures/bench.png and its table from bench.csv")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where the timed paths run (the oracle check: CPU)"
    )
    parser.add_argument(
        "--against",
        default=None,
        help="with --sections lm: also time another checkout's code (a git worktree of an older commit), "
        "interleaved in this process, and print tokens/s before and after",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # the sweep's table, kept up to date as it runs; a partial range must not overwrite the full one,
    # and a GPU sweep must not overwrite the CPU's
    full = (args.min_log2, args.max_log2) == (10, 20)
    stem = "bench" if args.device == "cpu" else f"bench_{args.device}"
    args.csv = None if args.quick else stem if full else f"{stem}_2^{args.min_log2}-2^{args.max_log2}"
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))  # a list of configurations
        return 0
    if args.replot or ("sweep" in args.sections.split(",") and not args.quick):
        from ..analysis.viz import required_figures_dir  # here: the timing workers need no matplotlib

        try:  # before any timing: an installed copy writes the sweep's files only where it is told
            required_figures_dir("the bench sweep's CSV, table and plot")
        except ValueError as error:
            parser.error(str(error))
    if args.replot:
        report_sweep("bench")
        return 0
    if args.repeats < 3:
        parser.error(f"--repeats must be at least 3 (medians of at least 3 runs), got {args.repeats}")
    if not 4 <= args.min_log2 <= args.max_log2 <= 24:
        parser.error(f"need 4 <= --min-log2 <= --max-log2 <= 24, got {args.min_log2} and {args.max_log2}")
    sections = set(args.sections.split(","))
    if not sections <= {"glue", "scaling", "parallel", "sweep", "tiles", "lm"}:
        parser.error(
            f"--sections must be a comma list of glue, scaling, parallel, sweep, tiles, lm; got {args.sections!r}"
        )
    for name in sections & {"tiles", "lm"}:
        if args.device != "cpu" or args.quick:
            parser.error(f"--sections {name} times the CPU kernel in this process: not with --device cuda or --quick")
    if args.against is not None and "lm" not in sections:
        parser.error("--against compares the lm section's training steps: add lm to --sections")
    against = None
    if args.against is not None:  # loaded before any timing, so a wrong path stops at once
        from .lm_step import load_against

        try:
            against = load_against(args.against)
        except ValueError as error:
            parser.error(f"--{error}")
    if args.device == "cuda" and "parallel" in sections and not args.quick:
        parser.error(
            "--device cuda cannot run the parallel section (its simulated backward runs on cpu tensors only); "
            "pick --sections from glue, scaling, sweep"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but torch sees no CUDA GPU (torch.cuda.is_available() is False)")

    failures, tile_failures = [], 0

    def log(result):
        print(describe(result), flush=True)
        if result["max_error"] > tolerance(result):  # NaN (extrapolated) compares False
            failures.append(result)

    if args.device == "cpu":
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32")
    else:
        print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.get_device_name()}, fp32")

    def on_device(run):  # every configuration run where --device says (a CPU run's configurations are unchanged)
        if args.device == "cpu":
            return run
        return lambda cfgs: run([dict(cfg, device=args.device) for cfg in cfgs])

    if args.quick:
        args.min_log2, args.max_log2, args.readable_max_n = 10, 11, 2**10
        run_sweep(args, on_device(measure), log)  # in this process: timings indicative only
    else:
        run = on_device(lambda cfg: in_subprocess(cfg, args.timeout))
        results = []
        if "glue" in sections:
            results += run_glue(args, run, log)
        if "scaling" in sections:
            results += run_scaling(args, run, log)
        if "parallel" in sections:
            results += run_parallel(args, run, log)
        if "sweep" in sections:
            run_sweep(args, run, log)  # writes figures/<args.csv>.csv as it goes
            report_sweep(args.csv)
        if "tiles" in sections:  # in this process, its threads as given
            from .tiles import run_tiles

            for row in run_tiles(repeats=max(5, args.repeats)):
                if not row["max_error"] <= tolerance(dict(N=row["K"])):  # fp32 against float64 (NaN fails)
                    print(f"CHECK FAILED: tiles K={row['K']} D={row['D']}: {row['max_error']:.1e}", file=sys.stderr)
                    tile_failures += 1
        if "lm" in sections:  # in this process, its threads as given (OMP_NUM_THREADS=1 for one)
            from .lm_step import compare_lm_steps, describe_comparison, describe_lm, profile_lm_steps

            if against is not None:  # before (the other checkout) and after (this one), interleaved
                for result in compare_lm_steps(against, repeats=args.repeats):
                    print(describe_comparison(result), flush=True)
            else:
                for result in profile_lm_steps(repeats=args.repeats):
                    print(describe_lm(result), flush=True)
    for result in failures:
        print(f"CHECK FAILED: {describe(result)} (tolerance {tolerance(result):.0e})", file=sys.stderr)
    if args.quick or sections - {"lm"}:  # the lm section times training steps; it checks no output
        bad = len(failures) + tile_failures
        print("all outputs match the oracle" if not bad else f"{bad} outputs do NOT match the oracle")
    return 1 if failures or tile_failures else 0


if __name__ == "__main__":
    sys.exit(main())
