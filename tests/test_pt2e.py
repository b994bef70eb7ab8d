"""qkit.pt2e: QkitQuantizer in torchao's PT2E flows (prepare_pt2e / prepare_qat_pt2e / convert_pt2e).

torchao is optional: every test that needs it skips without it.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qkit import QuantSpec

# torchao's fake-quantize base class still marks methods for TorchScript.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

Fq = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class MLP(nn.Module):
    def __init__(self, d_in: int = 24, hidden: int = 48, d_out: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))

    def reference(self, x: torch.Tensor, fq_w: dict[str, Fq], fq_a: Fq) -> torch.Tensor:
        """The float model with each weight passed through ``fq_w[name]`` and each linear input through ``fq_a``."""
        h = torch.relu(F.linear(fq_a(x), fq_w["fc1"](self.fc1.weight), self.fc1.bias))
        return F.linear(fq_a(h), fq_w["fc2"](self.fc2.weight), self.fc2.bias)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2)
        self.fc = nn.Linear(16 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.flatten(1))

    def reference(self, x: torch.Tensor, fq_w: dict[str, Fq], fq_a: Fq) -> torch.Tensor:
        c1, c2 = self.conv1, self.conv2
        h = torch.relu(F.conv2d(fq_a(x), fq_w["conv1"](c1.weight), c1.bias, padding=1))
        h = torch.relu(F.conv2d(fq_a(h), fq_w["conv2"](c2.weight), c2.bias, stride=2))
        return F.linear(fq_a(h.flatten(1)), fq_w["fc"](self.fc.weight), self.fc.bias)


MODELS = {"mlp": (MLP, (8, 24)), "convnet": (ConvNet, (4, 3, 8, 8))}


def _layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _params_of(prepared: torch.fx.GraphModule, model: nn.Module) -> nn.Module:
    """A copy of the float ``model`` holding the prepared model's (possibly trained) parameters."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_(prepared.get_parameter(name))
    return out


def _assert_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    diff = (got.float() - want.float()).abs().max().item()
    assert torch.equal(got, want), f"{what}: max |diff| {diff}"


@pytest.fixture(scope="module")
def ao():
    """torchao's PT2E entry points and qkit.pt2e (skips without torchao)."""
    pytest.importorskip("torchao")
    import torchao.quantization.pt2e.quantize_pt2e as flow

    import qkit.pt2e

    return flow, qkit.pt2e


def _flow(ao, model: nn.Module, x: torch.Tensor, quantizer, qat: bool) -> torch.fx.GraphModule:
    flow, _ = ao
    exported = torch.export.export(model, (x,)).module()
    return (flow.prepare_qat_pt2e if qat else flow.prepare_pt2e)(exported, quantizer)


# ---------------------------------------------------------------- without torchao


def test_import_qkit_does_not_import_torchao() -> None:
    code = "import sys, qkit; assert 'torchao' not in sys.modules, 'import qkit imported torchao'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pt2e_without_torchao_says_how_to_install_it() -> None:
    code = (
        "import sys; sys.modules['torchao'] = None\n"  # makes `import torchao` fail as if absent
        "try:\n    import qkit.pt2e\nexcept ImportError as e:\n    print(e)\nelse:\n    print('imported')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "pip install torchao" in out


# ---------------------------------------------------------------- the flows

SCHEMES = {
    "w4-per-channel": (QuantSpec(4), None),
    "w3-per-channel-axis1": (QuantSpec(3, ch_axis=1), None),
    "w8-per-tensor": (QuantSpec(8, ch_axis=None), None),
    "w5-asym-axis1": (QuantSpec(5, symmetric=False, ch_axis=1), None),  # qkit nodes, codes one per int8
    # conv weights end in kw = 3: 4-bit codes cannot pack in pairs, one int8 each
    "w4-group3": (QuantSpec(4, group_size=3), None),
    "w8-asym+a8-per-token": (QuantSpec(8, symmetric=False), QuantSpec(8)),
    "w2-group3+a4-per-tensor": (QuantSpec(2, group_size=3, ch_axis=None), QuantSpec(4, ch_axis=None)),
    # activations of any width 2..8 convert to quantize/dequantize (one int8 per code)
    "w6-per-channel+a3-asym-per-tensor": (QuantSpec(6), QuantSpec(3, symmetric=False, ch_axis=None)),
}


def _train_checking_grads(
    prepared: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor, fq_w: dict[str, Fq], fq_a: Fq, steps: int
) -> None:
    """A few SGD steps of the prepared (QAT) model; the first step's gradients must equal the
    reference model's (straight-through gradients reach the float weights)."""
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05)
    for step in range(steps):
        opt.zero_grad()
        prepared(x).square().mean().backward()
        if step == 0:
            twin = _params_of(prepared, model)
            twin.reference(x, fq_w, fq_a).square().mean().backward()
            for name, p in twin.named_parameters():
                _assert_equal(prepared.get_parameter(name).grad, p.grad, f"grad of {name}")
        opt.step()


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("qat", [False, True], ids=["ptq", "qat"])
def test_flow_matches_qkit(ao, model_name: str, scheme: str, qat: bool) -> None:
    """prepared == float model with qkit-fake-quantized weights (and inputs); converted == prepared."""
    _, pt2e = ao
    weight, activation = SCHEMES[scheme]
    cls, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = cls()
    x = torch.randn(shape)
    quantizer = pt2e.QkitQuantizer(weight, activation, is_qat=qat)
    prepared = _flow(ao, model, x, quantizer, qat)
    kind = pt2e.QkitFakeQuantize if qat else pt2e.QkitObserver
    inserted = [m for m in prepared.modules() if isinstance(m, kind)]
    assert len(inserted) == len(_layers(model)) * (1 if activation is None else 2)

    fq_w = {name: weight.fake_quantize for name in _layers(model)}
    fq_a = _identity if activation is None else activation.fake_quantize
    if qat:  # a few steps of training; straight-through gradients reach the float weights
        first = _layers(model)[0] + ".weight"
        before = prepared.get_parameter(first).detach().clone()
        _train_checking_grads(prepared, model, x, fq_w, fq_a, steps=3)
        assert not torch.equal(prepared.get_parameter(first), before)

    with torch.no_grad():
        y_prepared = prepared(x)
        y_reference = _params_of(prepared, model).reference(x, fq_w, fq_a)
        _assert_equal(y_prepared, y_reference, "prepared vs float model with fake-quantized weights")
        if not qat:  # the observers' qparams are qkit's steps
            steps = {
                m.calculate_qparams()[0].shape[0]: m.calculate_qparams()[0] for m in inserted if m.role == "weight"
            }
            w = model.get_parameter(_layers(model)[-1] + ".weight")
            assert torch.equal(steps[weight.num_groups(w.shape)], weight.steps(w))
        converted = ao[0].convert_pt2e(prepared)
        _assert_equal(converted(x), y_prepared, "converted vs prepared")

    targets = {str(n.target) for n in converted.graph.nodes if n.op == "call_function"}
    standard = weight.symmetric and weight.granularity != "per_group"
    assert any("quantized_decomposed.dequantize_per" in t for t in targets) == standard
    assert ("qkit.dequantize.default" in targets) == (not standard or activation is not None)
    assert ("qkit.quantize.default" in targets) == (activation is not None)
    assert not any(isinstance(m, (pt2e.QkitObserver, pt2e.QkitFakeQuantize)) for m in converted.modules())


