"""``QkitQuantizer``: a torchao PT2E quantizer that quantizes with qkit's numerics.

Numerics of the standard path. For a symmetric scheme qkit computes, in fp32,
``s = 2^(b-1) / max|x|``, ``q = clamp(rn(x·s))`` and ``y = step·q`` with
``step = 1/s``. PyTorch's affine ops, given ``scale = step`` and zero point 0,
compute ``q = clamp(rn(x · (1/scale)))`` and ``y = (q - 0)·scale`` in fp32. The
two agree bit for bit because ``1/(1/s) == s`` in fp32 whenever ``s`` is itself a
correctly rounded quotient ``2^k / m`` (checked for every fp32 mantissa; a
reciprocal applied three times equals the reciprocal applied once), both round
half to even, clamping before or after rounding to integer bounds is the same,
and ``step·q`` is a single rounded product. The exceptions are tiny ranges
(``max|x|`` below about ``2^(b-1)/FLT_MAX``): their step is a subnormal with no fp32
reciprocal, so qkit divides by it where torch multiplies by an infinite ``1/scale``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer
from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

from qkit.fp_ops import CODE_DTYPES
from qkit.pt2e.observers import (
    QkitFakeQuantize,
    QkitObserver,
    Role,
    activation_problem,
    storage_problem,
    torch_qscheme,
    value_of,
)
from qkit.quant_spec import QuantSpec

_aten = torch.ops.aten

OP_TARGETS: dict[str, tuple[object, ...]] = {
    "linear": (_aten.linear.default,),
    "conv": (
        _aten.conv1d.default,
        _aten.conv2d.default,
        _aten.conv3d.default,
        _aten.conv1d.padding,
        _aten.conv2d.padding,
        _aten.conv3d.padding,
    ),
}

# What a batch norm after a conv looks like in an exported graph (QAT refuses it, see validate).
_BATCH_NORM = tuple(
    getattr(getattr(_aten, name), overload)
    for name, overload in (
        ("batch_norm", "default"),
        ("_native_batch_norm_legit", "default"),
        ("_native_batch_norm_legit_no_training", "default"),
    )
    if hasattr(_aten, name)
)

# node.meta key recording which schemes QkitQuantizer gave a node (for validate).
META_KEY = "qkit_pt2e"


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _module_stack(node: Node) -> list[tuple[str, str]]:
    """``(path, type name)`` of every module the node was traced inside, outermost first (root excluded)."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, type_name in stack.values():
        if path:
            out.append((path, type_name if isinstance(type_name, str) else _type_name(type_name)))
    return out


