"""Checkpoints are trusted only as far as they are checked: weights_only loading, a checksum, atomic writes."""

import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from longnet_ref.files import write_atomic
from longnet_ref.lm.checkpoint import FORMAT, checksum, load_checkpoint, read_checkpoint, save_checkpoint
from longnet_ref.lm.config import PRESETS, TrainConfig
from longnet_ref.lm.generate import generate
from longnet_ref.lm.train import main, train


@pytest.fixture(scope="module")
def saved(tmp_path_factory, corpus):
    """A real checkpoint written by a 3-step run."""
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(**dict(PRESETS["tiny"], steps=3, eval_every=3)), out, progress=False, corpus=corpus)
    return out / "checkpoint.pt"


class RunsCode:
    """A pickle that, if it were unpickled without weights_only, would create a file (it must not)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_real_checkpoint_loads_with_weights_only_and_its_checksum_matches(saved):
    state = torch.load(saved, weights_only=True)
    assert state["format"] == FORMAT and state["checksum"] == checksum(state)
    model, checkpoint = load_checkpoint(saved)
    assert checkpoint["step"] == 3
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), state["model"].values()))


def test_a_crafted_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.pt"
    torch.save({"format": FORMAT, "payload": RunsCode(marker)}, crafted)
    for call in (
        lambda: read_checkpoint(crafted),
        lambda: load_checkpoint(crafted),
        lambda: main(["--preset", "tiny", "--out", str(tmp_path / "x"), "--resume", str(crafted)]),
        lambda: main(["--preset", "tiny", "--out", str(tmp_path / "y"), "--init-from", str(crafted)]),
    ):
        with pytest.raises((ValueError, SystemExit)) as error:
            call()
        assert not marker.exists()  # the reduce never ran
        if error.type is ValueError:
            assert "crafted.pt" in str(error.value) and "refused" in str(error.value)
    with pytest.raises(pickle.UnpicklingError):  # what weights_only does underneath
        torch.load(crafted, weights_only=True)
    assert not marker.exists()


def flip_a_byte_inside_the_weights(path, out):
    data = bytearray(path.read_bytes())
    state = torch.load(path, weights_only=True)
    needle = state["model"]["blocks.0.mlp.0.weight"].reshape(-1)[:8].numpy().tobytes()
    at = bytes(data).index(needle)  # the first weights of a matrix, stored raw in the zip
    data[at] ^= 0x40
    out.write_bytes(bytes(data))
    return out


def test_flipped_bytes_are_caught_by_the_checksum(saved, tmp_path):
    corrupted = flip_a_byte_inside_the_weights(saved, tmp_path / "flipped.pt")
    state = torch.load(corrupted, weights_only=True)  # torch itself reads it without complaint
    assert state["checksum"] != checksum(state)
    with pytest.raises(ValueError, match=r"flipped.pt' is corrupted: its contents do not match the checksum"):
        read_checkpoint(corrupted)
    with pytest.raises(ValueError, match="flipped.pt' is corrupted"):
        train(TrainConfig(**PRESETS["tiny"]), tmp_path / "resumed", resume=corrupted, progress=False)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda good: good[: len(good) // 2], "is not a readable torch.save file"),  # truncated
        (lambda good: b"not a checkpoint at all\n" * 10, "is not a readable torch.save file"),  # garbage
        (lambda good: b"", "is not a readable torch.save file"),  # empty
        (lambda good: saved_bytes({"weights": torch.zeros(2)}), "is not a longnet_ref training checkpoint"),
        (lambda good: saved_bytes([1, 2, 3]), "is not a longnet_ref training checkpoint"),
        (lambda good: saved_bytes({"format": FORMAT, "step": 1}), "lacks the entries"),
    ],
    ids=["truncated", "garbage", "empty", "a state dict", "a list", "missing entries"],
)
def test_bad_files_stop_with_one_error_naming_the_file(saved, tmp_path, make, message):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(make(saved.read_bytes()))
    with pytest.raises(ValueError, match=f"--resume checkpoint '.*bad.pt' {message}"):
        read_checkpoint(bad)
    with pytest.raises(ValueError, match=f"the checkpoint '.*bad.pt' {message}"):
        load_checkpoint(bad)


def saved_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_a_foreign_model_config_is_named(saved, tmp_path):
    state = torch.load(saved, weights_only=True)
    state = {key: value for key, value in state.items() if key not in ("format", "checksum")}
    state["model_config"] = dict(state["model_config"], attention="mamba")
    save_checkpoint(tmp_path / "foreign.pt", **state)
    with pytest.raises(ValueError, match=r"foreign.pt' holds a model config this version cannot build: attention"):
        load_checkpoint(tmp_path / "foreign.pt")
    state["model_config"] = dict(state["model_config"], attention="dilated", colour="blue")
    save_checkpoint(tmp_path / "unknown.pt", **state)
    with pytest.raises(ValueError, match=r"unknown.pt' holds a model config .*colour"):
        load_checkpoint(tmp_path / "unknown.pt")


def test_an_interrupted_save_leaves_the_previous_checkpoint(saved, tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(saved.read_bytes())
    before = path.read_bytes()
    state = torch.load(saved, weights_only=True)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, **{k: v for k, v in state.items() if k not in ("format", "checksum")})
    assert path.read_bytes() == before and read_checkpoint(path)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary file left behind


def test_write_atomic_text_bytes_and_bad_data(tmp_path):
    assert write_atomic(tmp_path / "a.txt", "héllo\n").read_bytes() == "héllo\n".encode()
    assert write_atomic(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    with pytest.raises(TypeError, match="data must be str or bytes, got dict"):
        write_atomic(tmp_path / "c", {"a": 1})


def test_generate_from_a_loaded_checkpoint(saved):
    model, _ = load_checkpoint(saved)
    out = generate(model, torch.tensor([[104, 105]]), max_new_tokens=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 5)
