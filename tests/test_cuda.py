"""On a CUDA GPU: the fast path's fused kernels, the layer, the readable path and the simulated
sequence parallelism, each against the oracle. Every test is skipped where torch sees no GPU, so
CPU CI pays nothing; `bash .ci/gpu` runs this module on one.

On CUDA the fast path calls `_scaled_dot_product_efficient_attention` (`longnet_ref/kernels.py`).
The truth is always `oracle_attention` in float64 on the CPU, computed from the very inputs the
GPU got (rounded to their dtype first). In float32, bfloat16 and float16 the rule is flash-attn's:
the fast path's largest error against that truth is at most twice the largest error of a PyTorch
reference computed in the same dtype on the GPU, plus the dtype's own rounding at the size of the
values (flash-attn's `2 * (x + 0.3 - 0.3 - x)` floor), so that a reference that happens to be
exact cannot fail it. Outputs, log-sum-exps and the gradients of q, k and v are all held to it.

The reference: the same mixture as ONE `torch.nn.functional.scaled_dot_product_attention` call
with the float mask log c(h, q, k) from `attention_pattern` (the oracle's bias), and its
log-sum-exp as `torch.logsumexp` of the same biased scores, all in the dtype under test. Not
`oracle_attention` in that dtype: its float32 softmax is more exact than any fused kernel's
backward, which recomputes the probabilities from the stored log-sum-exp (on the CPU's fused
kernel the fast path's float32 dv error came out 3.8x the plain softmax's, with the fast path
itself exact in float64), so against it the rule would fail on the kernel's own backward rather
than on anything this package does.

Sizes are small (N <= 1024): the whole module takes seconds on a GPU.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from longnet_ref import (
    MultiheadDilatedAttention,
    attention_pattern,
    dilated_attention,
    dilated_branch,
    oracle_attention,
)
from longnet_ref.parallel import simulate_sequence_parallel

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False); bash .ci/gpu"
)

DEVICE = torch.device("cuda")
CPU = torch.device("cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Every head-offset rule, and in all but the last case an N that some w does not divide (a ragged last segment).
CASES = {
    # H >= r: the paper's offsets cover every residue
    "paper-ragged": dict(B=2, H=4, N=300, D=16, ws=[64, 128, 256], rs=[1, 2, 4], head_offsets="paper"),
    # r does not divide H: some residues are never kept, so some rows see no key (out 0, lse -inf)
    "torchscale-uncovered": dict(B=1, H=6, N=200, D=32, ws=[48, 200], rs=[4, 8], head_offsets="torchscale"),
    "none-four-branches": dict(B=1, H=2, N=257, D=16, ws=[16, 32, 64, 128], rs=[1, 2, 4, 8], head_offsets="none"),
    "w-above-N": dict(B=2, H=3, N=100, D=8, ws=[512], rs=[2], head_offsets="paper"),
    "D64-N1024": dict(B=1, H=4, N=1024, D=64, ws=[256, 512, 1024], rs=[1, 2, 4], head_offsets="paper"),
}


def make_inputs(cfg, dtype, seed=0):
    """q, k, v and an output gradient g, (B, H, N, D) each, on the CPU, already rounded to `dtype`."""
    generator = torch.Generator().manual_seed(seed)
    shape = (cfg["B"], cfg["H"], cfg["N"], cfg["D"])
    return [torch.randn(*shape, generator=generator).to(dtype) for _ in range(4)]


def branches_of(cfg, function):
    """The mixture for dilated_attention; its last branch (the largest dilation) for dilated_branch."""
    return (cfg["ws"], cfg["rs"]) if function == "dilated_attention" else (cfg["ws"][-1:], cfg["rs"][-1:])


def run(attention, inputs, device, dtype, lse_grad=None):
    """(out, lse, [dq, dk, dv]) of `attention(q, k, v) -> (out, lse)` on `device` in `dtype`, all back on the CPU.

    The loss is sum(out * g), plus sum(lse * lse_grad) over the rows that see a key when `lse_grad`
    is given (a row without keys has lse -inf and no gradient).
    """
    q, k, v = (x.to(device=device, dtype=dtype).clone().requires_grad_(True) for x in inputs[:3])  # fresh leaves
    g = inputs[3].to(device=device, dtype=dtype)
    out, lse = attention(q, k, v)
    loss = (out * g).sum()
    if lse_grad is not None:
        seen = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        loss = loss + (seen * lse_grad.to(device=device, dtype=lse.dtype)).sum()
    loss.backward()
    return out.detach().cpu(), lse.detach().cpu(), [x.grad.cpu() for x in (q, k, v)]


def the_oracle(cfg, ws, rs, causal):
    def attention(q, k, v):
        return oracle_attention(q, k, v, ws, rs, causal=causal, head_offsets=cfg["head_offsets"])

    return attention


def masked_sdpa(q, k, v, counts):
    """softmax(q k^T / sqrt(D) + log c) v as one SDPA call with a float mask, and the log-sum-exp of those scores.

    `counts` is c (H, N, N). A row without keys (c = 0 everywhere) gets out 0 and lse -inf, like the
    oracle: its mask row is 0 inside the call (so no NaN reaches the backward) and its output and
    lse are replaced by 0 and -inf after it (so it gets no gradient either).
    """
    counts = counts.to(q.device)
    covered = (counts > 0).any(-1)  # (H, N)
    log_c = torch.log(counts.to(q.dtype))  # -inf where masked
    mask = torch.where(covered[..., None], log_c, torch.zeros_like(log_c))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None])
    out = torch.where(covered[None, :, :, None], out, torch.zeros_like(out))
    lse = torch.logsumexp(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + mask, dim=-1)
    lse = torch.where(covered[None], lse, torch.full_like(lse, -math.inf))
    return out, lse


def the_reference(cfg, ws, rs, causal):
    """The same-dtype PyTorch reference (module docstring): one masked SDPA call over the whole mixture."""

    def attention(q, k, v):
        H, N = q.shape[1], q.shape[2]
        counts = attention_pattern(N, ws, rs, H, causal=causal, head_offsets=cfg["head_offsets"])
        return masked_sdpa(q, k, v, counts)

    return attention


def the_fast_path(cfg, function, ws, rs, causal, implementation="fast"):
    options = dict(causal=causal, head_offsets=cfg["head_offsets"], implementation=implementation)

    def attention(q, k, v):
        if function == "dilated_branch":
            return dilated_branch(q, k, v, ws[0], rs[0], **options)
        return dilated_attention(q, k, v, ws, rs, return_lse=True, **options)

    return attention


def max_error(x, truth):
    """Largest |x - truth| over the entries where truth is finite; x must be finite there too."""
    x, truth = x.double(), truth.double()
    finite = torch.isfinite(truth)
    assert torch.isfinite(x[finite]).all(), "NaN or inf where the truth is finite"
    return (x[finite] - truth[finite]).abs().max().item() if finite.any() else 0.0


def rounding_floor(truth, dtype):
    """flash-attn's floor: twice the dtype's rounding error at the size of the values (0 for float64)."""
    t = truth[torch.isfinite(truth)].to(dtype)
    return 2 * ((t + 0.3) - 0.3 - t).abs().max().item() if t.numel() else 0.0


def assert_within_twice_the_reference(name, got, reference, truth, dtype):
    got_error, reference_error = max_error(got, truth), max_error(reference, truth)
    floor = rounding_floor(truth, dtype)
    assert got_error <= 2 * reference_error + floor, (
        f"{name}: error {got_error:.3g} against the float64 oracle > 2 x {reference_error:.3g} (same-dtype "
        f"PyTorch reference) + {floor:.3g} (rounding floor of {dtype})"
    )


def assert_same_uncovered_rows(lse, truth_lse):
    """-inf (no key at all) exactly where the oracle has it: such rows must not become NaN or finite."""
    assert torch.equal(torch.isneginf(lse), torch.isneginf(truth_lse)), "rows without keys differ from the oracle"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("function", ["dilated_attention", "dilated_branch"])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_path_within_twice_a_same_dtype_reference(case, function, dtype, causal):
    """The fused CUDA kernels (forward and the q, k, v gradients) against the float64 oracle on the CPU."""
    cfg, dtype = CASES[case], DTYPES[dtype]
    ws, rs = branches_of(cfg, function)
    inputs = make_inputs(cfg, dtype)
    truth = run(the_oracle(cfg, ws, rs, causal), inputs, CPU, torch.float64)
    reference = run(the_reference(cfg, ws, rs, causal), inputs, DEVICE, dtype)
    fast = run(the_fast_path(cfg, function, ws, rs, causal), inputs, DEVICE, dtype)

    assert fast[0].dtype == dtype and fast[0].shape == inputs[0].shape
    assert_same_uncovered_rows(fast[1], truth[1])
    assert_within_twice_the_reference("out", fast[0], reference[0], truth[0], dtype)
    assert_within_twice_the_reference("lse", fast[1], reference[1], truth[1], dtype)
    for name, got, ref, true in zip(("dq", "dk", "dv"), fast[2], reference[2], truth[2]):
        assert_within_twice_the_reference(name, got, ref, true, dtype)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("function", ["dilated_attention", "dilated_branch"])
def test_gradient_through_the_lse(function, dtype):
    """A loss on the log-sum-exp too: the backward's extra column (`kernels.attention_backward`) on CUDA."""
    cfg, dtype = CASES["paper-ragged"], DTYPES[dtype]
    ws, rs = branches_of(cfg, function)
    inputs = make_inputs(cfg, dtype)
    # rounded to the dtype, so that the truth, the reference and the fast path all get the same numbers
    lse_grad = torch.randn(cfg["B"], cfg["H"], cfg["N"], generator=torch.Generator().manual_seed(1)).to(dtype)
    truth = run(the_oracle(cfg, ws, rs, True), inputs, CPU, torch.float64, lse_grad)
    reference = run(the_reference(cfg, ws, rs, True), inputs, DEVICE, dtype, lse_grad)
    try:
        fast = run(the_fast_path(cfg, function, ws, rs, True), inputs, DEVICE, dtype, lse_grad)
    except RuntimeError as error:
        pytest.fail(
            f"the LSE's gradient failed on CUDA. kernels.attention_backward appends one column (D + 1 = "
            f"{cfg['D'] + 1}) and zero-pads to kernels.head_dim_multiple (4 in fp32, 8 in half precision), "
            f"which should meet the kernel's alignment: {error}"
        )
    for name, got, ref, true in zip(("dq", "dk", "dv"), fast[2], reference[2], truth[2]):
        assert_within_twice_the_reference(name, got, ref, true, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_a_head_dim_that_is_not_a_multiple_of_8(dtype):
    """D = 12: not a multiple of 8, so in half precision kernels.py zero-pads q, k, v to 16 for the kernel."""
    cfg, dtype = dict(CASES["paper-ragged"], D=12), DTYPES[dtype]
    ws, rs = cfg["ws"], cfg["rs"]
    inputs = make_inputs(cfg, dtype)
    truth = run(the_oracle(cfg, ws, rs, True), inputs, CPU, torch.float64)
    reference = run(the_reference(cfg, ws, rs, True), inputs, DEVICE, dtype)
    try:
        fast = run(the_fast_path(cfg, "dilated_attention", ws, rs, True), inputs, DEVICE, dtype)
    except RuntimeError as error:
        pytest.fail(f"head dim 12 in {dtype} failed on CUDA although kernels.py pads it to an aligned width: {error}")
    assert_within_twice_the_reference("out", fast[0], reference[0], truth[0], dtype)
    for name, got, ref, true in zip(("dq", "dk", "dv"), fast[2], reference[2], truth[2]):
        assert_within_twice_the_reference(name, got, ref, true, dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("function", ["dilated_attention", "dilated_branch"])
@pytest.mark.parametrize("case", ["paper-ragged", "torchscale-uncovered"])
def test_readable_path_float64_on_cuda_equals_the_oracle(case, function, causal):
    cfg = CASES[case]
    ws, rs = branches_of(cfg, function)
    inputs = make_inputs(cfg, torch.float64)
    truth = run(the_oracle(cfg, ws, rs, causal), inputs, CPU, torch.float64)
    readable = run(the_fast_path(cfg, function, ws, rs, causal, "readable"), inputs, DEVICE, torch.float64)
    assert_same_uncovered_rows(readable[1], truth[1])
    for got, true in zip((readable[0], readable[1], *readable[2]), (truth[0], truth[1], *truth[2])):
        assert max_error(got, true) <= 1e-10


def test_the_fast_path_refuses_float64_on_cuda():
    q, k, v = (x.to(DEVICE) for x in make_inputs(CASES["w-above-N"], torch.float64)[:3])
    with pytest.raises(ValueError, match="no float64 CUDA kernel; use implementation='readable'"):
        dilated_attention(q, k, v, [64], [2])


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_the_layer_on_cuda(dtype):
    """MultiheadDilatedAttention on CUDA (fp32; bf16 and fp16 under autocast, as the LM trains) against the
    same weights in float64 on the CPU, within twice the error of the same layer with its attention as one
    masked SDPA call (the module's reference) in the same setting."""
    torch.manual_seed(0)
    ws, rs = [32, 64, 128], [1, 2, 4]
    layer = MultiheadDilatedAttention(64, 4, ws, rs, causal=True)  # D = 16
    x = torch.randn(2, 150, 64, generator=torch.Generator().manual_seed(2))  # ragged: 150 = 128 + 22
    dy = torch.randn(2, 150, 64, generator=torch.Generator().manual_seed(3))
    low = DTYPES[dtype]

    def by_sdpa(model, inp):  # the layer's forward (no dropout, no rotary) with the reference attention
        B, N, E = inp.shape
        q, k, v = (model.split_heads(proj(inp)) for proj in (model.q_proj, model.k_proj, model.v_proj))
        out, _ = masked_sdpa(q, k, v, attention_pattern(N, ws, rs, model.num_heads, causal=True))
        return model.out_proj(out.transpose(1, 2).reshape(B, N, E))

    def forward_backward(device, precision, reference=False):
        model = copy.deepcopy(layer).to(device=device, dtype=torch.float64 if precision is None else torch.float32)
        inp = x.to(device=device, dtype=next(model.parameters()).dtype).requires_grad_(True)
        autocast = (
            torch.autocast("cuda", dtype=precision)
            if precision not in (None, torch.float32)
            else torch.autocast("cuda", enabled=False)
        )
        with autocast:
            out = by_sdpa(model, inp) if reference else model(inp)
        out.backward(dy.to(device=device, dtype=out.dtype))
        grads = [inp.grad] + [p.grad for p in model.parameters()]
        return out.detach().cpu(), [g.cpu() for g in grads]

    truth = forward_backward(CPU, None)  # float64 on the CPU (the fast path there is exact)
    reference = forward_backward(DEVICE, low, reference=True)
    fast = forward_backward(DEVICE, low)
    assert_within_twice_the_reference("layer output", fast[0], reference[0], truth[0], low)
    names = ["dx"] + [name for name, _ in layer.named_parameters()]
    for name, got, ref, true in zip(names, fast[1], reference[1], truth[1]):
        assert_within_twice_the_reference(f"grad {name}", got, ref, true, low)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_simulated_sequence_parallel_forward_on_cuda(causal):
    """P = 4 simulated ranks on one GPU: the same output as `dilated_attention` on the whole sequence."""
    ws, rs = [32, 128, 256], [1, 2, 4]  # l = 64: a local branch, one over 2 ranks, one over all 4
    q, k, v = (x.to(DEVICE) for x in make_inputs(dict(B=2, H=4, N=256, D=16), torch.float32)[:3])
    with torch.no_grad():
        out, stats = simulate_sequence_parallel(q, k, v, 4, ws, rs, causal=causal)
        single = dilated_attention(q, k, v, ws, rs, causal=causal)
    assert out.device == q.device and len(stats) > 0  # computed on the GPU; the all-gathers ran
    torch.testing.assert_close(out, single, rtol=1e-5, atol=1e-5)
    # and exactly the definition, per rank in float64 with the readable path
    q64, k64, v64 = (x.double() for x in (q, k, v))
    with torch.no_grad():
        out64, _ = simulate_sequence_parallel(q64, k64, v64, 4, ws, rs, causal=causal, implementation="readable")
    truth, _ = oracle_attention(q64.cpu(), k64.cpu(), v64.cpu(), ws, rs, causal=causal)
    assert max_error(out64.cpu(), truth) <= 1e-10


def test_simulated_sequence_parallel_backward_on_cuda_is_refused():
    q, k, v = (x.to(DEVICE).requires_grad_(True) for x in make_inputs(dict(B=1, H=2, N=64, D=16), torch.float32)[:3])
    with pytest.raises(ValueError, match="the simulated backward runs on cpu tensors only, got device cuda"):
        simulate_sequence_parallel(q, k, v, 2, [32, 64], [1, 2])


def test_the_benchmark_measures_on_cuda():
    """`python -m longnet_ref.bench --device cuda`'s measurement: outputs on the GPU, checked on the CPU."""
    from longnet_ref.bench.measure import measure, tolerance

    base = dict(N=2**11, B=1, H=2, D=16, ws=[2048], rs=[1], causal=True, backward=True, repeats=3, device="cuda")
    for result in measure([dict(base, path="dense"), dict(base, path="fast")]):
        assert result["device"] == "cuda" and result["seconds"] > 0
        assert result["max_error"] <= tolerance(result), result
