"""qkit.moq.MoQ: selection, per-pattern settings, the optimizer hook, eigenvalue scheduling,
master weights, logging and checkpoints (a resumed run continues bit for bit)."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from torch import Tensor, nn

import qkit
from qkit.moq import EigenvalueConfig, GroupConfig, MoQ, MoQConfig, MoQConfigError, quantize_highbit


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "encoder": nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 6)),
            "head": nn.Linear(6, 2),
            "emb": nn.Embedding(5, 4),
        }
    )


ALL = ["encoder.0.weight", "encoder.2.weight", "head.weight", "emb.weight"]


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize(
    ("include", "exclude", "names"),
    [
        ((), (), ALL),
        (("*",), (), ALL),
        (("encoder",), (), ALL[:2]),
        ((r"encoder\.2", "head"), (), ALL[1:3]),
        ((), ("head", "emb"), ALL[:2]),
        (("encoder",), (r"\.0$",), ALL[1:2]),
    ],
)
def test_selection_by_module_name(include: tuple, exclude: tuple, names: list[str]) -> None:
    moq = MoQ(small_model(), MoQConfig(include=include, exclude=exclude))
    assert moq.parameter_names == names  # >= 2-D only: no biases, no LayerNorm weight


def test_per_group_settings() -> None:
    model = small_model()
    cfg = MoQConfig(
        start_bits=8,
        target_bits=6,
        quantize_period=10,
        different_groups=(GroupConfig("enc", ("encoder",), start_bits=7, target_bits=3, quantize_period=4, groups=2),),
    )
    MoQ(model, cfg)
    enc, head = model["encoder"][2].weight, model["head"].weight
    assert (enc.start_bits, enc.target_bits, enc.q_period, enc.q_groups) == (7, 3, 4, 2)
    assert (head.start_bits, head.target_bits, head.q_period) == (8, 6, 10)
    assert not hasattr(head, "q_groups")


def test_selection_errors() -> None:
    with pytest.raises(MoQConfigError) as info:
        MoQ(small_model(), MoQConfig(include=("decoder",)))
    assert info.value.key == "include"
    two = (GroupConfig("a", ("encoder",)), GroupConfig("b", (r"\.2$",)))
    with pytest.raises(MoQConfigError) as info:
        MoQ(small_model(), MoQConfig(different_groups=two))
    assert info.value.key == "different_groups.b" and "'encoder.2'" in str(info.value)
    with pytest.raises(MoQConfigError) as info:
        MoQ(small_model(), MoQConfig(groups=7))
    assert info.value.key == "groups" and "encoder.0.weight" in str(info.value)
    bad_group = (GroupConfig("h", ("head",), groups=5),)
    with pytest.raises(MoQConfigError) as info:
        MoQ(small_model(), MoQConfig(different_groups=bad_group))
    assert info.value.key == "different_groups.h.groups"
    with pytest.warns(UserWarning, match="different_groups.x"):
        MoQ(small_model(), MoQConfig(different_groups=(GroupConfig("x", ("decoder",)),)))
    spec = qkit.QuantSpec(bits=4, group_size=4)
    with pytest.raises(MoQConfigError) as info:
        MoQ(small_model(), MoQConfig(different_groups=(GroupConfig("s", ("encoder",), scheme=spec),)))
    assert info.value.key == "different_groups.s.scheme"  # 6 is no multiple of 4


def test_tied_weights_are_scheduled_once() -> None:
    model = nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 6, bias=False))
    model[1].weight = model[0].weight  # tied
    assert MoQ(model, MoQConfig()).parameter_names == ["0.weight"]


def test_deepspeed_config_accepted_directly() -> None:
    ds = {"quantize_training": {"enabled": True, "quantize_bits": {"start_bits": 9, "target_bits": 5}}}
    moq = MoQ(small_model(), ds)
    assert moq.config.start_bits == 9 and set(moq.current_bits().values()) == {9}


# ---------------------------------------------------------------- the schedule through the front


def test_offset_and_period_table() -> None:
    model = nn.Linear(4, 3)
    w0 = model.weight.detach().clone()
    moq = MoQ(model, MoQConfig(start_bits=8, target_bits=5, quantize_period=2, schedule_offset=3))
    bits, active = [], []
    for _ in range(12):
        moq.step()
        bits.append(moq.current_bits()["weight"])
        active.append(moq.active)
        if len(bits) == 3:
            assert torch.equal(model.weight.detach(), w0)  # the offset steps leave weights alone
    # quantized steps q = step - 3; drops when q reaches 2, 4, 8
    assert bits == [8, 8, 8, 8, 7, 7, 6, 6, 6, 6, 5, 5]
    assert active == [False] * 3 + [True] * 9
    assert [(d.step, d.old_bits, d.new_bits, d.next_drop) for d in moq.history] == [
        (5, 8, 7, 4),
        (7, 7, 6, 8),
        (11, 6, 5, None),
    ]
    assert torch.equal(model.weight.detach(), quantize_highbit(w0, 5, 1, True, False))  # master weights unchanged


def test_overflow_and_disabled() -> None:
    model = nn.Linear(4, 3)
    w0 = model.weight.detach().clone()
    moq = MoQ(model, MoQConfig(start_bits=4, target_bits=4))
    assert moq.step(overflow=True) == [] and moq.steps == 0
    assert torch.equal(model.weight.detach(), w0)
    off = MoQ(model, MoQConfig(enabled=False))
    off.step()
    assert off.steps == 0 and torch.equal(model.weight.detach(), w0)


def test_attach_and_detach() -> None:
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    moq = MoQ(model, MoQConfig(start_bits=6, target_bits=4, quantize_period=1)).attach(opt)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.step()
    assert moq.steps == 2 and moq.current_bits() == {"weight": 4}  # drops at quantized steps 1 and 2
    moq.detach()
    opt.step()
    assert moq.steps == 2


def test_scheme_group_uses_the_quantspec() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 4))
    w0 = model[0].weight.detach().clone()
    spec = qkit.QuantSpec(bits=4, symmetric=False, group_size=4)
    cfg = MoQConfig(start_bits=4, target_bits=4, different_groups=(GroupConfig("first", (r"^0$",), scheme=spec),))
    MoQ(model, cfg).step()
    assert torch.equal(model[0].weight.detach(), spec.fake_quantize(w0))


# ---------------------------------------------------------------- master weights


def _constant_gradient_run(master_weights: bool, steps: int) -> tuple[Tensor, Tensor, MoQ]:
    model = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -0.7, 0.31, 0.05], [-0.2, 0.55, 0.9, -1.0]]))
    w0 = model.weight.detach().clone()
    c = torch.tensor([[0.5, -1.0, 0.25, 1.0], [1.0, 0.5, -0.5, 0.125]])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    moq = MoQ(model, MoQConfig(start_bits=3, target_bits=3, master_weights=master_weights)).attach(opt)
    for _ in range(steps):
        opt.zero_grad()
        (model.weight * c).sum().backward()  # d loss / d w = c
        opt.step()
    return w0 - steps * 0.01 * c, model.weight.detach().clone(), moq


def test_master_weights_accumulate_small_updates() -> None:
    expected_master, weight, moq = _constant_gradient_run(True, 12)
    master = moq.master_weights()["weight"]
    torch.testing.assert_close(master, expected_master, rtol=0, atol=1e-6)
    assert torch.equal(weight, quantize_highbit(master, 3, 1, True, False))


def _codes(w: Tensor) -> Tensor:
    return torch.round(w / (2 * w.abs().max() / 8))  # 3-bit symmetric, one group


def test_without_master_weights_small_updates_are_rounded_away() -> None:
    # 3 bits, max|w| ~ 1: a step of 0.25; SGD moves each weight by at most 0.01 per step, so
    # in place every update is rounded back (only the scale drifts with the largest weight).
    _, after_1, _ = _constant_gradient_run(False, 1)
    _, after_12, _ = _constant_gradient_run(False, 12)
    assert torch.equal(_codes(after_1), _codes(after_12))
    _, master_12, _ = _constant_gradient_run(True, 12)
    assert not torch.equal(_codes(after_1), _codes(master_12))


# ---------------------------------------------------------------- eigenvalue scheduling


class TwoQuadratics(nn.Module):
    """loss = ½ a Aaᵀ + ½ b Bbᵀ: Hessian blocks A (top eigenvalue 10) and B (4)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 1, bias=False)
        self.b = nn.Linear(3, 1, bias=False)
        self.A = torch.diag(torch.tensor([10.0, 2.0, 1.0]))
        self.B = torch.diag(torch.tensor([4.0, 3.0, 0.5]))

    def loss(self) -> Tensor:
        wa, wb = self.a.weight, self.b.weight
        return 0.5 * (wa @ self.A @ wa.T).sum() + 0.5 * (wb @ self.B @ wb.T).sum()


