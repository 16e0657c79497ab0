"""Measuring a trained model: bits per byte at a test length, and recall accuracy against distance.

Shape legend (the package's, plus): V vocabulary; M = num_bytes // N evaluation windows.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ..checks import as_positive_int
from .data import IGNORE, eval_windows, recall_batch


def autocast_for(device):
    """bf16 autocast on a GPU that has it natively (fp16 on older GPUs such as the T4); none on CPU."""
    device = torch.device(device)
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
    batch_size = as_positive_int("batch_size", batch_size)
    was_training = model.training
    model.eval()
    x, y = eval_windows(data, seq_len, num_bytes)  # (M, N) each
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
    ends = sorted({max(1, int(N * f)) for f in BUCKET_ENDS})
    return [(a, b) for a, b in zip([1] + [end + 1 for end in ends[:-1]], ends)]


def bucket_name(bucket):
    """ "d=a-b", the name of a bucket's column in the tables (and its key in test.json)."""
    a, b = bucket
    return f"d={a}-{b}"


def recall_eval_set(seq_len, sequences_per_bucket, buckets=None, *, num_pairs=4, queries_per_pair=8, seed=1234):
    """A fixed evaluation set of the recall task: x, y, dist (M, N) with M = sequences_per_bucket x buckets.

    For each bucket (a, b) (default `recall_buckets(seq_len)`), `sequences_per_bucket`
    sequences whose queries all lie at distances drawn uniformly from a ... b, so every bucket
    has the same number of queries and every residue mod r appears in it. A dilated branch
    with rate r reaches d positions back in one hop only when r divides d; a test at
    multiples of r would flatter dilated attention, a uniform draw does not.
    """
    N = as_positive_int("seq_len", seq_len)
    as_positive_int("sequences_per_bucket", sequences_per_bucket)
    buckets = recall_buckets(N) if buckets is None else list(buckets)
    for i, bucket in enumerate(buckets):
        if not (
            isinstance(bucket, (tuple, list))
            and len(bucket) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) for d in bucket)
            and 1 <= bucket[0] <= bucket[1] <= N - 2
        ):
            raise ValueError(
                f"buckets[{i}] must be a pair (a, b) of ints with 1 <= a <= b <= seq_len - 2 = {N - 2}, got {bucket!r}"
            )
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for a, b in buckets:
        distances = list(range(a, b + 1))
        per_pair = min(queries_per_pair, len(distances))
        parts.append(
            recall_batch(
                sequences_per_bucket, N, generator, num_pairs=num_pairs, queries_per_pair=per_pair, distances=distances
            )
        )
    return tuple(torch.cat(tensors) for tensors in zip(*parts))  # x, y, dist: (M, N) each


@torch.no_grad()
def recall_accuracy(model, eval_set, *, batch_size=8, device="cpu", buckets=None):
    """{"d=a-b": fraction of its queries answered correctly (argmax)} and the mean loss on answers.

    buckets: [(a, b), ...]; a query at distance d counts in the bucket with a <= d <= b (queries
    in no bucket are not counted). None: one entry per distance, named "d=d-d".
    """
    batch_size = as_positive_int("batch_size", batch_size)
    was_training = model.training
    model.eval()
    x, y, dist = eval_set
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
