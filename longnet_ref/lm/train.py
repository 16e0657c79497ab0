"""Train a small LongNet: `python -m longnet_ref.lm.train --attention dilated --seq-len 1024 --out runs/x`.

What one run does: build `LongNetLM` (model.py), draw random windows of the standard-library
corpus (or recall sequences, `--task recall`), AdamW with warmup and cosine decay, evaluate
every `--eval-every` steps (validation bits per byte, or recall accuracy), save a checkpoint
and metrics.json into `--out` at every evaluation. `--resume CKPT` continues a run exactly: the
checkpoint holds the model, the optimiser, the step, and every random state (weights init,
dropout, data), so the resumed loss curve is the uninterrupted one (a test checks it).
`--pause-at STEP` stops after STEP with a checkpoint, as a time limit would. What a checkpoint
holds, and `load_checkpoint` to rebuild a model from one, are in checkpoint.py.

A run, top to bottom: `preflight.check_run` (the checks beyond `config.TrainConfig`'s own), `start_run` (the
folder, `build_model`, the data, the checkpoint restored), then `run_loop`: `train_step` on
`draw_batch` until the stop, `evaluate` and `save` every `--eval-every` steps. `train` is the
two calls; `main` is the same two calls with their errors shown as usage errors. SIGINT and
SIGTERM stop a run between steps with a checkpoint (interrupt.py).

Presets: "cpu" (the default, about 10 minutes on an unloaded 2-core CPU), "gpu" (a Colab GPU,
about 15 minutes), "tiny" (seconds; tests and CI). Explicit flags override the preset.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checks import as_count, check_flag, check_instance
from ..cli import HelpFormatter
from ..files import write_atomic
from .checkpoint import restore_run, rng_states, save_checkpoint
from .config import PRESETS, TASKS, TrainConfig, preset_values
from .data import load_corpus, random_windows, recall_batch
from .evaluate import as_device, autocast_for, bits_per_byte, recall_accuracy, recall_buckets, run_eval_set
from .interrupt import Interrupted, stop_at_step_boundary
from .model import ATTENTION_KINDS, LongNetLM
from .preflight import check_run


def learning_rate(config, step):
    """Linear warmup to lr, then cosine decay to lr / 10 at the last step."""
    check_instance("config", config, TrainConfig)
    step = as_count("step", step)
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class Run:
    """One training run: its model and optimiser, the data it draws from, and how far it has come."""

    config: TrainConfig
    out: Path
    device: torch.device
    model: LongNetLM
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    data_rng: torch.Generator  # the training stream
    metrics: dict
    stop: int  # the step to stop after: config.steps, or --pause-at
    step: int = 0
    corpus: dict | None = None  # task "code": {"train", "val"} bytes
    eval_set: tuple | None = None  # task "recall": the fixed evaluation sequences


def build_model(config, device):
    """The model, seeded by `config.seed`, and AdamW (matrices decay; norms and biases do not)."""
    check_instance("config", config, TrainConfig)
    device = as_device(device)
    torch.manual_seed(config.seed)  # weights, then dropout
    model = LongNetLM(config.model_config()).to(device)
    decay = [param for param in model.parameters() if param.dim() >= 2]
    rest = [param for param in model.parameters() if param.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.95),
    )
    return model, optimizer


def start_run(config, out, *, resume=None, init_from=None, pause_at=None, corpus=None, overwrite=False) -> Run:
    """Check the run (`check_run`), then set it up in `out`: fresh, from `init_from`'s weights, or resumed."""
    checks = dict(resume=resume, init_from=init_from, pause_at=pause_at, overwrite=overwrite)
    device, checkpoint, source = check_run(config, out, **checks)
    out = Path(out)
    if config.threads:
        # On a shared CPU one thread per run can be many times faster than two threads
        # fighting other processes (OpenMP workers spin while they wait for each other).
        torch.set_num_threads(config.threads)
    model, optimizer = build_model(config, device)
    # fp16 (GPUs without native bf16) needs loss scaling; bf16 and float32 do not
    fp16 = device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False)
    run = Run(
        config,
        out,
        device,
        model,
        optimizer,
        scaler=torch.amp.GradScaler("cuda", enabled=fp16),
        data_rng=torch.Generator().manual_seed(config.seed + 1),
        metrics={"train_config": asdict(config), "device": str(device), "train": [], "eval": []},
        stop=config.steps if pause_at is None else min(config.steps, pause_at),
    )
    if config.task == "code":
        run.corpus = load_corpus() if corpus is None else corpus
    else:
        run.eval_set = run_eval_set(config.seq_len, config.eval_size, config.num_pairs, config.queries_per_pair)
    if source is not None:
        model.load_state_dict(source["model"])
        run.metrics["init_from"] = str(init_from)
    if checkpoint is not None:
        run.step = restore_run(checkpoint, model, optimizer, run.scaler, run.data_rng, device)
        # the run's history (curves, where it started from), under the config given now
        run.metrics.update({k: v for k, v in checkpoint["metrics"].items() if k != "train_config"})
    run.metrics["parameters"] = model.num_parameters()
    return run