def test_eigenvalue_factors_per_block() -> None:
    torch.manual_seed(0)
    model = TwoQuadratics()
    eig = EigenvalueConfig(enabled=True, max_iter=200, tol=1e-6)
    cfg = MoQConfig(start_bits=8, target_bits=5, quantize_period=2, eigenvalue=eig)
    writer = RecordingWriter()
    moq = MoQ(model, cfg, eigenvalue_loss=model.loss, writer=writer)
    for _ in range(40):
        moq.step()
    # normalized eigenvalues 1.0 (factor 5) and 0.4 (factor 2): a drops at 2, 20; b at 2, 8, 32
    got = [(d.step, d.name, d.new_bits, d.next_drop) for d in moq.history]
    assert got == [
        (2, "a.weight", 7, 20),
        (2, "b.weight", 7, 8),
        (8, "b.weight", 6, 32),
        (20, "a.weight", 6, 200),
        (32, "b.weight", 5, None),
    ]
    assert [d.eigenvalue for d in moq.history] == pytest.approx([1.0, 0.4, 0.4, 1.0, 0.4], rel=1e-4)
    assert ("moq/bits/b.weight", 5, 32) in writer.calls
    assert ("moq/eigenvalue/block1", pytest.approx(0.4, rel=1e-4), 8) in writer.calls


