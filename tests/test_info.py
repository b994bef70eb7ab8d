"""``python -m qkit.info``: the report, its JSON form, the verdict and the exit status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import qkit
from qkit import info

ROOT = Path(__file__).parents[1]
CORE_OPS = ("qkit::quantize", "qkit::dequantize", "qkit::fake_quantize", "qkit::fake_quantize_")
KEYS = {"qkit_version", "build", "runtime", "loaded", "load_error", "kernels", "usable", "verdict", "advice"}

BUILT: dict[str, Any] = {
    "qkit_version": "0.1.0",
    "torch_target": "2.10",
    "python_target": "3.10",
    "built_with_torch": "2.13.0+cpu",
    "platform": "linux",
    "cuda_kernels": True,
    "rocm_kernels": False,
    "cuda_version": "13.0",
    "cuda_arch_list": "8.0;8.6;9.0;10.0;12.0+PTX",
    "rocm_arch_list": None,
    "cuda_runtime": "static",
    "machine": "x86_64",
    "build_libc": "glibc 2.28",
    "git_revision": "0123456789abcdef0123456789abcdef01234567",
    "built_at": "2026-01-01T00:00:00+00:00",
}
RUNNING: dict[str, Any] = {
    "python": "3.11.7",
    "platform": "linux",
    "machine": "x86_64",
    "torch": "2.13.0+cu130",
    "torch_cuda": "13.0",
    "torch_hip": None,
    "cuda_available": True,
    "gpus": ["GPU"],
    "gpu_capabilities": ["9.0"],
}
KERNELS = {name: ["CPU", "CUDA", "Meta"] for name in CORE_OPS}


def test_collect_reports_loaded_cpu_kernels() -> None:
    report = info.collect()
    assert set(report) >= KEYS
    assert report["qkit_version"] == qkit.__version__
    assert report["loaded"] is True and report["usable"] is True
    assert report["load_error"] is None
    assert report["runtime"]["torch"] == torch.__version__
    for name in CORE_OPS:
        assert "CPU" in report["kernels"][name], name
        assert "Meta" in report["kernels"][name], name
    assert report["verdict"].startswith("usable")
    assert isinstance(report["advice"], list)


def test_main_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert info.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= KEYS
    assert report["usable"] is True


def test_main_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert info.main([]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    assert "verdict: usable" in out
    assert "qkit::quantize" in out


def test_main_returns_1_when_kernels_did_not_load(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    error = qkit.QkitLoadError("qkit._C could not be loaded: test\nwhat to do: rebuild")
    monkeypatch.setattr(qkit._loader, "load_error", lambda: error)
    report = info.collect()
    assert report["loaded"] is False and report["usable"] is False
    assert report["load_error"] == str(error)
    # Without _C the CPU/CUDA slots hold only the raising stubs: not kernels.
    assert all(not {"CPU", "CUDA"} & set(keys) for keys in report["kernels"].values())
    assert info.main(["--json"]) == 1
    assert json.loads(capsys.readouterr().out)["load_error"] == str(error)
    assert info.main([]) == 1
    out = capsys.readouterr().out
    assert "NOT USABLE" in out and "what to do: rebuild" in out


def test_module_runs_as_script() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qkit.info"], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert torch.__version__ in done.stdout


def test_script_exits_1_without_compiled_module() -> None:
    script = "import sys; sys.modules['qkit._C'] = None; from qkit.info import main; sys.exit(main([]))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "could not be loaded" in done.stdout


# ---------------------------------------------------------------- the verdict logic


def test_advise_all_fits() -> None:
    assert info.advise(BUILT, RUNNING, True, KERNELS, [(9, 0)]) == []


def test_advise_cuda_torch_without_cuda_kernels() -> None:
    built = {**BUILT, "cuda_kernels": False, "cuda_version": None}
    kernels = {name: ["CPU", "Meta"] for name in CORE_OPS}
    (advice,) = info.advise(built, RUNNING, True, kernels, [(9, 0)])
    assert "without CUDA kernels" in advice and "QKIT_BUILD_CUDA=1" in advice


def test_advise_rocm_torch_without_rocm_kernels() -> None:
    running = {**RUNNING, "torch_cuda": None, "torch_hip": "6.4"}
    (advice,) = info.advise({**BUILT, "cuda_kernels": False}, running, True, KERNELS)
    assert "ROCm" in advice


def test_advise_torch_older_than_target() -> None:
    advice = info.advise({**BUILT, "torch_target": "2.14"}, RUNNING, False, {})
    assert any("upgrade torch to >= 2.14" in item for item in advice)


def test_advise_uncovered_gpu_and_newer_cuda_runtime() -> None:
    built = {**BUILT, "cuda_arch_list": "9.0", "cuda_version": "13.0"}
    running = {**RUNNING, "torch_cuda": "12.8"}
    advice = info.advise(built, running, True, KERNELS, [(8, 6)])
    assert any("TORCH_CUDA_ARCH_LIST='8.6'" in item for item in advice)
    assert any("driver must support CUDA 13.0" in item for item in advice)


def test_advise_missing_build_record_and_stale_module() -> None:
    kernels = {**KERNELS, "qkit::new_op": ["Meta"]}
    advice = info.advise(None, RUNNING, True, kernels)
    assert any("no build record" in item for item in advice)
    assert any("qkit::new_op" in item for item in advice)


@pytest.mark.parametrize(
    "capability,arch_list,expected",
    [
        ((8, 0), "8.0;8.6;9.0;10.0;12.0+PTX", True),
        ((8, 9), "8.0;8.6;9.0;10.0;12.0+PTX", True),  # sm_86 cubin runs on 8.9
        ((12, 1), "8.0;8.6;9.0;10.0;12.0+PTX", True),
        ((13, 0), "8.0;8.6;9.0;10.0;12.0+PTX", True),  # PTX of 12.0
        ((7, 5), "8.0;8.6;9.0;10.0;12.0+PTX", False),
        ((9, 0), "8.0 8.6", False),
        ((10, 3), "9.0a;10.0a", False),  # arch-specific targets run on that chip only
        ((9, 0), "9.0a", True),
        ((10, 3), "10.0f", True),
        ((8, 6), "Ampere", None),
    ],
)
def test_arch_covers(capability: tuple[int, int], arch_list: str, expected: bool | None) -> None:
    assert info.arch_covers(capability, arch_list) is expected


# ---------------------------------------------------------------- GPUs against the compiled archs


def test_gpu_report_and_its_lines() -> None:
    running = {
        **RUNNING,
        "gpus": ["NVIDIA H100", "Tesla T4", "NVIDIA B300", "future GPU"],
        "gpu_capabilities": ["9.0", "7.5", "10.3", "13.0"],
    }
    gpus = info.gpu_report(BUILT, running)
    assert [g["capability"] for g in gpus] == ["9.0", "7.5", "10.3", "13.0"]
    assert gpus[0]["runs"] == "the sm_90 cubin"
    assert gpus[1]["runs"] is None
    assert gpus[2]["runs"] == "the sm_100 cubin"
    assert gpus[3]["runs"].startswith("the compute_120 PTX")
    report = {**info.collect(), "build": BUILT, "runtime": running, "gpus": gpus}
    text = info.format_report(report)
    assert "NVIDIA H100, compute capability 9.0 -> the sm_90 cubin" in text
    assert "Tesla T4, compute capability 7.5 -> NOTHING: no compiled arch covers it" in text
    assert "git revision" in text and "CUDA runtime       static" in text
    cpu_only = info.gpu_report({**BUILT, "cuda_kernels": False}, running)
    assert all(g["runs"] is None for g in cpu_only)


def test_runtime_lists_capabilities() -> None:
    running = qkit._loader.runtime_record()
    assert len(running["gpu_capabilities"]) == len(running["gpus"])
    report = info.collect()
    assert report["skipped"] is False and len(report["gpus"]) == len(running["gpus"])


# ---------------------------------------------------------------- one line: what to do


def test_old_torch_gets_one_line_with_the_command() -> None:
    running = {**RUNNING, "torch": "2.9.1+cu128"}
    report_verdict = info._verdict(False, running, {}, [], fit=qkit._loader.fit_problems(BUILT, running))
    assert "\n" not in report_verdict
    assert report_verdict.startswith("NOT USABLE: torch 2.9.1+cu128 is older than this build's target")
    assert "pip install --upgrade 'torch>=2.10'" in report_verdict
    # Should _C load anyway, the verdict still says so, in the same line.
    loaded = info._verdict(True, running, {}, ["x"], fit=qkit._loader.fit_problems(BUILT, running))
    assert loaded.startswith("usable on CPU, but UNSUPPORTED: torch 2.9.1+cu128 is older") and "\n" not in loaded


@pytest.mark.parametrize(
    "libc,tag,problem",
    [
        ("glibc 2.27", "cp310-abi3-manylinux_2_28_x86_64", True),  # Ubuntu 18.04 and the 2_28 wheel
        ("glibc 2.28", "cp310-abi3-manylinux_2_28_x86_64", False),  # RHEL/Rocky 8
        ("glibc 2.31", "cp310-abi3-manylinux_2_34_x86_64", True),  # Ubuntu 20.04 and a wheel built on Debian 12
        ("glibc 2.17", "cp310-abi3-manylinux2014_x86_64", False),
        ("glibc 2.12", "cp310-abi3-manylinux2014_x86_64", True),
        ("glibc 2.27", "cp310-abi3-linux_x86_64", False),  # a local build: no tag to hold it to
        ("", "cp310-abi3-manylinux_2_28_x86_64", False),  # musl or unknown: say nothing
    ],
)
def test_old_glibc_gets_one_line(libc: str, tag: str, problem: bool) -> None:
    running = {**RUNNING, "libc": libc or None, "wheel_tags": [tag]}
    for built in (BUILT, None):
        fit = qkit._loader.fit_problems(built, running)
        assert bool(fit) == problem
        if problem:
            (line,) = fit
            have = libc.split()[1]
            assert "\n" not in line and f"glibc {have} is older than the glibc" in line and tag in line
            assert "pip install --no-binary qkit --no-build-isolation qkit" in line
            assert info._verdict(False, running, {}, [], fit=fit) == f"NOT USABLE: {line}"
            assert line in info.advise(built, running, False, {})


def test_wheel_tags_only_from_this_copys_metadata() -> None:
    # Run from the source tree, the installed distribution (if any) is another copy of qkit.
    tags = qkit._loader.wheel_tags()
    if (ROOT / "python" / "qkit" / "__init__.py").resolve() == Path(qkit.__file__).resolve():
        assert tags == []
    else:
        assert tags and all(tag.startswith("cp310-abi3-") for tag in tags)
