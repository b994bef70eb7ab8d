"""Smoke tests of an installed qkit: what cibuildwheel's test-command and ci/package.sh run first.

Quick (seconds): the kernels load, the build record is there, every op runs on CPU
(and on CUDA where torch has it, matching the CPU bit for bit), and the installed
torch was left alone.
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

import pytest
import torch

import qkit
from qkit import _loader, info

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_load_and_record_is_there() -> None:
    assert _loader.load_error() is None, _loader.load_error()
    record = _loader.build_record()
    assert record is not None
    assert record["torch_target"] == "2.10" and record["python_target"] == "3.10"
    assert record["qkit_version"] == qkit.__version__
    assert info.collect()["usable"] is True


def test_installed_copy_is_what_runs() -> None:
    """Under ci/package.sh (QKIT_TEST_INSTALLED=1) qkit must come from the venv, not the source tree."""
    if os.environ.get("QKIT_TEST_INSTALLED") != "1":
        pytest.skip("only when testing an installed wheel/sdist (QKIT_TEST_INSTALLED=1)")
    where = Path(qkit.__file__).resolve()
    assert ROOT / "python" not in where.parents, where
    assert "site-packages" in where.parts, where
    assert Path(qkit._C.__file__).name == "_C.abi3.so"


def test_torch_requirement_is_a_range() -> None:
    """The installed metadata asks for torch >= 2.10, never one exact torch."""
    requires = [r for r in metadata.requires("qkit") or [] if re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] == "torch"]
    assert requires, "qkit must declare its torch requirement"
    for requirement in requires:
        spec = requirement.split(";")[0].replace(" ", "")
        assert ">=2.1" in spec and "==" not in spec and "<" not in spec and "~=" not in spec, requirement


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_every_op_runs(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if device == "cuda" and not (_loader.build_record() or {}).get("cuda_kernels"):
        pytest.skip("this qkit was built without CUDA kernels")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=gen).to(torch.bfloat16)
    on = x.to(device)
    fq = qkit.fake_quantize(on, 64, 4)
    q, params = qkit.quantize(on, 64, 4, symmetric=False)
    back = qkit.dequantize(q, params, bits=4, symmetric=False, dtype=torch.float32)
    y = on.clone()
    qkit.fake_quantize_(y, 64, 8)
    assert fq.dtype == torch.bfloat16 and back.shape == x.shape and q.dtype == torch.int8
    if device == "cuda":
        torch.cuda.synchronize()
        cpu_fq = qkit.fake_quantize(x, 64, 4)
        cpu_q, cpu_params = qkit.quantize(x, 64, 4, symmetric=False)
        assert torch.equal(fq.cpu(), cpu_fq)
        assert torch.equal(q.cpu(), cpu_q) and torch.equal(params.cpu(), cpu_params)
    else:
        # step = range / 2^bits (DeepSpeed's convention): no element is more than one step off.
        error = (back - x.float()).abs().reshape(64, -1).amax(dim=1)
        assert torch.all(error <= params[:, 0] * (1 + 1e-6))
