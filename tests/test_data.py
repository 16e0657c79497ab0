"""The standard-library corpus (split by file, deterministic) and the recall task."""

import re
import zlib

import pytest
import torch

from longnet_ref.lm.data import (
    FILLER,
    IGNORE,
    NUM_VALUES,
    eval_windows,
    load_corpus,
    random_windows,
    recall_batch,
    recall_capacity,
    split_of,
    stdlib_files,
    uniform,
)


@pytest.fixture
def library(tmp_path):
    """A small library: nested packages, a site-packages folder to skip, a file with no final newline."""
    files = {f"pkg/mod{i}.py": f"x = {i}\n" * (i + 1) for i in range(30)}
    files["top.py"] = "print('no newline')"
    files["site-packages/thirdparty.py"] = "import this\n"
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    (tmp_path / "notes.txt").write_text("not python\n")
    return tmp_path, files


def test_files_are_sorted_and_third_party_is_skipped(library):
    root, files = library
    found = stdlib_files(root)
    assert found == sorted(p for p in files if not p.startswith("site-packages"))


def test_split_is_by_file_and_deterministic(library):
    root, files = library
    corpus = load_corpus(root, val_fraction=0.3)
    expected = {"train": b"", "val": b""}
    for path in stdlib_files(root):
        text = files[path].encode()
        split = "val" if zlib.crc32(path.encode()) % 10_000 < 3_000 else "train"
        expected[split] += text if text.endswith(b"\n") else text + b"\n"
    for split in ("train", "val"):
        assert bytes(corpus[split].tolist()) == expected[split] and corpus[split].dtype == torch.uint8
    again = load_corpus(root, val_fraction=0.3)
    assert all(torch.equal(corpus[s], again[s]) for s in ("train", "val"))
    # a file's split depends on its own path only: adding a file leaves the other split as it was
    (root / "pkg" / "new.py").write_text("y = 1\n")
    other = "train" if split_of("pkg/new.py", 0.3) == "val" else "val"
    assert torch.equal(load_corpus(root, val_fraction=0.3)[other], corpus[other])


def test_the_real_library_splits_about_five_percent_by_file():
    files = stdlib_files()
    assert len(files) > 100 and files == sorted(files)
    assert not any("site-packages" in p for p in files)
    val = [p for p in files if split_of(p) == "val"]
    assert 0.02 < len(val) / len(files) < 0.08
    assert split_of(val[0]) == "val" and split_of(val[0], 0.5) == "val"  # thresholds nest


