"""The modules ``prepare_pt2e`` / ``prepare_qat_pt2e`` insert, and how each is converted.

Both modules fake-quantize with ``torch.ops.qkit.fake_quantize`` (a
:class:`~qkit.QuantSpec` decides groups, bits and rounding), so a prepared model
already computes what the converted one will. Each also records the per-group
steps of the last tensor it saw (:meth:`calculate_qparams`).

``convert_pt2e`` calls :meth:`convert` on each of them (torchao's hook for
observers that build their own nodes):

- symmetric per-tensor / per-channel weights become PyTorch's standard
  ``quantized_decomposed.quantize_per_{tensor,channel}`` ->
  ``dequantize_per_{tensor,channel}`` pair with ``scale`` = qkit's step
  (``2·absmax / 2^b``), zero point 0 and codes ``[-2^(b-1), 2^(b-1) - 1]``: the
  same numbers as qkit, bit for bit (see :mod:`qkit.pt2e.quantizer`);
  ``convert_pt2e(fold_quantize=True)`` then stores the int8 codes;
- group-wise and asymmetric weights, which those ops cannot express (many steps
  per channel; a real-valued midpoint instead of an integer zero point), are
  quantized once by ``torch.ops.qkit.quantize`` at conversion and the graph keeps
  their codes and params as buffers and a ``torch.ops.qkit.dequantize`` node;
- activations are quantized per call, as qkit always does (the range comes from
  the tensor itself): a ``torch.ops.qkit.quantize`` -> ``dequantize`` pair;
- floating-point schemes (``QuantSpec(format=...)``) use qkit's FP ops the same way:
  weights are stored once as ``torch.ops.qkit.quantize_fp`` codes and scales (buffers)
  read by a ``torch.ops.qkit.dequantize_fp`` node, activations go through a
  ``quantize_fp`` -> ``dequantize_fp`` pair per call.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Literal

import torch
import torch.ao.quantization.fx._decomposed  # registers torch.ops.quantized_decomposed
from torch import Tensor
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e import FakeQuantizeBase, ObserverBase

from qkit.quant_spec import QuantSpec

Role = Literal["weight", "activation"]
ROLES = ("weight", "activation")


def torch_qscheme(spec: QuantSpec) -> torch.qscheme | None:
    """The ``torch.qscheme`` closest to ``spec`` (``None`` for group-wise and FP formats, which have none)."""
    if spec.granularity == "per_group" or spec.format is not None:
        return None
    if spec.granularity == "per_channel":
        return torch.per_channel_symmetric if spec.symmetric else torch.per_channel_affine
    return torch.per_tensor_symmetric if spec.symmetric else torch.per_tensor_affine


def uses_standard_ops(spec: QuantSpec) -> bool:
    """Whether a weight with ``spec`` converts to PyTorch's standard quantize/dequantize ops."""
    return spec.format is None and spec.symmetric and spec.granularity != "per_group"


class _QkitQuantMixin:
    """What :class:`QkitObserver` and :class:`QkitFakeQuantize` share (state, qparams, convert)."""

    spec: QuantSpec
    role: Role
    training: bool

    def _setup(self, spec: QuantSpec, role: Role) -> None:
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"{type(self).__name__}: `spec` must be a qkit.QuantSpec, got {type(spec).__name__}")
        if role not in ROLES:
            raise ValueError(f"{type(self).__name__}: `role` must be one of {ROLES}, got {role!r}")
        self.spec = spec
        self.role = role
        # The attributes torchao's observers expose, derived from the one description.
        self.quant_min = None if spec.format is not None else spec.quant_min
        self.quant_max = None if spec.format is not None else spec.quant_max
        self.qscheme = torch_qscheme(spec)
        self.ch_axis = spec.ch_axis if spec.granularity == "per_channel" else None
        self._nearest = dataclasses.replace(spec, rounding="nearest")
        self._last_qparams: tuple[Tensor, Tensor] | None = None

    def _record(self, x: Tensor) -> None:
        with torch.no_grad():
            if self.spec.format is not None:
                scales = self.spec.scales(x)
                self._last_qparams = (scales, torch.zeros_like(scales))
            else:
                self._last_qparams = self.spec.qparams(x)

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:
        """``(steps, offsets)`` of the last tensor seen, float32 ``[G]`` each.

        ``steps`` is torch's ``scale`` for symmetric schemes (zero point 0);
        ``offsets`` are qkit's group midpoints (zeros when symmetric), not integer
        zero points. For a floating-point scheme ``steps`` are the per-group decode
        scales (:meth:`qkit.QuantSpec.scales`) and ``offsets`` zeros.
        """
        if self._last_qparams is None:
            raise RuntimeError(f"{type(self).__name__}: nothing observed yet - run the prepared model first")
        return self._last_qparams

    def extra_repr(self) -> str:
        return f"role={self.role}, spec={self.spec!r}"

    def convert(self, model: GraphModule, node: Node) -> None:
        """Replace this module's call ``node`` in ``model`` by quantize/dequantize nodes (module docstring)."""
        convert_node(self.spec, self.role, model, node)


