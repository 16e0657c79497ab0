"""Measuring a trained model: bits per byte at a test length, and recall accuracy against distance.

Shape legend (the package's, plus): V vocabulary; M = num_bytes // N evaluation windows.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import as_positive_int, check_flag
from .data import IGNORE, NUM_KEYS, NUM_VALUES, eval_windows, recall_batch, recall_capacity


def as_device(device) -> torch.device:
    """`device` (a str such as "cpu" or "cuda:0", or a torch.device) as a torch.device that exists here."""
    if not isinstance(device, (str, torch.device)):  # an int would mean a CUDA index: say "cuda:0"
        raise TypeError(f"device must be a str such as 'cpu' or 'cuda:0', or a torch.device, got {device!r}")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} was asked for, but torch sees {torch.cuda.device_count()} CUDA GPUs")
    return device


def check_model(model, device):
    """`model` is a module whose parameters are on `device` (the batches are moved there)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a LongNetLM), got {type(model).__name__}")
    param = next(model.parameters(), None)
    if param is not None and (param.device.type, param.device.index or 0) != (device.type, device.index or 0):
        raise ValueError(f"model is on {param.device} but device is {str(device)!r}; pass device={str(param.device)!r}")


def autocast_for(device):
    """bf16 autocast on a GPU that has it natively (fp16 on older GPUs such as the T4); none on CPU."""
    device = as_device(device)
    if device.type != "cuda":
        return contextlib.nullcontext()
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.autocast("cuda", dtype=torch.bfloat16 if native_bf16 else torch.float16)


@torch.no_grad()
def bits_per_byte(model, data, seq_len, num_bytes, *, batch_size=8, device="cpu", by_position=False):
    """Mean next-byte cross-entropy in bits over the first `num_bytes` bytes of `data`, in windows of seq_len.

    Every byte of every window is scored, including the first bytes of a window, which have
    little context; cutting the same bytes into longer windows gives each byte more context on
    average, which is how a longer test length can help (Table 2). `by_position=True` also
    returns the mean over windows at each position (N,): how the loss changes with context.
    """
    batch_size, device = as_positive_int("batch_size", batch_size), as_device(device)
    check_model(model, device)
    check_flag("by_position", by_position)
    x, y = eval_windows(data, seq_len, num_bytes)  # (M, N) each; checks data, seq_len and num_bytes
    was_training = model.training
    model.eval()
    per_position = torch.zeros(seq_len, dtype=torch.float64)  # (N,) summed over windows
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        with autocast_for(device):
            logits = model(xb)  # (B, N, V)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # an autocast run's softmax in float32
        loss = F.cross_entropy(logits.transpose(1, 2), yb, reduction="none")  # (B, N)
        per_position += loss.sum(0).double().cpu()
    model.train(was_training)
    per_position /= x.shape[0] * math.log(2)  # bits
    mean = per_position.mean().item()
    return (mean, per_position) if by_position else mean


# Fractions of N that end the distance buckets: at N = 4096 the buckets are 1-16, 17-256,
# 257-512, 513-1024, 1025-2048 and 2049-3584. The last ends at 7/8 N (N - 512 at 4096) so the
# needle of the longest query still has a choice of places; 1/16 N is the local window of the
# experiment's models (256 at 4096), so local attention's reach ends at a bucket edge.
BUCKET_ENDS = (1 / 256, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 7 / 8)


def recall_buckets(seq_len):
    """Distance buckets [(a, b), ...] the recall evaluation reports: consecutive, from 1 to 7/8 of seq_len."""
    N = as_positive_int("seq_len", seq_len)
    if N < 8:
        raise ValueError(f"seq_len must be at least 8 for the recall buckets, got {N}")
    ends = sorted({min(N - 2, max(1, int(N * f))) for f in BUCKET_ENDS})  # N - 2: the longest distance
    return [(a, b) for a, b in zip([1] + [end + 1 for end in ends[:-1]], ends)]


