"""Checkpoints of a training run (train.py): what one holds, and how a run resumes exactly.

A checkpoint is one `torch.save`d dict: the model's weights and its `ModelConfig` (enough to
rebuild it, `load_checkpoint`), the optimiser and the loss scaler, the step, the run's config and
metrics so far, and every random state: torch's (weights init, then dropout), the data stream's
generator, and CUDA's. With all of them restored the resumed run draws the same batches and
the same dropout masks as an uninterrupted one, so its loss curve is the same (a test checks it).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .model import LongNetLM, ModelConfig


def read_checkpoint(path, map_location="cpu", flag="--resume"):
    """The checkpoint dict in `path`; a missing file is a ValueError naming the CLI `flag`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag} checkpoint {str(path)!r} does not exist")
    return torch.load(path, map_location=map_location, weights_only=False)


def load_checkpoint(path, map_location="cpu"):
    """(model, checkpoint dict) from a checkpoint file written by `train`."""
    checkpoint = read_checkpoint(path, map_location)
    model = LongNetLM(ModelConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model, checkpoint


def save_checkpoint(path, **state):
    tmp = Path(f"{path}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves a broken checkpoint


def rng_states(data_rng, device):
    """Every random state a run draws from, for `save_checkpoint(..., rng=...)`."""
    rng = {"torch": torch.get_rng_state(), "data": data_rng.get_state()}
    rng["cuda"] = torch.cuda.get_rng_state() if device.type == "cuda" else None
    return rng


def restore_run(checkpoint, model, optimizer, scaler, data_rng, device):
    """Put a run back where `checkpoint` left it; returns the step to continue from."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    data_rng.set_state(checkpoint["rng"]["data"])
    if device.type == "cuda" and checkpoint["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
    return checkpoint["step"]
