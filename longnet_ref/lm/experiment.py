"""The experiment behind notebook 07 and the README: LongNet's Table 2 in miniature, and reach.

    python -m longnet_ref.lm.experiment table2 --runs runs/    train + test the Table 2 models
    python -m longnet_ref.lm.experiment recall --runs runs/    train + test the recall models
    python -m longnet_ref.lm.experiment report --runs runs/    tables and figures from the results

1. Table 2 in miniature (paper: dense trained at 2K against LongNet trained at 32K, perplexity
   at test lengths 2K / 8K / 32K). Here: dense trained at 256 bytes against LongNet trained at
   1024 = 4 x 256 with the same number of training tokens (batch 16 x 256 = 4 x 1024), and the
   two baselines at 1024: dense (what dilated attention approximates, at full cost) and local
   (LongNet's first branch alone, the cheap sparse baseline). Every model is scored in bits
   per byte on the same validation bytes cut into windows of 256 ... 4096.
2. Recall against distance: dense, local and dilated trained on the key-value recall task
   (`data.recall_batch`), accuracy at fixed distances up to 7/8 of the sequence.

Each run trains with `train.train` into runs/<name>/ (skipped when already finished, resumed
when a checkpoint exists), then writes runs/<name>/test.json. `report` turns those files into
figures/07_*.md, .csv and .png, and into the README's section between its 07 markers. Nothing
in the tables is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..analysis.complexity import mixture_flops
from .data import load_corpus
from .evaluate import bits_per_byte, recall_accuracy, recall_distances, recall_eval_set
from ..analysis.results import paste_into_readme, write_table
from .train import TrainConfig, load_checkpoint, train
from ..analysis.viz import save_fig

TABLE2_COMMON = dict(embed_dim=128, num_heads=4, num_layers=4, steps=500, lr=2e-3, eval_every=125, warmup=50)
TABLE2_RUNS = {
    "dense-256": dict(attention="dense", seq_len=256, batch_size=16, eval_size=64),  # 64 x 256 = 16 x 1024 bytes
    "longnet-1024": dict(attention="dilated", seq_len=1024, batch_size=4, segment_lengths=[256, 512, 1024]),
    "dense-1024": dict(attention="dense", seq_len=1024, batch_size=4),
    "local-1024": dict(attention="local", seq_len=1024, batch_size=4, segment_lengths=[256], dilation_rates=[1]),
}
TEST_LENGTHS = (256, 512, 1024, 2048, 4096)
TEST_BYTES = 16 * 4096  # the same 64 KiB of validation code at every test length

# Recall: learning to fetch a value across thousands of positions from scratch sits on a long
# plateau, so every model is trained in stages (sequence-length warm-up), each stage starting
# from the previous one's weights: at 128 every kind attends everything and the retrieval forms;
# at 1024 and 4096 the kinds differ. Local is the mixture's first branch alone.
RECALL_COMMON = dict(task="recall", embed_dim=128, num_heads=4, num_layers=2, num_pairs=8, queries_per_pair=4)
RECALL_STAGES = (
    dict(seq_len=128, batch_size=16, steps=800, lr=3e-3, warmup=50, eval_every=400, eval_size=32),
    dict(seq_len=1024, batch_size=8, steps=200, lr=1e-3, warmup=20, eval_every=100, eval_size=16),
    dict(seq_len=4096, batch_size=4, steps=150, lr=1e-3, warmup=10, eval_every=75, eval_size=8),
)
RECALL_RUNS = {
    "recall-dense": dict(attention="dense"),
    "recall-local": dict(attention="local", segment_lengths=[256], dilation_rates=[1]),
    "recall-dilated": dict(
        attention="dilated", segment_lengths=[256, 512, 1024, 2048, 4096], dilation_rates=[1, 2, 4, 4, 4]
    ),  # r <= H = 4, so the heads' offsets cover every residue (notebook 03)
}
RECALL_TEST_SEQUENCES = 64


def run_config(common, run, threads):
    values = dict(common, threads=threads, **run)
    if values.get("attention") == "dilated" and "dilation_rates" not in values:
        values["dilation_rates"] = [2**i for i in range(len(values["segment_lengths"]))]
    return TrainConfig(**values)


def train_run(name, config, runs, corpus=None, progress=True, init_from=None):
    """Train runs/<name> unless it has finished; resume it if a checkpoint exists."""
    out = Path(runs) / name
    checkpoint = out / "checkpoint.pt"
    if checkpoint.is_file() and torch.load(checkpoint, weights_only=False)["step"] >= config.steps:
        return load_checkpoint(checkpoint)[0]
    resume = checkpoint if checkpoint.is_file() else None
    start = time.perf_counter()
    model, _ = train(
        config, out, resume=resume, init_from=None if resume else init_from, corpus=corpus, progress=progress
    )
    print(f"{name}: trained in {time.perf_counter() - start:.0f} s")
    return model


def attention_flops_per_token(config, seq_len):
    """Attention FLOPs per token, causal, forward, all layers (`complexity.mixture_flops`; w clipped to N)."""
    ws, rs = config.model_config().branches()
    shape = dict(heads=config.num_heads, head_dim=config.embed_dim // config.num_heads, causal=True)
    return config.num_layers * sum(mixture_flops(seq_len, ws, rs, **shape)) / seq_len


def table2(runs, threads=1, progress=True):
    corpus = load_corpus()
    for name, run in TABLE2_RUNS.items():
        config = run_config(TABLE2_COMMON, run, threads)
        model = train_run(name, config, runs, corpus, progress)
        start = time.perf_counter()
        bpb = {n: bits_per_byte(model, corpus["val"], n, TEST_BYTES) for n in TEST_LENGTHS[:-1]}
        longest = TEST_LENGTHS[-1]
        bpb[longest], per_position = bits_per_byte(model, corpus["val"], longest, TEST_BYTES, by_position=True)
        # bits per byte against the context a byte has: positions [2^i, 2^(i+1)) of the longest windows
        by_context = {2**i: per_position[2**i : 2 ** (i + 1)].mean().item() for i in range(longest.bit_length() - 1)}
        print(f"{name}: bits per byte {bpb} ({time.perf_counter() - start:.0f} s)")
        result = {"bpb": bpb, "bpb_by_context": by_context}
        (Path(runs) / name / "test.json").write_text(json.dumps(result, indent=1))


def recall(runs, threads=1, progress=True):
    N = RECALL_STAGES[-1]["seq_len"]
    eval_set = recall_eval_set(N, RECALL_TEST_SEQUENCES, num_pairs=8, queries_per_pair=4)
    for name, run in RECALL_RUNS.items():
        previous = None
        for i, stage in enumerate(RECALL_STAGES):
            stage_name = f"{name}/stage{i + 1}-{stage['seq_len']}"
            model = train_run(
                stage_name, run_config(dict(RECALL_COMMON, **stage), run, threads), runs, None, progress, previous
            )
            previous = Path(runs) / stage_name / "checkpoint.pt"
        accuracy, loss = recall_accuracy(model, eval_set, buckets=recall_distances(N))
        print(f"{name}: accuracy by distance {accuracy}, loss {loss:.3f}")
        (Path(runs) / name / "test.json").write_text(json.dumps({"accuracy": accuracy, "loss": loss}, indent=1))


def load_results(runs, names):
    """{name: {"stages": [metrics of each training stage], "test": test.json}} for the runs that finished."""
    results = {}
    for name in names:
        folder = Path(runs) / name
        if (folder / "test.json").is_file():
            stages = sorted(folder.glob("stage*/metrics.json")) or [folder / "metrics.json"]
            results[name] = dict(
                stages=[json.loads(path.read_text()) for path in stages],
                test=json.loads((folder / "test.json").read_text()),
            )
    return results


def training_summary(stages):
    """Wall seconds, CPU seconds, tokens, over all stages. CPU seconds with one thread = an unloaded core's time."""
    records = [r for metrics in stages for r in metrics["train"]]
    wall = sum(r["seconds"] for r in records)
    cpu = sum(r.get("cpu_seconds", r["seconds"]) for r in records)
    tokens = sum(r["tokens_per_s"] * r["seconds"] for r in records)
    return wall, cpu, tokens


