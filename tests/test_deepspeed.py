"""The DeepSpeed drop-in (``qkit.deepspeed``): names, argument orders, and none of DeepSpeed's defects.

Each ``ds_*`` function is checked against the qkit op it maps to (bit-exact), and
against an independent grid model where rounding is stochastic. Defect numbers
refer to ``deepspeed-behaviour.md`` §11.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import Tensor

import qkit
import qkit._builder
from qkit.deepspeed import QuantizationType, QuantizerBuilder, ds_quantizer
from qkit.deepspeed import quantizer_op as qop

ROOT = Path(__file__).parents[1]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# name -> (symmetric, stochastic)
FAKE = {
    "ds_quantize_fp32": (True, False),
    "ds_quantize_fp16": (True, False),
    "ds_sr_quantize_fp32": (True, True),
    "ds_sr_quantize_fp16": (True, True),
    "ds_quantize_asym_fp32": (False, False),
    "ds_quantize_asym_fp16": (False, False),
    "ds_sr_quantize_asym_fp32": (False, True),
    "ds_sr_quantize_asym_fp16": (False, True),
}
NEAREST = [name for name, (_, sr) in FAKE.items() if not sr]
STOCHASTIC = [name for name, (_, sr) in FAKE.items() if sr]

# (shape, groups, bits): odd group sizes (E = 3, 129), many groups, 2..16 bits.
CASES = [
    ((4, 3), 4, 8),
    ((4, 3), 2, 3),
    ((5, 129), 5, 4),
    ((2, 3, 129), 3, 2),
    ((64, 24), 16, 6),
    ((1000,), 1, 16),
    ((7,), 7, 8),
]


def _data(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 3).to(dtype)


def _grid(x: Tensor, groups: int, bits: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Independent model of docs/ops.md §1: ``(v, step, offset, deq)`` for ``x`` flattened into groups.

    ``v`` is ``x`` scaled onto the code axis (fp32 ``[G, E]``); ``deq(q)`` maps codes back to
    values in ``x``'s dtype.
    """
    xf = x.detach().float().reshape(groups, -1)
    if symmetric:
        m = xf.abs().amax(dim=1, keepdim=True)
        scale = torch.where(m == 0, torch.ones_like(m), 2.0**bits / (2 * m))
        offset = torch.zeros_like(m)
    else:
        mx = xf.amax(dim=1, keepdim=True)
        mn = xf.amin(dim=1, keepdim=True)
        scale = torch.where(mx == mn, torch.ones_like(mx), 2.0**bits / (mx - mn))
        offset = (mx + mn) / 2
    step = 1 / scale
    v = (xf - offset) * scale
    return v, step, offset, scale


