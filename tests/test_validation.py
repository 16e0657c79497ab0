"""Bad input: a ValueError that names the parameter and the value."""

import pytest
import torch

from longnet_ref import MultiheadDilatedAttention, attention_pattern, dilated_attention, dilated_branch

q = k = v = torch.zeros(1, 2, 8, 4)


@pytest.mark.parametrize(
    "ws, rs, match",
    [
        ([4, 8], [1], r"same length.*\[4, 8\].*\[1\]"),
        ([], [], r"segment_lengths must not be empty"),
        ([4], [], r"dilation_rates must not be empty"),
        ([0], [1], r"segment_length\[0\].*positive integer.*0"),
        ([4, -2], [1, 1], r"segment_length\[1\].*-2"),
        ([4.0], [1], r"segment_length\[0\].*4\.0"),
        ([4], [1.5], r"dilation_rate\[0\].*1\.5"),
        ([4], [0], r"dilation_rate\[0\].*0"),
        ([4], [True], r"dilation_rate\[0\].*True"),
        ([4, 2], [2, 3], r"dilation_rate\[1\] 3 is larger than segment_length\[1\] 2"),
        ("48", [1], r"segment_lengths must be a list"),
        (4, [1], r"segment_lengths must be a list"),
    ],
)
def test_bad_branches(ws, rs, match):
    with pytest.raises(ValueError, match=match):
        dilated_attention(q, k, v, ws, rs)
    with pytest.raises(ValueError, match=match):
        attention_pattern(8, ws, rs, 2)


def test_bad_single_branch():
    with pytest.raises(ValueError, match=r"dilation_rate 5 is larger than segment_length 4"):
        dilated_branch(q, k, v, 4, 5)
    with pytest.raises(ValueError, match=r"segment_length must be a positive integer, got 2\.5"):
        dilated_branch(q, k, v, 2.5, 1)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(2, 8, 4), k, v), r"q must be 4-D .*\(2, 8, 4\)"),
        ((q, torch.zeros(1, 2, 8), v), r"k must be 4-D"),
        ((q, k, [[0.0]]), r"v must be a torch.Tensor, got list"),
        ((q, torch.zeros(1, 2, 9, 4), v), r"same shape.*\(1, 2, 9, 4\)"),
        (
            (q, k, torch.zeros(1, 2, 8, 4, dtype=torch.float64)),
            r"v has dtype torch.float64 but q has dtype torch.float32",
        ),
        ((q.long(), k.long(), v.long()), r"q must be a floating-point tensor, got dtype torch.int64"),
        ((q, k, torch.zeros(1, 2, 8, 4, device="meta")), r"v is on the meta device: it has a shape but no values"),
    ],
)
def test_bad_tensors(args, match):
    with pytest.raises(ValueError, match=match):
        dilated_attention(*args, [4], [1])
    with pytest.raises(ValueError, match=match):
        dilated_branch(*args, 4, 1)


def test_bad_options():
    with pytest.raises(ValueError, match=r"head_offsets must be one of .*'diagonal'"):
        dilated_attention(q, k, v, [4], [2], head_offsets="diagonal")
    with pytest.raises(ValueError, match=r"implementation must be one of .*'flash'"):
        dilated_attention(q, k, v, [4], [2], implementation="flash")


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match=r"embed_dim 10 is not divisible by num_heads 4"):
        MultiheadDilatedAttention(10, 4, [4], [1])
    with pytest.raises(ValueError, match=r"num_heads must be a positive integer, got 0"):
        MultiheadDilatedAttention(8, 0, [4], [1])
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\), got 1\.5"):
        MultiheadDilatedAttention(8, 2, [4], [1], dropout=1.5)
    with pytest.raises(ValueError, match=r"head_offsets must be one of"):
        MultiheadDilatedAttention(8, 2, [4], [1], head_offsets="blocks")
    layer = MultiheadDilatedAttention(8, 2, [4], [1])
    with pytest.raises(ValueError, match=r"x must be \(B, N, 8\), got shape \(1, 5, 6\)"):
        layer(torch.zeros(1, 5, 6))


