"""The LongNet language model: RoPE hook, kinds of attention, against the oracle, it learns."""

import pytest
import torch
from conftest import TINY_LM, tiny_lm

from longnet_ref import MultiheadDilatedAttention, dilated_attention, oracle_attention
from longnet_ref.lm.model import LongNetLM, ModelConfig, RotaryEmbedding, sequence_parallel
from longnet_ref.parallel import SimulatedGroup

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rope_scores_depend_on_distance_only():
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def score(m, n):
        return (rope.rotate(q, torch.tensor([m])) * rope.rotate(k, torch.tensor([n]))).sum()

    torch.testing.assert_close(score(7, 3), score(1007, 1003), rtol=0, atol=1e-12)
    assert not torch.allclose(score(7, 3), score(7, 4))  # and it does depend on the distance
    # a rotation: norms are kept
    torch.testing.assert_close(rope.rotate(q, torch.tensor([5])).norm(), q.norm(), rtol=0, atol=1e-12)


def test_layer_rotary_hook_rotates_q_and_k_before_attention():
    E, H, N, ws, rs = 16, 4, 21, [4, 8], [1, 2]
    rope = RotaryEmbedding(E // H)
    layer = MultiheadDilatedAttention(E, H, ws, rs, causal=True, rotary=rope).double()
    x = torch.randn(2, N, E, dtype=torch.float64)
    q, k, v = (layer.split_heads(p(x)) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    positions = torch.arange(N)
    q, k = rope.rotate(q, positions), rope.rotate(k, positions)
    out = dilated_attention(q, k, v, ws, rs, causal=True)
    expected = layer.out_proj(out.transpose(1, 2).reshape(2, N, E))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    assert "rotary" in dict(layer.named_children())  # moves with .to(device) like any submodule


def test_layer_rejects_a_rotary_that_is_not_callable():
    with pytest.raises(ValueError, match="rotary"):
        MultiheadDilatedAttention(16, 4, [8], [1], rotary="rope")


def oracle_attend(layer_index, attn, hidden):
    """The layer's attention through the dense oracle (explicit multiplicity mask)."""
    B, N, E = hidden.shape
    q, k, v = (attn.split_heads(proj(hidden)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = attn.rotary(q, k, torch.arange(N))
    ws = [min(w, N) for w in attn.segment_lengths]
    out, _ = oracle_attention(q, k, v, ws, attn.dilation_rates, causal=True)
    return attn.out_proj(out.transpose(1, 2).reshape(B, N, E))


@pytest.mark.parametrize("attention", ["dilated", "dense", "local"])
def test_model_equals_the_model_with_oracle_attention(attention):
    model = tiny_lm(attention)
    idx = torch.randint(0, 256, (2, 37))  # past the largest segment, ragged last segment
    torch.testing.assert_close(model(idx), model(idx, attend=oracle_attend), rtol=0, atol=1e-10)


@pytest.mark.parametrize("ws", [[64], [64, 128], [40, 64, 1000]])
def test_degenerate_mixture_equals_the_dense_model(ws):
    """Branches with w >= N and r = 1 all see the whole causal prefix: that is dense attention."""
    dense, mixture = tiny_lm("dense"), tiny_lm("dilated", ws=ws, rs=[1] * len(ws))
    mixture.load_state_dict(dense.state_dict())
    idx = torch.randint(0, 256, (2, 40))
    torch.testing.assert_close(mixture(idx), dense(idx), rtol=0, atol=1e-12)
    # the check has teeth: a real mixture (w < N, r > 1) computes something else
    sparse = tiny_lm("dilated", ws=[8, 40], rs=[1, 2])
    sparse.load_state_dict(dense.state_dict())
    assert (sparse(idx) - dense(idx)).abs().max() > 1e-4


def test_kinds_use_their_branches():
    config = ModelConfig(attention="local", segment_lengths=[16, 32], dilation_rates=[1, 2])
    assert config.branches() == ([16], [1])
    assert ModelConfig(attention="dilated", segment_lengths=[16, 32], dilation_rates=[1, 2]).branches() == (
        [16, 32],
        [1, 2],
    )
    ws, rs = ModelConfig(attention="dense").branches()
    assert rs == [1] and ws[0] > 2**40


@pytest.mark.parametrize("attention, reaches", [("local", False), ("dilated", True), ("dense", True)])
def test_reach_past_the_first_segment(attention, reaches):
    """Changing byte 2 changes the prediction at 20 only if attention reaches across segments of 4..8."""
    model = tiny_lm(attention, ws=(8, 16, 32), rs=(1, 2, 4))
    idx = torch.randint(0, 256, (1, 24))
    changed = idx.clone()
    changed[0, 2] = (idx[0, 2] + 1) % 256
    moved = (model(idx)[0, 20] - model(changed)[0, 20]).abs().max()
    assert (moved > 1e-9) == reaches


def test_one_optimiser_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = LongNetLM(segment_lengths=[8, 16, 32], dilation_rates=[1, 2, 4], **TINY_LM)
    x = torch.randint(0, 256, (4, 33))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _, before = model(x[:, :-1], x[:, 1:])
    before.backward()
    optimizer.step()
    with torch.no_grad():
        _, after = model(x[:, :-1], x[:, 1:])
    assert after < before - 0.05, (before.item(), after.item())


def test_loss_skips_ignored_targets_and_head_is_tied():
    model = tiny_lm()
    x = torch.randint(0, 256, (1, 10))
    y = torch.full((1, 10), -100)
    y[0, 3] = 65
    logits, loss = model(x, y)
    torch.testing.assert_close(loss, -torch.log_softmax(logits[0, 3], -1)[65], rtol=0, atol=1e-12)
    # the output head is the embedding matrix: counted once, no (V, E) head of its own
    V, E, L = 256, TINY_LM["embed_dim"], TINY_LM["num_layers"]
    block = 4 * (E * E + E) + (E * 4 * E + 4 * E) + (4 * E * E + E) + 2 * 2 * E  # attention, MLP, norms
    assert model.num_parameters() == V * E + L * block + 2 * E


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(attention="sparse"), "attention"),
        (dict(segment_lengths=[8, 16], dilation_rates=[1]), "same length"),
        (dict(segment_lengths=[2], dilation_rates=[4]), "dilation_rate"),
        (dict(embed_dim=30, num_heads=4), "embed_dim"),
        (dict(embed_dim=12, num_heads=4), "even"),
        (dict(num_layers=0), "num_layers"),
    ],
)
def test_bad_model_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**overrides)


