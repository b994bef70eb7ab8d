"""Before/after bandwidth ratios of the CPU quantizer ops, against copy and clone, alternating builds.

Two (or more) builds of qkit, each a ``python`` directory holding its own ``qkit/_C*.so``
(for "before", copy main's built ``python/`` aside first), are timed in alternating
child processes: round 1 runs every variant once, round 2 again, and so on. Within a
process each case takes ``--samples`` samples after a warm-up; one sample times, in this
order, ``y.copy_(x)`` (between existing buffers), the op with ``out=`` (where it has one),
``x.clone()`` and the op with fresh outputs, and takes the ratios within the sample:
op GB/s over copy GB/s (``out=``) and over clone GB/s (fresh; clone pays the same page
faults). Bytes are what ``qkit bench`` counts (input + codes + params for the quantizers;
for quantized_reduction the L tensors' codes and params in plus the result out). A
process reports each case's median ratio; the table gives, per variant, the median of
those over the rounds, and the load average seen.

    python ci/ab_bandwidth.py --variant before=/tmp/before/python --variant after=python \\
        --rounds 3 [--dtype float16] [--groups 64,128,4096,row] [--ops ...] [--threads 2]

Prints one JSON line per case and process as it goes, then a Markdown table. The input
is 32M elements unless ``--numel`` says otherwise; "row" is groups of 16384 elements.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

OPS = (
    "fake_quantize",
    "quantize8",
    "quantize4",
    "dequantize8",
    "dequantize4",
    "swizzle_quantize",
    "quantized_reduction",
)
NODES, LOCAL = 2, 8  # swizzle layout and reduction width (qgZ: L = devices per node)


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _cases(op: str, x: Any, groups: int) -> tuple[int, Callable[[], Any] | None, Callable[[], Any]]:
    """(bytes moved, out= call or None, fresh call) for one op on the 1-D input x."""
    import qkit
    from qkit.zeropp_ops import quantized_reduction, swizzle_quantize

    n, es = x.numel(), x.element_size()
    bits = 8 if op in ("fake_quantize", "quantize8", "dequantize8") else 4
    codes, params = n * bits // 8, groups * 4
    if op == "fake_quantize":
        o = x.new_empty(x.shape)
        return (
            2 * n * es,
            lambda: qkit.fake_quantize(x, groups, bits, out=o),
            lambda: qkit.fake_quantize(x, groups, bits),
        )
    if op == "quantized_reduction":
        q, p = swizzle_quantize(x, groups, bits, True, 1, NODES, LOCAL)
        return (
            codes + params + (codes + params) // LOCAL,
            None,
            lambda: quantized_reduction(q, p, groups, groups // LOCAL, bits, True, LOCAL),
        )
    if op.startswith("quantize"):
        q, p = qkit.quantize(x, groups, bits)
        return (
            n * es + codes + params,
            lambda: qkit.quantize(x, groups, bits, out=(q, p)),
            lambda: qkit.quantize(x, groups, bits),
        )
    if op.startswith("dequantize"):
        q, p = qkit.quantize(x, groups, bits)
        o = x.new_empty(x.shape)
        return (
            n * es + codes + params,
            lambda: qkit.dequantize(q, p, groups, bits, out=o),
            lambda: qkit.dequantize(q, p, groups, bits, dtype=x.dtype),
        )
    if op == "swizzle_quantize":
        q, p = swizzle_quantize(x, groups, bits, True, 1, NODES, LOCAL)
        return (
            n * es + codes + params,
            lambda: swizzle_quantize(x, groups, bits, True, 1, NODES, LOCAL, out=(q, p)),
            lambda: swizzle_quantize(x, groups, bits, True, 1, NODES, LOCAL),
        )
    raise ValueError(f"ab_bandwidth: unknown op {op!r}")


def child(args: argparse.Namespace) -> None:
    """Time every case in this process (the qkit on PYTHONPATH); one JSON line per case."""
    import torch

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.numel).to(dtype)
    y = torch.empty_like(x)
    ceiling = 2 * x.numel() * x.element_size()  # bytes of copy_ / clone

    def once(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    for spec in args.groups.split(","):
        groups = args.numel // (16384 if spec == "row" else int(spec))
        for op in args.ops.split(","):
            nbytes, with_out, fresh = _cases(op, x, groups)
            for fn in (lambda: y.copy_(x), x.clone, with_out, fresh):
                if fn is not None:
                    end = time.perf_counter() + args.warmup_s
                    while time.perf_counter() < end:
                        fn()
            out_ratio, fresh_ratio, copy_gbps, clone_gbps = [], [], [], []
            for _ in range(args.samples):
                t_copy = once(lambda: y.copy_(x))
                if with_out is not None:
                    out_ratio.append(t_copy * nbytes / (once(with_out) * ceiling))
                t_clone = once(x.clone)
                fresh_ratio.append(t_clone * nbytes / (once(fresh) * ceiling))
                copy_gbps.append(ceiling / t_copy / 1e9)
                clone_gbps.append(ceiling / t_clone / 1e9)
            record = {
                "op": op,
                "group": spec,
                "out_vs_copy": _median(out_ratio),
                "fresh_vs_clone": _median(fresh_ratio),
                "copy_gbps": _median(copy_gbps),
                "clone_gbps": _median(clone_gbps),
                "load": round(os.getloadavg()[0], 2),
            }
            print(json.dumps(record), flush=True)


def parent(args: argparse.Namespace) -> None:
    """Alternate the variants' processes over the rounds; print the lines and the table."""
    variants = [v.split("=", 1) for v in args.variant]
    if any(len(v) != 2 for v in variants):
        raise SystemExit("ab_bandwidth: --variant takes NAME=PYTHONPATH")
    rows: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    forwarded = [f"--{k}={getattr(args, k)}" for k in ("dtype", "groups", "ops", "threads", "numel", "samples")]
    forwarded.append(f"--warmup_s={args.warmup_s}")
    for rnd in range(1, args.rounds + 1):
        for name, path in variants:
            env = {**os.environ, "PYTHONPATH": os.path.abspath(path)}
            cmd = [sys.executable, os.path.abspath(__file__), "--child", *forwarded]
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            for line in result.stdout.splitlines():
                record = {"variant": name, "round": rnd, **json.loads(line)}
                print(json.dumps(record), flush=True)
                rows[(record["op"], record["group"], name)].append(record)
    names = [name for name, _ in variants]
    head = ["op", "group"]
    head += [f"out= / copy, {n}" for n in names] + [f"fresh / clone, {n}" for n in names]
    head += [f"copy GB/s, {n}" for n in names] + ["load"]
    print("\n| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for spec in args.groups.split(","):
        for op in args.ops.split(","):
            cells = [op, spec]
            for key in ("out_vs_copy", "fresh_vs_clone", "copy_gbps"):
                for n in names:
                    vals = [r[key] for r in rows[(op, spec, n)] if r[key] is not None]
                    cells.append(f"{statistics.median(vals):.2f}" if vals else "-")
            loads = [r["load"] for n in names for r in rows[(op, spec, n)]]
            cells.append(f"{min(loads):.1f}–{max(loads):.1f}")
            print("| " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", action="append", default=[], help="NAME=PYTHONPATH of one build (repeat)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--groups", default="64,128,4096,row")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--numel", type=int, default=32 * 1024 * 1024)
    ap.add_argument("--samples", type=int, default=11)
    ap.add_argument("--warmup_s", type=float, default=0.3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
    else:
        if not args.variant:
            raise SystemExit("ab_bandwidth: give at least one --variant NAME=PYTHONPATH")
        parent(args)


if __name__ == "__main__":
    main()
