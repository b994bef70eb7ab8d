"""qkit's DDP comm hook (qkit.distributed.ddp) on gloo, 127.0.0.1, worlds 2, 4 and 8.

Each world is spawned once (every collective under a process-group timeout, the whole world
under SPAWN_TIMEOUT_S, after which every rank is killed). The parent compares:

- ``quantized_allreduce`` on odd bucket sizes, fp32/bf16/fp16, 4 and 8 bits, buckets smaller
  than the world (chunks of padding only) and empty ones, bit for bit with a pure-PyTorch
  reference of quantize -> all_to_all -> fp32 sum in rank order -> / k -> quantize -> all_gather
  -> dequantize (``reference.py``'s quantizer), and with LoCo over several calls with a reset;
- DDP training with the hook against DDP with torch's own ``allreduce_hook``: losses within a
  tolerance, every replica with the same parameters, bytes counted at torch.distributed;
- the state: a checkpoint round trip, bad states refused with nothing changed, a run resumed
  from a checkpoint continuing bit for bit, ranks with different configurations failing alike.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

from helpers import check_results, mse_steps, run_rank_checks, spawn_check_world
from reference import ref_dequantize, ref_loco_swizzle_quantize, ref_quantize
from test_fsdp import BoundaryCounter, _layout, rank_input

WORLDS = [2, 4, 8]
TIMEOUT_S = 60
SPAWN_TIMEOUT_S = 240
STEPS = 3
# |loss(hook) - loss(default)| <= this * loss(default) at every step: two 4-bit quantizations of
# each gradient (reduce-scatter and all-gather) on a tiny model; measured: at most 1.0e-2 (world 8)
LOSS_RTOL = 2e-2

# (name, bucket elements n, dtype, bits, group_size)
CASES = [
    ("f32_odd", 37, torch.float32, 4, None),
    ("bf16_odd", 101, torch.bfloat16, 4, None),
    ("f16_8bit", 90, torch.float16, 8, 16),
    ("f32_two_groups", 1200, torch.float32, 4, None),
    ("f32_tiny", 3, torch.float32, 4, None),  # fewer elements than ranks at world 4 and 8
    ("f32_empty", 0, torch.float32, 4, None),
]
LOCO_BETA, LOCO_RESET_T, LOCO_CALLS = 0.5, 3, 5


# ---------------------------------------------------------------- worker side


def _check_direct(rank: int, world: int) -> dict:
    import qkit.distributed as qd

    out: dict[Any, Any] = {}
    for salt, (name, n, dtype, bits, gs) in enumerate(CASES):
        state = qd.QuantizedAllReduceState(bits=bits, group_size=gs)
        buf = rank_input(n, dtype, rank, 300 + salt)
        with BoundaryCounter() as counter:
            ret = qd.quantized_allreduce(state, buf)
        out[name] = {"out": buf.clone(), "same_object": ret is buf, "calls": counter.calls, "wire": state.wire_bytes()}
    for salt, (name, n, dtype, bits, gs) in enumerate(CASES[:3]):
        state = qd.QuantizedAllReduceState(bits=bits, group_size=gs, loco=qd.LocoConfig(LOCO_BETA, LOCO_RESET_T))
        outs = []
        for call in range(LOCO_CALLS):
            buf = rank_input(n, dtype, rank, 400 + 10 * salt + call)
            outs.append(qd.quantized_allreduce(state, buf, 7).clone())
        out[("loco", name)] = {"outs": outs, "state": state.state_dict()}
    return out


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4321)
        self.a = torch.nn.Linear(13, 33)
        self.b = torch.nn.Linear(33, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _ddp(hook: str, state: Any = None) -> torch.nn.parallel.DistributedDataParallel:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    import qkit.distributed as qd

    model = torch.nn.parallel.DistributedDataParallel(_Model())
    if hook == "default":
        model.register_comm_hook(None, default_hooks.allreduce_hook)
    else:
        model.register_comm_hook(state, qd.quantized_allreduce_hook)
    return model


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, steps: range) -> list[float]:
    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(31 * step + 1000 * rank)
        return torch.randn(8, 13, generator=gen), torch.randn(8, 3, generator=gen)

    return mse_steps(model, opt, steps, batch)


class AllReduceCounter:
    """Input bytes of torch.distributed.all_reduce calls (torch's default DDP hook makes them)."""

    def __enter__(self) -> AllReduceCounter:
        import torch.distributed as dist

        self.bytes = 0
        self.k = dist.get_world_size()
        self._saved = dist.all_reduce

        def wrapped(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.bytes += tensor.numel() * tensor.element_size()
            return self._saved(tensor, *args, **kwargs)

        dist.all_reduce = wrapped
        return self

    def __exit__(self, *exc: object) -> None:
        import torch.distributed as dist

        dist.all_reduce = self._saved


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def _check_training(rank: int, world: int) -> dict:
    import qkit.distributed as qd

    out: dict[str, Any] = {}
    model = _ddp("default")
    with AllReduceCounter() as ar:
        out["default"] = _steps(model, torch.optim.SGD(model.parameters(), lr=0.1), rank, range(STEPS))
    out["default_bytes"] = ar.bytes
    for label, loco in (("hook", None), ("hook_loco", qd.LocoConfig(0.8, 1024))):
        state = qd.QuantizedAllReduceState(bits=4, loco=loco)
        model = _ddp("qkit", state)
        with BoundaryCounter() as counter:
            out[label] = _steps(model, torch.optim.SGD(model.parameters(), lr=0.1), rank, range(STEPS))
        out[f"{label}_params"] = _params(model)
        out[f"{label}_wire"] = state.wire_bytes()
        out[f"{label}_boundary"] = counter.bytes
    out["numel"] = sum(p.numel() for p in _Model().parameters())
    return out


def _expect(exc: type[BaseException], fn: Any) -> str:
    try:
        fn()
    except exc as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _check_state(rank: int, world: int) -> dict:
    import qkit.distributed as qd

    out: dict[str, Any] = {}
    loco = qd.LocoConfig(0.8, 1024)
    # 4 steps straight, and 2 + checkpoint + 2 in fresh objects
    state = qd.QuantizedAllReduceState(loco=loco)
    model = _ddp("qkit", state)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out["straight"] = _steps(model, opt, rank, range(4))
    out["straight_params"] = _params(model)
    state = qd.QuantizedAllReduceState(loco=loco)
    model = _ddp("qkit", state)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = _steps(model, opt, rank, range(2))
    buf = io.BytesIO()
    torch.save({"model": model.module.state_dict(), "hook": state.state_dict()}, buf)
    for label, load_state in (("resumed", True), ("resumed_without_state", False)):
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        state = qd.QuantizedAllReduceState(loco=loco)
        model = _ddp("qkit", state)
        # DDP rebuilds its buckets (in gradient-ready order) after its first backward: one backward
        # without an optimizer step first, so that the resumed steps see the saved bucket layout
        model(torch.zeros(1, 13)).sum().backward()
        model.zero_grad()
        model.module.load_state_dict(ckpt["model"])
        if load_state:
            state.load_state_dict(ckpt["hook"])
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out[label] = first + _steps(model, opt, rank, range(2, 4))
        out[f"{label}_params"] = _params(model)
    sd = ckpt["hook"]
    # bad states change nothing
    fresh = qd.QuantizedAllReduceState(loco=loco)
    fresh.load_state_dict(sd)
    before = fresh.state_dict()
    out["roundtrip"] = _same(before, sd)
    index = next(iter(sd["buckets"]))
    bad_error = {**sd, "buckets": {index: {**sd["buckets"][index], "ag_error": torch.zeros(3)}}}
    out["bad_error"] = (
        _expect(ValueError, lambda: fresh.load_state_dict(bad_error)),
        _same(fresh.state_dict(), before),
    )
    bad_stats = {**sd, "stats": {**sd["stats"], "calls": -1}}
    out["bad_stats"] = (
        _expect(ValueError, lambda: fresh.load_state_dict(bad_stats)),
        _same(fresh.state_dict(), before),
    )
    out["bad_config"] = _expect(ValueError, lambda: qd.QuantizedAllReduceState(bits=8, loco=loco).load_state_dict(sd))
    out["loco_into_plain"] = _expect(ValueError, lambda: qd.QuantizedAllReduceState().load_state_dict(sd))
    # argument errors and ranks that disagree: the same error on every rank
    out["bad_bits"] = _expect(ValueError, lambda: qd.QuantizedAllReduceState(bits=3))
    out["bad_loco"] = _expect(TypeError, lambda: qd.QuantizedAllReduceState(loco=0.8))
    out["one_bad_rank"] = _expect(ValueError, lambda: qd.QuantizedAllReduceState(bits=3 if rank == 0 else 4))
    out["mismatch"] = _expect(ValueError, lambda: qd.QuantizedAllReduceState(bits=4 if rank == 0 else 8))
    out["bad_state_type"] = _expect(TypeError, lambda: qd.quantized_allreduce_hook(object(), None))
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b) and a.dtype == b.dtype
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


CHECKS = {"direct": _check_direct, "training": _check_training, "state": _check_state}


def worker(world: int, port: int, outdir: str, rank: int) -> None:
    """One spawned rank: every check, results to ``rank{r}.pt``."""
    run_rank_checks(CHECKS, world, port, outdir, rank, TIMEOUT_S)


# ---------------------------------------------------------------- parent side


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return spawn_check_world(request.param, worker, tmp_path_factory.mktemp(f"ddp{request.param}"), SPAWN_TIMEOUT_S)


def ref_allreduce(
    bufs: list[torch.Tensor], bits: int, gs: int, loco: tuple[float, list, list] | None = None
) -> torch.Tensor:
    """What every rank's bucket holds afterwards. ``loco`` = (beta, reduce-scatter errors, all-gather
    errors) per rank, updated in place."""
    k, n, dtype = len(bufs), bufs[0].numel(), bufs[0].dtype
    s = -(-n // k)
    groups, elems = _layout(s, bits, gs)
    padded = groups * elems
    deq = []
    for j in range(k):
        rows = torch.zeros(k * s, dtype=dtype)
        rows[:n] = bufs[j]
        pad = torch.zeros(k, padded, dtype=dtype)
        pad[:, :s] = rows.view(k, s)
        if loco is None:
            q, p = ref_quantize(pad.reshape(-1), k * groups, bits, True)
        else:
            q, p, loco[1][j] = ref_loco_swizzle_quantize(
                pad.reshape(-1), loco[1][j], loco[0], k * groups, bits, True, 1, 1, 1
            )
        deq.append(ref_dequantize(q, p, k * groups, bits, True, torch.float32).view(k, padded)[:, :s])
    chunks = []
    for r in range(k):
        acc = deq[0][r].clone()
        for j in range(1, k):
            acc = acc + deq[j][r]
        pad = torch.zeros(padded, dtype=torch.float32)
        pad[:s] = acc / k
        if loco is None:
            q, p = ref_quantize(pad, groups, bits, True)
        else:
            q, p, loco[2][r] = ref_loco_swizzle_quantize(pad, loco[2][r], loco[0], groups, bits, True, 1, 1, 1)
        chunks.append(ref_dequantize(q, p, groups, bits, True, dtype)[:s])
    return torch.cat(chunks)[:n]


def test_quantized_allreduce_is_bit_exact_with_the_reference(world: dict) -> None:
    w = world["world"]
    ranks = check_results(world, "direct")
    for salt, (name, n, dtype, bits, gs) in enumerate(CASES):
        bufs = [rank_input(n, dtype, j, 300 + salt) for j in range(w)]
        for r in range(w):
            got = ranks[r][name]
            assert got["same_object"] and got["out"].dtype == dtype
            if n == 0:
                assert got["out"].numel() == 0 and got["calls"] == []
                continue
            want = ref_allreduce(bufs, bits, gs or 256)
            assert torch.equal(got["out"], want), f"{name} rank {r}"
            # within a step per rank (reduce-scatter) plus one (all-gather) of the mean
            mean = sum(b.double() for b in bufs) / w
            amax = max(b.double().abs().max() for b in bufs)
            bound = 2 * amax / 2 ** (bits - 1) + 1e-2 * mean.abs().max()
            assert (got["out"].double() - mean).abs().max() <= bound
            # the wire: k chunks to the all_to_all, one to the all_gather; counted at the boundary
            groups, elems = _layout(-(-n // w), bits, gs or 256)
            wb = groups * elems * bits // 8 + 4 * groups
            assert got["calls"] == [("all_to_all_single", w, w * wb), ("all_gather_single", w, wb)]
            assert got["wire"] == {
                "reduce_scatter": (w - 1) * wb,
                "all_gather": (w - 1) * wb,
                "baseline_all_reduce": 2 * (w - 1) * n * dtype.itemsize // w,
            }


def test_loco_allreduce_is_bit_exact_with_the_reference(world: dict) -> None:
    w = world["world"]
    ranks = check_results(world, "direct")
    for salt, (name, n, dtype, bits, gs) in enumerate(CASES[:3]):
        gs = gs or 256
        groups, elems = _layout(-(-n // w), bits, gs)
        rs = [torch.zeros(w * groups * elems, dtype=dtype) for _ in range(w)]
        ag = [torch.zeros(groups * elems, dtype=torch.float32) for _ in range(w)]
        for call in range(LOCO_CALLS):
            if call and call % LOCO_RESET_T == 0:
                rs, ag = [torch.zeros_like(e) for e in rs], [torch.zeros_like(e) for e in ag]
            bufs = [rank_input(n, dtype, j, 400 + 10 * salt + call) for j in range(w)]
            want = ref_allreduce(bufs, bits, gs, (LOCO_BETA, rs, ag))
            for r in range(w):
                assert torch.equal(ranks[r][("loco", name)]["outs"][call], want), f"{name} call {call} rank {r}"
        for r in range(w):
            bucket = ranks[r][("loco", name)]["state"]["buckets"][7]
            assert torch.equal(bucket["rs_error"], rs[r]) and torch.equal(bucket["ag_error"], ag[r])
            assert bucket["steps"] == LOCO_CALLS - LOCO_RESET_T and bucket["layout"] == [n, str(dtype)[6:], [[n]]]
            assert ag[r].abs().max() > 0


def test_ddp_training_matches_the_default_hook(world: dict) -> None:
    w = world["world"]
    ranks = check_results(world, "training")
    for label in ("hook", "hook_loco"):
        for r, res in enumerate(ranks):
            for step, (ld, lq) in enumerate(zip(res["default"], res[label], strict=True)):
                assert abs(lq - ld) <= LOSS_RTOL * abs(ld), f"{label} rank {r} step {step}: {lq} vs {ld}"
            assert res[label] != res["default"]  # the hook did run
            rel = max(abs(lq - ld) / abs(ld) for ld, lq in zip(res["default"], res[label], strict=True))
            print(f"world {w} {label} rank {r}: max relative loss difference {rel:.2e}")
            # every replica holds the same parameters, bit for bit
            for k, v in res[f"{label}_params"].items():
                assert torch.equal(v, ranks[0][f"{label}_params"][k]), f"{label}: rank {r} differs in {k}"
            # bytes: the hook's counts are what went into torch.distributed; the baseline is what
            # torch's allreduce_hook handed to all_reduce (one fp32 bucket per step)
            wire, boundary = res[f"{label}_wire"], res[f"{label}_boundary"]
            assert wire["reduce_scatter"] == boundary["all_to_all_single"] > 0
            assert wire["all_gather"] == boundary["all_gather_single"] > 0
            assert res["default_bytes"] == STEPS * 4 * res["numel"]
            assert wire["baseline_all_reduce"] == STEPS * (2 * (w - 1) * 4 * res["numel"] // w)
            # each step: k chunks of s = ceil(P / k) elements, 4-bit codes + one fp32 scale per group,
            # (k - 1) of them sent on each half; <= 0.14x of fp32 once a chunk fills its groups
            groups, elems = _layout(-(-res["numel"] // w), 4, 256)
            per_half = STEPS * (w - 1) * (groups * elems // 2 + 4 * groups)
            assert wire["reduce_scatter"] == wire["all_gather"] == per_half
            if res["numel"] // w >= 128:
                assert wire["reduce_scatter"] + wire["all_gather"] <= 0.14 * wire["baseline_all_reduce"]


def test_state_checkpoint_resume_and_refusals(world: dict) -> None:
    ranks = check_results(world, "state")
    for r, res in enumerate(ranks):
        assert res["resumed"] == res["straight"], f"rank {r}"
        assert all(torch.equal(res["resumed_params"][k], v) for k, v in res["straight_params"].items())
        assert res["resumed_without_state"][3] != res["straight"][3]  # the LoCo state is what made it exact
        assert res["roundtrip"]
        msg, unchanged = res["bad_error"]
        assert "`ag_error`" in msg and unchanged
        msg, unchanged = res["bad_stats"]
        assert "`stats`" in msg and unchanged
        assert "config" in res["bad_config"]
        assert "config" in res["loco_into_plain"]
        assert "`bits` must be 4 or 8" in res["bad_bits"]
        assert "TypeError" in res["bad_loco"] and "`loco`" in res["bad_loco"]
        assert "TypeError" in res["bad_state_type"] and "`state`" in res["bad_state_type"]
    for key in ("one_bad_rank", "mismatch"):
        msgs = {res[key] for res in ranks}
        assert len(msgs) == 1 and "ValueError" in next(iter(msgs)) and "bits" in next(iter(msgs)), msgs
