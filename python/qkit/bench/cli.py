"""``qkit bench`` (or ``python -m qkit.bench``): qkit's kernels against what users have.

For every (threads, dtype, group size, op) case it times, side by side on the same
tensors: a copy of the input into an existing buffer (the memory-bandwidth ceiling of
``out=``), ``clone()`` of the input (the ceiling of a fresh output, which pays the same
page faults), the op's math in eager PyTorch, that code under ``torch.compile``, aten's
``fake_quantize_per_channel_affine``, DeepSpeed's and bitsandbytes' CUDA kernels (when
installed), qkit with a fresh output, and qkit writing into a reused ``out=`` buffer. The
floating-point ops (``*_e4m3``: FP8 with a float32 absmax scale per group; ``*_mxfp4``:
e2m1 in 32-element MX blocks, E8M0 scales; ``*_nvfp4``: e2m1 in 16-element blocks, E4M3
scales and an fp32 tensor scale; MX and NVFP4 whatever ``--groups`` says) are timed against
the same eager / ``torch.compile`` pair and torchao's reference when torchao is installed
(MX: ``to_mx``/``to_dtype``; NVFP4: ``nvfp4_quantize``, ``NVFP4Tensor.dequantize``).
Bandwidth counts the bytes an op must read and write once; figures are medians of
``--repeat`` calls after a warm-up (which also compiles). ``--json`` writes every
figure, ``--plot`` draws GB/s against tensor size with the copy roofline, and
``--latency`` times per-call overhead on small tensors against ``torch.add``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import timeit
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

import qkit
from qkit.bench import baselines as base
from qkit.fp_ops import fp_format_bits
from qkit.zeropp_ops import quantized_reduction, swizzle_quantize

OPS = (
    "fake_quantize",
    "quantize8",
    "quantize4",
    "dequantize8",
    "dequantize4",
    "swizzle_quantize",
    "quantized_reduction",
)
#: The floating-point cases: op -> (kind, element format, scaling).
FP_OPS: dict[str, tuple[str, str, str]] = {
    "fake_quantize_e4m3": ("fake", "e4m3", "absmax"),
    "quantize_e4m3": ("quantize", "e4m3", "absmax"),
    "dequantize_e4m3": ("dequantize", "e4m3", "absmax"),
    "fake_quantize_mxfp4": ("fake", "e2m1", "mx"),
    "quantize_mxfp4": ("quantize", "e2m1", "mx"),
    "dequantize_mxfp4": ("dequantize", "e2m1", "mx"),
    "fake_quantize_nvfp4": ("fake", "e2m1", "nvfp4"),
    "quantize_nvfp4": ("quantize", "e2m1", "nvfp4"),
    "dequantize_nvfp4": ("dequantize", "e2m1", "nvfp4"),
}
#: The scalings whose format fixes the group size (``--groups`` does not apply): block, report label.
FIXED_BLOCKS = {"mx": (base.MX_BLOCK, "mx32"), "nvfp4": (base.NVFP4_BLOCK, "nv16")}
OPS = OPS + tuple(FP_OPS)
#: Implementations in table order; "qkit_out" is qkit writing into a reused buffer.
IMPLS = ("eager", "compile", "aten_per_channel", "deepspeed", "bitsandbytes", "torchao", "qkit", "qkit_out")
_HEADINGS = {"aten_per_channel": "aten pc", "bitsandbytes": "bnb", "deepspeed": "dspeed", "qkit_out": "qkit out="}
#: The ZeRO++ layout the swizzle and reduction cases use: 2 nodes x 8 ranks, no pipelining.
NODES, LOCAL = 2, 8


#: Seconds each implementation runs untimed before its timed calls (``--warmup``).
WARMUP_SECONDS = 0.5


def time_seconds(
    fn: Callable[[], object],
    repeat: int,
    device: str = "cpu",
    reduce: Callable[[list[float]], float] = statistics.median,
    warmup: float | None = None,
) -> float:
    """``reduce`` (median by default, ``min`` for best-of) over ``repeat`` timed calls of
    ``fn``, after one call (which also compiles) and then untimed calls for ``warmup``
    seconds (default ``WARMUP_SECONDS``). The warm-up reaches the steady state a
    training loop sees: on a VM the first calls that fault in fresh (huge) pages ran
    10x slower than later ones. On CUDA each call is timed with events on the current
    stream, so only that device is synchronized."""
    warmup = WARMUP_SECONDS if warmup is None else warmup
    fn()
    started = time.perf_counter()
    while time.perf_counter() - started < warmup:
        fn()
    times = []
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return reduce(times)
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return reduce(times)


@dataclass
class Case:
    """One op on one tensor: the bytes it must move and every implementation that can run it."""

    op: str
    nbytes: int
    impls: dict[str, Callable[[], object]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, fn: Callable[[], object] | None, reason: str | None = None) -> None:
        if fn is None:
            self.skipped[name] = reason or "not applicable"
        else:
            self.impls[name] = fn


@dataclass
class Baselines:
    """The optional GPU libraries, loaded once per run."""

    deepspeed: object | None
    deepspeed_reason: str | None
    bnb: object | None
    bnb_reason: str | None
    torchao_mx: object | None = None
    torchao_reason: str | None = "not loaded"
    torchao_nvfp4: object | None = None
    torchao_nvfp4_reason: str | None = "not loaded"

    @classmethod
    def load(cls, device: str, allow_jit: bool = True, mx: bool = False, nvfp4: bool = False) -> Baselines:
        """``mx``, ``nvfp4``: also load torchao's MX or NVFP4 reference (any device), for those cases."""
        ao, ao_reason = base.load_torchao_mx() if mx else (None, "no MX case")
        nv, nv_reason = base.load_torchao_nvfp4() if nvfp4 else (None, "no NVFP4 case")
        if not device.startswith("cuda"):
            return cls(None, "CUDA only", None, "CUDA only", ao, ao_reason, nv, nv_reason)
        ds, ds_reason = base.load_deepspeed(allow_jit)
        bnb, bnb_reason = base.load_bitsandbytes()
        return cls(ds, ds_reason, bnb, bnb_reason, ao, ao_reason, nv, nv_reason)


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def torchao_fp(kind: str, x: Tensor, fmt: str, scaling: str, libs: Baselines) -> tuple[Callable | None, str]:
    """torchao's reference for an FP case (MX: ``to_mx``/``to_dtype``; NVFP4: ``nvfp4_quantize``
    with its per-tensor scale, ``NVFP4Tensor.dequantize``), or why there is none."""
    dtype = x.dtype
    if scaling == "mx":
        mx, elem, block = (
            libs.torchao_mx,
            torch.float8_e4m3fn if fmt == "e4m3" else torch.float4_e2m1fn_x2,
            base.MX_BLOCK,
        )
        if mx is None:
            return None, libs.torchao_reason
        if kind == "fake":
            return lambda: mx.to_dtype(*reversed(mx.to_mx(x, elem, block)), elem, block, dtype), ""
        if kind == "quantize":
            return lambda: mx.to_mx(x, elem, block), ""
        scale, data = mx.to_mx(x, elem, block)
        return lambda: mx.to_dtype(data, scale, elem, block, dtype), ""
    if scaling != "nvfp4":
        return None, "MX and NVFP4 only"
    nv = libs.torchao_nvfp4
    if nv is None:
        return None, libs.torchao_nvfp4_reason
    if dtype not in (torch.float32, torch.bfloat16):
        return None, "torchao's NVFP4 takes float32 or bfloat16"
    rows = x.reshape(1, -1)  # its quantizer wants 2-d input

    def tensor_scale() -> Tensor:
        return nv.per_tensor_amax_to_scale(rows.abs().amax())

    block = base.NVFP4_BLOCK
    if kind == "fake":
        return lambda: nv.NVFP4Tensor.to_nvfp4(rows, block, tensor_scale()).dequantize(dtype), ""
    if kind == "quantize":
        return lambda: nv.nvfp4_quantize(rows, block, tensor_scale()), ""
    quantized = nv.NVFP4Tensor.to_nvfp4(rows, block, tensor_scale())
    return lambda: quantized.dequantize(dtype), ""


