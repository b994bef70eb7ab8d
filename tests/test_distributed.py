"""qkit.distributed on real process groups: gloo on 127.0.0.1, worlds 4 (2 nodes x 2) and 8 (2 x 4).

Each world is spawned once (processes from a forkserver, bounded by timeouts); every rank
runs all the checks below and saves what it got; the tests then
compare each rank's results with references computed here in the parent: the exact mean
(fp64), a single-process simulation of the qgZ data movement with the same ops
(bit-exact), and dequantize(quantize(shard)) for the all-gather.
"""

from __future__ import annotations

import itertools
import math
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import qkit
from helpers import join_gloo_world, spawn_ranks
from qkit.distributed import (
    LocoReducer,
    QgzFallbackWarning,
    all_gather_quantized,
    all_to_all_loco_quant_reduce,
    all_to_all_quant_reduce,
    count_wire_bytes,
    hierarchical_groups,
    plan_qgz,
    slice_bounds,
    wire_bytes,
)
from qkit.zeropp_ops import quantized_reduction, swizzle_quantize

WORLDS = {"2x2": (4, 2), "2x4": (8, 4)}  # name -> (world, ranks per node)
TIMEOUT_S = 60  # every collective (process-group timeout)
SPAWN_TIMEOUT_S = 150  # a whole world

# One mixed call: main-path shapes and every fallback reason (name, shape, dtype).
CASES = [
    ("2d_f32", (16, 24), torch.float32),
    ("2d_bf16", (8, 32), torch.bfloat16),
    ("3d_f16", (4, 8, 6), torch.float16),
    ("odd_rows", (3, 48), torch.float32),  # DeepSpeed's G = 48 is invalid here; qkit picks G = 72
    ("1d", (48,), torch.float32),
    ("not_2w", (5, 6), torch.float32),  # 30 elements: not a multiple of 2W
    ("tiny_bf16", (3, 1), torch.bfloat16),  # fewer elements than ranks: empty slices
    ("f64", (4, 8), torch.float64),
    ("empty", (0, 4), torch.float32),
]
UNBIASED_SHAPE, UNBIASED_TRIALS = (16, 32), 40
LOCO_SHAPE, LOCO_STEPS = (16, 32), 12
QWZ_CASES = [  # (name, shape, dtype, bits, groups)
    ("f32_8b", (3, 5), torch.float32, 8, None),
    ("bf16_4b", (4, 6), torch.bfloat16, 4, 3),
    ("f16_8b_3d", (2, 2, 4), torch.float16, 8, 2),
    ("big_f32_8b", (64, 64), torch.float32, 8, None),
]


def grad(shape: tuple[int, ...], dtype: torch.dtype, rank: int, trial: int, salt: int) -> torch.Tensor:
    """Rank ``rank``'s deterministic test gradient (the same in every process)."""
    g = torch.Generator().manual_seed(1_000_003 * salt + 7919 * trial + rank)
    scale = 1.0 + torch.rand((), generator=g).item()
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


# ---------------------------------------------------------------- worker side (one process per rank)


def _record_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if issubclass(w.category, QgzFallbackWarning)]


def _check_main_and_fallbacks(rank: int, groups: dict) -> dict:
    grads = [grad(shape, dtype, rank, 0, i) for i, (_, shape, dtype) in enumerate(CASES)]
    with count_wire_bytes() as counter:
        out, warned_first = _record_warnings(lambda: all_to_all_quant_reduce(grads, groups))
    again, warned_again = _record_warnings(lambda: all_to_all_quant_reduce(grads, groups))
    single = [all_to_all_quant_reduce([g], groups)[0] for g in grads]
    return {
        "out": out,
        "again": again,
        "single": single,
        "warned_first": warned_first,
        "warned_again": warned_again,
        "bytes": counter.bytes,
        "calls": counter.calls,
    }


def _check_unbiased(rank: int, groups: dict) -> dict:
    outs = []
    for t in range(UNBIASED_TRIALS):
        outs.append(all_to_all_quant_reduce([grad(UNBIASED_SHAPE, torch.float32, rank, t, 100)], groups)[0])
    return {"outs": torch.stack(outs)}


