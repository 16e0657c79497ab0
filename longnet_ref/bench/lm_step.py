"""One training step of the small LM, profiled: `python -m longnet_ref.bench --sections lm`.

For each attention kind (dense, local, dilated: the recall experiment's models, E = 128, H = 4,
2 layers; `lm.experiment.recall_branches`) at N = 1024 (B = 8), 4096 (B = 2) and 8192 (B = 1), one AdamW
step (forward, backward, update) is timed `repeats` times after a warm-up, interleaved with the
other kinds, median reported. One more step runs under torch.profiler, and its self CPU time is
split three ways:
- attention: the fused attention kernel, forward and backward;
- matmul: `mm`, `addmm`, `bmm` (projections, MLP, the tied head);
- other: the rest, what is not the model's arithmetic (elementwise ops, copies, the running
  merge, LayerNorm, GELU, the loss and the optimizer's update).

The step's arithmetic rate: its FLOPs (6 x the Linear and head weights x tokens: forward 2,
backward 4 per weight and token; plus its attention, `measure.attention_flops` per layer,
causal, forward+backward) over the median step time, against the same run's matmul GFLOP/s
(`measure.matmul_gflops`), as a share: 1.0 would be a step that only multiplies matrices.
"""

from __future__ import annotations

import importlib
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

from ..lm.experiment import recall_branches
from ..lm.model import LongNetLM, ModelConfig
from .measure import attention_flops, matmul_gflops

KINDS = ("dense", "local", "dilated")
SHAPES = ((1024, 8), (4096, 2), (8192, 1))  # (N, B): 8192 tokens per step; 8192 is where a recall stage would go next
SIZES = dict(embed_dim=128, num_heads=4, num_layers=2)
KERNEL_OPS = ("scaled_dot_product", "_flash_attention")  # the fused attention kernel, forward and backward
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}


def lm_setup(kind, seq_len, batch, seed=0):
    """The model, its optimizer and one batch of random bytes (timing does not depend on the values)."""
    branches = recall_branches(f"recall-{kind}", seq_len)
    torch.manual_seed(seed)
    model = LongNetLM(ModelConfig(**SIZES, **branches))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    x, y = (torch.randint(0, 256, (batch, seq_len), generator=generator) for _ in range(2))

    def step():
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return model, step


def step_flops(model, seq_len, batch):
    """FLOPs of one training step: the weights' matmuls (6 per weight and token) and the attention."""
    config = model.config
    weights = sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))
    weights += model.embed.weight.numel()  # the tied head: logits = x @ E^T
    dense = config.attention == "dense"  # its config's branches are unused defaults
    attention = dict(
        path="dense" if dense else "fast",
        B=batch,
        H=config.num_heads,
        D=config.embed_dim // config.num_heads,
        N=seq_len,
        ws=[seq_len] if dense else config.segment_lengths,
        rs=[1] if dense else config.dilation_rates,
        causal=True,
        backward=True,
    )
    return 6 * weights * batch * seq_len + config.num_layers * attention_flops(attention)


