"""The Python half of ci/gpu_check.sh (standard library only: it runs before qkit is installed).

python ci/gpu_check_helper.py wheel WHEEL      check the wheel's name and build record
python ci/gpu_check_helper.py summary OUTDIR --steps STEPS.tsv ...   write OUTDIR/summary.json
python ci/gpu_check_helper.py report SUMMARY   print a summary.json briefly
PYTHONPATH=SITE python ci/gpu_check_helper.py installed SITE   qkit is imported from SITE
PYTHONPATH=SITE python ci/gpu_check_helper.py gpu    torch sees a GPU and qkit has CUDA kernels
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Any

WHEEL_NAME = re.compile(r"^qkit-[^-]+-cp310-abi3-[a-z0-9_.]+\.whl$")
STEP_FIELDS = ("name", "required", "status", "rc", "seconds", "timeout_s", "log", "command", "reason")


# ---------------------------------------------------------------- wheel


def check_wheel(path: Path) -> list[str]:
    """What is wrong with ``path`` as the wheel to test on a GPU (empty: nothing)."""
    if not path.is_file():
        return [
            f"no wheel at {path}: build one with CUDA kernels here (QKIT_BUILD_CUDA=1 bash ci/build_wheel.sh) "
            "and carry it (docs/gpu_check.md), or set QKIT_WHEEL / QKIT_WHEEL_DIR"
        ]
    problems = []
    if not WHEEL_NAME.match(path.name):
        problems.append(f"{path.name} is not a qkit cp310-abi3 wheel")
    try:
        with zipfile.ZipFile(path) as wheel:
            record = json.loads(wheel.read("qkit/_build_info.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as error:
        return [*problems, f"{path.name}: no readable qkit/_build_info.json ({type(error).__name__}: {error})"]
    shown = ("qkit_version", "built_with_torch", "cuda_kernels", "cuda_version", "cuda_arch_list", "git_revision")
    print("build record: " + ", ".join(f"{key}={record.get(key)}" for key in shown))
    if not record.get("cuda_kernels"):
        problems.append(f"{path.name} was built without CUDA kernels: rebuild with QKIT_BUILD_CUDA=1")
    return problems


# ---------------------------------------------------------------- the installed package (venv's Python)


def check_installed(site: Path) -> list[str]:
    """qkit must come from ``site`` (where the wheel was installed), not from a source tree
    or the machine's site-packages."""
    import qkit

    where = Path(qkit.__file__).resolve()
    print(f"qkit {qkit.__version__} from {where}")
    return [] if where.is_relative_to(site.resolve()) else [f"qkit comes from {where}, not from {site}"]


def check_gpu() -> list[str]:
    """torch sees a CUDA device and the installed qkit has CUDA kernels for it."""
    import torch

    from qkit import _loader

    if not torch.cuda.is_available():
        return [f"torch {torch.__version__} sees no CUDA device"]
    record = _loader.build_record() or {}
    props = torch.cuda.get_device_properties(0)
    archs = record.get("cuda_arch_list")
    print(f"GPU {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB; qkit archs {archs}")
    return [] if record.get("cuda_kernels") else ["the installed qkit has no CUDA kernels"]


# ---------------------------------------------------------------- summary


def read_steps(path: Path) -> list[dict[str, Any]]:
    steps = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        values = line.split("\t")
        step: dict[str, Any] = dict(zip(STEP_FIELDS, values, strict=False))
        step["required"] = step.get("required") == "1"
        for key in ("rc", "seconds", "timeout_s"):
            text = step.get(key, "")
            step[key] = int(text) if text.lstrip("-").isdigit() else None
        steps.append(step)
    return steps


