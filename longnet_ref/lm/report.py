"""The experiment's tables and plots: runs/<name>/ (metrics.json, test.json) -> figures/07_*.md, .csv, .png.

`python -m longnet_ref.lm.experiment report --runs runs/` calls `report_table2` and
`report_recall` with the runs experiment.py defines, and pastes the two tables into the
README between its 07 markers. Every number in a table is read from the runs' files: the
training curves and times from metrics.json, the test results from test.json.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection

import matplotlib.pyplot as plt

from ..analysis.complexity import mixture_flops
from ..analysis.results import write_table
from ..analysis.viz import save_fig
from ..checks import as_path, check_instance
from .config import TrainConfig
from .evaluate import check_bucket

TIME_HEADER = ["train time wall / CPU", "tokens per CPU s"]


def load_results(runs, names):
    """{name: {"stages": [metrics of each training stage], "test": test.json}} for the runs that finished."""
    runs = as_path("runs", runs)
    if isinstance(names, str) or not isinstance(names, Collection) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"names must be a list of run names (str), got {names!r}")
    results = {}
    for name in names:
        folder = runs / name
        if (folder / "test.json").is_file():
            stages = sorted(folder.glob("stage*/metrics.json")) or [folder / "metrics.json"]
            results[name] = dict(
                stages=[json.loads(path.read_text()) for path in stages],
                test=json.loads((folder / "test.json").read_text()),
            )
    return results


def check_results(results):
    """`load_results`'s dict, not empty: a plot of no runs would overwrite the committed figure with empty axes."""
    if not isinstance(results, dict) or not results:
        raise ValueError(f"results must be the non-empty dict load_results returns, got {results!r:.80}")
    return results


def training_summary(stages):
    """Wall seconds, CPU seconds, tokens, over all stages. CPU seconds with one thread = an unloaded core's time."""
    if not isinstance(stages, list) or not stages:
        raise ValueError(f"stages must be a non-empty list of metrics.json dicts, got {stages!r:.80}")
    for i, metrics in enumerate(stages):
        if not isinstance(metrics, dict) or not isinstance(metrics.get("train"), list):
            raise ValueError(f"stages[{i}] must be a metrics.json dict with a 'train' list, got {metrics!r:.80}")
    records = [record for metrics in stages for record in metrics["train"]]
    wall = sum(record["seconds"] for record in records)
    cpu = sum(record.get("cpu_seconds", record["seconds"]) for record in records)
    tokens = sum(record["tokens_per_s"] * record["seconds"] for record in records)
    return wall, cpu, tokens


def time_cells(stages):
    """The TIME_HEADER cells of a run: wall / CPU minutes, tokens per CPU second."""
    wall, cpu, tokens = training_summary(stages)
    if cpu <= 0:
        raise ValueError(f"stages record {cpu} CPU seconds of training: no tokens per CPU second to show")
    return [f"{wall / 60:.1f} / {cpu / 60:.1f} min", f"{tokens / cpu:,.0f}"]


def attention_flops_per_token(config, seq_len):
    """Attention FLOPs per token, causal, forward, all layers (`complexity.mixture_flops`; w clipped to N)."""
    check_instance("config", config, TrainConfig)
    ws, rs = config.model_config().branches()
    shape = dict(heads=config.num_heads, head_dim=config.embed_dim // config.num_heads, causal=True)
    return config.num_layers * sum(mixture_flops(seq_len, ws, rs, **shape)) / seq_len


def table2_row(name, result, test_lengths):
    """One model's row of the Table 2 table: its training, its attention cost, bits per byte at each test length."""
    metrics = result["stages"][-1]
    config = TrainConfig(**metrics["train_config"])
    flops = attention_flops_per_token(config, config.seq_len)
    dense = attention_flops_per_token(TrainConfig(**dict(metrics["train_config"], attention="dense")), config.seq_len)
    bpb = {int(n): value for n, value in result["test"]["bpb"].items()}
    tokens = training_summary(result["stages"])[2]
    return (
        [
            name,
            config.seq_len,
            config.batch_size,
            f"{tokens / 1e6:.2f} M",
            f"{flops / 1e3:.0f} K ({flops / dense:.2f})",
        ]
        + time_cells(result["stages"])
        + [f"{bpb[n]:.3f}" for n in test_lengths]
    )


def plot_table2(results, test_lengths):
    """figures/07_table2.png: validation curves, bits per byte against test length, and against context."""
    check_results(results)
    fig, (ax_curve, ax_bpb, ax_context) = plt.subplots(1, 3, figsize=(16, 4.2))
    for name, result in results.items():
        metrics = result["stages"][-1]
        config = TrainConfig(**metrics["train_config"])
        bpb = {int(n): value for n, value in result["test"]["bpb"].items()}
        per_step = config.batch_size * config.seq_len
        evals = metrics["eval"]
        tokens = [evaluation["step"] * per_step / 1e6 for evaluation in evals]
        ax_curve.plot(tokens, [evaluation["val_bpb"] for evaluation in evals], "o-", label=name)
        ax_bpb.plot(test_lengths, [bpb[n] for n in test_lengths], "o-", label=name)
        by_context = {int(position): value for position, value in result["test"]["bpb_by_context"].items()}
        ax_context.plot(list(by_context), list(by_context.values()), "o-", label=name)
    ax_curve.set(xlabel="training tokens (M)", ylabel="bits per byte (validation, training length)", title="training")
    ax_bpb.set(xscale="log", xlabel="test length (bytes)", ylabel="bits per byte", title="Table 2 in miniature")
    ax_bpb.set_xticks(test_lengths, [str(n) for n in test_lengths])
    ax_bpb.minorticks_off()
    ax_context.set(
        xscale="log",
        xlabel=f"position in a {test_lengths[-1]}-byte window (bytes of context)",
        ylabel="bits per byte",
        title="how much context each model uses",
    )
    for ax in (ax_curve, ax_bpb, ax_context):
        ax.grid(alpha=0.3)
        ax.legend()
    save_fig(fig, "07_table2")
    plt.close(fig)


def report_table2(runs, names, test_lengths):
    """figures/07_table2.md, .csv and .png from the finished runs among `names`; the markdown, or None if none."""
    results = load_results(runs, names)
    if not results:
        return None
    header = ["model", "train length", "batch", "train tokens", "attention FLOPs/token (vs dense)", *TIME_HEADER]
    header += [f"bpb @ {n}" for n in test_lengths]
    rows = [table2_row(name, result, test_lengths) for name, result in results.items()]
    plot_table2(results, test_lengths)
    return write_table("07_table2", header, rows)


def recall_branches(config):
    """The branches of a recall model as the table shows them: "dense", or "(w,r) (w,r) ..."."""
    check_instance("config", config, TrainConfig)
    ws, rs = config.model_config().branches()
    return "dense" if config.attention == "dense" else " ".join(f"({w},{r})" for w, r in zip(ws, rs))


def bucket_range(name):
    """ "d=a-b" -> (a, b): the inverse of `evaluate.bucket_name`."""
    match = re.fullmatch(r"d=(\d+)-(\d+)", name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"name must be a bucket name 'd=a-b' (evaluate.bucket_name), got {name!r}")
    return check_bucket("name", tuple(map(int, match.groups())))


def plot_recall(results, buckets, local_window, seq_len):
    """figures/07_recall.png: recall accuracy in each distance bucket, one line per model."""
    check_results(results)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    middles = [math.sqrt(a * b) for a, b in map(bucket_range, buckets)]  # log-scale middle of a ... b
    for result in results.values():
        config = TrainConfig(**result["stages"][-1]["train_config"])
        accuracy = result["test"]["accuracy"]
        label = "dense" if config.attention == "dense" else f"{config.attention}: {recall_branches(config)}"
        ax.plot(middles, [accuracy[bucket] for bucket in buckets], "o-", label=label)
    ax.axhline(1 / 8, color="gray", ls=":", label="chance (1/8)")
    ax.axhline(0.9, color="gray", ls="-", lw=0.5, label="target 0.90")
    ax.axvline(local_window, color="gray", ls="--", lw=0.8, label=f"local window ({local_window})")
    ax.set_xscale("log")
    ax.set_xticks(middles, [bucket.removeprefix("d=") for bucket in buckets], fontsize=7, rotation=30, ha="right")
    ax.minorticks_off()
    ax.set(xlabel="distance from the needle (bucket, bytes)", ylabel="recall accuracy", ylim=(-0.03, 1.03))
    ax.set_title(f"Key-value recall, tested at N = {seq_len}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_fig(fig, "07_recall")
    plt.close(fig)


def report_recall(runs, names, local_window, seq_len):
    """figures/07_recall.md, .csv and .png from the finished runs among `names` (tested at length `seq_len`).

    One row per model: attention, train CPU s (all stages), accuracy in each bucket "d=a-b". The
    footer gives each model's branches at seq_len, its stages and dilated over dense CPU time.
    """
    results = load_results(runs, names)
    if not results:
        return None
    buckets = sorted({bucket for result in results.values() for bucket in result["test"]["accuracy"]}, key=bucket_range)
    header = ["attention", "train CPU s", *buckets]
    rows, notes, cpu = [], [], {}
    for result in results.values():
        config = TrainConfig(**result["stages"][-1]["train_config"])
        _, cpu[config.attention], _ = training_summary(result["stages"])
        accuracy = result["test"]["accuracy"]
        rows.append([config.attention, f"{cpu[config.attention]:.0f}"] + [f"{accuracy[b]:.2f}" for b in buckets])
        stages = " + ".join(f"{m['train_config']['seq_len']}x{m['train_config']['steps']}" for m in result["stages"])
        branches = "dense attention" if config.attention == "dense" else f"branches {recall_branches(config)}"
        notes.append(f"- {config.attention}: {branches} at {seq_len}; stages (length x steps) {stages}")
    if "dense" in cpu and "dilated" in cpu:
        notes.append(f"- dilated / dense train CPU seconds: {cpu['dilated'] / cpu['dense']:.2f}")
    plot_recall(results, buckets, local_window, seq_len)
    return write_table("07_recall", header, rows, footer="\n" + "\n".join(notes) + "\n")
