"""LoCo: qgZ with error feedback (ZeRO++ ``all_to_all_loco_quant_reduce``), state per parameter.

Each parameter owns two error buffers per rank, in its gradient's dtype (never
re-quantized between steps): ``intra`` (``M`` elements, swizzled order) for the
4-bit (or FP8, ``grad_format``) quantization before the node all-to-all, and ``inter`` (``M / L`` elements) for
the re-quantization after the node reduction. Both follow
``e <- err_beta * e + (1 - err_beta) * (s - dequant(q))`` with ``s = value + e``; with
``err_beta = 0`` this is classic error feedback: the sum of the results over steps differs
from the sum of the exact means only by the errors still held in the buffers (the last
step's), instead of accumulating every step's.

Every parameter counts its own steps and starts from zero error every ``reset_T`` of them
(DeepSpeed kept one counter for all parameters and stored the buffers at 8 bits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from qkit.distributed.consistency import Validate
from qkit.distributed.groups import UNSET, Topology, process_groups_arg
from qkit.distributed.qgz import ReduceStage, Stage, codec_or_error, run

__all__ = ["LocoReducer", "LocoState", "all_to_all_loco_quant_reduce"]

DEFAULT_ERR_BETA = 0.8
DEFAULT_RESET_T = 1024


@dataclass
class LocoState:
    """One parameter's error feedback on this rank.

    ``intra``: ``[M]`` in the gradient's dtype, swizzled order; ``inter``: ``[M / L]``, same dtype;
    ``steps``: reductions since the last reset; ``key``: (shape, dtype, device, W, L) it was made for.
    """

    intra: Tensor
    inter: Tensor
    steps: int
    key: tuple[Any, ...]


class LocoReducer:
    """Owner of LoCo error state, keyed by parameter (weakly: state dies with its parameter).

    Args:
        err_beta: ``β`` in ``[0, 1]``: weight of the old error in the update (0 = classic
            error feedback; DeepSpeed's default 0.8).
        reset_T: each parameter's buffers restart from zero after every ``reset_T`` of its own
            steps (0: never).

    Call it like :func:`qkit.distributed.all_to_all_quant_reduce`, with parameters (their
    ``.grad`` is reduced) instead of gradients.
    """

    def __init__(self, err_beta: float = DEFAULT_ERR_BETA, reset_T: int = DEFAULT_RESET_T) -> None:
        _check_hyper(err_beta, reset_T)
        self.err_beta = float(err_beta)
        self.reset_T = reset_T
        self._state: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def state(self, param: Tensor) -> LocoState | None:
        """The error state held for ``param`` (``None`` before its first reduction)."""
        return self._state.get(param)

    def reset(self, param: Tensor | None = None) -> None:
        """Forget the error of ``param`` (or of every parameter)."""
        if param is None:
            self._state = WeakIdKeyDictionary()
        else:
            self._state.pop(param, None)

    # deviation: loco-per-parameter-reset, loco-buffer-precision (own counter; buffers in the grad's dtype)
    def _prepare(self, param: Tensor, grad: Tensor, topo: Topology, reset_T: int) -> LocoState:
        key = (tuple(grad.shape), grad.dtype, grad.device, topo.world, topo.local_world_size)
        st = self._state.get(param)
        if st is None or st.key != key:
            st = LocoState(
                intra=torch.zeros(grad.numel(), dtype=grad.dtype, device=grad.device),
                inter=torch.zeros(grad.numel() // topo.local_world_size, dtype=grad.dtype, device=grad.device),
                steps=0,
                key=key,
            )
            self._state[param] = st
        elif reset_T and st.steps >= reset_T:
            st.intra.zero_()
            st.inter.zero_()
            st.steps = 0
        return st

    def __call__(
        self,
        params: Sequence[Tensor],
        process_groups: dict[str, Any] | None = None,
        *,
        err_beta: float | None = None,
        reset_T: int | None = None,
        validate: Validate = "once",
        groups: Any = UNSET,
        grad_format: str | None = None,
    ) -> list[Tensor]:
        """Reduce ``p.grad`` of every parameter (collective); returns what
        :func:`~qkit.distributed.all_to_all_quant_reduce` returns for the gradients.
        ``grad_format`` (``None``: 4-bit codes; ``"e4m3"``/``"e5m2"``: FP8) as there: the error
        buffers hold values, so they work with either (and carry over if the format changes).

        ``err_beta``/``reset_T`` (when not ``None``) override the reducer's for this call. Gradients that take
        the fallback path carry no error state (their reduction is not quantized). ``validate`` as for
        :func:`~qkit.distributed.all_to_all_quant_reduce`; ``err_beta`` and ``reset_T`` are part of the
        checked signature, so ranks using different ones raise instead of mixing their errors.
        """
        beta = self.err_beta if err_beta is None else err_beta
        period = self.reset_T if reset_T is None else reset_T
        params = list(params)
        # Argument errors go through the cross-rank check (run raises them after it), so a rank
        # with a bad argument fails together with its peers instead of leaving them waiting.
        fn = "all_to_all_loco_quant_reduce"
        codec, error = codec_or_error(fn, grad_format)
        try:
            _check_hyper(beta, period)
        except (TypeError, ValueError) as exc:
            error = error or exc
        grads = []
        for i, p in enumerate(params):
            if p.grad is None and error is None:
                error = ValueError(f"qkit.distributed.all_to_all_loco_quant_reduce: params[{i}] has no .grad")
            grads.append(p if p.grad is None else p.grad)  # the parameter stands in for the fingerprint
        beta = float(beta) if error is None else beta
        states: dict[int, LocoState] = {}

        def state_of(i: int, topo: Topology) -> LocoState:
            if i not in states:
                states[i] = self._prepare(params[i], grads[i], topo, period)
            return states[i]

        def stage1(topo: Topology) -> Stage:
            def f(i: int, t: Tensor, g: int) -> tuple[Tensor, Tensor]:
                assert codec is not None
                st = state_of(i, topo)
                # deviation: loco-fp32-update (the ops compute in fp32 and round e once)
                return codec.loco_quantize(t, st.intra, beta, g, topo.nodes, topo.local_world_size)

            return f

        def stage3(topo: Topology) -> ReduceStage:
            def f(i: int, q: Tensor, p: Tensor, g: int) -> tuple[Tensor, Tensor]:
                assert codec is not None
                st = state_of(i, topo)
                lws = topo.local_world_size
                return codec.reduce(q, p, g, g // lws, lws, st.inter, beta)

            return f

        pgs = process_groups_arg(fn, process_groups, groups)
        out, _ = run(
            grads,
            pgs,
            fn,
            stage1,
            stage3,
            validate,
            codec=codec,
            grad_format=grad_format,
            settings=(beta, period),
            error=error,
        )
        for st in states.values():
            st.steps += 1
        return out


def _check_hyper(err_beta: float, reset_T: int) -> None:
    if not 0.0 <= float(err_beta) <= 1.0:
        raise ValueError(f"qkit.distributed: err_beta must be in [0, 1], got {err_beta}")
    if isinstance(reset_T, bool) or not isinstance(reset_T, int) or reset_T < 0:
        raise ValueError(f"qkit.distributed: reset_T must be a non-negative int (0: never reset), got {reset_T!r}")


_default = LocoReducer()


def all_to_all_loco_quant_reduce(
    params: Sequence[Tensor],
    process_groups: dict[str, Any] | None = None,
    err_beta: float | None = None,
    reset_T: int | None = None,
    *,
    reducer: LocoReducer | None = None,
    validate: Validate = "once",
    groups: Any = UNSET,
    grad_format: str | None = None,
) -> list[Tensor]:
    """LoCo qgZ of ``p.grad`` for each parameter (collective), with error state kept per parameter.

    Args:
        params: tensors with ``.grad`` (float32/float16/bfloat16; the same shapes on every rank).
        process_groups: from :func:`qkit.distributed.hierarchical_groups` (``groups``: its
            deprecated keyword name, with a ``DeprecationWarning``).
        err_beta, reset_T: see :class:`LocoReducer`; ``None`` takes the reducer's (the default
            reducer's are DeepSpeed's defaults, 0.8 and 1024).
        reducer: the state owner; by default a process-wide one (state keyed weakly per parameter).
        validate, grad_format: as for :func:`~qkit.distributed.all_to_all_quant_reduce`.

    Returns:
        As :func:`~qkit.distributed.all_to_all_quant_reduce`: this rank's 1-D slice of each mean.
    """
    pgs = process_groups_arg("all_to_all_loco_quant_reduce", process_groups, groups)
    return (reducer or _default)(
        params, pgs, err_beta=err_beta, reset_T=reset_T, validate=validate, grad_format=grad_format
    )
