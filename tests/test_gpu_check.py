"""ci/gpu_check.sh without a GPU: its dry run plans every step with the right command,
keeps to its time budget (a simulated clock), fails when a required step fails, and
writes summary.json; its helpers (the CUDA-case selection, the sanitizer workload) work."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from qkit import ops
from qkit.bench import cli as bench

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "ci" / "gpu_check.sh"
STEPS = ["wheel", "install", "info", "tests", "memcheck", "racecheck", "bench_core", "bench_more"]
WHEEL_NAME = "qkit-0.1.0-cp310-abi3-manylinux_2_28_x86_64.whl"

pytestmark = [
    pytest.mark.skipif(not SCRIPT.is_file(), reason="needs the source tree's ci/ (not shipped in the sdist)"),
    pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout"),
]


def make_wheel(folder: Path, cuda_kernels: bool = True) -> Path:
    """A stand-in wheel: the dry run reads only its name and build record."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / WHEEL_NAME
    record = {"qkit_version": "0.1.0", "cuda_kernels": cuda_kernels, "cuda_arch_list": "9.0" if cuda_kernels else None}
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("qkit/_build_info.json", json.dumps(record))
    return wheel


def dry_run(
    tmp_path: Path, cuda_kernels: bool = True, flag: str = "--dry-run", **env: str
) -> tuple[subprocess.CompletedProcess, dict]:
    wheels = tmp_path / "wheelhouse"
    if not wheels.exists():
        make_wheel(wheels, cuda_kernels)
    out = tmp_path / "out"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("QKIT_GPU_CHECK_")}
    environ |= {"QKIT_WHEEL_DIR": str(wheels), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    environ |= {"QKIT_GPU_CHECK_PYTEST_WORKERS": "0", **env}  # not "auto": the same plan with or without xdist
    command = ["bash", str(SCRIPT), *([flag] if flag else []), str(out)]
    done = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=120)
    summary = json.loads((out / "summary.json").read_text())
    return done, summary


def steps_by_name(summary: dict) -> dict[str, dict]:
    return {step["name"]: step for step in summary["steps"]}


