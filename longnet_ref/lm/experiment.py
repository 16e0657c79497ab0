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
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..analysis.results import paste_into_readme
from ..analysis.viz import required_figures_dir
from ..checks import as_count, as_path, as_positive_int, check_flag, check_instance
from ..cli import HelpFormatter
from ..files import write_atomic
from .checkpoint import load_checkpoint, read_checkpoint
from .config import TrainConfig
from .data import load_corpus
from .evaluate import bits_per_byte, recall_accuracy, recall_buckets, recall_eval_set
from .report import bucket_range, report_recall, report_table2
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

# Recall: dense, local and dilated models trained on the recall task and tested at RECALL_LENGTH.
# A dilated head sees a far needle in one hop only when r divides the distance; otherwise layer 1
# must first copy the needle into its neighbours (a key of the query's residue) and layer 2
# fetch it by key: a two-hop circuit. From scratch at 4096 the gradient towards either hop is
# spread over thousands of keys (a long plateau at chance), so every model is trained in stages,
# each starting from the previous one's weights:
# 1. a warm-up at 128 bytes with the final branches, which at 128 cover every causal pair
#    (w_0 = 256 >= 128): every kind learns one-hop retrieval by key;
# 2. stages at 256 ... RECALL_LENGTH with the branches scaled to the stage's length N (w = N/16
#    ... N, the same rates), so the sparse branches are needed from 256 bytes on, where steps are
#    cheap; the last two stages are the final mixture itself, with 16 x 64 answers per sequence:
#    the two hops to the farthest needles are learned there (README, "Recall against distance"),
#    and the second restarts the schedule at half the rate (500 more steps at 4096 were what
#    the farthest bucket still needed; halving the stage at 256 to pay for them was worse).
# Local is the mixture's first branch alone, scaled the same way.
RECALL_LENGTH = 4096
RECALL_RATES = (1, 2, 4, 4, 4)  # r <= H: the heads' offsets cover every residue (notebook 03)
RECALL_COMMON = dict(task="recall", embed_dim=128, num_heads=4, num_layers=2)
_RECALL_FINAL = dict(
    seq_len=RECALL_LENGTH, batch_size=2, steps=1000, lr=2e-3, warmup=10, num_pairs=16, queries_per_pair=64
)
RECALL_STAGES = (
    dict(seq_len=128, batch_size=16, steps=1200, lr=3e-3, warmup=50, num_pairs=4, queries_per_pair=8),
    dict(seq_len=256, batch_size=8, steps=3000, lr=2e-3, warmup=20, num_pairs=8, queries_per_pair=8),
    dict(seq_len=1024, batch_size=4, steps=300, lr=1e-3, warmup=20, num_pairs=16, queries_per_pair=16),
    _RECALL_FINAL,
    # the same again, its schedule restarted (warmup, cosine) at half the rate, on a fresh data stream
    dict(_RECALL_FINAL, steps=500, lr=1e-3, seed=1),
)
RECALL_STAGE_EVAL = dict(eval_size=2)  # sequences per distance bucket at each stage's own evaluations
RECALL_RUNS = ("recall-dense", "recall-local", "recall-dilated")
RECALL_TEST_SEQUENCES = 16  # per distance bucket, 8 needles x 4 queries each: 512 queries per bucket


def recall_branches(name, seq_len):
    """The attention of a recall model at a stage of length seq_len: TrainConfig fields (see the comment above)."""
    if name not in RECALL_RUNS:
        raise ValueError(f"name must be one of the recall runs {RECALL_RUNS}, got {name!r}")
    seq_len = as_positive_int("seq_len", seq_len)
    kind = name.removeprefix("recall-")
    if kind == "dense":
        return dict(attention="dense")
    halvings = len(RECALL_RATES) - 1  # the first segment is N / 2^halvings = N/16
    # shorter than the final first segment (the warm-up): the final branches, else scaled to seq_len
    scale = RECALL_LENGTH if seq_len < RECALL_LENGTH >> halvings else seq_len
    segments = [scale >> i for i in reversed(range(halvings + 1))]  # N/16, N/8, N/4, N/2, N
    if kind == "local":
        return dict(attention="local", segment_lengths=segments[:1], dilation_rates=[1])
    return dict(attention="dilated", segment_lengths=segments, dilation_rates=list(RECALL_RATES))


def run_config(common, run, threads):
    """The TrainConfig of a run: the fields it shares with its kind (`common`), its own (`run`), and `threads`."""
    check_instance("common", common, dict)
    check_instance("run", run, dict)
    values = dict(common, threads=as_positive_int("threads", threads), **run)
    if values.get("attention") == "dilated" and "dilation_rates" not in values:
        values["dilation_rates"] = [2**i for i in range(len(values["segment_lengths"]))]
    return TrainConfig(**values)