def flag_calls():
    """Every public function (and the layer) with a bool flag: name -> call(flag name, value)."""
    from longnet_ref import (
        dense_attention,
        fused_attention,
        keeps,
        merge_branches,
        oracle_attention,
        oracle_rows,
        pattern_rows,
    )
    from longnet_ref.analysis import complexity, dependency_paths, viz
    from longnet_ref.parallel import simulate_sequence_parallel

    qkv = (q, k, v)
    lse = torch.zeros(1, 2, 8)
    return {
        "dense_attention": lambda name, value: dense_attention(*qkv, **{name: value}),
        "dilated_attention": lambda name, value: dilated_attention(*qkv, [4], [1], **{name: value}),
        "dilated_attention readable": lambda name, value: dilated_attention(
            *qkv, [4], [1], implementation="readable", **{name: value}
        ),
        "dilated_branch": lambda name, value: dilated_branch(*qkv, 4, 2, **{name: value}),
        "fused_attention": lambda name, value: fused_attention(*qkv, **{name: value}),
        "merge_branches": lambda name, value: merge_branches([q], [lse], **{name: value}),
        "oracle_attention": lambda name, value: oracle_attention(*qkv, [4], [1], **{name: value}),
        "oracle_rows": lambda name, value: oracle_rows(*qkv, [0, 3], [4], [1], **{name: value}),
        "keeps": lambda name, value: keeps(3, 1, 4, 1, 0, **{name: value}),
        "attention_pattern": lambda name, value: attention_pattern(8, [4], [1], 2, **{name: value}),
        "pattern_rows": lambda name, value: pattern_rows(8, [1], [4], [1], 2, **{name: value}),
        "MultiheadDilatedAttention": lambda name, value: MultiheadDilatedAttention(8, 2, [4], [1], **{name: value}),
        "simulate_sequence_parallel": lambda name, value: simulate_sequence_parallel(
            *qkv, 2, [4], [1], **{name: value}
        ),
        "branch_flops": lambda name, value: complexity.branch_flops(8, 4, 1, **{name: value}),
        "dense_flops": lambda name, value: complexity.dense_flops(8, **{name: value}),
        "attended_pairs": lambda name, value: complexity.attended_pairs(8, 4, 1, **{name: value}),
        "path_length_stats": lambda name, value: dependency_paths.path_length_stats(8, [4], [1], **{name: value}),
        "distances_from": lambda name, value: dependency_paths.distances_from(
            8, [4], [1], sources=[0], **{name: value}
        ),
        "window_path_stats": lambda name, value: dependency_paths.window_path_stats(8, 2, **{name: value}),
        "plot_heads": lambda name, value: viz.plot_heads(8, 4, 2, 2, **{name: value}),
    }


FLAGS = {
    "dilated_attention": ("causal", "detach_weights", "return_lse"),
    "dilated_attention readable": ("causal", "detach_weights", "return_lse"),
    "merge_branches": ("detach_weights",),
}


@pytest.mark.parametrize("value", ["False", None, 0, 1, 1.0, torch.tensor(True)], ids=repr)
@pytest.mark.parametrize("function", list(flag_calls()))
def test_a_flag_that_is_not_a_bool_is_a_type_error_naming_it(function, value):
    call = flag_calls()[function]
    for name in FLAGS.get(function, ("causal",)):
        with pytest.raises(
            TypeError, match=rf"{name} must be True or False, got {__import__('re').escape(repr(value))}"
        ):
            call(name, value)
        call(name, False)  # the same call with a bool is fine


@pytest.mark.parametrize(
    "outs, lses, error, match",
    [
        ([q, None], [torch.zeros(1, 2, 8)] * 2, TypeError, r"outs\[1\] must be a torch.Tensor, got NoneType"),
        ([q], [0.5], TypeError, r"lses\[0\] must be a torch.Tensor, got float"),
        (q, [torch.zeros(1, 2, 8)], TypeError, r"outs must be a list or tuple of tensors, got Tensor"),
        (
            [q.long()],
            [torch.zeros(1, 2, 8)],
            TypeError,
            r"outs\[0\] must be a floating-point tensor, got dtype torch.int64",
        ),
        ([q, q.double()], [torch.zeros(1, 2, 8)] * 2, ValueError, r"outs\[1\] / lses\[1\] have dtypes torch.float64"),
        ([q], [torch.zeros(1, 2, 7)], ValueError, r"lses\[0\] has shape \(1, 2, 7\), expected \(1, 2, 8\)"),
        ([], [], ValueError, r"non-empty lists of one length, got 0 outs and 0 lses"),
    ],
)
def test_bad_merge_inputs_name_the_element(outs, lses, error, match):
    from longnet_ref import merge_branches

    with pytest.raises(error, match=match):
        merge_branches(outs, lses)


