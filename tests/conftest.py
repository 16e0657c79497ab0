import os
import pathlib

import pytest
import torch
from hypothesis import settings

# Deterministic property tests: CI runs the same examples every time, so a failure reproduces.
settings.register_profile("ci", derandomize=True, max_examples=150, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=200, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rand_qkv(B, H, N, D, dtype=torch.float64, requires_grad=False, scale=1.0):
    return tuple((torch.randn(B, H, N, D, dtype=dtype) * scale).requires_grad_(requires_grad) for _ in range(3))


@pytest.fixture
def one_thread():
    """One torch thread for the test; modules of tiny-model tests opt in with `pytestmark`."""
    # tiny tensors: two OpenMP threads only wait on each other (badly so on a shared CPU)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_LM = dict(embed_dim=32, num_heads=4, num_layers=2)  # the sizes of the test language models


def tiny_lm(attention="dilated", ws=(4, 8, 16), rs=(1, 2, 4), seed=0, **fields):
    """A seeded float64 `LongNetLM` of `TINY_LM` sizes (and other ModelConfig `fields`): exact
    comparisons in the model and decoding tests."""
    from longnet_ref.lm.model import LongNetLM  # here, so a broken model.py fails only the tests that use it

    torch.manual_seed(seed)
    return LongNetLM(
        attention=attention, segment_lengths=list(ws), dilation_rates=list(rs), **TINY_LM, **fields
    ).double()


@pytest.fixture(scope="module")
def corpus():
    """A small byte corpus (real Python source, this package's own) so tests skip reading the library."""
    import longnet_ref

    text = b"".join(p.read_bytes() for p in sorted(pathlib.Path(longnet_ref.__file__).parent.glob("*.py")))
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    return {"train": data[: len(data) * 9 // 10], "val": data[len(data) * 9 // 10 :]}