class QkitQuantizer(Quantizer):
    """Quantize the weights (and optionally input activations) of ``linear`` and ``conv`` nodes with qkit.

    Use with torchao's ``prepare_pt2e`` (calibration, :class:`QkitObserver`) or
    ``prepare_qat_pt2e`` (training, :class:`QkitFakeQuantize`), then ``convert_pt2e``.
    Both inserted modules already run ``torch.ops.qkit.fake_quantize``, so the
    prepared model computes what the converted one will.

    Args:
        weight: the weights' scheme, 2-8 bits (one int8 code per weight once
            converted) or a floating-point format (``QuantSpec(format="e4m3", ...)``,
            stored as ``qkit.quantize_fp`` codes and scales). Per-channel on ``ch_axis``
            (0 = output channels of both ``linear`` ``[out, in]`` and ``conv``
            ``[out, in/groups, *k]`` weights), per-tensor, or group-wise along the last
            axis (mx/nvfp4: blocks of 32/16 along it).
        activation: the input activations' scheme, or ``None`` (weight-only). 4 or
            8 bits, or a floating-point format; quantized per call from the tensor's
            own range, as qkit does (``ch_axis=0`` on a ``[tokens, features]`` input
            is per token).
        is_qat: insert :class:`QkitFakeQuantize` (for ``prepare_qat_pt2e``) instead
            of :class:`QkitObserver`. Both compute the same forward values.
        ops: which node kinds to quantize: ``"linear"`` and/or ``"conv"`` (1-3 d).
        module_names: only nodes traced inside one of these modules (paths as in
            ``named_modules()``, e.g. ``"encoder.fc1"``).
        module_types: only nodes traced inside a module of one of these classes.
        skip_module_names: never nodes traced inside these modules.
        node_filter: a last say, ``node -> bool``.
    """

    def __init__(
        self,
        weight: QuantSpec,
        activation: QuantSpec | None = None,
        *,
        is_qat: bool = False,
        ops: Iterable[str] = ("linear", "conv"),
        module_names: Iterable[str] | None = None,
        module_types: Iterable[type[torch.nn.Module]] | None = None,
        skip_module_names: Iterable[str] = (),
        node_filter: Callable[[Node], bool] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(weight, QuantSpec):
            raise TypeError(f"QkitQuantizer: `weight` must be a qkit.QuantSpec, got {type(weight).__name__}")
        if not weight.storable:
            raise ValueError(f"QkitQuantizer: `weight.bits` must be in [2, 8] (int8 codes), got {weight.bits}")
        if activation is not None:
            if not isinstance(activation, QuantSpec):
                raise TypeError(
                    f"QkitQuantizer: `activation` must be a qkit.QuantSpec or None, got {type(activation).__name__}"
                )
            if not activation.storable:
                raise ValueError(
                    "QkitQuantizer: `activation.bits` must be in [2, 8] (activations are converted to "
                    f"torch.ops.qkit.quantize/dequantize), got {activation.bits}"
                )
        ops = tuple(ops)
        unknown = [op for op in ops if op not in OP_TARGETS]
        if unknown or not ops:
            raise ValueError(f"QkitQuantizer: `ops` must be a non-empty subset of {tuple(OP_TARGETS)}, got {ops}")
        self.weight = weight
        self.activation = activation
        self.is_qat = is_qat
        self.ops = ops
        self.module_names = None if module_names is None else frozenset(module_names)
        self.module_type_names = None if module_types is None else frozenset(_type_name(t) for t in module_types)
        self.skip_module_names = frozenset(skip_module_names)
        self.node_filter = node_filter
        self._targets = frozenset(t for op in ops for t in OP_TARGETS[op])
        self._weight_qspec = self._qspec(weight, "weight")
        self._activation_qspec = None if activation is None else self._qspec(activation, "activation")

    def _qspec(self, spec: QuantSpec, role: Role) -> QuantizationSpec:
        ctr = (QkitFakeQuantize if self.is_qat else QkitObserver).with_args(spec=spec, role=role)
        fp = spec.format is not None
        return QuantizationSpec(
            dtype=CODE_DTYPES[spec.format] if fp else torch.int8,
            observer_or_fake_quant_ctr=ctr,
            quant_min=None if fp else spec.quant_min,
            quant_max=None if fp else spec.quant_max,
            qscheme=torch_qscheme(spec),
            ch_axis=spec.ch_axis if spec.granularity == "per_channel" else None,
            # Not torch's dynamic flow (choose_qparams nodes): qkit's own nodes compute the range per call.
            is_dynamic=False,
        )

    # ------------------------------------------------------------ selection

    def selects(self, node: Node) -> bool:
        """Whether ``node`` is a ``linear``/``conv`` call this quantizer's filters take."""
        if node.op != "call_function" or node.target not in self._targets:
            return False
        stack = _module_stack(node)
        paths = {path for path, _ in stack}
        if self.module_names is not None and not paths & self.module_names:
            return False
        if self.module_type_names is not None and not {t for _, t in stack} & self.module_type_names:
            return False
        if paths & self.skip_module_names:
            return False
        return self.node_filter is None or bool(self.node_filter(node))

    # ------------------------------------------------------------ Quantizer API

    def annotate(self, model: GraphModule) -> GraphModule:
        """Attach a ``QuantizationAnnotation`` to every selected node not annotated yet.

        The weight (argument 1) gets the weight scheme; the input (argument 0) the
        activation scheme when one was given. Bias and outputs stay float.
        """
        for node in model.graph.nodes:
            if not self.selects(node):
                continue
            existing = node.meta.get(Q_ANNOTATION_KEY)
            if existing is not None and existing._annotated:
                continue  # another quantizer (e.g. in a ComposableQuantizer) got there first
            qspecs = {}
            x, w = node.args[0], node.args[1]
            if isinstance(w, Node):
                qspecs[w] = self._weight_qspec
            if self._activation_qspec is not None and isinstance(x, Node):
                qspecs[x] = self._activation_qspec
            node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map=qspecs, _annotated=True)
            node.meta[META_KEY] = (self.weight, self.activation, self.is_qat)
        return model

    def validate(self, model: GraphModule) -> None:
        """Raise ``ValueError`` naming the first annotated node that cannot be converted as asked.

        Refused: a weight that is computed in the graph rather than stored, or a
        weight or input that is not float32/float16/bfloat16; a shape the scheme
        does not fit (``ch_axis`` out of range, ``group_size`` not dividing the
        last dimension, an odd last dimension for 4-bit inputs, a symbolic last
        dimension where it decides the layout; other sizes of an input, such as
        a dynamic batch, may be symbolic); in QAT, a conv followed by a batch
        norm (its weight would be rescaled in the graph, no longer stored).
        """
        for node in model.graph.nodes:
            marked = node.meta.get(META_KEY)
            if marked is None:
                continue
            weight, activation, is_qat = marked
            where = f"QkitQuantizer: node `{node.name}` ({node.target})"
            w = node.args[1]
            if not isinstance(w, Node) or w.op != "get_attr":
                name = w.name if isinstance(w, Node) else repr(w)
                raise ValueError(f"{where}: its weight `{name}` is computed in the graph, not a stored parameter")
            self._check_weight(where, w, weight)
            if activation is not None:
                x = node.args[0]
                val = value_of(x) if isinstance(x, Node) else None
                if val is None:
                    raise ValueError(f"{where}: its input is not a tensor of known rank")
                self._check_dtype(where, "input", x, val.dtype)
                problem = activation_problem(activation, tuple(val.shape))
                if problem is not None:
                    raise ValueError(f"{where}: its input `{x.name}` does not fit the activation scheme: {problem}")
            if is_qat and node.target in OP_TARGETS["conv"]:
                for user in node.users:
                    if user.target in _BATCH_NORM:
                        raise ValueError(
                            f"{where}: is followed by batch norm `{user.name}`; qkit's QAT does not fold batch "
                            "norm - fold it into the conv before export, or quantize with PTQ (prepare_pt2e folds it)"
                        )

    @staticmethod
    def _check_dtype(where: str, what: str, node: Node, dtype: torch.dtype) -> None:
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{where}: its {what} `{node.name}` is {dtype}, not float32, float16 or bfloat16")

    @classmethod
    def _check_weight(cls, where: str, node: Node, spec: QuantSpec) -> None:
        val = value_of(node)
        if val is None or not all(isinstance(s, int) for s in val.shape):
            raise ValueError(f"{where}: the shape of its weight `{node.name}` is not static")
        cls._check_dtype(where, "weight", node, val.dtype)
        try:
            spec.check_shape(tuple(val.shape))
        except ValueError as exc:
            raise ValueError(f"{where}: its weight `{node.name}` does not fit the scheme: {exc}") from None
        problem = storage_problem(spec, tuple(val.shape))
        if problem is not None:
            raise ValueError(f"{where}: its weight `{node.name}` does not fit the scheme: {problem}")