def finished(out, config):
    """Whether the run in the folder `out` has trained all of `config.steps`."""
    checkpoint = Path(out) / "checkpoint.pt"
    return checkpoint.is_file() and read_checkpoint(checkpoint, flag="the")["step"] >= config.steps


def tokens(config):
    """The tokens a run trains on: what the overall progress bar counts (its ETA spans runs of any size)."""
    return config.steps * config.batch_size * config.seq_len


def overall_bar(stages, runs, progress, desc):
    """One bar over every training run of a command ({name: config}), in training tokens, with the
    ETA of the whole command; runs already finished count as done. Off with progress=False and when
    stderr is not a terminal (CI logs), like bench's sweep bar."""
    done = sum(tokens(config) for name, config in stages.items() if finished(Path(runs) / name, config))
    total = sum(map(tokens, stages.values()))
    return tqdm(total=total, initial=done, desc=desc, unit="tok", unit_scale=True, disable=None if progress else True)


def train_run(name, config, runs, corpus=None, progress=True, init_from=None, bar=None):
    """Train runs/<name> unless it has finished; resume it if a checkpoint exists. `bar`: the overall bar, if any."""
    out = Path(runs) / name
    checkpoint = out / "checkpoint.pt"
    if finished(out, config):
        return load_checkpoint(checkpoint)[0]
    resume = checkpoint if checkpoint.is_file() else None
    start = time.perf_counter()
    model, _ = train(
        config, out, resume=resume, init_from=None if resume else init_from, corpus=corpus, progress=progress
    )
    tqdm.write(f"{name}: trained in {time.perf_counter() - start:.0f} s")
    if bar is not None:
        bar.update(tokens(config))
    return model


def where(model):
    """The device the model was trained on (a gpu run's model is tested on the gpu)."""
    param = next(check_instance("model", model, torch.nn.Module, "a torch.nn.Module").parameters(), None)
    if param is None:
        raise ValueError(f"model has no parameters, so no device it was trained on: {type(model).__name__}")
    return str(param.device)


def table2(runs, threads=1, progress=True):
    """Train and test the Table 2 runs into `runs`, one after the other."""
    runs = as_path("runs", runs)
    check_flag("progress", progress)
    configs = {name: run_config(TABLE2_COMMON, run, threads) for name, run in TABLE2_RUNS.items()}
    corpus = load_corpus()
    with overall_bar(configs, runs, progress, "table2") as bar:
        for name, config in configs.items():
            table2_test(name, train_run(name, config, runs, corpus, progress, bar=bar), corpus["val"], runs)


def table2_test(name, model, val, runs):
    """runs/<name>/test.json: bits per byte at every test length, and against the context a byte has."""
    start = time.perf_counter()
    bpb = {n: bits_per_byte(model, val, n, TEST_BYTES, device=where(model)) for n in TEST_LENGTHS[:-1]}
    longest = TEST_LENGTHS[-1]
    bpb[longest], per_position = bits_per_byte(model, val, longest, TEST_BYTES, by_position=True, device=where(model))
    # bits per byte against the context a byte has: positions [2^i, 2^(i+1)) of the longest windows
    by_context = {2**i: per_position[2**i : 2 ** (i + 1)].mean().item() for i in range(longest.bit_length() - 1)}
    tqdm.write(f"{name}: bits per byte {bpb} ({time.perf_counter() - start:.0f} s)")
    result = {"bpb": bpb, "bpb_by_context": by_context}
    write_atomic(Path(runs) / name / "test.json", json.dumps(result, indent=1))


