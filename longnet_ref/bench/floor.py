"""The kernel floor: what one SDPA call per branch costs when its rows already lie side by side.

The fast path hands the fused kernel strided views, merges branches as they finish and scatters
rows back; the floor does none of that. Each branch's kept rows (paper offsets) are gathered
contiguously before timing, as (B*S, H, K, D) = (B N / w, H, w / r, D), and one
`scaled_dot_product_attention` call per branch is all that is timed. fast / floor is the glue
the package adds to the kernel's own work (`python -m longnet_ref.bench --sections glue`).
Each branch's rows are checked against that branch's oracle, as every timed path is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dilated import segment, sparsify
from ..oracle import oracle_rows
from ..patterns import head_offset, keeps


def floor_rows(x, segment_length, dilation_rate):
    """A branch's kept rows, gathered contiguously: (B, H, N, D) -> (B*S, H, K, D) (paper offsets).

    Needs N % w == 0 and w % r == 0 (the bench's mixtures), so no segment is ragged or padded.
    """
    B, H, N, D = x.shape
    w, r = min(segment_length, N), dilation_rate
    if N % w or w % r:
        raise ValueError(f"the kernel floor needs N % w == 0 and w % r == 0, got N={N}, w={w}, r={r}")
    offsets = torch.tensor([head_offset(h, H, r) for h in range(H)], device=x.device)  # (H,)
    rows = sparsify(segment(x, w), r, offsets)  # (B, H, S, K, D), Eqs. 3-4
    return rows.transpose(1, 2).reshape(B * (N // w), H, w // r, D).contiguous()


def prepare_floor(cfg, q, k, v, generator):
    """One timed step of the floor: SDPA (and its backward) on each branch's pre-gathered rows."""
    branches = [
        tuple(floor_rows(x.detach(), w, r).requires_grad_(cfg["backward"]) for x in (q, k, v))
        for w, r in zip(cfg["ws"], cfg["rs"])
    ]
    grads = (
        [torch.randn(b[0].shape, generator=generator).to(b[0].device) for b in branches] if cfg["backward"] else None
    )

    def step():
        outs = []
        with torch.no_grad() if grads is None else torch.enable_grad():
            for i, (qb, kb, vb) in enumerate(branches):
                outs.append(F.scaled_dot_product_attention(qb, kb, vb, is_causal=cfg["causal"]))
                if grads is not None:
                    outs[-1].backward(grads[i])
                    for x in (qb, kb, vb):
                        x.grad = None
        return outs

    return step


def check_floor(cfg, inputs, outs, rows):
    """Max abs error of the floor's outputs on sampled query rows against each branch's float64 oracle."""
    B, H, N, D = inputs[0].shape
    error = 0.0
    for (w, r), out in zip(zip(cfg["ws"], cfg["rs"]), outs):
        w = min(w, N)
        ref, _lse = oracle_rows(*(x.detach().cpu().double() for x in inputs), rows, [w], [r], causal=cfg["causal"])
        out = out.detach().cpu().double().view(B, N // w, H, w // r, D)  # (B, S, H, K, D)
        for i, pos in enumerate(rows):
            for h in range(H):
                if keeps(pos, pos, w, r, head_offset(h, H, r)):  # the row is in this branch for head h
                    row = out[:, pos // w, h, (pos % w) // r]  # (B, D)
                    error = max(error, (row - ref[:, h, i]).abs().max().item())
    return error
