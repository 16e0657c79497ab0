"""Data that needs no download: Python's own standard library as a byte-level corpus, and a
synthetic key-value recall task that measures how far back a model can reach.

The paper trained on source code (The Stack). Every Python installation carries a corpus of
source code: the standard library's `.py` files, found through `sysconfig`, so the same code
runs on a laptop, in CI and in Colab. Bytes are the tokens (vocabulary 256): no tokenizer,
and bits per byte compare across models directly.

Train/validation split is by file (a file is wholly in one split, so validation measures
generalisation to unseen files, not memorised neighbours), decided by a CRC32 of the file's
path relative to the library root: deterministic across runs, processes and machines, and a
file's split does not depend on which other files exist. The corpus differs between Python
versions, as the standard library does.

Shape legend (the package's, plus): M = num_bytes // N evaluation windows.
"""

from __future__ import annotations

import math
import os
import sysconfig
import zlib
from pathlib import Path

import torch

from ..checks import as_positive_int, check_instance, is_number, is_sequence

VOCAB_SIZE = 256
IGNORE = -100  # target value that F.cross_entropy skips


def check_generator(generator):
    """None or a torch.Generator; else a TypeError naming `generator` (torch's own names no parameter)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be None or a torch.Generator, got {generator!r} ({type(generator).__name__})")
    return generator


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def as_root(root) -> Path:
    """The corpus folder, which must exist: None for the standard library's, else a str or os.PathLike path."""
    if root is not None:
        check_instance("root", root, (str, os.PathLike), "None or a folder path (str or os.PathLike)")
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise ValueError(f"root must be a directory of .py files, got {str(root)!r}")
    return root


def stdlib_files(root=None) -> list[str]:
    """Relative POSIX paths of the library's .py files, sorted; third-party packages excluded."""
    root = as_root(root)
    skip = {"site-packages", "dist-packages", "__pycache__"}
    paths = (path.relative_to(root) for path in root.rglob("*.py") if path.is_file())
    return sorted(path.as_posix() for path in paths if not skip.intersection(path.parts))


def split_of(path: str, val_fraction: float = 0.05) -> str:
    """ "train" or "val" for a relative path: CRC32 of the path, not Python's salted hash()."""
    if not isinstance(path, str):  # the CRC is of the POSIX string stdlib_files returns, so nothing else
        raise TypeError(f"path must be a str (a relative POSIX path, as stdlib_files returns), got {path!r}")
    if not (is_number(val_fraction) and 0 <= val_fraction <= 1):  # NaN fails the comparison too
        raise ValueError(f"val_fraction must be a number in [0, 1], got {val_fraction!r}")
    return "val" if zlib.crc32(path.encode()) % 10_000 < val_fraction * 10_000 else "train"


def load_corpus(root=None, val_fraction: float = 0.05) -> dict[str, torch.Tensor]:
    """{"train": uint8 (N_train,), "val": uint8 (N_val,)}: the files of each split, concatenated in path order.

    Each file ends with a newline (one is added if missing), so files never run together.
    """
    if not (is_number(val_fraction) and 0 < val_fraction < 1):  # both splits must get files
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    root = as_root(root)
    chunks = {"train": [], "val": []}
    for path in stdlib_files(root):
        text = (root / path).read_bytes()
        chunks[split_of(path, val_fraction)].append(text if text.endswith(b"\n") else text + b"\n")
    corpus = {}
    for split, parts in chunks.items():
        if not parts:
            raise ValueError(f"root {str(root)!r} puts no .py file in the {split} split; val_fraction={val_fraction!r}")
        corpus[split] = torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)
    return corpus


def check_bytes(data):
    """data: a 1-D uint8 tensor of bytes (what `load_corpus` returns); else a TypeError naming it."""
    if not isinstance(data, torch.Tensor) or data.dim() != 1 or data.dtype != torch.uint8:
        what = (
            f"{data.dtype} tensor of shape {tuple(data.shape)}"
            if isinstance(data, torch.Tensor)
            else type(data).__name__
        )
        raise TypeError(f"data must be a 1-D torch.uint8 tensor of bytes (load_corpus()), got {what}")
    return data


def random_windows(data, seq_len, batch_size, generator=None):
    """A training batch: random windows of the byte stream, inputs (B, N) and next-byte targets (B, N)."""
    check_bytes(data)
    N, B = as_positive_int("seq_len", seq_len), as_positive_int("batch_size", batch_size)
    check_generator(generator)
    if data.numel() < N + 1:
        raise ValueError(f"seq_len {N} needs at least {N + 1} bytes of data, got {data.numel()}")
    starts = torch.randint(0, data.numel() - N, (B,), generator=generator)  # (B,)
    idx = starts[:, None] + torch.arange(N + 1)  # (B, N+1)
    window = data[idx].long()  # (B, N+1)
    return window[:, :-1], window[:, 1:]


