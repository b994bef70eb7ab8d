"""``MoQ(model, config)``: Mixture-of-Quantization for any PyTorch model and optimizer.

.. code-block:: python

    moq = MoQ(model, MoQConfig(start_bits=8, target_bits=4, quantize_period=50))
    moq.attach(optimizer)            # quantizes after every optimizer.step()
    for batch in data:
        loss = model(batch).loss; loss.backward(); optimizer.step(); optimizer.zero_grad()
    moq.current_bits()               # {"encoder.0.weight": 4, ...}
    torch.save({"model": model.state_dict(), "opt": optimizer.state_dict(), "moq": moq.state_dict()}, path)

The schedule and the quantized values are those of DeepSpeed's runtime quantizer
(repaired): :class:`MoQ` runs the schedule engine (:mod:`qkit.moq.schedule`) with one
schedule per selected weight, keyed by its parameter name. Its parts:

- :mod:`qkit.moq.selection`: which weights, with which settings; the eigenvalue blocks;
- :mod:`qkit.moq.master`: the master weights (``config.master_weights``, the default);
- :mod:`qkit.moq.state`: the checks of :meth:`MoQ.load_state_dict`;
- this module: the step (an optimizer hook), eigenvalues from a loss closure, logging,
  checkpoints by name.

Each selected weight also carries its schedule as DeepSpeed's attributes (``start_bits``,
``target_bits``, ``q_period``, and ``q_groups``/``q_spec`` from its group), rewritten on
every change, for code that reads them the DeepSpeed way. They are a copy: the engine's
schedules are the ones that count.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from qkit.moq.config import MoQConfig, MoQConfigError
from qkit.moq.eigenvalue import block_eigenvalues, normalize_eigenvalues
from qkit.moq.master import MasterWeights, master_dtype
from qkit.moq.schedule import QuantizerSettings, ScheduleEngine, eigenvalue_factor
from qkit.moq.selection import eigen_blocks, initial_schedule, select_weights
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

    Attributes:
        quantizer: the :class:`qkit.moq.schedule.ScheduleEngine`: step counter ``qsteps``,
            ratio ``quantize_real_ratio``, ``schedules`` by parameter name.
        steps: optimizer steps counted (overflowed ones excluded).
        history: every :class:`BitDrop` so far.

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
        selected = select_weights(model, config)
        if config.eigenvalue.enabled and eigenvalue_loss is None:
            raise MoQConfigError(
                "eigenvalue.enabled",
                "eigenvalue scheduling needs a loss to differentiate twice: pass MoQ(..., eigenvalue_loss=closure)",
            )
        self._params = {w.name: w.param for w in selected}
        self.quantizer = ScheduleEngine(
            QuantizerSettings.from_config(config), {w.name: initial_schedule(config, w.group) for w in selected}
        )
        for name, p in self._params.items():
            self.quantizer.schedules[name].to_attributes(p)  # with q_groups/q_spec, once
        self._masters = MasterWeights(self._params)
        self._blocks = eigen_blocks(model, config, selected) if config.eigenvalue.enabled else []
        self._log_start()

    def _log_start(self) -> None:
        config = self.config
        if not config.enabled:
            logger.warning("MoQ: disabled by its config; the weights will not be quantized")
            return
        logger.info(
            "MoQ: %d weights, %d -> %d bits, first drop after %d quantized steps, offset %d%s",
            len(self._params),
            config.start_bits,
            config.target_bits,
            config.quantize_period,
            config.schedule_offset,
            ", eigenvalue scheduling" if config.eigenvalue.enabled else "",
        )

    # ------------------------------------------------------------ inspection

    @property
    def parameter_names(self) -> list[str]:
        """Names of the scheduled parameters, in model order."""
        return list(self._params)

    @property
    def active(self) -> bool:
        """Whether the weights are being quantized (past ``schedule_offset``)."""
        return self.config.enabled and self.steps > self.config.schedule_offset

    def current_bits(self) -> dict[str, int]:
        """Current width of every scheduled parameter, by name (its start width before
        the first quantized step)."""
        return {name: s.bits for name, s in self.quantizer.schedules.items()}

    def schedules(self) -> dict[str, dict[str, int]]:
        """``{name: {"bits", "target_bits", "next_drop"}}`` (``next_drop``: quantizer step of the next drop)."""
        return {
            name: {"bits": s.bits, "target_bits": s.target_bits, "next_drop": s.next_drop}
            for name, s in self.quantizer.schedules.items()
        }

    def master_weights(self) -> dict[str, Tensor]:
        """The full-precision master of every scheduled weight (the weight itself before
        quantization starts or without ``config.master_weights``), by name."""
        return self._masters.masters()

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
        # deviation: moq-master-weights (for any optimizer, not only DeepSpeed's fp16 one)
        masters = self._masters.load() if self.config.master_weights else {}
        eigenvalues = self._eigenvalues_if_due()
        factors = {name: eigenvalue_factor(value, block) for name, (value, block) in eigenvalues.items()}
        dropped = self.quantizer.step(self._params, factors)
        if self.config.master_weights:
            self._masters.record(masters)
        self._publish(dropped)
        drops = [self._bit_drop(name, eigenvalues.get(name, (None, 0))[0]) for name in dropped]
        for drop in drops:
            self._report(drop)
        self.history.extend(drops)
        return drops

    def _eigenvalues_if_due(self) -> dict[str, tuple[float, int]]:
        """``{name: (eigenvalue, block)}`` when eigenvalue scheduling is on, this step is on
        its resolution and some weight drops a bit now; else empty."""
        eig = self.config.eigenvalue
        if not (eig.enabled and self.steps % eig.gas_boundary_resolution == 0 and self.quantizer.any_drop_next()):
            return {}
        by_id = self.compute_eigenvalues()
        return {name: by_id[id(p)] for name, p in self._params.items() if id(p) in by_id}

    def _publish(self, names: list[str]) -> None:
        """Copy the schedules of ``names`` onto their parameters as DeepSpeed's attributes."""
        for name in names:
            self.quantizer.schedules[name].to_attributes(self._params[name], widths_only=True)

    def _bit_drop(self, name: str, eigenvalue: float | None) -> BitDrop:
        s = self.quantizer.schedules[name]
        return BitDrop(
            step=self.steps,
            name=name,
            old_bits=s.bits + 1,
            new_bits=s.bits,
            next_drop=None if s.bits == s.target_bits else s.next_drop,
            eigenvalue=eigenvalue,
        )

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
        scheduled = {id(p) for p in self._params.values()}
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
        engine = self.quantizer
        residuals = self._masters.residuals
        return {
            "format": STATE_FORMAT,
            "steps": self.steps,
            "qsteps": engine.qsteps,
            "quantize_real_ratio": engine.quantize_real_ratio,
            "params": {name: s.checkpoint() for name, s in engine.schedules.items()},
            "history": [asdict(d) for d in self.history],
            "residuals": {name: None if r is None else r.clone() for name, r in residuals.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: the scheduled parameter names must match exactly.

        The whole state is checked first (:func:`qkit.moq.state.parse_moq_state`: names,
        schedules within reach of this MoQ's quantizer, residual shapes and dtypes against
        the parameters, counters, ratio, history) and only then applied, so a bad state
        raises :class:`qkit.moq.state.MoQStateError` (a ``ValueError``) naming the key
        and leaves this object as it was.
        """
        engine = self.quantizer
        params = [
            ScheduledParam(
                name=name,
                shape=p.shape,
                master_dtype=master_dtype(p.dtype),
                device=p.device,
                kernel=self.config.use_quantizer_kernel,
                scheme=engine.schedules[name].scheme is not None,
            )
            for name, p in self._params.items()
        ]
        settings = engine.settings
        parsed = parse_moq_state(state, params, symmetric=settings.symmetric, stochastic=settings.stochastic)
        # Nothing below can fail: plain assignments of checked values.
        self.steps = parsed.steps
        engine.qsteps = parsed.qsteps
        engine.quantize_real_ratio = parsed.quantize_real_ratio
        for name in self._params:
            engine.schedules[name] = engine.schedules[name].restored(parsed.schedules[name])
        self._publish(list(self._params))
        self._masters.residuals = dict(parsed.residuals)
        self.history = [BitDrop(**d) for d in parsed.history]
