"""Cached decoding equals the full causal forward at every step, past the largest segment."""

import pytest
import torch
from conftest import TINY_LM, tiny_lm

import longnet_ref.lm.generate as gen
from longnet_ref.lm.generate import generate
from longnet_ref.lm.model import LongNetLM

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("attention", ["dilated", "dense", "local"])
@pytest.mark.parametrize("prompt_len", [1, 11])
def test_cached_logits_equal_the_full_forward_at_every_step(attention, prompt_len):
    """40 tokens: past the largest segment (16) twice; a prompt of 11 ends inside a segment."""
    model = tiny_lm(attention)
    prompt = torch.randint(0, 256, (2, prompt_len))
    rng = torch.Generator().manual_seed(0)
    tokens, logits = generate(model, prompt, 41 - prompt_len, generator=rng, return_logits=True)
    assert tokens.shape == (2, 41) and torch.equal(tokens[:, :prompt_len], prompt)
    assert len(set(tokens[0].tolist())) > 20  # sampled, varied tokens: equal ones would hide a wrong pattern
    full = model(tokens)[:, :-1]  # (B, 40, V): the logits that predicted tokens 1..40
    for step in range(40):  # every step, so a failure names the first wrong position
        torch.testing.assert_close(logits[:, step], full[:, step], rtol=0, atol=1e-10, msg=f"position {step}")


def stepwise_logits(model, tokens):
    """Teacher forcing through the cache: feed tokens (B, N) one at a time -> logits (B, N, V)."""
    cache, logits = gen.KVCache(len(model.blocks)), []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            logits.append(model(tokens[:, t : t + 1], attend=cache))
            cache.advance(1)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("head_offsets", ["paper", "torchscale", "none"])
def test_every_head_offset_rule_is_respected_by_the_cache(head_offsets):
    torch.manual_seed(0)
    model = LongNetLM(segment_lengths=[4, 12], dilation_rates=[1, 3], **TINY_LM)
    model = model.double()  # r = 3 does not divide H = 4: the rules give different offsets
    for block in model.blocks:
        block.attn.head_offsets = head_offsets
    tokens = torch.randint(0, 256, (2, 30))
    torch.testing.assert_close(stepwise_logits(model, tokens), model(tokens), rtol=0, atol=1e-10)


def test_the_cache_asks_the_one_keep_rule(monkeypatch):
    """`cached_attention` calls `patterns.keeps` (causal) for every branch of every layer at every step."""
    import longnet_ref.patterns as patterns

    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("causal"))
        return patterns.keeps(*args, **kwargs)

    monkeypatch.setattr(gen, "keeps", counted)
    model = tiny_lm("dilated")  # 3 branches, 2 layers
    tokens = torch.randint(0, 256, (1, 20))
    torch.testing.assert_close(stepwise_logits(model, tokens), model(tokens), rtol=0, atol=1e-10)
    assert calls == [True] * (19 * 2 * 3)  # the first token is the prefill forward, not the cache


def test_a_cache_that_ignores_segments_is_wrong(monkeypatch):
    """The official decoding's mistake: attend every cached key, as if all were one segment."""
    model = tiny_lm("dilated")
    tokens = torch.randint(0, 256, (1, 30))  # random tokens: identical ones would hide any pattern
    full = model(tokens)
    real = gen.cached_attention

    def one_segment(q, keys, values, pos, attn):
        class Unsegmented:  # same layer, every segment length stretched past the sequence
            segment_lengths = [10**9] * len(attn.segment_lengths)
            dilation_rates, head_offsets = attn.dilation_rates, attn.head_offsets

        return real(q, keys, values, pos, Unsegmented)

    monkeypatch.setattr(gen, "cached_attention", one_segment)
    wrong = stepwise_logits(model, tokens)
    early, late = (wrong - full)[0, :4].abs().max(), (wrong - full)[0, 16:].abs().max()
    assert early < 1e-10  # inside the first segment of every branch the two agree
    assert late > 1e-4  # past it they do not


def test_greedy_is_the_argmax_of_the_full_forward_and_top_k_1_is_greedy():
    model = tiny_lm("dilated")
    prompt = torch.randint(0, 256, (2, 5))
    greedy = generate(model, prompt, 20, temperature=0)
    full = model(greedy)
    assert torch.equal(greedy[:, 5:], full[:, 4:-1].argmax(-1))
    sampled = generate(model, prompt, 20, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled, greedy)


