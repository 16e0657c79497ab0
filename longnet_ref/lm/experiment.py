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
figures/07_*.md, .csv and .png (the tables and plots are report.py's), and into the README's
section between its 07 markers. Nothing in the tables is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..analysis.results import paste_into_readme
from .checkpoint import load_checkpoint
from .config import TrainConfig
from .data import load_corpus
from .evaluate import bits_per_byte, recall_accuracy, recall_distances, recall_eval_set
from .report import report_recall, report_table2
from .train import train

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
# from the previous one's weights: at 128 every kind's pattern covers every causal pair (whether
# the retrieval forms there is what the stage's recall shows); at 1024 and 4096 the kinds differ.
# Local is the mixture's first branch alone.
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


def report(runs, readme=None):
    """The `report` command: report.py's tables and figures of the runs defined here, pasted into the README."""
    local_window = RECALL_RUNS["recall-local"]["segment_lengths"][0]
    sections = (
        ("table2", lambda: report_table2(runs, TABLE2_RUNS, TEST_LENGTHS)),
        ("recall", lambda: report_recall(runs, RECALL_RUNS, local_window, RECALL_STAGES[-1]["seq_len"])),
    )
    for section, make in sections:
        markdown = make()
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