EMPTY_SHAPES = [(0, 2, 8, 4), (1, 0, 8, 4), (1, 2, 0, 4), (1, 2, 8, 0), (0, 0, 0, 0)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("implementation", ["fast", "readable"])
@pytest.mark.parametrize("causal", [False, True])
def test_empty_inputs_give_empty_outputs_as_sdpa_does(shape, implementation, causal):
    from longnet_ref import oracle_attention

    q, k, v = (torch.zeros(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out, lse = dilated_attention(q, k, v, [4, 8], [1, 2], causal=causal, implementation=implementation, return_lse=True)
    assert out.shape == sdpa.shape and lse.shape == shape[:3]
    ref, ref_lse = oracle_attention(q, k, v, [4, 8], [1, 2], causal=causal)
    assert torch.equal(out, ref)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-14)  # the merge's logsumexp vs log of summed counts
    if shape[3] == 0 and shape[2] > 0:  # D = 0: every score is 0, so lse is the log of each row's key count
        from longnet_ref import attention_pattern

        counts = attention_pattern(shape[2], [4, 8], [1, 2], shape[1], causal=causal).sum(-1)  # (H, N)
        torch.testing.assert_close(lse[0], torch.log(counts.double()), rtol=0, atol=1e-14)
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert all(x.grad.shape == shape for x in (q, k, v))
    branch_out, branch_lse = dilated_branch(q, k, v, 4, 2, causal=causal, implementation=implementation)
    assert branch_out.shape == shape and branch_lse.shape == shape[:3]


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_empty_inputs_to_dense_and_fused_attention(shape):
    from longnet_ref import dense_attention, fused_attention

    q = torch.zeros(shape, dtype=torch.float64)
    for function in (dense_attention, fused_attention):
        out, lse = function(q, q, q)
        assert out.shape == shape and lse.shape == shape[:3]
        if shape[3] == 0 and shape[2] > 0:
            assert torch.allclose(lse, torch.full(shape[:3], float(shape[2]), dtype=torch.float64).log())
    no_keys = torch.zeros(1, 2, 0, 4)
    for function in (dense_attention, fused_attention):  # queries but no keys: out 0, lse -inf
        out, lse = function(torch.ones(1, 2, 3, 4), no_keys, no_keys)
        assert torch.equal(out, torch.zeros(1, 2, 3, 4)) and torch.equal(lse, torch.full((1, 2, 3), float("-inf")))


def test_the_layer_takes_an_empty_sequence():
    layer = MultiheadDilatedAttention(8, 2, [4, 8], [1, 2], causal=True)
    assert layer(torch.zeros(3, 0, 8)).shape == (3, 0, 8)
    assert layer(torch.zeros(0, 5, 8)).shape == (0, 5, 8)


def test_meta_tensors_are_refused_by_name():
    meta = torch.zeros(1, 2, 8, 4, device="meta")
    with pytest.raises(ValueError, match="q is on the meta device: it has a shape but no values"):
        dilated_attention(meta, meta, meta, [4], [1])


# --- The language model's training config and evaluation (longnet_ref.lm) ----------------------

TRAIN = dict(seq_len=64, steps=5, batch_size=2, embed_dim=16, num_heads=2, num_layers=1)
NAN, INF = float("nan"), float("inf")
NOT_A_LIST = r"must be a list of positive integers \(empty: the default mixture\), got "


def train_config(**overrides):
    from longnet_ref.lm.config import TrainConfig

    return TrainConfig(**dict(TRAIN, **overrides))


@pytest.mark.parametrize(
    "field, values, match",
    [
        ("warmup", [-5, "50", None, 2.5, True], r"--warmup must be an integer >= 0, got "),
        ("seed", ["s", None, -1, 2.5], r"--seed must be an integer >= 0, got "),
        ("seed", [2**63], r"--seed must be below 2\*\*63, got "),
        ("eval_size", [0, -1, "16", None, 2.5], r"--eval-size must be a positive integer, got "),
        ("num_pairs", [0, -1, "4"], r"--num-pairs must be a positive integer, got "),
        ("num_pairs", [17, 100], r"--num-pairs must be at most 16 \(the recall task's keys\), got "),
        ("queries_per_pair", [0, -1, "8"], r"--queries-per-pair must be a positive integer, got "),
        ("lr", [0, -1.0, NAN, INF, "1e-3", None, True], r"--lr must be a positive finite number, got "),
        ("grad_clip", [0, NAN, INF, "1", None], r"--grad-clip must be a positive finite number, got "),
        ("weight_decay", [-0.1, NAN, INF, "0.1", None], r"--weight-decay must be a finite number >= 0, got "),
        ("device", ["bogus", None, 5, "cuda:0"], r"--device must be one of \('auto', 'cpu', 'cuda'\), got "),
        ("segment_lengths", [None, 64, "abc"], r"--segment-lengths " + NOT_A_LIST),  # None is not the default
        ("dilation_rates", [None, 2], r"--dilation-rates " + NOT_A_LIST),
    ],
)
def test_bad_train_config_fields_name_the_flag_and_the_value(field, values, match):
    import re

    for value in values:
        with pytest.raises(ValueError, match=match + re.escape(repr(value))):
            train_config(**{field: value})


def test_train_config_keeps_valid_values():
    config = train_config(warmup=0, weight_decay=0, seed=0, segment_lengths=(16, 64), dilation_rates=(1, 2))
    assert config.segment_lengths == [16, 64] and config.dilation_rates == [1, 2]  # lists, as a checkpoint holds
    assert train_config(segment_lengths=[], dilation_rates=[]).segment_lengths == [16, 32, 64]  # empty: the default
    assert train_config(lr=1, grad_clip=5).lr == 1  # ints are numbers
    # the code task ignores the recall fields, so the tiny preset's 4 x 8 queries in 64 bytes stay valid
    assert train_config(task="code", num_pairs=4, queries_per_pair=8).task == "code"


def test_a_recall_config_that_cannot_fit_says_what_fits():
    with pytest.raises(ValueError, match=r"--task recall: --num-pairs 16 needles, .*144 positions.*at most 3 pairs"):
        train_config(task="recall", num_pairs=16)
    with pytest.raises(ValueError, match=r"--task recall needs --seq-len >= 8 .*got 4"):
        train_config(task="recall", seq_len=4, num_pairs=1, queries_per_pair=1)
    assert train_config(task="recall", num_pairs=3, queries_per_pair=8).num_pairs == 3  # 3 x 9 = 27 <= 32


@pytest.fixture
def lm_and_data():
    from conftest import tiny_lm

    return tiny_lm(), torch.randint(0, 256, (200,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "device, error, match",
    [
        ("bogus", ValueError, r"device must name a torch device such as 'cpu' or 'cuda:0', got 'bogus'"),
        ("cuda:x", ValueError, r"device must name a torch device .*got 'cuda:x'"),
        (5, TypeError, r"device must be a str such as 'cpu' or 'cuda:0', or a torch.device, got 5"),
        (None, TypeError, r"device must be a str .*got None"),
        ("cuda:99", ValueError, r"device 'cuda:99' was asked for, but torch sees \d+ CUDA GPUs"),
    ],
)
def test_bad_evaluation_devices_are_named(lm_and_data, device, error, match):
    from longnet_ref.lm.evaluate import autocast_for, bits_per_byte, recall_accuracy, recall_eval_set

    model, data = lm_and_data
    with pytest.raises(error, match=match):
        autocast_for(device)
    with pytest.raises(error, match=match):
        bits_per_byte(model, data, 16, 64, device=device)
    with pytest.raises(error, match=match):
        recall_accuracy(model, recall_eval_set(64, 1, num_pairs=2, queries_per_pair=2), device=device)


def test_bad_evaluation_arguments_are_named(lm_and_data):
    from longnet_ref.lm.evaluate import bits_per_byte, bucket_name, recall_accuracy, recall_eval_set

    model, data = lm_and_data
    eval_set = recall_eval_set(64, 1, num_pairs=2, queries_per_pair=2)
    x, y, dist = eval_set
    calls = [
        (lambda: bits_per_byte(model, data, 16, 64, by_position="no"), TypeError, r"by_position must be True or False"),
        (lambda: bits_per_byte(model, data, 16, 64, by_position=None), TypeError, r"by_position must be True or False"),
        (lambda: bits_per_byte("m", data, 16, 64), TypeError, r"model must be a torch.nn.Module .*got str"),
        (lambda: recall_accuracy(None, eval_set), TypeError, r"model must be a torch.nn.Module .*got NoneType"),
        (lambda: recall_accuracy(model, "abc"), TypeError, r"eval_set must be the 3 tensors .*got str"),
        (lambda: recall_accuracy(model, None), TypeError, r"eval_set must be the 3 tensors .*got NoneType"),
        (lambda: recall_accuracy(model, (x, y)), TypeError, r"eval_set must be the 3 tensors .*got 2 items"),
        (lambda: recall_accuracy(model, (x.float(), y, dist)), ValueError, r"eval_set's x must be a \(M, N\) integer"),
        (lambda: recall_accuracy(model, (x, y[:, :5], dist)), ValueError,
         r"eval_set's x, y and dist must have one shape \(M, N\), got \(6, 64\), \(6, 5\), \(6, 64\)"),
        (lambda: recall_accuracy(model, eval_set, buckets=[(4, 1)]), ValueError,
         r"buckets\[0\] must be a pair \(a, b\) of ints with 1 <= a <= b, got \(4, 1\)"),
        (lambda: recall_accuracy(model, eval_set, buckets=5), ValueError, r"buckets must be a non-empty list"),
        (lambda: recall_eval_set(64, 1, buckets=[]), ValueError, r"buckets must be a non-empty list of pairs .*\[\]"),
        (lambda: recall_eval_set(64, 1, queries_per_pair="2"), ValueError, r"queries_per_pair must be a positive"),
        (lambda: recall_eval_set(64, 1, num_pairs=16), ValueError, r"num_pairs 16 x queries_per_pair 8 .*at most 3"),
        (lambda: bucket_name(5), ValueError, r"bucket must be a pair \(a, b\) of ints with 1 <= a <= b, got 5"),
        (lambda: bucket_name((1, 2, 3)), ValueError, r"bucket must be a pair .*got \(1, 2, 3\)"),
        (lambda: bucket_name((2, 1)), ValueError, r"bucket must be a pair .*got \(2, 1\)"),
    ]  # fmt: skip
    for seed in ("s", None, 2.5, -1, 2**70):
        calls.append((lambda seed=seed: recall_eval_set(64, 1, seed=seed), ValueError, r"seed must be an integer in"))
    for call, error, match in calls:
        with pytest.raises(error, match=match):
            call()
    assert model.training  # a refused call leaves the model as it was


def test_evaluation_on_the_wrong_device_is_named(lm_and_data):
    from longnet_ref.lm.evaluate import bits_per_byte

    model, data = lm_and_data
    with pytest.raises(ValueError, match=r"model is on cpu but device is 'meta'; pass device='cpu'"):
        bits_per_byte(model, data, 16, 64, device="meta")


def test_second_audit_pass_names_the_parameter():
    """Helpers and entry points the first pass missed: each bad input raises naming its parameter."""
    from longnet_ref import MultiheadDilatedAttention, dense_attention
    from longnet_ref.analysis.viz import plot_branches, plot_multiplicity
    from longnet_ref.attention import causal_mask, softmax_scale
    from longnet_ref.lm.generate import KVCache, generate
    from longnet_ref.parallel import SequenceParallelDilatedAttention, SimulatedGroup, plan_branches

    q = k = v = torch.randn(1, 2, 8, 4)
    layer = MultiheadDilatedAttention(8, 2, [4], [1])
    cases = [
        (lambda: causal_mask(-1, 4), ValueError, "n_queries must be a non-negative integer, got -1"),
        (lambda: causal_mask(4, 2.5), ValueError, "n_keys must be a non-negative integer, got 2.5"),
        (lambda: softmax_scale(-4), ValueError, "head_dim must be a non-negative integer, got -4"),
        (
            lambda: dense_attention(q, k, v, bias=torch.ones(8, 8, dtype=torch.bool).tril()),
            TypeError,
            "bias must be a floating-point",
        ),
        (
            lambda: dense_attention(q, k, v, bias=torch.zeros(3, 3)),
            ValueError,
            r"bias must broadcast to \(B, H, Nq, Nk\)",
        ),
        (lambda: dense_attention(q, k, v, bias=torch.zeros(1, 1, 1, 1, 1)), ValueError, "bias must broadcast"),
        (lambda: KVCache(0), ValueError, "num_layers must be a positive integer, got 0"),
        (lambda: KVCache(1).advance(-5), ValueError, "num_tokens must be a non-negative integer, got -5"),
        (
            lambda: generate("m", torch.zeros(1, 2, dtype=torch.long), 3),
            TypeError,
            "model must be a longnet_ref.lm.model.LongNetLM, got str",
        ),
        (
            lambda: layer(torch.zeros(1, 4, 8, dtype=torch.long)),
            TypeError,
            "x must be a floating-point tensor, got dtype torch.int64",
        ),
        (
            lambda: layer(torch.zeros(1, 4, 8, dtype=torch.float64)),
            ValueError,
            "x is torch.float64 on cpu but the layer's parameters are torch.float32",
        ),
        (lambda: SimulatedGroup(2, timeout=-1), ValueError, "timeout must be a positive finite number, got -1"),
        (lambda: SimulatedGroup(2, timeout="1"), ValueError, "timeout must be a positive finite number, got '1'"),
        (lambda: SimulatedGroup(2).run(5), TypeError, "fn must be a callable fn\\(comm\\), got int"),
        (lambda: SimulatedGroup(2).run(lambda comm: 0, return_exceptions="yes"), TypeError, "return_exceptions"),
        (lambda: plan_branches(5, 2, 4, [(4, 1)]), ValueError, r"rank must be an integer in \[0, 2\), got 5"),
        (lambda: plan_branches(0, 0, 4, [(4, 1)]), ValueError, "world_size must be a positive integer, got 0"),
        (lambda: plan_branches(0, 2, 4, [(4, 8)]), ValueError, "dilation_rate"),
        (lambda: plan_branches(0, 2, 4, [(4,)]), ValueError, "branches must be a list of"),
        (lambda: SequenceParallelDilatedAttention(8, 2, [4], [1], group="bogus"), (TypeError, ValueError), "group"),
        (
            lambda: SequenceParallelDilatedAttention.from_layer("x"),
            TypeError,
            "layer must be a MultiheadDilatedAttention, got str",
        ),
        (lambda: plot_branches(16, [4], [1], union="no"), TypeError, "union"),
        (
            lambda: plot_multiplicity(16, [4], [1], ax="bogus"),
            TypeError,
            "ax must be None or a matplotlib Axes, got str",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_the_readable_steps_check_their_inputs():
    """segment, sparsify, kept_row_mask, scatter and readable_branch: the notebooks' building blocks."""
    from longnet_ref.dilated import kept_row_mask, readable_branch, scatter, segment, sparsify

    x = torch.randn(1, 2, 8, 4)
    offsets = torch.tensor([0, 1])
    cases = [
        (lambda: segment(x[0], 4), r"x must be 4-D \(B, H, N, D\), got shape \(2, 8, 4\)"),
        (lambda: segment(x, 0), "segment_length must be a positive integer, got 0"),
        (lambda: sparsify(x, 2, offsets), r"x_seg must be 5-D \(B, H, S, W, D\)"),
        (lambda: sparsify(segment(x, 4), 0, offsets), "dilation_rate must be a positive integer, got 0"),
        (
            lambda: sparsify(segment(x, 4), 2, torch.tensor([0, 2])),
            r"offsets must be 2 head offsets in \[0, 2\), got \[0, 2\]",
        ),
        (lambda: sparsify(segment(x, 4), 2, [0, 1]), "offsets must be a 1-D integer tensor"),
        (lambda: kept_row_mask(8, 0, 2, offsets), "segment_length must be a positive integer, got 0"),
        (lambda: scatter(torch.zeros(1, 2, 2), 2, offsets, 8), r"rows must be \(B, H, S, K, \*rest\)"),
        (lambda: scatter(torch.zeros(1, 2, 2, 2), 2, offsets, 0), "seq_len must be a positive integer, got 0"),
        (lambda: readable_branch(x, x[:, :, :5], x, 4, 2), "q, k and v must have the same shape"),
        (lambda: readable_branch(x, x, x, 0, 2), "segment_length must be a positive integer, got 0"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# --- Issue 13: every public function of lm/ and analysis/ names the bad parameter ----------------


def issue13_cases():
    """name -> (call(tmp), error, message): one bad argument each, the others valid; tmp is a fresh folder."""
    import numpy as np
    from matplotlib.figure import Figure

    from longnet_ref.analysis import figures, results, viz, widgets
    from longnet_ref.lm import checkpoint, data, experiment, generate, interrupt, preflight, report, train
    from longnet_ref.lm.config import TrainConfig, preset_values

    def lm_and_eval_set():
        from conftest import tiny_lm

        from longnet_ref.lm.evaluate import recall_eval_set

        return tiny_lm(), recall_eval_set(64, 1, num_pairs=2, queries_per_pair=2)

    state = dict(step=1, model={"w": torch.zeros(2)}, model_config={}, train_config={})
    q1, cache = torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 3, 4)
    no_cpu_time = [{"train": [{"seconds": 0, "tokens_per_s": 1}]}]
    quiet = dict(live=False)
    T, V = TypeError, ValueError
    return {
        # lm.checkpoint
        "checksum state": (lambda tmp: checkpoint.checksum(5), T, r"state must be a checkpoint dict, got 5 \(int\)"),
        "save_checkpoint model": (lambda tmp: checkpoint.save_checkpoint(tmp / "c.pt", **dict(state, model=object())),
                                  T, r"model must be a state dict \(model.state_dict\(\)\), got <object"),
        "save_checkpoint entries": (lambda tmp: checkpoint.save_checkpoint(tmp / "c.pt", model={}), V,
                                    r"save_checkpoint needs the entries \['step', 'model_config', 'train_config'\]"),
        "save_checkpoint plain": (lambda tmp: checkpoint.save_checkpoint(tmp / "c.pt", **state, metrics=[object()]),
                                  T, r"state\['metrics'\]\[0\] is a object, which a checkpoint cannot hold"),
        "read_checkpoint folder": (lambda tmp: checkpoint.read_checkpoint(tmp), V, r"checkpoint '.*' is not a file"),
        "rng_states data_rng": (lambda tmp: checkpoint.rng_states("x", "cpu"), T,
                                r"data_rng must be a Generator, got 'x' \(str\)"),
        "rng_states device": (lambda tmp: checkpoint.rng_states(torch.Generator(), "gpu9"), V,
                              r"device must name a torch device .*got 'gpu9'"),
        # lm.preflight and lm.train
        "check_run config": (lambda tmp: preflight.check_run("x"), T, r"config must be a TrainConfig, got 'x' \(str\)"),
        "check_out out": (lambda tmp: preflight.check_out(5), T, r"out must be a path \(str or os.PathLike\), got 5"),
        "start_run config": (lambda tmp: train.start_run("x", tmp), T, r"config must be a TrainConfig, got 'x'"),
        "train progress": (lambda tmp: train.train(train_config(), tmp / "run", progress="no"), T,
                           r"progress must be True or False, got 'no'"),
        "preset_values name": (lambda tmp: preset_values("bogus"), V,
                               r"name must be a TrainConfig field, one of \['attention', .*got 'bogus'"),
        "learning_rate step": (lambda tmp: train.learning_rate(TrainConfig(), -1), V,
                               r"step must be a non-negative integer, got -1"),
        "learning_rate config": (lambda tmp: train.learning_rate("x", 1), T, r"config must be a TrainConfig, got 'x'"),
        "build_model device": (lambda tmp: train.build_model(train_config(), "tpu"), V,
                               r"device must name a torch device .*got 'tpu'"),
        "build_model config": (lambda tmp: train.build_model("x", "cpu"), T, r"config must be a TrainConfig"),
        "draw_batch run": (lambda tmp: train.draw_batch("x"), T, r"run must be a train.Run \(from start_run\), got 'x"),
        "train_step run": (lambda tmp: train.train_step(None), T, r"run must be a train.Run .*got None"),
        "run_loop run": (lambda tmp: train.run_loop(None), T, r"run must be a train.Run .*got None"),
        "config_from_args args": (lambda tmp: train.config_from_args(5), T, r"args must be the argparse.Namespace"),
        "stop_at_step_boundary requested": (lambda tmp: interrupt.stop_at_step_boundary("x").__enter__(), T,
                                            r"requested must be a list .*got 'x'"),
        # lm.experiment
        "residue_accuracy modulus": (lambda tmp: experiment.residue_accuracy(*lm_and_eval_set(), 16, 0), V,
                                     r"modulus must be a positive integer, got 0"),
        "residue_accuracy far": (lambda tmp: experiment.residue_accuracy(*lm_and_eval_set(), -1), V,
                                 r"far must be a non-negative integer, got -1"),
        "where model": (lambda tmp: experiment.where("x"), T, r"model must be a torch.nn.Module, got 'x' \(str\)"),
        "where parameters": (lambda tmp: experiment.where(torch.nn.ReLU()), V, r"model has no parameters"),
        "recall_branches name": (lambda tmp: experiment.recall_branches("bogus", 512), V,
                                 r"name must be one of the recall runs \('recall-dense', .*got 'bogus'"),
        "recall_branches seq_len": (lambda tmp: experiment.recall_branches("recall-dilated", -1), V,
                                    r"seq_len must be a positive integer, got -1"),
        "recall_stage_configs name": (lambda tmp: experiment.recall_stage_configs("bogus"), V,
                                      r"name must be one of the recall runs"),
        "run_config threads": (lambda tmp: experiment.run_config({}, {}, 0), V,
                               r"threads must be a positive integer, got 0"),
        "run_config common": (lambda tmp: experiment.run_config(5, {}, 1), T, r"common must be a dict, got 5"),
        "table2 threads": (lambda tmp: experiment.table2(tmp, threads=0), V,
                           r"threads must be a positive integer, got 0"),
        "recall jobs": (lambda tmp: experiment.recall(tmp, jobs=0), V, r"jobs must be a positive integer, got 0"),
        "recall progress": (lambda tmp: experiment.recall(tmp, progress="no"), T, r"progress must be True or False"),
        # lm.generate
        "cached_attention q": (lambda tmp: generate.cached_attention("x", cache, cache, 0, None), V,
                               r"q must be a torch.Tensor, got str"),
        "cached_attention pos": (lambda tmp: generate.cached_attention(q1, cache, cache, -1, None), V,
                                 r"pos must be a non-negative integer, got -1"),
        "cached_attention cache": (lambda tmp: generate.cached_attention(q1, cache, cache, 5, None), V,
                                   r"keys, values \(B, H_kv, >= pos \+ 1 = 6, D\), got q \(1, 2, 1, 4\)"),
        "sample logits": (lambda tmp: generate.sample(torch.tensor([[1, 2]]), 1.0, None), V,
                          r"logits must be a floating-point tensor, got dtype torch.int64"),
        # lm.report
        "load_results names": (lambda tmp: report.load_results(tmp, "abc"), T,
                               r"names must be a list of run names \(str\), got 'abc'"),
        "load_results runs": (lambda tmp: report.load_results(5, ["a"]), T, r"runs must be a path .*got 5"),
        "training_summary stage": (lambda tmp: report.training_summary([{}]), V,
                                   r"stages\[0\] must be a metrics.json dict with a 'train' list, got \{\}"),
        "training_summary empty": (lambda tmp: report.training_summary([]), V, r"stages must be a non-empty list"),
        "time_cells empty": (lambda tmp: report.time_cells([]), V, r"stages must be a non-empty list"),
        "time_cells cpu": (lambda tmp: report.time_cells(no_cpu_time), V, r"stages record 0 CPU seconds of training"),
        "attention_flops_per_token config": (lambda tmp: report.attention_flops_per_token("x", 8), T,
                                             r"config must be a TrainConfig, got 'x'"),
        "recall_branches config": (lambda tmp: report.recall_branches("x"), T, r"config must be a TrainConfig"),
        "bucket_range int": (lambda tmp: report.bucket_range(5), V, r"name must be a bucket name 'd=a-b' .*got 5"),
        "bucket_range one": (lambda tmp: report.bucket_range("d=5"), V, r"name must be a bucket name .*got 'd=5'"),
        "bucket_range order": (lambda tmp: report.bucket_range("d=5-2"), V,
                               r"name must be a pair \(a, b\) of ints with 1 <= a <= b, got \(5, 2\)"),
        "plot_table2 results": (lambda tmp: report.plot_table2({}, [8]), V,
                                r"results must be the non-empty dict load_results returns, got \{\}"),
        "plot_recall results": (lambda tmp: report.plot_recall({}, [], 4, 8), V, r"results must be the non-empty"),
        # lm.data
        "recall_capacity seq_len": (lambda tmp: data.recall_capacity(-1, 8), V, r"seq_len must be a positive integer"),
        "recall_capacity queries_per_pair": (lambda tmp: data.recall_capacity(512, 0), V,
                                             r"queries_per_pair must be a positive integer, got 0"),
        "check_distances count": (lambda tmp: data.check_distances([4], -1, 512), V,
                                  r"count must be a positive integer, got -1"),
        "as_root missing": (lambda tmp: data.as_root(tmp / "nowhere"), V, r"root must be a directory of \.py files"),
        "load_corpus empty": (lambda tmp: data.load_corpus(tmp), V, r"root '.*' puts no \.py file in the train split"),
        # analysis.figures
        "plot_path_law keys": (lambda tmp: figures.plot_path_law({}), V,
                               r"rows must be what path_law returns .*it lacks \['N', 'dense'"),
        "plot_path_law type": (lambda tmp: figures.plot_path_law(5), T, r"rows must be the dict path_law returns, got"),
        "path_law sizes": (lambda tmp: figures.path_law(5), V, r"sizes must be a non-empty list of sequence lengths"),
        "path_law size": (lambda tmp: figures.path_law([-4]), V, r"sizes\[0\] must be a positive integer, got -4"),
        "plot_flops sizes": (lambda tmp: figures.plot_flops("abc"), V, r"sizes must be a non-empty list .*'abc'"),
        "plot_memory chunk": (lambda tmp: figures.plot_memory(chunk=-1), V, r"chunk must be a positive integer"),
        "plot_memory bytes": (lambda tmp: figures.plot_memory(bytes_per_element=0), V,
                              r"bytes_per_element must be a positive integer, got 0"),
        "all_figures quick": (lambda tmp: figures.all_figures(quick="yes"), T, r"quick must be True or False"),
        "run_notebooks folder": (lambda tmp: figures.run_notebooks(tmp / "nowhere"), V,
                                 r"folder must be a folder of notebooks"),
        # analysis.viz and analysis.results
        "save_fig fig": (lambda tmp: viz.save_fig(None, "x", folder=tmp), T,
                         r"fig must be a matplotlib Figure, got None"),
        "save_fig name": (lambda tmp: viz.save_fig(Figure(), 3, folder=tmp), V,
                          r"name must be a plain file name without folders, got 3"),
        "png_bytes fig": (lambda tmp: viz.png_bytes("x"), T, r"fig must be a matplotlib Figure, got 'x'"),
        "block_size seq_len": (lambda tmp: viz.block_size(-1), V, r"seq_len must be a positive integer, got -1"),
        "alias_free_block empty": (lambda tmp: viz.alias_free_block(1000, []), V,
                                   r"dilation_rates must be a non-empty list of positive integers, got \[\]"),
        "alias_free_block int": (lambda tmp: viz.alias_free_block(1000, 3), V, r"dilation_rates must be a non-empty"),
        "alias_free_block rate": (lambda tmp: viz.alias_free_block(1000, [2, 0]), V,
                                  r"dilation_rates\[1\] must be a positive integer, got 0"),
        "blend densities": (lambda tmp: viz.blend("x", []), V, r"densities must be one or more \(nb, nb\) pictures"),
        "blend colors": (lambda tmp: viz.blend(np.zeros((2, 4, 4)), ["#000000"]), V,
                         r"colors must be a list of 2 colours, one per density, got \['#000000'\]"),
        "dominant colors": (lambda tmp: viz.dominant(np.zeros((2, 4, 4)), ["#000"]), V, r"colors must be a list of 2"),
        "blend colour": (lambda tmp: viz.blend(np.zeros((1, 4, 4)), ["notacolor"]), V,
                         r"colors\[0\] must be a matplotlib colour .*got 'notacolor'"),
        "count_style most": (lambda tmp: viz.count_style(-1), V, r"most must be a positive integer, got -1"),
        "write_table name": (lambda tmp: results.write_table("a/b", ["x"], [[1]], folder=tmp), V,
                             r"name must be a plain file name without folders, got 'a/b'"),
        "write_table row": (lambda tmp: results.write_table("t", ["x"], [[1, 2]], folder=tmp), V,
                            r"rows\[0\] must be a list of 1 cells, one per column of header, got \[1, 2\]"),
        "write_table header": (lambda tmp: results.write_table("t", 5, [], folder=tmp), V,
                               r"header must be a non-empty list of column names, got 5"),
        "write_table footer": (lambda tmp: results.write_table("t", ["x"], [[1]], folder=tmp, footer=3), T,
                               r"footer must be a str, got 3"),
        "paste_into_readme marker": (lambda tmp: results.paste_into_readme(3, "x", tmp / "README.md"), T,
                                     r"marker must be a str, got 3"),
        "paste_into_readme markdown": (lambda tmp: results.paste_into_readme("m", None, tmp / "README.md"), T,
                                       r"markdown must be a str, got None"),
        # analysis.widgets
        "pattern_view head": (lambda tmp: widgets.pattern_view(head=99), V,
                              r"head must be an integer in \[0, num_heads\) = \[0, 4\), got 99"),
        "format_numbers numbers": (lambda tmp: widgets.format_numbers([1]), T,
                                   r"numbers must be a dict \{name: value\}, got \[1\]"),
        "pattern_explorer branches": (lambda tmp: widgets.pattern_explorer(branches=0), V,
                                      r"branches must be an integer in \[1, 5\] \(its slider's range\), got 0"),
        "path_explorer seq_len": (lambda tmp: widgets.path_explorer(seq_len="x"), V,
                                  r"seq_len must be an integer in \[16, 2048\] .*got 'x'"),
        "explore per_row": (lambda tmp: widgets.explore(lambda: None, dict, per_row=0, **quiet), V,
                            r"per_row must be a positive integer, got 0"),
        "explore live": (lambda tmp: widgets.explore(lambda: None, dict, live="no"), T,
                         r"live must be True or False, got 'no'"),
        "explore plot": (lambda tmp: widgets.explore(3, dict, **quiet), T, r"plot must be a callable, got 3"),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(issue13_cases()))
def test_issue13_bad_inputs_name_the_parameter(case, tmp_path):
    import matplotlib.pyplot as plt

    call, error, match = issue13_cases()[case]
    figures_before = plt.get_fignums()
    with pytest.raises(error, match=match):
        call(tmp_path)
    assert plt.get_fignums() == figures_before  # refused before any figure was drawn
    if case.startswith("save_checkpoint") or case.startswith("write_table") or case == "train progress":
        assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_issue13_valid_inputs_still_work(tmp_path):
    """The values just inside each new check are accepted."""
    import numpy as np

    from longnet_ref.analysis import results, viz, widgets
    from longnet_ref.lm import checkpoint, data, experiment, report

    assert data.recall_capacity(64, 1) == 16 and viz.block_size(1) == 1 and viz.alias_free_block(4096, [1, 3]) == 18
    assert report.bucket_range("d=17-256") == (17, 256)
    assert experiment.recall_branches("recall-dense", 1) == dict(attention="dense")
    assert viz.count_style(1)["vmax"] == 1.5
    assert viz.blend(np.zeros((2, 3, 3)), ["#000000", "#ffffff"]).shape == (3, 3, 3)
    assert results.write_table("t", ["x", "y"], [(1, 2)], folder=tmp_path) == "| x | y |\n|---|---|\n| 1 | 2 |\n"
    assert report.load_results(tmp_path, {"a": 1}) == {}  # any collection of names, as experiment passes a dict
    state = dict(step=1, model={"w": torch.zeros(2)}, model_config={}, train_config={"lr": 1e-3, "flag": True})
    checkpoint.save_checkpoint(tmp_path / "c.pt", **state, metrics={"train": [{"loss": 1.0}], "init": None})
    assert checkpoint.read_checkpoint(tmp_path / "c.pt")["step"] == 1
    widgets.pattern_view(heads=2, head=1)[0].clear()
    widgets.explore(lambda: None, dict, per_row=1, live=False)


def test_plot_flops_takes_real_valued_lengths():
    """A FLOPs curve is drawn over np.geomspace's float N (integer lengths are for path_law)."""
    import matplotlib.pyplot as plt
    import numpy as np

    from longnet_ref.analysis import figures

    fig = figures.plot_flops(np.geomspace(2**10, 2**20, 5))
    assert len(fig.axes[0].lines[0].get_xdata()) == 5
    plt.close(fig)
    with pytest.raises(ValueError, match=r"sizes\[1\] must be a positive finite number, got -1.0"):
        figures.plot_flops([1024.0, -1.0])
