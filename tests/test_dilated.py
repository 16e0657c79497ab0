"""Fast and readable dilated attention against the oracle: property tests and edge cases."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import rand_qkv
from hypothesis import example, given
from hypothesis import strategies as st

from longnet_ref import dilated_attention, dilated_branch, merge_branches, oracle_attention, oracle_rows


@st.composite
def configs(draw):
    """Random mixtures, including N not a multiple of any w, w > N, H < r and H not divisible by r."""
    n_branches = draw(st.integers(1, 4))
    segment_lengths = [draw(st.integers(1, 320)) for _ in range(n_branches)]
    dilation_rates = [draw(st.integers(1, min(w, 12))) for w in segment_lengths]
    return dict(
        B=draw(st.integers(1, 2)),
        H=draw(st.integers(1, 6)),
        N=draw(st.integers(1, 300)),
        D=draw(st.sampled_from([1, 3, 8])),
        segment_lengths=segment_lengths,
        dilation_rates=dilation_rates,
        causal=draw(st.booleans()),
        head_offsets=draw(st.sampled_from(["paper", "torchscale", "none"])),
    )


# Hypothesis favours small draws; these pin the large and awkward corners down explicitly.
BIG = dict(
    B=2, H=5, N=300, D=8, segment_lengths=[7, 64, 500], dilation_rates=[1, 5, 12], causal=True, head_offsets="paper"
)
TORCHSCALE = dict(BIG, H=6, causal=False, head_offsets="torchscale", segment_lengths=[96, 299], dilation_rates=[4, 8])
NONE = dict(BIG, H=1, N=257, head_offsets="none", segment_lengths=[16, 32, 64, 128], dilation_rates=[1, 2, 4, 8])


def _assert_equal_to_oracle(out, lse, ref_out, ref_lse):
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    # lse: -inf exactly where the oracle has -inf (uncovered rows), equal elsewhere
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=0, atol=1e-10)


@pytest.mark.parametrize("function", ["dilated_attention", "dilated_branch"])
@given(configs(), st.sampled_from(["fast", "readable"]))
@example(BIG, "fast")
@example(BIG, "readable")
@example(TORCHSCALE, "fast")
@example(TORCHSCALE, "readable")
@example(NONE, "fast")
@example(NONE, "readable")
def test_equals_oracle(function, cfg, implementation):
    """The whole mixture (`dilated_attention`), and its first branch alone (`dilated_branch`)."""
    q, k, v = rand_qkv(cfg["B"], cfg["H"], cfg["N"], cfg["D"])
    ws, rs = cfg["segment_lengths"], cfg["dilation_rates"]
    kw = dict(causal=cfg["causal"], head_offsets=cfg["head_offsets"])
    if function == "dilated_attention":
        out, lse = dilated_attention(q, k, v, ws, rs, return_lse=True, implementation=implementation, **kw)
    else:
        ws, rs = ws[:1], rs[:1]
        out, lse = dilated_branch(q, k, v, ws[0], rs[0], implementation=implementation, **kw)
    ref_out, ref_lse = oracle_attention(q, k, v, ws, rs, **kw)
    _assert_equal_to_oracle(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("implementation", ["fast", "readable"])
@pytest.mark.parametrize("causal", [False, True])
def test_one_full_branch_is_torch_sdpa(implementation, causal):
    q, k, v = rand_qkv(2, 3, 45, 8)
    out = dilated_attention(q, k, v, [64], [1], causal=causal, implementation=implementation)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), rtol=0, atol=1e-12)


def test_rows_not_kept_are_zero_with_lse_minus_inf():
    q, k, v = rand_qkv(1, 2, 10, 4)
    for implementation in ("fast", "readable"):
        out, lse = dilated_branch(q, k, v, 4, 2, implementation=implementation)
        # head 0 keeps even rows of each segment [0..3] [4..7] [8, 9]; head 1 the odd ones
        assert torch.all(out[0, 0, 1::2] == 0) and torch.all(lse[0, 0, 1::2] == -math.inf)
        assert torch.all(out[0, 1, 0::2] == 0) and torch.all(lse[0, 1, 0::2] == -math.inf)
        assert torch.isfinite(lse[0, 0, 0::2]).all()


def test_ragged_last_segment_is_its_own_segment():
    # N = 10, w = 4: the last segment is [8, 9]; its queries must not see keys 0..7.
    q, k, v = rand_qkv(1, 1, 10, 4)
    out, _ = dilated_branch(q, k, v, 4, 1)
    expected = F.scaled_dot_product_attention(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:])
    torch.testing.assert_close(out[:, :, 8:], expected, rtol=0, atol=1e-12)


def test_merge_of_one_branch_is_identity():
    q, k, v = rand_qkv(2, 3, 20, 4)
    out, lse = dilated_branch(q, k, v, 8, 2)
    merged, merged_lse = merge_branches([out], [lse])
    assert torch.equal(merged, out) and torch.equal(merged_lse, lse)


@pytest.mark.parametrize("causal", [False, True])
def test_merge_equals_one_softmax_over_the_multiset_union(causal):
    """Eq. 10 merge of separately computed branches == the oracle's single softmax with log c."""
    q, k, v = rand_qkv(1, 4, 40, 8)
    ws, rs = [8, 16, 32], [1, 2, 4]
    results = [dilated_branch(q, k, v, w, r, causal=causal) for w, r in zip(ws, rs)]
    out, lse = merge_branches([o for o, _ in results], [l for _, l in results])
    ref_out, ref_lse = oracle_attention(q, k, v, ws, rs, causal=causal)
    _assert_equal_to_oracle(out, lse, ref_out, ref_lse)


