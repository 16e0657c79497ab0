"""Helpers for the notebooks: the setup cell and the build-then-compare check.

Every notebook starts with one setup cell (notebooks/README.md). The Colab install guard
stays visible in that cell, because it has to run before this package exists; what follows
it (seeding, choosing the device, printing versions) is `setup`. Every step a notebook
builds by hand ends with `compare(name, ours, package)`, which prints whether the two
agree exactly and their largest difference, and raises when they do not agree.
"""

from __future__ import annotations

import platform
import random

import torch


def setup(seed: int = 0, *, smoke: bool = False) -> torch.device:
    """Seed every generator, pick the device (CUDA when present), print versions; return the device."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is a dependency, but the notebooks never need its generator
        pass
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    from . import __version__

    versions = {"python": platform.python_version(), "torch": torch.__version__, "longnet_ref": __version__}
    for name in ("numpy", "matplotlib", "ipywidgets"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    print("  ".join(f"{name} {version}" for name, version in versions.items()))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device: {device} ({where})   seed: {seed}   SMOKE (small CI sizes): {smoke}")
    return device


def compare(name: str, ours, ref, *, atol: float = 1e-12) -> None:
    """Print whether `ours` equals `ref` exactly and their max abs difference; raise if it exceeds `atol`.

    Infinities count as equal when both sides hold the same one (a log-sum-exp of a row that
    sees no key is -inf on both sides); a NaN on either side is a failure.
    """
    ours, ref = torch.as_tensor(ours), torch.as_tensor(ref)
    if ours.shape != ref.shape:
        raise AssertionError(f"{name}: shapes differ, {tuple(ours.shape)} vs {tuple(ref.shape)}")
    exact = bool(torch.equal(ours, ref))
    if ours.numel() == 0:
        max_diff = 0.0
    else:
        # same infinity on both sides: difference 0 (inf - inf would be NaN)
        diff = torch.where(ours == ref, torch.zeros_like(ours), (ours - ref).abs())
        max_diff = diff.max().item()
    print(f"{name:<44} exact: {exact!s:<5}  max abs diff: {max_diff:.1e}")
    torch.testing.assert_close(ours, ref, rtol=0.0, atol=atol, msg=lambda msg: f"{name}: {msg}")
