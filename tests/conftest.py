"""Shared fixtures: every kernel test runs on each device.

"cpu" always; "cuda" when a GPU is present; "emu" when ``QKIT_EMULATED_CUDA`` is set
(``bash ci/emulate_cuda.sh``): CPU tensors, with qkit's CUDA kernels run on the CPU
through HIP-CPU in place of its CPU kernels (see ``tests/emulated/backend.py``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import qkit  # noqa: F401 - registers torch.ops.qkit
from emulated import backend as emulated_cuda

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
EMULATED = pytest.mark.skipif(
    not emulated_cuda.requested(), reason="emulated CUDA kernels: run `bash ci/emulate_cuda.sh`"
)

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, CUDA]),
    pytest.param("emu", marks=[pytest.mark.emulated, EMULATED]),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> Iterator[str]:
    """The device to put test tensors on; "emu" gives "cpu" with the CUDA kernels swapped in."""
    if request.param == "emu":
        with emulated_cuda.emulating():
            yield "cpu"
    else:
        yield request.param


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
