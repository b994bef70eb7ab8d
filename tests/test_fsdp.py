"""qkit's FSDP2 custom comms (qkit.distributed.fsdp) on gloo, 127.0.0.1, worlds 2, 4 and 8.

Each world is spawned once (forkserver processes, every collective under a process-group
timeout and the whole world under SPAWN_TIMEOUT_S, after which every rank is killed). Every
rank runs the checks below and saves what it got; the parent then compares:

- each comm's output, bit for bit, with a pure-PyTorch reference of the same
  quantize -> exchange -> fp32 sum (rank order) -> op -> cast, built on ``reference.py``'s
  independent quantizer (no qkit op in the reference);
- 3 training steps of a small MLP (``fully_shard`` per layer, odd sizes so FSDP2 pads) with
  ``zeropp(grad_bits=4, weight_bits=8)`` against the default comms from the same seed;
- the handle's byte counts against counts taken by wrapping ``torch.distributed``'s
  ``all_to_all_single`` / ``all_gather_single`` / ``reduce_scatter_single``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from helpers import check_results, mse_steps, run_rank_checks, spawn_check_world
from qkit.distributed.fsdp import predicted_bytes
from reference import ref_dequantize, ref_quantize

WORLDS = [2, 4, 8]
TIMEOUT_S = 60  # every collective
SPAWN_TIMEOUT_S = 240  # a whole world
STEPS = 3
LOSS_RTOL = 5e-3  # measured: at most 9.4e-4 at worlds 2 and 4; |loss(zeropp) - loss(default)| <= this * loss(default)

# Direct calls of the comms: (name, shard elements s, dtype, bits, group_size)
RS_CASES = [
    ("f32_odd", 9, torch.float32, 4, None),
    ("bf16_odd", 13, torch.bfloat16, 4, None),
    ("f32_one", 1, torch.float32, 4, None),
    ("f32_two_groups", 300, torch.float32, 4, None),
    ("f16_8bit", 40, torch.float16, 8, 16),
    ("f32_small_groups", 37, torch.float32, 4, 6),
    ("bf16_empty", 0, torch.bfloat16, 4, None),  # an empty shard: nothing to exchange, on every rank
]
AG_CASES = [
    ("f32_odd", 9, torch.float32, 8, None),
    ("bf16_odd", 13, torch.bfloat16, 8, None),
    ("f32_4bit_odd", 11, torch.float32, 4, 4),
    ("f32_two_groups", 3000, torch.float32, 8, None),
    ("f16_one", 1, torch.float16, 8, None),
    ("f32_empty", 0, torch.float32, 8, None),
]
PREMUL = 0.3


def rank_input(numel: int, dtype: torch.dtype, rank: int, salt: int) -> torch.Tensor:
    """Rank ``rank``'s deterministic input (the same in every process); group maxima vary."""
    g = torch.Generator().manual_seed(7919 * salt + rank)
    x = torch.randn(numel, generator=g, dtype=torch.float64) * (1 + torch.rand(numel, generator=g, dtype=torch.float64))
    return x.to(dtype)


def _ops() -> dict[str, Any]:
    from torch.distributed.distributed_c10d import ReduceOp

    return {"sum": ReduceOp.SUM, "avg": ReduceOp.AVG, "premul": ReduceOp.PREMUL_SUM(PREMUL)}


# ---------------------------------------------------------------- worker side


class BoundaryCounter:
    """Bytes sent to other ranks through torch.distributed's tensor collectives, by function name,
    from the input each call hands over and its group's size ``k``: an all-to-all or a
    reduce-scatter keeps its own ``1/k`` of the input, an all-gather sends its input ``k - 1``
    times. ``calls`` lists ``(name, k, input bytes)``."""

    NAMES = ("all_to_all_single", "all_gather_single", "reduce_scatter_single")

    def __init__(self) -> None:
        self.bytes = dict.fromkeys(self.NAMES, 0)
        self.calls: list[tuple[str, int, int]] = []
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> BoundaryCounter:
        import torch.distributed as dist

        for name in self.NAMES:
            fn = getattr(dist, name)
            self._saved[name] = fn

            def wrapped(*args: Any, _fn: Any = fn, _name: str = name, **kwargs: Any) -> Any:
                inp = kwargs.get("input", args[1] if len(args) > 1 else None)
                k = dist.get_world_size(kwargs.get("group"))
                nbytes = inp.numel() * inp.element_size()
                self.calls.append((_name, k, nbytes))
                self.bytes[_name] += nbytes * (k - 1) if _name == "all_gather_single" else nbytes * (k - 1) // k
                return _fn(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc: object) -> None:
        import torch.distributed as dist

        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _check_reduce_scatter(rank: int, world: int) -> dict:
    import qkit.distributed as qd

    out = {}
    for salt, (name, s, dtype, bits, gs) in enumerate(RS_CASES):
        for op_name, op in _ops().items():
            comm = qd.QuantizedReduceScatter(bits=bits, group_size=gs)
            inp = comm.allocate((world * s,), dtype=dtype, device=torch.device("cpu"))
            inp.copy_(rank_input(world * s, dtype, rank, salt))
            before = inp.clone()
            res = comm.allocate((s,), dtype=dtype, device=torch.device("cpu"))
            with BoundaryCounter() as counter:
                ret = comm(res, inp, torch.distributed.group.WORLD, op)
            out[(name, op_name)] = {
                "out": res,
                "ret": ret,
                "input_unchanged": torch.equal(before, inp),
                "bytes": counter.bytes,
                "stats": comm.stats.as_dict(),
            }
    return out


