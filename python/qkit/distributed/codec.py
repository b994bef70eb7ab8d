"""The codes gradients travel as: integer (qkit's symmetric ``bits``-bit quantizer) or FP8.

qgZ, the FSDP2 reduce-scatter and the DDP hook quantize a flat tensor in ``G`` contiguous groups
and send the codes and one float32 scale per group. A :class:`Codec` says which codes:

- integer (``format=None``): ``bits`` 4 or 8, symmetric, fp32 params ``[G, 1]`` (``quantize`` /
  ``dequantize``, the ZeRO++ reduction ops, docs/ops.md §1-§4);
- FP8 (``format="e4m3"`` or ``"e5m2"``): one ``float8_e4m3fn``/``float8_e5m2`` code per element
  with an ``absmax`` fp32 scale per group (``quantize_fp`` / ``dequantize_fp``, docs/ops.md §10),
  composed here: the intra-node reduction dequantizes to fp32, sums the ``L`` tensors in order
  and re-quantizes; LoCo adds and updates the error around ``quantize_fp`` in fp32.

Codes always leave a codec as int8 bytes (FP8 codes reinterpreted, not converted), so every
exchange moves plain bytes; :meth:`Codec.dequantize` reads them back in their format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qkit import ops
from qkit.fp_ops import dequantize_fp, quantize_fp
from qkit.zeropp_ops import loco_quantized_reduction, loco_swizzle_quantize, quantized_reduction, swizzle_quantize

__all__ = ["DEFAULT_GRAD_BITS", "GRAD_FORMATS", "Codec", "resolve_codec"]

GRAD_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
"""``grad_format`` values -> code dtype. FP8 only, with ``absmax`` scales: the FP6/FP4 formats pack
several codes per byte across group boundaries and ``mx``/``nvfp4`` scales fix the group size, so
neither fits the chunk layouts here (refused with a ``ValueError``)."""


class _DefaultBits(int):
    """The default ``bits`` (4): an ``int`` that tells "not passed" from an explicit 4."""

    def __repr__(self) -> str:
        return "4"


DEFAULT_GRAD_BITS: int = _DefaultBits(4)
"""Default of the ``bits``/``grad_bits`` arguments: 4, and not passed (so ``grad_format`` may be)."""


def resolve_codec(fn: str, bits: int | None, grad_format: object, bits_name: str = "bits") -> Codec:
    """The codec of ``bits`` / ``grad_format`` as the user passed them.

    ``grad_format=None``: integer codes at ``bits`` (4 or 8). A format (``"e4m3"``/``"e5m2"``)
    replaces the integer codes, so it excludes ``bits``: ``bits`` must be left at its default
    (:data:`DEFAULT_GRAD_BITS`); the codec's ``bits`` is then 8.

    Raises:
        ValueError: a bad format, bad bits, or both given (naming the arguments of ``fn``).
    """
    if grad_format is None:
        if bits not in (4, 8):
            raise ValueError(f"qkit.distributed.{fn}: `{bits_name}` must be 4 or 8, got {bits!r}")
        return Codec(int(bits))  # type: ignore[arg-type]
    if not isinstance(grad_format, str) or grad_format not in GRAD_FORMATS:
        raise ValueError(
            f"qkit.distributed.{fn}: `grad_format` must be None (integer codes), 'e4m3' or 'e5m2' (FP8 codes "
            f"with an absmax fp32 scale per group; FP6/FP4 formats and mx/nvfp4 scaling are not supported "
            f"for gradients), got {grad_format!r}"
        )
    if bits is not DEFAULT_GRAD_BITS:
        raise ValueError(
            f"qkit.distributed.{fn}: pass `{bits_name}` or `grad_format`, not both (got {bits_name}={bits!r}, "
            f"grad_format={grad_format!r}): FP8 codes are always 8 bits; leave `{bits_name}` at its default"
        )
    return Codec(8, grad_format)


def describe_format(grad_format: object) -> object:
    """``grad_format`` for a cross-rank fingerprint: itself when ``None`` or a ``str``, else its
    type's name (an object's ``repr`` may hold an address, which differs by rank)."""
    return grad_format if grad_format is None or isinstance(grad_format, str) else type(grad_format).__name__


@dataclass(frozen=True)
class Codec:
    """Symmetric integer codes of ``bits`` (``format=None``) or FP8 codes of ``format`` (``bits`` 8).

    Flat inputs of any float dtype (fp32/fp16/bf16) in ``G`` contiguous groups; codes are int8
    ``[M * bits / 8]``, params float32 ``[G, 1]`` (the decode step / scale of each group)."""

    bits: int
    format: str | None = None

    def code_bytes(self, numel: int) -> int:
        """Bytes of the codes of ``numel`` elements."""
        return numel * self.bits // 8

    def quantize(self, flat: Tensor, groups: int) -> tuple[Tensor, Tensor]:
        """``flat`` ``[M]`` -> (codes int8 ``[M * bits / 8]``, params fp32 ``[G, 1]``)."""
        if self.format is None:
            return ops.quantize(flat, groups, self.bits, True)
        codes, scales = quantize_fp(flat, groups, self.format)
        return codes.view(torch.int8), scales.view(groups, 1)

    def dequantize(self, codes: Tensor, params: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
        """(codes int8, params ``[G, 1]`` or ``[G]``) -> values ``[M]`` in ``dtype`` (decoded in
        fp32, rounded once)."""
        if self.format is None:
            return ops.dequantize(codes, params.reshape(groups, 1), groups, self.bits, True, dtype)
        fp8 = codes.reshape(-1).view(GRAD_FORMATS[self.format])
        return dequantize_fp(fp8, params.reshape(-1), groups, self.format, "absmax", dtype)

    def loco_quantize(
        self, flat: Tensor, error: Tensor, beta: float, groups: int, nodes: int = 1, local: int = 1
    ) -> tuple[Tensor, Tensor]:
        """LoCo: quantize ``s = flat + error`` and update ``error`` in place to
        ``beta * error + (1 - beta) * (s - dequant)``, all fp32, ``error`` stored in its dtype.

        ``nodes``/``local`` swizzle ``flat`` first (qgZ's layout, docs/ops.md §3
        ``swizzle_quantize`` with one pipeline slice); ``error`` is indexed by swizzled position."""
        if self.format is None:
            return loco_swizzle_quantize(flat, error, beta, groups, self.bits, True, 1, nodes, local)
        s = swizzle(flat, nodes, local).to(torch.float32) + error.reshape(-1).to(torch.float32)
        codes, params = self.quantize(s, groups)
        _loco_update(error, s, self.dequantize(codes, params, groups, torch.float32), beta)
        return codes, params

    def swizzle_quantize(self, flat: Tensor, groups: int, nodes: int, local: int) -> tuple[Tensor, Tensor]:
        """:meth:`quantize` of ``flat`` in qgZ's swizzled layout (see :func:`swizzle`)."""
        if self.format is None:
            return swizzle_quantize(flat, groups, self.bits, True, 1, nodes, local)
        return self.quantize(swizzle(flat, nodes, local), groups)

    def reduce(
        self,
        codes: Tensor,
        params: Tensor,
        in_groups: int,
        out_groups: int,
        local: int,
        error: Tensor | None = None,
        beta: float = 0.0,
    ) -> tuple[Tensor, Tensor]:
        """The intra-node step: ``local`` quantized tensors back to back (``in_groups`` groups in
        all), each decoded to fp32 and summed in order ``j = 0, 1, ...`` (a sum, not a mean), the
        sum re-quantized in ``out_groups`` groups (with LoCo when ``error`` is given)."""
        if self.format is None:
            if error is None:
                return quantized_reduction(codes, params, in_groups, out_groups, self.bits, True, local)
            return loco_quantized_reduction(codes, params, error, beta, in_groups, out_groups, self.bits, True, local)
        values = self.dequantize(codes, params, in_groups, torch.float32).view(local, -1)
        acc = sum_rows(values)
        if error is None:
            return self.quantize(acc, out_groups)
        return self.loco_quantize(acc, error, beta, out_groups)