def build_fp_case(op: str, x: Tensor, groups: int, libs: Baselines) -> Case:
    """A floating-point case (:data:`FP_OPS`) on flat ``x``; mx and nvfp4 ignore ``groups``
    (their formats fix the blocks: :data:`FIXED_BLOCKS`)."""
    kind, fmt, scaling = FP_OPS[op]
    if scaling in FIXED_BLOCKS:
        groups = x.numel() // FIXED_BLOCKS[scaling][0]
    numel, esize, dtype = x.numel(), x.element_size(), x.dtype
    scale_bytes = groups * (4 if scaling == "absmax" else 1) + (4 if scaling == "nvfp4" else 0)
    stored = numel * esize + numel * fp_format_bits(fmt) // 8 + scale_bytes
    torchao, ao_reason = torchao_fp(kind, x, fmt, scaling, libs)
    if kind == "fake":
        case = Case(op, 2 * numel * esize)
        out = torch.empty_like(x)
        case.add("eager", lambda: base.eager_fake_quantize_fp(x, groups, fmt, scaling))
        compiled = _compiled(base.eager_fake_quantize_fp)
        case.add("compile", lambda: compiled(x, groups, fmt, scaling))
        case.add("torchao", torchao, ao_reason)
        case.add("qkit", lambda: qkit.fake_quantize_fp(x, groups, fmt, scaling))
        case.add("qkit_out", lambda: qkit.fake_quantize_fp(x, groups, fmt, scaling, out=out))
        return case
    codes, scales = qkit.quantize_fp(x, groups, fmt, scaling)
    eager_codes = codes.view(torch.uint8) if fmt == "e2m1" else codes  # inductor has no fp4 dtype
    eager_scales = scales.view(torch.uint8) if scaling == "nvfp4" else scales  # fp32 header + E4M3 bytes
    case = Case(op, stored)
    if kind == "quantize":
        case.add("eager", lambda: base.eager_quantize_fp(x, groups, fmt, scaling))
        compiled = _compiled(base.eager_quantize_fp)
        case.add("compile", lambda: compiled(x, groups, fmt, scaling))
        case.add("torchao", torchao, ao_reason)
        case.add("qkit", lambda: qkit.quantize_fp(x, groups, fmt, scaling))
        case.add("qkit_out", lambda: qkit.quantize_fp(x, groups, fmt, scaling, out=(codes, scales)))
        return case
    out = torch.empty_like(x)
    case.add("eager", lambda: base.eager_dequantize_fp(eager_codes, eager_scales, groups, fmt, dtype, scaling))
    compiled = _compiled(base.eager_dequantize_fp)
    case.add("compile", lambda: compiled(eager_codes, eager_scales, groups, fmt, dtype, scaling))
    case.add("torchao", torchao, ao_reason)
    case.add("qkit", lambda: qkit.dequantize_fp(codes, scales, groups, fmt, scaling, dtype))
    case.add("qkit_out", lambda: qkit.dequantize_fp(codes, scales, groups, fmt, scaling, out=out))
    return case


