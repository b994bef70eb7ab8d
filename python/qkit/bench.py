"""``python -m qkit.bench`` (or ``qkit bench``): qkit's kernels against what users have.

For each case it times, in one run on the same tensors: a plain copy of the same
bytes (the memory-bandwidth ceiling), the same math written in eager PyTorch,
that eager code under ``torch.compile``, and the qkit op. Bandwidth counts the
bytes each op must read and write once. Figures are medians of ``--repeat`` calls.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

import qkit


def eager_fake_quantize(x: Tensor, groups: int, bits: int) -> Tensor:
    """Symmetric group-wise fake quantization as a user would write it in eager PyTorch."""
    g = x.float().reshape(groups, -1)
    m = g.abs().amax(dim=1, keepdim=True)
    scale = torch.where(m == 0, torch.ones_like(m), 2.0 ** (bits - 1) / m)
    q = (g * scale).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).round()
    return (q * (1.0 / scale)).to(x.dtype).reshape(x.shape)


def eager_quantize(x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    g = x.float().reshape(groups, -1)
    m = g.abs().amax(dim=1, keepdim=True)
    scale = torch.where(m == 0, torch.ones_like(m), 128.0 / m)
    q = (g * scale).clamp(-128, 127).round().to(torch.int8)
    return q.reshape(x.shape), 1.0 / scale


def eager_dequantize(q: Tensor, params: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    return (q.reshape(groups, -1).float() * params).to(dtype).reshape(q.shape)


def time_seconds(
    fn: Callable[[], object],
    repeat: int,
    device: str = "cpu",
    reduce: Callable[[list[float]], float] = statistics.median,
) -> float:
    """``reduce`` (median by default, ``min`` for best-of) over ``repeat`` timed calls of
    ``fn`` after one warm-up call (which also compiles), synchronizing a CUDA device."""

    def call() -> None:
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return reduce(times)


def run(numel: int, dtypes: list[torch.dtype], group_sizes: list[int], repeat: int, device: str) -> list[dict]:
    rows = []
    for dtype in dtypes:
        x = torch.randn(numel, device=device).to(dtype)
        out = torch.empty_like(x)
        esize = x.element_size()
        copy_s = time_seconds(lambda x=x, out=out: out.copy_(x), repeat, device)
        copy_gbps = 2 * numel * esize / copy_s / 1e9
        for group_size in group_sizes:
            groups = numel // group_size
            q, params = qkit.quantize(x, groups, 8)
            compiled_fq = torch.compile(eager_fake_quantize, dynamic=False)
            compiled_q = torch.compile(eager_quantize, dynamic=False)
            compiled_dq = torch.compile(eager_dequantize, dynamic=False)
            cases = {
                "fake_quantize 8b": (
                    2 * numel * esize,
                    lambda x=x, g=groups: eager_fake_quantize(x, g, 8),
                    lambda x=x, g=groups, f=compiled_fq: f(x, g, 8),
                    lambda x=x, g=groups: qkit.fake_quantize(x, g, 8),
                ),
                "quantize 8b": (
                    numel * (esize + 1),
                    lambda x=x, g=groups: eager_quantize(x, g),
                    lambda x=x, g=groups, f=compiled_q: f(x, g),
                    lambda x=x, g=groups: qkit.quantize(x, g, 8),
                ),
                "dequantize 8b": (
                    numel * (esize + 1),
                    lambda q=q, p=params, g=groups, d=dtype: eager_dequantize(q, p, g, d),
                    lambda q=q, p=params, g=groups, d=dtype, f=compiled_dq: f(q, p, g, d),
                    lambda q=q, p=params, g=groups, d=dtype: qkit.dequantize(q, p, g, 8, dtype=d),
                ),
            }
            for name, (nbytes, eager, compiled, ours) in cases.items():
                t_eager, t_compiled, t_qkit = (time_seconds(f, repeat, device) for f in (eager, compiled, ours))
                rows.append(
                    {
                        "op": name,
                        "dtype": str(dtype).removeprefix("torch."),
                        "group": group_size,
                        "copy_gbps": copy_gbps,
                        "eager_gbps": nbytes / t_eager / 1e9,
                        "compiled_gbps": nbytes / t_compiled / 1e9,
                        "qkit_gbps": nbytes / t_qkit / 1e9,
                    }
                )
    return rows


def run_inplace(numel: int, dtypes: list[torch.dtype], group_sizes: list[int], repeat: int, device: str) -> None:
    """The kernel without the output allocation: ``fake_quantize_`` in place vs a copy into
    an existing buffer (a fresh 32M-element output costs more than either)."""
    print(f"{'dtype':<10}{'group':>7}{'copy':>8}{'in place':>10}{'of copy':>9}   (GB/s)")
    for dtype in dtypes:
        x = torch.randn(numel, device=device).to(dtype)
        y, out = x.clone(), torch.empty_like(x)
        nbytes = 2 * numel * x.element_size()
        copy_gbps = nbytes / time_seconds(lambda x=x, out=out: out.copy_(x), repeat, device) / 1e9
        for group_size in group_sizes:
            t = time_seconds(lambda y=y, g=numel // group_size: qkit.fake_quantize_(y, g, 8), repeat, device)
            gbps = nbytes / t / 1e9
            print(
                f"{str(dtype).removeprefix('torch.'):<10}{group_size:>7}{copy_gbps:>8.1f}{gbps:>10.1f}"
                f"{gbps / copy_gbps:>9.0%}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qkit bench", description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=32 * 2**20)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--groups", default="128,4096", help="group sizes (elements)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--inplace", action="store_true", help="time fake_quantize_ in place (no allocation)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    sizes = [int(s) for s in args.groups.split(",")]
    print(
        f"qkit {qkit.__version__}, torch {torch.__version__}, device {args.device}, "
        f"{torch.get_num_threads()} threads, {args.numel / 2**20:.0f}M elements"
    )
    if args.inplace:
        run_inplace(args.numel, dtypes, sizes, args.repeat, args.device)
        return 0
    print(
        f"{'op':<18}{'dtype':<10}{'group':>7}{'copy':>8}{'eager':>8}{'compile':>9}{'qkit':>8}"
        f"{'qkit/copy':>11}{'vs eager':>10}{'vs compile':>11}   (GB/s)"
    )
    for r in run(args.numel, dtypes, sizes, args.repeat, args.device):
        print(
            f"{r['op']:<18}{r['dtype']:<10}{r['group']:>7}{r['copy_gbps']:>8.1f}{r['eager_gbps']:>8.2f}"
            f"{r['compiled_gbps']:>9.2f}{r['qkit_gbps']:>8.2f}{r['qkit_gbps'] / r['copy_gbps']:>10.0%}"
            f"{r['qkit_gbps'] / r['eager_gbps']:>9.1f}x{r['qkit_gbps'] / r['compiled_gbps']:>10.1f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
