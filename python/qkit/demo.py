"""``qkit demo`` (or ``python -m qkit.demo``): MoQ quantization-aware training on real data.

A small classifier learns scikit-learn's bundled handwritten digits (8x8 images,
1797 samples, no download) three ways, from the same initialization and the same
batches:

1. **float32**: plain training, the baseline.
2. **post-training quantization (PTQ)**: the float32 model's weights rounded to
   ``--target-bits`` after training (``qkit.quantize``/``qkit.dequantize`` for 4 and 8
   bits, ``qkit.fake_quantize``, the same rounding, otherwise). Accuracy drops.
3. **MoQ**: training with :class:`qkit.moq.MoQ` quantizing every weight after every
   optimizer step, from ``--start-bits`` down to ``--target-bits`` on a schedule
   slowed per layer by its Hessian eigenvalue. Its weights are then stored the same
   way as PTQ's, and it keeps most of the float32 accuracy.

It prints a results table and writes a plot (bit width per layer and test accuracy
over the steps) to ``--out``. Needs the ``demo`` extra: ``pip install "qkit[demo]"``.

``qkit demo --zeropp`` runs the ZeRO++ demo instead (:mod:`qkit.distributed.demo`): FSDP2 on
4 local gloo processes (2 nodes x 2), default comms against qkit's qgZ + qwZ (+ LoCo).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import qkit
from qkit.moq import EigenvalueConfig, MoQ, MoQConfig

DEMO_DEPS = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}
INSTALL_HINT = 'pip install "qkit[demo]"   (or: pip install scikit-learn matplotlib tqdm)'

BATCH = 64
LR = 1e-2
HIDDEN = (16, 16, 16)
EVAL_POINTS = 100  # test-accuracy samples per run (log-spaced, for the plot)


def missing_deps() -> list[str]:
    """The demo's optional dependencies that are not installed (pip names)."""
    return [pip for module, pip in DEMO_DEPS.items() if importlib.util.find_spec(module) is None]


# ---------------------------------------------------------------- data and model


@dataclass
class Data:
    """Digits split into train/test: ``x`` float32 ``[N, 64]`` in [0, 1], ``y`` int64 ``[N]``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits(seed: int, device: torch.device) -> Data:
    """scikit-learn's bundled digits, 70/30 stratified split (by ``seed``), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)

    def as_x(a) -> Tensor:
        return torch.tensor(a / 16.0, dtype=torch.float32, device=device)

    def as_y(a) -> Tensor:
        return torch.tensor(a, dtype=torch.int64, device=device)

    return Data(as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test))


