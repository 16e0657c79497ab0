"""Token-by-token decoding with a key/value cache that respects segments and head offsets.

A causal dilated branch (w, r) is prefix-consistent: its output at a position depends only on
the positions up to it, through a rule of absolute positions alone. A branch cuts the sequence
into segments [m w, (m + 1) w) (Eq. 3; m = pos // w, and one segment when w >= N) and keeps,
in each, the positions whose distance to the segment start is o_j mod r, o_j head j's offset
(Eqs. 3-5, Sec. 2.3); a kept query attends the kept keys of its own segment (Eq. 6), causal: up
to itself. That is `patterns.keeps(pos, key, w, r, o_j, causal=True)`, the one keep rule,
which `cached_attention` calls. It never depends on positions after `pos`, so a new token's
attention needs only the cached keys and values of its own segment, rotated (RoPE) once at
their own positions.

A query the branch does not keep gets out 0 and lse -inf there; the branches are merged by
their log-sum-exps (Eq. 10, `merge_branches`). The official torchscale decoding treats a new
token as if it started a new segment and attends every cached key: wrong past the first
segment. Here a test checks that cached decoding gives the full forward's logits at every
step, past the largest segment length.

Shape legend (the package's, plus): T new tokens, J = pos + 1 - m w keys of the query's segment
so far (its window), V vocabulary.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from ..attention import dense_attention, repeat_kv_heads
from ..checks import as_count, as_positive_int, check_flag, check_tensor
from ..cli import HelpFormatter
from ..mixture import dilated_attention, merge_branches
from ..patterns import head_offset, keeps
from .model import check_tokens


class KVCache:
    """Keys (after RoPE) and values of every layer, in buffers that grow as tokens arrive."""

    def __init__(self, num_layers: int):
        num_layers = as_positive_int("num_layers", num_layers)
        self.keys = [None] * num_layers  # each (B, H_kv, N, D): H_kv = H unless grouped-query
        self.values = [None] * num_layers
        self.length = 0  # tokens cached so far (all layers agree once a forward has finished)

    def __call__(self, layer_index, attn, hidden):
        """Attention of layer `layer_index` for new inputs `hidden` (B, T, E) at positions length..length+T-1."""
        B, T, E = hidden.shape
        start = self.length
        positions = torch.arange(start, start + T, device=hidden.device)  # (T,) absolute positions
        q, k, v = (attn.split_heads(proj(hidden)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))  # (B, H, T, D)
        if attn.rotary is not None:
            q, k = attn.rotary(q, k, positions)
        if self.keys[layer_index] is None:
            self.keys[layer_index], self.values[layer_index] = k, v
        else:
            self.keys[layer_index] = torch.cat([self.keys[layer_index], k], dim=2)  # (B, H, start+T, D)
            self.values[layer_index] = torch.cat([self.values[layer_index], v], dim=2)
        if start == 0:
            # The prompt: the ordinary forward (fast path) on the whole prefix.
            out = dilated_attention(
                q,
                k,
                v,
                attn.segment_lengths,
                attn.dilation_rates,
                causal=True,
                head_offsets=attn.head_offsets,
                implementation=attn.implementation,
            )  # (B, H, T, D)
        else:
            keys, values = self.keys[layer_index], self.values[layer_index]
            rows = [cached_attention(q[:, :, t : t + 1], keys, values, start + t, attn) for t in range(T)]
            out = torch.cat(rows, dim=2)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, E)  # (B, T, E)
        return attn.out_proj(out)

    def advance(self, num_tokens: int):
        self.length += as_count("num_tokens", num_tokens)


def cached_attention(q, keys, values, pos, attn):
    """The mixture's output for one query q (B, H, 1, D) at absolute position `pos`, from the cache.

    keys, values: (B, H, >= pos + 1, D), position j at index j. Each branch attends the window
    keys[m w : pos + 1] of the query's segment m, with the keys `patterns.keeps` drops for a
    head masked (-inf bias): exactly the keys the full forward's branch gives this query (keys
    outside the window are in another segment or after `pos`, which `keeps` drops too).
    `dense_attention` returns out 0 and lse -inf where every key is masked, which is what a
    branch that does not keep the query gives.
    """
    q, keys, values = check_tensor("q", q), check_tensor("keys", keys), check_tensor("values", values)
    pos = as_count("pos", pos)
    if q.shape[2] != 1 or keys.shape[2] <= pos or values.shape[:3] != keys.shape[:3]:
        raise ValueError(
            f"q must be (B, H, 1, D) and keys, values (B, H_kv, >= pos + 1 = {pos + 1}, D), got q {tuple(q.shape)}, "
            f"keys {tuple(keys.shape)}, values {tuple(values.shape)}"
        )
    H = q.shape[1]
    outs, lses = [], []
    for w, r in zip(attn.segment_lengths, attn.dilation_rates):
        first = (pos // w) * w  # m w: the start of the query's segment
        window = torch.arange(first, pos + 1, device=q.device)  # (J,) positions the query can see
        offsets = torch.tensor([head_offset(j, H, r, attn.head_offsets) for j in range(H)], device=q.device)  # (H,)
        visible = keeps(pos, window[None, :], w, r, offsets[:, None], causal=True)  # (H, J)
        bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, -math.inf)
        window_k, window_v = repeat_kv_heads(keys[:, :, first : pos + 1], values[:, :, first : pos + 1], H)
        out, lse = dense_attention(q, window_k, window_v, bias=bias[None, :, None, :])  # (B, H, 1, D), (B, H, 1)
        outs.append(out)
        lses.append(lse)
    out, _ = merge_branches(outs, lses)  # Eq. 10
    return out  # (B, H, 1, D)


@torch.no_grad()
def generate(model, prompt, max_new_tokens, *, temperature=1.0, top_k=None, generator=None, return_logits=False):
    """Continue `prompt` (B, T) int64 by `max_new_tokens` tokens, one at a time, with a KV cache.

    temperature 0 means greedy (argmax). top_k keeps the k most likely tokens before sampling.
    Returns the tokens (B, T + max_new_tokens); with `return_logits=True` also the logits
    (B, T + max_new_tokens - 1, V) that produced every position after the first (the
    prompt's from the prefill forward, then one per decoding step).
    """
    from .model import LongNetLM  # here: the module's decoding above works on any layer

    if not isinstance(model, LongNetLM):
        raise TypeError(f"model must be a longnet_ref.lm.model.LongNetLM, got {type(model).__name__}")
    check_tokens("prompt", prompt, model.config.vocab_size)
    if prompt.shape[1] == 0:
        raise ValueError(f"prompt must be (B, T) token ids with T >= 1, got shape {tuple(prompt.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    check_sampling(temperature, top_k)
    check_flag("return_logits", return_logits)
    was_training = model.training
    model.eval()
    cache = KVCache(len(model.blocks))
    logits = model(prompt, attend=cache)  # prefill: (B, T, V)
    cache.advance(prompt.shape[1])
    tokens, all_logits = prompt, [logits]
    for step in range(max_new_tokens):
        new = sample(logits[:, -1], temperature, top_k, generator)  # (B, 1)
        tokens = torch.cat([tokens, new], dim=1)
        if step < max_new_tokens - 1:  # the last token's own prediction is never needed
            logits = model(new, attend=cache)  # (B, 1, V): one query against the cache
            cache.advance(1)
            all_logits.append(logits)
    model.train(was_training)
    if return_logits:
        return tokens, torch.cat(all_logits, dim=1)[:, : tokens.shape[1] - 1]
    return tokens


def check_sampling(temperature, top_k):
    """temperature: a finite number >= 0 (0: greedy); top_k: None or a positive integer."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if not math.isfinite(temperature):
        raise ValueError(f"temperature must be finite, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or a positive integer, got {top_k!r}")


def sample(logits, temperature, top_k, generator=None):
    """logits (B, V) -> next tokens (B, 1)."""
    check_sampling(temperature, top_k)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[-1] == 0:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a (B, V) tensor with V >= 1, got {shape}")
    check_tensor("logits", logits, dims=2)  # floating point: integer "logits" are token ids passed by mistake
    if not torch.isfinite(logits).any(dim=-1).all() or torch.isnan(logits).any():
        raise ValueError("logits must not be NaN, and every row needs a finite logit")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # Subtract the row maximum, then divide in float64 (which holds any positive Python float):
    # the largest logit becomes 0 / T = 0 and the others -large or -inf, so even temperature
    # 1e-300 samples greedily instead of producing inf - inf = NaN.
    logits = logits.double()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def main(argv=None):
    """`python -m longnet_ref.lm.generate`: continue a prompt with a trained checkpoint, print the text."""
    from .checkpoint import load_checkpoint  # here: the decoding above needs no checkpoint code

    parser = argparse.ArgumentParser(
        prog="python -m longnet_ref.lm.generate",
        description="Continue a prompt with a checkpoint written by `python -m longnet_ref.lm.train`, decoding "
        "token by token with the KV cache (exact: equal to the full forward), and print the continuation.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint.pt written by train")
    parser.add_argument("--prompt", required=True, help="the text to continue (UTF-8; the model reads bytes)")
    parser.add_argument("--max-new-tokens", type=int, required=True, help="bytes to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely bytes only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        parser.error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        parser.error(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be a positive integer, got {args.top_k}")
    prompt = args.prompt.encode("utf-8")
    if not prompt:
        parser.error("--prompt must not be empty (decoding starts from at least one byte)")
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("torch sees no CUDA GPU")
        model, _ = load_checkpoint(args.checkpoint, map_location=device, flag="--checkpoint")
    except (ValueError, RuntimeError) as error:
        parser.error(f"--device {args.device}: {error}" if "device" in str(error).lower() else str(error))
    generator = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # (1, T) byte ids
    tokens = generate(model.to(device), idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      generator=generator)  # fmt: skip
    continuation = bytes(tokens[0, len(prompt) :].tolist())
    sys.stdout.write(continuation.decode("utf-8", errors="replace") + "\n")  # a cut-off character shows as U+FFFD
    return 0


if __name__ == "__main__":
    sys.exit(main())
