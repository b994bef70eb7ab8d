"""qkit.moq.eigenvalue: power iteration on Hessian-vector products against exact eigenvalues."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from qkit.moq.eigenvalue import Eigenvalue, block_eigenvalues, normalize_eigenvalues, power_iteration


def spd(eigenvalues: list[float], seed: int) -> Tensor:
    """A symmetric matrix with the given eigenvalues (random orthogonal basis), float64."""
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


class Quadratic(nn.Module):
    """loss = ½ wᵢ Aᵢ wᵢᵀ per block: the Hessian of block i is exactly Aᵢ."""

    def __init__(self, matrices: list[Tensor]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        self.matrices = matrices
        for i, a in enumerate(matrices):
            block = nn.Module()
            gen = torch.Generator().manual_seed(i)
            block.weight = nn.Parameter(torch.randn(1, a.shape[0], dtype=a.dtype, generator=gen))
            self.blocks.append(block)

    def loss(self) -> Tensor:
        return sum(0.5 * (b.weight @ a @ b.weight.T).squeeze() for b, a in zip(self.blocks, self.matrices, strict=True))


def test_top_eigenvalue_of_a_quadratic_is_exact() -> None:
    a = spd([7.0, 3.0, 1.0, 0.5, -2.0], seed=0)
    model = Quadratic([a])
    w = model.blocks[0].weight
    (g,) = torch.autograd.grad(model.loss(), [w], create_graph=True)
    value, iterations = power_iteration([g], [w], max_iter=500, tol=1e-9, stability=0.0)
    exact = torch.linalg.eigvalsh(a).abs().max().item()
    assert value == pytest.approx(exact, rel=1e-6)
    assert 1 < iterations < 500


def test_loss_scale_is_divided_out() -> None:
    a = spd([5.0, 1.0, 0.5], seed=9)
    model = Quadratic([a])
    w = model.blocks[0].weight
    (g,) = torch.autograd.grad(model.loss() * 1024.0, [w], create_graph=True)
    value, _ = power_iteration([g], [w], max_iter=500, tol=1e-9, stability=0.0, scale=1024.0)
    assert value == pytest.approx(5.0, rel=1e-6)


def test_largest_magnitude_may_be_negative() -> None:
    a = spd([-9.0, 4.0, 1.0], seed=1)
    model = Quadratic([a])
    w = model.blocks[0].weight
    (g,) = torch.autograd.grad(model.loss(), [w], create_graph=True)
    value, _ = power_iteration([g], [w], max_iter=500, tol=1e-9, stability=0.0)
    assert value == pytest.approx(-9.0, rel=1e-6)


def test_blocks_are_normalized_across_the_model() -> None:
    model = Quadratic([spd([8.0, 1.0, 0.5], 2), spd([2.0, 1.0], 3), spd([6.0, 5.0, 0.1, 0.2], 4)])
    blocks = [[b.weight] for b in model.blocks]
    raw = block_eigenvalues(model.loss(), blocks, max_iter=1000, tol=1e-10, stability=0.0)
    assert raw == pytest.approx([8.0, 2.0, 6.0], rel=1e-4)
    assert normalize_eigenvalues(raw) == pytest.approx([1.0, 0.25, 0.75], rel=1e-4)


def test_matches_the_exact_hessian_of_a_small_network() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randint(2, (16,))
    first = net[0].weight

    def loss_of(w: Tensor) -> Tensor:
        h = torch.tanh(x @ w.T + net[0].bias)
        return nn.functional.cross_entropy(net[2](h), y)

    hessian = torch.autograd.functional.hessian(loss_of, first.detach()).reshape(first.numel(), first.numel())
    exact = torch.linalg.eigvalsh(hessian).abs().max().item()
    loss = nn.functional.cross_entropy(net(x), y)
    (raw,) = block_eigenvalues(loss, [[first]], max_iter=2000, tol=1e-12, stability=0.0)
    assert abs(raw) == pytest.approx(exact, rel=1e-5)


def test_normalize_rules() -> None:
    assert normalize_eigenvalues([2.0, -4.0, 1.0]) == [0.5, 1.0, 0.25]
    # zero or non-finite estimates (fp16 overflow, no curvature) get the most conservative schedule
    assert normalize_eigenvalues([0.0, 2.0, math.nan, math.inf]) == [1.0, 1.0, 1.0, 1.0]
    assert normalize_eigenvalues([0.0, 0.0]) == [1.0, 1.0]
    assert normalize_eigenvalues([]) == []


def test_block_without_curvature() -> None:
    w = nn.Parameter(torch.randn(2, 3))
    v = nn.Parameter(torch.randn(2, 3))
    loss = (w * 3.0).sum() + (v**2).sum()  # linear in w: zero Hessian block
    assert block_eigenvalues(loss, [[w], [v]], tol=1e-8) == [0.0, pytest.approx(2.0)]


def test_global_rng_is_untouched() -> None:
    model = Quadratic([spd([3.0, 1.0], 5)])
    state = torch.get_rng_state()
    block_eigenvalues(model.loss(), [[model.blocks[0].weight]])
    assert torch.equal(state, torch.get_rng_state())


CREATE_GRAPH_WARNING = "ignore:Using backward\\(\\) with create_graph=True:UserWarning"


@pytest.mark.filterwarnings(CREATE_GRAPH_WARNING)
def test_deepspeed_eigenvalue_class() -> None:
    model = Quadratic([spd([4.0, 1.0], 6), spd([1.0, 0.5], 7), spd([3.0, 0.1], 8)])
    model.loss().backward(create_graph=True)
    estimator = Eigenvalue(max_iter=500, tol=1e-9, stability=0, layer_name="blocks", layer_num=2)
    got = estimator.compute_eigenvalue(model)
    w0, w1, _ = (b.weight for b in model.blocks)
    assert set(got) == {id(w0), id(w1)}  # the first layer_num blocks only
    assert got[id(w0)] == (pytest.approx(1.0), 0)
    assert got[id(w1)] == (pytest.approx(0.25, rel=1e-5), 1)
    for p in model.parameters():
        p.grad = None
    model.loss().backward()  # no create_graph: no second-order gradients
    assert estimator.compute_eigenvalue(model) == {}
    for p in model.parameters():
        p.grad = None


@pytest.mark.filterwarnings(CREATE_GRAPH_WARNING)
def test_deepspeed_eigenvalue_class_loss_scale() -> None:
    model = Quadratic([spd([4.0, 1.0], 6), spd([2.0, 0.5], 7)])
    (model.loss() * 1024.0).backward(create_graph=True)
    got = Eigenvalue(max_iter=500, tol=1e-9, layer_name="blocks", layer_num=2).compute_eigenvalue(model, scale=1024.0)
    assert got[id(model.blocks[1].weight)][0] == pytest.approx(0.5, rel=1e-5)
    for p in model.parameters():
        p.grad = None  # break the parameter <-> graph cycle


@pytest.mark.parametrize(("name", "num"), [("", 2), ("blocks", 0)])
def test_deepspeed_eigenvalue_class_needs_layers(name: str, num: int) -> None:
    with pytest.raises(ValueError, match="layer_name"):
        Eigenvalue(layer_name=name, layer_num=num)


def test_missing_layer_container_is_named() -> None:
    model = Quadratic([spd([4.0, 1.0], 6)])
    with pytest.raises(ValueError, match="'encoder'"):
        Eigenvalue(layer_name="encoder.layer", layer_num=1).compute_eigenvalue(model)
