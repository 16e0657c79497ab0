"""Checkpoints of a training run (train.py): what one holds, how it is checked, how a run resumes exactly.

A checkpoint is one `torch.save`d dict: the model's weights and its `ModelConfig` (enough to
rebuild it, `load_checkpoint`), the optimiser and the loss scaler, the step, the run's config and
metrics so far, and every random state: torch's (weights init, then dropout), the data stream's
generator, and CUDA's. With all of them restored the resumed run draws the same batches and
the same dropout masks as an uninterrupted one, so its loss curve is the same (a test checks it).

How a checkpoint is trusted:
- it is read with `torch.load(..., weights_only=True)`: only tensors and plain containers are
  rebuilt, so a crafted file cannot run code (pickle's other objects are refused);
- it holds a SHA-256 `checksum` of everything else in it (every tensor's dtype, shape and
  bytes, and every other value), which `read_checkpoint` recomputes: flipped bytes are caught;
- it is written atomically (`files.write_atomic`): an interrupted save leaves the previous
  checkpoint, never a broken one;
- a file that is missing, truncated, not a checkpoint, corrupted or of an unknown model config
  stops with one ValueError naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re

import torch

from ..checks import as_path, check_instance
from ..files import write_atomic
from .evaluate import as_device
from .model import LongNetLM, ModelConfig

FORMAT = "longnet_ref checkpoint 1"
REQUIRED = ("format", "checksum", "step", "model", "model_config", "train_config")


def checksum(state) -> str:
    """SHA-256 (hex) of a checkpoint's contents, except its "checksum" entry: tensors by dtype, shape and bytes."""
    check_instance("state", state, dict, "a checkpoint dict")
    digest = hashlib.sha256()

    def feed(value):
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}:".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            keys = sorted((key for key in value if key != "checksum"), key=repr)  # str or int keys: repr orders both
            digest.update(f"dict {len(keys)}:".encode())
            for key in keys:
                digest.update(f"{key!r}=".encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__} {len(value)}:".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())

    feed(state)
    return digest.hexdigest()


def read_checkpoint(path, map_location="cpu", flag="--resume"):
    """The checked checkpoint dict in `path`; every problem is one ValueError naming `flag` and the file."""
    path = as_path("path", path)
    where = f"{flag} checkpoint {str(path)!r}"
    if not path.is_file():
        raise ValueError(f"{where} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only stops at the first object that is not a tensor or a plain container,
        # before anything is called; its message names that object ("GLOBAL ... was not an
        # allowed global"). Any other unpickling error means bytes that are no pickle at all.
        # (torch < 2.4 says "WeightsUnpickler error: Unsupported class ...", on one line)
        named = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line]
        named += re.findall(r"Unsupported (?:class|global) [^.\n]*", str(error))
        if named:
            raise ValueError(
                f"{where} was refused, and nothing in it was run: it holds an object other than tensors and "
                f"plain containers, which longnet_ref never writes ({named[0]})"
            ) from error
        raise ValueError(f"{where} is not a readable torch.save file (truncated or not a checkpoint)") from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ValueError(
            f"{where} is not a readable torch.save file (truncated or not a checkpoint): {error}"
        ) from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{where} is not a longnet_ref training checkpoint (no {FORMAT!r} format entry)")
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        raise ValueError(f"{where} lacks the entries {missing}")
    if checksum(state) != state["checksum"]:
        raise ValueError(f"{where} is corrupted: its contents do not match the checksum it was saved with")
    return state


def load_checkpoint(path, map_location="cpu", flag="the"):
    """(model, checkpoint dict) from a checkpoint file written by `train`."""
    checkpoint = read_checkpoint(path, map_location, flag=flag)
    try:
        config = ModelConfig(**checkpoint["model_config"])
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{flag} checkpoint {str(path)!r} holds a model config this version cannot build: {error}"
        ) from error
    model = LongNetLM(config)
    model.load_state_dict(checkpoint["model"])
    return model, checkpoint


def save_checkpoint(path, **state):
    """Write a checkpoint (with its format tag and checksum) to `path` atomically.

    Checked first, so that nothing is written that `read_checkpoint` would refuse: the REQUIRED
    entries, `model` a state dict, and only tensors and plain containers anywhere (`check_plain`).
    """
    missing = [key for key in REQUIRED if key not in state and key not in ("format", "checksum")]
    if missing:
        raise ValueError(f"save_checkpoint needs the entries {missing}, got {sorted(state)}")
    check_instance("model", state["model"], dict, "a state dict (model.state_dict())")
    check_plain("state", state)
    state = dict(state, format=FORMAT)
    state["checksum"] = checksum(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue())  # an interrupted save never leaves a broken checkpoint


def check_plain(name, value):
    """Only tensors and plain containers (what `torch.load(weights_only=True)` reads back); else a
    TypeError naming where the other object is, e.g. "state['model']['w'] is a object"."""
    if isinstance(value, dict):
        for key, item in value.items():
            check_plain(f"{name}[{key!r}]", item)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain(f"{name}[{i}]", item)
    elif not isinstance(value, (torch.Tensor, str, int, float, type(None))):  # bool is an int
        raise TypeError(
            f"{name} is a {type(value).__name__}, which a checkpoint cannot hold: tensors and plain "
            f"containers only (a model: pass model.state_dict())"
        )


def rng_states(data_rng, device):
    """Every random state a run draws from, for `save_checkpoint(..., rng=...)`."""
    check_instance("data_rng", data_rng, torch.Generator)
    device = as_device(device)
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