class QkitObserver(_QkitQuantMixin, ObserverBase):
    """PTQ observer: records qkit's per-group steps and passes on the fake-quantized tensor.

    Passing on ``spec.fake_quantize(x)`` (always round-to-nearest here) lets
    calibration and evaluation see what the converted model will compute.

    Args:
        spec: the scheme.
        role: ``"weight"`` (converted once, stored as codes) or ``"activation"``
            (quantized per call).
        dtype, quant_min, quant_max, qscheme, ch_axis, is_dynamic: what torchao's
            ``prepare`` passes from the ``QuantizationSpec``; ``spec`` is authoritative.
    """

    def __init__(
        self,
        spec: QuantSpec,
        role: Role = "weight",
        dtype: torch.dtype = torch.int8,
        quant_min: int | None = None,
        quant_max: int | None = None,
        qscheme: torch.qscheme | None = None,
        ch_axis: int | None = None,
        is_dynamic: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(dtype=dtype, is_dynamic=is_dynamic)
        self._setup(spec, role)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (float, any shape) -> fake-quantized ``x``, same shape and dtype; gradients pass straight through."""
        self._record(x)
        return self._nearest.fake_quantize(x)


class QkitFakeQuantize(_QkitQuantMixin, FakeQuantizeBase):
    """QAT fake quantization with ``torch.ops.qkit.fake_quantize`` (straight-through gradients).

    Any width 2-8, per tensor / channel / group, nearest or stochastic rounding
    (stochastic only while the module is in training mode). The usual switches
    work: ``disable_fake_quant()`` passes tensors through unchanged,
    ``disable_observer()`` stops recording steps.

    Args: as :class:`QkitObserver`.
    """

    def __init__(
        self,
        spec: QuantSpec,
        role: Role = "weight",
        dtype: torch.dtype = torch.int8,
        quant_min: int | None = None,
        quant_max: int | None = None,
        qscheme: torch.qscheme | None = None,
        ch_axis: int | None = None,
        is_dynamic: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__()
        self.dtype = dtype
        self.is_dynamic = is_dynamic
        self._setup(spec, role)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (float, any shape) -> fake-quantized ``x``, same shape and dtype."""
        if self.observer_enabled[0] == 1:
            self._record(x)
        if self.fake_quant_enabled[0] == 0:
            return x
        return (self.spec if self.training else self._nearest).fake_quantize(x)


# ---------------------------------------------------------------- conversion


def _get_attr(model: torch.nn.Module, target: str) -> Tensor:
    obj: object = model
    for part in target.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, Tensor):
        raise TypeError(f"qkit.pt2e: `{target}` is not a tensor")
    return obj


def _add_constant(model: GraphModule, stem: str, value: Tensor) -> Node:
    """Register ``value`` as a buffer of ``model`` under a fresh name; return a ``get_attr`` node for it."""
    stem = stem.replace(".", "_")
    name, i = stem, 0
    while hasattr(model, name):
        i += 1
        name = f"{stem}_{i}"
    model.register_buffer(name, value)
    return model.graph.get_attr(name)


def _drop_unused_attr(model: GraphModule, node: Node) -> None:
    """Erase a ``get_attr`` node nobody uses any more, and its tensor if no other node reads it."""
    if node.op != "get_attr" or node.users:
        return
    target = str(node.target)
    model.graph.erase_node(node)
    if any(n.op == "get_attr" and n.target == target for n in model.graph.nodes):
        return
    owner_path, _, attr = target.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    if hasattr(owner, attr):
        delattr(owner, attr)


def _out_dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # The decomposed dequantize ops return float32 unless told otherwise.
    return {} if dtype == torch.float32 else {"out_dtype": dtype}


def _convert_weight_standard(spec: QuantSpec, model: GraphModule, src: Node, w: Tensor) -> Node:
    graph = model.graph
    qd = torch.ops.quantized_decomposed
    steps = spec.steps(w)  # fp32: torch's 1/scale then equals qkit's scale exactly
    if spec.granularity == "per_channel":
        scale = _add_constant(model, f"{src.name}_qkit_scale", steps)
        zero_point = _add_constant(model, f"{src.name}_qkit_zero_point", torch.zeros_like(steps, dtype=torch.int64))
        args = (scale, zero_point, spec.ch_axis, spec.quant_min, spec.quant_max, torch.int8)
        q = graph.call_function(qd.quantize_per_channel.default, (src, *args))
        return graph.call_function(qd.dequantize_per_channel.default, (q, *args), _out_dtype_kwargs(w.dtype))
    args = (float(steps[0]), 0, spec.quant_min, spec.quant_max, torch.int8)
    q = graph.call_function(qd.quantize_per_tensor.default, (src, *args))
    return graph.call_function(qd.dequantize_per_tensor.default, (q, *args), _out_dtype_kwargs(w.dtype))