def recall_stage_configs(name, threads=1):
    """The TrainConfig of each training stage of one recall model."""
    common = dict(RECALL_COMMON, **RECALL_STAGE_EVAL)
    return [
        run_config(
            dict(common, eval_every=max(1, stage["steps"] // 4), **stage),
            recall_branches(name, stage["seq_len"]),
            threads,
        )
        for stage in RECALL_STAGES
    ]


def recall_stages(name, threads=1):
    """{runs/ folder of each training stage of one recall model: its TrainConfig}."""
    return {f"{name}/stage{i + 1}-{c.seq_len}": c for i, c in enumerate(recall_stage_configs(name, threads))}


def recall_model(name, runs, threads=1, progress=True, bar=None):
    """Train one recall model stage by stage (each from the previous one's weights), then test it at RECALL_LENGTH."""
    previous = None
    for stage_name, config in recall_stages(name, threads).items():
        model = train_run(stage_name, config, runs, None, progress, previous, bar)
        previous = Path(runs) / stage_name / "checkpoint.pt"
    eval_set = recall_eval_set(RECALL_LENGTH, RECALL_TEST_SEQUENCES, num_pairs=8, queries_per_pair=4)
    accuracy, loss = recall_accuracy(model, eval_set, buckets=recall_buckets(RECALL_LENGTH), device=where(model))
    by_residue = residue_accuracy(
        model, eval_set, far=recall_branches("recall-local", RECALL_LENGTH)["segment_lengths"][0]
    )
    tqdm.write(
        f"{name}: accuracy by distance {accuracy}, beyond the local window by d mod 4 {by_residue}, loss {loss:.3f}"
    )
    result = {"accuracy": accuracy, "accuracy_by_residue": by_residue, "loss": loss}
    write_atomic(Path(runs) / name / "test.json", json.dumps(result, indent=1))
    return name


def residue_accuracy(model, eval_set, far, modulus=4):
    """{d mod `modulus`: accuracy} over the queries farther than `far`: where a dilated model's two hops show.

    With r = 4, distances that 4 divides are one hop away through the sparse branches; the
    others need layer 1 to have copied the needle into the neighbour of the query's residue.
    """
    far, modulus = as_count("far", far), as_positive_int("modulus", modulus)
    per_distance, _ = recall_accuracy(model, eval_set, device=where(model))  # {"d=d-d": accuracy}; few queries each
    hits, counts = [0.0] * modulus, [0] * modulus
    for bucket, value in per_distance.items():
        d = bucket_range(bucket)[1]
        if d > far:
            hits[d % modulus] += value
            counts[d % modulus] += 1
    return {str(j): hits[j] / counts[j] for j in range(modulus) if counts[j]}


def recall(runs, threads=1, progress=True, jobs=1):
    """Train and test the recall models, `jobs` at a time (each in its own process with `threads` threads).

    One overall bar counts the training tokens of every stage of every model; with jobs > 1 the
    workers show no bars (they would overwrite each other) and a model's tokens count when it finishes.
    """
    runs, jobs = as_path("runs", runs), as_positive_int("jobs", jobs)
    check_flag("progress", progress)
    stages = {name: recall_stages(name, threads) for name in RECALL_RUNS}  # checks threads
    every_stage = {stage: config for per_model in stages.values() for stage, config in per_model.items()}
    with overall_bar(every_stage, runs, progress, "recall") as bar:
        if jobs == 1:
            for name in RECALL_RUNS:
                recall_model(name, runs, threads, progress, bar)
            return
        # the tokens each model has left to train, counted when its process is done
        left = {name: sum(tokens(c) for s, c in per_model.items() if not finished(runs / s, c))
                for name, per_model in stages.items()}  # fmt: skip
        # dense first: it is the longest, so the other worker trains local and dilated meanwhile
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=jobs, mp_context=context, initializer=torch.set_num_threads, initargs=(threads,)
        ) as pool:
            for done in as_completed([pool.submit(recall_model, name, runs, threads, False) for name in RECALL_RUNS]):
                bar.update(left[done.result()])  # recall_model returns the model's name


def report(runs, readme=None):
    """The `report` command: report.py's tables and figures of the runs defined here, pasted into the README.

    A section is reported only when every one of its runs has finished (test.json written):
    until then its figures, tables and README section stay as they are.
    """
    runs = as_path("runs", runs)
    local_window = recall_branches("recall-local", RECALL_LENGTH)["segment_lengths"][0]
    sections = (
        ("table2", list(TABLE2_RUNS), lambda: report_table2(runs, TABLE2_RUNS, TEST_LENGTHS)),
        ("recall", list(RECALL_RUNS), lambda: report_recall(runs, RECALL_RUNS, local_window, RECALL_LENGTH)),
    )
    for section, names, make in sections:
        missing = [name for name in names if not (Path(runs) / name / "test.json").is_file()]
        if missing:
            print(f"{section}: {len(names) - len(missing)} of {len(names)} runs finished (not {missing}); not reported")
            continue
        markdown = make()
        print(markdown)
        if not paste_into_readme(f"07:{section}", markdown, readme):
            print(f"{section}: no README of a checkout with the 07:{section} markers; figures/ written only")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m longnet_ref.lm.experiment",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "what",
        choices=("table2", "recall", "report", "all"),
        help="train and test the Table 2 runs, the recall runs, or both (all); report: only the tables",
    )
    parser.add_argument("--runs", required=True, help="folder for the runs (checkpoints, metrics, test results)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run (1: kind to a shared machine)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="recall models trained at once, one process each (2 on a 2-core machine)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be a positive integer, got {args.threads}")
    if args.jobs < 1:
        parser.error(f"--jobs must be a positive integer, got {args.jobs}")
    try:  # before any training: the report's tables and figures go to the checkout or where told
        required_figures_dir("the experiment's tables and figures")
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    if args.what in ("table2", "all"):
        table2(args.runs, args.threads, not args.no_progress)
    if args.what in ("recall", "all"):
        recall(args.runs, args.threads, not args.no_progress, args.jobs)
    report(args.runs)


if __name__ == "__main__":
    main()