@pytest.mark.parametrize(
    ("weight", "activation"),
    [(QuantSpec(4), None), (QuantSpec(8, ch_axis=None), None), (QuantSpec(4, group_size=8), QuantSpec(8))],
    ids=["per-channel", "per-tensor", "group+act"],
)
def test_bfloat16_model(ao, weight: QuantSpec, activation: QuantSpec | None) -> None:
    _, pt2e = ao
    torch.manual_seed(1)
    model = MLP().to(torch.bfloat16)
    x = torch.randn(8, 24, dtype=torch.bfloat16)
    prepared = _flow(ao, model, x, pt2e.QkitQuantizer(weight, activation), qat=False)
    with torch.no_grad():
        fq_w = {name: weight.fake_quantize for name in _layers(model)}
        fq_a = _identity if activation is None else activation.fake_quantize
        y_prepared = prepared(x)
        _assert_equal(y_prepared, model.reference(x, fq_w, fq_a), "prepared vs reference (bf16)")
        converted = ao[0].convert_pt2e(prepared)
        # qkit and torch's dequantize both form step * q in fp32 and round to bf16 once
        _assert_equal(converted(x), y_prepared, "converted vs prepared (bf16)")


# ---------------------------------------------------------------- validation


class ComputedWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w * 2)

    def reference(self, x: torch.Tensor, fq_w: dict[str, Fq], fq_a: Fq) -> torch.Tensor:
        return F.linear(fq_a(x), self.w * 2)  # never quantized: validate refuses its computed weight


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


@pytest.mark.parametrize(
    ("model", "shape", "weight", "activation", "qat", "message"),
    [
        (ComputedWeight, (2, 6), QuantSpec(8), None, False, r"node `linear` .*weight `mul` is computed in the graph"),
        (MLP, (8, 24), QuantSpec(8, group_size=5), None, False, r"node `linear` .*`group_size` \(5\) must divide"),
        (MLP, (8, 24), QuantSpec(8, ch_axis=2), None, False, r"node `linear` .*`ch_axis` \(2\) is out of range"),
        (ComputedWeight, (2, 6), QuantSpec(8), None, True, r"node `linear` .*weight `mul`"),
        (ConvBN, (2, 3, 6, 6), QuantSpec(8), None, True, r"node `conv2d` .*followed by batch norm"),
        (ConvNet, (4, 3, 7, 7), QuantSpec(8), QuantSpec(4, ch_axis=None), False, r"node `conv2d` .*must be even"),
    ],
    ids=["computed-weight", "group-size", "ch-axis", "computed-weight-qat", "qat-conv-bn", "odd-4-bit-input"],
)
def test_validate_names_the_node(ao, model, shape, weight, activation, qat: bool, message: str) -> None:
    _, pt2e = ao
    torch.manual_seed(0)
    quantizer = pt2e.QkitQuantizer(weight, activation, is_qat=qat)
    with pytest.raises(ValueError, match=message):
        _flow(ao, model(), torch.randn(shape), quantizer, qat)