def check_bucket(name, bucket, seq_len=None):
    """A distance bucket: a pair (a, b) of ints with 1 <= a <= b (<= seq_len - 2, the longest distance, if given)."""
    top = "" if seq_len is None else f" <= seq_len - 2 = {seq_len - 2}"
    if not (
        isinstance(bucket, (tuple, list))
        and len(bucket) == 2
        and all(isinstance(d, int) and not isinstance(d, bool) for d in bucket)
        and 1 <= bucket[0] <= bucket[1] <= (math.inf if seq_len is None else seq_len - 2)
    ):
        raise ValueError(f"{name} must be a pair (a, b) of ints with 1 <= a <= b{top}, got {bucket!r}")
    return tuple(bucket)


def check_buckets(buckets, seq_len=None):
    """A non-empty list of buckets (`check_bucket`), as a list of tuples; an empty one would measure nothing."""
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, (list, tuple)) or not buckets:
        raise ValueError(f"buckets must be a non-empty list of pairs (a, b), got {buckets!r}")
    return [check_bucket(f"buckets[{i}]", bucket, seq_len) for i, bucket in enumerate(buckets)]


def bucket_name(bucket):
    """ "d=a-b", the name of a bucket's column in the tables (and its key in test.json)."""
    a, b = check_bucket("bucket", bucket)
    return f"d={a}-{b}"


def recall_eval_set(seq_len, sequences_per_bucket, buckets=None, *, num_pairs=4, queries_per_pair=8, seed=1234):
    """A fixed evaluation set of the recall task: x, y, dist (M, N) with M = sequences_per_bucket x buckets.

    For each bucket (a, b) (default `recall_buckets(seq_len)`), `sequences_per_bucket`
    sequences whose queries all lie at distances drawn uniformly from a ... b, so every bucket
    has the same number of queries and every residue mod r appears in it. A dilated branch
    with rate r reaches d positions back in one hop only when r divides d; a test at
    multiples of r would flatter dilated attention, a uniform draw does not. The values are
    balanced in each bucket (each of the 8 as often as the others, give or take one), so a model
    that cannot reach and answers any fixed value scores chance, 1/8: with values drawn
    independently, 128 needles can give one value a fifth of a bucket, and such a guess as much.
    """
    N = as_positive_int("seq_len", seq_len)
    as_positive_int("sequences_per_bucket", sequences_per_bucket)
    buckets = recall_buckets(N) if buckets is None else check_buckets(buckets, N)
    num_pairs = as_positive_int("num_pairs", num_pairs)
    queries_per_pair = as_positive_int("queries_per_pair", queries_per_pair)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63 - 1:
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1), got {seed!r}")  # seed + 1 seeds the values
    # a narrow bucket asks each needle fewer queries; checked for the widest now, not after the first buckets
    per_pairs = [min(queries_per_pair, b - a + 1) for a, b in buckets]
    most = recall_capacity(N, max(per_pairs))
    if num_pairs > most:
        raise ValueError(
            f"num_pairs {num_pairs} x queries_per_pair {max(per_pairs)} must fit in half of seq_len {N} "
            f"(and num_pairs <= {NUM_KEYS}): at most {most} pairs fit"
        )
    generator = torch.Generator().manual_seed(seed)
    balancing = torch.Generator().manual_seed(seed + 1)  # its own stream: the positions do not move
    parts = []
    for (a, b), per_pair in zip(buckets, per_pairs):
        distances = list(range(a, b + 1))
        x, y, dist = recall_batch(
            sequences_per_bucket, N, generator, num_pairs=num_pairs, queries_per_pair=per_pair, distances=distances
        )
        parts.append((balance_values(x, y, balancing), y, dist))
    return tuple(torch.cat(tensors) for tensors in zip(*parts))  # x, y, dist: (M, N) each


def balance_values(x, y, generator):
    """Give the needles of a recall batch balanced values, in place: x (B, N) and y's answers rewritten; returns x.

    Value v goes to the needles i with i = v (mod 8) of a random order, so the counts of the
    values differ by at most one. A needle's queries are the bytes of its key in its sequence.
    """
    rows, needles = (x >= 128).nonzero(as_tuple=True)  # (P,) each: every needle, sequence by sequence
    keys = (x[rows, needles] - 128) // NUM_VALUES  # (P,)
    values = torch.randperm(rows.numel(), generator=generator) % NUM_VALUES  # (P,) balanced
    x[rows, needles] = 128 + NUM_VALUES * keys + values
    for row, key, value in zip(rows.tolist(), keys.tolist(), values.tolist()):
        asked = x[row] == ord("A") + key  # (N,) the needle's queries: keys are distinct in a sequence
        y[row, asked] = ord("0") + value
    return x