def _check_loco(rank: int, groups: dict) -> dict:
    plain, loco0, loco8 = [], [], []
    r0, r8 = LocoReducer(err_beta=0.0, reset_T=0), LocoReducer(err_beta=0.8, reset_T=1024)
    p0, p8 = torch.nn.Parameter(torch.zeros(LOCO_SHAPE)), torch.nn.Parameter(torch.zeros(LOCO_SHAPE))
    bias = torch.nn.Parameter(torch.zeros(6))  # 1-D: the fallback, no error state
    bias_ok = True
    for t in range(LOCO_STEPS):
        g = grad(LOCO_SHAPE, torch.float32, rank, t, 200)
        p0.grad, p8.grad, bias.grad = g.clone(), g.clone(), grad((6,), torch.float32, rank, t, 201)
        plain.append(all_to_all_quant_reduce([g], groups)[0])
        got0, got_bias = r0([p0, bias], groups)
        loco0.append(got0)
        loco8.append(r8([p8], groups)[0])
        bias_ok &= torch.equal(got_bias, all_to_all_quant_reduce([bias.grad], groups)[0])
    # Per-parameter resets (reset_T = 3 of a parameter's own steps): pa is reduced at every step,
    # pb at every other step; pc (bf16) goes through the functional API's default reducer.
    red = LocoReducer(err_beta=0.0, reset_T=3)
    pa, pb = torch.nn.Parameter(torch.zeros(8, 16)), torch.nn.Parameter(torch.zeros(8, 16))
    pc = torch.nn.Parameter(torch.zeros(8, 16, dtype=torch.bfloat16))
    reset_rows = []
    for t in range(7):
        pa.grad = grad((8, 16), torch.float32, rank, t, 300)
        pb.grad = grad((8, 16), torch.float32, rank, t, 301)
        pc.grad = grad((8, 16), torch.bfloat16, rank, t, 302)
        got = red([pa, pb] if t % 2 == 0 else [pa], groups)
        row = {
            "a_equals_plain": torch.equal(got[0], all_to_all_quant_reduce([pa.grad], groups)[0]),
            "a_steps": red.state(pa).steps,
        }
        if t % 2 == 0:
            row["b_equals_plain"] = torch.equal(got[1], all_to_all_quant_reduce([pb.grad], groups)[0])
            row["b_steps"] = red.state(pb).steps
        all_to_all_loco_quant_reduce([pc], groups, err_beta=0.0, reset_T=0)
        reset_rows.append(row)
    st = qkit.distributed.loco._default.state(pc)
    return {
        "plain": torch.stack(plain),
        "loco0": torch.stack(loco0),
        "loco8": torch.stack(loco8),
        "resets": reset_rows,
        "bias_fallback": (bias_ok, r0.state(bias) is None),
        "bf16_state": (st.intra.dtype, st.inter.dtype, st.intra.numel(), st.inter.numel(), st.steps),
    }


def _check_qwz(rank: int, groups: dict) -> dict:
    res = {}
    for i, (name, shape, dtype, bits, ngroups) in enumerate(QWZ_CASES):
        shard = grad(shape, dtype, rank, 0, 400 + i)
        with count_wire_bytes() as counter:
            if name == "f16_8b_3d":
                out = torch.full((shape[0] * torch.distributed.get_world_size(), *shape[1:]), 7.0, dtype=dtype)
                got = all_gather_quantized(shard, None, bits, ngroups, out=out)
                res[name + "_is_out"] = got is out
            else:
                got = all_gather_quantized(shard, bits=bits, groups=ngroups)
        res[name] = (got, counter.bytes)
    # A sub-group: the ranks of this node.
    node = rank // groups_local(groups)
    sub = all_gather_quantized(grad((2, 4), torch.float32, rank, 0, 450), groups[f"local_{node}"])
    res["local_group"] = sub
    return res


def groups_local(groups: dict) -> int:
    return sum(1 for k in groups if k.startswith("global_"))


def _check_errors(rank: int, groups: dict, local: int) -> dict:
    errs: dict[str, str] = {}

    def expect(name: str, exc: type[BaseException], fn) -> None:
        try:
            fn()
        except exc as e:
            errs[name] = f"{type(e).__name__}: {e}"
        else:
            errs[name] = "no error"

    expect("local_3", ValueError, lambda: hierarchical_groups(3))
    expect("local_0", ValueError, lambda: hierarchical_groups(0))
    expect("local_none_cpu", ValueError, lambda: hierarchical_groups(None))
    expect("bad_dict", ValueError, lambda: all_to_all_quant_reduce([torch.zeros(4, 4)], {"local_0": None}))
    wrong_world = {k: v for k, v in groups.items() if k != f"global_{local - 1}"}
    expect("wrong_world", ValueError, lambda: all_to_all_quant_reduce([torch.zeros(4, 4)], wrong_world))
    expect("int_grad", TypeError, lambda: all_to_all_quant_reduce([torch.zeros(4, 4, dtype=torch.int32)], groups))
    expect("no_grad", ValueError, lambda: all_to_all_loco_quant_reduce([torch.nn.Parameter(torch.zeros(4))], groups))
    expect("bad_beta", ValueError, lambda: LocoReducer(err_beta=1.5))
    expect("qwz_bits", ValueError, lambda: all_gather_quantized(torch.zeros(4), bits=3))
    expect("qwz_groups", ValueError, lambda: all_gather_quantized(torch.zeros(6), groups=4))
    # Ranks disagreeing about shapes: validate=True raises on every rank (no hang, no partial failure).
    shape = (16, 24) if rank == 0 else (24, 16)
    expect("validate", ValueError, lambda: all_to_all_quant_reduce([torch.zeros(shape)], groups, validate=True))
    # The same shapes everywhere pass validation.
    ok = all_to_all_quant_reduce([grad((16, 24), torch.float32, rank, 0, 0)], groups, validate=True)
    return {"errors": errs, "validated": ok}


