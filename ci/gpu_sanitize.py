"""Every qkit op once on small, odd-sized tensors: the workload ci/gpu_check.sh runs under
``compute-sanitizer --tool memcheck`` and ``--tool racecheck``.

Each call runs on ``--device`` (cuda) and, unless it draws random numbers, again on the
CPU; the results must agree bit for bit (NaNs in the same places). The shapes are odd
on purpose: group sizes that are not multiples of a warp, of a vector width or of a
chunk, a group larger than one statistics chunk, more groups than one grid holds (the
grid-stride loops), a NaN group, an empty tensor. Run it under the sanitizer with
``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so that every tensor is its own allocation and an
access past its end is caught instead of landing in a neighbour from the same pool.

``--device cpu`` runs the same calls on the CPU only (tests/test_gpu_check.py does, so a
call that no longer matches an op's schema is found here, not on a lent GPU).
Exit status: 0 when every call ran and matched, 1 otherwise.

Usage: python ci/gpu_sanitize.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import qkit  # noqa: F401 - registers torch.ops.qkit

ops = torch.ops.qkit
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Call:
    """One op call; ``run(device)`` builds its inputs on ``device`` and returns every output."""

    name: str
    run: Callable[[str], list[Tensor]]
    random: bool = False  # draws random numbers: not compared with the CPU


def data(numel: int, dtype: torch.dtype, device: str, seed: int = 0, nan_at: int | None = None) -> Tensor:
    """Deterministic values (made on the CPU, then moved): the same input on every device."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * 3
    if nan_at is not None:
        x[nan_at] = float("nan")
    return x.to(dtype).to(device)


def core_calls(quick: bool) -> list[Call]:
    # (groups, group size): odd sizes, one group past a statistics chunk (8192), a
    # single element, and (unless --quick) more groups than 65,536 blocks' worth of warps.
    shapes = [(3, 37), (1, 1), (7, 1), (2, 2 * 8192 + 5), (5, 33)]
    if not quick:
        shapes.append((530_001, 1))
    calls = []
    for dtype in FLOATS:
        for groups, size in shapes:
            if dtype != torch.float32 and groups * size > 100_000:
                continue  # the huge grid once (fp32) is enough
            n = groups * size
            tag = f"{str(dtype).removeprefix('torch.')} g={groups}x{size}"
            for bits in (2, 3, 8) if size > 1 else (8,):
                for sym in (True, False):
                    calls.append(
                        Call(
                            f"fake_quantize {tag} b={bits} sym={sym}",
                            lambda d, n=n, dt=dtype, g=groups, b=bits, s=sym: [
                                ops.fake_quantize(data(n, dt, d), g, b, s, False)
                            ],
                        )
                    )
            calls.append(
                Call(
                    f"fake_quantize stochastic {tag}",
                    lambda d, n=n, dt=dtype, g=groups: [ops.fake_quantize(data(n, dt, d), g, 4, False, True)],
                    random=True,
                )
            )
            for bits in (8, 4) if size % 2 == 0 else (8,):
                for sym in (True, False):
                    calls.append(
                        Call(
                            f"quantize+dequantize {tag} b={bits} sym={sym}",
                            lambda d, n=n, dt=dtype, g=groups, b=bits, s=sym: _quantize_roundtrip(
                                data(n, dt, d), g, b, s
                            ),
                        )
                    )
        # in place, out=, a NaN group, an empty tensor, a non-contiguous input
        calls += [
            Call(f"fake_quantize_ {dtype}", lambda d, dt=dtype: _inplace(data(3 * 37, dt, d), 3)),
            Call(f"fake_quantize.out {dtype}", lambda d, dt=dtype: _fake_out(data(5 * 33, dt, d), 5)),
            Call(f"quantize.out+dequantize.out {dtype}", lambda d, dt=dtype: _quantize_out(data(6 * 10, dt, d), 6)),
            Call(f"NaN group {dtype}", lambda d, dt=dtype: [ops.fake_quantize(data(4 * 9, dt, d, nan_at=11), 4, 8)]),
            Call(f"empty {dtype}", lambda d, dt=dtype: [ops.fake_quantize(data(0, dt, d), 1, 8)]),
            Call(
                f"non-contiguous {dtype}",
                lambda d, dt=dtype: [ops.fake_quantize(data(9 * 14, dt, d).reshape(9, 14).t(), 7, 8)],
            ),
        ]
    return calls


