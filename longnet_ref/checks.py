"""Input validation shared by every public function.

Bad input gets a `ValueError` that names the parameter and the value, raised before any
work is done, so a mistake never surfaces as an index error three calls deep.
"""

from __future__ import annotations

import operator
import os
import reprlib
from collections.abc import Sequence
from pathlib import Path

import torch

HEAD_OFFSET_RULES = ("paper", "torchscale", "none")
IMPLEMENTATIONS = ("fast", "readable")


def is_number(value) -> bool:
    """An int or float: not a bool (True is not 1.0 here) and not a string (no float("1e4") parsing)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_sequence(value) -> bool:
    """A list, tuple, range or other Sequence, but not a str or bytes (whose items would be characters)."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def as_count(name: str, value) -> int:
    """`value` as an int >= 0 (0 allowed, unlike `as_positive_int`; bools and floats refused): counts
    and lengths that may be empty."""
    try:
        count = None if isinstance(value, bool) else operator.index(value)  # int, numpy ints; not 2.0
    except TypeError:
        count = None
    if count is None or count < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return count


def as_positive_number(name: str, value) -> float:
    """`value` as a positive finite float (bools and strings refused)."""
    if not (is_number(value) and 0 < value < float("inf")):  # NaN fails the comparison too
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def as_positive_int(name: str, value) -> int:
    """Return `value` as an int, or raise if it is not a positive integer (bools and floats refused)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    try:
        as_int = operator.index(value)  # accepts int, numpy ints, 0-d integer tensors; refuses 2.0
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if as_int <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return as_int


def check_instance(name: str, value, kind, what: str = ""):
    """`value` if it is a `kind` (a class or a tuple of classes); else a TypeError naming the parameter,
    what it must be (`what`, default "a <kind>") and what it got, shortened (`reprlib`)."""
    if not isinstance(value, kind):
        what = what or "a " + " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise TypeError(f"{name} must be {what}, got {reprlib.repr(value)} ({type(value).__name__})")
    return value


def as_path(name: str, value) -> Path:
    """`value` (a str or os.PathLike) as a Path; else a TypeError naming the parameter (Path(5) names none)."""
    return Path(check_instance(name, value, (str, os.PathLike), "a path (str or os.PathLike)"))


def check_file_name(name: str, value) -> str:
    """A plain file name: a non-empty str without folders (written into a folder chosen elsewhere)."""
    if not isinstance(value, str) or value in ("", ".", "..") or "/" in value or "\\" in value:
        raise ValueError(f"{name} must be a plain file name without folders, got {value!r}")
    return value


def check_branches(segment_lengths, dilation_rates) -> list[tuple[int, int]]:
    """Validate the mixture's configuration and return it as a list of `(w, r)` pairs."""
    for name, values in (("segment_lengths", segment_lengths), ("dilation_rates", dilation_rates)):
        if not is_sequence(values):
            raise ValueError(f"{name} must be a list of positive integers, got {values!r}")
        if len(values) == 0:
            raise ValueError(f"{name} must not be empty, got {values!r}")
    if len(segment_lengths) != len(dilation_rates):
        raise ValueError(
            f"segment_lengths and dilation_rates must have the same length, got "
            f"{len(segment_lengths)} segment lengths {list(segment_lengths)} and "
            f"{len(dilation_rates)} dilation rates {list(dilation_rates)}"
        )
    branches = []
    for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
        branches.append(check_branch(w, r, where=f"[{i}]"))
    return branches


def check_branch(segment_length, dilation_rate, where: str = "") -> tuple[int, int]:
    """Validate one branch `(w, r)`; `where` names its index in a list for the message."""
    w = as_positive_int(f"segment_length{where}", segment_length)
    r = as_positive_int(f"dilation_rate{where}", dilation_rate)
    if r > w:
        # A dilation rate above the segment length would keep at most one row per segment for
        # some heads and none for others: almost certainly a swapped argument.
        raise ValueError(
            f"dilation_rate{where} {r} is larger than segment_length{where} {w}; "
            "each segment must keep at least one row per head offset"
        )
    return w, r


def check_head_offsets(head_offsets: str) -> str:
    if head_offsets not in HEAD_OFFSET_RULES:
        raise ValueError(f"head_offsets must be one of {HEAD_OFFSET_RULES}, got {head_offsets!r}")
    return head_offsets


def check_implementation(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    return implementation


def check_flag(name: str, value) -> bool:
    """`value` if it is a bool; else a TypeError naming the parameter.

    Strict on purpose: `causal="False"` is a truthy string (it would compute causal attention)
    and None is no choice at all, so neither may stand in for False.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_tensor(name: str, x, dims: int | None = 4) -> torch.Tensor:
    """A floating-point tensor with values (not meta) and `dims` dimensions (None: any)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dims is not None and x.dim() != dims:
        layout = {4: " (B, H, N, D)", 5: " (B, H, S, W, D)"}.get(dims, "")
        raise ValueError(f"{name} must be {dims}-D{layout}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: it has a shape but no values to attend")
    return x


def check_qkv(q, k, v, *, same_length: bool = True, causal: bool = False, grouped: bool = False) -> None:
    """q, k, v: 4-D floating tensors on one device with one dtype and matching shapes.

    `same_length=False` lets keys be a different sequence than queries (cross attention in
    `dense_attention`); causal attention then still needs equal lengths, or "future" is undefined.
    `grouped=True` lets k and v have H_kv heads, H % H_kv == 0 (grouped-query attention).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but q has dtype {q.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on device {x.device} but q is on device {q.device}")
    if grouped and k.dim() == 4 and k.shape == v.shape and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:]:
        H, H_kv = q.shape[1], k.shape[1]
        if H_kv != H and (H_kv == 0 or H % H_kv):  # H = H_kv = 0: empty heads, an empty result
            raise ValueError(
                f"k and v have {H_kv} heads, which must divide q's {H} (grouped-query attention: each kv head "
                f"serves H / H_kv consecutive query heads); got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        return
    if same_length or causal:
        if not (q.shape == k.shape == v.shape):
            raise ValueError(
                "q, k and v must have the same shape (B, H, N, D), got "
                f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        return
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ValueError(
            "q (B, H, Nq, D), k (B, H, Nk, D) and v (B, H, Nk, Dv) do not fit together: "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )


def check_key_padding_mask(key_padding_mask, k) -> torch.Tensor | None:
    """None, or a (B, Nk) bool tensor on k's device: True marks a key to ignore (nn.MultiheadAttention's rule)."""
    if key_padding_mask is None:
        return None
    if not isinstance(key_padding_mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be None or a bool tensor, got {type(key_padding_mask).__name__}")
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must be a bool tensor (True = ignore this key), got dtype {key_padding_mask.dtype}"
        )
    B, Nk = k.shape[0], k.shape[2]
    if tuple(key_padding_mask.shape) != (B, Nk):
        raise ValueError(f"key_padding_mask must have shape (B, N) = ({B}, {Nk}), got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != k.device:
        raise ValueError(f"key_padding_mask is on device {key_padding_mask.device} but k is on device {k.device}")
    return key_padding_mask