def test_sampling_is_reproducible_with_a_generator_and_restores_training_mode():
    model = tiny_lm("local")
    model.train()
    prompt = torch.randint(0, 256, (1, 3))
    a = generate(model, prompt, 15, generator=torch.Generator().manual_seed(5))
    b = generate(model, prompt, 15, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and model.training


def test_zero_new_tokens_returns_the_prompt():
    model = tiny_lm("dense")
    prompt = torch.randint(0, 256, (1, 6))
    tokens, logits = generate(model, prompt, 0, return_logits=True)
    assert torch.equal(tokens, prompt)
    torch.testing.assert_close(logits, model(prompt)[:, :-1], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=torch.zeros(5, dtype=torch.long)), "prompt"),
        (dict(prompt=torch.zeros(1, 0, dtype=torch.long)), "prompt"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(temperature=-1.0), r"temperature must be a number >= 0 \(0: greedy\), got -1.0"),
        (dict(temperature=float("nan")), r"temperature must be a number >= 0 \(0: greedy\), got nan"),
        (dict(temperature=float("inf")), r"temperature must be finite, got inf"),
        (dict(temperature="hot"), r"temperature must be a number >= 0 \(0: greedy\), got 'hot'"),
        (dict(top_k=0), "top_k"),
        (dict(prompt=torch.tensor([[1, 256]])), r"prompt must be ids in \[0, 256\), got \[256\]"),
        (dict(prompt=torch.tensor([[-1, 3]])), r"prompt must be ids in \[0, 256\), got \[-1\]"),
        (dict(prompt=torch.ones(1, 2)), r"prompt must hold integer token ids, got dtype torch.float32"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(prompt=torch.zeros(1, 2, dtype=torch.long), max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(tiny_lm("dense"), args.pop("prompt"), args.pop("max_new_tokens"), **args)


def test_a_tiny_temperature_samples_greedily_instead_of_failing():
    model = tiny_lm("dense")
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    greedy = generate(model, prompt, 4, temperature=0)
    for temperature in (1e-40, 1e-300):
        assert torch.equal(generate(model, prompt, 4, temperature=temperature, generator=torch.Generator()), greedy)


@pytest.mark.parametrize(
    "idx, match",
    [
        (torch.tensor([[0, 300]]), r"idx must be ids in \[0, 256\), got \[300\]"),
        (torch.zeros(4, dtype=torch.long), r"idx must be a \(B, N\) tensor of token ids, got \(4,\)"),
        (torch.zeros(1, 3, dtype=torch.bool), "idx must hold integer token ids, got dtype torch.bool"),
    ],
)
def test_the_model_names_bad_tokens(idx, match):
    with pytest.raises(ValueError, match=match):
        tiny_lm("dense")(idx)


def test_the_model_checks_targets_but_ignores_minus_100():
    model = tiny_lm("dense")
    idx = torch.zeros(1, 4, dtype=torch.long)
    model(idx, torch.tensor([[1, -100, 2, -100]]))
    with pytest.raises(ValueError, match=r"targets must be ids in \[0, 256\), got \[999\]"):
        model(idx, torch.tensor([[1, 999, 2, 3]]))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus):
    """A real checkpoint of a 2-step tiny run."""
    from longnet_ref.lm.config import PRESETS, TrainConfig
    from longnet_ref.lm.train import train

    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(**dict(PRESETS["tiny"], steps=2, eval_every=2)), out, progress=False, corpus=corpus)
    return out / "checkpoint.pt"


