"""A torch without one of the private names qkit's fast paths read still imports qkit, and
every op gives the same results through the fallback (the plain dispatcher call).

Each case hides names from torch in a child process while it runs ``import qkit`` (a rename,
as qkit sees it), runs :func:`compute` there, and compares with :func:`compute` run here on
the normal path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import qkit
import qkit.ops
from qkit import zeropp_ops


@dataclass(frozen=True)
class Removal:
    deletes: tuple[str, ...]  # "module.attr" or "module.Class.attr", deleted in this order
    missing: tuple[str, ...]  # what qkit.ops.MISSING_PRIVATE_APIS must then list
    straight: bool  # whether straight calls stay on
    autograd: bool = True  # whether the Autograd kernels (estimator, guards, version bumps) stay
    # whether a plain CPU call then goes straight (None: as `straight`); without the forward-AD
    # level the gate cannot rule out a tangent, so it never does
    goes_straight: bool | None = None


REMOVALS: dict[str, Removal] = {
    "after_autograd_keyset": Removal(("torch._C._after_autograd_keyset",), ("torch._C._after_autograd_keyset",), True),
    "both_below_autograd_routes": Removal(
        ("torch._C._after_autograd_keyset", "torch._C._dispatch_keyset_full_after"),
        ("torch._C._after_autograd_keyset", "torch._C._dispatch_keyset_full_after"),
        True,
        autograd=False,
    ),
    "redispatch_boxed": Removal(
        ("torch._C._DispatchOperatorHandle.redispatch_boxed",), ("OpOverload._handle.redispatch_boxed",), False
    ),
    "dispatch_key_set": Removal(
        ("torch._C.DispatchKeySet",),
        ("torch._C.DispatchKeySet(DispatchKey.CPU)", "torch._C.DispatchKeySet(DispatchKey.CUDA)"),
        False,
    ),
    "profiler_enabled": Removal(("torch.autograd._profiler_enabled",), ("torch.autograd._profiler_enabled",), False),
    "is_fwd_grad_enabled": Removal(("torch._C._is_fwd_grad_enabled",), ("torch._C._is_fwd_grad_enabled",), True),
    "forward_ad_current_level": Removal(
        ("torch.autograd.forward_ad._current_level",),
        ("torch.autograd.forward_ad._current_level",),
        True,
        goes_straight=False,
    ),
}
for _name in (
    "_are_functorch_transforms_active",
    "_len_torch_dispatch_stack",
    "_is_torch_function_mode_enabled",
    "_get_tracing_state",
):
    REMOVALS[_name.strip("_")] = Removal((f"torch._C.{_name}",), (f"torch._C.{_name}",), False)


def compute(autograd: bool) -> dict[str, object]:
    """Every wrapper and op form on CPU, seeded; gradients and version bumps when ``autograd``."""
    torch.manual_seed(0)
    x = torch.randn(8, 64)
    h = x.to(torch.bfloat16)
    got: dict[str, object] = {}
    got["fake"] = qkit.fake_quantize(x, 16, 5)
    got["fake-asym-bf16"] = qkit.fake_quantize(h, 8, 8, symmetric=False)
    torch.manual_seed(1)
    got["fake-stochastic"] = qkit.fake_quantize(x, 4, 4, stochastic=True)
    got["fake-out"] = qkit.fake_quantize(x, 8, 6, out=torch.empty_like(x))
    in_place = x.clone()
    version = in_place._version
    got["fake-in-place"] = qkit.fake_quantize_(in_place, 4, 3)
    bumps = [in_place._version - version]
    for bits in (4, 8):
        q, p = qkit.quantize(h, 16, bits, symmetric=False)
        got[f"quantize-{bits}"] = (q, p)
        got[f"dequantize-{bits}"] = qkit.dequantize(q, p, bits=bits, symmetric=False, dtype=torch.float32)
        out = (torch.empty_like(q), torch.empty_like(p))
        version = out[0]._version
        got[f"quantize-out-{bits}"] = qkit.quantize(h, 16, bits, symmetric=False, out=out)
        bumps.append(out[0]._version - version)
        deq = torch.empty(8, 64)
        got[f"dequantize-out-{bits}"] = qkit.dequantize(q, p, bits=bits, symmetric=False, out=deq)
    got["swizzle"] = zeropp_ops.swizzle_quantize(x, 16, 4, True, 2, 2, 2)
    error = torch.zeros(512)
    got["loco-swizzle"] = zeropp_ops.loco_swizzle_quantize(x, error, 0.5, 16, 8, False, 1, 2, 2)
    got["loco-error"] = error
    q, p = got["swizzle"]
    got["reduction"] = zeropp_ops.quantized_reduction(q, p, 16, 4, 4, True, 2)
    bumps += _fp_forms(x, h, got)
    if autograd:
        got["versions"] = torch.tensor(bumps)
    # The straight-through gradients: without the below-Autograd keys, torch's own
    # register_autograd gives them.
    for name, fq in (("", qkit.fake_quantize), ("-fp", lambda t, g, _: qkit.fake_quantize_fp(t, g, "e2m1", "mx"))):
        leaf = x.clone().requires_grad_()
        (fq(leaf, 16, 4) * torch.arange(64.0)).sum().backward()
        got[f"straight-through-grad{name}"] = leaf.grad
    return got


def _fp_forms(x: torch.Tensor, h: torch.Tensor, got: dict[str, object]) -> list[int]:
    """The floating-point format wrappers' forms, into ``got`` (codes and scales as bytes:
    torch.equal lacks the 8/4-bit floats); returns the version bumps of their writes."""
    got["fp-fake"] = qkit.fake_quantize_fp(x, 16, "e4m3")
    torch.manual_seed(2)
    got["fp-fake-stochastic-nvfp4"] = qkit.fake_quantize_fp(h, None, "e2m1", "nvfp4", True)
    out = torch.empty_like(x)
    version = out._version
    got["fp-fake-out"] = qkit.fake_quantize_fp(x, None, "e3m2", "mx", out=out)
    bumps = [out._version - version]
    in_place = x.clone()
    version = in_place._version
    got["fp-fake-in-place"] = qkit.fake_quantize_fp_(in_place, 8, "e2m3")
    bumps.append(in_place._version - version)
    codes, scales = qkit.quantize_fp(h, None, "e2m1", "mx")
    got["fp-quantize"] = (codes.view(torch.uint8), scales.view(torch.uint8))
    got["fp-dequantize"] = qkit.dequantize_fp(codes, scales, None, "e2m1", "mx")
    buffers = (torch.empty_like(codes), torch.empty_like(scales))
    version = buffers[1]._version
    qkit.quantize_fp(h, None, "e2m1", "mx", out=buffers)
    bumps.append(buffers[1]._version - version)
    got["fp-quantize-out"] = tuple(t.view(torch.uint8) for t in buffers)
    deq = torch.empty(8, 64, dtype=torch.bfloat16)
    got["fp-dequantize-out"] = qkit.dequantize_fp(codes, scales, None, "e2m1", "mx", out=deq)
    return bumps


CHILD = textwrap.dedent(
    """
    import functools, sys
    import torch
    import torch._functorch.utils, torch.autograd.forward_ad  # as torch's own code would see them
    deletes, out = sys.argv[1].split(","), sys.argv[2]
    saved = []
    for path in deletes:
        owner_path, _, name = path.rpartition(".")
        owner = functools.reduce(getattr, owner_path.split(".")[1:], torch)
        saved.append((owner, name, getattr(owner, name)))
        delattr(owner, name)
    import qkit, qkit.ops
    # A rename, as qkit sees it: gone while qkit looks (at import); torch's own code, which
    # a real rename would have updated, keeps working afterwards.
    for owner, name, value in saved:
        setattr(owner, name, value)
    from test_private_api_fallback import REMOVALS, compute
    removal = next(r for r in REMOVALS.values() if ",".join(r.deletes) == sys.argv[1])
    x = torch.randn(4)
    report = {
        "missing": list(qkit.ops.MISSING_PRIVATE_APIS),
        "straight": qkit.ops.STRAIGHT_CALLS,
        "goes_straight": qkit.ops.kernel_keys(x) is not None,
        "results": compute(removal.autograd),
    }
    torch.save(report, out)
    """
)


def _run(removal: Removal, out: Path) -> subprocess.CompletedProcess:
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, *(p for p in sys.path if p)])}
    args = [sys.executable, "-c", CHILD, ",".join(removal.deletes), str(out)]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    root = tmp_path_factory.mktemp("fallback")
    with ThreadPoolExecutor(max_workers=3) as pool:
        runs = {name: pool.submit(_run, r, root / f"{name}.pt") for name, r in REMOVALS.items()}
        return {name: (run.result(), root / f"{name}.pt") for name, run in runs.items()}


def _same(got: object, want: object, where: str) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype, where
        assert torch.equal(got, want), where
    else:
        assert isinstance(got, (tuple, list)) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _same(g, w, f"{where}[{i}]")


def test_this_torch_has_every_name():
    """The suite's torch is the one qkit was written against: nothing missing, straight calls on."""
    assert qkit.ops.MISSING_PRIVATE_APIS == []
    assert qkit.ops.STRAIGHT_CALLS


@pytest.mark.parametrize("name", REMOVALS)
def test_import_and_results_without(reports, name):
    removal = REMOVALS[name]
    run, out = reports[name]
    assert run.returncode == 0, f"`import qkit` or a call failed without {removal.deletes}:\n{run.stderr[-3000:]}"
    report = torch.load(out, weights_only=False)
    assert report["missing"] == list(removal.missing)
    assert report["straight"] is removal.straight
    assert report["goes_straight"] is (removal.straight if removal.goes_straight is None else removal.goes_straight)
    want = compute(removal.autograd)
    assert report["results"].keys() == want.keys()
    for key, value in want.items():
        _same(report["results"][key], value, key)