def build_case(op: str, x: Tensor, groups: int, libs: Baselines) -> Case:
    """The implementations of ``op`` on flat ``x`` in ``groups`` groups."""
    if op in FP_OPS:
        return build_fp_case(op, x, groups, libs)
    numel, esize, dtype = x.numel(), x.element_size(), x.dtype
    bits = 4 if op.endswith("4") or op in ("swizzle_quantize", "quantized_reduction") else 8
    code_bytes, param_bytes = numel * bits // 8, groups * 4
    ds, bnb = libs.deepspeed, libs.bnb
    ds_type = getattr(ds, "QuantizationType", None)
    bnb_block = numel // groups if numel // groups in base.BNB_BLOCK_SIZES else None
    bnb_reason = libs.bnb_reason or (None if bnb_block else f"block size {numel // groups} unsupported")

    if op == "fake_quantize":
        case = Case(op, 2 * numel * esize)
        out = torch.empty_like(x)
        case.add("eager", lambda: base.eager_fake_quantize(x, groups, bits))
        compiled = _compiled(base.eager_fake_quantize)
        case.add("compile", lambda: compiled(x, groups, bits))
        case.add("aten_per_channel", lambda: base.aten_per_channel_fake_quantize(x, groups, bits))
        ds_fake = getattr(
            ds, {torch.float32: "ds_quantize_fp32", torch.float16: "ds_quantize_fp16"}.get(dtype, ""), None
        )
        # DeepSpeed's fake quantization works in place: time it on a scratch copy, like qkit out=.
        case.add(
            "deepspeed", ds_fake and (lambda: ds_fake(out, groups, bits)), libs.deepspeed_reason or "no bf16 kernel"
        )
        if bnb is not None and bnb_block:
            case.add("bitsandbytes", lambda: bnb.dequantize_blockwise(*bnb.quantize_blockwise(x, blocksize=bnb_block)))
        else:
            case.add("bitsandbytes", None, bnb_reason)
        case.add("qkit", lambda: qkit.fake_quantize(x, groups, bits))
        case.add("qkit_out", lambda: qkit.fake_quantize(x, groups, bits, out=out))
        if ds_fake is not None:
            out.copy_(x)
        return case

    if op.startswith("quantize"):
        case = Case(op, numel * esize + code_bytes + param_bytes)
        q, params = qkit.quantize(x, groups, bits)
        case.add("eager", lambda: base.eager_quantize(x, groups, bits))
        compiled = _compiled(base.eager_quantize)
        case.add("compile", lambda: compiled(x, groups, bits))
        case.add("deepspeed", ds and (lambda: ds.quantize(x, groups, bits, ds_type.Symmetric)), libs.deepspeed_reason)
        if bnb is not None and bnb_block and bits == 8:
            case.add("bitsandbytes", lambda: bnb.quantize_blockwise(x, blocksize=bnb_block))
        else:
            case.add("bitsandbytes", None, bnb_reason or "8-bit only")
        case.add("qkit", lambda: qkit.quantize(x, groups, bits))
        case.add("qkit_out", lambda: qkit.quantize(x, groups, bits, out=(q, params)))
        return case

    if op.startswith("dequantize"):
        case = Case(op, numel * esize + code_bytes + param_bytes)
        q, params = qkit.quantize(x, groups, bits)
        out = torch.empty_like(x)
        case.add("eager", lambda: base.eager_dequantize(q, params, groups, bits, dtype))
        compiled = _compiled(base.eager_dequantize)
        case.add("compile", lambda: compiled(q, params, groups, bits, dtype))
        ds_dequant = getattr(ds, {torch.float32: "dequantize_fp32", torch.float16: "dequantize"}.get(dtype, ""), None)
        case.add(
            "deepspeed",
            ds_dequant and (lambda: ds_dequant(q, params, groups, bits, ds_type.Symmetric)),
            libs.deepspeed_reason or "no bf16 output",
        )
        if bnb is not None and bnb_block and bits == 8:
            bnb_q, bnb_state = bnb.quantize_blockwise(x, blocksize=bnb_block)
            case.add("bitsandbytes", lambda: bnb.dequantize_blockwise(bnb_q, bnb_state))
        else:
            case.add("bitsandbytes", None, bnb_reason or "8-bit only")
        case.add("qkit", lambda: qkit.dequantize(q, params, groups, bits, dtype=dtype))
        case.add("qkit_out", lambda: qkit.dequantize(q, params, groups, bits, out=out))
        return case

    if op == "swizzle_quantize":
        case = Case(op, numel * esize + code_bytes + param_bytes)
        case.add("eager", lambda: base.eager_stage1(x, groups, NODES, LOCAL))
        compiled = _compiled(base.eager_stage1)
        case.add("compile", lambda: compiled(x, groups, NODES, LOCAL))
        case.add(
            "deepspeed",
            ds and (lambda: ds.swizzle_quant(x, groups, bits, ds_type.Symmetric, 1, NODES, LOCAL)),
            libs.deepspeed_reason,
        )
        case.add("qkit", lambda: swizzle_quantize(x, groups, bits, True, 1, NODES, LOCAL))
        q, params = swizzle_quantize(x, groups, bits, True, 1, NODES, LOCAL)
        case.add("qkit_out", lambda: swizzle_quantize(x, groups, bits, True, 1, NODES, LOCAL, out=(q, params)))
        return case

    if op == "quantized_reduction":
        q, params = swizzle_quantize(x, groups, bits, True, 1, NODES, LOCAL)
        out_groups = groups // LOCAL
        case = Case(op, code_bytes + param_bytes + (code_bytes + param_bytes) // LOCAL)
        case.add("eager", lambda: base.eager_stage3(q, params, groups, LOCAL))
        compiled = _compiled(base.eager_stage3)
        case.add("compile", lambda: compiled(q, params, groups, LOCAL))
        case.add(
            "deepspeed",
            ds and (lambda: ds.quantized_reduction(q, params, groups, out_groups, bits, ds_type.Symmetric, LOCAL)),
            libs.deepspeed_reason,
        )
        case.add("qkit", lambda: quantized_reduction(q, params, groups, out_groups, bits, True, LOCAL))
        return case

    raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:100]}" if text else type(error).__name__