def test_bad_input_shape():
    with pytest.raises(ValueError, match="idx"):
        tiny_lm()(torch.zeros(10, dtype=torch.long))


@pytest.mark.parametrize(
    "attention, num_kv_heads", [("dilated", None), ("dense", None), ("local", None), ("dilated", 1)]
)
def test_the_model_runs_sequence_parallel(attention, num_kv_heads):
    """P = 4 simulated ranks, each on its chunk of 16 tokens: the chunks of the single-device logits
    (grouped-query heads included: from_layer keeps num_kv_heads)."""
    model = tiny_lm(attention, ws=(8, 16, 32), num_kv_heads=num_kv_heads)
    parallel = sequence_parallel(model)
    idx = torch.randint(0, 256, (2, 64))

    def rank(comm):
        return parallel(idx.chunk(4, dim=1)[comm.rank], attend=lambda i, attn, hidden: attn(hidden, group=comm))

    logits = torch.cat(SimulatedGroup(4).run(rank), dim=1)
    torch.testing.assert_close(logits, model(idx), rtol=0, atol=1e-10)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_real_tokens_do_not_see_the_padding(side):
    """key_padding_mask through every layer: the real tokens' logits ignore what the padding holds,
    and the fast and readable paths agree (float64)."""
    from conftest import tiny_lm

    model = tiny_lm().eval()
    B, N = 3, 24
    lengths = torch.tensor([24, 17, 9])
    position = torch.arange(N)[None, :]
    padding = position >= lengths[:, None] if side == "right" else position < (N - lengths)[:, None]
    idx = torch.randint(0, 256, (B, N), generator=torch.Generator().manual_seed(0))
    other = torch.where(padding, (idx + 101) % 256, idx)  # the same real tokens, different padding
    logits = model(idx, key_padding_mask=padding)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[~padding], model(other, key_padding_mask=padding)[~padding], rtol=0, atol=1e-12)
    if side == "left":  # without the mask they do see it (right padding lies in a causal model's future)
        assert not torch.allclose(model(idx)[~padding], model(other)[~padding])
    for block in model.blocks:
        block.attn.implementation = "readable"
    torch.testing.assert_close(model(idx, key_padding_mask=padding), logits, rtol=0, atol=1e-12)


# --- Bad configurations and inputs are refused by name, before any work ------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        *[(dict(rope_base=bad), rf"rope_base must be a positive finite number, got {bad!r}") for bad in
          (0, -1.0, float("nan"), float("inf"), "1e4", None)],
        *[(dict(dropout=bad), rf"dropout must be a number in \[0, 1\), got {bad!r}") for bad in
          (float("nan"), -1.0, 1.5, 1, "0.1", None, True)],
        *[(dict(head_offsets=bad), rf"head_offsets must be one of .*, got {bad!r}") for bad in ("bogus", None, 1)],
        *[(dict(implementation=bad), rf"implementation must be one of .*, got {bad!r}") for bad in ("bogus", None, 1)],
    ],
)  # fmt: skip
def test_bad_model_config_fields_are_named_at_the_config(overrides, match):
    """Refused by ModelConfig itself, so a bad config never reaches a model or a checkpoint."""
    with pytest.raises(ValueError, match=match):
        ModelConfig(**overrides)
    with pytest.raises(ValueError, match=match):
        LongNetLM(**overrides)


