"""``python -m qkit.info``: how qkit was built, what this process runs, and whether they fit.

Prints the build record, the runtime, whether ``qkit._C`` loaded (and why not),
which dispatch keys hold qkit kernels, and a verdict with what to do. ``--json``
prints the same as one JSON object. Exit status: 0 when the kernels are usable,
1 when they could not be loaded.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

import torch

import qkit
from qkit import _loader, ops

#: Dispatch keys reported per op: the two kernel backends, and Meta (the fake
#: implementation torch.compile traces with).
DISPATCH_KEYS = ("CPU", "CUDA", "Meta")


def _op_names() -> list[str]:
    """Every ``qkit::`` op the dispatcher knows (so ops added later are listed too)."""
    list_ops = getattr(torch._C, "_dispatch_get_all_op_names", None)
    if list_ops is None:
        return [f"qkit::{name}" for name in ops.DEFINED_OPS]
    return sorted(name for name in list_ops() if name.startswith("qkit::"))


def kernel_keys(loaded: bool) -> dict[str, list[str]]:
    """``{"qkit::op": [dispatch keys with a kernel]}`` for every qkit op.

    Without ``_C`` the CPU/CUDA slots hold only stubs that raise the load error
    (see ``ops.define``), so those are not reported as kernels.
    """
    report = {}
    for name in _op_names():
        keys = [key for key in DISPATCH_KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(name, key)]
        report[name] = keys if loaded else [key for key in keys if key not in ("CPU", "CUDA")]
    return report


def _arch_entries(arch_list: str) -> list[tuple[tuple[int, int], str, bool]] | None:
    """``[((major, minor), suffix, ptx)]`` of a TORCH_CUDA_ARCH_LIST, or None if an entry is not understood."""
    entries = []
    for entry in re.split(r"[;,\s]+", arch_list.strip()):
        if not entry:
            continue
        found = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry)
        if found is None:
            return None
        entries.append(((int(found.group(1)), int(found.group(2))), found.group(3), bool(found.group(4))))
    return entries


def arch_match(capability: tuple[int, int], arch_list: str) -> str | None:
    """Which compiled code a GPU of ``capability`` runs, in words; None when nothing in ``arch_list`` runs on it.

    A cubin for ``X.Y`` runs on ``X.Z`` with ``Z >= Y`` (an ``a``-suffixed one on ``X.Y`` only);
    PTX for ``X.Y`` is JIT-compiled by the driver on any newer GPU. Returns ``"unknown"``
    when the list has entries this does not understand (e.g. names like 'Ampere').
    """
    entries = _arch_entries(arch_list)
    if entries is None:
        return "unknown"

    def cubin_runs(arch: tuple[int, int], suffix: str) -> bool:
        if suffix == "a":  # architecture-specific ('9.0a'): that exact chip only
            return arch == capability
        return arch[0] == capability[0] and arch[1] <= capability[1]

    cubins = [(arch, suffix) for arch, suffix, _ in entries if cubin_runs(arch, suffix)]
    if cubins:
        arch, suffix = max(cubins)
        return f"the sm_{arch[0]}{arch[1]}{suffix} cubin"
    ptx = [arch for arch, suffix, has_ptx in entries if has_ptx and not suffix and arch <= capability]
    if ptx:
        arch = max(ptx)
        return f"the compute_{arch[0]}{arch[1]} PTX, JIT-compiled by the driver on first use"
    return None


def arch_covers(capability: tuple[int, int], arch_list: str) -> bool | None:
    """Whether a GPU of ``capability`` can run kernels built for ``arch_list`` (TORCH_CUDA_ARCH_LIST form).

    None when the list has entries this does not understand (e.g. names like 'Ampere'), rather than guess.
    """
    match = arch_match(capability, arch_list)
    return None if match == "unknown" else match is not None


def advise(
    built: dict[str, Any] | None,
    running: dict[str, Any],
    loaded: bool,
    kernels: dict[str, list[str]],
    capabilities: Sequence[tuple[int, int]] = (),
) -> list[str]:
    """What does not fit between the build and this process, each with what to do (empty: all fits).

    Args:
        built: :func:`qkit._loader.build_record` (None when there is none).
        running: :func:`qkit._loader.runtime_record`.
        loaded: whether ``qkit._C`` loaded.
        kernels: :func:`kernel_keys`.
        capabilities: compute capability of each visible GPU.
    """
    advice: list[str] = []
    if built is None:
        advice.append(
            "no build record (_build_info.json): this qkit was not built by its setup.py, so build and "
            "runtime cannot be compared; reinstall it (pip install --no-build-isolation .) to get one"
        )
        advice.extend(_loader.fit_problems(None, running))
    else:
        advice.extend(_loader.build_mismatches(built, running))
        if running.get("torch_hip") and not built.get("rocm_kernels"):
            advice.append(
                f"torch is a ROCm build (HIP {running['torch_hip']}) but qkit has no ROCm kernels: GPU tensors "
                "will raise; build qkit from source against this torch (pip install --no-build-isolation .)"
            )
        elif running.get("torch_cuda") and not built.get("cuda_kernels"):
            advice.append(
                f"torch is a CUDA build (CUDA {running['torch_cuda']}) but qkit was built without CUDA kernels: "
                "GPU tensors will raise; install a CUDA-enabled qkit wheel, or rebuild with a CUDA toolkit "
                "(QKIT_BUILD_CUDA=1 pip install --no-build-isolation .)"
            )
        if built.get("cuda_kernels") and running.get("cuda_available"):
            arch_list = str(built.get("cuda_arch_list") or "")
            for index, capability in enumerate(capabilities):
                if arch_covers(capability, arch_list) is False:
                    major, minor = capability
                    advice.append(
                        f"GPU {index} (compute capability {major}.{minor}) is not covered by the built arch "
                        f"list {arch_list!r}: rebuild with TORCH_CUDA_ARCH_LIST='{major}.{minor}'"
                    )
            built_cuda = _loader.version_tuple(str(built.get("cuda_version") or ""))
            torch_cuda = _loader.version_tuple(str(running.get("torch_cuda") or ""))
            if built_cuda and torch_cuda and built_cuda[0] > torch_cuda[0]:
                advice.append(
                    f"qkit's CUDA kernels use the CUDA {built['cuda_version']} runtime (linked statically) while "
                    f"torch uses CUDA {running['torch_cuda']}: the NVIDIA driver must support CUDA "
                    f"{built['cuda_version']}; update the driver if kernel launches fail"
                )
    if loaded:
        missing = sorted(name for name, keys in kernels.items() if "CPU" not in keys)
        if missing:
            advice.append(
                f"ops without a CPU kernel: {', '.join(missing)}: the compiled module is older than the Python "
                "layer; rebuild qkit (pip install --no-build-isolation .)"
            )
    return advice


def _verdict(
    loaded: bool,
    running: dict[str, Any],
    kernels: dict[str, list[str]],
    advice: list[str],
    skipped: bool = False,
    fit: Sequence[str] = (),
) -> str:
    """One line. ``fit``: :func:`qkit._loader.fit_problems`; when _C did not load, the first is what to do."""
    if skipped:
        return f"NOT LOADED on purpose: {_loader.SKIP_ENV} is set; unset it to use the kernels"
    if not loaded and fit:
        return f"NOT USABLE: {fit[0]}"
    if not loaded:
        return "NOT USABLE: qkit._C could not be loaded (see the load error for what to do)"
    devices = ["CPU"]
    if running.get("cuda_available") and any("CUDA" in keys for keys in kernels.values()):
        devices.append("GPU")
    usable = f"usable on {' and '.join(devices)}"
    if fit:  # loaded, but outside what this build supports (e.g. a torch older than its target)
        return f"{usable}, but UNSUPPORTED: {fit[0]}"
    return f"{usable}, with {len(advice)} warning(s) below" if advice else usable


def gpu_report(built: dict[str, Any] | None, running: dict[str, Any]) -> list[dict[str, Any]]:
    """Per visible GPU: name, compute capability, and which compiled code it runs (None: none)."""
    arch_list = str((built or {}).get("cuda_arch_list") or "")
    has_cuda = bool((built or {}).get("cuda_kernels"))
    report = []
    for index, (name, cap) in enumerate(zip(running.get("gpus", []), running.get("gpu_capabilities", []), strict=True)):
        capability = _loader.version_tuple(cap)
        runs = arch_match(capability, arch_list) if has_cuda and capability else None
        report.append({"index": index, "name": name, "capability": cap, "runs": runs})
    return report


def collect() -> dict[str, Any]:
    """Everything ``python -m qkit.info`` reports, as a JSON-serialisable dict.

    Keys: ``qkit_version``; ``build`` (the build record or None); ``runtime``; ``loaded``
    (bool); ``skipped`` (bool: ``QKIT_SKIP_EXTENSION`` kept ``_C`` unloaded); ``load_error``
    (the diagnosis, or None); ``kernels`` (``{"qkit::op": [keys]}``); ``gpus`` (per GPU:
    ``index``, ``name``, ``capability``, ``runs``: the compiled code it runs, None if none);
    ``usable`` (bool: the kernels loaded); ``verdict`` (one line); ``advice`` (list of
    what does not fit and what to do about it).
    """
    built = _loader.build_record()
    running = _loader.runtime_record()
    error = _loader.load_error()
    loaded = error is None
    skipped = not loaded and _loader.skip_requested()
    kernels = kernel_keys(loaded)
    capabilities = [c for c in (_loader.version_tuple(cap) for cap in running.get("gpu_capabilities", [])) if c]
    advice = advise(built, running, loaded, kernels, capabilities)
    fit = _loader.fit_problems(built, running)
    return {
        "qkit_version": qkit.__version__,
        "build": built,
        "runtime": running,
        "loaded": loaded,
        "skipped": skipped,
        "load_error": None if error is None else str(error),
        "kernels": kernels,
        "gpus": gpu_report(built, running),
        "usable": loaded,
        "verdict": _verdict(loaded, running, kernels, advice, skipped, fit),
        "advice": advice,
    }


def _yes_no(value: object) -> str:
    return "yes" if value else "no"


def format_report(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`collect`'s dict."""
    lines = [f"qkit {info['qkit_version']}", ""]
    built = info["build"]
    lines.append("build record (_build_info.json):")
    if built is None:
        lines.append("  none (not built by qkit's setup.py)")
    else:
        lines += [
            f"  torch target       >= {built.get('torch_target')} (built with torch {built.get('built_with_torch')})",
            f"  python target      >= {built.get('python_target')} (abi3)",
            f"  platform           {built.get('platform')}",
            f"  CPU kernels        {_yes_no(built.get('cpu_kernels', True))}",
            f"  CUDA kernels       {_yes_no(built.get('cuda_kernels'))}"
            + (
                f" (CUDA {built.get('cuda_version')}, archs {built.get('cuda_arch_list')})"
                if built.get("cuda_kernels")
                else ""
            ),
            f"  ROCm kernels       {_yes_no(built.get('rocm_kernels'))}"
            + (f" (archs {built.get('rocm_arch_list')})" if built.get("rocm_kernels") else ""),
            f"  CUDA runtime       {built.get('cuda_runtime') or '-'}"
            + (" (linked into _C: no libcudart needed)" if built.get("cuda_runtime") == "static" else ""),
            f"  built on           {built.get('machine', '?')}, {built.get('build_libc') or 'unknown libc'}",
            f"  git revision       {built.get('git_revision') or 'unknown'}",
            f"  built at           {built.get('built_at')}",
        ]
    running = info["runtime"]
    lines += [
        "",
        "this process:",
        f"  python             {running['python']} ({running['platform']}/{running['machine']})",
        f"  C library          {running.get('libc') or 'unknown'}",
        f"  installed wheel    {', '.join(running.get('wheel_tags') or []) or '- (not installed from a wheel)'}",
        f"  torch              {running['torch']} (CUDA {running['torch_cuda']}, HIP {running['torch_hip']})",
        f"  CUDA available     {_yes_no(running['cuda_available'])}",
        f"  GPUs               {', '.join(running['gpus']) or 'none'}",
    ]
    for gpu in info.get("gpus", []):
        runs = gpu["runs"] or (
            "NOTHING: no compiled arch covers it"
            if (built or {}).get("cuda_kernels")
            else "nothing: qkit was built without CUDA kernels"
        )
        gpu_line = f"{gpu['name']}, compute capability {gpu['capability']} -> {runs}"
        lines.append(f"  GPU {gpu['index']:<14} {gpu_line}")
    lines += [
        "",
        f"qkit._C loaded:      {_yes_no(info['loaded'])}",
    ]
    if info["load_error"]:
        lines += ["  " + line for line in info["load_error"].splitlines()]
    lines += ["", "kernels (dispatch keys with a qkit implementation):"]
    width = max((len(name) for name in info["kernels"]), default=0)
    for name, keys in info["kernels"].items():
        lines.append(f"  {name:<{width}}  {' '.join(keys) or '-'}")
    lines += ["", f"verdict: {info['verdict']}"]
    lines += [f"  - {item}" for item in info["advice"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report; returns the exit status (0 usable, 1 the kernels could not load)."""
    parser = argparse.ArgumentParser(prog="python -m qkit.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_report(info))
    return 0 if info["usable"] else 1


if __name__ == "__main__":
    sys.exit(main())
