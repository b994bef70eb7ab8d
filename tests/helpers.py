"""Comparison helpers and input generators shared by the test modules."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import qkit  # noqa: F401 - registers torch.ops.qkit
from reference import codes_of_storage, ref_dequantize, ref_finite_mask, ref_quantize

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def assert_same(got: Tensor, want: Tensor, what: str = "") -> None:
    """Bit-exact equality (torch.equal), NaNs in the same places, same dtype and shape."""
    got = got.detach().cpu()
    want = want.detach().cpu()
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.is_floating_point():
        got_nan, want_nan = torch.isnan(got), torch.isnan(want)
        assert torch.equal(got_nan, want_nan), f"{what}: NaN positions differ"
        got, want = got[~got_nan], want[~want_nan]
    if not torch.equal(got, want):
        diff = (got != want).nonzero()
        first = diff[0].tolist() if diff.numel() else []
        flat_got, flat_want = got.reshape(-1), want.reshape(-1)
        idx = (flat_got != flat_want).nonzero()[0].item()
        raise AssertionError(
            f"{what}: {diff.shape[0]} of {got.numel()} elements differ; first at {first}: "
            f"got {flat_got[idx].item()!r}, want {flat_want[idx].item()!r}"
        )


def count_straight_calls(monkeypatch: pytest.MonkeyPatch, module: object, names: tuple[str, ...]) -> list[str]:
    """Records each straight call a wrapper of ``module`` takes: ``module._<name>_kernel``
    (from ``straight_to_kernel``) appends ``name`` to the returned list when called."""
    taken: list[str] = []
    for name in names:
        attr = f"_{name}_kernel"
        straight = getattr(module, attr)

        def counted(*args: Any, _straight: Callable[..., Any] = straight, _name: str = name, **kwargs: Any) -> Any:
            taken.append(_name)
            return _straight(*args, **kwargs)

        monkeypatch.setattr(module, attr, counted)
    return taken


def make_input(shape, dtype: torch.dtype, seed: int = 0, kind: str = "randn") -> Tensor:
    """Deterministic CPU test data.

    kinds: "randn" (normal, magnitudes varying along the tensor), "ties" (values that
    land exactly on .5 between codes for 8-bit symmetric, so half-even rounding matters),
    "ints" (small integers, many equal values and ties in asymmetric mode).
    """
    gen = torch.Generator().manual_seed(seed)
    numel = 1
    for s in shape:
        numel *= s
    if kind == "randn":
        # normal data, magnitude drifting by powers of two along the tensor (groups differ)
        x = torch.randn(numel, generator=gen) * 10.0 ** torch.randint(-3, 4, (1,), generator=gen).item()
        x = x * torch.pow(2.0, (torch.arange(numel) // 37 % 9 - 4).to(torch.float32))
    elif kind == "ties":
        # 8-bit symmetric with max|x| = 1: scale 128, x = k/256 -> v = k/2 (a tie for odd k)
        x = torch.randint(-256, 257, (numel,), generator=gen).to(torch.float32) / 256
        if numel:
            x[:: max(1, numel // 8)] = 1.0
    elif kind == "ints":
        x = torch.randint(-5, 6, (numel,), generator=gen).to(torch.float32)
    else:
        raise ValueError(kind)
    return x.reshape(shape).to(dtype)


def check_quantize(x: torch.Tensor, groups: int, bits: int, symmetric: bool, device: str, packed: bool = True) -> None:
    """quantize on `device` == reference (codes of finite groups, params); then dequantize too."""
    q, params = torch.ops.qkit.quantize(x.to(device), groups, bits, symmetric, packed)
    assert q.device.type == params.device.type == torch.device(device).type
    want_q, want_params = ref_quantize(x, groups, bits, symmetric, packed)
    assert q.dtype == torch.int8 and q.shape == want_q.shape
    assert_same(params, want_params, "params")
    finite = ref_finite_mask(x, groups)
    if bool(finite.all()):
        assert_same(q, want_q, "q")
    else:
        got, want = codes_of_storage(q, bits, packed), codes_of_storage(want_q, bits, packed)
        assert_same(got[finite], want[finite], "q (finite groups)")
    for dtype in (None, torch.float32, torch.float16, torch.bfloat16):
        y = torch.ops.qkit.dequantize(q, params, groups, bits, symmetric, dtype, packed)
        want_y = ref_dequantize(q, params, groups, bits, symmetric, dtype, packed)
        assert_same(y, want_y, f"dequantize -> {dtype}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(
    world: int,
    target: Callable[..., None],
    args_of: Callable[[int, int], tuple],
    outdir: Path,
    *,
    timeout_s: float,
    preload: list[str],
    what: str,
) -> list[dict]:
    """Runs ``target(*args_of(rank, port))`` for every rank from one forkserver that imported
    ``preload`` once, kills every rank still alive after ``timeout_s`` (nothing outlives it), and
    returns each rank's saved ``rank{r}.pt``; fails the test with the ranks' logs otherwise."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(preload)
    port = free_port()
    procs = [ctx.Process(target=target, args=args_of(r, port)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if any(p.exitcode != 0 for p in procs):
        logs = [(outdir / f"rank{r}.log") for r in range(world)]
        detail = "\n".join(
            f"--- rank {r} (exit {p.exitcode}):\n{logs[r].read_text()[-3000:] if logs[r].exists() else ''}"
            for r, p in enumerate(procs)
        )
        pytest.fail(f"{what} failed or timed out:\n{detail}")
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def join_gloo_world(world: int, port: int, rank: int, outdir: str, timeout_s: float) -> None:
    """Set-up of a spawned rank: its output to ``rank{r}.log``, one thread, and a gloo process
    group on 127.0.0.1 whose collectives give up after ``timeout_s`` (nothing hangs)."""
    log = os.open(Path(outdir) / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch 2.13's renamed collectives
    if Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # 127.0.0.1 only, whatever the hostname resolves to
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


# ---------------------------------------------------------------- worlds of named checks

#: A distributed check: ``(rank, world) -> result`` (anything ``torch.save`` can write).
RankCheck = Callable[[int, int], Any]


def run_rank_checks(checks: dict[str, RankCheck], world: int, port: int, outdir: str, rank: int, timeout_s: float):
    """A spawned rank's whole life: join the world, run every check (a failure is kept as its
    traceback, so the other checks still run and every rank makes the same collectives),
    save the results to ``rank{r}.pt``, leave the world."""
    join_gloo_world(world, port, rank, outdir, timeout_s)
    results: dict[str, Any] = {}
    try:
        for name, fn in checks.items():
            try:
                results[name] = fn(rank, world)
            except Exception:
                results[name] = {"traceback": traceback.format_exc()}
        torch.save(results, Path(outdir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def spawn_check_world(world: int, worker: Callable[..., None], outdir: Path, timeout_s: float) -> dict:
    """Run ``worker(world, port, outdir, rank)`` on ``world`` ranks; ``{"world", "ranks"}`` with each rank's results."""
    ranks = spawn_ranks(
        world,
        worker,
        lambda r, port: (world, port, str(outdir), r),
        outdir,
        timeout_s=timeout_s,
        preload=["torch", "qkit", "qkit.distributed"],
        what=f"world {world}",
    )
    return {"world": world, "ranks": ranks}


def check_results(world: dict, name: str) -> list[dict]:
    """Every rank's result of check ``name``: fails with a rank's traceback, skips a check not run here."""
    if name not in world["ranks"][0]:
        pytest.skip(f"check {name!r} is not run at world {world['world']} (kept short on 2 cores)")
    out = [r[name] for r in world["ranks"]]
    for r, res in enumerate(out):
        assert "traceback" not in res, f"rank {r}, check {name!r}:\n{res['traceback']}"
    return out


def mse_steps(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    steps: range,
    batch: Callable[[int], tuple[Tensor, Tensor]],
) -> list[float]:
    """Train ``model`` one optimizer step per ``step`` on ``batch(step)`` = ``(x, y)`` with a
    mean-squared-error loss; the losses, as floats."""
    losses = []
    for step in steps:
        x, y = batch(step)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses
