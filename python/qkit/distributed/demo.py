"""``qkit demo --zeropp``: ZeRO++ comms (qgZ, qwZ, LoCo) in FSDP2 training, on 4 local gloo processes.

Four processes on 127.0.0.1 stand for 2 "nodes" x 2 ranks (``local_world_size=2``: the gradient
reduce-scatter takes two hops, inside the node then across nodes). They train the same MLP on
scikit-learn's bundled digits with FSDP2 (``fully_shard`` per layer) three times, from the same
initialization and the same batches:

1. **default**: FSDP2's own comms (fp32 reduce-scatter and all-gather);
2. **qgZ + qwZ**: :func:`qkit.distributed.zeropp` with 4-bit gradients and 8-bit weights;
3. **qgZ + qwZ + LoCo**: the same with LoCo error feedback on the gradients;
4. with ``grad_format`` (``qkit demo --zeropp --grad-format e4m3``) also **qgZ e4m3 + qwZ**: FP8
   gradients instead of 4-bit ones.

The parent prints a table (final training loss, test accuracy, bytes each rank sent per step,
the ratio to the default) and writes a plot (loss curves; bytes per step). Every collective runs
under a process-group timeout and the whole job under ``timeout_s``, after which every process
is killed: nothing can hang.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["RUNS", "ZeroppResult", "demo_runs", "run_zeropp_demo"]

NODES, LOCAL_WORLD_SIZE = 2, 2
WORLD = NODES * LOCAL_WORLD_SIZE
HIDDEN = (256, 256)
BATCH = 64  # global batch: 16 samples per rank
LR = 1e-3
RUNS = ("default", "qgZ + qwZ", "qgZ + qwZ + LoCo")


def demo_runs(grad_format: str | None = None) -> tuple[str, ...]:
    """The demo's runs: :data:`RUNS`, plus one with FP8 gradients when ``grad_format`` is given."""
    return RUNS if grad_format is None else (*RUNS, f"qgZ {grad_format} + qwZ")


COLLECTIVE_TIMEOUT_S = 60


@dataclass
class RunRecord:
    """One training run: the batch loss of every step (averaged over the ranks), then the loss on
    the whole training set and the test accuracy of the final model, and the handle's byte counts
    over the training steps (rank 0)."""

    losses: list[float] = field(default_factory=list)
    train_loss: float = 0.0
    test_acc: float = 0.0
    wire: dict[str, int] = field(default_factory=dict)  # ZeroPP.wire_bytes() after the last step
    seconds: float = 0.0


@dataclass
class ZeroppResult:
    """Everything the demo measured, and the plot's path."""

    steps: int
    runs: dict[str, RunRecord]
    plot: Path | None

    def bytes_per_step(self, label: str) -> tuple[int, int]:
        """(reduce-scatter, all-gather) bytes one rank sent per step in run ``label``. The default
        run's are the baseline the quantized runs' handles count for the same calls (FSDP2's own
        comms; ``tests/test_fsdp.py`` checks them at the torch.distributed boundary)."""
        if label == "default":
            wire = self.runs[RUNS[1]].wire
            return wire["baseline_reduce_scatter"] // self.steps, wire["baseline_all_gather"] // self.steps
        wire = self.runs[label].wire
        return wire["reduce_scatter"] // self.steps, wire["all_gather"] // self.steps

    def final_loss(self, label: str) -> float:
        """Loss of run ``label``'s final model on the whole training set."""
        return self.runs[label].train_loss


def make_model(seed: int) -> nn.Sequential:
    """MLP 64-256-256-10 (ReLU), 85k parameters."""
    from qkit.demo import digits_mlp

    return digits_mlp(HIDDEN, seed)


def _train(
    label: str, rank: int, steps: int, seed: int, data: Any, progress: bool, grad_format: str | None = None
) -> RunRecord:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import qkit.distributed as qd

    model = make_model(seed)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    handle = None
    if label in RUNS[1:]:
        loco = qd.LocoConfig(beta=0.8, reset_T=1024) if "LoCo" in label else None
        handle = qd.zeropp(model, grad_bits=4, weight_bits=8, loco=loco, local_world_size=LOCAL_WORLD_SIZE)
    elif label != "default":
        handle = qd.zeropp(model, grad_format=grad_format, weight_bits=8, local_world_size=LOCAL_WORLD_SIZE)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    n = data.x_train.shape[0]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"{label:<17}", unit="step")
    losses = torch.zeros(steps)
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(n, (BATCH,), generator=gen)[rank::WORLD]  # this rank's quarter of the batch
        loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses[step] = loss.detach()
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    wire = handle.wire_bytes() if handle else {}  # the training steps only
    dist.all_reduce(losses)
    with torch.no_grad():  # every rank evaluates the whole sets (the forward is collective)
        train_loss = nn.functional.cross_entropy(model(data.x_train), data.y_train).item()
        acc = (model(data.x_test).argmax(dim=1) == data.y_test).float().mean().item()
    return RunRecord((losses / WORLD).tolist(), train_loss, acc, wire, seconds)


