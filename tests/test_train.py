"""The training loop and its CLI: it learns, it resumes exactly, every bad flag is refused clearly."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from longnet_ref.lm.checkpoint import load_checkpoint
from longnet_ref.lm.config import PRESETS, TrainConfig
from longnet_ref.lm.data import random_windows
from longnet_ref.lm.evaluate import recall_buckets
from longnet_ref.lm.model import LongNetLM
from longnet_ref.lm.train import build_parser, main, train

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides):
    values = dict(PRESETS["tiny"], threads=1)
    values.update(overrides)
    return TrainConfig(**values)


def test_a_tiny_run_learns_and_writes_metrics_and_checkpoint(tmp_path, corpus):
    _, metrics = train(tiny(steps=30, eval_every=15), tmp_path, progress=False, corpus=corpus)
    losses = [r["loss"] for r in metrics["train"]]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # from ~5.5 nats down
    assert [e["step"] for e in metrics["eval"]] == [15, 30]
    assert metrics["eval"][1]["val_bpb"] < metrics["eval"][0]["val_bpb"] < 8.5
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["train"] == metrics["train"] and on_disk["train_config"]["attention"] == "dilated"
    assert all(r["tokens_per_s"] > 0 for r in on_disk["train"])


def test_checkpoint_round_trip(tmp_path, corpus):
    model, _ = train(tiny(steps=4, eval_every=4), tmp_path, progress=False, corpus=corpus)
    loaded, checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["step"] == 4 and loaded.config == model.config
    x = torch.randint(0, 256, (2, 64))
    model.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("task", ["code", "recall"])
def test_a_resumed_run_continues_the_same_loss_curve_exactly(tmp_path, corpus, task):
    config = tiny(steps=8, eval_every=4, task=task, seq_len=256 if task == "recall" else 64)
    full_model, full = train(config, tmp_path / "full", progress=False, corpus=corpus)
    _, first = train(config, tmp_path / "parts", pause_at=3, progress=False, corpus=corpus)
    assert len(first["train"]) == 3
    resumed_model, resumed = train(
        config, tmp_path / "parts", resume=tmp_path / "parts" / "checkpoint.pt", progress=False, corpus=corpus
    )
    assert [r["loss"] for r in resumed["train"]] == [r["loss"] for r in full["train"]]  # bit for bit
    assert resumed["eval"] == full["eval"]
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name


def test_resuming_with_another_model_is_refused(tmp_path, corpus):
    train(tiny(steps=2, eval_every=2), tmp_path, progress=False, corpus=corpus)
    with pytest.raises(ValueError, match="--attention 'dense' differs from the checkpoint's 'dilated'"):
        train(tiny(steps=4, attention="dense"), tmp_path, resume=tmp_path / "checkpoint.pt", corpus=corpus)


def test_init_from_starts_from_another_runs_weights(tmp_path, corpus):
    """A second stage: the weights of a short-sequence run, a longer length, another attention kind."""
    train(tiny(steps=4, eval_every=4), tmp_path / "short", progress=False, corpus=corpus)
    source, _ = load_checkpoint(tmp_path / "short" / "checkpoint.pt")
    config = tiny(steps=1, eval_every=1, seq_len=128, attention="local", segment_lengths=[32], dilation_rates=[1])
    _, metrics = train(config, tmp_path / "long", init_from=tmp_path / "short" / "checkpoint.pt", corpus=corpus)
    assert metrics["init_from"].endswith("checkpoint.pt")
    # the first loss is the source weights' loss on the first batch of the new stream, with local attention
    x, y = random_windows(corpus["train"], 128, config.batch_size, torch.Generator().manual_seed(config.seed + 1))
    local = LongNetLM(config.model_config())
    local.load_state_dict(source.state_dict())
    with torch.no_grad():
        _, loss = local(x, y)
    assert metrics["train"][0]["loss"] == pytest.approx(loss.item(), abs=1e-6)
    with pytest.raises(ValueError, match="--embed-dim 64 differs from the --init-from checkpoint's 32"):
        train(tiny(embed_dim=64), tmp_path / "x", init_from=tmp_path / "short" / "checkpoint.pt", corpus=corpus)
    with pytest.raises(ValueError, match="exclude each other"):
        train(tiny(), tmp_path / "x", init_from=tmp_path / "a.pt", resume=tmp_path / "b.pt", corpus=corpus)


def test_the_cli_runs_end_to_end(tmp_path, capsys):
    argv = ["--preset", "tiny", "--task", "recall", "--seq-len", "256", "--steps", "3", "--eval-every", "3"]
    metrics = main(argv + ["--attention", "local", "--threads", "1", "--out", str(tmp_path), "--no-progress"])
    assert len(metrics["train"]) == 3 and metrics["train_config"]["attention"] == "local"
    assert set(metrics["eval"][0]["recall_accuracy"]) and (tmp_path / "checkpoint.pt").is_file()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 3


BAD_FLAGS = [
    (["--attention", "sparse"], "--attention", "sparse"),
    (["--task", "wiki"], "--task", "wiki"),
    (["--preset", "huge"], "--preset", "huge"),
    (["--seq-len", "2048", "--segment-lengths", "256", "512", "--dilation-rates", "1", "2"], "--seq-len", "2048"),
    (["--seq-len", "0"], "--seq-len", "0"),
    (["--seq-len", "abc"], "--seq-len", "abc"),
    (["--steps", "0"], "--steps", "0"),
    (["--batch-size", "-2"], "--batch-size", "-2"),
    (["--segment-lengths", "16", "32", "--dilation-rates", "1"], "--segment-lengths", "[16, 32]"),
    (["--seq-len", "16", "--segment-lengths", "2", "16", "--dilation-rates", "4", "1"], "dilation_rate[0]", "4"),
    (["--embed-dim", "30", "--num-heads", "4"], "--embed-dim", "30"),
    (["--num-layers", "0"], "--num-layers", "0"),
    (["--lr", "0"], "--lr", "0"),
    (["--threads", "-1"], "--threads", "-1"),
    (["--eval-every", "0"], "--eval-every", "0"),
    (["--pause-at", "0"], "--pause-at", "0"),
    (["--device", "tpu"], "--device", "tpu"),
    (["--resume", "no/such/checkpoint.pt"], "--resume", "no/such/checkpoint.pt"),
    (["--init-from", "no/such/checkpoint.pt"], "--init-from", "no/such/checkpoint.pt"),
]
if not torch.cuda.is_available():
    BAD_FLAGS.append((["--device", "cuda"], "--device cuda", "no CUDA"))


@pytest.mark.parametrize("flags, flag, value", BAD_FLAGS)
def test_every_bad_flag_is_an_argparse_error_naming_flag_and_value(tmp_path, capsys, flags, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "tiny", "--out", str(tmp_path / "run")] + flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and value in err, err
    assert not (tmp_path / "run").exists()  # refused before any work


def test_out_is_required(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--steps", "3"])
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(attention="sparse"), "--attention must be one of"),
        (dict(seq_len=128, segment_lengths=[16, 64], dilation_rates=[1, 2]), "--seq-len 128 is not covered"),
        (dict(steps=1.5), "--steps"),
    ],
)
def test_config_errors_are_value_errors_naming_the_flag(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_local_and_dense_need_no_cover():
    assert tiny(attention="local", seq_len=128, segment_lengths=[16], dilation_rates=[1]).seq_len == 128
    assert tiny(attention="dense", seq_len=128, segment_lengths=[16], dilation_rates=[1]).seq_len == 128
    assert tiny(seq_len=100).segment_lengths == [25, 50, 100]  # the default mixture from --seq-len


def test_missing_checkpoint_in_the_library_call(tmp_path):
    with pytest.raises(ValueError, match="--resume checkpoint .*missing.pt' does not exist"):
        train(tiny(), tmp_path, resume=tmp_path / "missing.pt")


def test_the_library_call_makes_the_checks_main_relies_on(tmp_path):
    """`train` and `main` share one set of checks (TrainConfig's and `preflight.check_run`'s), made before any work."""
    with pytest.raises(ValueError, match="--pause-at must be a positive step, got 0"):
        train(tiny(), tmp_path / "run", pause_at=0)
    with pytest.raises(ValueError, match="--init-from checkpoint .*missing.pt' does not exist"):
        train(tiny(), tmp_path / "run", init_from=tmp_path / "missing.pt")
    assert not (tmp_path / "run").exists()


# -- the experiment command: tables and figures come from the runs, never typed ---------------


def test_the_experiment_writes_tables_and_figures_from_its_runs(tmp_path, corpus, monkeypatch):
    import longnet_ref.analysis.viz as viz
    import longnet_ref.lm.experiment as ex

    figures = tmp_path / "figures"
    figures.mkdir()
    monkeypatch.setattr(viz, "figures_dir", lambda: figures)
    monkeypatch.setattr(ex, "load_corpus", lambda: {"train": corpus["train"], "val": corpus["val"][:2000]})
    monkeypatch.setattr(ex, "TABLE2_COMMON", dict(embed_dim=16, num_heads=2, num_layers=1, steps=2, eval_every=2))
    monkeypatch.setattr(
        ex,
        "TABLE2_RUNS",
        {"dense-16": dict(attention="dense", seq_len=16, batch_size=4), "longnet-64": dict(seq_len=64, batch_size=1)},
    )
    monkeypatch.setattr(ex, "TEST_LENGTHS", (16, 64))
    monkeypatch.setattr(ex, "TEST_BYTES", 256)
    monkeypatch.setattr(ex, "RECALL_COMMON", dict(task="recall", embed_dim=16, num_heads=4, num_layers=1))
    stage = dict(batch_size=2, steps=2, num_pairs=2, queries_per_pair=2)
    monkeypatch.setattr(ex, "RECALL_STAGES", (dict(stage, seq_len=32), dict(stage, seq_len=128)))
    monkeypatch.setattr(ex, "RECALL_LENGTH", 128)
    monkeypatch.setattr(ex, "RECALL_TEST_SEQUENCES", 2)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- 07:table2 -->\nold table\n<!-- /07:table2 -->\nend\n")
    runs = tmp_path / "runs"
    ex.table2(runs, progress=False)
    ex.recall(runs, progress=False)
    ex.report(runs, readme=readme)

    # the table's numbers are the runs' measurements
    bpb = json.loads((runs / "longnet-64" / "test.json").read_text())["bpb"]
    table = (figures / "07_table2.md").read_text()
    assert f"{bpb['64']:.3f}" in table and "longnet-64" in table and "dense-16" in table
    rows = list(csv.reader(open(figures / "07_table2.csv")))
    assert rows[0][-2:] == ["bpb @ 16", "bpb @ 64"] and len(rows) == 3
    assert readme.read_text() == f"intro\n<!-- 07:table2 -->\n{table}<!-- /07:table2 -->\nend\n"
    accuracy = json.loads((runs / "recall-dilated" / "test.json").read_text())["accuracy"]
    assert list(accuracy) == [f"d={a}-{b}" for a, b in recall_buckets(128)]
    recall_rows = list(csv.reader(open(figures / "07_recall.csv")))
    assert recall_rows[0] == ["attention", "train CPU s", *accuracy]
    assert [row[0] for row in recall_rows[1:]] == ["dense", "local", "dilated"]
    assert recall_rows[3][2:] == [f"{value:.2f}" for value in accuracy.values()]
    recall_table = (figures / "07_recall.md").read_text()
    assert "32x2 + 128x2" in recall_table and "(2,1) (4,2) (8,4) (16,4) (32,4)" not in recall_table
    assert "(8,1) (16,2) (32,4) (64,4) (128,4) at 128" in recall_table
    stage1 = json.loads((runs / "recall-dilated" / "stage1-32" / "metrics.json").read_text())
    assert stage1["train_config"]["segment_lengths"] == [2, 4, 8, 16, 32]  # scaled to the stage's length
    stage2 = json.loads((runs / "recall-dilated" / "stage2-128" / "metrics.json").read_text())
    assert stage2["init_from"].endswith("stage1-32/checkpoint.pt")  # the second stage started from the first
    assert (figures / "07_table2.png").is_file() and (figures / "07_recall.png").is_file()
    # finished runs are not trained again
    before = (runs / "dense-16" / "metrics.json").read_text()
    ex.table2(runs, progress=False)
    assert (runs / "dense-16" / "metrics.json").read_text() == before


class RecordingBar:
    """Stands in for tqdm in experiment.py: keeps its arguments and counts its updates."""

    made = []

    def __init__(self, **kwargs):
        self.kwargs, self.n = kwargs, kwargs.get("initial", 0)
        RecordingBar.made.append(self)

    def update(self, n):
        self.n += n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    write = staticmethod(print)


def test_the_experiment_shows_one_bar_with_an_eta_over_all_its_runs(tmp_path, monkeypatch):
    """recall's overall bar counts the training tokens of every stage, also with --jobs > 1 (as each model's
    process finishes); finished runs count as done, and progress=False or no terminal turns it off."""
    from concurrent.futures import ThreadPoolExecutor

    import longnet_ref.lm.experiment as ex

    class Pool(ThreadPoolExecutor):  # the processes' stand-in: the fakes below are not picklable
        def __init__(self, max_workers, mp_context, initializer, initargs):
            super().__init__(max_workers)

    RecordingBar.made.clear()
    monkeypatch.setattr(ex, "tqdm", RecordingBar)
    monkeypatch.setattr(ex, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(ex, "recall_model", lambda name, runs, threads, progress: name)
    monkeypatch.setattr(ex, "finished", lambda out, config: "recall-dense/" in str(out))  # dense trained already
    stages = {name: ex.recall_stage_configs(name) for name in ex.RECALL_RUNS}
    total = sum(ex.tokens(config) for configs in stages.values() for config in configs)
    ex.recall(tmp_path, jobs=2)
    (bar,) = RecordingBar.made
    assert bar.kwargs["total"] == total and bar.kwargs["unit"] == "tok" and bar.kwargs["disable"] is None
    assert bar.kwargs["initial"] == sum(map(ex.tokens, stages["recall-dense"])) and bar.n == total
    ex.recall(tmp_path, progress=False, jobs=2)
    assert RecordingBar.made[-1].kwargs["disable"] is True
    # one job: train_run moves the bar by the tokens of each run it trains, and not for a finished one
    monkeypatch.setattr(ex, "train", lambda config, out, **options: ("model", {}))
    config, bar = tiny(), RecordingBar(total=10**9)
    assert ex.train_run("new", config, tmp_path, bar=bar) == "model" and bar.n == ex.tokens(config) == 20 * 4 * 64
    monkeypatch.setattr(ex, "load_checkpoint", lambda path: ("loaded", {}))
    assert ex.train_run("recall-dense/stage1", config, tmp_path, bar=bar) == "loaded" and bar.n == ex.tokens(config)


def test_the_experiment_draws_nothing_its_tables_and_plots_are_report_py():
    import longnet_ref.lm.experiment as ex
    import longnet_ref.lm.report as report

    source = Path(ex.__file__).read_text()
    assert not any(word in source for word in ("matplotlib", "save_fig", "write_table"))
    assert (ex.report_table2, ex.report_recall) == (report.report_table2, report.report_recall)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_is_a_valid_run(preset):
    config = TrainConfig(**PRESETS[preset])
    model = LongNetLM(config.model_config())
    assert max(config.segment_lengths) >= config.seq_len and config.num_heads >= max(config.dilation_rates)
    idx = torch.randint(0, 256, (1, 48))
    assert model(idx).shape == (1, 48, 256)


def test_bits_per_byte_is_the_mean_cross_entropy_in_bits():
    from longnet_ref.lm.evaluate import bits_per_byte

    torch.manual_seed(0)
    model = LongNetLM(segment_lengths=[8, 16], dilation_rates=[1, 2], embed_dim=16, num_heads=2, num_layers=1).double()
    data = torch.randint(0, 256, (200,), dtype=torch.uint8)
    bpb, per_position = bits_per_byte(model, data, 16, 128, batch_size=3, by_position=True)
    x = data[:128].long().view(8, 16)
    y = data[1:129].long().view(8, 16)
    nats = torch.nn.functional.cross_entropy(model(x).transpose(1, 2), y, reduction="none")  # (8, 16)
    torch.testing.assert_close(per_position, nats.mean(0) / math.log(2), rtol=0, atol=1e-12)
    assert bpb == pytest.approx((nats.mean() / math.log(2)).item(), abs=1e-12)
    assert bits_per_byte(model, data, 16, 128) == pytest.approx(bpb, abs=1e-12)


def test_recall_buckets_are_consecutive_and_end_at_seven_eighths_of_n():
    from longnet_ref.lm.evaluate import bucket_name, recall_buckets, recall_eval_set

    buckets = recall_buckets(4096)
    assert buckets == [(1, 16), (17, 256), (257, 512), (513, 1024), (1025, 2048), (2049, 3584)]
    assert [bucket_name(b) for b in buckets][:2] == ["d=1-16", "d=17-256"]
    for n in (8, 9, 100, 128, 256, 1000, 16384):
        ends = recall_buckets(n)
        # 7/8 of n, or the longest distance n - 2 where that is shorter (n = 8: 7 > 6)
        assert ends[0][0] == 1 and ends[-1][1] == min(int(n * 7 / 8), n - 2)
        assert all(b[0] == a[1] + 1 and b[0] <= b[1] for a, b in zip(ends, ends[1:]))
    for n in range(8, 64):  # every bucket can be tested: recall_eval_set places queries in each
        assert recall_buckets(n)[-1][1] <= n - 2
        recall_eval_set(n, 1, num_pairs=1, queries_per_pair=1)
    with pytest.raises(ValueError, match="seq_len"):
        recall_buckets(4)


def test_a_recall_run_at_capacity_starts_and_its_evaluation_fits(tmp_path):
    # TrainConfig accepts needles x queries up to recall_capacity; the run's own evaluation set
    # (at most 4 queries a needle, fewer needles where a bucket would crowd) must then be placeable.
    # Before, a config at capacity could fail in start_run ("could not place ...")
    from longnet_ref.lm.data import recall_capacity
    from longnet_ref.lm.evaluate import recall_eval_set, run_eval_sizes

    for n in range(8, 200, 3):
        for per_pair in (1, 2, 4, 8, 16, 64):
            pairs = recall_capacity(n, per_pair)
            if pairs >= 1:
                eval_pairs, eval_per_pair = run_eval_sizes(n, pairs, per_pair)
                assert 1 <= eval_pairs <= pairs and eval_per_pair == min(per_pair, 4)
                recall_eval_set(n, 4, num_pairs=eval_pairs, queries_per_pair=eval_per_pair)
    assert run_eval_sizes(4096, 16, 64) == (16, 4)  # the experiment's last stage: its 16 needles
    config = TrainConfig(task="recall", seq_len=80, num_pairs=8, queries_per_pair=4, steps=1, batch_size=1,
                         embed_dim=16, num_heads=2, num_layers=1, eval_size=2, threads=1)  # fmt: skip
    train(config, tmp_path / "run", progress=False)  # raised ValueError before


def test_recall_test_values_are_balanced_so_a_fixed_guess_scores_chance():
    # values drawn independently can give one value a fifth of a bucket's 128 needles (the
    # experiment's test set did, before): a model that cannot reach then scored 0.2, not 1/8
    from longnet_ref.lm.data import IGNORE, NUM_VALUES
    from longnet_ref.lm.evaluate import recall_buckets, recall_eval_set

    x, y, dist = recall_eval_set(1024, 8, num_pairs=8, queries_per_pair=4)
    per_bucket = 8  # sequences
    for i, _ in enumerate(recall_buckets(1024)):
        xs, ys = x[i * per_bucket : (i + 1) * per_bucket], y[i * per_bucket : (i + 1) * per_bucket]
        needle_values = (xs[xs >= 128] - 128) % NUM_VALUES  # (64,)
        assert torch.bincount(needle_values, minlength=NUM_VALUES).tolist() == [8] * NUM_VALUES
        answers = ys[ys != IGNORE] - ord("0")
        for guess in range(NUM_VALUES):  # every fixed answer scores exactly 1/8
            assert (answers == guess).float().mean() == 1 / NUM_VALUES
    for b, q in (y != IGNORE).nonzero().tolist():  # and each answer is still its needle's value
        key, needle = x[b, q] - ord("A"), x[b, q - dist[b, q]]
        assert needle == 128 + NUM_VALUES * key + (y[b, q] - ord("0"))
    recall_eval_set(64, 1, num_pairs=2, queries_per_pair=2, seed=2**63 - 2)  # the largest: seed + 1 seeds the values
    with pytest.raises(ValueError, match="seed must be an integer in"):
        recall_eval_set(64, 1, num_pairs=2, queries_per_pair=2, seed=2**63 - 1)
    odd = recall_eval_set(256, 3, num_pairs=3, queries_per_pair=2)[0][:3]  # 9 needles: counts 2 and 1
    counts = torch.bincount((odd[odd >= 128] - 128) % NUM_VALUES, minlength=NUM_VALUES)
    assert counts.sum() == 9 and counts.max() - counts.min() <= 1


def test_recall_accuracy_counts_each_query_in_its_bucket_and_every_residue_is_tested():
    from longnet_ref.lm.evaluate import recall_accuracy, recall_buckets, recall_eval_set

    buckets = recall_buckets(256)
    x, y, dist = eval_set = recall_eval_set(256, 6, num_pairs=4, queries_per_pair=4)
    asked = dist[y != -100]
    # each bucket holds the same number of sequences, and its queries' distances lie in it
    for k, (a, b) in enumerate(buckets):
        rows = dist[6 * k : 6 * (k + 1)][y[6 * k : 6 * (k + 1)] != -100]
        assert ((rows >= a) & (rows <= b)).all()
    assert {d % 4 for d in asked[asked > 16].tolist()} == {0, 1, 2, 3}  # not only multiples of r = 4

    class Oracle(torch.nn.Module):  # answers right exactly when the distance is a multiple of 4
        def forward(self, xb):
            i = next(k for k in range(0, len(x), 1) if torch.equal(x[k : k + len(xb)], xb))
            yb, db = y[i : i + len(xb)], dist[i : i + len(xb)]
            right = (yb != -100) & (db % 4 == 0)
            return torch.nn.functional.one_hot(torch.where(right, yb, ord("z")), 256).float()

    accuracy, _ = recall_accuracy(Oracle(), eval_set, batch_size=2, buckets=buckets)
    assert list(accuracy) == [f"d={a}-{b}" for a, b in buckets]
    for a, b in buckets:
        in_bucket = asked[(asked >= a) & (asked <= b)]
        assert accuracy[f"d={a}-{b}"] == (in_bucket % 4 == 0).double().mean().item()
    exact, _ = recall_accuracy(Oracle(), eval_set, batch_size=2)
    assert all(value == (1.0 if int(name.split("-")[1]) % 4 == 0 else 0.0) for name, value in exact.items())


@pytest.mark.parametrize("section", ["table2", "recall"])
def test_the_readme_shows_the_tables_the_experiment_wrote(section):
    """The README's results are the files `python -m longnet_ref.lm.experiment` wrote, not an edited copy."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    between = readme.split(f"<!-- 07:{section} -->\n", 1)[1].split(f"<!-- /07:{section} -->", 1)[0]
    table = (root / "figures" / f"07_{section}.md").read_text()
    assert between == table
    rows = list(csv.reader(open(root / "figures" / f"07_{section}.csv")))
    table_lines = [line for line in table.splitlines() if line.startswith("| ")]  # not the separator or footer
    assert [line.strip("| ").split(" | ") for line in table_lines] == rows  # every cell, the CSV's


