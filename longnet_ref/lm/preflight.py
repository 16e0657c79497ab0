"""The checks a training run passes before any work (`train.start_run` calls `check_run`).

`config.TrainConfig` checks every field on its own; these are the checks that need more than
the config: the device, the checkpoints given to `--resume` or `--init-from` (read and compared
with the config), and the `--out` folder (no other run in it, writable). Every error is a
ValueError naming the CLI flag, so `main` shows it as a usage error.
"""

from __future__ import annotations

import tempfile

import torch

from ..checks import as_path, check_flag, check_instance
from .checkpoint import read_checkpoint
from .config import RESUME_FIELDS, TrainConfig


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU")
    return torch.device(name)


def check_out(out, *, resume=None, overwrite=False):
    """`out` can take this run: it holds no other run (unless resumed or `overwrite`), and it is writable."""
    check_flag("overwrite", overwrite)
    out = as_path("out", out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder")
    held = [name for name in ("checkpoint.pt", "metrics.json") if (out / name).exists()]
    if held and resume is None and not overwrite:
        raise ValueError(
            f"--out {str(out)!r} already holds a run ({', '.join(held)}): pass --resume "
            f"{str(out / 'checkpoint.pt')!r} to continue it, or --overwrite to replace it"
        )
    try:  # found now, not at the first save an hour later
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ValueError(f"--out {str(out)!r} is not writable: {error.strerror or error}") from error
    return out


def check_run(config, out=None, *, resume=None, init_from=None, pause_at=None, overwrite=False):
    """The checks of a run beyond its config's own (`TrainConfig` checks every field); errors name the flag.

    Reads the checkpoints it is given and returns `(device, resume checkpoint, init_from
    checkpoint)`, each None when not asked for; checks `out` with `check_out` when given.
    `main` relies on these checks alone.
    """
    check_instance("config", config, TrainConfig)
    if pause_at is not None and (isinstance(pause_at, bool) or not isinstance(pause_at, int) or pause_at < 1):
        raise ValueError(f"--pause-at must be a positive step, got {pause_at!r}")
    if resume is not None and init_from is not None:
        raise ValueError("--resume and --init-from exclude each other: a resumed run already has its weights")
    device = pick_device(config.device)
    source = checkpoint = None
    if init_from is not None:
        source = read_checkpoint(init_from, flag="--init-from")
        _check_agrees(config, source["train_config"], ("embed_dim", "num_heads", "num_layers"), "the --init-from")
    if resume is not None:
        checkpoint = read_checkpoint(resume)
        _check_agrees(config, checkpoint["train_config"], RESUME_FIELDS, "the")
    if out is not None:
        check_out(out, resume=resume, overwrite=overwrite)
    return device, checkpoint, source


def _check_agrees(config, saved, names, whose):
    """A ValueError naming the first flag in `names` on which `config` and a checkpoint's config differ."""
    for name in names:
        if saved.get(name) != getattr(config, name):  # a field newer than the checkpoint: its default, None
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {getattr(config, name)!r} differs from {whose} checkpoint's {saved.get(name)!r}")