def test_dry_run_plans_every_step(tmp_path):
    done, summary = dry_run(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "out"
    assert summary["dry_run"] and summary["ok"] and summary["exit_status"] == 0
    assert summary["budget_s"] == 480 and summary["wheel"] == str(tmp_path / "wheelhouse" / WHEEL_NAME)
    assert [step["name"] for step in summary["steps"]] == STEPS
    steps = steps_by_name(summary)
    assert all(step["status"] == "ok" for step in summary["steps"]), summary["steps"]
    assert [name for name in STEPS if steps[name]["required"]] == STEPS[:6]
    # Every step has a timeout, within the budget; every log was written.
    assert all(0 < step["timeout_s"] <= summary["budget_s"] for step in summary["steps"])
    for name in STEPS:
        assert steps[name]["log"] == f"logs/{name}.log" and (out / "logs" / f"{name}.log").is_file()
    # The wheel step ran for real (it reads the wheel's build record); the others are planned.
    assert "cuda_kernels=True" in (out / "logs" / "wheel.log").read_text()
    for name in STEPS[1:]:
        assert "[dry-run] would run: " in (out / "logs" / f"{name}.log").read_text()
        assert f"[dry-run] would run: {steps[name]['command']}" in done.stdout

    commands = {name: shlex.split(steps[name]["command"]) for name in STEPS}
    python = sys.executable  # the machine's Python (PYTHON), with the wheel in SITE first on its path
    site = commands["install"][3]
    assert commands["install"][:5] == ["bash", str(SCRIPT), "__install", site, summary["wheel"]]
    assert site.endswith("/site-packages") and not site.startswith(str(ROOT))
    assert commands["info"][:5] == ["bash", str(SCRIPT), "__info", site, str(out)]

    tests = commands["tests"]
    assert tests[tests.index(python) :][:3] == [python, "-m", "pytest"]
    assert "QKIT_TEST_INSTALLED=1" in tests and f"PYTHONPATH={site}:{ROOT / 'ci'}" in tests
    assert "qkit_gpu_select" in tests and f"--junitxml={out / 'tests.xml'}" in tests
    assert tests[-1] == str(ROOT / "tests") and "-n" not in tests

    for tool, extra in (("memcheck", ["--device", "cuda"]), ("racecheck", ["--device", "cuda", "--quick"])):
        words = commands[tool]
        at = words.index("--tool")
        assert words[at - 1].endswith("compute-sanitizer") and words[at + 1] == tool
        assert words[words.index("--error-exitcode") + 1] == "1"
        assert words[words.index("--kernel-name") + 1] == "kns=qkit"
        assert words[-len(extra) - 2 :] == [python, str(ROOT / "ci" / "gpu_sanitize.py"), *extra]
        assert f"PYTHONPATH={site}" in words[:at]
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in commands["memcheck"]

    timed_ops = set()
    for name in ("bench_core", "bench_more"):
        words = commands[name]
        at = words.index("bench")
        assert words[at - 3 : at] == [python, "-m", "qkit"] and f"PYTHONPATH={site}" in words[:at]
        args = bench.build_parser().parse_args(words[at + 1 :])  # qkit bench accepts every planned flag
        assert args.device == "cuda" and args.no_jit and args.json == str(out / f"{name}.json")
        assert min(bench._parse_sizes(args.sizes)) >= 64 * 2**20
        timed_ops |= set(args.ops.split(","))
    assert {"fake_quantize", "quantize8", "quantize4", "dequantize8"} <= timed_ops


def test_time_budget_skips_an_optional_step(tmp_path):
    """A simulated clock: the slow steps leave too little for bench_core, which is skipped;
    the run still passes (only required steps count)."""
    done, summary = dry_run(
        tmp_path, QKIT_GPU_CHECK_BUDGET_S="300", QKIT_GPU_CHECK_SIMULATE="tests=150,memcheck=60,racecheck=25"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    steps = steps_by_name(summary)
    assert steps["tests"]["seconds"] >= 150 and steps["tests"]["timeout_s"] <= 300 - 10 - 60
    assert steps["bench_core"]["status"] == "skipped" and steps["bench_core"]["reason"].startswith("time:")
    assert steps["bench_more"]["status"] == "ok"  # shorter: it still fits
    assert summary["ok"] and summary["elapsed_s"] <= 300
    used = sum(step["seconds"] for step in summary["steps"])
    assert used <= 300


@pytest.mark.parametrize(
    ("simulate", "step", "status"),
    [("tests=9999", "tests", "timeout"), ("memcheck=fail", "memcheck", "failed")],
)
def test_a_failed_required_step_fails_the_run(tmp_path, simulate, step, status):
    done, summary = dry_run(tmp_path, QKIT_GPU_CHECK_SIMULATE=simulate)
    assert done.returncode == 1, done.stdout + done.stderr
    assert not summary["ok"] and summary["exit_status"] == 1
    steps = steps_by_name(summary)
    assert steps[step]["status"] == status
    assert steps["racecheck"]["status"] == "ok"  # the later steps still run
    if status == "timeout":
        assert steps[step]["timeout_s"] == 240 <= steps[step]["seconds"]


@pytest.mark.parametrize("problem", ["no CUDA kernels", "no wheel"])
def test_a_wheel_problem_stops_the_run(tmp_path, problem):
    if problem == "no wheel":
        (tmp_path / "wheelhouse").mkdir()
    done, summary = dry_run(tmp_path, cuda_kernels=False)
    assert done.returncode == 1
    words = "built without CUDA kernels" if problem == "no CUDA kernels" else "QKIT_BUILD_CUDA=1 bash ci/build_wheel.sh"
    assert words in done.stdout + done.stderr
    steps = steps_by_name(summary)
    assert steps["wheel"]["status"] == "failed"
    assert all(steps[name]["status"] == "skipped" for name in STEPS[1:])


def test_pack_leaves_few_files(tmp_path):
    """--pack: what the device tool brings back (at most 8 files) holds everything."""
    done, summary = dry_run(  # the environment's spellings of --dry-run and --pack
        tmp_path, flag="", QKIT_GPU_CHECK_DRY_RUN="1", QKIT_GPU_CHECK_PACK="1", QKIT_GPU_CHECK_PYTEST_WORKERS="4"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tests = shlex.split(steps_by_name(summary)["tests"]["command"])
    assert tests[tests.index("-n") + 1] == "4"  # pytest-xdist workers
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "logs.tar.gz", "summary.json"]
    with tarfile.open(out / "logs.tar.gz") as archive:
        names = set(archive.getnames())
    assert {"steps.tsv", *(f"logs/{name}.log" for name in STEPS)} <= names
    assert summary["ok"] and summary["dry_run"]


def test_bad_usage(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage" in done.stderr


def test_gpu_select_keeps_only_the_cuda_cases(tmp_path):
    """The three ways the suite marks a CUDA case, and the cases it must drop (CPU and
    emulated device values, unmarked tests, GPU words inside strings)."""
    (tmp_path / "test_cases.py").write_text(
        "import pytest\n"
        "CUDA = pytest.mark.cuda\n"
        "@pytest.fixture(params=['cpu', pytest.param('cuda', marks=CUDA), 'cuda_emu'])\n"
        "def device(request):\n"
        "    return request.param\n"
        "def test_kernel(device):\n"
        "    pass\n"
        "@pytest.mark.cuda\n"
        "def test_marked():\n"
        "    pass\n"
        "@pytest.mark.parametrize('mode', ['eager', 'fake'])\n"
        "def test_gated(mode):\n"
        "    if mode == 'eager' and not torch.cuda.is_available():\n"
        "        pytest.skip('needs a GPU')\n"
        "def test_cpu_only():\n"
        "    pass\n"
        "def test_only_a_string():\n"
        "    assert 'torch.cuda.is_available()' != 'device=\"cuda\"'\n"
    )
    listing = tmp_path / "kept.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "ci"), "QKIT_GPU_SELECT_LIST": str(listing)}
    args = ["--collect-only", "-q", "-p", "no:cacheprovider", "-p", "qkit_gpu_select", "-o", "markers=cuda: a GPU"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *args, "test_cases.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    kept = listing.read_text().split()
    assert kept == [
        "test_cases.py::test_kernel[cuda]",
        "test_cases.py::test_marked",
        "test_cases.py::test_gated[eager]",
        "test_cases.py::test_gated[fake]",
    ]
    assert re.search(r"4/8 tests collected \(4 deselected\)", done.stdout), done.stdout


def test_sanitizer_workload_calls_every_op(tmp_path):
    """ci/gpu_sanitize.py runs on the CPU (so a call that no longer fits an op's schema
    shows up here, not on a lent GPU) and calls every op and overload qkit defines."""
    script = ROOT / "ci" / "gpu_sanitize.py"
    called = set(re.findall(r"\bops\.(\w+(?:\.out)?)\(", script.read_text()))
    assert set(ops.DEFINED_OPS) <= called, f"not called by gpu_sanitize.py: {set(ops.DEFINED_OPS) - called}"
    done = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--quick"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    calls = re.search(r"gpu_sanitize\.py: (\d+) calls on cpu, 0 failed", done.stdout)
    assert calls and int(calls.group(1)) > 100, done.stdout


def test_summary_reads_what_the_gpu_steps_write(tmp_path):
    """The parsers of ci/gpu_check_helper.py on outputs shaped like the real ones: junit XML,
    compute-sanitizer's summaries, gpu_sanitize.py's verdict, a qkit bench JSON."""
    spec = importlib.util.spec_from_file_location("gpu_check_helper", ROOT / "ci" / "gpu_check_helper.py")
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "memcheck.log").write_text(
        "========= COMPUTE-SANITIZER\nFAIL quantize g=3: differs from the CPU\n"
        "gpu_sanitize.py: 161 calls on cuda, 1 failed (9.0 s)\n========= ERROR SUMMARY: 2 errors\n"
    )
    (tmp_path / "logs" / "racecheck.log").write_text(
        "gpu_sanitize.py: 156 calls on cuda, 0 failed (3.0 s)\n"
        "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)\n"
    )
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" skipped="1" time="2.5">'
        '<testcase classname="tests.test_core_ops" name="test_a[cuda]"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_core_ops" name="test_b[cuda]"/>'
        "</testsuite></testsuites>"
    )
    row = {"op": "fake_quantize", "dtype": "float32", "group": "128", "numel": 2**26, "copy_gbps": 4000.0}
    row |= {"gbps": {"compile": 2000.0, "qkit": 3000.0, "qkit_out": 3400.0}, "skipped": {"deepspeed": "not installed"}}
    env = {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130", "baselines": {"deepspeed": None}}
    (tmp_path / "bench_core.json").write_text(json.dumps({"environment": env, "rows": [row]}))
    (tmp_path / "steps.tsv").write_text("tests\t1\tfailed\t1\t30\t240\tlogs/tests.log\tpytest\texit status 1\n")
    args = ["summary", str(tmp_path), "--steps", str(tmp_path / "steps.tsv"), "--budget", "480"]
    assert helper.main([*args, "--elapsed", "100", "--exit-status", "1"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert not summary["ok"] and summary["steps"][0]["status"] == "failed" and summary["steps"][0]["rc"] == 1
    tests = summary["tests"]
    assert (tests["tests"], tests["failures"], tests["skipped"], tests["passed"]) == (4, 1, 1, 2)
    assert tests["failing"] == ["tests.test_core_ops::test_a[cuda]"]
    memcheck, racecheck = summary["sanitizers"]["memcheck"], summary["sanitizers"]["racecheck"]
    assert memcheck["errors"] == 2 and memcheck["calls_failed"] == 1
    assert memcheck["call_failures"] == ["quantize g=3: differs from the CPU"]
    assert (racecheck["hazards"], racecheck["errors"], racecheck["calls"]) == (1, 1, 156)
    (bench_row,) = summary["bench"]["bench_core"]["rows"]
    assert bench_row["qkit_share_of_copy"] == 0.85 and bench_row["not_timed"] == {"deepspeed": "not installed"}
    assert summary["bench"]["bench_core"]["gpu"] == "NVIDIA H200"
