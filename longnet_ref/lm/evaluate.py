"""Measuring a trained model: bits per byte at a test length, and recall accuracy against distance.

Shape legend (the package's, plus): V vocabulary; M = num_bytes // N evaluation windows.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

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


def recall_distances(seq_len):
    """Base distances the recall evaluation reports: 1/128 of the length up to 7/8 of it."""
    fractions = (1 / 128, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8)
    return sorted({min(seq_len - 5, max(1, round(seq_len * f))) for f in fractions})


def recall_eval_set(seq_len, num_sequences, distances=None, *, num_pairs=4, queries_per_pair=8, seed=1234):
    """A fixed evaluation set of the recall task: each needle asked at `queries_per_pair` of the distances.

    By default the distances are base, base+1, base+2, base+3 for every base distance of
    `recall_distances`: all four residues mod 4. A dilated branch with rate r lets a query see
    the key d positions back in one hop only when r divides d (both must have the head's
    residue), so distances that are all multiples of 4 would flatter dilated attention;
    `recall_accuracy(..., buckets=recall_distances(N))` reports the mean over the four.
    """
    if distances is None:
        distances = sorted({base + i for base in recall_distances(seq_len) for i in range(4)})
    distances = list(distances)
    generator = torch.Generator().manual_seed(seed)
    per_pair = min(queries_per_pair, len(set(distances)))
    return recall_batch(
        num_sequences, seq_len, generator, num_pairs=num_pairs, queries_per_pair=per_pair, distances=distances
    )


@torch.no_grad()
def recall_accuracy(model, eval_set, *, batch_size=8, device="cpu", buckets=None):
    """{distance: fraction of queries answered correctly (argmax)} and the mean loss on answers.

    buckets: sorted base distances; a query at distance d then counts for the largest base <= d.
    """
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
            if buckets is not None:
                d = max(bucket for bucket in buckets if bucket <= d)
            correct[d] = correct.get(d, 0) + int(right)
            count[d] = count.get(d, 0) + 1
    model.train(was_training)
    accuracy = {d: correct[d] / count[d] for d in sorted(count)}
    return accuracy, loss_sum / max(1, sum(count.values()))
