"""Shared fixtures: every kernel test runs on each device ("cpu" always, "cuda" when present)."""

from __future__ import annotations

import pytest
import torch

import qkit  # noqa: F401 - registers torch.ops.qkit

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def fresh_dynamo():
    """A test that compiles starts and ends with an empty dynamo cache (no recompile limits shared)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def set_threads():
    """torch.set_num_threads for one test (the CPU kernels use torch's intra-op pool)."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)