def time_cells(stages):
    wall, cpu, tokens = training_summary(stages)
    return [f"{wall / 60:.1f} / {cpu / 60:.1f} min", f"{tokens / cpu:,.0f}"]


TIME_HEADER = ["train time wall / CPU", "tokens per CPU s"]


def report_table2(runs):
    import matplotlib.pyplot as plt

    results = load_results(runs, TABLE2_RUNS)
    if not results:
        return None
    header = ["model", "train length", "batch", "train tokens", "attention FLOPs/token (vs dense)", *TIME_HEADER]
    header += [f"bpb @ {n}" for n in TEST_LENGTHS]
    rows = []
    fig, (ax_curve, ax_bpb, ax_context) = plt.subplots(1, 3, figsize=(16, 4.2))
    for name, result in results.items():
        metrics = result["stages"][-1]
        config = TrainConfig(**metrics["train_config"])
        flops = attention_flops_per_token(config, config.seq_len)
        dense = attention_flops_per_token(
            TrainConfig(**dict(metrics["train_config"], attention="dense")), config.seq_len
        )
        bpb = {int(n): b for n, b in result["test"]["bpb"].items()}
        tokens = training_summary(result["stages"])[2]
        rows.append(
            [
                name,
                config.seq_len,
                config.batch_size,
                f"{tokens / 1e6:.2f} M",
                f"{flops / 1e3:.0f} K ({flops / dense:.2f})",
            ]
            + time_cells(result["stages"])
            + [f"{bpb[n]:.3f}" for n in TEST_LENGTHS]
        )
        per_step = config.batch_size * config.seq_len
        evals = metrics["eval"]
        ax_curve.plot([e["step"] * per_step / 1e6 for e in evals], [e["val_bpb"] for e in evals], "o-", label=name)
        ax_bpb.plot(TEST_LENGTHS, [bpb[n] for n in TEST_LENGTHS], "o-", label=name)
        by_context = {int(p): b for p, b in result["test"]["bpb_by_context"].items()}
        ax_context.plot(list(by_context), list(by_context.values()), "o-", label=name)
    ax_curve.set(xlabel="training tokens (M)", ylabel="bits per byte (validation, training length)", title="training")
    ax_bpb.set(xscale="log", xlabel="test length (bytes)", ylabel="bits per byte", title="Table 2 in miniature")
    ax_bpb.set_xticks(TEST_LENGTHS, [str(n) for n in TEST_LENGTHS])
    ax_bpb.minorticks_off()
    ax_context.set(
        xscale="log",
        xlabel=f"position in a {TEST_LENGTHS[-1]}-byte window (bytes of context)",
        ylabel="bits per byte",
        title="how much context each model uses",
    )
    for ax in (ax_curve, ax_bpb, ax_context):
        ax.grid(alpha=0.3)
        ax.legend()
    save_fig(fig, "07_table2")
    plt.close(fig)
    return write_table("07_table2", header, rows)