def draw_batch(run):
    """The next training batch from the run's stream: inputs and targets, (B, N) each."""
    check_instance("run", run, Run, "a train.Run (from start_run)")
    config = run.config
    if config.task == "code":
        return random_windows(run.corpus["train"], config.seq_len, config.batch_size, run.data_rng)
    x, y, _ = recall_batch(
        config.batch_size,
        config.seq_len,
        run.data_rng,
        num_pairs=config.num_pairs,
        queries_per_pair=config.queries_per_pair,
    )
    return x, y


def train_step(run):
    """One optimiser step on the next batch; returns its record for metrics["train"]."""
    check_instance("run", run, Run, "a train.Run (from start_run)")
    start, cpu_start = time.perf_counter(), time.process_time()
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(run.config, run.step)
    x, y = (t.to(run.device) for t in draw_batch(run))  # (B, N) each
    with autocast_for(run.device):
        _, loss = run.model(x, y)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.step += 1
    seconds = time.perf_counter() - start
    record = {"step": run.step, "loss": loss.item(), "seconds": seconds, "tokens_per_s": x.numel() / seconds}
    # CPU time of this process (all its threads): on a shared machine wall time also
    # counts the time other processes held the cores
    record["cpu_seconds"] = time.process_time() - cpu_start
    return record


def evaluate(run):
    """The run's evaluation at its step: validation bits per byte (code) or recall accuracy by distance."""
    config, step = run.config, run.step
    if config.task == "code":
        num_bytes = config.eval_size * config.seq_len
        bpb = bits_per_byte(run.model, run.corpus["val"], config.seq_len, num_bytes, device=run.device)
        return {"step": step, "val_bpb": bpb}
    buckets = recall_buckets(config.seq_len)
    accuracy, loss = recall_accuracy(run.model, run.eval_set, device=run.device, buckets=buckets)
    return {"step": step, "recall_loss": loss, "recall_accuracy": accuracy}


def save(run):
    """checkpoint.pt (everything `--resume` needs, checkpoint.py) and metrics.json, into the run's folder."""
    save_checkpoint(
        run.out / "checkpoint.pt",
        step=run.step,
        model=run.model.state_dict(),
        optimizer=run.optimizer.state_dict(),
        scaler=run.scaler.state_dict(),
        rng=rng_states(run.data_rng, run.device),
        train_config=asdict(run.config),
        model_config=run.model.config.to_dict(),
        metrics=run.metrics,
    )
    write_atomic(run.out / "metrics.json", json.dumps(run.metrics, indent=1))


def run_loop(run, progress=True):
    """Train until the run's stop: evaluate and save every `eval_every` steps and at the last; save when paused.

    SIGINT (Ctrl-C) or SIGTERM stops it after the current step with a checkpoint (`Interrupted`);
    SIGKILL cannot be caught, and the last periodic checkpoint resumes exactly.
    """
    check_instance("run", run, Run, "a train.Run (from start_run)")
    check_flag("progress", progress)
    config, metrics = run.config, run.metrics
    run.model.train()
    desc = f"{config.attention} N={config.seq_len}"
    bar = tqdm(total=config.steps, initial=run.step, disable=not progress, desc=desc)
    requested = []
    try:
        with stop_at_step_boundary(requested):
            while run.step < run.stop and not requested:
                record = train_step(run)
                metrics["train"].append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if run.step % config.eval_every == 0 or run.step == config.steps:
                    metrics["eval"].append(evaluate(run))
                    bar.write(f"step {run.step}: " + json.dumps(metrics["eval"][-1]))
                    save(run)
            if run.step % config.eval_every and run.step != config.steps:  # paused or stopped between evaluations
                save(run)
    finally:
        bar.close()
    if requested:
        raise Interrupted(requested[0], run.step, run.out / "checkpoint.pt")
    return run.model, metrics