def _progress(total: int) -> Callable[[str], None]:
    """A progress bar on stderr (tqdm when installed); returns ``step(description)``."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, file=sys.stderr, leave=False, dynamic_ncols=True)

        def step_tqdm(description: str) -> None:
            bar.set_description(description)
            bar.update(1)
            if bar.n >= total:
                bar.close()

        return step_tqdm
    done = [0]

    def step_plain(description: str) -> None:
        done[0] += 1
        end = "\n" if done[0] >= total else ""
        print(f"\r[{done[0]}/{total}] {description:<60}", end=end, file=sys.stderr, flush=True)

    return step_plain


def _group_size(spec: str, numel: int, row: int) -> int:
    return min(row if spec == "row" else int(spec), numel)


def run(
    sizes: list[int],
    dtypes: list[torch.dtype],
    group_specs: list[str],
    ops: list[str],
    threads: list[int],
    repeat: int,
    device: str,
    row: int = 16384,
    show_progress: bool = True,
    warmup: float = WARMUP_SECONDS,
    allow_jit: bool = True,
) -> list[dict]:
    """Time every case; one row per (threads, numel, dtype, group, op). ``allow_jit=False``:
    no baseline is compiled just in time (DeepSpeed's op only when prebuilt)."""
    scalings = {FP_OPS[op][2] for op in ops if op in FP_OPS}
    libs = Baselines.load(device, allow_jit, mx="mx" in scalings, nvfp4="nvfp4" in scalings)
    total = len(threads) * len(sizes) * len(dtypes) * len(group_specs) * len(ops)
    step = _progress(total) if show_progress else (lambda description: None)
    rows = []
    for n_threads in threads:
        if device == "cpu":
            torch.set_num_threads(n_threads)
        for numel in sizes:
            for dtype in dtypes:
                x = torch.randn(numel, device=device).to(dtype)
                copy_into = torch.empty_like(x)
                for spec in group_specs:
                    group_size = _group_size(spec, numel, row)
                    for op in ops:
                        dtype_name = str(dtype).removeprefix("torch.")
                        step(f"{op} {dtype_name} g={spec} n={numel} t={n_threads}")
                        # The ceiling is re-read next to each case: on a shared machine it
                        # drifts within a run, and a ratio should compare like moments.
                        copy_s = time_seconds(lambda x=x, y=copy_into: y.copy_(x), repeat, device, warmup=warmup)
                        clone_s = time_seconds(x.clone, repeat, device, warmup=warmup)
                        ceilings = (copy_s, clone_s)
                        rows.append(
                            _time_case(op, x, group_size, spec, libs, ceilings, n_threads, repeat, device, warmup)
                        )
                        torch._dynamo.reset()  # every case compiles its own graph; keep the cache small
    return rows


def _time_case(
    op: str,
    x: Tensor,
    group_size: int,
    spec: str,
    libs: Baselines,
    ceilings: tuple[float, float],
    n_threads: int,
    repeat: int,
    device: str,
    warmup: float,
) -> dict:
    numel = x.numel()
    if op in FP_OPS and FP_OPS[op][2] in FIXED_BLOCKS:
        group_size, spec = FIXED_BLOCKS[FP_OPS[op][2]]  # the format fixes its blocks
    groups = numel // group_size
    copy_s, clone_s = ceilings  # seconds of x's copy into an existing buffer and of x.clone()
    row = {
        "op": op,
        "dtype": str(x.dtype).removeprefix("torch."),
        "group": spec,
        "group_size": group_size,
        "numel": numel,
        "threads": n_threads if device == "cpu" else None,
        "copy_gbps": 2 * numel * x.element_size() / copy_s / 1e9,
        "clone_gbps": 2 * numel * x.element_size() / clone_s / 1e9,
        "seconds": {},
        "gbps": {},
        "skipped": {},
    }
    if op in ("swizzle_quantize", "quantized_reduction") and groups % (NODES * LOCAL):
        row["skipped"] = {name: f"groups ({groups}) not a multiple of {NODES * LOCAL}" for name in IMPLS}
        return row
    case = build_case(op, x, groups, libs)
    row["nbytes"] = case.nbytes
    row["skipped"].update(case.skipped)
    for name, fn in case.impls.items():
        try:
            seconds = time_seconds(fn, repeat, device, warmup=warmup)
        except Exception as error:  # a baseline that fails on this shape is a finding, not a crash
            row["skipped"][name] = f"failed: {_first_line(error)}"
            continue
        row["seconds"][name] = seconds
        row["gbps"][name] = case.nbytes / seconds / 1e9
    return row


# ---------------------------------------------------------------- per-call latency


def run_latency(sizes: Iterable[int], device: str, number: int = 2000) -> list[dict]:
    """Microseconds per call (best of 5 batches) of qkit's ops and of ``torch.add`` on small tensors."""

    def per_call_us(fn: Callable[[], object]) -> float:
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

            def batch() -> None:
                for _ in range(number):
                    fn()
                torch.cuda.synchronize(device)

            return min(timeit.repeat(batch, number=1, repeat=5)) / number * 1e6
        return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6

    return [
        {"numel": numel, "us": {name: per_call_us(fn) for name, fn in _latency_calls(numel, device).items()}}
        for numel in sizes
    ]


def _latency_calls(numel: int, device: str) -> dict[str, Callable[[], object]]:
    x, y = torch.randn(numel, device=device), torch.randn(numel, device=device)
    groups = max(1, numel // 128)
    q, params = qkit.quantize(x, groups, 8)
    out = torch.empty_like(x)
    return {
        "torch.add": lambda: torch.add(x, y),
        "torch.ops.aten.add": lambda: torch.ops.aten.add.Tensor(x, y),
        "qkit.fake_quantize": lambda: qkit.fake_quantize(x, groups, 8),
        "qkit.fake_quantize out=": lambda: qkit.fake_quantize(x, groups, 8, out=out),
        "qkit.quantize": lambda: qkit.quantize(x, groups, 8),
        "qkit.quantize out=": lambda: qkit.quantize(x, groups, 8, out=(q, params)),
        "qkit.dequantize": lambda: qkit.dequantize(q, params, groups, 8, dtype=torch.float32),
        "qkit.dequantize out=": lambda: qkit.dequantize(q, params, groups, 8, out=out),
    }


# ---------------------------------------------------------------- reports


def _fmt(value: float | None, width: int, digits: int = 2) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def _ratio(ours: float | None, theirs: float | None) -> str:
    return f"{ours / theirs:>7.1f}x" if ours and theirs else f"{'-':>8}"


def print_table(rows: list[dict], impls: list[str]) -> None:
    headings = [_HEADINGS.get(name, name) for name in impls]
    print(
        f"{'op':<20}{'dtype':<9}{'group':>6}{'numel':>10}{'thr':>4}{'copy':>7}{'clone':>7}"
        + "".join(f"{h:>10}" for h in headings)
        + f"{'out=/copy':>10}{'new/clone':>10}{'x eager':>8}{'x comp':>8}{'x best':>8}   (GB/s; x = qkit fresh vs that)"
    )
    for r in rows:
        g = r["gbps"]
        ours = g.get("qkit")
        others = [v for k, v in g.items() if k not in ("qkit", "qkit_out")]
        fresh_or_out = g.get("qkit_out", ours)
        clone = r.get("clone_gbps")  # absent from reports written before it was timed

        print(
            f"{r['op']:<20}{r['dtype']:<9}{r['group']:>6}{r['numel']:>10}{r['threads'] or '':>4}{r['copy_gbps']:>7.1f}"
            + _fmt(clone, 7, 1)
            + "".join(_fmt(g.get(name), 10) for name in impls)
            + (f"{fresh_or_out / r['copy_gbps']:>10.0%}" if fresh_or_out else f"{'-':>10}")
            + (f"{ours / clone:>10.0%}" if ours and clone else f"{'-':>10}")
            + _ratio(ours, g.get("eager"))
            + _ratio(ours, g.get("compile"))
            + _ratio(ours, max(others) if others else None)
        )
    skipped = sorted({(name, reason) for r in rows for name, reason in r["skipped"].items()})
    if skipped:
        print("\nnot timed:")
        for name, reason in skipped:
            print(f"  {name}: {reason}")


def markdown_table(rows: list[dict], impls: list[str]) -> str:
    """The rows as a Markdown table (GB/s), for BENCHMARKS.md."""
    names = [_HEADINGS.get(name, name) for name in impls]
    lines = [
        "| op | dtype | group | threads | copy | clone | "
        + " | ".join(names)
        + " | out= of copy | fresh of clone | vs eager | vs compile |",
        "| --- " * (10 + len(impls)) + "|",
    ]
    for r in rows:
        g = r["gbps"]
        cells = [f"{g[name]:.2f}" if name in g else "-" for name in impls]
        best = g.get("qkit_out", g.get("qkit"))
        ours = g.get("qkit")
        share = f"{best / r['copy_gbps']:.0%}" if best else "-"
        clone = r.get("clone_gbps")  # absent from reports written before it was timed
        fresh_share = f"{ours / clone:.0%}" if ours and clone else "-"
        vs = [f"{ours / g[k]:.1f}x" if ours and k in g else "-" for k in ("eager", "compile")]
        lines.append(
            f"| {r['op']} | {r['dtype']} | {r['group']} | {r['threads'] or '-'} | {r['copy_gbps']:.1f} | "
            + (f"{clone:.1f} | " if clone else "- | ")
            + " | ".join(cells)
            + f" | {share} | {fresh_share} | {vs[0]} | {vs[1]} |"
        )
    return "\n".join(lines)


def print_latency(rows: list[dict]) -> None:
    names = list(rows[0]["us"])
    print(f"\nper-call time (us), best of 5 batches\n{'call':<26}" + "".join(f"{r['numel']:>10}" for r in rows))
    for name in names:
        print(f"{name:<26}" + "".join(f"{r['us'][name]:>10.2f}" for r in rows))


def environment(device: str) -> dict:
    """What the figures were measured on."""
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "qkit": qkit.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
        "QKIT_CPU_ISA": os.environ.get("QKIT_CPU_ISA", ""),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["baselines"] = {name: _installed_version(name) for name in ("deepspeed", "bitsandbytes")}
    return info


def _installed_version(distribution: str) -> str | None:
    """The installed version of a baseline library (None when absent), without importing it."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def plot(rows: list[dict], path: str, impls: list[str]) -> None:
    """GB/s against tensor size, one panel per op, with the copy roofline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit("qkit bench --plot needs matplotlib (pip install matplotlib)") from error
    ops = list(dict.fromkeys(r["op"] for r in rows))
    cols = min(3, len(ops))
    fig, axes = plt.subplots(
        (len(ops) + cols - 1) // cols, cols, figsize=(5 * cols, 3.6 * ((len(ops) + cols - 1) // cols))
    )
    axes = [axes] if len(ops) == 1 else list(getattr(axes, "flat", axes))
    for ax, op in zip(axes, ops, strict=False):
        mine = [r for r in rows if r["op"] == op]
        sizes = [r["numel"] for r in mine]
        ax.plot(sizes, [r["copy_gbps"] for r in mine], "k--", label="copy (roofline)")
        for name in impls:
            points = [(r["numel"], r["gbps"][name]) for r in mine if name in r["gbps"]]
            if points:  # one colour per implementation in every panel
                colour = f"C{IMPLS.index(name)}"
                ax.plot(*zip(*points, strict=True), marker="o", ms=3, color=colour, label=_HEADINGS.get(name, name))
        ax.set(xscale="log", yscale="log", title=f"{op} ({mine[0]['dtype']}, group {mine[0]['group']})")
        ax.set_xlabel("elements")
        ax.set_ylabel("GB/s")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[len(ops) :]:
        ax.axis("off")
    for ax in axes[: len(ops)]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _parse_sizes(text: str) -> list[int]:
    """``"1K,64K,32M"`` -> element counts; raises ValueError on anything else or on sizes < 1."""
    units = {"k": 2**10, "m": 2**20}
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        try:
            size = int(item[:-1]) * units[item[-1]] if item and item[-1] in units else int(item)
        except ValueError:
            raise ValueError(f"--sizes: {item!r} is not a size such as 4096, 64K or 32M") from None
        if size < 1:
            raise ValueError(f"--sizes: sizes must be >= 1, got {item!r}")
        out.append(size)
    return out


def _check_group_specs(specs: list[str]) -> None:
    for spec in specs:
        if spec != "row" and not (spec.isdigit() and int(spec) >= 1):
            raise ValueError(f"--groups: {spec!r} is neither a group size >= 1 nor 'row'")


def build_parser() -> argparse.ArgumentParser:
    """``qkit bench``'s command line (ci/gpu_check.sh's test parses its planned arguments with it)."""
    parser = argparse.ArgumentParser(prog="qkit bench", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32M", help="tensor sizes in elements, e.g. 32M or 1K,64K,1M,32M")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--groups", default="64,128,4096,row", help="group sizes; 'row' is one group per row")
    parser.add_argument("--row", type=int, default=16384, help="row length for --groups row")
    parser.add_argument("--ops", default=",".join(OPS), help=f"subset of {','.join(OPS)}")
    parser.add_argument("--threads", default=None, help="CPU thread counts to run, e.g. 1,2 (default: torch's)")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per implementation (median)")
    parser.add_argument(
        "--warmup", type=float, default=WARMUP_SECONDS, help="seconds of untimed calls per implementation first"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda[:N]); CUDA adds the GPU baselines")
    parser.add_argument(
        "--no-jit", action="store_true", help="never JIT-build a baseline: DeepSpeed's op is timed only when prebuilt"
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="write every figure and the machine as JSON")
    parser.add_argument("--plot", default=None, metavar="PNG", help="draw GB/s vs size (use several --sizes)")
    parser.add_argument("--latency", action="store_true", help="per-call time on 64..64K-element tensors")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--report", default=None, metavar="JSON", help="no run: print a saved --json report as Markdown (and --plot it)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            rows = json.load(f)["rows"]
        shown = [name for name in IMPLS if any(name in r["gbps"] for r in rows)]
        print(markdown_table(rows, shown))
        if args.plot:
            plot(rows, args.plot, shown)
        return 0

    try:
        sizes = _parse_sizes(args.sizes)
        _check_group_specs(args.groups.split(","))
    except ValueError as error:
        parser.error(str(error))
    if args.repeat < 1 or args.row < 1 or args.warmup < 0:
        parser.error("--repeat and --row must be >= 1 and --warmup >= 0")
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    ops = [o for o in args.ops.split(",") if o]
    for op in ops:
        if op not in OPS:
            parser.error(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    env = environment(args.device)
    print(
        f"qkit {env['qkit']}, torch {env['torch']}, {env.get('gpu', env['cpu'])}, device {args.device}, "
        f"threads {threads}, THP_MEM_ALLOC_ENABLE={env['THP_MEM_ALLOC_ENABLE'] or 'unset'}"
    )
    rows = run(
        sizes, dtypes, args.groups.split(","), ops, threads, args.repeat, args.device,
        row=args.row, show_progress=not args.no_progress, warmup=args.warmup, allow_jit=not args.no_jit,
    )  # fmt: skip
    shown = [name for name in IMPLS if any(name in r["gbps"] for r in rows)]
    print_table(rows, shown)
    latency = run_latency([64, 1024, 4096, 16384, 65536], args.device) if args.latency else []
    if latency:
        print_latency(latency)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": vars(args), "rows": rows, "latency": latency}, f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(rows, args.plot, shown)
        print(f"wrote {args.plot}")
    return 0