def _levels(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _dequant(q: Tensor, step: Tensor, offset: Tensor, like: Tensor) -> Tensor:
    return (step * q + offset).to(like.dtype).reshape(like.shape)


def _nearest_model(x: Tensor, groups: int, bits: int, symmetric: bool) -> Tensor:
    v, step, offset, _ = _grid(x, groups, bits, symmetric)
    qmin, qmax = _levels(bits)
    return _dequant(torch.round(v).clamp(qmin, qmax), step, offset, x)


def _assert_stochastic_on_grid(y: Tensor, x: Tensor, groups: int, bits: int, symmetric: bool) -> None:
    """Every output is one of its input's two neighbouring levels of the right scheme."""
    v, step, offset, _ = _grid(x, groups, bits, symmetric)
    qmin, qmax = _levels(bits)
    below = _dequant(torch.floor(v).clamp(qmin, qmax), step, offset, x)
    above = _dequant((torch.floor(v) + 1).clamp(qmin, qmax), step, offset, x)
    on_grid = (y == below) | (y == above)
    assert bool(on_grid.all()), f"{int((~on_grid).sum())} values off the grid"


# ---------------------------------------------------------------- the module object


def test_module_has_deepspeed_names() -> None:
    for name in [*FAKE, "quantize", "dequantize", "dequantize_fp32", "QuantizationType"]:
        assert callable(getattr(qop, name)), name
    assert qop.Symmetric is QuantizationType.Symmetric
    assert qop.Asymmetric is QuantizationType.Asymmetric


def test_quantization_type_enum() -> None:
    assert issubclass(QuantizationType, int)
    assert QuantizationType.Symmetric == 0
    assert QuantizationType.Asymmetric == 1
    assert [m.name for m in QuantizationType] == ["Symmetric", "Asymmetric"]


# ---------------------------------------------------------------- fake quantizers


@pytest.mark.parametrize("shape,groups,bits", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NEAREST)
def test_nearest_equals_op_in_place(
    name: str, dtype: torch.dtype, shape: tuple[int, ...], groups: int, bits: int
) -> None:
    symmetric, _ = FAKE[name]
    vals = _data(shape, dtype)
    original = vals.clone()
    out = getattr(qop, name)(vals, groups, bits)
    assert out is vals
    assert out.dtype == dtype and out.shape == original.shape
    expected = qkit.fake_quantize(original, groups, bits, symmetric)
    assert torch.equal(out, expected)
    assert torch.equal(out, _nearest_model(original, groups, bits, symmetric))


@pytest.mark.parametrize("shape,groups,bits", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_on_grid_and_equals_op(
    name: str, dtype: torch.dtype, shape: tuple[int, ...], groups: int, bits: int
) -> None:
    symmetric, _ = FAKE[name]
    vals = _data(shape, dtype)
    original = vals.clone()
    torch.manual_seed(1234)
    out = getattr(qop, name)(vals, groups, bits)
    assert out is vals
    assert out.dtype == dtype
    _assert_stochastic_on_grid(out, original, groups, bits, symmetric)
    torch.manual_seed(1234)
    assert torch.equal(out, qkit.fake_quantize(original, groups, bits, symmetric, stochastic=True))


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_seeded_and_fresh_draws(name: str) -> None:
    x = _data((8, 512), torch.float32)
    fn = getattr(qop, name)
    torch.manual_seed(7)
    first = fn(x.clone(), 8, 4)
    second = fn(x.clone(), 8, 4)
    torch.manual_seed(7)
    again = fn(x.clone(), 8, 4)
    assert torch.equal(first, again)
    # Defect 7: successive calls must not reuse the same draws.
    assert not torch.equal(first, second)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_rounding_is_unbiased(name: str) -> None:
    # One group: the extremes fix the grid (step 1/8 for both schemes), the rest sit
    # a quarter step above a level, so about 1/4 of them must round up.
    n = 20_000
    x = torch.full((n,), 0.25 + 0.25 / 8)
    x[0], x[1] = 1.0, -1.0
    y = getattr(qop, name)(x.clone(), 1, 4)[2:]
    assert set(y.unique().tolist()) <= {0.25, 0.375}
    frac_up = (y == 0.375).float().mean().item()
    assert abs(frac_up - 0.25) < 0.02


def test_fp32_symmetric_is_not_rounded_to_integers() -> None:
    """Defect 1: the §2.1 example must give ``q * step``, not ``[0, -1, 1, 0]``."""
    vals = torch.tensor([0.3, -0.7, 1.0, 0.05])
    out = qop.ds_quantize_fp32(vals, 1, 8)
    expected = torch.tensor([38, -90, 127, 6], dtype=torch.float32) / 128
    assert torch.equal(out, expected)
    assert not torch.equal(out, out.round())


@pytest.mark.parametrize("name", [name for name, (symmetric, _) in FAKE.items() if not symmetric])
def test_asymmetric_has_at_most_2_pow_b_levels(name: str) -> None:
    """Defect 3: DeepSpeed's b=2 example produced code 4 (five levels); clamped here."""
    vals = torch.tensor([0.0, 0.25, 0.5, 1.0])
    out = getattr(qop, name)(vals, 1, 2)
    assert out.unique().numel() <= 4
    if "_sr_" not in name:
        assert torch.equal(out, torch.tensor([0.0, 0.25, 0.5, 0.75]))
    for bits in (2, 3, 4):
        x = _data((16, 300), torch.float32, seed=bits)
        y = getattr(qop, name)(x, 16, bits)
        per_group = [row.unique().numel() for row in y.reshape(16, -1)]
        assert max(per_group) <= 2**bits


@pytest.mark.parametrize("name", ["ds_sr_quantize_asym_fp32", "ds_sr_quantize_asym_fp16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sr_asym_is_really_asymmetric(name: str, dtype: torch.dtype) -> None:
    """Defect 2: on [10, 11] the symmetric step (22/16) would dwarf the asymmetric one (1/16)."""
    gen = torch.Generator().manual_seed(3)
    x = (10 + torch.rand(4096, generator=gen)).to(dtype)
    y = getattr(qop, name)(x.clone(), 1, 4)
    asym_step = (x.float().max() - x.float().min()) / 16
    # One step, plus the dtype's rounding of the output near 10.
    slack = 11 * torch.finfo(dtype).eps
    assert (y.float() - x.float()).abs().max() <= asym_step + slack
    _assert_stochastic_on_grid(y, x, 1, 4, symmetric=False)


@pytest.mark.parametrize("name", list(FAKE))
def test_group_above_deepspeed_limit(name: str) -> None:
    """Defect 4/5/13: one fp16 group of 1.1M elements is quantized, not silently skipped."""
    symmetric, stochastic = FAKE[name]
    x = _data((1_100_000,), torch.float16)
    vals = x.clone()
    torch.manual_seed(5)
    out = getattr(qop, name)(vals, 1, 8)
    assert out is vals
    assert not torch.equal(out, x)
    torch.manual_seed(5)
    assert torch.equal(out, qkit.fake_quantize(x, 1, 8, symmetric, stochastic))


@pytest.mark.parametrize("name", list(FAKE))
def test_non_contiguous_in_place(name: str) -> None:
    symmetric, stochastic = FAKE[name]
    base = _data((12, 10), torch.float32)
    view = base.t()
    original = view.clone()
    torch.manual_seed(9)
    out = getattr(qop, name)(view, 4, 5)
    assert out is view
    torch.manual_seed(9)
    assert torch.equal(base.t(), qkit.fake_quantize(original, 4, 5, symmetric, stochastic))


@pytest.mark.parametrize("name", list(FAKE))
def test_bad_input_raises_clearly(name: str) -> None:
    fn = getattr(qop, name)
    with pytest.raises(TypeError, match=f"{name}.*float32, float16 or bfloat16"):
        fn(torch.arange(8), 1, 8)
    with pytest.raises(TypeError, match=f"{name}.*torch.Tensor"):
        fn([1.0, 2.0], 1, 8)
    with pytest.raises(ValueError, match=f"{name}.*must divide"):
        fn(torch.randn(8), 3, 8)
    with pytest.raises(ValueError, match=f"{name}.*groups"):
        fn(torch.randn(8), 0, 8)
    for bits in (0, 1, 17):
        with pytest.raises(ValueError, match=f"{name}.*bits"):
            fn(torch.randn(8), 1, bits)
    with pytest.raises(TypeError, match=f"{name}.*bits"):
        fn(torch.randn(8), 1, 8.0)
    with pytest.raises(TypeError, match=f"{name}.*groups"):
        fn(torch.randn(8), True, 8)


# ---------------------------------------------------------------- ds_quantizer


@pytest.mark.parametrize("sr", [False, True])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ds_quantizer(sr: bool, asym: bool, dtype: torch.dtype) -> None:
    x = _data((6, 129), dtype)
    vals = x.clone()
    torch.manual_seed(11)
    out = ds_quantizer(vals, groups=6, bit_num=4, sr=sr, asym=asym)
    assert out is vals
    torch.manual_seed(11)
    assert torch.equal(out, qkit.fake_quantize(x, 6, 4, symmetric=not asym, stochastic=sr))


def test_ds_quantizer_defaults_and_positional() -> None:
    x = _data((3, 5), torch.float16)
    assert torch.equal(ds_quantizer(x.clone()), qkit.fake_quantize(x, 1, 8))
    assert torch.equal(ds_quantizer(x.clone(), 3, 6, False, True), qkit.fake_quantize(x, 3, 6, False))


# ---------------------------------------------------------------- quantize / dequantize


QTYPES = [
    QuantizationType.Symmetric,
    QuantizationType.Asymmetric,
    0,
    1,
]


@pytest.mark.parametrize("qtype", QTYPES, ids=repr)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_dequantize_match_ops(qtype: QuantizationType | int, bits: int, dtype: torch.dtype) -> None:
    symmetric = int(qtype) == 0
    x = _data((6, 26), dtype)
    result = qop.quantize(x, 3, bits, qtype)
    assert isinstance(result, list) and len(result) == 2
    q, params = result
    q_ref, params_ref = qkit.quantize(x, 3, bits, symmetric)
    assert torch.equal(q, q_ref) and torch.equal(params, params_ref)
    assert params.shape == (3, 1 if symmetric else 2)

    half = qop.dequantize(q, params, 3, bits, qtype)
    assert half.dtype == torch.float16 and half.shape == x.shape
    assert torch.equal(half, qkit.dequantize(q, params, 3, bits, symmetric, torch.float16))

    full = qop.dequantize_fp32(q, params, 3, bits, qtype)
    assert full.dtype == torch.float32 and full.shape == x.shape
    assert torch.equal(full, qkit.dequantize(q, params, 3, bits, symmetric, torch.float32))


def test_quantize_worked_example() -> None:
    """docs/ops.md §9: the 4-bit symmetric bytes and the 8-bit asymmetric codes."""
    x = torch.tensor([1, -0.5, 0.25, -2, 0, 0.75, 2, -1.5], dtype=torch.float16)
    q, params = qop.quantize(x, 1, 4, QuantizationType.Symmetric)
    assert q.tolist() == [0x4E, 0x18, 0x03, 0x7A]
    assert params.tolist() == [[0.25]]
    q, params = qop.quantize(torch.arange(8, dtype=torch.float16), 1, 8, qop.Asymmetric)
    assert q.tolist() == [-128, -91, -55, -18, 18, 55, 91, 127]
    # p0 = 1/scale in fp32 with scale = fp32(256/7): ~0.02734375, not exactly 7/256.
    step = torch.tensor(1.0) / (torch.tensor(256.0) / torch.tensor(7.0))
    assert params.tolist() == [[step.item(), 3.5]]


def test_dequantize_fp32_asymmetric_not_rounded_through_fp16() -> None:
    """Defect 10: values above fp16's range stay finite and exact in fp32."""
    x = torch.tensor([100_000.0, 100_001.0, 100_002.0, 100_003.0])
    q, params = qop.quantize(x, 1, 8, qop.Asymmetric)
    y = qop.dequantize_fp32(q, params, 1, 8, qop.Asymmetric)
    assert torch.isfinite(y).all()
    # Within the top value's one-step clip (3/256) plus fp32 rounding near 1e5.
    assert (y - x).abs().max() <= 2 * 3 / 256


def test_qtype_validation() -> None:
    x = torch.randn(8)
    with pytest.raises(ValueError, match="qtype"):
        qop.quantize(x, 1, 8, 2)
    with pytest.raises(TypeError, match="qtype"):
        qop.quantize(x, 1, 8, True)
    with pytest.raises(TypeError, match="qtype"):
        qop.quantize(x, 1, 8, "symmetric")
    q, params = qop.quantize(x, 1, 8, 0)
    with pytest.raises(ValueError, match="qtype"):
        qop.dequantize(q, params, 1, 8, -1)
    with pytest.raises(TypeError, match="qtype"):
        qop.dequantize_fp32(q, params, 1, 8, None)


# ---------------------------------------------------------------- QuantizerBuilder


def test_builder_attributes() -> None:
    builder = QuantizerBuilder()
    assert isinstance(builder, qkit._builder.QuantizerBuilder)
    assert QuantizerBuilder.NAME == "quantizer"
    assert QuantizerBuilder.BUILD_VAR == "DS_BUILD_QUANTIZER"
    assert builder.name == "quantizer"
    assert QuantizerBuilder(name="custom").name == "custom"
    assert builder.absolute_name() == "deepspeed.ops.quantizer.quantizer_op"
    assert builder.is_compatible() is True


def test_builder_sources_are_the_one_list() -> None:
    sources = QuantizerBuilder().sources()
    assert len(sources) == len(set(sources))
    for source in sources:
        assert (ROOT / source).is_file(), source
    on_disk = {
        path.relative_to(ROOT).as_posix()
        for folder in ("src", "kernels")
        for pattern in ("*.cpp", "*.cu")
        for path in (ROOT / folder).rglob(pattern)
    }
    assert on_disk, "no sources found: are the tests run from the repository?"
    assert on_disk == set(sources)
    for include in QuantizerBuilder().include_paths():
        assert (ROOT / include).is_dir(), include


def test_builder_ldflags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(QuantizerBuilder, "is_rocm_pytorch", lambda self: False)
    assert QuantizerBuilder().extra_ldflags() == ["-lcurand"]
    monkeypatch.setattr(QuantizerBuilder, "is_rocm_pytorch", lambda self: True)
    assert QuantizerBuilder().extra_ldflags() == []


def test_builder_load_returns_module_and_never_compiles(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.utils.cpp_extension as cpp_extension

    def no_compiling(*args: object, **kwargs: object) -> None:
        raise AssertionError("QuantizerBuilder.load() must not compile")

    for name in ("load", "load_inline", "_jit_compile"):
        monkeypatch.setattr(cpp_extension, name, no_compiling, raising=False)
    module = QuantizerBuilder().load()
    assert isinstance(module, ModuleType)
    assert module is qop
    assert QuantizerBuilder().load(verbose=False) is module
    vals = torch.tensor([0.3, -0.7, 1.0, 0.05])
    assert module.ds_quantize_fp32(vals, 1, 8) is vals


def test_builder_load_raises_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise qkit.QkitLoadError("kernels missing")

    monkeypatch.setattr(qkit._loader, "require", missing)
    with pytest.raises(qkit.QkitLoadError, match="kernels missing"):
        QuantizerBuilder().load()


def test_import_without_compiled_module() -> None:
    """``import qkit.deepspeed`` works without ``_C``; using the kernels raises QkitLoadError."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["qkit._C"] = None  # makes `from qkit import _C` fail
        import torch
        import qkit
        from qkit.deepspeed import QuantizationType, QuantizerBuilder, ds_quantizer
        assert QuantizerBuilder().sources() and QuantizationType.Asymmetric == 1
        for call in (lambda: QuantizerBuilder().load(), lambda: ds_quantizer(torch.randn(8))):
            try:
                call()
            except qkit.QkitLoadError:
                pass
            else:
                raise SystemExit("no QkitLoadError")
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# ---------------------------------------------------------------- ZeRO++ communication ops

ZEROPP = [
    "swizzle_quant",
    "quantized_reduction",
    "loco_swizzle_quant",
    "loco_quantized_reduction",
    "dequantize_int4_to_half_experimental",
    "dequantize_int8_to_half_experimental",
]
# nodes=2, devices_per_node=4, pipeline_size=2: G = 16 groups of 6 values
GROUPS, PIPELINE, NODES, DEVICES = 16, 2, 2, 4


def test_module_has_zeropp_names() -> None:
    module = QuantizerBuilder().load()
    for name in ZEROPP:
        assert callable(getattr(module, name)), name
        assert name in qop.__all__, name


def _same(got: list[Tensor], want: tuple[Tensor, ...]) -> None:
    assert isinstance(got, list) and len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w)


@pytest.mark.parametrize("qtype", QTYPES, ids=repr)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swizzle_quant_equals_op(qtype: QuantizationType | int, bits: int, dtype: torch.dtype) -> None:
    symmetric = int(qtype) == 0
    x = _data((GROUPS, 6), dtype)
    got = qop.swizzle_quant(x, GROUPS, bits, qtype, PIPELINE, NODES, DEVICES)
    want = qkit.zeropp_ops.swizzle_quantize(
        x, groups=GROUPS, bits=bits, symmetric=symmetric, pipeline=PIPELINE, nodes=NODES, devices_per_node=DEVICES
    )
    _same(got, want)
    # DeepSpeed's order is (..., pipeline_size, nodes, devices_per_node): swapping the last two differs
    swapped = qop.swizzle_quant(x, GROUPS, bits, qtype, PIPELINE, DEVICES, NODES)
    assert not torch.equal(swapped[1], got[1])


@pytest.mark.parametrize("qtype", QTYPES, ids=repr)
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_reduction_equals_op(qtype: QuantizationType | int, bits: int) -> None:
    symmetric = int(qtype) == 0
    q, params = qop.swizzle_quant(_data((GROUPS, 6), torch.float16), GROUPS, bits, qtype, 1, NODES, DEVICES)
    got = qop.quantized_reduction(q, params, GROUPS, GROUPS // DEVICES, bits, qtype, DEVICES)
    want = qkit.zeropp_ops.quantized_reduction(
        q,
        params,
        in_groups=GROUPS,
        out_groups=GROUPS // DEVICES,
        bits=bits,
        symmetric=symmetric,
        devices_per_node=DEVICES,
    )
    _same(got, want)
    assert got[0].numel() == q.numel() // DEVICES


def test_quantized_reduction_deepspeed_example() -> None:
    """deepspeed-behaviour.md §7, through the drop-in: L=2, 8-bit symmetric."""
    q0 = [64, -32, 16, -128, 0, 48, 127, -96]
    q1 = [127] * 4 + [-128] * 4
    q = torch.tensor(q0 + q1, dtype=torch.int8)
    params = torch.tensor([[1 / 64], [1 / 256]])
    out, scales = qop.quantized_reduction(q, params, 2, 1, 8, QuantizationType.Symmetric, 2)
    assert out.tolist() == [96, 0, 48, -96, -32, 16, 95, -128]
    assert scales.tolist() == [[1 / 64]]


@pytest.mark.parametrize("qtype", QTYPES, ids=repr)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_loco_swizzle_quant_equals_op_and_updates_in_place(
    qtype: QuantizationType | int, bits: int, dtype: torch.dtype
) -> None:
    symmetric = int(qtype) == 0
    x = _data((GROUPS, 6), dtype)
    error = _data((GROUPS * 6,), dtype, seed=1) * 0.01
    mine, theirs = error.clone(), error.clone()
    got = qop.loco_swizzle_quant(x, mine, 0.5, GROUPS, bits, qtype, PIPELINE, NODES, DEVICES)
    want = qkit.zeropp_ops.loco_swizzle_quantize(
        x,
        theirs,
        err_beta=0.5,
        groups=GROUPS,
        bits=bits,
        symmetric=symmetric,
        pipeline=PIPELINE,
        nodes=NODES,
        devices_per_node=DEVICES,
    )
    _same(got, want)
    assert torch.equal(mine, theirs)
    assert not torch.equal(mine, error), "error_feedback is updated in place"


@pytest.mark.parametrize("qtype", QTYPES, ids=repr)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("e_dtype", DTYPES, ids=str)
def test_loco_quantized_reduction_equals_op_and_updates_in_place(
    qtype: QuantizationType | int, bits: int, e_dtype: torch.dtype
) -> None:
    symmetric = int(qtype) == 0
    q, params = qop.swizzle_quant(_data((GROUPS, 6), torch.float16), GROUPS, bits, qtype, 1, NODES, DEVICES)
    error = _data((GROUPS * 6 // DEVICES,), e_dtype, seed=2) * 0.01
    mine, theirs = error.clone(), error.clone()
    got = qop.loco_quantized_reduction(q, params, mine, 0.5, GROUPS, GROUPS // DEVICES, bits, qtype, DEVICES)
    want = qkit.zeropp_ops.loco_quantized_reduction(
        q,
        params,
        theirs,
        err_beta=0.5,
        in_groups=GROUPS,
        out_groups=GROUPS // DEVICES,
        bits=bits,
        symmetric=symmetric,
        devices_per_node=DEVICES,
    )
    _same(got, want)
    assert torch.equal(mine, theirs)
    assert not torch.equal(mine, error), "error_feedback is updated in place"


def test_loco_beta_zero_as_int() -> None:
    """err_beta given as the int 0 (a float argument) works and means beta = 0."""
    x = _data((8, 4), torch.float32)
    mine, theirs = torch.ones(32), torch.ones(32)
    got = qop.loco_swizzle_quant(x, mine, 0, 8, 8, 0, 1, 2, 2)
    _same(got, qkit.zeropp_ops.loco_swizzle_quantize(x, theirs, 0.0, 8, 8, True, 1, 2, 2))
    assert torch.equal(mine, theirs)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("num_groups", [1, 2, 3, 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_experimental_equals_op(bits: int, num_groups: int, dtype: torch.dtype) -> None:
    """Any number of groups (DeepSpeed launched nothing below 32); fp16 out."""
    fn = getattr(qop, f"dequantize_int{bits}_to_half_experimental")
    gen = torch.Generator().manual_seed(num_groups)
    group_size = 10
    data = torch.randint(0, 256, (num_groups * group_size * bits // 8,), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(num_groups, 1, generator=gen) * 10 + 1).to(dtype)
    minv = torch.randn(num_groups, 1, generator=gen).to(dtype)
    for raw in (data, data.view(torch.int8)):
        got = fn(raw, scale, minv, num_groups, group_size)
        assert got.dtype == torch.float16 and got.shape == (num_groups, group_size)
        assert torch.equal(got, qkit.zeropp_ops.dequantize_unsigned(raw, scale, minv, num_groups, group_size, bits))


def test_dequantize_int4_high_nibble_first() -> None:
    data = torch.tensor([0xF0, 0x1E], dtype=torch.uint8)
    one = torch.tensor([2.0], dtype=torch.float16)
    y = qop.dequantize_int4_to_half_experimental(data, one, -one / 2, 1, 4)
    assert y.tolist() == [[6.5, -1.0, -0.5, 6.0]]  # codes 15, 0, 1, 14
    y8 = qop.dequantize_int8_to_half_experimental(data, one, -one / 2, 1, 2)
    assert y8.tolist() == [[119.0, 14.0]]  # codes 240, 30


def _zeropp_call(name: str, qtype: object) -> object:
    x = torch.randn(8, 4)
    q, params = qop.swizzle_quant(x, 8, 8, 0, 1, 2, 2)
    return {
        "swizzle_quant": lambda: qop.swizzle_quant(x, 8, 8, qtype, 1, 2, 2),
        "quantized_reduction": lambda: qop.quantized_reduction(q, params, 8, 4, 8, qtype, 2),
        "loco_swizzle_quant": lambda: qop.loco_swizzle_quant(x, torch.zeros(32), 0.5, 8, 8, qtype, 1, 2, 2),
        "loco_quantized_reduction": lambda: qop.loco_quantized_reduction(
            q, params, torch.zeros(16), 0.5, 8, 4, 8, qtype, 2
        ),
    }[name]()


@pytest.mark.parametrize("name", ZEROPP[:4])
def test_zeropp_qtype_validation(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name}.*qtype"):
        _zeropp_call(name, 2)
    with pytest.raises(TypeError, match=f"{name}.*qtype"):
        _zeropp_call(name, True)
    with pytest.raises(TypeError, match=f"{name}.*qtype"):
        _zeropp_call(name, None)


def test_zeropp_bad_layout_is_an_error() -> None:
    """DeepSpeed left groups uninitialized when G % (nodes*devices*pipeline) != 0; here: an error."""
    with pytest.raises(RuntimeError, match=r"swizzle_quantize:.*`groups`"):
        qop.swizzle_quant(torch.randn(12, 4), 12, 8, qop.Symmetric, 1, 2, 4)
    with pytest.raises(RuntimeError, match=r"loco_swizzle_quantize:.*`groups`"):
        qop.loco_swizzle_quant(torch.randn(12, 4), torch.zeros(48), 0.5, 12, 8, qop.Asymmetric, 1, 5, 1)