def _quantize_roundtrip(x: Tensor, groups: int, bits: int, sym: bool) -> list[Tensor]:
    q, params = ops.quantize(x, groups, bits, sym)
    return [q, params, ops.dequantize(q, params, groups, bits, sym, x.dtype)]


def _inplace(x: Tensor, groups: int) -> list[Tensor]:
    ops.fake_quantize_(x, groups, 5, False, False)
    return [x]


def _fake_out(x: Tensor, groups: int) -> list[Tensor]:
    out = torch.empty_like(x)
    ops.fake_quantize.out(x, groups, 4, True, False, out=out)
    return [out]


def _quantize_out(x: Tensor, groups: int) -> list[Tensor]:
    q = torch.empty(x.numel() // 2, dtype=torch.int8, device=x.device)
    params = torch.empty(groups, 2, dtype=torch.float32, device=x.device)
    ops.quantize.out(x, groups, 4, False, q=q, params=params)
    out = torch.empty_like(x)
    ops.dequantize.out(q, params, groups, 4, False, out=out)
    return [q, params, out]


def zeropp_calls() -> list[Call]:
    # 2 nodes x 3 devices, pipeline 2: 12 groups of 10 (4-bit needs even group sizes).
    nodes, local, pipeline, groups, size = 2, 3, 2, 12, 10
    calls = []
    for dtype in FLOATS:
        n = groups * size
        for bits in (4, 8):
            for sym in (True, False):
                tag = f"{str(dtype).removeprefix('torch.')} b={bits} sym={sym}"
                calls.append(
                    Call(
                        f"swizzle_quantize+quantized_reduction {tag}",
                        lambda d, n=n, dt=dtype, b=bits, s=sym: _zeropp_chain(
                            data(n, dt, d), groups, b, s, pipeline, nodes, local
                        ),
                    )
                )
                calls.append(
                    Call(
                        f"loco chain {tag}",
                        lambda d, n=n, dt=dtype, b=bits, s=sym: _loco_chain(
                            data(n, dt, d), data(n, dt, d, seed=1) * 0.01, groups, b, s, pipeline, nodes, local
                        ),
                    )
                )
        calls.append(
            Call(f"dequantize_unsigned {dtype}", lambda d, dt=dtype: _dequantize_unsigned(d, dt)),
        )
    return calls


def _zeropp_chain(x: Tensor, groups: int, bits: int, sym: bool, pipeline: int, nodes: int, local: int) -> list[Tensor]:
    q, params = ops.swizzle_quantize(x, groups, bits, sym, pipeline, nodes, local)
    q2, params2 = torch.empty_like(q), torch.empty_like(params)
    ops.swizzle_quantize.out(x, groups, bits, sym, pipeline, nodes, local, q=q2, params=params2)
    q_sum, params_sum = ops.quantized_reduction(q, params, groups, groups // local, bits, sym, local)
    return [q, params, q2, params2, q_sum, params_sum]


def _loco_chain(
    x: Tensor, err: Tensor, groups: int, bits: int, sym: bool, pipeline: int, nodes: int, local: int
) -> list[Tensor]:
    q, params = ops.loco_swizzle_quantize(x, err, 0.8, groups, bits, sym, pipeline, nodes, local)
    err2 = torch.zeros(x.numel() // local, dtype=torch.float32, device=x.device)
    q_sum, params_sum = ops.loco_quantized_reduction(q, params, err2, 0.8, groups, groups // local, bits, sym, local)
    return [q, params, err, q_sum, params_sum, err2]


def _dequantize_unsigned(device: str, dtype: torch.dtype) -> list[Tensor]:
    num_groups, group_size = 5, 18
    out = []
    for bits in (8, 4):
        nbytes = num_groups * group_size * bits // 8
        raw = torch.randint(0, 256, (nbytes,), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
        scale = data(num_groups, dtype, device, seed=2).abs() + 1
        minv = data(num_groups, dtype, device, seed=3)
        out.append(ops.dequantize_unsigned(raw.to(device), scale, minv, num_groups, group_size, bits))
    return out


FP_CASES = [(f, "absmax") for f in ("e4m3", "e5m2", "e3m2", "e2m3", "e2m1")]
FP_CASES += [(f, "mx") for f in ("e4m3", "e3m2", "e2m1")] + [("e2m1", "nvfp4")]


def fp_calls() -> list[Call]:
    """The floating-point format ops (docs/ops.md §10), codes and scales compared as bytes."""
    calls = []
    for dtype in FLOATS:
        for fmt, scaling in FP_CASES:
            tag = f"{str(dtype).removeprefix('torch.')} {fmt} {scaling}"
            calls.append(Call(f"fp round trip {tag}", lambda d, dt=dtype, f=fmt, s=scaling: _fp_chain(d, dt, f, s)))
            calls.append(
                Call(
                    f"fake_quantize_fp stochastic {tag}",
                    lambda d, dt=dtype, f=fmt, s=scaling: [
                        ops.fake_quantize_fp(data(96 * 40, dt, d), 40, f, "absmax", True)
                    ],
                    random=True,
                )
            )
    return calls


def _fp_chain(device: str, dtype: torch.dtype, fmt: str, scaling: str) -> list[Tensor]:
    # 96 x 40 with a NaN: 3840 elements, 120 mx / 240 nvfp4 blocks, or 12 absmax groups of 320
    x = data(96 * 40, dtype, device, nan_at=1000).reshape(96, 40)
    groups = {"absmax": 12, "mx": x.numel() // 32, "nvfp4": x.numel() // 16}[scaling]
    codes, scales = ops.quantize_fp(x, groups, fmt, scaling)
    codes2, scales2 = torch.empty_like(codes), torch.empty_like(scales)
    ops.quantize_fp.out(x, groups, fmt, scaling, codes=codes2, scales=scales2)
    deq = ops.dequantize_fp(codes, scales, groups, fmt, scaling, dtype)
    deq2 = torch.empty_like(x)
    ops.dequantize_fp.out(codes, scales, groups, fmt, scaling, out=deq2)
    fake = ops.fake_quantize_fp(x, groups, fmt, scaling, False)
    fake2 = torch.empty_like(x)
    ops.fake_quantize_fp.out(x, groups, fmt, scaling, False, out=fake2)
    fake3 = x.t().contiguous().t()
    ops.fake_quantize_fp_(fake3, groups, fmt, scaling, False)
    as_bytes = [t.view(torch.uint8) for t in (codes, scales, codes2, scales2)]
    return [*as_bytes, deq, deq2, fake, fake2, fake3]


def same(got: Tensor, want: Tensor) -> bool:
    """Bit for bit, NaNs in the same places (their payloads may differ)."""
    got, want = got.detach().cpu(), want.detach().cpu()
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if got.is_floating_point():
        nan = torch.isnan(got)
        if not torch.equal(nan, torch.isnan(want)):
            return False
        got, want = got[~nan], want[~nan]
    return torch.equal(got, want)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="leave out the one large grid-stride case")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_sanitize.py: no CUDA device", file=sys.stderr)
        return 1
    calls = core_calls(args.quick) + zeropp_calls() + fp_calls()
    started = time.perf_counter()
    failures = []
    for call in calls:
        try:
            got = call.run(args.device)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize(args.device)
            if not call.random and args.device != "cpu":
                want = call.run("cpu")
                if len(got) != len(want) or not all(same(g, w) for g, w in zip(got, want, strict=True)):
                    failures.append(f"{call.name}: differs from the CPU")
        except Exception as error:  # report every failing call, not just the first
            failures.append(f"{call.name}: {type(error).__name__}: {str(error).strip().splitlines()[0][:200]}")
    for failure in failures:
        print(f"FAIL {failure}")
    seconds = time.perf_counter() - started
    print(f"gpu_sanitize.py: {len(calls)} calls on {args.device}, {len(failures)} failed ({seconds:.1f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
