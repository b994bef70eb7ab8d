"""A missing, broken or mismatched ``qkit._C`` never breaks ``import qkit``: the first kernel
call raises the specific explanation, and ``QKIT_SKIP_EXTENSION=1`` skips loading on purpose."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qkit
from qkit import _loader

ROOT = Path(__file__).resolve().parents[1]
RECORD = {
    "torch_target": "2.10",
    "python_target": "3.10",
    "built_with_torch": "2.13.0+cpu",
    "platform": sys.platform,
    "machine": __import__("platform").machine(),
    "cuda_kernels": True,
    "cuda_version": "13.0",
    "cuda_arch_list": "9.0",
}

# Imports qkit, checks the import worked, then calls a kernel and prints the error it raises.
PROBE = """
import sys
import torch
import qkit
from qkit import info
print("IMPORTED", qkit.__file__)
try:
    qkit.fake_quantize(torch.randn(8, 4), 2, 8)
except qkit.QkitLoadError as error:
    print("LOAD ERROR:", error)
else:
    print("KERNELS RAN")
sys.stdout.flush()
sys.exit(info.main([]) + 10)
"""


def _run(env_extra: dict[str, str], pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **env_extra}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=pythonpath or ROOT, timeout=300
    )


def _package_copy(tmp_path: Path, compiled: bytes | Path | None) -> Path:
    """A copy of the qkit package (Python files and build record) with ``_C`` replaced by ``compiled``."""
    source = Path(qkit.__file__).parent
    target = tmp_path / "site" / "qkit"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    if isinstance(compiled, Path):
        shutil.copy(compiled, target / "_C.abi3.so")
    elif compiled is not None:
        (target / "_C.abi3.so").write_bytes(compiled)
    return tmp_path / "site"


def test_skip_extension_on_purpose() -> None:
    done = _run({"QKIT_SKIP_EXTENSION": "1"})
    assert "IMPORTED" in done.stdout, done.stderr
    assert "LOAD ERROR:" in done.stdout and "QKIT_SKIP_EXTENSION=1 is set (on purpose)" in done.stdout
    assert "NOT LOADED on purpose" in done.stdout
    assert done.returncode == 11  # qkit.info exits 1: the kernels are not usable
    assert (
        "qkit._C"
        not in subprocess.run(
            [sys.executable, "-c", "import sys, qkit; print(sorted(sys.modules))"],
            capture_output=True,
            text=True,
            env={**os.environ, "QKIT_SKIP_EXTENSION": "1"},
            check=True,
        ).stdout
    )


@pytest.mark.parametrize("value", ["0", "", "false"])
def test_skip_extension_off_values(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("QKIT_SKIP_EXTENSION", value)
    assert _loader.skip_requested() is False


def test_damaged_extension(tmp_path: Path) -> None:
    """A _C that is not a loadable library: import works, the first call explains."""
    done = _run({}, _package_copy(tmp_path, b"not an ELF file\n" * 64))
    assert "IMPORTED" in done.stdout and str(tmp_path) in done.stdout, done.stderr
    assert "LOAD ERROR:" in done.stdout and "could not be loaded" in done.stdout
    assert "is not a library for this machine" in done.stdout
    assert "NOT USABLE" in done.stdout and done.returncode == 11


def test_missing_extension(tmp_path: Path) -> None:
    done = _run({}, _package_copy(tmp_path, None))
    assert "IMPORTED" in done.stdout, done.stderr
    assert "_C is not there" in done.stdout and done.returncode == 11


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_extension_with_an_undefined_symbol(tmp_path: Path) -> None:
    """What a torch-internal (non-stable) symbol does after a torch upgrade: 'undefined symbol'."""
    source = tmp_path / "bad.c"
    source.write_text(
        "extern void _ZN3c106detail19qkit_gone_in_torch_Ev(void);\n"
        "void* PyInit__C(void) { _ZN3c106detail19qkit_gone_in_torch_Ev(); return 0; }\n"
    )
    library = tmp_path / "bad.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    done = _run({}, _package_copy(tmp_path, library))
    assert "IMPORTED" in done.stdout, done.stderr
    assert "undefined symbol" in done.stdout
    assert "not built against the stable ABI" in done.stdout and done.returncode == 11


@pytest.mark.parametrize(
    "error,expected",
    [
        (ImportError("/x/_C.abi3.so: undefined symbol: _ZN3c1010TensorImpl"), "not built against the stable ABI"),
        (ImportError("/lib/libc.so.6: version `GLIBC_2.34' not found (required by _C.abi3.so)"), "needs GLIBC_2.34"),
        (ImportError("libcudart.so.12: cannot open shared object file: No such file"), "statically"),
        (ImportError("libgomp.so.1: cannot open shared object file: No such file"), "libgomp.so.1 is missing"),
        (ModuleNotFoundError("No module named 'qkit._C'"), "_C is not there"),
        (ImportError("_C.abi3.so: wrong ELF class: ELFCLASS32"), "not a library for this machine"),
        (RuntimeError("something else"), "reinstall qkit"),
    ],
)
def test_each_failure_gets_its_own_advice(error: BaseException, expected: str) -> None:
    assert expected in _loader._hint(error, RECORD)


def test_advice_for_old_torch_and_other_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    error = ImportError("undefined symbol: aoti_torch_new_thing")
    assert "upgrade torch to >= 2.99" in _loader._hint(error, {**RECORD, "torch_target": "2.99"})
    assert "install the wheel for" in _loader._hint(error, {**RECORD, "machine": "riscv64"})
    assert torch.__version__ in _loader._diagnose(error)
