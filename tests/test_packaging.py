"""Packaging: torch as a range (never a pin), the cibuildwheel configuration, the ci/ scripts
it names, and the sdist's file list against the tracked sources."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")


def _pyproject() -> dict[str, Any]:
    path = ROOT / "pyproject.toml"
    if not path.exists():
        pytest.skip("needs the source tree")
    return tomllib.loads(path.read_text())


def _torch_requirements(requirements: list[str]) -> list[str]:
    return [r for r in requirements if re.match(r"torch\b", r.strip())]


def test_torch_is_a_range_never_a_pin() -> None:
    config = _pyproject()
    for where, requirements in (
        ("project.dependencies", config["project"]["dependencies"]),
        ("build-system.requires", config["build-system"]["requires"]),
    ):
        (torch_req,) = _torch_requirements(requirements)
        spec = torch_req.replace(" ", "")
        assert spec == "torch>=2.10", f"{where}: {torch_req}"
    for extra in config["project"].get("optional-dependencies", {}).values():
        assert _torch_requirements(extra) == []
    assert config["project"]["requires-python"] == ">=3.10"


def test_cibuildwheel_configuration() -> None:
    cibw = _pyproject()["tool"]["cibuildwheel"]
    linux = cibw["linux"]
    assert cibw["build"] == "cp310-manylinux_*"  # one abi3 wheel per arch
    assert set(linux["archs"]) == {"x86_64", "aarch64"}
    assert linux["manylinux-x86_64-image"] == linux["manylinux-aarch64-image"] == "manylinux_2_28"
    # The CUDA toolkit comes from a ci/ script at a pinned version.
    assert "ci/install_cuda.sh" in linux["before-all"]
    assert re.fullmatch(r"\d+\.\d+", linux["environment"]["QKIT_CUDA_VERSION"])
    assert linux["environment"]["QKIT_BUILD_CUDA"] == "1"
    assert "ci/repair_wheel.sh" in linux["repair-wheel-command"]
    assert any("tests/test_smoke.py" in command for command in cibw["test-command"])


def test_repair_excludes_torch_and_cuda_libraries() -> None:
    script = (ROOT / "ci" / "repair_wheel.sh").read_text()
    excluded = re.findall(r"'(lib[^' ]+)'", script)
    for pattern in ("libtorch*.so*", "libc10*.so*", "libcuda*.so*", "libcudart*.so*"):
        assert pattern in excluded
    assert "auditwheel" in script and "AUDITWHEEL_PLAT" in script


def test_cuda_install_script_pins_its_default() -> None:
    script = (ROOT / "ci" / "install_cuda.sh").read_text()
    pinned = re.search(r'QKIT_CUDA_VERSION="\$\{QKIT_CUDA_VERSION:-(\d+\.\d+)\}"', script)
    assert pinned, "ci/install_cuda.sh must pin a default CUDA version"
    cibw = _pyproject()["tool"]["cibuildwheel"]["linux"]["environment"]["QKIT_CUDA_VERSION"]
    assert pinned.group(1) == cibw


def test_ci_scripts_parse() -> None:
    for script in sorted((ROOT / "ci").glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if (ROOT / line).exists()]


@pytest.mark.skipif(importlib.util.find_spec("build") is None, reason="needs the `build` package")
def test_sdist_ships_exactly_the_tracked_sources(tmp_path: Path) -> None:
    """The sdist holds every tracked file of the package, its C++/CUDA sources and tests, and nothing untracked."""
    tracked = _tracked_files()
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    (sdist,) = tmp_path.glob("qkit-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    files = {name for name in names if not any(n.startswith(name + "/") for n in names)}  # drop directories
    generated = {"PKG-INFO", "setup.cfg", "GIT_REVISION"}
    shipped = {f for f in files if f not in generated and not f.startswith("python/qkit.egg-info/")}
    wanted_top = {"README.md", "pyproject.toml", "setup.py", "MANIFEST.in"}
    expected = {f for f in tracked if f.split("/")[0] in ("src", "kernels", "include", "python", "tests")} | wanted_top
    assert shipped == expected
    assert "GIT_REVISION" in files  # so builds from the sdist still know their revision


def test_ci_compiles_against_the_oldest_supported_torch() -> None:
    """.ci/run runs the header check, and the check compiles with the build's own defines and flags."""
    run = (ROOT / ".ci" / "run").read_text()
    assert "bash ci/check_torch_headers.sh" in run
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import header_check
    finally:
        sys.path.remove(str(ROOT / "tests"))
    builder = header_check.load_builder()
    for with_cuda in (False, True):
        command = header_check.compile_command(
            builder, "src/module.cpp", Path("/t/include"), Path("/py/include"), with_cuda=with_cuda
        )
        assert "-fsyntax-only" in command
        assert f"-DTORCH_TARGET_VERSION={builder.torch_target_macro()}" in command
        assert "-DPy_LIMITED_API=0x030A0000" in command
        assert ("-DQKIT_WITH_CUDA=1" in command) == with_cuda
        for flag in builder.extension_flags(with_cuda=with_cuda).cxx:
            assert flag in command
    assert header_check.load_builder().CPU_SOURCES == builder.CPU_SOURCES


@pytest.mark.parametrize(
    "wheel,sym_tag,external,failures",
    [
        ("qkit-0.1.0-cp310-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl", "manylinux_2_24_x86_64", {}, 0),
        ("qkit-0.1.0-cp310-abi3-manylinux_2_28_x86_64.whl", "manylinux_2_28_x86_64", {"libc10.so": None}, 0),
        # Linked against this machine's glibc 2.36: auditwheel says 2_34, and so does the name.
        ("qkit-0.1.0-cp310-abi3-manylinux_2_34_x86_64.whl", "manylinux_2_34_x86_64", {}, 2),
        # A library that is neither torch's nor in the policy (e.g. a vendored libcudart).
        ("qkit-0.1.0-cp310-abi3-manylinux_2_28_x86_64.whl", "manylinux_2_28_x86_64", {"libcudart.so.13": None}, 1),
    ],
)
def test_auditwheel_check(wheel: str, sym_tag: str, external: dict[str, None], failures: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import auditwheel_check
    finally:
        sys.path.remove(str(ROOT / "tests"))
    shown = {"sym_tag": sym_tag, "external_libs": external}
    assert len(auditwheel_check.problems(Path(wheel), "manylinux_2_28_x86_64", shown)) == failures


def test_release_wheel_is_held_to_manylinux_2_28() -> None:
    build = (ROOT / "ci" / "build_wheel.sh").read_text()
    assert "QKIT_MANYLINUX:-2_28" in build and "ci/glibc_stubs.sh" in build and "AUDITWHEEL_PLAT" in build
    package = (ROOT / "ci" / "package.sh").read_text()
    assert "tests/auditwheel_check.py" in package and "manylinux_2_28_" in package
