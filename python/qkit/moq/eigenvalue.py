"""Top Hessian eigenvalue per block, by power iteration on Hessian-vector products.

MoQ's eigenvalue schedule slows the bit descent of sensitive blocks: each block's
largest-magnitude Hessian eigenvalue (of the loss, with respect to that block's
parameters only: a diagonal block of the Hessian) is estimated, the values are
normalized to [0, 1] across blocks (:func:`normalize_eigenvalues`), and a block's next
period is multiplied by ``1 + floor(4·eig)``.

Hessian-vector products use double backward: with ``g = d loss / d θ`` built with
``create_graph=True``, ``H v = d (g · v) / d θ``. Any loss that is twice
differentiable in the block's parameters works; a block whose gradient does not depend
on its parameters (zero curvature) gets eigenvalue 0.

:class:`Eigenvalue` is DeepSpeed's class of the same name (``deepspeed.runtime.eigenvalue``)
with its constructor and ``compute_eigenvalue(module, device, scale)``, reading gradients
left by ``loss.backward(create_graph=True)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

logger = logging.getLogger("qkit.moq")

__all__ = ["Eigenvalue", "block_eigenvalues", "normalize_eigenvalues", "power_iteration"]


def _inner(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    return sum((torch.sum(x * y) for x, y in zip(xs, ys, strict=True)), torch.zeros(()))


def _normalize(vs: Sequence[Tensor], stability: float) -> list[Tensor]:
    norm = _inner(vs, vs).sqrt().item() + stability
    # An all-zero vector over a zero stability term would be 0/0: keep zeros instead.
    return [torch.nan_to_num(v / norm, nan=0.0, posinf=0.0, neginf=0.0) for v in vs]


def power_iteration(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    max_iter: int = 100,
    tol: float = 1e-2,
    stability: float = 1e-6,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[float, int]:
    """Largest-magnitude eigenvalue of the Hessian block ``d grads / d params``.

    Args:
        grads: ``d loss / d p`` for each ``p`` in ``params``, built with
            ``create_graph=True`` (each requires grad).
        params: the block's parameters.
        max_iter: iteration limit.
        tol: stop once ``|(λ_k - λ_{k-1}) / λ_k| < tol``.
        stability: added to the vector norm before dividing.
        scale: the loss was multiplied by this (fp16 loss scaling); the result is divided by it.
        generator: CPU generator for the random start vector (default: a fresh one seeded 0),
            so torch's global RNG is never touched.

    Returns:
        ``(eigenvalue, iterations)``; the eigenvalue is a Python float (0.0 if the
        Hessian-vector product vanishes).
    """
    if generator is None:
        # deviation: moq-eigenvalue-generator (DeepSpeed drew from the global generator)
        generator = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device) for p in params]
    v = _normalize(v, stability)
    eigenvalue, previous = 1.0, 0.0
    iterations = 0
    while iterations < max_iter and eigenvalue != 0 and abs((eigenvalue - previous) / eigenvalue) >= tol:
        previous = eigenvalue
        hv = torch.autograd.grad(
            grads, params, grad_outputs=[x.to(g.dtype) for x, g in zip(v, grads, strict=True)], retain_graph=True
        )
        hv = [torch.nan_to_num(h, nan=0.0, posinf=0.0, neginf=0.0).float() for h in hv]
        eigenvalue = _inner(hv, v).item() / scale
        v = _normalize(hv, stability)
        iterations += 1
    return eigenvalue, iterations


def normalize_eigenvalues(values: Sequence[float]) -> list[float]:
    """Map raw block eigenvalues to [0, 1]: ``|v| / max|v|``.

    A block whose estimate is 0 or not finite (fp16 overflow, no curvature path)
    gets 1.0, the most conservative schedule (DeepSpeed's rule).
    """
    finite = [abs(v) for v in values if math.isfinite(v) and v != 0]
    top = max(finite, default=0.0)
    return [abs(v) / top if (math.isfinite(v) and v != 0) else 1.0 for v in values]


def block_eigenvalues(
    loss: Tensor,
    blocks: Sequence[Sequence[Tensor]],
    *,
    max_iter: int = 100,
    tol: float = 1e-2,
    stability: float = 1e-6,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Raw top eigenvalue of each block's diagonal Hessian block of ``loss``.

    Args:
        loss: a scalar with a graph to every block's parameters.
        blocks: lists of parameters; a parameter that ``loss`` does not reach is left out.
        max_iter, tol, stability, scale, generator: as in :func:`power_iteration`.

    Returns:
        One float per block (0.0 where the block has no curvature path).
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    flat = list(dict.fromkeys(p for block in blocks for p in block if p.requires_grad))
    grads = torch.autograd.grad(loss, flat, create_graph=True, allow_unused=True)
    grad_of = {id(p): g for p, g in zip(flat, grads, strict=True)}
    values = []
    for block in blocks:
        pairs = [(p, grad_of.get(id(p))) for p in block]
        pairs = [(p, g) for p, g in pairs if g is not None and g.requires_grad]
        if not pairs:
            values.append(0.0)
            continue
        value, _ = power_iteration(
            [g for _, g in pairs],
            [p for p, _ in pairs],
            max_iter=max_iter,
            tol=tol,
            stability=stability,
            scale=scale,
            generator=generator,
        )
        values.append(value)
    return values


class Eigenvalue:
    """DeepSpeed's per-block eigenvalue estimator (``deepspeed.runtime.eigenvalue.Eigenvalue``).

    Args:
        verbose: log each block's eigenvalue.
        max_iter, tol, stability: power-iteration settings.
        gas_boundary_resolution: kept for DeepSpeed's engine (compute every N steps).
        layer_name: dotted path from the model to its container of blocks.
        layer_num: how many blocks of that container (> 0).
    """

    def __init__(
        self,
        verbose: bool = False,
        max_iter: int = 100,
        tol: float = 1e-2,
        stability: float = 0,
        gas_boundary_resolution: int = 1,
        layer_name: str = "",
        layer_num: int = 0,
    ) -> None:
        if not layer_name or layer_num <= 0:
            raise ValueError(
                f"Eigenvalue: `layer_name` must name the block container and `layer_num` be > 0, "
                f"got {layer_name!r} and {layer_num}"
            )
        self.verbose = verbose
        self.max_iter = max_iter
        self.tol = tol
        self.stability = stability
        self.gas_boundary_resolution = gas_boundary_resolution
        self.layer_name = layer_name
        self.layer_num = layer_num

    def get_layers(self, module: nn.Module) -> nn.Module:
        """The container at ``layer_name`` under ``module``."""
        return resolve_module(module, self.layer_name)

    def compute_eigenvalue(
        self, module: nn.Module, device: torch.device | str | None = None, scale: float = 1.0
    ) -> dict[int, tuple[float, int]]:
        """Normalized eigenvalue of each block, from gradients built by ``backward(create_graph=True)``.

        Args:
            module: the model.
            device: unused (vectors follow their parameters); kept for DeepSpeed's signature.
            scale: the loss scale the gradients carry.

        Returns:
            ``{id(param): (eigenvalue in [0, 1], block index)}`` for every parameter of
            the first ``layer_num`` blocks, or ``{}`` when the gradients have no graph
            (the model does not support second-order gradients).
        """
        del device
        layers = self.get_layers(module)
        generator = torch.Generator().manual_seed(0)
        values: list[float] = []
        keys: list[list[int]] = []
        for block in range(self.layer_num):
            params = list(layers[block].parameters())
            keys.append([id(p) for p in params])
            pairs = [(p, p.grad) for p in params if p.grad is not None and p.grad.grad_fn is not None]
            if not pairs:
                logger.warning("Eigenvalue: block %d has no second-order gradients (create_graph=True?)", block)
                return {}
            value, iterations = power_iteration(
                [g for _, g in pairs],
                [p for p, _ in pairs],
                max_iter=self.max_iter,
                tol=self.tol,
                stability=self.stability,
                scale=scale,
                generator=generator,
            )
            values.append(value)
            if self.verbose:
                logger.info("Eigenvalue: block %d, %d power iterations, eigenvalue %g", block, iterations, value)
        normalized = normalize_eigenvalues(values)
        if self.verbose:
            logger.info("Eigenvalue: normalized %s", normalized)
        pairs = enumerate(zip(keys, normalized, strict=True))
        return {key: (value, i) for i, (block_keys, value) in pairs for key in block_keys}


def resolve_module(root: nn.Module, dotted: str) -> nn.Module:
    """The submodule at ``dotted`` (``"encoder.layer"``), with an error naming the missing part."""
    module = root
    for part in dotted.split("."):
        child = getattr(module, part, None)
        if not isinstance(child, nn.Module):
            raise ValueError(f"eigenvalue.layer_name: {dotted!r} not found in the model (no module {part!r})")
        module = child
    return module
