"""What `python -m longnet_ref.bench` writes: the sweep's CSV, its table and its plot.

`figures/bench.csv` holds one row per configuration. A sweep writes `figures/bench.partial.csv`
beside it after every result (an interrupted sweep keeps what it measured there) and replaces
`bench.csv` with it only when the sweep is complete (`finish_csv`), so the committed results
are never cut short; every write is atomic (`files.write_atomic`). `write_outputs` draws `figures/bench.png` from it and
writes `figures/bench_table.md`, which it pastes into the README between its markers
(`analysis.results`). `python -m longnet_ref.bench --replot` redoes both from the CSV.
"""

from __future__ import annotations

import csv
import io
import math
import os

from ..files import write_atomic

CSV_KEYS = ["path", "N", "B", "H", "D", "causal", "backward", "seconds", "gflops", "ideal_flop_ratio",
            "matmul_gflops", "max_error", "peak_rss_mb", "extrapolated", "threads"]  # fmt: skip


def write_csv(results, name, *, partial=False):
    """figures/<name>.csv (or <name>.partial.csv while a sweep runs), one row per configuration, atomically."""
    from ..analysis.viz import required_figures_dir  # here: the timing workers need no matplotlib

    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CSV_KEYS, extrasaction="ignore")
    writer.writeheader()
    for result in results:
        writer.writerow(result)
    folder = required_figures_dir("the bench's CSV")
    return write_atomic(folder / f"{name}{'.partial' if partial else ''}.csv", text.getvalue())


def finish_csv(name):
    """A complete sweep: figures/<name>.partial.csv replaces figures/<name>.csv in one rename."""
    from ..analysis.viz import required_figures_dir

    folder = required_figures_dir("the bench's CSV")
    os.replace(folder / f"{name}.partial.csv", folder / f"{name}.csv")
    return folder / f"{name}.csv"


def read_csv(name):
    """The rows `write_csv` wrote, with their types back."""
    from ..analysis.viz import required_figures_dir

    def typed(key, value):
        if key in ("causal", "backward", "extrapolated"):
            return value == "True"
        if key == "path":
            return value
        if value in ("", None):  # not measured (an extrapolated row), or a column an older CSV lacks
            return None
        return int(value) if key in ("N", "B", "H", "D", "threads") else float(value)

    with open(required_figures_dir("the bench's CSV") / f"{name}.csv", newline="") as f:
        return [{key: typed(key, value) for key, value in row.items()} for row in csv.DictReader(f)]


def sweep_table(results):
    """One row per N: non-causal forward and forward+backward, dense against fast (causal rows: CSV and plot)."""

    def find(path, N, backward):
        key = (path, N, backward, False)
        return next((row for row in results if (row["path"], row["N"], row["backward"], row["causal"]) == key), None)

    def seconds(row):  # 3 significant digits, whole seconds from 100 s on; ~ marks an extrapolation
        if row is None:
            return ""
        value = f"{row['seconds']:.0f}" if row["seconds"] >= 100 else f"{row['seconds']:.3g}"
        return ("~" if row["extrapolated"] else "") + value

    header = ["N", "dense fwd s", "fast fwd s", "fast / dense fwd", "ideal FLOP ratio", "dense fwd+bwd s",
              "fast fwd+bwd s", "fast / dense fwd+bwd", "fast GFLOP/s fwd+bwd", "matmul GFLOP/s",
              "peak RSS fwd+bwd"]  # fmt: skip
    rows = []
    for N in sorted({row["N"] for row in results}):
        cells = [f"2^{int(math.log2(N))}"]
        for backward in (False, True):
            dense, fast = find("dense", N, backward), find("fast", N, backward)
            cells += [seconds(dense), seconds(fast)]
            ratio = f"{fast['seconds'] / dense['seconds']:.3f}" if dense and fast else ""
            cells.append(("~" if ratio and dense["extrapolated"] else "") + ratio)
            if not backward:
                cells.append(f"{fast['ideal_flop_ratio']:.3f}" if fast else "")
        # the machine's ceiling in the same process: fp32 matmul between the timed rounds
        cells += (
            [f"{fast['gflops']:.1f}", f"{fast['matmul_gflops']:.1f}", f"{fast['peak_rss_mb'] / 1024:.2f} GB"]
            if fast
            else [""] * 3
        )
        rows.append(cells)
    return header, rows


def write_outputs(results, name, footer=""):
    """figures/<name>.png and <name>_table.md from the sweep's rows; the table goes into the README too."""
    import matplotlib

    from ..analysis.results import paste_into_readme, write_table
    from ..analysis.viz import save_fig

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for ax, backward in zip(axes, (False, True)):
        for path, color in (("dense", "C0"), ("readable", "C2"), ("fast", "C1")):
            for causal, style in ((False, "-"), (True, ":")):
                pts = [
                    row
                    for row in results
                    if row["path"] == path and row["backward"] == backward and row["causal"] == causal
                ]
                measured = [row for row in pts if not row.get("extrapolated")]
                label = f"{path}{' causal' if causal else ''}"
                ax.loglog([row["N"] for row in measured], [row["seconds"] for row in measured], style,
                          color=color, marker="o", ms=3, label=label)  # fmt: skip
                extra = [row for row in pts if row.get("extrapolated")]
                if extra and measured:
                    ax.loglog([measured[-1]["N"]] + [row["N"] for row in extra],
                              [measured[-1]["seconds"]] + [row["seconds"] for row in extra], style, color=color,
                              alpha=0.35)  # fmt: skip
        ax.set(xlabel="sequence length N", ylabel="seconds", title="forward+backward" if backward else "forward")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("dense SDPA vs dilated attention on this CPU (faded: dense extrapolated as N^2)")
    png = save_fig(fig, name)
    markdown = write_table(f"{name}_table", *sweep_table(results), with_csv=False, footer=footer)
    if name == "bench" and not paste_into_readme("bench:sweep", markdown):  # only the full sweep goes there
        print("note: no <!-- bench:sweep --> markers in README.md; the table was not pasted")
    print(markdown)
    print(f"wrote {png} and {png.with_name(name + '_table.md')}")


def scaling_line(small, large, flops):
    """The scaling target's sentence: t(large) / t(small), their FLOP ratio `flops`, the large run's peak memory."""
    ratio = large["seconds"] / small["seconds"]
    return (f"scaling: t(2^{int(math.log2(large['N']))}) / t(2^{int(math.log2(small['N']))}) = {ratio:.1f} "
            f"(FLOP ratio {flops:.1f}; target <= {64 * 1.25:.0f}); peak RSS at 2^{int(math.log2(large['N']))}: "
            f"{large['peak_rss_mb'] / 1024:.1f} GB")  # fmt: skip