def test_eigenvalue_blocks_from_layer_name() -> None:
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)])
    x = torch.randn(8, 3)

    def loss() -> Tensor:
        h = x
        for layer in model.layers:
            h = torch.tanh(layer(h))
        return h.pow(2).sum()

    eig = EigenvalueConfig(enabled=True, layer_name="layers", layer_num=2)
    moq = MoQ(model, MoQConfig(start_bits=8, target_bits=6, quantize_period=1, eigenvalue=eig), eigenvalue_loss=loss)
    moq.step()
    by_name = {d.name: d.eigenvalue for d in moq.history}
    assert by_name["layers.2.weight"] is None  # outside the first layer_num blocks: factor 1
    assert max(by_name["layers.0.weight"], by_name["layers.1.weight"]) == 1.0
    with pytest.raises(MoQConfigError, match="layer_num"):
        too_many = EigenvalueConfig(enabled=True, layer_name="layers", layer_num=4)
        MoQ(model, MoQConfig(eigenvalue=too_many), eigenvalue_loss=loss)


def test_eigenvalue_scheduling_needs_a_loss() -> None:
    with pytest.raises(MoQConfigError) as info:
        MoQ(small_model(), MoQConfig(eigenvalue=EigenvalueConfig(enabled=True)))
    assert info.value.key == "eigenvalue.enabled"


# ---------------------------------------------------------------- logging


class RecordingWriter:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, int | None]] = []

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> None:
        self.calls.append((tag, scalar_value, global_step))