def _convert_weight_qkit(spec: QuantSpec, model: GraphModule, src: Node, w: Tensor) -> Node:
    graph = model.graph
    groups = spec.num_groups(w.shape)
    w_op = spec.to_op_layout(w.detach())
    # One int8 per code, but 4-bit pairs packed where the last dimension allows.
    packed = w_op.dim() > 0 and w_op.shape[-1] % 2 == 0
    with torch.no_grad():
        q, params = torch.ops.qkit.quantize.default(w_op, groups, spec.bits, spec.symmetric, packed)
    q_node = _add_constant(model, f"{src.name}_qkit_codes", q)
    p_node = _add_constant(model, f"{src.name}_qkit_params", params)
    out = graph.call_function(
        torch.ops.qkit.dequantize.default, (q_node, p_node, groups, spec.bits, spec.symmetric, w.dtype, packed)
    )
    if spec.moves_axis:  # back to the original layout, contiguous as QuantSpec.fake_quantize returns it
        out = graph.call_function(torch.ops.aten.movedim.int, (out, 0, spec.ch_axis))
        out = graph.call_function(torch.ops.aten.contiguous.default, (out,))
    return out


def _convert_weight_fp(spec: QuantSpec, model: GraphModule, src: Node, w: Tensor) -> Node:
    graph = model.graph
    groups = spec.num_groups(w.shape)
    with torch.no_grad():
        codes, scales = spec.quantize(w)  # op layout
    c_node = _add_constant(model, f"{src.name}_qkit_codes", codes)
    s_node = _add_constant(model, f"{src.name}_qkit_scales", scales)
    out = graph.call_function(
        torch.ops.qkit.dequantize_fp.default, (c_node, s_node, groups, spec.format, spec.scaling, w.dtype)
    )
    if spec.moves_axis:
        out = graph.call_function(torch.ops.aten.movedim.int, (out, 0, spec.ch_axis))
        out = graph.call_function(torch.ops.aten.contiguous.default, (out,))
    return out


def fp_pack_unit(spec: QuantSpec) -> int:
    """Codes per packed unit along the (op layout's) last dimension of a floating-point
    scheme's storage: 2 for e2m1, 4 for the 6-bit formats, 1 for FP8."""
    return {8: 1, 6: 4, 4: 2}[spec.bits]


def storage_problem(spec: QuantSpec, shape: tuple[object, ...]) -> str | None:
    """Why a tensor of ``shape`` cannot be stored as ``spec``'s codes (FP formats pack
    e2m1 in pairs and FP6 in fours along the op layout's last dimension); ``None`` if it can."""
    if spec.format is None or fp_pack_unit(spec) == 1:
        return None
    op_shape = list(shape)
    if spec.moves_axis:
        op_shape.insert(0, op_shape.pop(spec.ch_axis))
    last = op_shape[-1] if op_shape else 1
    unit = fp_pack_unit(spec)
    if not isinstance(last, int):
        return f"its last dimension ({last}) must be static for this scheme"
    if last % unit:
        return f"{spec.format} codes pack {unit} at a time along the last dimension ({last}), not divisible by {unit}"
    return None


def value_of(node: Node) -> Tensor | None:
    """The (fake) tensor recorded for ``node`` by export, if any; its sizes may be symbolic."""
    val = node.meta.get("val")
    return val if isinstance(val, Tensor) else None


def activation_problem(spec: QuantSpec, shape: tuple[object, ...]) -> str | None:
    """Why an activation of ``shape`` (sizes int or symbolic) cannot take ``spec``; ``None`` if it can.

    Only sizes that decide the layout must be static: the last one for group-wise
    or 4-bit schemes (4-bit codes pack pairs along it, in the op layout).
    """
    rank = len(shape)
    if spec.granularity == "per_channel" and spec.ch_axis >= rank:
        return f"`ch_axis` ({spec.ch_axis}) is out of range for a tensor of rank {rank}"
    if rank == 0 and spec.granularity == "per_group":
        return "group-wise quantization needs at least one dimension"
    op_shape = list(shape)
    if spec.moves_axis:
        op_shape.insert(0, op_shape.pop(spec.ch_axis))
    last = op_shape[-1] if op_shape else 1
    if spec.format is not None:
        if spec.group_size is not None:
            if not isinstance(last, int):
                return f"its last dimension ({last}) must be static for this scheme"
            if last % spec.group_size:
                return f"`group_size` ({spec.group_size}) must divide the last dimension ({last})"
        return storage_problem(spec, shape)
    if spec.group_size is not None or spec.bits == 4:
        if not isinstance(last, int):
            return f"its last dimension ({last}) must be static for this scheme"
        if spec.group_size is not None and last % spec.group_size:
            return f"`group_size` ({spec.group_size}) must divide the last dimension ({last})"
        if spec.bits == 4 and last % 2:
            return f"4-bit codes pack pairs along the last dimension, which must be even (got {last})"
    return None


