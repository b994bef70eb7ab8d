"""``QuantSpec``: one typed, validated description of a qkit quantization scheme.

A scheme is a bit width, symmetric or asymmetric ranges, a granularity and a rounding
mode. The granularity follows from two fields:

========================  ==========================  =======================================
``group_size``            ``ch_axis``                 groups
========================  ==========================  =======================================
``None``                  ``None``                    per tensor: one group
``None``                  ``k``                       per channel: one group per index of axis ``k``
``n``                     (ignored)                   ``n`` consecutive elements along the last axis
========================  ==========================  =======================================

qkit's ops group *contiguous runs of the flattened tensor*, so a per-channel scheme
on an axis other than 0 is applied to ``x.movedim(ch_axis, 0)`` and moved back.
The same object drives the Python API (:meth:`QuantSpec.fake_quantize`,
:meth:`QuantSpec.quantize`, :meth:`QuantSpec.dequantize`), MoQ and the PT2E quantizer
(``qkit.pt2e``).

A scheme is either an integer one (``bits``) or a floating-point one (``format``, one of
``e4m3``, ``e5m2``, ``e3m2``, ``e2m3``, ``e2m1``, with ``scaling`` ``absmax``, ``mx`` or
``nvfp4``; docs/ops.md §10): ``QuantSpec(format="e2m1", scaling="mx")``. Its methods then
run ``qkit.fake_quantize_fp`` / ``quantize_fp`` / ``dequantize_fp``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from qkit import fp_ops, ops
from qkit.ops import MAX_BITS, MAX_STORAGE_BITS, MIN_BITS, ROUNDING_MODES

Granularity = Literal["per_tensor", "per_channel", "per_group"]


def _is_int(value: object) -> bool:
    # bool is an int subclass; True as a bit width is a bug, not a 1.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuantSpec:
    """A qkit quantization scheme (immutable, hashable, validated on construction).

    Attributes:
        bits: code width ``b``, 2..16 (fake quantization); real int storage
            (:meth:`quantize`, :meth:`codes`, :meth:`steps`) needs 2..8.
        symmetric: ``step = 2·max|x| / 2^b``, zero at code 0; otherwise
            ``step = (max - min) / 2^b`` around the group's midpoint.
        group_size: ``n`` consecutive elements along the last axis share a step
            (the last dimension must be a multiple of ``n``); ``None`` for
            per-channel / per-tensor.
        ch_axis: with ``group_size=None``, the axis whose indices each get their
            own step (per channel); ``None`` means one step for the whole tensor.
        rounding: ``"nearest"`` (ties to even) or ``"stochastic"``
            (``floor(v + u)``, training only; storage always rounds to nearest).

        format: a floating-point element format instead of integer codes (``None``:
            integer). ``bits`` then is the format's width (8, 6 or 4) and may be left
            out; ``symmetric`` must stay ``True``.
        scaling: with ``format``: ``"absmax"`` (a float32 scale per group, granularity
            as above), ``"mx"`` (E8M0 scale per 32 elements along the last axis) or
            ``"nvfp4"`` (``e2m1`` only: E4M3 scale per 16, one fp32 tensor scale); mx and
            nvfp4 set ``group_size`` to their block.

    Integer codes lie in ``[quant_min, quant_max] = [-2^(b-1), 2^(b-1) - 1]``.
    """

    bits: int | None = None
    symmetric: bool = True
    group_size: int | None = None
    ch_axis: int | None = 0
    rounding: str = "nearest"
    format: str | None = None
    scaling: str = "absmax"

    def __post_init__(self) -> None:
        self._check_format()
        if not _is_int(self.bits):
            raise ValueError(f"QuantSpec: `bits` must be an int, got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"QuantSpec: `bits` must be in [{MIN_BITS}, {MAX_BITS}], got {self.bits}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"QuantSpec: `symmetric` must be a bool, got {self.symmetric!r}")
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size < 1):
            raise ValueError(f"QuantSpec: `group_size` must be a positive int or None, got {self.group_size!r}")
        if self.ch_axis is not None and (not _is_int(self.ch_axis) or self.ch_axis < 0):
            raise ValueError(
                f"QuantSpec: `ch_axis` must be a non-negative int or None, got {self.ch_axis!r} "
                "(negative axes are ambiguous across ranks; count from the front)"
            )
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"QuantSpec: `rounding` must be one of {ROUNDING_MODES}, got {self.rounding!r}")
        # Always true for 2..16 bits; kept as the PT2E specs' invariant in case the range grows.
        if self.quant_min > self.quant_max:
            raise ValueError(f"QuantSpec: `quant_min` ({self.quant_min}) must be <= `quant_max` ({self.quant_max})")

    def _check_format(self) -> None:
        """The integer-or-format rule; fills in ``bits`` (and the block's ``group_size``)."""
        if self.format is None:
            if self.scaling != "absmax":
                raise ValueError(f"QuantSpec: `scaling` {self.scaling!r} needs a floating-point `format`")
            if self.bits is None:
                object.__setattr__(self, "bits", 8)
            return
        if not isinstance(self.format, str) or self.format not in fp_ops.FORMATS:
            raise ValueError(f"QuantSpec: `format` must be one of {tuple(fp_ops.FORMATS)} or None, got {self.format!r}")
        width = fp_ops.fp_format_bits(self.format)
        if self.bits is not None and self.bits != width:
            raise ValueError(
                f"QuantSpec: give either `bits` (an integer scheme) or `format`, not both: `bits` is {self.bits!r} "
                f"but {self.format} has {width} bits"
            )
        object.__setattr__(self, "bits", width)
        if self.scaling not in fp_ops.SCALINGS:
            raise ValueError(f"QuantSpec: `scaling` must be one of {fp_ops.SCALINGS}, got {self.scaling!r}")
        if self.scaling == "nvfp4" and self.format != "e2m1":
            raise ValueError(f"QuantSpec: `scaling` nvfp4 needs `format` e2m1, got {self.format!r}")
        if self.symmetric is not True:
            raise ValueError(
                "QuantSpec: `symmetric` must be True with a `format` (floating-point formats are symmetric)"
            )
        block = fp_ops.BLOCK.get(self.scaling)
        if block is not None:
            if self.group_size is not None and self.group_size != block:
                raise ValueError(
                    f"QuantSpec: {self.scaling} scaling uses blocks of {block}: `group_size` must be None or {block}, "
                    f"got {self.group_size!r}"
                )
            object.__setattr__(self, "group_size", block)

    # ------------------------------------------------------------ derived values

    @property
    def quant_min(self) -> int:
        """Smallest code, ``-2^(b-1)``."""
        return -(1 << (self.bits - 1))

    @property
    def quant_max(self) -> int:
        """Largest code, ``2^(b-1) - 1``."""
        return (1 << (self.bits - 1)) - 1

    @property
    def granularity(self) -> Granularity:
        """``"per_group"`` when ``group_size`` is set, else ``"per_channel"``/``"per_tensor"`` by ``ch_axis``."""
        if self.group_size is not None:
            return "per_group"
        return "per_tensor" if self.ch_axis is None else "per_channel"

    @property
    def stochastic(self) -> bool:
        """Whether fake quantization rounds stochastically."""
        return self.rounding == "stochastic"

    @property
    def storable(self) -> bool:
        """Whether :meth:`quantize` can store this scheme (2..8 bits, one int8 per code; 4 bits packed;
        or any floating-point format)."""
        return self.format is not None or self.bits <= MAX_STORAGE_BITS

    def with_bits(self, bits: int) -> QuantSpec:
        """The same scheme at another bit width (validated), e.g. for a MoQ schedule."""
        return dataclasses.replace(self, bits=bits)

    # ------------------------------------------------------------ layout

    def check_shape(self, shape: torch.Size | tuple[int, ...] | list[int]) -> None:
        """Raise ``ValueError`` if a tensor of ``shape`` cannot take this scheme."""
        shape = tuple(shape)
        if self.group_size is not None:
            if not shape:
                raise ValueError("QuantSpec: group-wise quantization needs a tensor with at least one dimension")
            if shape[-1] % self.group_size != 0:
                raise ValueError(
                    f"QuantSpec: `group_size` ({self.group_size}) must divide the last dimension "
                    f"of the tensor ({shape[-1]}, shape {list(shape)})"
                )
        elif self.ch_axis is not None and self.ch_axis >= len(shape):
            raise ValueError(
                f"QuantSpec: `ch_axis` ({self.ch_axis}) is out of range for a tensor of shape {list(shape)}"
            )

    def num_groups(self, shape: torch.Size | tuple[int, ...] | list[int]) -> int:
        """``G``: how many steps (param rows) a tensor of ``shape`` gets."""
        self.check_shape(shape)
        numel = 1
        for s in shape:
            numel *= s
        if self.group_size is not None:
            return numel // self.group_size
        if self.ch_axis is None:
            return 1
        return tuple(shape)[self.ch_axis]

    @property
    def moves_axis(self) -> bool:
        """Whether the op layout differs from the tensor's (per channel on an axis other than 0)."""
        return self.group_size is None and self.ch_axis not in (None, 0)

    def to_op_layout(self, x: Tensor) -> Tensor:
        """``x`` arranged so that every group is a contiguous run (channel axis first)."""
        self.check_shape(x.shape)
        return x.movedim(self.ch_axis, 0) if self.moves_axis else x

    def from_op_layout(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`to_op_layout`."""
        return x.movedim(0, self.ch_axis) if self.moves_axis else x

    def _op_groups(self, x: Tensor) -> int:
        # For a per-channel tensor with 0 elements in its other dims the op still needs G | M.
        groups = self.num_groups(x.shape)
        return groups if x.numel() else 1

    # ------------------------------------------------------------ the ops

    def fake_quantize(self, x: Tensor) -> Tensor:
        """``dequantize(quantize(x))`` with this scheme, via ``torch.ops.qkit.fake_quantize``.

        Args:
            x: float32/float16/bfloat16 tensor; see :meth:`check_shape`.

        Returns:
            A new contiguous tensor of ``x``'s shape and dtype; gradients pass straight through.
            A floating-point scheme runs ``qkit.fake_quantize_fp``.
        """
        if self.format is not None:
            y = fp_ops.fake_quantize_fp(
                self.to_op_layout(x), self._op_groups(x), self.format, self.scaling, self.stochastic
            )
            return self.from_op_layout(y).contiguous()
        y = ops.fake_quantize(self.to_op_layout(x), self._op_groups(x), self.bits, self.symmetric, self.stochastic)
        # Contiguous like the op's own output: a moved-back (transposed) weight would
        # send matmuls down another summation order than the float model's.
        return self.from_op_layout(y).contiguous()

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``x`` as int8 codes (one per element; 4 bits: two per byte) and float32 params.

        Rounds to nearest whatever ``rounding`` says (storage is deterministic).

        Args:
            x: float32/float16/bfloat16 tensor; ``bits`` must be 2..8.

        Returns:
            ``(q, params)``: ``q`` int8 in the *op layout* (:meth:`to_op_layout`: the
            channel axis first for per-channel on ``ch_axis > 0``; 4 bits: last
            dimension halved), ``params`` float32 ``[G, 1]`` (step) or ``[G, 2]``
            (step, midpoint). :meth:`dequantize` undoes both. A floating-point scheme
            returns ``qkit.quantize_fp``'s ``(codes, scales)`` in the op layout (e2m1
            needs an even last dimension there, FP6 one divisible by 4).
        """
        if self.format is not None:
            return fp_ops.quantize_fp(self.to_op_layout(x), self._op_groups(x), self.format, self.scaling)
        self._check_storable("quantize()")
        return ops.quantize(self.to_op_layout(x), self._op_groups(x), self.bits, self.symmetric)

    def dequantize(self, q: Tensor, params: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Values from :meth:`quantize`'s ``(q, params)``, in the original layout.

        Args:
            q: int8 codes in the op layout.
            params: float32 ``[G, 1|2]``.
            dtype: float32 (default), float16 or bfloat16.

        Returns:
            Tensor of the quantized tensor's original shape and ``dtype``. A
            floating-point scheme takes ``(codes, scales)`` of :meth:`quantize`.
        """
        if self.format is not None:
            return self.from_op_layout(fp_ops.dequantize_fp(q, params, None, self.format, self.scaling, dtype))
        self._check_storable("dequantize()")
        groups = params.shape[0] if params.dim() > 0 else 1
        y = ops.dequantize(q, params, groups, self.bits, self.symmetric, dtype)
        return self.from_op_layout(y)

    def scales(self, x: Tensor) -> Tensor:
        """The per-group decode scales of a floating-point scheme for ``x``, float32 ``[G]``
        (absmax: its float32 scales; mx: the E8M0 powers of two; nvfp4: block scale times
        tensor scale), from :meth:`quantize`."""
        if self.format is None:
            raise ValueError("QuantSpec: scales() is for floating-point schemes; integer ones have steps()")
        _, stored = self.quantize(x.detach())
        if self.scaling == "nvfp4":
            tensor_scale, block = fp_ops.nvfp4_scales(stored)
            return block.float() * tensor_scale
        return stored.float()

    def codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Unpacked int8 codes and params of ``x``, for any ``bits`` up to 8, from the ``quantize`` op.

        The same numbers as :meth:`quantize` (4 bits: before packing), so
        ``step * q + offset`` equals :meth:`fake_quantize` exactly.

        Returns:
            ``(q, params)``: ``q`` int8 in the op layout, one code per element;
            ``params`` float32 ``[G, 1]`` (step) or ``[G, 2]`` (step, offset).
        """
        if self.format is not None:
            raise ValueError("QuantSpec: steps(), qparams() and codes() are for integer schemes; use scales()")
        self._check_storable("codes()")
        return ops.quantize(self.to_op_layout(x.detach()), self._op_groups(x), self.bits, self.symmetric, packed=False)

    def steps(self, x: Tensor) -> Tensor:
        """The per-group step qkit uses for ``x`` (the kernels' ``params[:, 0]``), float32 ``[G]``.

        For symmetric schemes this is also the ``scale`` of PyTorch's affine
        quantization (zero point 0, codes ``[quant_min, quant_max]``).
        """
        return self.qparams(x)[0]

    def qparams(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(steps, offsets)`` of ``x``, float32 ``[G]`` each (offsets: the midpoints; 0 if symmetric)."""
        params = self.codes(x)[1]
        offsets = torch.zeros_like(params[:, 0]) if self.symmetric else params[:, 1]
        return params[:, 0], offsets

    def _check_storable(self, what: str) -> None:
        if not self.storable:
            raise ValueError(
                f"QuantSpec: {what} stores one int8 per code, `bits` must be in [{MIN_BITS}, {MAX_STORAGE_BITS}], "
                f"got {self.bits}"
            )