def train(
    config: TrainConfig, out, *, resume=None, init_from=None, pause_at=None, progress=True, corpus=None, overwrite=False
):
    """Train (or resume) a run into the folder `out`; returns (model, metrics dict).

    `resume`: continue the run of this checkpoint exactly (same model, data and seed fields).
    `init_from`: start from the weights of another run's checkpoint (same sizes; the attention
    kind and the sequence length may differ), with a fresh optimiser: a second stage of
    training, e.g. a short-sequence warm-up followed by long sequences.
    `pause_at`: stop after this step with a checkpoint. `corpus` (from `data.load_corpus`)
    may be passed to skip reading the library again. A folder `out` that already holds a run
    is refused unless `resume` continues it or `overwrite=True` replaces it.
    """
    check_flag("progress", progress)  # before start_run makes the folder
    run = start_run(
        config, out, resume=resume, init_from=init_from, pause_at=pause_at, corpus=corpus, overwrite=overwrite
    )
    return run_loop(run, progress)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m longnet_ref.lm.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="sizes; flags below override")
    parser.add_argument(
        "--attention",
        choices=ATTENTION_KINDS,
        help=f"dilated (LongNet), dense, or local (first branch) ({preset_values('attention')})",
    )
    parser.add_argument(
        "--task", choices=TASKS, help=f"code: the standard library; recall: key-value recall ({preset_values('task')})"
    )
    parser.add_argument("--out", required=True, help="folder for checkpoint.pt and metrics.json")
    parser.add_argument("--resume", help="continue from this checkpoint.pt")
    parser.add_argument("--init-from", help="start from the weights of this checkpoint.pt (fresh optimiser)")
    parser.add_argument("--pause-at", type=int, help="stop after this step with a checkpoint")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the run that --out already holds (refused without it)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    # The sizes default to the preset's (None here: "not given"), so their help says which preset value applies.
    for name, kind, meaning in OVERRIDES:
        nargs = "+" if name in ("segment_lengths", "dilation_rates") else None
        parser.add_argument(
            "--" + name.replace("_", "-"), type=kind, nargs=nargs, help=f"{meaning} ({preset_values(name)})"
        )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), help=f"auto: cuda if there ({preset_values('device')})"
    )
    return parser


# The flags that override a preset's value: (TrainConfig field, type, what it is).
OVERRIDES = (
    ("seq_len", int, "N, bytes per training sequence"),
    ("steps", int, "optimiser steps"),
    ("batch_size", int, "sequences per step"),
    ("embed_dim", int, "E, the model width"),
    ("num_heads", int, "H, attention heads (E divisible by H)"),
    ("num_layers", int, "Transformer blocks"),
    ("num_kv_heads", int, "grouped-query attention: k, v heads, dividing H (None: H)"),
    ("num_pairs", int, "recall task: key-value pairs per sequence"),
    ("queries_per_pair", int, "recall task: supervised queries per pair"),
    ("warmup", int, "steps of linear learning-rate warm-up"),
    ("eval_every", int, "steps between validation runs"),
    ("eval_size", int, "validation sequences per run"),
    ("seed", int, "seed of the weights and the data order"),
    ("threads", int, "CPU threads; 0: torch's default, one per core (1 is kind to a shared machine)"),
    ("lr", float, "peak learning rate (AdamW, cosine decay)"),
    ("weight_decay", float, "AdamW weight decay"),
    ("grad_clip", float, "clip the gradient norm to this"),
    ("segment_lengths", int, "the branches' segment lengths w_i, e.g. 256 512 1024"),
    ("dilation_rates", int, "the branches' dilation rates r_i, one per segment length, e.g. 1 2 4"),
)


def config_from_args(args) -> TrainConfig:
    check_instance("args", args, argparse.Namespace, "the argparse.Namespace of build_parser().parse_args()")
    values = dict(PRESETS[args.preset])
    names = {f.name for f in fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    return TrainConfig(**values)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # every check of the flags is TrainConfig's or check_run's (in start_run), made before any work
        config = config_from_args(args)
        run = start_run(
            config,
            args.out,
            resume=args.resume,
            init_from=args.init_from,
            pause_at=args.pause_at,
            overwrite=args.overwrite,
        )
    except ValueError as error:
        parser.error(str(error))  # usage + message, exit status 2
    try:
        _, metrics = run_loop(run, progress=not args.no_progress)
    except Interrupted as stop:
        print(stop, file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    last = metrics["eval"][-1] if metrics["eval"] else {}
    print(json.dumps({"out": args.out, "steps": len(metrics["train"]), **last}))
    return metrics


if __name__ == "__main__":
    main()
