"""``python -m qkit.bench.zeropp``: the ZeRO++ qgZ chain, qkit's fused ops vs eager PyTorch.

What one rank computes in :func:`qkit.distributed.all_to_all_quant_reduce`, timed per stage
on one device without the collectives (their buffers have the same sizes as the inputs
here, so the chain runs end to end): (1) swizzled 4-bit quantization, (3) the node
reduction (dequantize ``L`` tensors, fp32 sum, re-quantize), (5-6) dequantize and average
the ``N`` node chunks; plus the LoCo variants of (1) and (3). The eager versions are the
same math written in plain PyTorch (and, with ``--compile``, that code under
``torch.compile``). "match" is the largest difference between the eager and the fused
outputs (dequantized; for LoCo also the updated error buffers). Times are the best of
``--repeat`` calls.

``--gloo NxL`` also times the whole collective on ``N*L`` local gloo processes against an
fp32 averaging reduce-scatter (loopback: mostly compute on a small machine).
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import socket
from collections.abc import Callable

import torch
from torch import Tensor

import qkit
from qkit.bench.baselines import (
    eager_loco_stage1,
    eager_loco_stage3,
    eager_stage1,
    eager_stage3,
    eager_stage5,
)
from qkit.bench.cli import time_seconds
from qkit.distributed.plan import plan_qgz
from qkit.zeropp_ops import loco_quantized_reduction, loco_swizzle_quantize, quantized_reduction, swizzle_quantize

# ---------------------------------------------------------------- timing


def _best_ms(fn: Callable[[], object], repeat: int, device: str) -> float:
    """Best of ``repeat`` timed calls after a warm-up, in ms (robust on a shared machine)."""
    return 1e3 * time_seconds(fn, repeat, device, reduce=min)


def _deq4(q: Tensor, p: Tensor) -> Tensor:
    return qkit.dequantize(q.reshape(-1), p, p.shape[0], 4, True, torch.float32)


Case = tuple[Callable[[], object], Callable[[], object], Callable[[], float]]  # eager, qkit, max difference


def _deq_diff(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> float:
    return (_deq4(*a) - _deq4(*b)).abs().max().item()


def _diff(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def cases(x: Tensor, groups: int, nodes: int, local: int, beta: float = 0.8) -> dict[str, Case]:
    """The stages for gradient ``x`` (one rank's view), each as (eager, fused, check)."""
    g, world, dtype = groups, nodes * local, x.dtype
    q1, p1 = swizzle_quantize(x, g, 4, True, 1, nodes, local)
    q2, p2 = quantized_reduction(q1, p1, g, g // local, 4, True, local)

    def s1_eager():
        return eager_stage1(x, g, nodes, local)

    def s1_fused():
        return swizzle_quantize(x, g, 4, True, 1, nodes, local)

    def s3_eager(q=q1, p=p1):
        return eager_stage3(q, p, g, local)

    def s3_fused(q=q1, p=p1):
        return quantized_reduction(q, p, g, g // local, 4, True, local)

    def s5_eager(q=q2, p=p2):
        return eager_stage5(q, p, nodes, world, dtype)

    def s5_fused(q=q2, p=p2):
        vals = qkit.dequantize(q, p, g // local, 4, True, torch.float32)
        return vals.view(nodes, -1).sum(0).div_(world).to(dtype)

    def chain_eager():
        return s5_eager(*s3_eager(*s1_eager()))

    def chain_fused():
        return s5_fused(*s3_fused(*s1_fused()))

    e1 = {k: torch.zeros(x.numel(), dtype=dtype, device=x.device) for k in ("eager", "fused")}
    e3 = {k: torch.zeros(x.numel() // local, dtype=dtype, device=x.device) for k in ("eager", "fused")}

    def l1_eager(e=e1["eager"]):
        return eager_loco_stage1(x, e, beta, g, nodes, local)

    def l1_fused(e=e1["fused"]):
        return loco_swizzle_quantize(x, e, beta, g, 4, True, 1, nodes, local)

    def l3_eager(e=e3["eager"]):
        return eager_loco_stage3(q1, p1, e, beta, g, local)

    def l3_fused(e=e3["fused"]):
        return loco_quantized_reduction(q1, p1, e, beta, g, g // local, 4, True, local)

    def loco_check(eager_fn, fused_fn, like: Tensor) -> float:
        """From the same random error: largest difference of the outputs and of the updated errors."""
        ea = torch.randn(like.shape, device=like.device).to(like.dtype)
        eb = ea.clone()
        return max(_deq_diff(eager_fn(ea), fused_fn(eb)), _diff(ea, eb))

    return {
        "1 swizzle_quantize": (s1_eager, s1_fused, lambda: _deq_diff(s1_eager(), s1_fused())),
        "3 quantized_reduction": (s3_eager, s3_fused, lambda: _deq_diff(s3_eager(), s3_fused())),
        "5-6 dequantize+mean": (s5_eager, s5_fused, lambda: _diff(s5_eager(), s5_fused())),
        "chain 1-6": (chain_eager, chain_fused, lambda: _diff(chain_eager(), chain_fused())),
        "LoCo 1": (l1_eager, l1_fused, lambda: loco_check(l1_eager, l1_fused, e1["eager"])),
        "LoCo 3": (l3_eager, l3_fused, lambda: loco_check(l3_eager, l3_fused, e3["eager"])),
    }


def run(
    shape: tuple[int, int], dtypes: list[torch.dtype], nodes: int, local: int, repeat: int, device: str, compile: bool
) -> list[dict]:
    """Time every stage for every dtype; one row per (stage, dtype)."""
    world = nodes * local
    rows = []
    for dtype in dtypes:
        plan = plan_qgz(shape, dtype, world)
        if not plan.quantized:
            raise SystemExit(f"shape {shape} does not take the qgZ path at world {world}: {plan.detail}")
        x = torch.randn(shape, device=device).to(dtype)
        for name, (eager, fused, check) in cases(x, plan.groups, nodes, local).items():
            match = check()
            t_eager = _best_ms(eager, repeat, device)
            t_compiled = _best_ms(torch.compile(eager, dynamic=False), repeat, device) if compile else float("nan")
            t_fused = _best_ms(fused, repeat, device)
            rows.append(
                {
                    "stage": name,
                    "dtype": str(dtype).removeprefix("torch."),
                    "groups": plan.groups,
                    "eager_ms": t_eager,
                    "compiled_ms": t_compiled,
                    "qkit_ms": t_fused,
                    "match": match,
                }
            )
    return rows


# ---------------------------------------------------------------- optional: the collective on gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, world: int, local: int, port: int, shape: tuple[int, int], repeat: int, q) -> None:
    import os

    import torch.distributed as dist

    from qkit.distributed import all_to_all_quant_reduce, count_wire_bytes, hierarchical_groups
    from qkit.distributed.fallback import mean_reduce_scatter

    if os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    groups = hierarchical_groups(local)
    x = torch.randn(shape)
    res = {}
    for name, fn in (
        ("qgZ 4-bit", lambda: all_to_all_quant_reduce([x], groups)),
        ("fp32 reduce-scatter", lambda: mean_reduce_scatter([x], world, rank)),
    ):
        with count_wire_bytes() as c:
            fn()
        dist.barrier()
        # A count-based warm-up: a timed one would let ranks make different numbers of
        # collectives, and the one that stops first leaves the others waiting forever.
        t = 1e3 * time_seconds(fn, repeat, "cpu", reduce=min, warmup=0.0)
        res[name] = (t, c.bytes)
    if rank == 0:
        q.put(res)
    dist.destroy_process_group()


def run_gloo(nodes: int, local: int, shape: tuple[int, int], repeat: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.SimpleQueue()
    port, world = _free_port(), nodes * local
    procs = [
        ctx.Process(target=_gloo_rank, args=(r, world, local, port, shape, repeat, q), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
        if p.is_alive():
            p.kill()
    return q.get() if not q.empty() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qkit.bench.zeropp", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096,1024", help="gradient shape ROWS,COLS")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--topology", default="2x8", help="NODESxRANKS_PER_NODE the chain is laid out for")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="also time the eager code under torch.compile")
    parser.add_argument("--gloo", default=None, metavar="NxL", help="also time the collective on N*L gloo ranks")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    nodes, local = (int(s) for s in args.topology.lower().split("x"))
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    print(
        f"qkit {qkit.__version__}, torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads; "
        f"gradient {shape} laid out for {nodes} nodes x {local} ranks"
    )
    print(f"{'stage':<24}{'dtype':<10}{'G':>7}{'eager ms':>10}{'compile ms':>12}{'qkit ms':>9}{'vs eager':>10}  match")
    for r in run(shape, dtypes, nodes, local, args.repeat, args.device, args.compile):
        print(
            f"{r['stage']:<24}{r['dtype']:<10}{r['groups']:>7}{r['eager_ms']:>10.2f}{r['compiled_ms']:>12.2f}"
            f"{r['qkit_ms']:>9.2f}{r['eager_ms'] / r['qkit_ms']:>9.1f}x  {r['match']:.2g}"
        )
    if args.gloo:
        n, loc = (int(s) for s in args.gloo.lower().split("x"))
        res = run_gloo(n, loc, shape, args.repeat)
        print(f"\ncollective on {n * loc} local gloo ranks ({n}x{loc}), fp32 gradient {shape}, rank 0:")
        for name, (ms, nbytes) in res.items():
            print(f"  {name:<22}{ms:>9.1f} ms  {nbytes / 2**20:>8.2f} MiB sent")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