def test_merge_of_uncovered_rows_is_zero_not_nan():
    # H = 2 with the torchscale rule and r = 4: heads take offsets 0 and 1; residues 2, 3 are never kept.
    q, k, v = rand_qkv(1, 2, 16, 4)
    for implementation in ("fast", "readable"):
        out, lse = dilated_attention(
            q, k, v, [8], [4], head_offsets="torchscale", return_lse=True, implementation=implementation
        )
        assert not torch.isnan(out).any()
        assert torch.all(out[0, 0, 2::4] == 0) and torch.all(lse[0, 0, 2::4] == -math.inf)
    merged, _ = merge_branches([torch.zeros(1, 1, 3, 2)] * 2, [torch.full((1, 1, 3), -math.inf)] * 2)
    assert torch.equal(merged, torch.zeros(1, 1, 3, 2))


def test_fast_path_does_not_copy_or_fall_back(monkeypatch):
    """The fast path hands strided views (not copies) to the fused kernel, one call per piece."""
    import longnet_ref.fast as fast

    calls = []
    real = fast.attention_forward

    def spy(q, k, v, causal, scale, key_mask=None):
        calls.append((q.is_contiguous(), q.data_ptr()))
        return real(q, k, v, causal, scale, key_mask)

    monkeypatch.setattr(fast, "attention_forward", spy)
    q, k, v = rand_qkv(1, 4, 64, 8)
    dilated_attention(q, k, v, [16, 32], [2, 4])
    # branch (16, 2): 2 offset groups of 2 heads over 4 segments, a call each; branch (32, 4):
    # 4 groups of one head, side by side in one view (fast_pieces.merge_offset_groups), one call
    assert len(calls) == 3
    assert not any(contiguous for contiguous, _ in calls)  # strided views
    base, end = q.data_ptr(), q.data_ptr() + q.numel() * q.element_size()
    assert all(base <= ptr < end for _, ptr in calls)  # inside q's own storage: no copy


