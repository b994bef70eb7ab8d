"""``MoQ(model, config)``: Mixture-of-Quantization for any PyTorch model and optimizer.

.. code-block:: python

    moq = MoQ(model, MoQConfig(start_bits=8, target_bits=4, quantize_period=50))
    moq.attach(optimizer)            # quantizes after every optimizer.step()
    for batch in data:
        loss = model(batch).loss; loss.backward(); optimizer.step(); optimizer.zero_grad()
    moq.current_bits()               # {"encoder.0.weight": 4, ...}
    torch.save({"model": model.state_dict(), "opt": optimizer.state_dict(), "moq": moq.state_dict()}, path)

The schedule and the quantized values are those of :class:`qkit.moq.Quantizer`
(DeepSpeed's runtime quantizer, repaired), which this class drives with the selected
weights; what it adds is selection by module name, per-pattern settings, an optimizer
hook, eigenvalue blocks computed from a loss closure, logging and checkpoints by name.

Master weights. DeepSpeed's MoQ only ran under its fp16 optimizer, which steps an fp32
master copy and copies it into the fp16 model before MoQ quantizes the model: the
quantized weights never feed back into the optimizer (a straight-through estimator).
With ``config.master_weights`` (the default) this class does the same for any optimizer:
it keeps each selected weight's residual ``master - quantized`` (fp32, or the weight's
dtype if wider), so after an optimizer step ``master = weight + residual``; the master
is quantized into the weight and the residual updated. The optimizer sees and updates
the quantized weight; its update carries over to the master exactly for any optimizer
whose update does not read the weight's value (weight decay acts on the quantized value).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from qkit.moq.config import GroupConfig, MoQConfig, MoQConfigError, pattern_matches
from qkit.moq.eigenvalue import block_eigenvalues, normalize_eigenvalues, resolve_module
from qkit.moq.quantizer import Quantizer
from qkit.moq.state import STATE_FORMAT, ScheduledParam, parse_moq_state

logger = logging.getLogger("qkit.moq")

__all__ = ["BitDrop", "MoQ"]


class ScalarWriter(Protocol):
    """What MoQ needs of a TensorBoard ``SummaryWriter``."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> Any: ...


@dataclass(frozen=True)
class BitDrop:
    """One parameter losing one bit.

    Attributes:
        step: the optimizer step (counted by :meth:`MoQ.step`) it happened on.
        name: the parameter's name in the model.
        old_bits, new_bits: its width before and after.
        next_drop: the quantizer step (``step - schedule_offset``) of its next drop,
            or ``None`` once it reached its target.
        eigenvalue: its block's normalized eigenvalue, if one was used.
    """

    step: int
    name: str
    old_bits: int
    new_bits: int
    next_drop: int | None
    eigenvalue: float | None


@dataclass
class _Entry:
    name: str
    module_name: str
    param: nn.Parameter
    group: GroupConfig | None
    residual: Tensor | None = None  # master - quantized, once quantization has started