def eval_windows(data, seq_len, num_bytes):
    """Consecutive windows over the first `num_bytes` bytes: inputs and targets (num_bytes // N, N).

    Cutting the same bytes into windows of different lengths makes bits per byte comparable
    across test lengths: only the context each byte gets changes, not the bytes scored.
    """
    check_bytes(data)
    N, total = as_positive_int("seq_len", seq_len), as_positive_int("num_bytes", num_bytes)
    if total % N:
        raise ValueError(f"num_bytes {total} is not a multiple of seq_len {N}")
    if data.numel() < total + 1:
        raise ValueError(f"num_bytes {total} needs {total + 1} bytes of data, got {data.numel()}")
    x = data[:total].long().view(-1, N)  # (M, N)
    y = data[1 : total + 1].long().view(-1, N)  # (M, N)
    return x, y


# --- The synthetic long-range task: key-value recall across a haystack -----------------------
#
# Bytes:  filler  a-z and space, random (the haystack: nothing to learn in it)
#         needle  one byte 128 + 8*key + value  (16 keys x 8 values)
#         query   one byte "A" + key, later in the sequence; the target there is "0" + value
# Keys are distinct within a sequence, so every query has one answer: the value of the needle
# with its key, `distance` positions back. Only the answers are scored (targets elsewhere are
# IGNORE). The answer is never written into the text: if it were, a later query could copy
# the answer of an earlier one instead of reaching back to the needle. So a model answers above
# chance (1/8) at distance d only if information can travel d
# positions: the reach of its attention pattern, measured directly.
NUM_KEYS, NUM_VALUES = 16, 8
FILLER = torch.tensor(list(b"abcdefghijklmnopqrstuvwxyz "), dtype=torch.long)


def recall_batch(batch_size, seq_len, generator=None, *, num_pairs=4, queries_per_pair=8, distances=None):
    """Inputs x (B, N), targets y (B, N) (IGNORE except at queries) and distance (B, N) (0 except at queries).

    Each of `num_pairs` needles is asked for `queries_per_pair` times, each query at its own
    position. distances: None (training) puts each needle anywhere in the sequence and each of
    its queries at a free position after it, `d` back, with d drawn from [1, room] (room: the
    positions left after the needle) half log-uniformly (every scale) and half uniformly (the
    long distances, which a log-uniform draw makes rare); this always succeeds within
    `recall_capacity`, and needles and queries cover every position, as the test's do. A list
    (evaluation at fixed distances) gives each needle `queries_per_pair` different distances
    from it.
    """
    B, N = as_positive_int("batch_size", batch_size), as_positive_int("seq_len", seq_len)
    num_pairs, per_pair = as_positive_int("num_pairs", num_pairs), as_positive_int("queries_per_pair", queries_per_pair)
    check_generator(generator)
    most = recall_capacity(N, per_pair)
    if num_pairs > most:
        raise ValueError(
            f"num_pairs {num_pairs} x queries_per_pair {per_pair} must fit in half of seq_len {N} "
            f"(and num_pairs <= {NUM_KEYS}): at most {most} pairs fit"
        )
    if distances is not None:
        distances = check_distances(distances, per_pair, N)
    x = FILLER[torch.randint(0, len(FILLER), (B, N), generator=generator)]  # (B, N) haystack
    y = torch.full((B, N), IGNORE, dtype=torch.long)
    dist = torch.zeros((B, N), dtype=torch.long)

    for b in range(B):
        free = bytearray(b"\x01" * (N - 1))  # (N-1,) positions 0 ... N-2 not yet a needle or query
        for key in torch.randperm(NUM_KEYS, generator=generator)[:num_pairs].tolist():
            value = uniform(NUM_VALUES, generator)
            if distances is None:
                needle, ds = _spread_placement(N, per_pair, free, generator)
            else:
                needle, ds = _fixed_placement(N, num_pairs, per_pair, distances, free, generator)
            x[b, needle] = 128 + NUM_VALUES * key + value
            d = torch.tensor(ds)  # (queries_per_pair,)
            x[b, needle + d] = ord("A") + key
            y[b, needle + d] = ord("0") + value
            dist[b, needle + d] = d
    return x, y, dist


def _fixed_placement(N, num_pairs, per_pair, distances, free_bytes, generator):
    """(needle, its query distances) from the list, at positions still free (marked taken here)."""
    free = torch.frombuffer(free_bytes, dtype=torch.bool)  # (N-1,) the same memory
    for _ in range(1000):  # rejection sampling of free positions; fails only if crowded
        ds = _draw_distances(N, per_pair, distances, generator)
        needle = uniform(N - 1 - max(ds), generator)  # every query q = needle + d <= N - 2
        taken = torch.tensor([needle] + [needle + d for d in ds])
        if taken.unique().numel() == 1 + per_pair and free[taken].all():
            free[taken] = False
            return needle, ds
    raise ValueError(f"could not place {num_pairs} x {per_pair} queries in seq_len {N}; ask for fewer")