def run_eval_sizes(seq_len, num_pairs, queries_per_pair):
    """(num_pairs, queries_per_pair) of a training run's own recall evaluations (`recall_eval_set`).

    The training's needles, asked at most 4 times each (as the experiment's test asks them), and
    fewer needles where all of a needle's queries in one distance bucket would crowd: a needle
    lies before N - 1 - (its farthest distance), which in the farthest bucket can be the first
    eighth of the sequence. Whatever the training task fits (`recall_capacity`), this evaluation
    set can be placed (tested for every seq_len from 8 to 200).
    """
    N = as_positive_int("seq_len", seq_len)
    per_pair = min(as_positive_int("queries_per_pair", queries_per_pair), 4)
    return min(as_positive_int("num_pairs", num_pairs), max(1, (N // 8) // (1 + per_pair))), per_pair


def run_eval_set(seq_len, sequences_per_bucket, num_pairs, queries_per_pair):
    """A training run's own recall evaluation set: `recall_eval_set` with `run_eval_sizes`' needles and queries."""
    pairs, per_pair = run_eval_sizes(seq_len, num_pairs, queries_per_pair)
    return recall_eval_set(seq_len, sequences_per_bucket, num_pairs=pairs, queries_per_pair=per_pair)


def check_eval_set(eval_set):
    """(x, y, dist): three (M, N) integer tensors of one shape, as `recall_eval_set` returns."""
    if not (isinstance(eval_set, (tuple, list)) and len(eval_set) == 3):
        what = f"{len(eval_set)} items" if isinstance(eval_set, (tuple, list)) else type(eval_set).__name__
        raise TypeError(f"eval_set must be the 3 tensors (x, y, dist) of recall_eval_set, got {what}")
    for name, t in zip(("x", "y", "dist"), eval_set):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.is_floating_point() or t.dtype == torch.bool:
            what = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"eval_set's {name} must be a (M, N) integer tensor, got {what}")
    if not eval_set[0].shape == eval_set[1].shape == eval_set[2].shape:
        shapes = ", ".join(str(tuple(t.shape)) for t in eval_set)
        raise ValueError(f"eval_set's x, y and dist must have one shape (M, N), got {shapes}")
    return eval_set


@torch.no_grad()
def recall_accuracy(model, eval_set, *, batch_size=8, device="cpu", buckets=None):
    """{"d=a-b": fraction of its queries answered correctly (argmax)} and the mean loss on answers.

    buckets: [(a, b), ...]; a query at distance d counts in the bucket with a <= d <= b (queries
    in no bucket are not counted). None: one entry per distance, named "d=d-d".
    """
    batch_size, device = as_positive_int("batch_size", batch_size), as_device(device)
    check_model(model, device)
    x, y, dist = check_eval_set(eval_set)
    buckets = None if buckets is None else check_buckets(buckets)
    was_training = model.training
    model.eval()
    correct, count, loss_sum = {}, {}, 0.0
    for i in range(0, x.shape[0], batch_size):
        xb, yb, db = (t[i : i + batch_size].to(device) for t in (x, y, dist))
        with autocast_for(device):
            logits = model(xb)  # (B, N, V)
        scored = yb != IGNORE  # (B, N)
        loss_sum += F.cross_entropy(logits[scored].float(), yb[scored], reduction="sum").item()
        hit = logits[scored].argmax(-1) == yb[scored]
        for d, right in zip(db[scored].tolist(), hit.tolist()):
            bucket = (d, d) if buckets is None else next(((a, b) for a, b in buckets if a <= d <= b), None)
            if bucket is not None:
                correct[bucket] = correct.get(bucket, 0) + int(right)
                count[bucket] = count.get(bucket, 0) + 1
    model.train(was_training)
    accuracy = {bucket_name(bucket): correct[bucket] / count[bucket] for bucket in sorted(count)}
    return accuracy, loss_sum / max(1, sum(count.values()))