def test_valid_rope_bases_and_dropouts_are_kept():
    config = ModelConfig(rope_base=500, dropout=0)  # ints are numbers
    assert config.rope_base == 500 and LongNetLM(config).rotary.base == 500.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(head_dim=7), r"head_dim must be even .*got 7"),
        (dict(head_dim=0), r"head_dim must be a positive integer, got 0"),
        (dict(head_dim=-8), r"head_dim must be a positive integer, got -8"),
        (dict(head_dim="8"), r"head_dim must be a positive integer, got '8'"),
        (dict(head_dim=8, base=0), r"base must be a positive finite number, got 0"),
        (dict(head_dim=8, base=-1.0), r"base must be a positive finite number, got -1.0"),
        (dict(head_dim=8, base=float("nan")), r"base must be a positive finite number, got nan"),
        (dict(head_dim=8, base="1e4"), r"base must be a positive finite number, got '1e4'"),
    ],
)
def test_bad_rotary_embeddings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RotaryEmbedding(**kwargs)


@pytest.mark.parametrize(
    "q, positions, match",
    [
        (torch.zeros(1, 2, 6, 7), torch.arange(6), r"q must have head_dim = 8 dims per head, got D = 7"),
        (torch.zeros(1, 2, 6, 8).long(), torch.arange(6), r"q must be a 4-D floating tensor .*torch.int64"),
        (None, torch.arange(6), r"q must be a 4-D floating tensor .*got NoneType"),
        (torch.zeros(2, 6, 8), torch.arange(6), r"q must be a 4-D floating tensor .*shape \(2, 6, 8\)"),
        (torch.zeros(1, 2, 6, 8), torch.arange(5), r"one per token of q: shape \(6,\).*got shape \(5,\)"),
        (torch.zeros(1, 2, 6, 8), torch.arange(6)[None], r"positions must be one per token of q.*\(1, 6\)"),
        (torch.zeros(1, 2, 6, 8), list(range(6)), r"positions must be an integer tensor .*got list"),
        (torch.zeros(1, 2, 6, 8), torch.full((6,), float("nan")), r"positions must be an integer tensor .*float32"),
    ],
)  # fmt: skip
def test_bad_rotary_inputs_are_named(q, positions, match):
    rope = RotaryEmbedding(8)
    with pytest.raises(ValueError, match=match):
        rope(q, torch.zeros(1, 2, 6, 8), positions)
    with pytest.raises(ValueError, match=match.replace("q", "x", 1)):
        rope.rotate(q, positions)


def test_bad_rotary_keys_are_named():
    with pytest.raises(ValueError, match=r"positions must be one per token of k: shape \(3,\)"):
        RotaryEmbedding(8)(torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 3, 8), torch.arange(6))


@pytest.mark.parametrize("config", ["cfg", {"embed_dim": 16}, 5])
def test_a_config_that_is_not_a_model_config_is_a_type_error(config):
    with pytest.raises(TypeError, match=rf"config must be None or a ModelConfig .*got {type(config).__name__}"):
        LongNetLM(config)


def test_a_config_and_overrides_together_are_refused():
    with pytest.raises(TypeError, match=r"pass config or keyword overrides, not both; got config and \['dropout'\]"):
        LongNetLM(ModelConfig(), dropout=0.1)  # the dropout would have been ignored


@pytest.mark.parametrize("vocab_size", [0, -1, "256", None])
def test_check_tokens_blames_a_bad_vocab_size_not_the_ids(vocab_size):
    from longnet_ref.lm.model import check_tokens

    with pytest.raises(ValueError, match=rf"vocab_size must be a positive integer, got {vocab_size!r}"):
        check_tokens("idx", torch.zeros(1, 4, dtype=torch.long), vocab_size)


def test_bad_attend_and_sequence_parallel_arguments_are_named():
    model = tiny_lm()
    with pytest.raises(TypeError, match=r"attend must be None or a callable .*got 'x'"):
        model(torch.zeros(1, 4, dtype=torch.long), attend="x")
    with pytest.raises(TypeError, match=r"model must be a LongNetLM, got str"):
        sequence_parallel("m")
    with pytest.raises(ValueError, match=r"group must be None, a torch.distributed ProcessGroup or a Communicator"):
        sequence_parallel(model, group="bogus")