def _check_empty_groups(rank: int, groups: dict) -> dict:
    """groups={} when every tensor takes the fallback (DeepSpeed's own test passes {}): the world
    group is all it needs. A tensor on the 4-bit path still needs the groups (issue 16, item 7)."""
    tensors = [
        grad((48,), torch.float32, rank, 0, 600),
        grad((5, 6), torch.float32, rank, 0, 601),
        grad((4, 8), torch.float64, rank, 0, 602),
    ]
    try:
        all_to_all_quant_reduce([torch.zeros(16, 24), tensors[0]], {})
    except ValueError as e:
        needs_groups = str(e)
    else:
        needs_groups = "no error"
    return {
        "empty": all_to_all_quant_reduce(tensors, {}),
        "loco_empty": all_to_all_loco_quant_reduce([_with_grad(t) for t in tensors[:2]], {}),
        "with_groups": all_to_all_quant_reduce(tensors, groups),
        "needs_groups": needs_groups,
    }


def _with_grad(g: torch.Tensor) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros_like(g))
    p.grad = g.clone()
    return p


# Calls where rank 0 differs from the others (issue 16, item 5), with the fields the error must
# name. Before the default check, these hung, aborted a rank or returned garbage.
MISMATCH_FIELDS = {
    "qgz_shapes_same_numel": ["tensor shapes"],  # same byte counts: silently wrong before
    "qgz_shapes": ["tensor shapes"],
    "qgz_count": ["tensor count", "tensor shapes"],
    "qgz_dtype": ["dtypes"],
    "qgz_fallback_shapes": ["tensor shapes"],
    "qgz_local_error": ["argument error", "dtypes"],  # TypeError on rank 0 only: the others must not wait
    "loco_shapes": ["tensor shapes"],
    "loco_err_beta": ["settings"],
    "loco_no_grad": ["argument error"],
    "qwz_groups": ["groups"],
    "qwz_bits": ["bits"],
    "qwz_shapes": ["shard shape"],
    "qwz_empty_shard": ["shard shape"],
    "qwz_local_error": ["argument error", "bits"],
    "hierarchical_groups": ["local_world_size"],
}


