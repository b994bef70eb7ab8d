"""``python -m qkit.demo`` (or ``qkit demo``): qkit end to end on this machine.

1. The quickstart calls on a 4096x1024 bfloat16 weight: storage size and error
   of int8/int4 group-wise quantization, and kernel throughput.
2. A small classifier trained in float, then quantized to 2 bits after training
   (accuracy drops), then fine-tuned with 2-bit fake quantization and the
   straight-through estimator inside ``torch.compile(fullgraph=True)`` (accuracy
   comes back) - the workflow MoQ automates.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor, nn

import qkit


def _rel_error(a: Tensor, b: Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _throughput(fn, nbytes: int, repeat: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return nbytes * repeat / (time.perf_counter() - start) / 1e9


def quickstart(device: torch.device) -> None:
    torch.manual_seed(0)
    w = torch.randn(4096, 1024, dtype=torch.bfloat16, device=device)
    groups = 4096  # one group per row
    print(f"weight {tuple(w.shape)} {w.dtype} on {device}: {w.numel() * 2 / 2**20:.1f} MiB")
    print(f"{'scheme':<28}{'stored MiB':>11}{'rel. error':>12}{'GB/s':>8}")
    for bits in (8, 4):
        q, params = torch.ops.qkit.quantize(w, groups, bits, True)
        w2 = torch.ops.qkit.dequantize(q, params, groups, bits, True, torch.bfloat16)
        stored = (q.numel() + params.numel() * 4) / 2**20
        gbps = _throughput(lambda b=bits: torch.ops.qkit.quantize(w, groups, b, True), w.numel() * 2 + q.numel())
        print(f"{f'int{bits} symmetric, per row':<28}{stored:>11.2f}{_rel_error(w2, w):>12.4f}{gbps:>8.1f}")
    for bits in (8, 4):
        wq = qkit.fake_quantize(w, bits=bits, groups=groups)
        gbps = _throughput(lambda b=bits: qkit.fake_quantize(w, bits=b, groups=groups), w.numel() * 4)
        print(f"{f'fake-quant {bits}-bit (bf16)':<28}{'-':>11}{_rel_error(wq, w):>12.4f}{gbps:>8.1f}")


class QuantLinear(nn.Linear):
    """A Linear layer whose weight is fake-quantized (per output row) in the forward pass."""

    bits: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight if self.bits is None else qkit.fake_quantize(self.weight, self.out_features, self.bits)
        return nn.functional.linear(x, w, self.bias)


def _make_data(centers: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    labels = torch.randint(len(centers), (n,), generator=generator)
    points = centers[labels] + 1.6 * torch.randn(n, centers.shape[1], generator=generator)
    return torch.tanh(points) + 0.1 * torch.sin(3 * points), labels


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def qat(device: torch.device, steps: int, bits: int) -> None:
    gen = torch.Generator().manual_seed(0)
    dim, classes = 32, 10
    centers = torch.randn(classes, dim, generator=gen)
    x_train, y_train = _make_data(centers, 16384, gen)
    x_test, y_test = _make_data(centers, 4096, gen)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    torch.manual_seed(0)
    model = nn.Sequential(QuantLinear(dim, 256), nn.GELU(), QuantLinear(256, 256), nn.GELU(), QuantLinear(256, classes))
    model = model.to(device)
    layers = [m for m in model if isinstance(m, QuantLinear)]

    def train(n_steps: int, lr: float) -> None:
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        step = torch.compile(lambda xb, yb: nn.functional.cross_entropy(model(xb), yb), fullgraph=True)
        for i in range(n_steps):
            idx = torch.randint(len(x_train), (256,), device=device)
            loss = step(x_train[idx], y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i == 0:
                first_loss = loss.item()
        print(f"    loss {first_loss:.3f} -> {loss.item():.3f} over {n_steps} steps")

    print(f"\nMLP {dim}-256-256-{classes} on a synthetic 10-class task ({device})")
    print("  training in float32 ...")
    train(steps, 3e-3)
    float_acc = _accuracy(model, x_test, y_test)
    for layer in layers:
        layer.bits = bits
    ptq_acc = _accuracy(model, x_test, y_test)
    print(f"  fine-tuning with {bits}-bit fake quantization (STE, torch.compile fullgraph) ...")
    train(max(steps // 4, 1), 1e-3)
    qat_acc = _accuracy(model, x_test, y_test)
    print(f"  {'float32 weights':<34} test accuracy {float_acc:.3f}")
    print(f"  {f'{bits}-bit per-row, after training':<34} test accuracy {ptq_acc:.3f}")
    print(f"  {f'{bits}-bit per-row, after {bits}-bit QAT':<34} test accuracy {qat_acc:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qkit demo", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=400, help="float training steps (QAT runs a quarter)")
    parser.add_argument("--bits", type=int, default=2, help="weight bits for the quantized model (2..16)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"qkit {qkit.__version__}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    quickstart(device)
    qat(device, args.steps, args.bits)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