def swizzle(flat: Tensor, nodes: int, local: int) -> Tensor:
    """qgZ's order: ``flat`` ``[M]`` is ``W = nodes * local`` slices (slice ``n * local + d`` is
    rank ``n * local + d``'s); the result holds them device-major, ``[local][nodes][M / W]``, so
    that chunk ``d`` of ``local`` holds what node-peer ``d`` reduces. No copy for one slice."""
    if nodes * local == 1:
        return flat.reshape(-1)
    return flat.reshape(nodes, local, -1).transpose(0, 1).reshape(-1)


def sum_rows(values: Tensor) -> Tensor:
    """fp32 ``[c, n]`` -> the sum of the rows in row order, ``[n]`` (a fresh tensor)."""
    acc = values[0].clone()
    for j in range(1, values.shape[0]):
        acc += values[j]
    return acc


def _loco_update(error: Tensor, s: Tensor, decoded: Tensor, beta: float) -> None:
    """``error <- beta * error + (1 - beta) * (s - decoded)``, each step one fp32 op, stored in
    ``error``'s dtype (in place). ``beta`` and ``1 - beta`` are rounded to fp32 on the host (as
    the kernels' LoCo does): Python scalars, so no tensor is copied to the device per call."""
    b = torch.tensor(beta, dtype=torch.float32)
    new = error.reshape(-1).to(torch.float32) * b.item() + (s - decoded) * (1 - b).item()
    error.view(-1).copy_(new)