def _worker(
    rank: int, port: int, steps: int, seed: int, outdir: str, progress: bool, grad_format: str | None = None
) -> None:
    """One rank: a gloo process group on 127.0.0.1, the runs, results to ``rank{r}.pt``."""
    import warnings

    import torch.distributed as dist

    from qkit.demo import load_digits
    from qkit.distributed.comm import init_local_gloo

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch 2.13's renamed collectives
    torch.set_num_threads(1)
    os.environ.pop("LOCAL_WORLD_SIZE", None)  # the topology is the demo's, not the launcher's
    init_local_gloo(rank, WORLD, port, COLLECTIVE_TIMEOUT_S)
    try:
        data = load_digits(seed, torch.device("cpu"))
        runs = {
            label: _train(label, rank, steps, seed, data, progress and rank == 0, grad_format)
            for label in demo_runs(grad_format)
        }
        torch.save({"runs": runs}, Path(outdir) / f"rank{rank}.pt")
    except Exception:
        (Path(outdir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(
    steps: int, seed: int, outdir: Path, progress: bool, timeout_s: float, grad_format: str | None = None
) -> dict[str, RunRecord]:
    """Run the 4 ranks; kill them all when one fails or ``timeout_s`` passes."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "qkit.distributed", "qkit.demo", "sklearn.datasets"])
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, port, steps, seed, str(outdir), progress, grad_format))
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.is_alive() for p in procs):
            if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    if any(p.exitcode != 0 for p in procs):
        errors = [(outdir / f"rank{r}.err") for r in range(WORLD)]
        detail = "\n".join(f"rank {r}:\n{e.read_text()}" for r, e in enumerate(errors) if e.exists())
        why = "timed out" if time.monotonic() > deadline else "failed"
        raise RuntimeError(f"qkit demo --zeropp: the {WORLD} ranks {why} (limit {timeout_s:.0f} s)\n{detail}")
    return torch.load(outdir / "rank0.pt", weights_only=False)["runs"]


def table(result: ZeroppResult) -> str:
    """The results table: final loss, test accuracy, bytes per step, ratio to the default."""
    header = f"{'comms':<19}{'train loss':>11}{'test acc':>10}{'grad B/step':>13}{'weight B/step':>15}{'ratio':>7}"
    lines = [header, "-" * len(header)]
    base = sum(result.bytes_per_step("default"))
    for label in result.runs:
        rs, ag = result.bytes_per_step(label)
        rec = result.runs[label]
        ratio = (rs + ag) / base
        lines.append(
            f"{label:<19}{result.final_loss(label):>11.4f}{rec.test_acc:>10.3f}{rs:>13,}{ag:>15,}{ratio:>7.3f}"
        )
    return "\n".join(lines)


def plot(path: Path, result: ZeroppResult) -> None:
    """Two panels: training loss per step of the three runs; bytes per step (gradients, weights)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    window = 10
    labels = list(result.runs)
    for label in labels:
        losses = torch.tensor(result.runs[label].losses)
        smooth = losses.unfold(0, window, 1).mean(dim=1) if losses.numel() >= window else losses
        start = losses.numel() - smooth.numel() + 1
        ax_loss.plot(range(start, losses.numel() + 1), smooth.tolist(), label=label, linewidth=1.2)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel(f"batch loss (mean over 4 ranks, {window}-step average)")
    ax_loss.set_yscale("log")
    ax_loss.set_title(f"FSDP2, 2 nodes x 2 ranks (gloo), {result.steps} steps")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    rs = [result.bytes_per_step(label)[0] / 1024 for label in labels]
    ag = [result.bytes_per_step(label)[1] / 1024 for label in labels]
    x = range(len(labels))
    ax_bytes.bar(x, rs, label="gradients (reduce-scatter)")
    ax_bytes.bar(x, ag, bottom=rs, label="weights (all-gather)")
    ax_bytes.set_xticks(list(x), labels, fontsize=8)
    ax_bytes.set_ylabel("KiB sent per rank per step")
    ax_bytes.set_title("bytes on the wire")
    ax_bytes.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_zeropp_demo(
    steps: int,
    seed: int,
    out: Path | None,
    quiet: bool,
    workdir: Path,
    timeout_s: float = 600.0,
    grad_format: str | None = None,
) -> ZeroppResult:
    """The whole ZeRO++ demo (spawns the 4 ranks); prints the table unless ``quiet``.
    ``grad_format`` (``"e4m3"``/``"e5m2"``) adds a run with FP8 gradients."""
    say = (lambda *a, **k: None) if quiet else print
    say(
        f"FSDP2 on {WORLD} gloo processes (127.0.0.1, {NODES} nodes x {LOCAL_WORLD_SIZE}), digits, "
        f"MLP 64-{'-'.join(map(str, HIDDEN))}-10, {steps} steps per run, global batch {BATCH}"
    )
    workdir.mkdir(parents=True, exist_ok=True)
    runs = _spawn(steps, seed, workdir, not quiet, timeout_s, grad_format)
    result = ZeroppResult(steps, runs, None)
    say("\n" + table(result))
    d, q, lc = (result.final_loss(label) for label in RUNS)
    say(
        f"final training-set loss vs default: qgZ + qwZ {q / d - 1:+.2%}, with LoCo {lc / d - 1:+.2%}"
        + "".join(f", {label} {result.final_loss(label) / d - 1:+.2%}" for label in list(result.runs)[len(RUNS) :])
        + ". Bytes: what one rank sent per step (the default's as the handles count FSDP2's own comms)"
    )
    if out is not None:
        result.plot = out / "zeropp_demo.png"
        plot(result.plot, result)
        say(f"plot: {result.plot.resolve()}")
    return result