def digits_mlp(hidden: tuple[int, ...], seed: int) -> nn.Sequential:
    """A ReLU MLP from the 64 pixels of a digit through ``hidden`` to its 10 classes, seeded."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = 64
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def make_model(seed: int, device: torch.device) -> nn.Sequential:
    """MLP 64-16-16-16-10 (ReLU): narrow enough that every weight matters at a few bits."""
    return digits_mlp(HIDDEN, seed).to(device)


def model_name() -> str:
    """``"MLP 64-16-16-16-10"``."""
    return "MLP " + "-".join(str(w) for w in (64, *HIDDEN, 10))


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def store_weights(model: nn.Module, bits: int, groups: int = 1) -> nn.Module:
    """A copy of ``model`` whose >=2-D weights are rounded to ``bits`` (symmetric, ``groups`` per weight).

    4 and 8 bits go through real storage (``qkit.quantize`` -> int8 codes ->
    ``qkit.dequantize``); other widths use ``qkit.fake_quantize``, which is the same
    rounding (docs/ops.md §3) without a storage format.
    """
    stored = copy.deepcopy(model)
    with torch.no_grad():
        for p in stored.parameters():
            if p.dim() < 2:
                continue
            if bits in (4, 8):
                q, params = qkit.quantize(p, groups, bits, True)
                p.copy_(qkit.dequantize(q, params, groups, bits, True, p.dtype))
            else:
                p.copy_(qkit.fake_quantize(p, groups, bits, True))
    return stored


# ---------------------------------------------------------------- training


@dataclass
class Run:
    """What one training run recorded."""

    steps: list[int] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    bits: dict[str, list[int]] = field(default_factory=dict)  # per weight, one entry per step
    seconds: float = 0.0


def train(
    model: nn.Module,
    data: Data,
    steps: int,
    seed: int,
    moq_config: MoQConfig | None = None,
    progress: Callable[..., object] | None = None,
    label: str = "",
) -> tuple[Run, MoQ | None]:
    """Train ``model`` with AdamW on shuffled batches (order fixed by ``seed``), optionally under MoQ."""
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    # Cosine decay: the last steps fine-tune at a small learning rate (both runs alike).
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    moq = None
    if moq_config is not None:
        # A fixed slice of the training set: the loss whose curvature ranks the layers.
        probe_x, probe_y = data.x_train[:256], data.y_train[:256]
        moq = MoQ(
            model, moq_config, eigenvalue_loss=lambda: nn.functional.cross_entropy(model(probe_x), probe_y)
        ).attach(opt)
    run = Run()
    if moq is not None:
        run.bits = {name: [] for name in moq.parameter_names}
    # Log-spaced evaluations: the schedule's periods grow geometrically.
    eval_at = {round(steps ** (i / (EVAL_POINTS - 1))) for i in range(EVAL_POINTS)} | {steps}
    postfix_every = max(steps // 200, 1)
    n = data.x_train.shape[0]
    bar = progress(total=steps, desc=label, unit="step", leave=True) if progress else None
    start = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(n, (BATCH,), generator=gen).to(data.x_train.device)
        loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()  # MoQ quantizes here (optimizer step post-hook)
        schedule.step()
        if moq is not None:
            for name, bits in moq.current_bits().items():
                run.bits[name].append(bits)
        if step in eval_at:
            run.steps.append(step)
            run.test_acc.append(accuracy(model, data.x_test, data.y_test))
        if bar is not None:
            bar.update(1)
            if step % postfix_every == 0:
                postfix = {"loss": f"{loss.item():.3f}", "test acc": f"{run.test_acc[-1]:.3f}"}
                if moq is not None:
                    postfix["bits"] = "/".join(str(b[-1]) for b in run.bits.values())
                bar.set_postfix(postfix)
    if bar is not None:
        bar.close()
    run.seconds = time.perf_counter() - start
    if moq is not None:
        moq.detach()
    return run, moq


def moq_config(start_bits: int, target_bits: int) -> MoQConfig:
    """The demo's MoQ run: per-tensor symmetric weights, qkit's kernel, eigenvalue scheduling.

    The first drop comes at step 2; on each drop a layer's period doubles and is
    multiplied by ``1 + floor(4·eig)`` (1 to 5), so the most sensitive layer can need
    ``2·10^(drops - 1)`` steps: 20,000 for 8 -> 3 bits, which the default 24,000 steps
    leave time to adapt after (at 4 bits: 2,000).
    """
    return MoQConfig(
        start_bits=start_bits,
        target_bits=target_bits,
        quantize_period=2,
        schedule_offset=0,
        groups=1,
        use_quantizer_kernel=True,
        eigenvalue=EigenvalueConfig(enabled=True, max_iter=20, tol=1e-2),
    )


# ---------------------------------------------------------------- output


def plot(path: Path, fp32: Run, moq_run: Run, ptq_acc: float, target_bits: int, start_bits: int) -> None:
    """Two panels: MoQ bit width per layer over the steps; test accuracy of both runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bits, ax_acc) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for name, bits in moq_run.bits.items():
        ax_bits.step(range(1, len(bits) + 1), bits, where="post", label=name)
    ax_bits.set_xscale("log")  # periods grow geometrically
    ax_bits.set_ylabel("MoQ bit width")
    ax_bits.set_ylim(target_bits - 0.5, start_bits + 0.5)
    ax_bits.set_yticks(range(target_bits, start_bits + 1))
    ax_bits.legend(title="weight", loc="upper right")
    ax_bits.set_title("MoQ schedule: bit width per layer (eigenvalue-scaled periods)")
    ax_acc.plot(fp32.steps, fp32.test_acc, label="float32 training")
    ax_acc.plot(moq_run.steps, moq_run.test_acc, label=f"MoQ training ({start_bits} -> {target_bits} bits)")
    ax_acc.axhline(ptq_acc, color="tab:red", linestyle="--", label=f"float32 model, {target_bits}-bit PTQ")
    ax_acc.set_xlabel("optimizer step (log scale)")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_ylim(max(0.0, min(ptq_acc, min(moq_run.test_acc[len(moq_run.test_acc) // 4 :])) - 0.05), 1.0)
    ax_acc.legend(loc="lower right")
    ax_acc.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_table(rows: list[tuple[str, str, float]]) -> str:
    """A small fixed-width table: training, weights, test accuracy."""
    header = ("training", "weights", "test accuracy")
    w0 = max(len(header[0]), *(len(r[0]) for r in rows)) + 2
    w1 = max(len(header[1]), *(len(r[1]) for r in rows)) + 2
    lines = [f"{header[0]:<{w0}}{header[1]:<{w1}}{header[2]:>13}", "-" * (w0 + w1 + 13)]
    lines += [f"{name:<{w0}}{weights:<{w1}}{acc:>13.3f}" for name, weights, acc in rows]
    return "\n".join(lines)


@dataclass
class Result:
    """The three accuracies and the plot's path."""

    fp32: float
    ptq: float
    moq: float
    plot: Path | None


def run_demo(
    steps: int, start_bits: int, target_bits: int, device: torch.device, seed: int, out: Path | None, quiet: bool
) -> Result:
    """The whole demo; returns the accuracies (and prints the table unless ``quiet``)."""
    from tqdm.auto import tqdm

    progress = None if quiet else tqdm
    say = (lambda *a, **k: None) if quiet else print
    data = load_digits(seed, device)
    say(
        f"digits: {data.x_train.shape[0]} train / {data.x_test.shape[0]} test images (8x8), "
        f"{model_name()}, {steps} steps per run, {device}"
    )
    fp32_model = make_model(seed, device)
    fp32_run, _ = train(fp32_model, data, steps, seed, progress=progress, label="float32")
    fp32_acc = accuracy(fp32_model, data.x_test, data.y_test)
    ptq_acc = accuracy(store_weights(fp32_model, target_bits), data.x_test, data.y_test)

    moq_model = make_model(seed, device)
    moq_run, moq = train(moq_model, data, steps, seed, moq_config(start_bits, target_bits), progress, "MoQ")
    assert moq is not None
    moq_acc = accuracy(store_weights(moq_model, target_bits), data.x_test, data.y_test)

    weights = {8: "int8 codes", 4: "int4 codes"}.get(target_bits, f"{target_bits}-bit codes")
    rows = [
        ("float32", "float32", fp32_acc),
        (f"float32, then {target_bits}-bit PTQ", weights, ptq_acc),
        (f"MoQ {start_bits} -> {target_bits} bits (eigenvalue)", weights, moq_acc),
    ]
    say("\n" + results_table(rows))
    final = {name: bits[-1] for name, bits in moq_run.bits.items()}
    last = {name: max((d.step for d in moq.history if d.name == name), default=0) for name in final}
    say("MoQ reached " + ", ".join(f"{n} {final[n]} bits (step {last[n]})" for n in final))
    say(
        f"PTQ to {target_bits} bits lost {fp32_acc - ptq_acc:.3f} accuracy; "
        f"MoQ at {target_bits} bits is {moq_acc - fp32_acc:+.3f} from float32 "
        f"({moq_acc - ptq_acc:+.3f} over PTQ)"
    )
    plot_path = None
    if out is not None:
        plot_path = out / "moq_demo.png"
        plot(plot_path, fp32_run, moq_run, ptq_acc, target_bits, start_bits)
        say(f"plot: {plot_path.resolve()}")
    return Result(fp32_acc, ptq_acc, moq_acc, plot_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qkit demo", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument(
        "--zeropp",
        action="store_true",
        help="the ZeRO++ demo: FSDP2 on 4 local gloo processes, default comms vs qgZ + qwZ (+ LoCo)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help=f"optimizer steps per run (default 24000; --zeropp: {ZEROPP_STEPS})"
    )
    parser.add_argument("--target-bits", type=int, default=3, help="final weight bits, 2..8 (default 3)")
    parser.add_argument("--start-bits", type=int, default=8, help="MoQ's first bit width (default 8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="data split, initialization and batch order")
    parser.add_argument("--out", type=Path, default=Path("qkit-demo"), help="directory for the plot")
    parser.add_argument("--no-plot", action="store_true", help="do not write the plot")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or table (for scripts)")
    parser.add_argument(
        "--grad-format", default=None, choices=("e4m3", "e5m2"), help="--zeropp: add a run with FP8 gradients"
    )
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = ZEROPP_STEPS if args.zeropp else 24000
    if not 2 <= args.target_bits <= args.start_bits <= 16:
        parser.error("need 2 <= --target-bits <= --start-bits <= 16")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    missing = missing_deps()
    if missing:
        print(f"qkit demo needs {', '.join(missing)}, which is not installed:\n  {INSTALL_HINT}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    threads = torch.get_num_threads()
    if not args.quiet:
        print(f"qkit {qkit.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    if args.zeropp:
        return _zeropp(args, start)
    # A model this small runs fastest on one thread: more threads only add
    # synchronization, and stall badly when other processes share the cores.
    torch.set_num_threads(1)
    try:
        run_demo(
            args.steps,
            args.start_bits,
            args.target_bits,
            device,
            args.seed,
            None if args.no_plot else args.out,
            args.quiet,
        )
    finally:
        torch.set_num_threads(threads)
    if not args.quiet:
        print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


ZEROPP_STEPS = 150


def _zeropp(args: argparse.Namespace, start: float) -> int:
    """``--zeropp``: the ZeRO++ demo (CPU, gloo; ``--device``, ``--target-bits`` and ``--start-bits`` do not apply)."""
    import tempfile

    from qkit.distributed.demo import run_zeropp_demo

    with tempfile.TemporaryDirectory(prefix="qkit-zeropp-") as work:
        out = None if args.no_plot else args.out
        run_zeropp_demo(args.steps, args.seed, out, args.quiet, Path(work), grad_format=args.grad_format)
    if not args.quiet:
        print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