def _check_all_gather(rank: int, world: int) -> dict:
    import qkit.distributed as qd

    out = {}
    for salt, (name, m, dtype, bits, gs) in enumerate(AG_CASES):
        comm = qd.QuantizedAllGather(bits=bits, group_size=gs)
        res = comm.allocate((world * m,), dtype=dtype, device=torch.device("cpu"))
        res.fill_(float("nan"))
        shard = res.narrow(0, rank * m, m)  # FSDP2 passes a view into the output
        shard.copy_(rank_input(m, dtype, rank, 100 + salt))
        with BoundaryCounter() as counter:
            ret = comm(res, shard, torch.distributed.group.WORLD)
        out[name] = {"out": res, "ret": ret, "bytes": counter.bytes, "stats": comm.stats.as_dict()}
    return out


def make_model(param_dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(1234)
    # odd sizes: FSDP2 pads dim 0 to a multiple of the world size
    model = torch.nn.Sequential(
        torch.nn.Linear(17, 67), torch.nn.Tanh(), torch.nn.Linear(67, 45), torch.nn.Tanh(), torch.nn.Linear(45, 5)
    )
    return model.to(param_dtype)


# label -> (param dtype, fully_shard kwargs name, gradient divide factor as a multiple of the world, LoCo,
# local_world_size)
RUNS: dict[str, tuple[torch.dtype, str, int | None, bool, int | None]] = {
    "fp32": (torch.float32, "plain", None, False, None),
    "bf16": (torch.bfloat16, "plain", None, False, None),
    "fp16": (torch.float16, "plain", None, False, None),
    "mp": (torch.float32, "bf16_params_fp32_reduce", None, False, None),  # AVG on bf16 all-gathers, fp32 reduce
    "fp16_reduce": (torch.float32, "fp16_reduce", None, False, None),  # FSDP2: SUM with pre/post divide
    "no_reshard": (torch.float32, "no_reshard", None, False, None),  # reshard_after_forward=False
    "divide": (torch.float32, "plain", 2, False, None),  # set_gradient_divide_factor(2 W): PREMUL_SUM(1 / (2 W))
    "loco": (torch.float32, "plain", None, True, None),  # LocoConfig(0.8, 1024)
    "two_hop": (torch.float32, "plain", None, False, 2),  # 2 ranks per node (one hop at world 2)
    "two_hop_loco": (torch.float32, "plain", None, True, 2),
}
# world 8 on 2 cores: the runs that say most, kept few
RUNS_WORLD8 = ("fp32", "bf16", "two_hop", "two_hop_loco")


def _shard_kwargs(name: str) -> dict[str, Any]:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return {
        "plain": {},
        "bf16_params_fp32_reduce": {
            "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        },
        "fp16_reduce": {"mp_policy": MixedPrecisionPolicy(reduce_dtype=torch.float16)},
        "no_reshard": {"reshard_after_forward": False},
    }[name]


def _train(rank: int, world: int, label: str, zero: bool) -> dict:
    from torch.distributed.fsdp import fully_shard

    import qkit.distributed as qd
    import qkit.distributed.fsdp as fsdp_impl

    param_dtype, kw_name, divide, use_loco, local_world_size = RUNS[label]
    kw = _shard_kwargs(kw_name)
    model = make_model(param_dtype)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, **kw)
    fully_shard(model, **kw)
    lr = 0.05
    if divide is not None and zero:
        # gloo has no PREMUL_SUM, so the default run averages (factor W); dividing by
        # divide * W instead and scaling the learning rate by `divide` takes the same steps
        for m in model.modules():
            if isinstance(m, type(model)) or hasattr(m, "set_gradient_divide_factor"):
                m.set_gradient_divide_factor(float(divide * world))
        lr *= divide
    loco = qd.LocoConfig(beta=0.8, reset_T=1024) if use_loco else None
    handle = (
        qd.zeropp(model, grad_bits=4, weight_bits=8, loco=loco, local_world_size=local_world_size) if zero else None
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(99 + rank)
    losses: list[float] = []
    ops_seen: list[tuple[str, float]] = []
    real_op_scale = fsdp_impl._op_scale

    def op_scale(op: Any, k: int) -> tuple[str, float]:  # records the op FSDP2 passed
        ops_seen.append(real_op_scale(op, k))
        return ops_seen[-1]

    fsdp_impl._op_scale = op_scale
    with BoundaryCounter() as counter:
        for _ in range(STEPS):
            x = torch.randn(16, 17, generator=gen).to(param_dtype)
            y = torch.randn(16, 5, generator=gen).to(param_dtype)
            loss = ((model(x).float() - y.float()) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    fsdp_impl._op_scale = real_op_scale
    return {
        "losses": losses,
        "ops": sorted(set(ops_seen)),
        "boundary": counter.bytes,
        "wire": handle.wire_bytes() if handle else None,
        "state": handle.state_dict() if handle else None,
    }


def _labels(world: int) -> tuple[str, ...]:
    return RUNS_WORLD8 if world >= 8 else tuple(RUNS)


def _check_training(rank: int, world: int) -> dict:
    return {
        label: {"default": _train(rank, world, label, False), "zeropp": _train(rank, world, label, True)}
        for label in _labels(world)
    }


def _expect(exc: type[BaseException], fn: Any) -> str:
    try:
        fn()
    except exc as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _check_handle(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    import qkit.distributed as qd

    def sharded() -> torch.nn.Module:
        model = make_model(torch.float32)
        fully_shard(model)
        return model

    out: dict[str, Any] = {}
    h = qd.zeropp(sharded())
    h.stats["reduce_scatter"].load({"calls": 3, "sent": 30, "baseline": 300})
    h.stats["all_gather"].load({"calls": 2, "sent": 20, "baseline": 80})
    sd = h.state_dict()
    h2 = qd.zeropp(sharded())
    h2.load_state_dict(torch.load(_roundtrip(sd, rank), weights_only=True))
    out["roundtrip"] = (h2.state_dict() == sd, h2.wire_bytes())
    # a bad state changes nothing: the first stats are fine, the second are not
    bad = {**sd, "stats": {**sd["stats"], "all_gather": {"calls": 1, "sent": -1, "baseline": 0}}}
    h3 = qd.zeropp(sharded())
    before = h3.state_dict()
    out["bad_stats"] = (_expect(ValueError, lambda: h3.load_state_dict(bad)), h3.state_dict() == before)
    h4 = qd.zeropp(sharded(), grad_bits=8)
    out["bad_config"] = _expect(ValueError, lambda: h4.load_state_dict(sd))
    h5 = qd.zeropp(sharded(), weight_bits=None)
    out["weight_default"] = (h5.all_gather is None, sorted(h5.state_dict()["stats"]))
    out["loco"] = _expect(TypeError, lambda: qd.zeropp(sharded(), loco=object()))
    out["loco_hyper"] = _expect(ValueError, lambda: qd.LocoConfig(beta=1.5))
    # LoCo state: a malformed error buffer, or another model's module names, change nothing
    hl = qd.zeropp(sharded(), loco=qd.LocoConfig())
    sd_l = hl.state_dict()
    name = next(iter(sd_l["loco"]))
    bad_l = {
        **sd_l,
        "loco": {
            **sd_l["loco"],
            name: {"error": torch.zeros(3), "inter_error": None, "steps": 1, "layout": [2, 9, 10, "float32"]},
        },
    }
    before = hl.state_dict()
    out["bad_loco"] = (_expect(ValueError, lambda: hl.load_state_dict(bad_l)), _same(hl.state_dict(), before))
    other = {**sd_l, "loco": {"nope": sd_l["loco"][name]}}
    out["bad_loco_names"] = _expect(ValueError, lambda: hl.load_state_dict(other))
    out["loco_vs_plain"] = _expect(ValueError, lambda: h2.load_state_dict(sd_l))
    out["bad_local_world_size"] = _expect(ValueError, lambda: qd.zeropp(sharded(), local_world_size=world + 1))
    # ranks that resolve different topologies: every rank raises the same error
    # rank 0 alone would build the two-hop subgroups (a collective the others never join)
    out["local_mismatch"] = _expect(ValueError, lambda: qd.zeropp(sharded(), local_world_size=None if rank else 2))
    out["compiled"] = _expect(NotImplementedError, lambda: qd.zeropp(torch.compile(sharded())))
    out["no_fsdp"] = _expect(ValueError, lambda: qd.zeropp(make_model(torch.float32)))
    # ranks that disagree: every rank raises the same error
    out["mismatch"] = _expect(ValueError, lambda: qd.zeropp(sharded(), grad_bits=4 if rank == 0 else 8))
    out["bad_bits"] = _expect(ValueError, lambda: qd.QuantizedReduceScatter(bits=3))
    out["hsdp"] = _hsdp(world)
    return out


def _same(a: Any, b: Any) -> bool:
    """Equality of nested state dicts that may hold tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _hsdp(world: int) -> str:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import qkit.distributed as qd

    if world % 2 != 0:
        return "skipped"
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    model = make_model(torch.float32)
    fully_shard(model, mesh=mesh)
    return _expect(NotImplementedError, lambda: qd.zeropp(model))


def _roundtrip(obj: Any, rank: int) -> Any:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


LOCO_CASES = [
    ("f32_odd", 13, torch.float32, None, None),
    ("bf16_odd", 9, torch.bfloat16, None, None),
    ("f32_two_groups", 300, torch.float32, None, None),
]
LOCO_BETA, LOCO_RESET_T, LOCO_CALLS = 0.5, 3, 5


def _check_loco_reduce_scatter(rank: int, world: int) -> dict:
    import qkit.distributed as qd

    out = {}
    for salt, (name, s, dtype, _, _) in enumerate(LOCO_CASES):
        comm = qd.QuantizedReduceScatter(bits=4, loco=qd.LocoConfig(beta=LOCO_BETA, reset_T=LOCO_RESET_T))
        outs = []
        for call in range(LOCO_CALLS):
            inp = rank_input(world * s, dtype, rank, 1000 + 10 * salt + call)
            res = torch.empty(s, dtype=dtype)
            comm(res, inp, torch.distributed.group.WORLD, _ops()["avg"])
            outs.append(res)
        out[name] = {"outs": outs, "error": comm.error.clone(), "steps": comm.steps}
    return out


def _resume_model(
    rank: int, loco: Any, local_world_size: int | None = None
) -> tuple[torch.nn.Module, Any, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    import qkit.distributed as qd

    model = make_model(torch.float32)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    handle = qd.zeropp(model, grad_bits=4, weight_bits=8, loco=loco, local_world_size=local_world_size)
    return model, handle, torch.optim.SGD(model.parameters(), lr=0.05)


def _resume_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, steps: range) -> list[float]:
    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(7 * step + 1000 * rank)
        return torch.randn(16, 17, generator=gen), torch.randn(16, 5, generator=gen)

    return mse_steps(model, opt, steps, batch)


def _local(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.to_local().detach().clone() for k, v in model.state_dict().items()}


def _check_resume(rank: int, world: int) -> dict:
    """One hop, and two hops (2 ranks per node) where the world has two nodes or more."""
    return {lws: _resume(rank, lws) for lws in [None, *([2] if world >= 4 else [])]}


def _resume(rank: int, lws: int | None) -> dict:
    import io

    import qkit.distributed as qd

    loco = qd.LocoConfig(beta=0.8, reset_T=1024)
    # one run of 4 steps
    model, _, opt = _resume_model(rank, loco, lws)
    straight = _resume_steps(model, opt, rank, range(4))
    straight_params = _local(model)
    # 2 steps, checkpoint (this rank's shards + the handle's state), fresh processes' worth of
    # objects, 2 more steps; SGD without momentum has no state to save
    model, handle, opt = _resume_model(rank, loco, lws)
    first = _resume_steps(model, opt, rank, range(2))
    buf = io.BytesIO()
    torch.save({"model": _local(model), "zeropp": handle.state_dict()}, buf)
    del model, handle, opt
    out: dict[str, Any] = {"straight": straight, "straight_params": straight_params}
    for label, load_zeropp in (("resumed", True), ("resumed_without_loco_state", False)):
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        model, handle, opt = _resume_model(rank, loco, lws)
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.to_local().copy_(ckpt["model"][k])
        if load_zeropp:
            handle.load_state_dict(ckpt["zeropp"])
        out[label] = first + _resume_steps(model, opt, rank, range(2, 4))
        out[f"{label}_params"] = _local(model)
    used = [d for d in ckpt["zeropp"]["loco"].values() if d["error"] is not None]  # the root holds no parameter
    out["has_inter_error"] = bool(used) and all(d["inter_error"] is not None for d in used)
    return out


# Two hops: (name, chunk elements s, dtype, bits, group_size)
HOP_CASES = [
    ("f32_odd", 9, torch.float32, 4, None),
    ("bf16_odd", 13, torch.bfloat16, 4, None),
    ("f16_8bit", 40, torch.float16, 8, 16),
    ("f32_two_groups", 300, torch.float32, 4, None),
]


def _local_sizes(world: int) -> list[int]:
    """Ranks per node that give two real hops at this world."""
    return [lws for lws in (2, 4) if world % lws == 0 and 1 < lws < world]


def _check_two_hop(rank: int, world: int) -> dict:
    import qkit.distributed as qd

    out: dict[Any, Any] = {}
    for lws in _local_sizes(world):
        for salt, (name, s, dtype, bits, gs) in enumerate(HOP_CASES):
            for op_name, op in _ops().items():
                comm = qd.QuantizedReduceScatter(bits=bits, group_size=gs, local_world_size=lws)
                inp = rank_input(world * s, dtype, rank, 500 + salt)
                before = inp.clone()
                res = torch.empty(s, dtype=dtype)
                with BoundaryCounter() as counter:
                    comm(res, inp, torch.distributed.group.WORLD, op)
                out[(lws, name, op_name)] = {
                    "out": res,
                    "input_unchanged": torch.equal(before, inp),
                    "calls": counter.calls,
                    "bytes": counter.bytes,
                    "stats": comm.stats.as_dict(),
                }
        # LoCo over both hops, with a reset
        for salt, (name, s, dtype, _, _) in enumerate(LOCO_CASES):
            cfg = qd.LocoConfig(beta=LOCO_BETA, reset_T=LOCO_RESET_T)
            comm = qd.QuantizedReduceScatter(bits=4, loco=cfg, local_world_size=lws)
            outs = []
            for call in range(LOCO_CALLS):
                res = torch.empty(s, dtype=dtype)
                comm(res, rank_input(world * s, dtype, rank, 2000 + 10 * salt + call), None, _ops()["avg"])
                outs.append(res)
            out[(lws, "loco", name)] = {"outs": outs, "error": comm.error.clone(), "inter": comm.inter_error.clone()}
    return out


CHECKS = {
    "reduce_scatter": _check_reduce_scatter,
    "all_gather": _check_all_gather,
    "training": _check_training,
    "handle": _check_handle,
    "loco": _check_loco_reduce_scatter,
    "resume": _check_resume,
    "two_hop": _check_two_hop,
}


def worker(world: int, port: int, outdir: str, rank: int) -> None:
    """One spawned rank: every check, results to ``rank{r}.pt``."""
    run_rank_checks(CHECKS, world, port, outdir, rank, TIMEOUT_S)


# ---------------------------------------------------------------- parent side


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return spawn_check_world(request.param, worker, tmp_path_factory.mktemp(f"fsdp{request.param}"), SPAWN_TIMEOUT_S)


def _layout(numel: int, bits: int, group_size: int) -> tuple[int, int]:
    """(groups, elements per group), written out independently of qkit.distributed.fsdp.chunk_layout."""
    groups = (numel + group_size - 1) // group_size
    elems = (numel + groups - 1) // groups
    if bits == 4 and elems % 2:
        elems += 1
    return groups, elems


def ref_roundtrip(rows: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Reference of one side's wire: rows ``[k, n]`` -> dequantized ``[k, n]`` in ``dtype``, and
    the bytes of the quantized buffer (params fp32 + codes)."""
    k, n = rows.shape
    groups, elems = _layout(n, bits, group_size)
    padded = torch.zeros(k, groups * elems, dtype=rows.dtype)
    padded[:, :n] = rows
    q, params = ref_quantize(padded.reshape(-1), k * groups, bits, True)
    values = ref_dequantize(q, params, k * groups, bits, True, dtype).reshape(k, -1)[:, :n]
    return values, q.numel() + 4 * params.numel()


def ref_reduce_scatter(world: int, s: int, dtype: torch.dtype, bits: int, gs: int, salt: int, op: str) -> list:
    deq = []
    for j in range(world):
        rows = rank_input(world * s, dtype, j, salt).view(world, s)
        deq.append(ref_roundtrip(rows, bits, gs, torch.float32)[0])
    outs = []
    for r in range(world):
        acc = deq[0][r].clone()
        for j in range(1, world):
            acc = acc + deq[j][r]
        if op == "avg":
            acc = acc / world
        elif op == "premul":
            acc = acc * PREMUL
        outs.append(acc.to(dtype))
    return outs


def test_reduce_scatter_is_bit_exact_with_the_reference(world: dict) -> None:
    w = world["world"]
    ranks = check_results(world, "reduce_scatter")
    for salt, (name, s, dtype, bits, gs) in enumerate(RS_CASES):
        if s == 0:
            for op in ("sum", "avg", "premul"):
                for r in range(w):
                    got = ranks[r][(name, op)]
                    assert got["ret"] is None and got["out"].shape == (0,) and got["out"].dtype == dtype
                    assert sum(got["bytes"].values()) == 0 and got["stats"]["calls"] == 0
            continue
        gs = gs or 256
        exact_sum = sum(rank_input(w * s, dtype, j, salt).double().view(w, s) for j in range(w))
        for op in ("sum", "avg", "premul"):
            want = ref_reduce_scatter(w, s, dtype, bits, gs, salt, op)
            for r in range(w):
                got = ranks[r][(name, op)]
                assert got["ret"] is None and got["input_unchanged"]
                assert got["out"].dtype == dtype and got["out"].shape == (s,)
                assert torch.equal(got["out"], want[r]), f"{name} {op} rank {r}: {got['out']} vs {want[r]}"
                # and it is the reduction up to the 4/8-bit error (bound: one step per rank and element)
                scale = {"sum": 1.0, "avg": 1.0 / w, "premul": PREMUL}[op]
                exact = exact_sum[r] * scale
                bound = w * (exact_sum.abs().max() + 10) * scale / 2 ** (bits - 1) + 1e-2 * exact.abs().max()
                assert (got["out"].double() - exact).abs().max() <= bound
                # the wire: codes + params per chunk, counted at torch.distributed's boundary
                groups, elems = _layout(s, bits, gs)
                sent = (w - 1) * (groups * elems * bits // 8 + 4 * groups)
                assert got["bytes"] == {"all_to_all_single": sent, "all_gather_single": 0, "reduce_scatter_single": 0}
                assert got["stats"] == {"calls": 1, "sent": sent, "baseline": (w - 1) * s * dtype.itemsize}
                assert predicted_bytes(w * s, w, bits, gs, "reduce_scatter") == sent


def test_all_gather_is_bit_exact_with_the_reference(world: dict) -> None:
    w = world["world"]
    ranks = check_results(world, "all_gather")
    for salt, (name, m, dtype, bits, gs) in enumerate(AG_CASES):
        if m == 0:
            for r in range(w):
                got = ranks[r][name]
                assert got["ret"] is None and got["out"].shape == (0,) and got["out"].dtype == dtype
                assert sum(got["bytes"].values()) == 0 and got["stats"]["calls"] == 0
            continue
        shards = torch.stack([rank_input(m, dtype, j, 100 + salt) for j in range(w)])
        want, nbytes = ref_roundtrip(shards, bits, gs or 2048, dtype)
        assert nbytes % w == 0
        sent = (w - 1) * nbytes // w
        for r in range(w):
            got = ranks[r][name]
            assert got["ret"] is None and got["out"].dtype == dtype
            assert torch.equal(got["out"].view(w, m), want), f"{name} rank {r}"
            want_bytes = {"all_to_all_single": 0, "all_gather_single": sent, "reduce_scatter_single": 0}
            assert got["bytes"] == want_bytes
            assert got["stats"] == {"calls": 1, "sent": sent, "baseline": (w - 1) * m * dtype.itemsize}
            assert predicted_bytes(m, w, bits, gs or 2048, "all_gather") == sent
            # 8 bits: within half a step (plus bf16/fp16 rounding) of the shard
            if bits == 8:
                err = (got["out"].view(w, m).double() - shards.double()).abs().max()
                assert err <= shards.double().abs().max() / 127 + 1e-2


@pytest.mark.parametrize("label", list(RUNS))
def test_training_matches_the_default_comms(world: dict, label: str) -> None:
    if label not in _labels(world["world"]):
        pytest.skip(f"{label} is not run at world {world['world']} (kept short on 2 cores)")
    ranks = check_results(world, "training")
    for r, res in enumerate(ranks):
        d, z = res[label]["default"], res[label]["zeropp"]
        assert len(z["losses"]) == STEPS
        for step, (ld, lz) in enumerate(zip(d["losses"], z["losses"], strict=True)):
            assert abs(lz - ld) <= LOSS_RTOL * abs(ld), f"rank {r} step {step}: {lz} vs default {ld}"
        assert z["losses"] != d["losses"]  # the quantized comms did run
        rel = max(abs(lz - ld) / abs(ld) for ld, lz in zip(d["losses"], z["losses"], strict=True))
        print(f"world {world['world']} {label} rank {r}: max relative loss difference {rel:.2e}")


@pytest.mark.parametrize("label", list(RUNS))
def test_wire_bytes_match_the_torch_distributed_boundary(world: dict, label: str) -> None:
    if label not in _labels(world["world"]):
        pytest.skip(f"{label} is not run at world {world['world']} (kept short on 2 cores)")
    for res in check_results(world, "training"):
        d, z = res[label]["default"], res[label]["zeropp"]
        wire = z["wire"]
        # what the handle counts is what went into torch.distributed ...
        assert wire["reduce_scatter"] == z["boundary"]["all_to_all_single"] > 0
        assert wire["all_gather"] == z["boundary"]["all_gather_single"] > 0
        assert z["boundary"]["reduce_scatter_single"] == 0
        # ... and its baseline is what the default comms really handed over
        assert wire["baseline_reduce_scatter"] == d["boundary"]["reduce_scatter_single"]
        assert wire["baseline_all_gather"] == d["boundary"]["all_gather_single"]
        # the ratios of the issue: 4-bit gradients <= 0.14x of fp32 (0.27x of bf16), 8-bit weights
        # <= 0.27x of fp32 (0.53x of bf16); "mp" gathers bf16 and reduces in fp32
        rs_limit = 0.27 if label in ("bf16", "fp16", "fp16_reduce") else 0.14
        ag_limit = 0.53 if label in ("bf16", "fp16", "mp") else 0.27
        assert wire["reduce_scatter"] <= rs_limit * wire["baseline_reduce_scatter"]
        assert wire["all_gather"] <= ag_limit * wire["baseline_all_gather"]
        assert z["state"]["stats"]["reduce_scatter"]["sent"] == wire["reduce_scatter"]
        two_hop = RUNS[label][4] is not None and world["world"] > RUNS[label][4]
        assert z["state"]["config"]["local_world_size"] == (RUNS[label][4] if two_hop else None)


def test_fsdp2_passes_the_op_of_its_default_path(world: dict) -> None:
    w = world["world"]
    for res in check_results(world, "training"):
        fp32_baseline = res["fp32"]["zeropp"]["wire"]["baseline_reduce_scatter"]
        for label in _labels(w):
            z = res[label]["zeropp"]
            want = {
                "fp16_reduce": [("sum", 1.0)],  # FSDP2 divides before and after itself
                "fp16": [("sum", 1.0)],  # an fp16 reduce dtype, as above
                "divide": [("premul", 1.0 / (2 * w))],
            }.get(label, [("avg", float(w))])
            assert z["ops"] == want, label
        if w >= 8:
            continue
        assert res["fp16_reduce"]["zeropp"]["wire"]["baseline_reduce_scatter"] * 2 == fp32_baseline
        assert (
            res["mp"]["zeropp"]["wire"]["baseline_all_gather"] * 2
            == res["fp32"]["zeropp"]["wire"]["baseline_all_gather"]
        )


def test_handle_state_dict_and_refusals(world: dict) -> None:
    ranks = check_results(world, "handle")
    for res in ranks:
        same, wire = res["roundtrip"]
        assert same and wire == {
            "reduce_scatter": 30,
            "all_gather": 20,
            "baseline_reduce_scatter": 300,
            "baseline_all_gather": 80,
        }
        msg, unchanged = res["bad_stats"]
        assert "non-negative" in msg and unchanged
        assert "config" in res["bad_config"]
        assert res["weight_default"] == (True, ["reduce_scatter"])
        assert "`loco`" in res["loco"] and "TypeError" in res["loco"]
        assert "err_beta" in res["loco_hyper"]
        msg, unchanged = res["bad_loco"]
        assert "`error` must be" in msg and unchanged
        assert "LoCo state for modules" in res["bad_loco_names"]
        assert "config" in res["loco_vs_plain"]
        assert "`local_world_size`" in res["bad_local_world_size"] and "divide" in res["bad_local_world_size"]
        assert "torch.compile" in res["compiled"]
        assert "no FSDP2 module" in res["no_fsdp"]
        assert "`bits` must be 4 or 8" in res["bad_bits"]
        if world["world"] % 2 == 0:
            assert "HSDP" in res["hsdp"]
    # rank-dependent grad_bits: the same ValueError on every rank
    msgs = {res["mismatch"] for res in ranks}
    assert len(msgs) == 1 and "ValueError" in next(iter(msgs)) and "grad" in next(iter(msgs))
    msgs = {res["local_mismatch"] for res in ranks}
    assert len(msgs) == 1 and "ValueError" in next(iter(msgs)) and "local_world_size" in next(iter(msgs))


def test_loco_reduce_scatter_is_bit_exact_with_the_reference(world: dict) -> None:
    from reference import ref_loco_swizzle_quantize

    w = world["world"]
    ranks = check_results(world, "loco")
    for salt, (name, s, dtype, _, _) in enumerate(LOCO_CASES):
        groups, elems = _layout(s, 4, 256)
        errors = [torch.zeros(w * groups * elems, dtype=dtype) for _ in range(w)]
        for call in range(LOCO_CALLS):
            if call and call % LOCO_RESET_T == 0:
                errors = [torch.zeros_like(e) for e in errors]
            deq = []
            for j in range(w):
                padded = torch.zeros(w, groups * elems, dtype=dtype)
                padded[:, :s] = rank_input(w * s, dtype, j, 1000 + 10 * salt + call).view(w, s)
                q, params, errors[j] = ref_loco_swizzle_quantize(
                    padded.reshape(-1), errors[j], LOCO_BETA, w * groups, 4, True, 1, 1, 1
                )
                deq.append(ref_dequantize(q, params, w * groups, 4, True, torch.float32).view(w, -1)[:, :s])
            for r in range(w):
                acc = deq[0][r].clone()
                for j in range(1, w):
                    acc = acc + deq[j][r]
                want = (acc / w).to(dtype)
                got = ranks[r][name]["outs"][call]
                assert torch.equal(got, want), f"{name} call {call} rank {r}"
        for r in range(w):
            assert torch.equal(ranks[r][name]["error"], errors[r])
            assert ranks[r][name]["steps"] == LOCO_CALLS - LOCO_RESET_T  # reset before call 3 (0-based)
            assert errors[r].abs().max() > 0  # the feedback is not trivially zero


def test_loco_resumes_bit_for_bit(world: dict) -> None:
    for r, by_hops in enumerate(check_results(world, "resume")):
        assert list(by_hops) == ([None, 2] if world["world"] >= 4 else [None])
        for lws, res in by_hops.items():
            assert res["resumed"] == res["straight"], f"rank {r}, local_world_size {lws}"
            assert all(torch.equal(res["resumed_params"][k], v) for k, v in res["straight_params"].items())
            # and the LoCo state is what made it exact: resuming without it diverges
            assert res["resumed_without_loco_state"][3] != res["straight"][3]
            assert res["has_inter_error"] == (lws is not None)  # two hops carry the second buffer


def ref_two_hop(
    inputs: list[torch.Tensor],
    lws: int,
    bits: int,
    gs: int,
    loco: tuple[float, list[torch.Tensor], list[torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """Reference of the two-hop reduce-scatter: every rank's fp32 result before the op.

    ``inputs[j]`` is rank j's ``[k * s]``; ranks are ``n * lws + d``. Hop 1: rank j quantizes its
    rows in (device d', node m) order (row d' * N + m = its chunk for rank m * lws + d') and sends
    rows ``[d' N, (d' + 1) N)`` to node peer d'; each rank sums (fp32, in device order) what it
    got and re-quantizes (``reference.py``'s quantized reduction); hop 2: node m's sum for rank
    (n, d) comes from rank (m, d); summed in fp32 in node order. ``loco`` = (beta, intra errors,
    inter errors) per rank, updated in place."""
    from reference import (
        ref_loco_quantized_reduction,
        ref_loco_swizzle_quantize,
        ref_quantized_reduction,
    )

    k = len(inputs)
    nodes = k // lws
    s = inputs[0].numel() // k
    groups, elems = _layout(s, bits, gs)
    padded = groups * elems
    cb = padded * bits // 8
    q1, p1 = [], []
    for j in range(k):
        rows = inputs[j].view(nodes, lws, s).transpose(0, 1).reshape(k, s)
        pad = torch.zeros(k, padded, dtype=rows.dtype)
        pad[:, :s] = rows
        if loco is None:
            q, p = ref_quantize(pad.reshape(-1), k * groups, bits, True)
        else:
            q, p, loco[1][j] = ref_loco_swizzle_quantize(
                pad.reshape(-1), loco[1][j], loco[0], k * groups, bits, True, 1, 1, 1
            )
        q1.append(q.reshape(k, cb))
        p1.append(p.reshape(k, groups))
    q2, p2 = {}, {}
    for n in range(nodes):
        for d in range(lws):
            r = n * lws + d
            qin = torch.cat([q1[n * lws + j][d * nodes : (d + 1) * nodes].reshape(-1) for j in range(lws)])
            pin = torch.cat([p1[n * lws + j][d * nodes : (d + 1) * nodes].reshape(-1) for j in range(lws)])
            g_in, g_out = lws * nodes * groups, nodes * groups
            if loco is None:
                q, p = ref_quantized_reduction(qin, pin.reshape(-1, 1), g_in, g_out, bits, True, lws)
            else:
                q, p, loco[2][r] = ref_loco_quantized_reduction(
                    qin, pin.reshape(-1, 1), loco[2][r], loco[0], g_in, g_out, bits, True, lws
                )
            q2[r], p2[r] = q.reshape(nodes, cb), p.reshape(nodes, groups)
    out = []
    for n in range(nodes):
        for d in range(lws):
            vals = [
                ref_dequantize(
                    q2[m * lws + d][n], p2[m * lws + d][n].reshape(-1, 1), groups, bits, True, torch.float32
                )[:s]
                for m in range(nodes)
            ]
            acc = vals[0].clone()
            for v in vals[1:]:
                acc = acc + v
            out.append(acc)
    return out


def _apply(acc: torch.Tensor, op: str, world: int) -> torch.Tensor:
    return acc / world if op == "avg" else acc * PREMUL if op == "premul" else acc


def test_two_hop_reduce_scatter_is_bit_exact_with_the_reference(world: dict) -> None:
    w = world["world"]
    if not _local_sizes(w):
        pytest.skip("one node at world 2: no second hop")
    ranks = check_results(world, "two_hop")
    for lws in _local_sizes(w):
        nodes = w // lws
        for salt, (name, s, dtype, bits, gs) in enumerate(HOP_CASES):
            gs = gs or 256
            inputs = [rank_input(w * s, dtype, j, 500 + salt) for j in range(w)]
            sums = ref_two_hop(inputs, lws, bits, gs)
            exact_sum = sum(x.double().view(w, s) for x in inputs)
            groups, elems = _layout(s, bits, gs)
            wb = groups * elems * bits // 8 + 4 * groups
            for op in ("sum", "avg", "premul"):
                for r in range(w):
                    got = ranks[r][(lws, name, op)]
                    want = _apply(sums[r], op, w).to(dtype)
                    assert got["input_unchanged"]
                    assert torch.equal(got["out"], want), f"L={lws} {name} {op} rank {r}"
                    # within the 4/8-bit error of the exact reduction (a step per rank and per re-quantization)
                    scale = {"sum": 1.0, "avg": 1.0 / w, "premul": PREMUL}[op]
                    exact = exact_sum[r] * scale
                    bound = 2 * w * (exact_sum.abs().max() + 10) * scale / 2 ** (bits - 1) + 1e-2 * exact.abs().max()
                    assert (got["out"].double() - exact).abs().max() <= bound
                    # two all_to_alls: k chunks in the node's group, then N in the cross-node group
                    assert got["calls"] == [
                        ("all_to_all_single", lws, w * wb),
                        ("all_to_all_single", nodes, nodes * wb),
                    ]
                    sent = (lws - 1) * nodes * wb + (nodes - 1) * wb
                    assert sent == (w - 1) * wb == predicted_bytes(w * s, w, bits, gs, "reduce_scatter")
                    assert got["stats"] == {"calls": 1, "sent": sent, "baseline": (w - 1) * s * dtype.itemsize}
                    assert got["bytes"]["all_to_all_single"] == sent
        for salt, (name, s, dtype, _, _) in enumerate(LOCO_CASES):
            groups, elems = _layout(s, 4, 256)
            intra = [torch.zeros(w * groups * elems, dtype=dtype) for _ in range(w)]
            inter = [torch.zeros(nodes * groups * elems, dtype=dtype) for _ in range(w)]
            for call in range(LOCO_CALLS):
                if call and call % LOCO_RESET_T == 0:
                    intra = [torch.zeros_like(e) for e in intra]
                    inter = [torch.zeros_like(e) for e in inter]
                inputs = [rank_input(w * s, dtype, j, 2000 + 10 * salt + call) for j in range(w)]
                sums = ref_two_hop(inputs, lws, 4, 256, (LOCO_BETA, intra, inter))
                for r in range(w):
                    got = ranks[r][(lws, "loco", name)]["outs"][call]
                    assert torch.equal(got, (sums[r] / w).to(dtype)), f"LoCo L={lws} {name} call {call} rank {r}"
            for r in range(w):
                got = ranks[r][(lws, "loco", name)]
                assert torch.equal(got["error"], intra[r]) and torch.equal(got["inter"], inter[r])
                assert inter[r].abs().max() > 0  # the second quantization's feedback is not trivially zero