def test_random_windows_are_next_byte_pairs_and_reproducible():
    data = torch.arange(200, dtype=torch.uint8)
    x, y = random_windows(data, 16, 5, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    x2, _ = random_windows(data, 16, 5, torch.Generator().manual_seed(3))
    assert torch.equal(x, x2)


def test_eval_windows_cover_the_same_bytes_at_every_length():
    data = torch.randint(0, 256, (1000,), dtype=torch.uint8)
    for n in (8, 32, 128):
        x, y = eval_windows(data, n, 512)
        assert x.shape == (512 // n, n)
        assert torch.equal(x.flatten(), data[:512].long()) and torch.equal(y.flatten(), data[1:513].long())
    with pytest.raises(ValueError, match="num_bytes 500 is not a multiple of seq_len 64"):
        eval_windows(data, 64, 500)
    with pytest.raises(ValueError, match="num_bytes"):
        eval_windows(data, 8, 1000)


def test_recall_answers_are_the_values_of_the_needles_distance_back():
    x, y, dist = recall_batch(6, 512, torch.Generator().manual_seed(0), num_pairs=4, queries_per_pair=8)
    scored = y != IGNORE
    assert scored.sum() == 6 * 4 * 8  # every query placed, none overwritten
    for b, q in scored.nonzero().tolist():
        key = x[b, q] - ord("A")
        needle = x[b, q - dist[b, q]]
        assert needle == 128 + NUM_VALUES * key + (y[b, q] - ord("0"))  # the needle with this key...
        assert not (x[b] == y[b, q]).any()  # ...and the answer is nowhere in the text: only the needle tells
        assert ((x[b] >= 128) & ((x[b] - 128) // NUM_VALUES == key)).sum() == 1  # one needle per key
    haystack = ~scored & (x < 128)
    assert torch.isin(x[haystack], FILLER).all()
    assert dist[scored].min() >= 1 and dist[scored].max() <= 510 and (dist[~scored] == 0).all()


@pytest.mark.parametrize("seq_len", [8, 9, 16, 33, 64, 100, 256])
def test_recall_training_batches_place_everything_the_capacity_admits(seq_len):
    # the training draw (distances=None) never fails for what TrainConfig accepts: at capacity,
    # for every queries_per_pair, in many draws (an earlier rejection sampler could not place
    # 16 needles x 64 queries in 4096, which the config check had accepted)
    for per_pair in range(1, seq_len // 2):
        pairs = recall_capacity(seq_len, per_pair)
        if pairs < 1:
            continue
        g = torch.Generator().manual_seed(per_pair)
        x, y, dist = recall_batch(4, seq_len, g, num_pairs=pairs, queries_per_pair=per_pair)
        scored = y != IGNORE
        assert (scored.sum(1) == pairs * per_pair).all() and ((x >= 128).sum(1) == pairs).all()
        for b, q in scored.nonzero().tolist():  # each answer is the value of its key's needle, d back
            key, needle = x[b, q] - ord("A"), x[b, q - dist[b, q]]
            assert needle == 128 + NUM_VALUES * key + (y[b, q] - ord("0"))
        assert scored[:, -1].sum() == 0  # the last position's target lies outside the window


def test_recall_training_needles_lie_anywhere_and_queries_reach_every_scale():
    # 16 needles x 64 queries in 4096 (the experiment's last stage): needles are spread over the
    # sequence, as the test's are, not packed at its start; distances span every scale
    x, y, dist = recall_batch(8, 4096, torch.Generator().manual_seed(0), num_pairs=16, queries_per_pair=64)
    needles = (x >= 128).nonzero()[:, 1]  # (8 * 16,) positions
    assert needles.numel() == 8 * 16 and (needles >= 2048).float().mean() > 0.3
    d = dist[y != IGNORE]  # (8 * 16 * 64,)
    assert d.numel() == 8 * 16 * 64 and d.max() <= 4094
    for lo, hi in [(1, 16), (17, 256), (257, 1024), (1025, 2048), (2049, 4094)]:
        assert ((d >= lo) & (d <= hi)).float().mean() > 0.03, (lo, hi)
    # every residue of the distance mod 4: a dilated head's one-hop case is not favoured
    assert all(abs((d % 4 == r).float().mean() - 0.25) < 0.02 for r in range(4))
    a = recall_batch(2, 512, torch.Generator().manual_seed(3), num_pairs=8, queries_per_pair=16)
    b = recall_batch(2, 512, torch.Generator().manual_seed(3), num_pairs=8, queries_per_pair=16)
    assert all(torch.equal(s, t) for s, t in zip(a, b))  # reproducible from the generator


def test_recall_fixed_distances_draw_as_the_earlier_sampler_did():
    # the test set's positions must not move when the training placement changes: the fixed-
    # distance path draws the same numbers in the same order as the sampler before it (rebuilt
    # here from its definition: key order, value, then rejection of (distances, needle) draws)
    from longnet_ref.lm.data import NUM_KEYS, _draw_distances

    def earlier(B, N, g, num_pairs, per_pair, distances):
        x = FILLER[torch.randint(0, len(FILLER), (B, N), generator=g)]
        y, dist = torch.full((B, N), IGNORE), torch.zeros((B, N), dtype=torch.long)
        for b in range(B):
            used = set()
            for key in torch.randperm(NUM_KEYS, generator=g)[:num_pairs].tolist():
                value = uniform(NUM_VALUES, g)
                while True:
                    ds = _draw_distances(N, per_pair, distances, g)
                    needle = uniform(N - 1 - max(ds), g)
                    taken = {needle} | {needle + d for d in ds}
                    if len(taken) == 1 + per_pair and not taken & used:
                        break
                used |= taken
                x[b, needle] = 128 + NUM_VALUES * key + value
                for d in ds:
                    x[b, needle + d], y[b, needle + d], dist[b, needle + d] = ord("A") + key, ord("0") + value, d
        return x, y, dist

    for N, pairs, per_pair, distances in [
        (4096, 8, 4, range(2049, 3585)),
        (512, 8, 4, range(1, 17)),
        (256, 4, 3, [3, 100, 200]),
    ]:
        a = recall_batch(3, N, torch.Generator().manual_seed(5), num_pairs=pairs, queries_per_pair=per_pair,
                         distances=list(distances))  # fmt: skip
        b = earlier(3, N, torch.Generator().manual_seed(5), pairs, per_pair, list(distances))
        assert all(torch.equal(s, t) for s, t in zip(a, b)), N
    with pytest.raises(ValueError, match="could not place 2 x 2"):  # both needles must sit at 0
        recall_batch(1, 16, num_pairs=2, queries_per_pair=2, distances=[13, 14])


def test_recall_training_placement_when_crowded(monkeypatch):
    # every drawn distance taken: the rest of a needle's queries go to free positions after it
    import longnet_ref.lm.data as data

    monkeypatch.setattr(data, "_distances", lambda room, count, generator: [1] * count)
    x, y, dist = recall_batch(4, 128, torch.Generator().manual_seed(0), num_pairs=7, queries_per_pair=8)
    scored = y != IGNORE
    assert (scored.sum(1) == 7 * 8).all() and ((x >= 128).sum(1) == 7).all()
    for b, q in scored.nonzero().tolist():
        key, needle = x[b, q] - ord("A"), x[b, q - dist[b, q]]
        assert dist[b, q] >= 1 and needle == 128 + NUM_VALUES * key + (y[b, q] - ord("0"))
    assert (dist[scored] > 1).any()  # the fallback placed queries beyond the one distance drawn


def test_recall_at_fixed_distances_and_reproducible():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = recall_batch(4, 256, g1, num_pairs=4, queries_per_pair=3, distances=[3, 100, 200])
    b = recall_batch(4, 256, g2, num_pairs=4, queries_per_pair=3, distances=[3, 100, 200])
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert sorted(a[2][a[1] != IGNORE].tolist()) == [3] * 16 + [100] * 16 + [200] * 16  # each needle, each distance


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_pairs=17), "num_pairs"),
        (dict(num_pairs=4, queries_per_pair=20, seq_len=128), "fit"),
        (dict(distances=[0], queries_per_pair=1), "distances"),
        (dict(distances=[255], queries_per_pair=1), "distances"),
        (dict(distances=[5, 6], queries_per_pair=3), "distances"),
        (dict(seq_len=0), "seq_len"),
    ],
)
def test_bad_recall_arguments(kwargs, match):
    args = dict(batch_size=2, seq_len=256)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        recall_batch(args.pop("batch_size"), args.pop("seq_len"), **args)


@pytest.mark.parametrize("val_fraction", [0, 1, 1.5])
def test_bad_val_fraction(library, val_fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(library[0], val_fraction=val_fraction)


def test_missing_root(tmp_path):
    with pytest.raises(ValueError, match="root"):
        stdlib_files(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda data: random_windows(data.float(), 16, 2), TypeError, r"data must be a 1-D torch.uint8 tensor"),
        (lambda data: random_windows(list(data), 16, 2), TypeError, r"data must be .*, got list"),
        (lambda data: eval_windows(data.view(10, -1), 16, 64), TypeError, r"got torch.uint8 tensor of shape \(10,"),
        (lambda data: recall_batch(1, 64, distances="abc", num_pairs=2, queries_per_pair=2), TypeError,
         r"distances must be None or a list of ints, got 'abc'"),
    ],
)  # fmt: skip
def test_bad_data_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randint(0, 256, (1000,), dtype=torch.uint8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sequences_per_bucket=0), r"sequences_per_bucket must be a positive integer, got 0"),
        (dict(buckets=[(5, 1)]), r"buckets\[0\] must be a pair \(a, b\) of ints with 1 <= a <= b <= seq_len - 2 = 254"),
        (dict(buckets=[(1, 4), (1, 1000)]), r"buckets\[1\] must be a pair .*got \(1, 1000\)"),
    ],
)
def test_bad_recall_eval_sets_are_named(kwargs, match):
    from longnet_ref.lm.evaluate import recall_eval_set

    args = dict(seq_len=256, sequences_per_bucket=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        recall_eval_set(**args)


# --- Bad arguments are refused by name, before any work (none of them may hang) ---------------


def test_query_distances_refuses_more_distinct_distances_than_exist():
    """Asking for more different distances than [1, seq_len - 2] holds once looped forever."""
    from longnet_ref.lm.data import query_distances

    with pytest.raises(ValueError, match=r"count 3 different distances do not exist .* seq_len 3: at most 1 do"):
        query_distances(3, 3)
    with pytest.raises(ValueError, match=r"count 70 different distances .* seq_len 64: at most 62 do"):
        query_distances(64, 70)
    every = query_distances(64, 62, generator=torch.Generator().manual_seed(0))  # the most there are: all of them
    assert sorted(every) == list(range(1, 63))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(count=-1), ValueError, r"count must be a positive integer, got -1"),
        (dict(count=2.5), ValueError, r"count must be a positive integer, got 2.5"),
        (dict(seq_len="64"), ValueError, r"seq_len must be a positive integer, got '64'"),
        (dict(distances=[]), ValueError, r"distances must hold at least 3 different values .*got \[\]"),
        (dict(distances=[5]), ValueError, r"distances must hold at least 3 different values"),
        (dict(distances="abc"), TypeError, r"distances must be None or a list of ints, got 'abc'"),
        (dict(distances=[1.5, 2.5, 3.5]), TypeError, r"distances must be None or a list of ints"),
        (dict(generator="g"), TypeError, r"generator must be None or a torch.Generator, got 'g' \(str\)"),
    ],
)
def test_bad_query_distances_are_named(kwargs, error, match):
    from longnet_ref.lm.data import query_distances

    args = dict(seq_len=64, count=3)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        query_distances(**args)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: uniform(0), ValueError, r"n must be a positive integer, got 0"),
        (lambda: uniform(-3), ValueError, r"n must be a positive integer, got -3"),
        (lambda: uniform("5"), ValueError, r"n must be a positive integer, got '5'"),
        (lambda: uniform(5, "g"), TypeError, r"generator must be None or a torch.Generator"),
        (lambda: random_windows(torch.zeros(100, dtype=torch.uint8), 16, 2, "g"), TypeError, r"generator must be None"),
        (lambda: recall_batch(1, 64, 5, num_pairs=2, queries_per_pair=2), TypeError, r"generator .*got 5 \(int\)"),
        (lambda: recall_batch(1, 64, num_pairs=2, queries_per_pair=2, distances=iter([1, 2, 3])), TypeError,
         r"distances must be None or a list of ints"),  # an iterator would be used up by the first draw
        (lambda: split_of(None), TypeError, r"path must be a str .*got None"),
        (lambda: split_of(123), TypeError, r"path must be a str .*got 123"),
        (lambda: split_of(b"a.py"), TypeError, r"path must be a str .*got b'a.py'"),
        (lambda: split_of("a.py", 2.0), ValueError, r"val_fraction must be a number in \[0, 1\], got 2.0"),
        (lambda: split_of("a.py", -1.0), ValueError, r"val_fraction must be a number in \[0, 1\], got -1.0"),
        (lambda: split_of("a.py", float("nan")), ValueError, r"val_fraction must be a number in \[0, 1\], got nan"),
        (lambda: split_of("a.py", "0.1"), ValueError, r"val_fraction must be a number in \[0, 1\], got '0.1'"),
        (lambda: stdlib_files(123), TypeError, r"root must be None or a folder path .*got 123 \(int\)"),
        (lambda: stdlib_files(b"\xff"), TypeError, r"root must be None or a folder path .*\(bytes\)"),
        (lambda: load_corpus(123), TypeError, r"root must be None or a folder path .*got 123"),
    ],
)  # fmt: skip
def test_bad_data_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("val_fraction", ["0.1", None, True, [0.1], float("nan")])
def test_a_val_fraction_that_is_not_a_number_is_named(library, val_fraction):
    message = r"val_fraction must be a number in \(0, 1\), got " + re.escape(repr(val_fraction))
    with pytest.raises(ValueError, match=message):
        load_corpus(library[0], val_fraction=val_fraction)


def test_split_of_takes_the_whole_range_of_fractions():
    assert split_of("os.py", 0) == "train" and split_of("os.py", 1) == "val"


def test_recall_batch_says_how_many_pairs_fit():
    with pytest.raises(ValueError, match=r"num_pairs 4 x queries_per_pair 8 must fit .*seq_len 64 .*at most 3 pairs"):
        recall_batch(1, 64, num_pairs=4, queries_per_pair=8)
    assert recall_batch(1, 64, num_pairs=3, queries_per_pair=8)[1].ne(IGNORE).sum() == 24  # and 3 do