class MoQ:
    """Mixture-of-Quantization over a model's weights.

    Args:
        model: the model; every parameter with more than one dimension whose module
            name passes ``config.include``/``config.exclude`` is scheduled.
        config: a :class:`MoQConfig`, or a DeepSpeed config (dict or JSON path) read
            with :meth:`MoQConfig.from_deepspeed`; default ``MoQConfig()``.
        eigenvalue_loss: with eigenvalue scheduling, a closure returning a loss
            (scalar, with a graph to the parameters) on which block eigenvalues are
            computed when a bit drop is due; it is called with grad enabled, after the
            optimizer step, before the weights are quantized.
        writer: optional TensorBoard-like writer (``add_scalar``); every bit drop and
            eigenvalue is written to it under ``moq/``.

    Raises:
        MoQConfigError: the config selects no weight, a weight matches two groups, a
            group count does not divide a weight, or eigenvalue scheduling is on
            without ``eigenvalue_loss``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: MoQConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        *,
        eigenvalue_loss: Callable[[], Tensor] | None = None,
        writer: ScalarWriter | None = None,
    ) -> None:
        if config is None:
            config = MoQConfig()
        elif not isinstance(config, MoQConfig):
            config = MoQConfig.from_deepspeed(config)
        self.model = model
        self.config = config
        self.eigenvalue_loss = eigenvalue_loss
        self.writer = writer
        self.steps = 0
        self.history: list[BitDrop] = []
        self._hook: Any = None
        self._entries = self._select(model, config)
        if config.eigenvalue.enabled and eigenvalue_loss is None:
            raise MoQConfigError(
                "eigenvalue.enabled",
                "eigenvalue scheduling needs a loss to differentiate twice: pass MoQ(..., eigenvalue_loss=closure)",
            )
        self.quantizer = Quantizer(
            q_groups=config.groups,
            q_mixed_fp16=config.fp16_mixed_quantize,
            q_change_ratio=config.quantize_change_ratio,
            q_type="symmetric" if config.symmetric else "asymmetric",
            q_rounding=config.rounding,
            q_verbose=False,  # MoQ logs drops itself, by name
            q_eigenvalue=config.eigenvalue.enabled,
            use_quantizer_kernel=config.use_quantizer_kernel,
            layer_num=config.eigenvalue.layer_num,
        )
        for entry in self._entries:
            self._init_schedule(entry)
        self._blocks = self._eigen_blocks() if config.eigenvalue.enabled else []
        if not config.enabled:
            logger.warning("MoQ: disabled by its config; the weights will not be quantized")
        else:
            logger.info(
                "MoQ: %d weights, %d -> %d bits, first drop after %d quantized steps, offset %d%s",
                len(self._entries),
                config.start_bits,
                config.target_bits,
                config.quantize_period,
                config.schedule_offset,
                ", eigenvalue scheduling" if config.eigenvalue.enabled else "",
            )

    # ------------------------------------------------------------ selection

    @staticmethod
    def _select(model: nn.Module, config: MoQConfig) -> list[_Entry]:
        entries = []
        for name, param in model.named_parameters():
            if param.dim() <= 1:
                continue
            module_name = name.rpartition(".")[0]
            if config.include and not any(pattern_matches(p, module_name) for p in config.include):
                continue
            if any(pattern_matches(p, module_name) for p in config.exclude):
                continue
            matches = [g for g in config.different_groups if any(pattern_matches(p, module_name) for p in g.modules)]
            if len(matches) > 1:
                raise MoQConfigError(
                    f"different_groups.{matches[1].name}",
                    f"and `different_groups.{matches[0].name}` both match module {module_name!r}; "
                    "a weight may belong to one group only",
                )
            entries.append(_Entry(name, module_name, param, matches[0] if matches else None))
        if config.enabled and not entries:
            raise MoQConfigError(
                "include",
                "selects no weight of the model (only parameters with more than one dimension are quantized); "
                "check `include`/`exclude`/`different_groups.*.modules` against model.named_modules()",
            )
        used = {e.group.name for e in entries if e.group is not None}
        for g in config.different_groups:
            if g.name not in used:
                warnings.warn(f"MoQ: `different_groups.{g.name}` matches no weight of the model", stacklevel=3)
        for e in entries:
            groups = config.groups if e.group is None or e.group.groups is None else e.group.groups
            scheme = None if e.group is None else e.group.scheme
            key = "groups" if e.group is None or e.group.groups is None else f"different_groups.{e.group.name}.groups"
            if scheme is not None:
                try:
                    scheme.check_shape(e.param.shape)
                except ValueError as exc:
                    raise MoQConfigError(f"different_groups.{e.group.name}.scheme", f"{e.name}: {exc}") from None
            elif e.param.numel() % groups != 0:
                raise MoQConfigError(
                    key, f"({groups}) must divide the number of elements of {e.name!r} ({e.param.numel()})"
                )
        return entries

    def _init_schedule(self, entry: _Entry) -> None:
        start, target = self.config.bits_of(entry.group)
        period = self.config.quantize_period
        if entry.group is not None and entry.group.quantize_period is not None:
            period = entry.group.quantize_period
        p = entry.param
        p.start_bits, p.target_bits, p.q_period = start, target, period
        if entry.group is not None and entry.group.groups is not None:
            p.q_groups = entry.group.groups
        if entry.group is not None and entry.group.scheme is not None:
            p.q_spec = entry.group.scheme

    def _eigen_blocks(self) -> list[list[nn.Parameter]]:
        eig = self.config.eigenvalue
        if eig.layer_name is None:
            by_module: dict[str, list[nn.Parameter]] = {}
            for e in self._entries:
                by_module.setdefault(e.module_name, []).append(e.param)
            return list(by_module.values())
        container = resolve_module(self.model, eig.layer_name)
        layers = list(container.children())
        count = eig.layer_num or len(layers)
        if count > len(layers):
            raise MoQConfigError(
                "eigenvalue.layer_num", f"is {count} but {eig.layer_name!r} holds only {len(layers)} blocks"
            )
        return [[p for p in layer.parameters() if p.requires_grad] for layer in layers[:count]]

    # ------------------------------------------------------------ inspection

    @property
    def parameter_names(self) -> list[str]:
        """Names of the scheduled parameters, in model order."""
        return [e.name for e in self._entries]

    @property
    def active(self) -> bool:
        """Whether the weights are being quantized (past ``schedule_offset``)."""
        return self.config.enabled and self.steps > self.config.schedule_offset

    def current_bits(self) -> dict[str, int]:
        """Current width of every scheduled parameter, by name (its start width before
        the first quantized step)."""
        return {e.name: int(e.param.start_bits) for e in self._entries}

    def schedules(self) -> dict[str, dict[str, int]]:
        """``{name: {"bits", "target_bits", "next_drop"}}`` (``next_drop``: quantizer step of the next drop)."""
        return {
            e.name: {
                "bits": int(e.param.start_bits),
                "target_bits": int(e.param.target_bits),
                "next_drop": int(e.param.q_period),
            }
            for e in self._entries
        }

    # ------------------------------------------------------------ stepping

    def attach(self, optimizer: torch.optim.Optimizer) -> MoQ:
        """Run :meth:`step` after every ``optimizer.step()`` (a step post-hook).

        Steps that ``torch.amp.GradScaler`` skips (inf/NaN gradients) never call the
        optimizer, so they are not counted. Returns ``self``.
        """
        self.detach()
        self._hook = optimizer.register_step_post_hook(lambda *_: self.step())
        return self

    def detach(self) -> None:
        """Remove the hook installed by :meth:`attach`."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def step(self, overflow: bool = False) -> list[BitDrop]:
        """One MoQ step, after an optimizer step: advance the schedules and quantize.

        Args:
            overflow: the optimizer step overflowed (fp16 loss scaling) and did not
                update the weights: nothing is counted or quantized.

        Returns:
            The bit drops of this step.
        """
        if not self.config.enabled or overflow:
            return []
        # deviation: moq-schedule-offset-zero (no extra quantize before the first optimizer step)
        self.steps += 1
        if self.steps <= self.config.schedule_offset:
            return []
        params = [e.param for e in self._entries]
        before = [int(p.start_bits) for p in params]
        # deviation: moq-master-weights (for any optimizer, not only DeepSpeed's fp16 one)
        masters = self._load_masters() if self.config.master_weights else []
        eig_cfg = self.config.eigenvalue
        block_eigenvalue: dict[int, tuple[float, int]] = {}
        if (
            eig_cfg.enabled
            and self.steps % eig_cfg.gas_boundary_resolution == 0
            and self.quantizer.any_precision_switch([params])
        ):
            block_eigenvalue = self.compute_eigenvalues()
        self.quantizer.quantize([params], False, eig_cfg.enabled, block_eigenvalue)
        if self.config.master_weights:
            for entry, master in zip(self._entries, masters, strict=True):
                entry.residual = master - entry.param.detach().to(master.dtype)
        drops = []
        for entry, old in zip(self._entries, before, strict=True):
            p = entry.param
            if p.start_bits == old:
                continue
            eigenvalue = block_eigenvalue.get(id(p), (None, 0))[0]
            drop = BitDrop(
                step=self.steps,
                name=entry.name,
                old_bits=old,
                new_bits=int(p.start_bits),
                next_drop=None if p.start_bits == p.target_bits else int(p.q_period),
                eigenvalue=eigenvalue,
            )
            drops.append(drop)
            self._report(drop)
        self.history.extend(drops)
        return drops

    def _load_masters(self) -> list[Tensor]:
        """Put every master weight (weight + residual) into its parameter; return the masters."""
        masters = []
        with torch.no_grad():
            for e in self._entries:
                p = e.param
                master = p.detach().to(_master_dtype(p.dtype), copy=True)
                if e.residual is not None:
                    master += e.residual
                p.copy_(master)  # rounds to the weight's dtype, as DeepSpeed's fp32 -> fp16 copy did
                masters.append(master)
        return masters

    def master_weights(self) -> dict[str, Tensor]:
        """The full-precision master of every scheduled weight (the weight itself before
        quantization starts or without ``config.master_weights``), by name."""
        out = {}
        for e in self._entries:
            w = e.param.detach().to(_master_dtype(e.param.dtype), copy=True)
            out[e.name] = w if e.residual is None else w + e.residual
        return out

    def _report(self, drop: BitDrop) -> None:
        eig = "" if drop.eigenvalue is None else f", eigenvalue {drop.eigenvalue:.3f}"
        nxt = "target reached" if drop.next_drop is None else f"next drop at quantized step {drop.next_drop}"
        logger.info(
            "MoQ step %d: %s %d -> %d bits (%s%s)", drop.step, drop.name, drop.old_bits, drop.new_bits, nxt, eig
        )
        if self.writer is not None:
            self.writer.add_scalar(f"moq/bits/{drop.name}", drop.new_bits, drop.step)

    def compute_eigenvalues(self) -> dict[int, tuple[float, int]]:
        """Normalized top Hessian eigenvalue of every block, on ``eigenvalue_loss()``.

        Returns:
            ``{id(param): (eigenvalue in [0, 1], block index)}`` for the scheduled
            parameters in the blocks.
        """
        if self.eigenvalue_loss is None:
            raise RuntimeError("MoQ.compute_eigenvalues: no `eigenvalue_loss` closure was given")
        eig = self.config.eigenvalue
        # Seeded by step: the same start vectors whether or not the run was resumed.
        generator = torch.Generator().manual_seed(eig.seed * 1_000_003 + self.steps)
        with torch.enable_grad():
            loss = self.eigenvalue_loss()
            raw = block_eigenvalues(
                loss, self._blocks, max_iter=eig.max_iter, tol=eig.tol, stability=eig.stability, generator=generator
            )
        normalized = normalize_eigenvalues(raw)
        if eig.verbose or self.config.verbose:
            logger.info("MoQ step %d: block eigenvalues %s, normalized %s", self.steps, raw, normalized)
        if self.writer is not None:
            for i, value in enumerate(normalized):
                self.writer.add_scalar(f"moq/eigenvalue/block{i}", value, self.steps)
        scheduled = {id(e.param) for e in self._entries}
        return {
            id(p): (value, i)
            for i, (block, value) in enumerate(zip(self._blocks, normalized, strict=True))
            for p in block
            if id(p) in scheduled
        }

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, parameter schedules by name.

        Save it next to the model's and optimizer's state (and torch's RNG state if
        rounding is stochastic).
        """
        return {
            "format": STATE_FORMAT,
            "steps": self.steps,
            "qsteps": self.quantizer.qsteps,
            "quantize_real_ratio": self.quantizer.quantize_real_ratio,
            "params": {
                e.name: {
                    "start_bits": int(e.param.start_bits),
                    "target_bits": int(e.param.target_bits),
                    "q_period": int(e.param.q_period),
                }
                for e in self._entries
            },
            "history": [asdict(d) for d in self.history],
            "residuals": {e.name: None if e.residual is None else e.residual.clone() for e in self._entries},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: the scheduled parameter names must match exactly.

        The whole state is checked first (:func:`qkit.moq.state.parse_moq_state`: names,
        schedules within reach of this MoQ's quantizer, residual shapes and dtypes against
        the parameters, counters, ratio, history) and only then applied, so a bad state
        raises :class:`qkit.moq.state.MoQStateError` (a ``ValueError``) naming the key
        and leaves this object as it was.
        """
        params = [
            ScheduledParam(
                name=e.name,
                shape=e.param.shape,
                master_dtype=_master_dtype(e.param.dtype),
                device=e.param.device,
                kernel=self.config.use_quantizer_kernel,
                scheme=getattr(e.param, "q_spec", None) is not None,
            )
            for e in self._entries
        ]
        parsed = parse_moq_state(
            state, params, symmetric=self.quantizer.symmetric, stochastic=self.quantizer.stochastic
        )
        # Nothing below can fail: plain assignments of checked values.
        self.steps = parsed.steps
        self.quantizer.qsteps = parsed.qsteps
        self.quantizer.quantize_real_ratio = parsed.quantize_real_ratio
        for e in self._entries:
            sched = parsed.schedules[e.name]
            e.param.start_bits = sched["start_bits"]
            e.param.target_bits = sched["target_bits"]
            e.param.q_period = sched["q_period"]
            e.residual = parsed.residuals[e.name]
        self.history = [BitDrop(**d) for d in parsed.history]


def _master_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 masters for fp16/bf16 weights (DeepSpeed's), the weight's own dtype when wider.
    return torch.promote_types(dtype, torch.float32)