def junit_counts(path: Path) -> dict[str, Any] | None:
    """Totals and the first failing cases of a pytest junit XML file."""
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        return {"error": f"unreadable junit XML: {error}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts: dict[str, Any] = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors")}
    counts["skipped"] = sum(int(s.get("skipped", 0)) for s in suites)
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["seconds"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    failing = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    counts["failing"] = failing[:50]
    return counts


def sanitizer_counts(path: Path) -> dict[str, Any] | None:
    """compute-sanitizer's summary line and gpu_sanitize.py's own verdict, from a step log."""
    if not path.is_file():
        return None
    text = path.read_text(errors="replace")
    found: dict[str, Any] = {}
    errors = re.findall(r"ERROR SUMMARY: (\d+) errors?", text)
    if errors:
        found["errors"] = int(errors[-1])
    hazards = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    if hazards:
        found["hazards"], found["errors"], found["warnings"] = (int(v) for v in hazards[-1])
    calls = re.findall(r"gpu_sanitize\.py: (\d+) calls on \S+, (\d+) failed", text)
    if calls:
        found["calls"], found["calls_failed"] = (int(v) for v in calls[-1])
    found["call_failures"] = re.findall(r"^FAIL (.*)$", text, re.M)[:20]
    return found


def bench_figures(path: Path) -> dict[str, Any] | None:
    """Per case: GB/s of every timed implementation, qkit's share of the copy, what was not timed."""
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        return {"error": f"unreadable bench JSON: {error}"}
    rows = []
    for row in report.get("rows", []):
        gbps = row.get("gbps", {})
        best = gbps.get("qkit_out", gbps.get("qkit"))
        rows.append(
            {
                "op": row.get("op"),
                "dtype": row.get("dtype"),
                "group": row.get("group"),
                "numel": row.get("numel"),
                "copy_gbps": round(row.get("copy_gbps", 0.0), 1),
                "gbps": {name: round(value, 1) for name, value in gbps.items()},
                "qkit_share_of_copy": round(best / row["copy_gbps"], 3) if best and row.get("copy_gbps") else None,
                "not_timed": row.get("skipped", {}),
            }
        )
    env = report.get("environment", {})
    return {"gpu": env.get("gpu"), "torch": env.get("torch"), "baselines": env.get("baselines"), "rows": rows}


def summarize(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.outdir)
    steps = read_steps(Path(args.steps))
    summary: dict[str, Any] = {
        "ok": args.exit_status == 0 and all(s["status"] == "ok" for s in steps if s["required"]),
        "exit_status": args.exit_status,
        "dry_run": args.dry_run == 1,
        "budget_s": args.budget,
        "elapsed_s": args.elapsed,
        "started_at": args.started_at,
        "wheel": args.wheel or None,
        "steps": steps,
    }
    info = out / "info.json"
    if info.is_file():
        try:
            summary["info"] = json.loads(info.read_text())
        except json.JSONDecodeError:
            summary["info"] = {"error": "unreadable info.json"}
    summary["tests"] = junit_counts(out / "tests.xml")
    summary["sanitizers"] = {tool: sanitizer_counts(out / "logs" / f"{tool}.log") for tool in ("memcheck", "racecheck")}
    summary["bench"] = {p.stem: bench_figures(p) for p in sorted(out.glob("bench_*.json"))}
    return summary


def report(summary: dict[str, Any]) -> None:
    mode = " (dry run)" if summary["dry_run"] else ""
    verdict = "OK" if summary["ok"] else "FAILED"
    print(f"gpu_check{mode}: {verdict} in {summary['elapsed_s']}s of {summary['budget_s']}s")
    for step in summary["steps"]:
        kind = "required" if step["required"] else "optional"
        reason = f"  ({step['reason']})" if step.get("reason") else ""
        print(f"  {step['name']:<11} {step['status']:<8} {step['seconds'] or 0:>4}s  {kind}{reason}")
    tests = summary.get("tests")
    if tests and "tests" in tests:
        print(
            f"  tests: {tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped"
        )
    for name, bench in summary.get("bench", {}).items():
        for row in (bench or {}).get("rows", []):
            share = row["qkit_share_of_copy"]
            print(
                f"  {name}: {row['op']} {row['dtype']} g={row['group']}: copy {row['copy_gbps']} GB/s, "
                f"qkit {share:.0%} of copy, compile {row['gbps'].get('compile', '-')} GB/s"
                if share is not None
                else f"  {name}: {row['op']} {row['dtype']} g={row['group']}: not timed"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    wheel = sub.add_parser("wheel")
    wheel.add_argument("path")
    summary = sub.add_parser("summary")
    summary.add_argument("outdir")
    summary.add_argument("--steps", required=True)
    summary.add_argument("--dry-run", type=int, default=0)
    summary.add_argument("--budget", type=int, required=True)
    summary.add_argument("--elapsed", type=int, required=True)
    summary.add_argument("--started-at", default="")
    summary.add_argument("--exit-status", type=int, required=True)
    summary.add_argument("--wheel", default="")
    show = sub.add_parser("report")
    show.add_argument("summary")
    installed = sub.add_parser("installed")
    installed.add_argument("site")
    sub.add_parser("gpu")
    args = parser.parse_args(argv)

    if args.command in ("wheel", "installed", "gpu"):
        if args.command == "wheel":
            problems = check_wheel(Path(args.path))
        elif args.command == "installed":
            problems = check_installed(Path(args.site))
        else:
            problems = check_gpu()
        for problem in problems:
            print(f"gpu_check.sh: {problem}", file=sys.stderr)
        if args.command == "wheel" and not problems:
            print(f"wheel: {args.path}")
        return 1 if problems else 0
    if args.command == "summary":
        data = summarize(args)
        target = Path(args.outdir) / "summary.json"
        target.with_suffix(".json.tmp").write_text(json.dumps(data, indent=1) + "\n")
        target.with_suffix(".json.tmp").replace(target)  # never a half-written summary
        return 0
    report(json.loads(Path(args.summary).read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