@pytest.mark.parametrize("layout", ["contiguous", "layer", "batch-strided"])
def test_fast_path_folds_the_batch_into_one_call_per_piece(monkeypatch, layout):
    """B = 3: one kernel call per piece (not per batch element), views of q where the strides allow,
    and exact against the oracle, gradients included, whatever the memory layout."""
    import longnet_ref.fast as fast

    calls = []
    real = fast.attention_forward

    def spy(q, k, v, causal, scale, key_mask=None):
        calls.append(q)
        return real(q, k, v, causal, scale, key_mask)

    monkeypatch.setattr(fast, "attention_forward", spy)
    B, H, N, D = 3, 4, 64, 8
    if layout == "contiguous":  # (B, H, N, D): B folds with the heads of a group (paper offsets, r | H)
        q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3))
    elif layout == "layer":  # the layer's (B, N, H, D).transpose(1, 2): B folds with the segments
        q, k, v = (torch.randn(B, N, H, D, dtype=torch.float64).transpose(1, 2) for _ in range(3))
    else:  # every other batch element of a larger tensor: no fold is a view, the rows are copied
        q, k, v = (torch.randn(2 * B, N, H, D, dtype=torch.float64).transpose(1, 2)[::2] for _ in range(3))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    ws, rs = [16, 32], [2, 4]
    out, lse = dilated_attention(q, k, v, ws, rs, causal=True, return_lse=True)
    # 2 + 4 offset groups, whatever B; in the layer's layout the 4 one-head groups of (32, 4) are
    # one view that folds B with the segments (fast_pieces.merge_offset_groups): one call for them
    assert len(calls) == (3 if layout == "layer" else 6)
    if layout != "batch-strided":
        base, end = q.data_ptr(), q.data_ptr() + q.numel() * q.element_size()
        assert all(base <= x.data_ptr() < end and not x.is_contiguous() for x in calls)  # views, no copy
    grads = torch.autograd.grad((out.square().sum() + lse.sum()), (q, k, v))
    ref_out, ref_lse = oracle_attention(q, k, v, ws, rs, causal=True)
    _assert_equal_to_oracle(out, lse, ref_out, ref_lse)
    ref_grads = torch.autograd.grad((ref_out.square().sum() + ref_lse.sum()), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("layout", ["contiguous", "layer"])
@pytest.mark.parametrize("rule", ["paper", "torchscale"])
def test_merged_offset_groups_give_the_unmerged_result(monkeypatch, layout, rule):
    """fast_pieces.merge_offset_groups changes how many kernel calls there are, not the result:
    the forward is bit-identical, the gradients equal to rounding (the kernel's backward blocks
    its sums by call), and both equal the oracle, with key padding and causal."""
    import longnet_ref.fast as fast

    B, H, N, D = (1, 8, 128, 8) if layout == "contiguous" else (3, 4, 128, 8)
    shape = (B, H, N, D) if layout == "contiguous" else (B, N, H, D)
    q, k, v = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    if layout == "layer":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    mask = torch.rand(B, N, generator=torch.Generator().manual_seed(0)) < 0.2
    ws, rs = [16, 32, 64, 128], [1, 2, 4, 8]
    results = []
    for merge in (False, True):
        if not merge:
            monkeypatch.setattr(fast, "merge_offset_groups", lambda calls, tensors: calls)
        else:
            monkeypatch.undo()
        x = [t.detach().requires_grad_() for t in (q, k, v)]
        out, lse = dilated_attention(*x, ws, rs, causal=True, head_offsets=rule, key_padding_mask=mask, return_lse=True)
        grads = torch.autograd.grad(out.square().sum() + lse.where(lse.isfinite(), 0).sum(), x)
        results.append((out, lse, grads))
    (out0, lse0, grads0), (out1, lse1, grads1) = results
    assert torch.equal(out0, out1) and torch.equal(lse0, lse1)
    for a, b in zip(grads0, grads1):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    ref_out, ref_lse = oracle_attention(q, k, v, ws, rs, causal=True, head_offsets=rule, key_padding_mask=mask)
    _assert_equal_to_oracle(out1, lse1, ref_out, ref_lse)


def test_oracle_rows_equal_oracle_rows():
    q, k, v = rand_qkv(2, 3, 70, 4)
    rows = [0, 5, 31, 69]
    out, lse = oracle_attention(q, k, v, [8, 32], [1, 4], causal=True)
    got_out, got_lse = oracle_rows(q, k, v, rows, [8, 32], [1, 4], causal=True)
    # equal up to rounding: a matmul over 4 rows need not round like one over 70
    torch.testing.assert_close(got_out, out[:, :, rows], rtol=0, atol=1e-12)
    torch.testing.assert_close(got_lse, lse[:, :, rows], rtol=0, atol=1e-12)