def _spread_placement(N, per_pair, free_bytes, generator):
    """(needle, its query distances) for training: the needle anywhere, its queries at free positions after it.

    Needles and queries take positions 0 ... N - 2 (the target of position N - 1 lies outside
    the window). At most half of them are ever taken (`recall_capacity`), so the first free
    position always has `per_pair` free ones after it, and every draw below ends. `free_bytes`
    (1: free) is read in Python, where a bytearray is fast, and by torch through a view.
    """
    free = torch.frombuffer(free_bytes, dtype=torch.bool)  # (N-1,) the same memory
    after = free.flip(0).long().cumsum(0).flip(0) - free.long()  # (N-1,) free positions after each
    allowed = (free & (after >= per_pair)).nonzero().flatten()  # never empty, see above
    needle = int(allowed[uniform(allowed.numel(), generator)])
    free[needle] = False
    room, ds = N - 2 - needle, []
    for _ in range(25):  # blocks of candidate distances by the rule; taken positions are skipped
        for d in _distances(room, 2 * per_pair, generator):
            if free_bytes[needle + d]:
                free_bytes[needle + d] = 0
                ds.append(d)
                if len(ds) == per_pair:
                    return needle, ds
    # crowded: the rest at any free positions after the needle
    later = free[needle + 1 :].nonzero().flatten()  # (>= per_pair - len(ds),)
    for i in torch.randperm(later.numel(), generator=generator)[: per_pair - len(ds)].tolist():
        free[needle + 1 + int(later[i])] = False
        ds.append(1 + int(later[i]))
    return needle, ds


def _distances(room, count, generator):
    """`count` distances in [1, room]: half log-uniform (every scale), half uniform (long ones as often as short)."""
    u, half = torch.rand(2, count, generator=generator, dtype=torch.float64).tolist()
    ds = (int(math.exp(math.log(room) * a)) if h < 0.5 else 1 + int(a * room) for a, h in zip(u, half))
    return [min(max(d, 1), room) for d in ds]


def recall_capacity(seq_len, queries_per_pair):
    """The most needles `recall_batch` places in seq_len when each is asked queries_per_pair times.

    A needle and its queries take 1 + queries_per_pair positions, all of them within half of the
    sequence (so a free needle position with room for its queries always exists, and the test's
    placement at fixed distances finds room), and keys are distinct.
    """
    N, per_pair = as_positive_int("seq_len", seq_len), as_positive_int("queries_per_pair", queries_per_pair)
    return min(NUM_KEYS, (N // 2) // (1 + per_pair))


def check_distances(distances, count, seq_len):
    """`distances` as a list of ints, at least `count` different ones in [1, seq_len - 2]; else an error naming it."""
    count, seq_len = as_positive_int("count", count), as_positive_int("seq_len", seq_len)
    # a list, tuple or range; not an iterator, which the first of many draws would use up
    if not is_sequence(distances):
        raise TypeError(f"distances must be None or a list of ints, got {distances!r}")
    distances = list(distances)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in distances):
        raise TypeError(f"distances must be None or a list of ints, got {distances!r}")
    if len(set(distances)) < count or min(distances, default=0) < 1 or max(distances, default=0) > seq_len - 2:
        raise ValueError(
            f"distances must hold at least {count} different values (one per query of a needle) in "
            f"[1, seq_len - 2 = {seq_len - 2}], got {distances!r}"
        )
    return distances


def uniform(n, generator=None):
    """An int in [0, n), drawn from `generator`."""
    n = as_positive_int("n", n)  # [0, n) must hold an int
    check_generator(generator)
    return int(torch.randint(0, n, (1,), generator=generator))


def query_distances(seq_len, count, distances=None, generator=None):
    """`count` different distances of queries from their needle (see `recall_batch`), drawn from `generator`.

    From `distances` when given, else from all of [1, seq_len - 2].
    """
    N, count = as_positive_int("seq_len", seq_len), as_positive_int("count", count)
    check_generator(generator)
    if distances is not None:
        distances = check_distances(distances, count, N)
    elif count > N - 2:  # the draw of distinct distances would never finish
        raise ValueError(
            f"count {count} different distances do not exist in [1, seq_len - 2] for seq_len {N}: "
            f"at most {max(0, N - 2)} do"
        )
    return _draw_distances(N, count, distances, generator)


def _draw_distances(N, count, distances, generator):
    """`query_distances` without its checks (`recall_batch` checks once, then draws many times)."""
    if distances is not None:
        choices = sorted(set(distances))
        return [choices[i] for i in torch.randperm(len(choices), generator=generator)[:count].tolist()]
    chosen = []
    while len(chosen) < count:  # distinct distances: two queries never share a position
        (d,) = _distances(N - 2, 1, generator)
        if d not in chosen:
            chosen.append(d)
    return chosen