def split_profile(step):
    """Self CPU seconds of one profiled step: {"attention", "matmul", "other"}, and the kernel calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    shares, calls = {"attention": 0.0, "matmul": 0.0, "other": 0.0}, 0
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        if any(op in event.key for op in KERNEL_OPS):
            shares["attention"] += seconds
            calls += event.count
        elif event.key in MATMUL_OPS:
            shares["matmul"] += seconds
        else:
            shares["other"] += seconds
    return shares, calls


def profile_lm_steps(repeats=3, shapes=SHAPES, kinds=KINDS):
    """One result dict per (kind, N): tokens/s, step seconds, shares of the profiled step, GFLOP/s share."""
    setups = {(kind, n, b): lm_setup(kind, n, b) for n, b in shapes for kind in kinds}
    times = {key: [] for key in setups}
    for _, step in setups.values():
        step()  # warm-up: allocations, the optimizer's state
    matmul = []
    for _ in range(repeats):  # interleaved rounds: a noisy moment costs every kind alike
        for key, (_, step) in setups.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
        matmul.append(matmul_gflops(repeats=3))
    ceiling = statistics.median(matmul)
    results = []
    for (kind, n, b), (model, step) in setups.items():
        seconds = statistics.median(times[(kind, n, b)])
        shares, calls = split_profile(step)
        total = sum(shares.values())
        gflops = step_flops(model, n, b) / seconds / 1e9
        results.append(dict(kind=kind, N=n, B=b, seconds=seconds, tokens_per_s=b * n / seconds,
                            shares={name: value / total for name, value in shares.items()}, kernel_calls=calls,
                            gflops=gflops, matmul_gflops=ceiling, share_of_matmul=gflops / ceiling))  # fmt: skip
    return results


def load_against(path):
    """The `longnet_ref` package of another checkout (say a git worktree of an older commit),
    imported beside this one as `longnet_against`: the code before a change, timed in this process."""
    package = Path(path) / "longnet_ref"
    if not (package / "__init__.py").is_file() or not (package / "bench" / "lm_step.py").is_file():
        raise ValueError(f"against must be a checkout of this project with longnet_ref/bench/lm_step.py, got {path!r}")
    spec = importlib.util.spec_from_file_location(
        "longnet_against", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    for name in [name for name in sys.modules if name.split(".")[0] == "longnet_against"]:
        del sys.modules[name]  # an earlier --against checkout's modules: not this one's
    module = importlib.util.module_from_spec(spec)
    sys.modules["longnet_against"] = module  # its relative imports resolve inside it, not to this package
    spec.loader.exec_module(module)
    return importlib.import_module("longnet_against.bench.lm_step")


def compare_lm_steps(against, repeats=3, shapes=SHAPES, kinds=KINDS):
    """Before and after: each kind's step with the other checkout's code (`against`, from
    `load_against`) and with this one's, same seed and batch, interleaved in one process, medians
    of `repeats`. One dict per (kind, N): tokens/s and share of the run's matmul GFLOP/s, both sides."""
    setups = {}
    for n, b in shapes:
        for kind in kinds:
            setups[(kind, n, b, "before")] = against.lm_setup(kind, n, b)
            setups[(kind, n, b, "after")] = lm_setup(kind, n, b)
            before, after = (vars(setups[(kind, n, b, side)][0].config) for side in ("before", "after"))
            differ = {field for field in before.keys() & after.keys() if before[field] != after[field]}
            if differ:  # else the two sides train different models (fields one side lacks: not compared)
                raise ValueError(f"against's {kind} model at N = {n} differs from this one's in {sorted(differ)}")
    for _, step in setups.values():
        step()  # warm-up: allocations, the optimizer's state
    times = {key: [] for key in setups}
    matmul = []
    for round_ in range(repeats):  # interleaved rounds: a noisy moment costs both sides alike
        keys = list(setups) if round_ % 2 == 0 else list(reversed(setups))  # neither side always goes first
        for key in keys:
            start = time.perf_counter()
            setups[key][1]()
            times[key].append(time.perf_counter() - start)
        matmul.append(matmul_gflops(repeats=3))
    ceiling = statistics.median(matmul)
    results = []
    for n, b in shapes:
        for kind in kinds:
            before, after = (statistics.median(times[(kind, n, b, side)]) for side in ("before", "after"))
            gflops = step_flops(setups[(kind, n, b, "after")][0], n, b) / 1e9  # same config: same FLOPs both sides
            results.append(dict(kind=kind, N=n, B=b, before=b * n / before, after=b * n / after,
                                share_before=gflops / before / ceiling, share_after=gflops / after / ceiling,
                                matmul_gflops=ceiling))  # fmt: skip
    return results


def describe_comparison(result):
    return (f"  lm {result['kind']:>7} N={result['N']:<5} B={result['B']}: tokens/s before {result['before']:8,.0f} "
            f"after {result['after']:8,.0f} (x {result['after'] / result['before']:.3f}) | share of matmul "
            f"{result['matmul_gflops']:.1f} GFLOP/s: before {result['share_before']:.2f} after "
            f"{result['share_after']:.2f}")  # fmt: skip


def describe_lm(result):
    shares = result["shares"]
    return (f"  lm {result['kind']:>7} N={result['N']:<5} B={result['B']}: {result['seconds']:.3f} s/step "
            f"{result['tokens_per_s']:8,.0f} tokens/s | attention {shares['attention']:4.0%} "
            f"({result['kernel_calls']} kernel calls) matmul {shares['matmul']:4.0%} other {shares['other']:4.0%} | "
            f"{result['gflops']:5.1f} GFLOP/s = {result['share_of_matmul']:.2f} of matmul "
            f"{result['matmul_gflops']:.1f}")  # fmt: skip
