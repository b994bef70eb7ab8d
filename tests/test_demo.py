"""``qkit demo``: a short end-to-end run, its output, and the message without the optional deps."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qkit
from qkit import demo
from qkit.__main__ import main as qkit_main

HAVE_DEPS = not demo.missing_deps()
needs_deps = pytest.mark.skipif(not HAVE_DEPS, reason='needs the demo extra: pip install "qkit[demo]"')


@needs_deps
def test_short_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    assert demo.main(["--steps", "40", "--out", str(tmp_path), "--seed", "1"]) == 0
    assert torch.get_num_threads() == threads  # restored
    out = capsys.readouterr().out
    for line in ("float32", "3-bit PTQ", "MoQ 8 -> 3 bits (eigenvalue)", "test accuracy", "MoQ reached", "plot:"):
        assert line in out
    plot = tmp_path / "moq_demo.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(plot.resolve()) in out


@needs_deps
def test_run_demo_results(tmp_path: Path) -> None:
    result = demo.run_demo(30, 6, 4, torch.device("cpu"), 0, None, quiet=True)
    assert all(0.0 <= acc <= 1.0 for acc in (result.fp32, result.ptq, result.moq))
    assert result.plot is None


@needs_deps
def test_console_script_dispatches_to_the_demo(tmp_path: Path) -> None:
    assert qkit_main(["demo", "--steps", "20", "--quiet", "--no-plot"]) == 0


def test_store_weights_uses_real_int4_storage() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    stored = demo.store_weights(model, 4)
    w = model[0].weight.detach()
    q, params = qkit.quantize(w, 1, 4, True)
    assert torch.equal(stored[0].weight.detach(), qkit.dequantize(q, params, 1, 4, True, torch.float32))
    assert torch.equal(stored[0].bias, model[0].bias)  # 1-D parameters stay float
    assert torch.equal(demo.store_weights(model, 3)[1].weight.detach(), qkit.fake_quantize(model[1].weight, 1, 3))


def test_without_the_optional_deps_it_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    assert demo.main(["--steps", "10"]) != 0
    err = capsys.readouterr().err
    assert "scikit-learn" in err
    assert 'pip install "qkit[demo]"' in err and "pip install scikit-learn matplotlib tqdm" in err


@pytest.mark.parametrize("argv", [["--target-bits", "1"], ["--target-bits", "9"], ["--steps", "0"]])
def test_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        demo.main(argv)
    assert info.value.code == 2


def test_module_entry_point_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "qkit.demo", "--help"], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    for flag in ("--steps", "--target-bits", "--device", "--seed", "--out"):
        assert flag in out