def report_recall(runs):
    import matplotlib.pyplot as plt

    results = load_results(runs, RECALL_RUNS)
    if not results:
        return None
    distances = sorted({int(d) for r in results.values() for d in r["test"]["accuracy"]})
    header = ["model", "branches (w, r)", "stages (length x steps)", *TIME_HEADER]
    header += [f"d={d}-{d + 3}" for d in distances]  # each bucket: the four residues mod 4
    rows = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, result in results.items():
        config = TrainConfig(**result["stages"][-1]["train_config"])
        ws, rs = config.model_config().branches()
        branches = "dense" if config.attention == "dense" else " ".join(f"({w},{r})" for w, r in zip(ws, rs))
        stages = " + ".join(f"{m['train_config']['seq_len']}x{m['train_config']['steps']}" for m in result["stages"])
        accuracy = {int(d): a for d, a in result["test"]["accuracy"].items()}
        rows.append([name, branches, stages, *time_cells(result["stages"])] + [f"{accuracy[d]:.2f}" for d in distances])
        ax.plot(distances, [accuracy[d] for d in distances], "o-", label=f"{config.attention}: {branches}")
    ax.axhline(1 / 8, color="gray", ls=":", label="chance (1/8)")
    local_window = RECALL_RUNS["recall-local"]["segment_lengths"][0]
    ax.axvline(local_window, color="gray", ls="--", lw=0.8, label=f"local window ({local_window})")
    ax.set(
        xscale="log", xlabel="distance from the needle (d ... d+3, bytes)", ylabel="recall accuracy", ylim=(-0.03, 1.03)
    )
    ax.set_title(f"Key-value recall, tested at N = {RECALL_STAGES[-1]['seq_len']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_fig(fig, "07_recall")
    plt.close(fig)
    return write_table("07_recall", header, rows)


def report(runs, readme=None):
    for section, make in (("table2", report_table2), ("recall", report_recall)):
        markdown = make(runs)
        if markdown is not None:
            print(markdown)
            paste_into_readme(f"07:{section}", markdown, readme)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m longnet_ref.lm.experiment", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("table2", "recall", "report", "all"))
    parser.add_argument("--runs", required=True, help="folder for the runs (checkpoints, metrics, test results)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run (1: kind to a shared machine)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be a positive integer, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.what in ("table2", "all"):
        table2(args.runs, args.threads, not args.no_progress)
    if args.what in ("recall", "all"):
        recall(args.runs, args.threads, not args.no_progress)
    report(args.runs)


if __name__ == "__main__":
    main()