def test_the_generation_cli_prints_the_cached_decoding_of_the_checkpoint(checkpoint, capsys):
    from longnet_ref.lm.checkpoint import load_checkpoint
    from longnet_ref.lm.generate import main

    prompt = "def main():"
    assert (
        main(["--checkpoint", str(checkpoint), "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0"]) == 0
    )
    printed = capsys.readouterr().out
    model, _ = load_checkpoint(checkpoint)
    idx = torch.tensor([list(prompt.encode())])
    expected = bytes(generate(model, idx, 12, temperature=0)[0, len(prompt) :].tolist())
    assert printed == expected.decode("utf-8", errors="replace") + "\n"
    sampled = ["--checkpoint", str(checkpoint), "--prompt", prompt, "--max-new-tokens", "20", "--top-k", "5"]
    main([*sampled, "--seed", "3"])
    first = capsys.readouterr().out
    main([*sampled, "--seed", "3"])
    assert capsys.readouterr().out == first  # a seed gives the same text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, got -1"),
        (["--temperature", "-0.5"], "--temperature must be a finite number >= 0"),
        (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
        (["--top-k", "0"], "--top-k must be a positive integer, got 0"),
        (["--prompt", ""], "--prompt must not be empty"),
        (["--max-new-tokens", "ten"], "argument --max-new-tokens: invalid int value: 'ten'"),
    ],
)
def test_the_generation_cli_names_the_bad_flag(checkpoint, capsys, argv, message):
    from longnet_ref.lm.generate import main

    base = {"--checkpoint": str(checkpoint), "--prompt": "x", "--max-new-tokens": "4"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    with pytest.raises(SystemExit) as exit_:
        main([item for pair in base.items() for item in pair])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_the_generation_cli_names_a_missing_checkpoint(tmp_path, capsys):
    from longnet_ref.lm.generate import main

    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", str(tmp_path / "none.pt"), "--prompt", "x", "--max-new-tokens", "4"])
    assert exit_.value.code == 2 and "--checkpoint checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["--checkpoint", "--prompt", "--max-new-tokens"])
def test_the_generation_cli_requires_its_three_flags(tmp_path, capsys, missing):
    """The issue's synopsis: --checkpoint, --prompt and --max-new-tokens are required, the rest optional."""
    from longnet_ref.lm.generate import main

    argv = {"--checkpoint": str(tmp_path / "none.pt"), "--prompt": "x", "--max-new-tokens": "4"}
    del argv[missing]
    with pytest.raises(SystemExit) as exit_:
        main([item for pair in argv.items() for item in pair])
    assert exit_.value.code == 2 and f"the following arguments are required: {missing}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])  # --checkpoint and --prompt are required
    assert "the following arguments are required: --checkpoint, --prompt" in capsys.readouterr().err


def test_sample_refuses_what_generate_refuses():
    from longnet_ref.lm.generate import sample

    logits = torch.zeros(2, 4)
    for kwargs, message in (
        ({"temperature": -1.0, "top_k": None}, "temperature must be a number >= 0"),
        ({"temperature": float("inf"), "top_k": None}, "temperature must be finite"),
        ({"temperature": 1.0, "top_k": True}, "top_k must be None or a positive integer, got True"),
    ):
        with pytest.raises(ValueError, match=message):
            sample(logits, **kwargs)
    with pytest.raises(ValueError, match=r"logits must be a \(B, V\) tensor with V >= 1, got \(4,\)"):
        sample(torch.zeros(4), 1.0, None)
    with pytest.raises(ValueError, match="logits must not be NaN"):
        sample(torch.full((1, 4), float("nan")), 1.0, None)


def test_cached_decoding_of_a_grouped_query_model_equals_the_full_forward():
    """num_kv_heads = 2 of 4: the cache holds 2 kv heads; every decoded step's logits equal the full forward's."""
    from longnet_ref.lm.model import LongNetLM

    torch.manual_seed(0)
    model = LongNetLM(embed_dim=32, num_heads=4, num_layers=2, num_kv_heads=2, segment_lengths=[4, 8, 16],
                      dilation_rates=[1, 2, 4]).double().eval()  # fmt: skip
    assert model.blocks[0].attn.k_proj.out_features == 16
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    tokens, logits = generate(model, prompt, 30, temperature=0, return_logits=True)
    torch.testing.assert_close(logits, model(tokens)[:, :-1], rtol=0, atol=1e-10)


def test_train_config_checks_num_kv_heads():
    from longnet_ref.lm.config import TrainConfig

    for bad in (3, 0, True, 2.0):
        with pytest.raises(
            ValueError, match=f"--num-kv-heads must be a positive integer dividing --num-heads 4, got {bad!r}"
        ):
            TrainConfig(num_kv_heads=bad)
    assert TrainConfig(num_kv_heads=2).model_config().num_kv_heads == 2
