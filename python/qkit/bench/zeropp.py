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

``--fsdp NxL`` times FSDP2 training steps of an MLP (``--fsdp-width``, ``--fsdp-layers``) on
``N*L`` local gloo processes with the default comms and with :func:`qkit.distributed.zeropp`
(4-bit gradients over two hops, 8-bit weights; and with LoCo; ``--grad-format e4m3``/``e5m2``
adds a run with FP8 gradients): per step, the whole step, the
time inside the comms, the part of it spent in torch.distributed's collectives, and the rest —
qkit's quantize/dequantize work (the default comms are a pass-through to the same collectives,
so they are timed the same way); and the gradient bytes rank 0 sent per step (the handle's
count; for the default comms, what the handles count as FSDP2's baseline) and the last step's loss.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
from collections.abc import Callable, Sequence

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

    import torch.distributed as dist

    from qkit.distributed import all_to_all_quant_reduce, count_wire_bytes, hierarchical_groups
    from qkit.distributed.comm import init_local_gloo
    from qkit.distributed.fallback import mean_reduce_scatter

    torch.set_num_threads(1)
    init_local_gloo(rank, world, port)
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


# ---------------------------------------------------------------- optional: FSDP2 steps on gloo

FSDP_RUNS = ("default", "qgZ + qwZ", "qgZ + qwZ + LoCo")


def fsdp_runs(grad_format: str | None = None) -> tuple[str, ...]:
    """The labels of ``--fsdp``'s runs: :data:`FSDP_RUNS`, plus one with FP8 gradients."""
    return FSDP_RUNS if grad_format is None else (*FSDP_RUNS, f"qgZ {grad_format} + qwZ")


class _Timer:
    """Seconds spent inside wrapped callables (``comm``: the FSDP2 comms; ``collective``:
    torch.distributed's collectives)."""

    def __init__(self) -> None:
        self.seconds = {"comm": 0.0, "collective": 0.0}

    def wrap(self, kind: str, fn: Callable[..., object]) -> Callable[..., object]:
        import time

        def timed(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[kind] += time.perf_counter() - start

        return timed


def _plain_comms(timer: _Timer) -> tuple[object, object]:
    """FSDP2 custom comms that call the default collectives (timed like qkit's)."""
    import torch.distributed as dist

    class Alloc:
        def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> Tensor:
            return torch.empty(size, dtype=dtype, device=device)

    class PlainReduceScatter(Alloc):
        def __call__(
            self, output_tensor: Tensor, input_tensor: Tensor, group: object, op: object, async_op: bool = False
        ) -> None:
            avg = getattr(op, "op", op) == dist.ReduceOp.AVG  # gloo has no AVG: sum, then divide
            fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            fn(output_tensor, input_tensor, op=dist.ReduceOp.SUM if avg else op, group=group)
            if avg:
                output_tensor.div_(dist.get_world_size(group))

    class PlainAllGather(Alloc):
        def __call__(self, output_tensor: Tensor, input_tensor: Tensor, group: object, async_op: bool = False) -> None:
            fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            fn(output_tensor, input_tensor, group=group)

    for cls in (PlainReduceScatter, PlainAllGather):
        cls.__call__ = timer.wrap("comm", cls.__call__)  # type: ignore[method-assign]
    return PlainReduceScatter(), PlainAllGather()


def _fsdp_rank(
    rank: int,
    world: int,
    local: int,
    port: int,
    width: int,
    layers: int,
    steps: int,
    warmup: int,
    q: object,
    grad_format: str | None = None,
) -> None:
    import statistics
    import time
    import warnings

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import qkit.distributed as qd
    from qkit.distributed import fsdp as qfsdp
    from qkit.distributed.comm import init_local_gloo

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    init_local_gloo(rank, world, port)
    timer = _Timer()
    for name in ("all_to_all_single", "all_gather_single", "reduce_scatter_single"):
        if hasattr(dist, name):
            setattr(dist, name, timer.wrap("collective", getattr(dist, name)))
    for cls in (qfsdp.QuantizedReduceScatter, qfsdp.QuantizedAllGather):
        cls.__call__ = timer.wrap("comm", cls.__call__)  # type: ignore[method-assign]
    res = {}
    baseline_bytes = 0.0
    for label in fsdp_runs(grad_format):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        handle = None
        if label == "default":
            rs, ag = _plain_comms(timer)
            for m in model.modules():
                if hasattr(m, "set_custom_reduce_scatter"):
                    m.set_custom_reduce_scatter(rs)
                    m.set_custom_all_gather(ag)
        elif label in FSDP_RUNS:
            loco = qd.LocoConfig() if "LoCo" in label else None
            handle = qd.zeropp(model, grad_bits=4, weight_bits=8, loco=loco, local_world_size=local)
        else:
            handle = qd.zeropp(model, grad_format=grad_format, weight_bits=8, local_world_size=local)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = torch.randn(32, width)
        rows = []
        for step in range(warmup + steps):  # the same count on every rank: no timed warm-up
            timer.seconds = dict.fromkeys(timer.seconds, 0.0)
            start = time.perf_counter()
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            total = time.perf_counter() - start
            if step >= warmup:
                rows.append((total, timer.seconds["comm"], timer.seconds["collective"]))
        ms = tuple(1e3 * statistics.median(r[i] for r in rows) for i in range(3))
        grad_bytes = baseline_bytes
        if handle is not None:
            wire = handle.wire_bytes()
            grad_bytes = wire["reduce_scatter"] / (warmup + steps)
            baseline_bytes = wire["baseline_reduce_scatter"] / (warmup + steps)
        res[label] = (*ms, grad_bytes, loss.item())
        dist.barrier()
    res["default"] = (*res["default"][:3], baseline_bytes, res["default"][4])  # runs first, counted by the others
    if rank == 0:
        q.put(res)  # type: ignore[attr-defined]
    dist.destroy_process_group()


def run_fsdp(
    nodes: int, local: int, width: int, layers: int, steps: int, warmup: int = 3, grad_format: str | None = None
) -> dict:
    """Rank 0's median per-step (step, comms, collectives) ms, gradient bytes sent per step and
    last loss, for each of :func:`fsdp_runs` ``(grad_format)``."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.SimpleQueue()
    port, world = _free_port(), nodes * local
    procs = [
        ctx.Process(
            target=_fsdp_rank, args=(r, world, local, port, width, layers, steps, warmup, q, grad_format), daemon=True
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    for p in procs:
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
    parser.add_argument("--fsdp", default=None, metavar="NxL", help="time FSDP2 steps on N*L gloo ranks (only this)")
    parser.add_argument("--fsdp-width", type=int, default=1024, help="--fsdp: the MLP's width")
    parser.add_argument("--fsdp-layers", type=int, default=4, help="--fsdp: the MLP's Linear layers")
    parser.add_argument("--fsdp-steps", type=int, default=10, help="--fsdp: timed steps (after 3 untimed)")
    parser.add_argument(
        "--grad-format", default=None, choices=("e4m3", "e5m2"), help="--fsdp: add a run with FP8 gradients"
    )
    args = parser.parse_args(argv)
    if args.fsdp:
        return _main_fsdp(args)
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


def _main_fsdp(args: argparse.Namespace) -> int:
    n, loc = (int(s) for s in args.fsdp.lower().split("x"))
    print(
        f"qkit {qkit.__version__}, torch {torch.__version__}; FSDP2 on {n * loc} local gloo ranks ({n}x{loc}), "
        f"MLP {args.fsdp_layers} x Linear({args.fsdp_width}, {args.fsdp_width}), fp32, batch 32 per rank, "
        f"1 thread per rank; median of {args.fsdp_steps} steps, rank 0, ms"
    )
    res = run_fsdp(n, loc, args.fsdp_width, args.fsdp_layers, args.fsdp_steps, grad_format=args.grad_format)
    if not res:
        print("the gloo ranks failed or timed out")
        return 1
    base = res["default"]
    print(
        f"{'comms':<20}{'step':>9}{'in comms':>10}{'collectives':>13}{'quant/dequant':>15}{'step vs default':>17}"
        f"{'grad KiB/step':>15}{'vs default':>12}{'last loss':>12}"
    )
    for label, (step, comm, coll, grad_bytes, loss) in res.items():
        print(
            f"{label:<20}{step:>9.1f}{comm:>10.1f}{coll:>13.1f}{comm - coll:>15.1f}{step / base[0]:>16.2f}x"
            f"{grad_bytes / 1024:>15.1f}{grad_bytes / base[3]:>11.3f}x{loss:>12.6g}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