def test_a_folder_that_holds_a_run_is_refused_unless_resumed_or_overwritten(tmp_path, corpus):
    train(tiny(steps=2, eval_every=2), tmp_path, progress=False, corpus=corpus)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=r"--out '.*' already holds a run \(checkpoint.pt, metrics.json\): pass"):
        train(tiny(steps=2, eval_every=2, seed=1), tmp_path, progress=False, corpus=corpus)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before  # nothing was touched
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--steps", "2", "--out", str(tmp_path), "--no-progress"])
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    train(tiny(steps=4, eval_every=2), tmp_path, resume=tmp_path / "checkpoint.pt", progress=False, corpus=corpus)
    _, metrics = train(tiny(steps=2, eval_every=2, seed=1), tmp_path, progress=False, corpus=corpus, overwrite=True)
    assert metrics["train_config"]["seed"] == 1 and len(metrics["train"]) == 2
    with pytest.raises(TypeError, match="overwrite must be True or False, got 'yes'"):
        train(tiny(), tmp_path / "new", progress=False, corpus=corpus, overwrite="yes")


def test_an_out_that_cannot_be_written_fails_before_training(tmp_path, corpus, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"--out '.*a-file' is a file, not a folder"):
        train(tiny(), blocker, progress=False, corpus=corpus)
    with pytest.raises(ValueError, match=r"--out '.*a-file/run' is not writable: "):
        train(tiny(), blocker / "run", progress=False, corpus=corpus)
    with pytest.raises(SystemExit) as exit_:
        main(["--preset", "tiny", "--out", str(blocker / "run"), "--no-progress"])
    assert exit_.value.code == 2 and "is not writable" in capsys.readouterr().err