def test_every_bit_drop_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    moq = MoQ(nn.Linear(4, 3), MoQConfig(start_bits=8, target_bits=5, quantize_period=1))
    with caplog.at_level(logging.INFO, logger="qkit.moq"):
        for _ in range(8):
            moq.step()
    lines = [r.getMessage() for r in caplog.records if "bits (" in r.getMessage()]
    assert lines == [
        "MoQ step 1: weight 8 -> 7 bits (next drop at quantized step 2)",
        "MoQ step 2: weight 7 -> 6 bits (next drop at quantized step 4)",
        "MoQ step 4: weight 6 -> 5 bits (target reached)",
    ]


# ---------------------------------------------------------------- checkpoints


def _task() -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 6, generator=gen), torch.randint(3, (16,), generator=gen)) for _ in range(5)]
    return model, batches


def _moq_for(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> MoQ:
    x, y = batches[0]
    cfg = MoQConfig(
        start_bits=8,
        target_bits=3,
        quantize_period=2,
        schedule_offset=2,
        groups=2,
        rounding="stochastic",
        fp16_mixed_quantize=True,
        quantize_change_ratio=0.1,
        eigenvalue=EigenvalueConfig(enabled=True, max_iter=10),
    )
    return MoQ(model, cfg, eigenvalue_loss=lambda: nn.functional.cross_entropy(model(x), y))


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches: list, start: int, stop: int) -> None:
    for step in range(start, stop):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_checkpoint_round_trip_mid_schedule_is_bit_exact() -> None:
    total, cut = 40, 17
    torch.manual_seed(3)
    model, batches = _task()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    moq = _moq_for(model, batches).attach(opt)
    torch.manual_seed(3)
    _train(model, opt, batches, 0, total)

    model2, batches = _task()
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.05)
    moq2 = _moq_for(model2, batches).attach(opt2)
    torch.manual_seed(3)
    _train(model2, opt2, batches, 0, cut)
    assert moq2.history  # mid-schedule: drops before the cut ...
    buffer = io.BytesIO()
    state = {"model": model2.state_dict(), "opt": opt2.state_dict(), "moq": moq2.state_dict()}
    torch.save({**state, "rng": torch.get_rng_state()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=False)

    model3, batches = _task()
    opt3 = torch.optim.Adam(model3.parameters(), lr=0.05)
    moq3 = _moq_for(model3, batches).attach(opt3)
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    moq3.load_state_dict(ckpt["moq"])
    torch.set_rng_state(ckpt["rng"])
    _train(model3, opt3, batches, cut, total)

    for (name, a), b in zip(model.state_dict().items(), model3.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for name, a in moq.master_weights().items():
        assert torch.equal(a, moq3.master_weights()[name]), name
    assert moq.history == moq3.history
    assert any(d.step > cut for d in moq3.history)  # ... and after it
    assert moq.schedules() == moq3.schedules()
    assert (moq.steps, moq.quantizer.qsteps, moq.quantizer.quantize_real_ratio) == (
        moq3.steps,
        moq3.quantizer.qsteps,
        moq3.quantizer.quantize_real_ratio,
    )


def test_load_state_dict_checks_names() -> None:
    state = MoQ(small_model(), MoQConfig()).state_dict()
    other = MoQ(small_model(), MoQConfig(include=("encoder",)))
    with pytest.raises(ValueError, match=r"unexpected \['emb.weight', 'head.weight'\]"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="not a MoQ state"):
        other.load_state_dict({"qsteps": 3})


# ---------------------------------------------------------------- corrupt checkpoints (issue 16, item 4)


def _trained_moq(model: nn.Module | None = None, **config) -> MoQ:
    """A MoQ past its first bit drops, with residuals (master weights) and history."""
    model = small_model() if model is None else model
    cfg = MoQConfig(**{"start_bits": 8, "target_bits": 4, "quantize_period": 2, "schedule_offset": 1, **config})
    moq = MoQ(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    moq.attach(opt)
    gen = torch.Generator().manual_seed(7)
    for _ in range(6):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    assert moq.history and all(r is not None for r in moq.state_dict()["residuals"].values())
    return moq


def _snapshot(moq: MoQ) -> dict:
    """Everything load_state_dict may write, deep-copied."""
    state = moq.state_dict()  # clones residuals; schedules, counters, history by value
    weights = {name: p.detach().clone() for name, p in moq.model.named_parameters()}
    return {"state": state, "weights": weights, "schedules": moq.schedules(), "history": list(moq.history)}


def _assert_same_snapshot(a: dict, b: dict) -> None:
    assert a["schedules"] == b["schedules"] and a["history"] == b["history"]
    sa, sb = a["state"], b["state"]
    assert {k: v for k, v in sa.items() if k != "residuals"} == {k: v for k, v in sb.items() if k != "residuals"}
    assert sa["residuals"].keys() == sb["residuals"].keys()
    for name, r in sa["residuals"].items():
        other = sb["residuals"][name]
        assert (r is None and other is None) or torch.equal(r, other), name
    for name, w in a["weights"].items():
        assert torch.equal(w, b["weights"][name]), name


def _corrupt(state: dict, path: str, value: object) -> dict:
    """A copy of ``state`` with the entry at dotted ``path`` (parameter names whole) set."""
    out = {**state, "params": {k: dict(v) for k, v in state["params"].items()}}
    out["residuals"] = dict(state["residuals"])
    out["history"] = [dict(d) for d in state["history"]]
    head, _, rest = path.partition(".")
    if head == "params":
        name, _, key = rest.rpartition(".")
        out["params"][name][key] = value
    elif head == "residuals":
        out["residuals"][rest] = value
    elif head.startswith("history["):
        out["history"][int(head[8:-1])][rest] = value
    else:
        out[head] = value
    return out


W = "encoder.2.weight"  # the last-but-one scheduled weight: earlier ones would load first on a non-atomic loader
CORRUPTIONS = [
    ("params.head.weight.start_bits", 99, r"`params\.head\.weight\.start_bits` must be in \[1, 16\], got 99"),
    ("params.head.weight.start_bits", True, r"`params\.head\.weight\.start_bits` must be an integer"),
    ("params.head.weight.start_bits", 6.0, r"`params\.head\.weight\.start_bits` must be an integer"),
    ("params.head.weight.target_bits", 0, r"`params\.head\.weight\.target_bits` must be in \[1, 16\]"),
    ("params.head.weight.target_bits", 8, r"`params\.head\.weight\.target_bits` \(8\) must be <= start_bits"),
    ("params.head.weight.q_period", 0, r"`params\.head\.weight\.q_period` must be in \[1, "),
    ("params.head.weight.q_period", 2**64, r"`params\.head\.weight\.q_period` must be in \[1, "),
    ("params.head.weight.bits", 4, r"`params\.head\.weight\.bits` is not a schedule key"),
    ("steps", -1, r"`steps` must be in \[0, "),
    ("steps", "6", r"`steps` must be an integer"),
    ("qsteps", 10**6, r"`qsteps` \(1000000\) exceeds `steps`"),
    ("quantize_real_ratio", float("nan"), r"`quantize_real_ratio` must be a finite number"),
    ("quantize_real_ratio", 1.5, r"`quantize_real_ratio` must be in \[0, 1\]"),
    ("quantize_real_ratio", -0.25, r"`quantize_real_ratio` must be in \[0, 1\]"),
    (f"residuals.{W}", torch.zeros(6), rf"`residuals\.{W}` has shape \[6\], but the parameter has \[6, 6\]"),
    (f"residuals.{W}", torch.zeros(6, 6, dtype=torch.float16), rf"`residuals\.{W}` has dtype torch\.float16"),
    (f"residuals.{W}", torch.full((6, 6), float("inf")), rf"`residuals\.{W}` holds NaN or infinite values"),
    (f"residuals.{W}", [[0.0] * 6] * 6, rf"`residuals\.{W}` must be a tensor or None"),
    ("residuals.extra.weight", None, r"`residuals` names other parameters .* unexpected \['extra\.weight'\]"),
    ("history[0].new_bits", 3, r"`history\[0\]\.new_bits` \(3\) must be old_bits - 1"),
    ("history[0].name", "nope", r"`history\[0\]\.name` is 'nope', not a scheduled parameter"),
    ("history[0].step", 99, r"`history\[0\]\.step` \(99\) is after `steps`"),
    ("history[0].eigenvalue", float("nan"), r"`history\[0\]\.eigenvalue` must be a finite number"),
    ("format", "qkit.moq/0", r"`format` is 'qkit\.moq/0': not a MoQ state"),
    ("optimizer", {}, r"`optimizer` is not a MoQ state key"),
]


@pytest.mark.parametrize(
    ("path", "value", "error"), CORRUPTIONS, ids=[f"{i}:{c[0]}" for i, c in enumerate(CORRUPTIONS)]
)
def test_corrupt_state_is_refused_and_changes_nothing(path: str, value: object, error: str) -> None:
    source = _trained_moq()
    target = _trained_moq()
    target.step()  # different from the source, so a partial load would show
    before = _snapshot(target)
    bad = _corrupt(source.state_dict(), path, value)
    with pytest.raises(ValueError, match=error):
        target.load_state_dict(bad)
    _assert_same_snapshot(_snapshot(target), before)
    target.load_state_dict(source.state_dict())  # a good state still loads ...
    _assert_same_snapshot(_snapshot(target), _snapshot(source))  # ... whole


def test_state_of_a_model_with_other_shapes_is_refused() -> None:
    """Same parameter names, other shapes: the residuals must not load (they would be
    broadcast into the weights at the next step)."""
    state = _trained_moq().state_dict()
    torch.manual_seed(0)
    wider = nn.ModuleDict(
        {
            "encoder": nn.Sequential(nn.Linear(4, 12), nn.LayerNorm(12), nn.Linear(12, 6)),
            "head": nn.Linear(6, 2),
            "emb": nn.Embedding(5, 4),
        }
    )
    other = MoQ(wider, MoQConfig(start_bits=8, target_bits=4, quantize_period=2, schedule_offset=1))
    before = _snapshot(other)
    with pytest.raises(ValueError, match=r"`residuals\.encoder\.0\.weight` has shape \[6, 4\], but .* \[12, 4\]"):
        other.load_state_dict(state)
    _assert_same_snapshot(_snapshot(other), before)


@pytest.mark.parametrize(
    ("config", "bits", "error"),
    [
        ({"use_quantizer_kernel": True}, 1, "but use_quantizer_kernel quantizes 2..16 bits"),
        ({"symmetric": False}, 2, "but below 3 bits MoQ quantizes symmetric and nearest only"),
        ({"rounding": "stochastic"}, 2, "but below 3 bits MoQ quantizes symmetric and nearest only"),
    ],
)
def test_state_needing_a_width_this_moq_cannot_quantize_is_refused(config: dict, bits: int, error: str) -> None:
    """A width this MoQ's quantizer cannot reach would load, then fail at a later step."""
    state = _trained_moq(**config).state_dict()
    state["params"]["head.weight"]["target_bits"] = bits
    moq = _trained_moq(**config)
    before = _snapshot(moq)
    with pytest.raises(ValueError, match=rf"`params\.head\.weight\.target_bits` is {bits}, {error}"):
        moq.load_state_dict(state)
    _assert_same_snapshot(_snapshot(moq), before)


def test_loaded_residuals_are_copies() -> None:
    source = _trained_moq()
    state = source.state_dict()
    target = _trained_moq()
    target.load_state_dict(state)
    for r in state["residuals"].values():
        r.fill_(1e3)  # the caller reusing its checkpoint tensors must not move the loaded masters
    for name, w in target.master_weights().items():
        assert torch.equal(w, source.master_weights()[name]), name