def _groups_arg(spec: QuantSpec, graph: torch.fx.Graph, x: Node, shape: tuple[object, ...]) -> int | Node:
    """``G`` for an activation: an int when the sizes it depends on are static, else a node computing it."""
    if spec.granularity == "per_tensor":
        return 1
    if all(isinstance(s, int) for s in shape):
        return spec.num_groups(tuple(shape))  # type: ignore[arg-type]
    # Symbolic sizes (e.g. a dynamic batch): let the graph compute G per call.
    if spec.granularity == "per_channel":
        return graph.call_function(torch.ops.aten.sym_size.int, (x, spec.ch_axis))
    numel = graph.call_function(torch.ops.aten.sym_numel.default, (x,))
    return graph.call_function(operator.floordiv, (numel, spec.group_size))


def _convert_activation(spec: QuantSpec, model: GraphModule, node: Node, src: Node) -> Node:
    graph = model.graph
    val = value_of(src)
    problem = "its shape is unknown" if val is None else activation_problem(spec, tuple(val.shape))
    if problem is not None:
        raise RuntimeError(f"qkit.pt2e: cannot convert `{node.name}` (input `{src.name}`): {problem}")
    groups = _groups_arg(spec, graph, src, tuple(val.shape))
    x = graph.call_function(torch.ops.aten.movedim.int, (src, spec.ch_axis, 0)) if spec.moves_axis else src
    if spec.format is not None:
        fp = (spec.format, spec.scaling)
        qp = graph.call_function(torch.ops.qkit.quantize_fp.default, (x, groups, *fp))
    else:
        qp = graph.call_function(torch.ops.qkit.quantize.default, (x, groups, spec.bits, spec.symmetric))
    q = graph.call_function(operator.getitem, (qp, 0))
    params = graph.call_function(operator.getitem, (qp, 1))
    if spec.format is not None:
        out = graph.call_function(torch.ops.qkit.dequantize_fp.default, (q, params, groups, *fp, val.dtype))
    else:
        out = graph.call_function(
            torch.ops.qkit.dequantize.default, (q, params, groups, spec.bits, spec.symmetric, val.dtype)
        )
    if spec.moves_axis:  # back to the original layout, contiguous as QuantSpec.fake_quantize returns it
        out = graph.call_function(torch.ops.aten.movedim.int, (out, 0, spec.ch_axis))
        out = graph.call_function(torch.ops.aten.contiguous.default, (out,))
    return out


def convert_node(spec: QuantSpec, role: Role, model: GraphModule, node: Node) -> None:
    """Replace the observer/fake-quantize call ``node`` by the nodes that quantize its input for real.

    Args:
        spec: the scheme.
        role: ``"weight"``: the input must be a ``get_attr`` (a stored float
            tensor); ``"activation"``: any tensor the scheme fits
            (:func:`activation_problem`); sizes may be symbolic.
        model: the graph module being converted (buffers are added to it).
        node: the ``call_module`` node of a :class:`QkitObserver`/:class:`QkitFakeQuantize`.
    """
    graph = model.graph
    src = node.args[0]
    if not isinstance(src, Node):
        raise RuntimeError(f"qkit.pt2e: cannot convert `{node.name}`: its input is not a graph value")
    with graph.inserting_before(node):
        if role == "activation":
            out = _convert_activation(spec, model, node, src)
        else:
            if src.op != "get_attr":
                raise RuntimeError(
                    f"qkit.pt2e: cannot convert `{node.name}`: its weight `{src.name}` is computed in the graph, "
                    "not a stored tensor"
                )
            w = _get_attr(model, str(src.target))
            spec.check_shape(w.shape)
            if spec.format is not None:
                out = _convert_weight_fp(spec, model, src, w)
            elif uses_standard_ops(spec):
                out = _convert_weight_standard(spec, model, src, w)
            else:
                out = _convert_weight_qkit(spec, model, src, w)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    _drop_unused_attr(model, src)