def test_ptq_folds_batch_norm_first(ao) -> None:
    _, pt2e = ao
    torch.manual_seed(0)
    model, x = ConvBN().eval(), torch.randn(2, 3, 6, 6)
    prepared = _flow(ao, model, x, pt2e.QkitQuantizer(QuantSpec(4)), qat=False)
    with torch.no_grad():
        y = prepared(x)
        _assert_equal(ao[0].convert_pt2e(prepared)(x), y, "converted vs prepared")
        assert (y - model(x)).abs().max() < 0.5 * model(x).abs().max()  # still the same function, roughly


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"weight": QuantSpec(9)}, ValueError, r"`weight.bits` must be in \[2, 8\]"),
        ({"weight": QuantSpec(), "activation": QuantSpec(12)}, ValueError, r"`activation.bits` must be in \[2, 8\]"),
        ({"weight": QuantSpec(), "ops": ("matmul",)}, ValueError, "`ops`"),
        ({"weight": 8}, TypeError, "`weight` must be a qkit.QuantSpec"),
    ],
)
def test_quantizer_arguments(ao, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        ao[1].QkitQuantizer(**kwargs)


# ---------------------------------------------------------------- filters


def _quantized_layers(ao, model: nn.Module, x: torch.Tensor, **filters) -> set[str]:
    """Which layers' weights a QkitQuantizer with ``filters`` quantizes, checked on the converted numbers."""
    _, pt2e = ao
    spec = QuantSpec(2)  # coarse enough that every quantized layer visibly changes
    prepared = _flow(ao, model, x, pt2e.QkitQuantizer(spec, **filters), qat=False)
    observed = {
        str(n.args[0].target).removesuffix(".weight")
        for n in prepared.graph.nodes
        if n.op == "call_module" and isinstance(prepared.get_submodule(str(n.target)), pt2e.QkitObserver)
    }
    with torch.no_grad():
        converted = ao[0].convert_pt2e(prepared)
        fq_w = {name: spec.fake_quantize if name in observed else _identity for name in _layers(model)}
        _assert_equal(converted(x), model.reference(x, fq_w, _identity), f"converted with {filters}")
    return observed


def test_filters(ao) -> None:
    torch.manual_seed(0)
    conv, x = ConvNet(), torch.randn(4, 3, 8, 8)
    assert _quantized_layers(ao, conv, x) == {"conv1", "conv2", "fc"}
    assert _quantized_layers(ao, conv, x, ops=("linear",)) == {"fc"}
    assert _quantized_layers(ao, conv, x, ops=("conv",)) == {"conv1", "conv2"}
    assert _quantized_layers(ao, conv, x, module_names=["conv2", "fc"]) == {"conv2", "fc"}
    assert _quantized_layers(ao, conv, x, module_types=[nn.Conv2d]) == {"conv1", "conv2"}
    assert _quantized_layers(ao, conv, x, skip_module_names=["conv1"]) == {"conv2", "fc"}
    assert _quantized_layers(ao, conv, x, node_filter=lambda n: n.name != "conv2d_1") == {"conv1", "fc"}
    # a functional linear inside the root module has no nn.Linear around it
    assert _quantized_layers(ao, ComputedWeight(), torch.randn(2, 6), module_types=[nn.Linear]) == set()


def _mixed_quantizer(ao, qat: bool = False):
    """Per-channel 4-bit convs (standard q/dq), 4-bit group-wise linear with 8-bit inputs (qkit nodes)."""
    from torchao.quantization.pt2e.quantizer import ComposableQuantizer

    _, pt2e = ao
    convs = pt2e.QkitQuantizer(QuantSpec(4), is_qat=qat, ops=("conv",))
    fc = pt2e.QkitQuantizer(QuantSpec(4, group_size=16), QuantSpec(8), is_qat=qat, module_names=["fc"])
    return ComposableQuantizer([convs, fc])


def test_composed_quantizers(ao) -> None:
    torch.manual_seed(0)
    model, x = ConvNet(), torch.randn(4, 3, 8, 8)
    prepared = _flow(ao, model, x, _mixed_quantizer(ao), qat=False)
    per_channel, grouped, act = QuantSpec(4), QuantSpec(4, group_size=16), QuantSpec(8)

    def fq_a_fc_only(t: torch.Tensor) -> torch.Tensor:  # only fc's input is quantized
        return act.fake_quantize(t) if t.dim() == 2 else t

    fq_w = {"conv1": per_channel.fake_quantize, "conv2": per_channel.fake_quantize, "fc": grouped.fake_quantize}
    with torch.no_grad():
        y = prepared(x)
        _assert_equal(y, model.reference(x, fq_w, fq_a_fc_only), "prepared vs reference")
        _assert_equal(ao[0].convert_pt2e(prepared)(x), y, "converted vs prepared")


# ---------------------------------------------------------------- torch.compile


def test_converted_model_compiles_fullgraph(ao, fresh_dynamo) -> None:
    torch.manual_seed(0)
    model, x = ConvNet(), torch.randn(4, 3, 8, 8)
    prepared = _flow(ao, model, x, _mixed_quantizer(ao, qat=True), qat=True)
    with torch.no_grad():
        converted = ao[0].convert_pt2e(prepared)
        targets = {str(n.target) for n in converted.graph.nodes if n.op == "call_function"}
        assert {"qkit.quantize.default", "qkit.dequantize.default"} <= targets
        assert "quantized_decomposed.dequantize_per_channel.default" in targets
        eager = converted(x)
        compiled = torch.compile(converted, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "activation", [QuantSpec(8), QuantSpec(4, group_size=8, ch_axis=None), QuantSpec(8, ch_axis=1)], ids=str
)
def test_dynamic_batch(ao, activation: QuantSpec) -> None:
    """Inputs may have a symbolic batch size: the converted graph computes the group count per call."""
    flow, pt2e = ao
    torch.manual_seed(0)
    model = MLP()
    batch = torch.export.Dim("batch", min=2)
    exported = torch.export.export(model, (torch.randn(4, 24),), dynamic_shapes=({0: batch},)).module()
    prepared = flow.prepare_pt2e(exported, pt2e.QkitQuantizer(QuantSpec(4), activation))
    fq_w = {name: QuantSpec(4).fake_quantize for name in _layers(model)}
    xs = [torch.randn(n, 24) for n in (3, 7)]
    with torch.no_grad():
        want = [model.reference(x, fq_w, activation.fake_quantize) for x in xs]
        for x, y in zip(xs, want, strict=True):
            _assert_equal(prepared(x), y, f"prepared, batch {len(x)}")
        converted = flow.convert_pt2e(prepared)
        for x, y in zip(xs, want, strict=True):
            _assert_equal(converted(x), y, f"converted, batch {len(x)}")


# ---------------------------------------------------------------- floating-point schemes


class FPNet(MLP):
    """Linear layers whose inputs are whole MX (32) and NVFP4 (16) blocks."""

    def __init__(self) -> None:
        super().__init__(64, 32, 16)


def _ref_fp(spec: QuantSpec) -> Fq:
    """``spec``'s fake quantization by the independent model (tests/reference.py), with a
    straight-through gradient; groups counted here (per tensor, per row, per run of n)."""
    from reference import ref_fake_quantize_fp

    def fq(t: torch.Tensor) -> torch.Tensor:
        if spec.group_size is not None:
            groups = t.numel() // spec.group_size
        else:
            groups = 1 if spec.ch_axis is None else t.shape[0]  # axis 0: rows are contiguous
        q = ref_fake_quantize_fp(t, groups, spec.format, spec.scaling).to(t.device)
        return t + (q - t).detach()

    return fq


FP_SCHEMES = {
    "e4m3-per-channel": (QuantSpec(format="e4m3"), None),
    "e5m2-per-tensor": (QuantSpec(format="e5m2", ch_axis=None), None),
    "mxfp4+mxfp8": (QuantSpec(format="e2m1", scaling="mx"), QuantSpec(format="e4m3", scaling="mx")),
    "nvfp4+e4m3-per-token": (QuantSpec(format="e2m1", scaling="nvfp4"), QuantSpec(format="e4m3")),
    "e3m2-group16+e2m3-per-tensor": (
        QuantSpec(format="e3m2", group_size=16),
        QuantSpec(format="e2m3", ch_axis=None),
    ),
}


@pytest.mark.parametrize("scheme", list(FP_SCHEMES))
@pytest.mark.parametrize("qat", [False, True], ids=["ptq", "qat"])
def test_fp_flow_matches_the_reference(ao, scheme: str, qat: bool) -> None:
    """prepared == float model with reference-quantized weights (and inputs), gradients
    straight through; converted == prepared, through qkit's quantize_fp/dequantize_fp nodes."""
    flow, pt2e = ao
    weight, activation = FP_SCHEMES[scheme]
    torch.manual_seed(0)
    model, x = FPNet(), torch.randn(8, 64)
    prepared = _flow(ao, model, x, pt2e.QkitQuantizer(weight, activation, is_qat=qat), qat)
    fq_w = {name: _ref_fp(weight) for name in _layers(model)}
    fq_a = _identity if activation is None else _ref_fp(activation)
    if qat:
        _train_checking_grads(prepared, model, x, fq_w, fq_a, steps=2)
    with torch.no_grad():
        y_prepared = prepared(x)
        _assert_equal(y_prepared, _params_of(prepared, model).reference(x, fq_w, fq_a), "prepared vs reference")
        converted = flow.convert_pt2e(prepared)
        _assert_equal(converted(x), y_prepared, "converted vs prepared")
    targets = {str(n.target) for n in converted.graph.nodes if n.op == "call_function"}
    assert "qkit.dequantize_fp.default" in targets
    assert ("qkit.quantize_fp.default" in targets) == (activation is not None)
    assert not any(t.startswith(("quantized_decomposed", "qkit.quantize.", "qkit.dequantize.")) for t in targets)
    stored = [b for name, b in converted.named_buffers() if name.endswith("_qkit_codes")]
    assert len(stored) == 2 and all(b.dtype == fp_code_dtype(weight.format) for b in stored)


def fp_code_dtype(fmt: str) -> torch.dtype:
    return {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "e2m1": torch.float4_e2m1fn_x2}.get(
        fmt, torch.uint8
    )


def test_fp_observer_records_the_decode_scales(ao) -> None:
    _, pt2e = ao
    from reference import ref_fp_scales

    spec = QuantSpec(format="e2m1", scaling="mx")
    obs = pt2e.QkitObserver(spec)
    w = torch.randn(4, 64)
    obs(w)
    scales, zeros = obs.calculate_qparams()
    _assert_equal(scales, ref_fp_scales(w, 8, "e2m1", "mx")[1].reshape(-1), "mx decode scales")
    assert not zeros.any()


@pytest.mark.parametrize(
    ("weight", "activation", "message"),
    [
        (QuantSpec(format="e2m1", scaling="mx"), None, r"node `linear` .*`group_size` \(32\) must divide"),
        (QuantSpec(format="e2m1", ch_axis=1), None, r"node `linear` .*e2m1 codes pack 2 at a time .*\(7\)"),
        (QuantSpec(format="e4m3"), QuantSpec(format="e3m2"), r"node `linear` .*e3m2 codes pack 4 at a time .*\(6\)"),
    ],
    ids=["mx-block", "fp4-odd-weight", "fp6-input"],
)
def test_fp_validate_names_the_node(ao, weight: QuantSpec, activation: QuantSpec | None, message: str) -> None:
    _, pt2e = ao
    model = nn.Sequential(nn.Linear(6, 7))  # weight [7, 6]: no 32-element rows, 7 output channels
    with pytest.raises(ValueError, match=message):
        _flow(ao, model, torch.randn(2, 6), pt2e.QkitQuantizer(weight, activation), False)


def test_fp_bfloat16_model(ao) -> None:
    """A bf16 model: qkit's FP dequantize rounds value × scale to bf16 once, as the reference does."""
    flow, pt2e = ao
    torch.manual_seed(1)
    model, x = FPNet().to(torch.bfloat16), torch.randn(8, 64, dtype=torch.bfloat16)
    weight, activation = QuantSpec(format="e4m3"), QuantSpec(format="e2m1", scaling="mx")
    prepared = _flow(ao, model, x, pt2e.QkitQuantizer(weight, activation), qat=False)
    with torch.no_grad():
        y = prepared(x)
        _assert_equal(y, model.reference(x, {n: _ref_fp(weight) for n in _layers(model)}, _ref_fp(activation)), "bf16")
        _assert_equal(flow.convert_pt2e(prepared)(x), y, "converted vs prepared (bf16)")