def test_report_leaves_figures_and_readme_alone_until_every_run_of_a_table_finished(tmp_path, monkeypatch, capsys):
    import longnet_ref.analysis.viz as viz
    import longnet_ref.lm.experiment as ex

    figures = tmp_path / "figures"
    figures.mkdir()
    monkeypatch.setattr(viz, "figures_dir", lambda: figures)
    readme = tmp_path / "README.md"
    text = "<!-- 07:table2 -->\nthe committed table\n<!-- /07:table2 -->\n<!-- 07:recall -->\nr\n<!-- /07:recall -->\n"
    readme.write_text(text)
    runs = tmp_path / "runs"
    (runs / "dense-256").mkdir(parents=True)
    (runs / "dense-256" / "test.json").write_text('{"bpb": {}}')  # 1 of the 4 Table 2 runs finished
    ex.report(runs, readme=readme)
    out = capsys.readouterr().out
    assert "table2: 1 of 4 runs finished" in out and "recall: 0 of 3 runs finished" in out
    assert readme.read_text() == text and list(figures.iterdir()) == []


def test_paste_into_readme_writes_only_into_this_checkout_or_where_told(tmp_path, monkeypatch):
    import longnet_ref.analysis.viz as viz
    from longnet_ref.analysis.results import paste_into_readme

    stray = tmp_path / "README.md"  # a README with the markers in the working directory
    stray.write_text("<!-- m -->\nold\n<!-- /m -->\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(viz, "checkout_root", lambda: None)  # an installed copy
    assert paste_into_readme("m", "new\n") is False and stray.read_text() == "<!-- m -->\nold\n<!-- /m -->\n"
    assert paste_into_readme("m", "new\n", readme=stray) is True  # told where: written
    assert stray.read_text() == "<!-- m -->\nnew\n<!-- /m -->\n"