def _check_mismatch(rank: int, groups: dict) -> dict:
    """Every case of MISMATCH_FIELDS (rank 0 passes something else), the cache, and a matching call after."""
    from qkit.distributed import consistency

    first = rank == 0
    world = torch.distributed.get_world_size()
    res: dict[str, Any] = {}

    def x(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return grad(shape, dtype, rank, 0, 500)

    def param(shape: tuple[int, ...]) -> torch.nn.Parameter:
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = x(shape)
        return p

    # Shapes no other check uses: a signature a rank has already checked skips the check by default.
    cases = {
        "qgz_shapes_same_numel": lambda: all_to_all_quant_reduce([x((16, 40) if first else (40, 16))], groups),
        "qgz_shapes": lambda: all_to_all_quant_reduce([x((16, 40) if first else (8, 40))], groups),
        "qgz_count": lambda: all_to_all_quant_reduce([x((8, 72))] * (2 if first else 1), groups),
        "qgz_dtype": lambda: all_to_all_quant_reduce([x((8, 72), torch.float32 if first else torch.bfloat16)], groups),
        "qgz_fallback_shapes": lambda: all_to_all_quant_reduce([x((7,) if first else (9,))], groups),
        "qgz_local_error": lambda: all_to_all_quant_reduce([x((8, 72)).int() if first else x((8, 72))], groups),
        "loco_shapes": lambda: LocoReducer()([param((8, 72) if first else (72, 8))], groups),
        "loco_err_beta": lambda: LocoReducer(err_beta=0.8 if first else 0.5)([param((8, 72))], groups),
        "loco_no_grad": lambda: LocoReducer()(
            [torch.nn.Parameter(torch.zeros(8, 72)) if first else param((8, 72))], groups
        ),
        "qwz_groups": lambda: all_gather_quantized(x((4, 8)), groups=2 if first else 4),
        "qwz_bits": lambda: all_gather_quantized(x((4, 8)), bits=8 if first else 4),
        "qwz_shapes": lambda: all_gather_quantized(x((4, 8) if first else (2, 8))),
        "qwz_empty_shard": lambda: all_gather_quantized(x((0, 8) if first else (2, 8))),
        "qwz_local_error": lambda: all_gather_quantized(x((4, 8)), bits=3 if first else 8),
        "hierarchical_groups": lambda: hierarchical_groups(1 if first else world),
    }
    assert list(cases) == list(MISMATCH_FIELDS)
    for name, fn in cases.items():
        try:
            fn()
        except ValueError as e:
            res[name] = str(e)
        except Exception as e:
            res[name] = f"{type(e).__name__} instead of ValueError: {e}"
        else:
            res[name] = "no error"
    # The cache: by default a signature is checked once; True checks every call; False never.
    counts = []
    a, b = x((8, 40)), x((8, 56))
    for call in (
        lambda: all_to_all_quant_reduce([a], groups),
        lambda: all_to_all_quant_reduce([a], groups),
        lambda: all_to_all_quant_reduce([a], groups, validate=True),
        lambda: all_to_all_quant_reduce([b], groups, validate=False),
        lambda: all_gather_quantized(a),
        lambda: all_gather_quantized(a),
    ):
        before = consistency.stats["checks"]
        call()
        counts.append(consistency.stats["checks"] - before)
    res["checks_per_call"] = counts
    # After all of the above the process group is still in step: a matching call is right.
    res["after"] = all_to_all_quant_reduce([grad((16, 24), torch.float32, rank, 0, 0)], groups)[0]
    return res


def worker(world: int, local: int, port: int, outdir: str, rank: int, only: tuple[str, ...] = ()) -> None:
    """One spawned rank: every check (or those in ``only``), results to ``rank{r}.pt``."""
    join_gloo_world(world, port, rank, outdir, TIMEOUT_S)
    results: dict[str, Any] = {}
    times: dict[str, float] = {}
    try:
        groups = hierarchical_groups(local)
        results["group_sizes"] = (
            torch.distributed.get_world_size(groups[f"local_{rank // local}"]),
            torch.distributed.get_world_size(groups[f"global_{rank % local}"]),
            sorted(groups),
        )
        checks = {
            "main": lambda: _check_main_and_fallbacks(rank, groups),
            "unbiased": lambda: _check_unbiased(rank, groups),
            "loco": lambda: _check_loco(rank, groups),
            "qwz": lambda: _check_qwz(rank, groups),
            "errors": lambda: _check_errors(rank, groups, local),
            "empty_groups": lambda: _check_empty_groups(rank, groups),
            "mismatch": lambda: _check_mismatch(rank, groups),  # last: before the fix it broke the group
        }
        for name, fn in checks.items():
            if only and name not in only:
                continue
            start = time.perf_counter()
            try:
                results[name] = fn()
            except Exception:
                results[name] = {"traceback": traceback.format_exc()}
            times[name] = time.perf_counter() - start
        results["times"] = times
        torch.save(results, Path(outdir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- parent side


def _spawn(world: int, local: int, outdir: Path, only: tuple[str, ...] = ()) -> list[dict]:
    """Run ``world`` ranks from a forkserver that imported torch and qkit once (fresh interpreters
    would import them ``world`` times on this 2-core machine), bounded by SPAWN_TIMEOUT_S."""
    return spawn_ranks(
        world,
        worker,
        lambda r, port: (world, local, port, str(outdir), r, only),
        outdir,
        timeout_s=SPAWN_TIMEOUT_S,
        preload=["torch", "qkit", "qkit.distributed", "pytest"],
        what=f"world {world} ({local} per node)",
    )


@pytest.fixture(scope="module", params=list(WORLDS), ids=lambda k: f"world{WORLDS[k][0]}_{k}")
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    w, local = WORLDS[request.param]
    start = time.perf_counter()
    results = _spawn(w, local, tmp_path_factory.mktemp(f"world{w}"))
    return {"world": w, "local": local, "nodes": w // local, "ranks": results, "spawn_s": time.perf_counter() - start}


def _check(world: dict, name: str) -> list[dict]:
    out = [r[name] for r in world["ranks"]]
    for r, res in enumerate(out):
        assert "traceback" not in res, f"rank {r}, check {name!r}:\n{res['traceback']}"
    return out


def exact_mean(shape, dtype, world: int, trial: int, salt: int) -> torch.Tensor:
    """The mean over all ranks in float64, flattened."""
    return torch.stack([grad(shape, dtype, r, trial, salt).double().reshape(-1) for r in range(world)]).mean(0)


def simulate_qgz(inputs: list[torch.Tensor], nodes: int, local: int, g: int) -> list[torch.Tensor]:
    """qgZ's data movement written out rank by rank in one process (the same ops, no collectives)."""
    w = nodes * local
    first = [swizzle_quantize(x, g, 4, True, 1, nodes, local) for x in inputs]
    reduced = {}
    for n in range(nodes):
        for d in range(local):  # rank n*L+d receives chunk d of every rank on node n
            peers = [first[n * local + j] for j in range(local)]
            codes = torch.cat([q.view(local, -1)[d] for q, _ in peers])
            params = torch.cat([p.view(local, -1)[d] for _, p in peers]).view(-1, 1)
            reduced[n, d] = quantized_reduction(codes, params, g, g // local, 4, True, local)
    outs = []
    for n in range(nodes):
        for d in range(local):  # rank n*L+d receives chunk n of every rank with device index d
            codes = torch.cat([reduced[m, d][0].view(nodes, -1)[n] for m in range(nodes)])
            params = torch.cat([reduced[m, d][1].view(nodes, -1)[n] for m in range(nodes)]).view(-1, 1)
            vals = qkit.dequantize(codes, params, g // local, 4, True, torch.float32).view(nodes, -1)
            outs.append(vals.sum(dim=0).div_(w).to(inputs[0].dtype))
    return outs


def error_bound(shape, dtype, world: int, trial: int, salt: int, g: int) -> torch.Tensor:
    """Per element: |qgZ - mean| <= sum over ranks of the group's absmax / (4W).

    Each rank's 4-bit code is within one step (absmax/8) of its value, and so is each node's
    re-quantized sum (whose absmax is at most the sum of its ranks' absmaxes).
    """
    m = torch.stack(
        [grad(shape, dtype, r, trial, salt).double().reshape(g, -1).abs().amax(1) for r in range(world)]
    ).sum(0)
    return (m / (4 * world)).repeat_interleave(math.prod(shape) // g)


def test_groups_have_the_node_major_layout(world: dict) -> None:
    for rank, res in enumerate(world["ranks"]):
        local_size, global_size, keys = res["group_sizes"]
        assert (local_size, global_size) == (world["local"], world["nodes"]), rank
        assert keys == sorted(
            [f"local_{n}" for n in range(world["nodes"])] + [f"global_{d}" for d in range(world["local"])]
        )


def test_slices_paths_and_values(world: dict) -> None:
    """Each rank's slice of every case: shape/dtype contract, bit-exact against the simulation on the
    quantized path, within the 4-bit bound of the exact mean; the fallback is the exact mean."""
    assert _assert_slices(world) == ["2d_f32", "2d_bf16", "3d_f16", "odd_rows"]


def _assert_slices(world: dict) -> list[str]:
    """The checks of test_slices_paths_and_values; returns the cases that took the 4-bit path."""
    w, nodes, local = world["world"], world["nodes"], world["local"]
    res = _check(world, "main")
    quantized = []
    for i, (name, shape, dtype) in enumerate(CASES):
        plan = plan_qgz(shape, dtype, w)
        mean = exact_mean(shape, dtype, w, 0, i)
        numel = math.prod(shape)
        if plan.quantized:
            quantized.append(name)
            sim = simulate_qgz([grad(shape, dtype, r, 0, i) for r in range(w)], nodes, local, plan.groups)
            bound = error_bound(shape, dtype, w, 0, i, plan.groups)
        for r in range(w):
            start, stop = slice_bounds(numel, w, r)
            for key in ("out", "again", "single"):
                got = res[r][key][i]
                assert got.dtype == dtype and got.shape == (stop - start,), (name, r, key, got.dtype, got.shape)
                if plan.quantized:
                    assert torch.equal(got, sim[r]), f"{name}: rank {r} ({key}) differs from the simulation"
                    err = (got.double() - mean[start:stop]).abs()
                    slack = got.double().abs() * torch.finfo(dtype).eps + 1e-6
                    assert bool((err <= bound[start:stop] * (1 + 1e-5) + slack).all()), (name, r, err.max())
                else:
                    # summed in fp32 (fp64 for float64), then rounded once to the dtype
                    acc = torch.float64 if dtype == torch.float64 else torch.float32
                    want = mean[start:stop].to(acc).to(dtype)
                    torch.testing.assert_close(got, want, rtol=4 * torch.finfo(acc).eps, atol=1e-7)
    return quantized


def test_fallback_warns_once_per_reason(world: dict) -> None:
    for rank, res in enumerate(_check(world, "main")):
        reasons = sorted(
            "1-D" if "1-D tensor" in m else "size" if "not a multiple" in m else "dtype" if "float64" in m else m
            for m in res["warned_first"]
        )
        assert reasons == ["1-D", "dtype", "size"], (rank, res["warned_first"])
        assert res["warned_again"] == [], rank


def test_wire_bytes_match_the_table(world: dict) -> None:
    """Counted bytes == wire_bytes(): qgZ sends ~1/8 of an fp32 reduce-scatter."""
    w, local = world["world"], world["local"]
    want = sum(wire_bytes("qgz", shape, world_size=w, local_world_size=local, dtype=dt) for _, shape, dt in CASES)
    for rank, res in enumerate(_check(world, "main")):
        assert res["bytes"] == want, (rank, res["calls"])
        kinds = ["all_to_all", "all_to_all", "reduce_scatter", "reduce_scatter"]  # fp32 and fp64 fallbacks
        assert [c[0] for c in res["calls"]] == kinds, res["calls"]
    shape = (16, 24)
    q, fp32 = (wire_bytes(c, shape, world_size=w, local_world_size=local) for c in ("qgz", "reduce_scatter"))
    codes = (w - 1) * math.prod(shape) // (2 * w)
    assert q == codes + 4 * 24 * (w - 1) // w and codes * 8 == fp32


def clamp_error(inputs: list[torch.Tensor], nodes: int, local: int, g: int) -> torch.Tensor:
    """The part of qgZ's error (in the mean, flattened) that the quantizer's convention fixes in advance.

    With a step of ``absmax / 8`` (docs/ops.md §1), values in ``[7.5, 8]`` steps (the top half-step below
    ``+absmax``, at least the group's ``+absmax`` itself) round to code 8 and are clamped to 7. The
    negative side has code -8, so this pulls large positive values down: at each rank's quantization
    (step 1) and at each node's re-quantized sums (step 3). The rest is round-to-nearest error,
    which averages out over random inputs.
    """
    w = nodes * local

    def clamped(v: torch.Tensor) -> torch.Tensor:  # v fp32 [G, E] -> (7 - 8) * step where v rounds to 8
        m = v.abs().amax(dim=1, keepdim=True)
        scale = torch.where(m == 0, 1.0, 8.0 / m)
        return torch.where(torch.round(v * scale) > 7, -1.0 / scale, 0.0).double()

    total = torch.zeros(g, inputs[0].numel() // g, dtype=torch.float64)
    for n in range(nodes):
        node_sum = torch.zeros(g, inputs[0].numel() // g)
        for j in range(local):
            x = inputs[n * local + j].float().reshape(g, -1)
            total += clamped(x)
            node_sum += qkit.dequantize(*qkit.quantize(x, g, 4), g, 4, True, torch.float32)
        total += clamped(node_sum)
    return total.reshape(-1) / w


def test_error_is_what_4bit_implies_and_unbiased(world: dict) -> None:
    """Over many random inputs: every element within the bound, the RMS error that of a 4-bit step,
    the regression slope on the exact mean ~1, and no bias beyond the convention's clamp at code 7
    (predicted exactly by ``clamp_error``)."""
    w, nodes, local = world["world"], world["nodes"], world["local"]
    res = _check(world, "unbiased")
    plan = plan_qgz(UNBIASED_SHAPE, torch.float32, w)
    errs, exacts, clamps = [], [], []
    for t in range(UNBIASED_TRIALS):
        mean = exact_mean(UNBIASED_SHAPE, torch.float32, w, t, 100)
        bound = error_bound(UNBIASED_SHAPE, torch.float32, w, t, 100, plan.groups)
        got = torch.cat([res[r]["outs"][t] for r in range(w)]).double()
        assert bool(((got - mean).abs() <= bound * (1 + 1e-5) + 1e-6).all()), t
        errs.append(got - mean)
        exacts.append(mean)
        inputs = [grad(UNBIASED_SHAPE, torch.float32, r, t, 100) for r in range(w)]
        clamps.append(clamp_error(inputs, nodes, local, plan.groups))
    err, exact, clamp = torch.cat(errs), torch.cat(exacts), torch.cat(clamps)
    rms, bias = err.pow(2).mean().sqrt().item(), err.mean().item()
    rounding = err - clamp
    residual_bias, spread = rounding.mean().item(), rounding.std().item() / math.sqrt(rounding.numel())
    rel = rms / exact.pow(2).mean().sqrt().item()
    slope = ((err + exact) * exact).sum().item() / exact.pow(2).sum().item()
    print(
        f"\nqgZ world {w} ({UNBIASED_TRIALS} trials of {UNBIASED_SHAPE}): relative RMS error {rel:.4f}, "
        f"mean error {bias:+.2e} (RMS {rms:.2e}; clamp at code 7 predicts {clamp.mean().item():+.2e}; "
        f"rest {residual_bias:+.2e} +- {spread:.1e}), slope {slope:.4f}"
    )
    assert 0.02 < rel < 0.25, rel  # a scaling bug (DeepSpeed's L x the mean) is far outside
    assert abs(slope - 1) < 0.05, slope
    assert abs(residual_bias) < 5 * spread, (residual_bias, spread)  # round-to-nearest part: unbiased
    assert abs(bias - clamp.mean().item()) < 5 * spread


def test_loco_tracks_the_mean_better_than_plain_qgz(world: dict) -> None:
    """Accumulated over steps, error feedback keeps sum(result) close to sum(exact mean)."""
    w = world["world"]
    res = _check(world, "loco")
    exact = torch.stack([exact_mean(LOCO_SHAPE, torch.float32, w, t, 200) for t in range(LOCO_STEPS)])
    acc = {}
    for key in ("plain", "loco0", "loco8"):
        got = torch.cat([res[r][key] for r in range(w)], dim=1).double()  # [steps, M]
        acc[key] = (got - exact).cumsum(0).pow(2).mean(1).sqrt()  # RMS of the accumulated error per step
        if key != "plain":  # zero error at the first step: exactly plain qgZ
            assert torch.equal(got[0], torch.cat([res[r]["plain"][0] for r in range(w)]).double()), key
    print(
        f"\nworld {w}: RMS of the accumulated error after {LOCO_STEPS} steps: plain {acc['plain'][-1]:.4f}, "
        f"LoCo beta=0 {acc['loco0'][-1]:.4f}, LoCo beta=0.8 {acc['loco8'][-1]:.4f}"
    )
    assert acc["loco0"][-1] < 0.5 * acc["plain"][-1]
    assert acc["loco8"][-1] < acc["plain"][-1]


def test_loco_state_is_per_parameter(world: dict) -> None:
    """Zero error reproduces plain qgZ exactly: at a parameter's first step and after each of its
    own resets (pa every 3 of its steps, pb every 2 of its steps, pb reduced every other call)."""
    for rank, res in enumerate(_check(world, "loco")):
        rows = res["resets"]
        assert [row["a_equals_plain"] for row in rows] == [True, False, False, True, False, False, True], rank
        assert [row["a_steps"] for row in rows] == [1, 2, 3, 1, 2, 3, 1]
        b = [row for row in rows if "b_steps" in row]  # pb's own steps 1..4, reset after 3 of them
        assert [row["b_equals_plain"] for row in b] == [True, False, False, True], rank
        assert res["bias_fallback"] == (True, True), rank
        assert res["bf16_state"] == (torch.bfloat16, torch.bfloat16, 128, 128 // world["local"], 7)


def test_all_gather_quantized(world: dict) -> None:
    """Shapes/dtypes of all_gather_into_tensor; each shard is dequantize(quantize(shard)); bytes ~1/4."""
    w, local = world["world"], world["local"]
    res = _check(world, "qwz")
    for i, (name, shape, dtype, bits, ngroups) in enumerate(QWZ_CASES):
        shards = [grad(shape, dtype, r, 0, 400 + i) for r in range(w)]
        g = ngroups or qkit.distributed.default_groups(math.prod(shape))
        want = torch.cat(
            [qkit.dequantize(*qkit.quantize(s.reshape(-1), g, bits), g, bits, True, dtype).view(shape) for s in shards]
        )
        for rank in range(w):
            got, nbytes = res[rank][name]
            assert got.dtype == dtype and got.shape == (w * shape[0], *shape[1:]), (name, got.shape)
            assert torch.equal(got, want), (name, rank)
            assert nbytes == wire_bytes("qwz", shape, world_size=w, bits=bits, groups=ngroups)
        if name == "big_f32_8b" and w > 1:
            ratio = nbytes / wire_bytes("all_gather", shape, world_size=w)
            assert 0.25 <= ratio < 0.251, ratio
    for rank in range(w):
        assert res[rank]["f16_8b_3d_is_out"]
        node = rank // local
        shards = [grad((2, 4), torch.float32, node * local + j, 0, 450) for j in range(local)]
        g = qkit.distributed.default_groups(8)
        want = torch.cat(
            [qkit.dequantize(*qkit.quantize(s.reshape(-1), g, 8), g, 8, True, torch.float32) for s in shards]
        )
        assert torch.equal(res[rank]["local_group"], want.view(2 * local, 4)), rank


def test_errors_are_clear_and_on_every_rank(world: dict) -> None:
    w = world["world"]
    for rank, res in enumerate(_check(world, "errors")):
        errs = res["errors"]
        assert all(v != "no error" for v in errs.values()), (rank, errs)
        assert f"world size ({w}) must be a multiple of local_world_size (3)" in errs["local_3"]
        assert "pass local_world_size" in errs["local_none_cpu"]
        assert "positive int" in errs["local_0"]
        assert "global_0..global_" in errs["bad_dict"] and "but the world has" in errs["wrong_world"]
        assert "ranks passed different tensor shapes" in errs["validate"]
        assert "must be floating point" in errs["int_grad"]
        assert res["validated"][0].shape == (16 * 24 // w,)


def test_empty_groups_when_every_tensor_falls_back(world: dict) -> None:
    for rank, res in enumerate(_check(world, "empty_groups")):
        for got, want in zip(res["empty"], res["with_groups"], strict=True):
            assert torch.equal(got, want), rank
        for got, want in zip(res["loco_empty"], res["with_groups"][:2], strict=True):
            assert torch.equal(got, want), rank
        msg = res["needs_groups"]
        assert "`process_groups` is empty, but tensors[0] (shape (16, 24)" in msg and "hierarchical_groups" in msg, msg


def test_mismatched_calls_raise_the_same_error_on_every_rank(world: dict) -> None:
    _assert_mismatch(world)


def _assert_mismatch(world: dict) -> None:
    """Issue 16 item 5: ranks passing different calls all raise one ValueError naming the fields
    and the ranks, by default; nothing hangs; the group stays usable; checks are cached."""
    w, nodes, local = world["world"], world["nodes"], world["local"]
    res = _check(world, "mismatch")
    others = "rank 1" if w == 2 else f"ranks 1-{w - 1}"
    for name, fields in MISMATCH_FIELDS.items():
        msgs = [r[name] for r in res]
        assert all(m == msgs[0] for m in msgs), (name, msgs)  # the same error on every rank
        msg = msgs[0]
        assert msg.startswith("qkit.distributed.") and "ranks passed different" in msg, (name, msg)
        for field in fields:
            assert f"{field}: rank 0 = " in msg and f", {others} = " in msg, (name, field, msg)
        assert "validate=False" in msg, msg
    assert "qkit.distributed.all_gather_quantized: ranks passed different groups" in res[0]["qwz_groups"]
    assert "bits: rank 0 = 8, " + others + " = 4" in res[0]["qwz_bits"]
    for r in range(w):
        assert res[r]["checks_per_call"] == [1, 0, 1, 0, 1, 0], (r, res[r]["checks_per_call"])
    plan = plan_qgz((16, 24), torch.float32, w)
    sim = simulate_qgz([grad((16, 24), torch.float32, r, 0, 0) for r in range(w)], nodes, local, plan.groups)
    for r in range(w):
        assert torch.equal(res[r]["after"], sim[r]), r


@pytest.mark.parametrize(("w", "local"), [(2, 2)], ids=["world2_1x2"])
def test_mismatched_calls_world2(w: int, local: int, tmp_path: Path) -> None:
    """The same at world 2 (one node of two ranks)."""
    ranks = _spawn(w, local, tmp_path, only=("mismatch",))
    _assert_mismatch({"world": w, "local": local, "nodes": w // local, "ranks": ranks})


def test_timings(world: dict) -> None:
    """Not a check: prints how long each part took (slowest rank)."""
    times = {k: max(r["times"][k] for r in world["ranks"]) for k in world["ranks"][0]["times"]}
    print(
        f"\nworld {world['world']}: spawn+run {world['spawn_s']:.1f}s; "
        + ", ".join(f"{k} {v:.2f}s" for k, v in times.items())
    )


@pytest.mark.parametrize(("w", "local"), [(1, 1), (2, 2), (2, 1)], ids=["1x1", "1x2", "2x1"])
def test_degenerate_topologies(w: int, local: int, tmp_path: Path) -> None:
    """One rank, one node, one rank per node: the groups of size 1 copy instead of communicating."""
    ranks = _spawn(w, local, tmp_path, only=("main", "loco", "qwz"))
    world = {"world": w, "local": local, "nodes": w // local, "ranks": ranks}
    assert _assert_slices(world) == [name for name, shape, dt in CASES if plan_qgz(shape, dt, w).quantized]
    _check(world, "loco")
    test_all_gather_quantized(world)


# ---------------------------------------------------------------- single process, no process group


def test_plan_choice_of_groups() -> None:
    f32 = torch.float32
    assert plan_qgz((64, 32), f32, 8).groups == 64  # DeepSpeed's max(shape[0], shape[1], W) when valid
    assert plan_qgz((2, 64), f32, 8).groups == 64
    assert plan_qgz((4, 4), f32, 8).groups == 8  # at least W groups
    assert plan_qgz((3, 48), f32, 4).groups == 72  # 48 would leave odd groups: next valid one up
    for shape, w in [((3, 48), 4), ((6, 10), 2), ((5, 16), 8), ((7, 7, 16), 4)]:
        p = plan_qgz(shape, f32, w)
        m = math.prod(shape)
        assert p.groups % w == 0 and m % p.groups == 0 and (m // p.groups) % 2 == 0, (shape, w, p)
    assert plan_qgz((48,), f32, 4).reason == "1-D"
    assert plan_qgz((5, 6), f32, 4).reason == "size"
    assert plan_qgz((4, 8), torch.float64, 4).reason == "dtype"
    assert plan_qgz((0, 8), f32, 4).reason == "empty"
    with pytest.raises(TypeError, match="floating point"):
        plan_qgz((4, 8), torch.int32, 4)


def test_slice_bounds_cover_the_tensor_once() -> None:
    for numel, w in [(30, 4), (30, 8), (3, 8), (0, 4), (64, 8)]:
        bounds = [slice_bounds(numel, w, r) for r in range(w)]
        assert bounds[0][0] == 0 and bounds[-1][1] == numel
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))


def test_wire_bytes_table() -> None:
    m = 4096 * 1024
    rs = wire_bytes("reduce_scatter", m, world_size=16)
    q = wire_bytes("qgz", (4096, 1024), world_size=16, local_world_size=8)
    assert 1 / 8 <= q / rs < 1 / 8 * 1.01  # codes are exactly 1/8; params add 4*4096 bytes (0.8 %)
    ag = wire_bytes("all_gather", (1024, 1024), world_size=16)
    assert 1 / 4 <= wire_bytes("qwz", (1024, 1024), world_size=16) / ag < 1 / 4 * 1.01
    assert wire_bytes("qgz", (5, 6), world_size=4, local_world_size=2) == 3 * 4 * 8  # fallback, fp32
    with pytest.raises(ValueError, match="call"):
        wire_bytes("nope", 8, world_size=2)


def test_needs_an_initialized_process_group() -> None:
    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="not initialized"):
        hierarchical_groups(2)
    with pytest.raises(RuntimeError, match="not initialized"):
        all_to_all_quant_reduce([torch.zeros(4, 4)], {"local_0": None, "global_0": None})
    with pytest.raises(RuntimeError, match="not initialized"):
        all_gather_quantized(torch.zeros(4))
