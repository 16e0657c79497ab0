import os

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
