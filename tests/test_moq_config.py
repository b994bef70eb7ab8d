"""MoQConfig: DeepSpeed's two JSON spellings read, every bad or contradictory key rejected by name."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from qkit import QuantSpec
from qkit.moq import EigenvalueConfig, GroupConfig, MoQConfig, MoQConfigError

# The MoQ tutorial's eigenvalue example (its other example spells the algorithm block
# "quantize-algo", which DeepSpeed silently ignored).
TUTORIAL = {
    "optimizer": {"type": "AdamW", "params": {"lr": 2e-5}},
    "fp16": {"enabled": True, "initial_scale_power": 16},
    "quantize_training": {
        "enabled": True,
        "quantize_verbose": True,
        "quantizer_kernel": True,
        "quantize-algo": {"q_type": "asymmetric", "rounding": "stochastic"},
        "quantize_bits": {"start_bits": 12, "target_bits": 8},
        "quantize_schedule": {"quantize_period": 10, "schedule_offset": 5},
        "quantize_groups": 8,
        "fp16_mixed_quantize": {"enabled": True, "quantize_change_ratio": 0.01},
        "eigenvalue": {
            "enabled": True,
            "verbose": True,
            "max_iter": 50,
            "tol": 1e-2,
            "stability": 0,
            "gas_boundary_resolution": 2,
            "layer_name": "bert.encoder.layer",
            "layer_num": 12,
        },
    },
}

COMPRESSION = {
    "compression_training": {
        "weight_quantization": {
            "shared_parameters": {
                "enabled": True,
                "quantizer_kernel": False,
                "schedule_offset": 50,
                "quantize_groups": 4,
                "quantize_verbose": False,
                "quantization_type": "symmetric",
                "quantize_weight_in_forward": False,
                "rounding": "nearest",
                "fp16_mixed_quantize": {"enabled": False, "quantize_change_ratio": 0.001},
            },
            "different_groups": {
                "wq1": {
                    "params": {"start_bits": 8, "target_bits": 4, "quantization_period": 50},
                    "modules": ["attention.self", "intermediate"],
                },
                "wq2": {
                    "params": {"start_bits": 6, "target_bits": 3, "quantization_period": 20, "quantize_groups": 2},
                    "modules": ["output"],
                    "related_modules": None,
                },
            },
        },
        "sparse_pruning": {"shared_parameters": {"enabled": False}},
    }
}


def test_quantize_training_block() -> None:
    cfg = MoQConfig.from_deepspeed(TUTORIAL)
    assert (cfg.start_bits, cfg.target_bits, cfg.quantize_period, cfg.schedule_offset) == (12, 8, 10, 5)
    assert (cfg.groups, cfg.symmetric, cfg.rounding) == (8, False, "stochastic")
    assert (cfg.fp16_mixed_quantize, cfg.quantize_change_ratio) == (True, 0.01)
    assert (cfg.use_quantizer_kernel, cfg.verbose, cfg.enabled) == (True, True, True)
    assert cfg.eigenvalue == EigenvalueConfig(
        enabled=True,
        verbose=True,
        max_iter=50,
        tol=1e-2,
        stability=0,
        gas_boundary_resolution=2,
        layer_name="bert.encoder.layer",
        layer_num=12,
    )
    assert cfg.include == () and cfg.different_groups == ()


def test_quantize_training_defaults_are_deepspeeds() -> None:
    cfg = MoQConfig.from_deepspeed({"quantize_training": {"enabled": True}})
    assert (cfg.start_bits, cfg.target_bits, cfg.quantize_period, cfg.schedule_offset) == (16, 8, 1000, 1000)
    assert (cfg.groups, cfg.symmetric, cfg.rounding, cfg.quantize_change_ratio) == (1, True, "nearest", 0.001)
    assert not (cfg.fp16_mixed_quantize or cfg.use_quantizer_kernel or cfg.eigenvalue.enabled)
    assert cfg.master_weights  # DeepSpeed's MoQ always ran under its fp32-master fp16 optimizer


def test_spellings_of_the_algorithm() -> None:
    base = {"enabled": True, "quantize_bits": {"start_bits": 8, "target_bits": 4}}
    for block in (
        {"quantize_algo": {"q_type": "asymmetric"}},
        {"quantize-algo": {"q_type": "asymmetric"}},
        {"quantize_type": "asymmetric"},  # the tutorial's eigenvalue example
        {"quantize_algo": {"q_type": 1}},  # DeepSpeed's old integer constants
        {"quantize_type": "asymmetric", "quantize_algo": {"q_type": "asymmetric"}},
    ):
        assert MoQConfig.from_deepspeed({"quantize_training": {**base, **block}}).symmetric is False


def test_json_path(tmp_path: Path) -> None:
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(TUTORIAL))
    assert MoQConfig.from_deepspeed(path) == MoQConfig.from_deepspeed(str(path)) == MoQConfig.from_deepspeed(TUTORIAL)


def test_compression_training_block() -> None:
    cfg = MoQConfig.from_deepspeed(COMPRESSION)
    assert (cfg.schedule_offset, cfg.groups, cfg.symmetric, cfg.rounding) == (50, 4, True, "nearest")
    assert cfg.include == ("attention.self", "intermediate", "output")  # only the groups' modules
    wq1, wq2 = cfg.different_groups
    assert wq1 == GroupConfig("wq1", ("attention.self", "intermediate"), 8, 4, 50, None)
    assert wq2 == GroupConfig("wq2", ("output",), 6, 3, 20, 2)
    assert not cfg.eigenvalue.enabled


def test_disabled_blocks() -> None:
    assert MoQConfig.from_deepspeed({"quantize_training": {"enabled": False}}).enabled is False
    both = {**copy.deepcopy(COMPRESSION), "quantize_training": {"enabled": False}}
    assert MoQConfig.from_deepspeed(both).different_groups  # the enabled one wins


def _with(base: dict, path: str, value: Any) -> dict:
    cfg = copy.deepcopy(base)
    node = cfg
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return cfg


def _without(base: dict, path: str) -> dict:
    cfg = copy.deepcopy(base)
    node = cfg
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[key]
    del node[keys[-1]]
    return cfg


QT = "quantize_training"
WQ = "compression_training.weight_quantization"
SP = f"{WQ}.shared_parameters"
G1 = f"{WQ}.different_groups.wq1"

BAD = [
    # (config, key named in the error)
    (_with(TUTORIAL, f"{QT}.quantize_bits.strat_bits", 8), f"{QT}.quantize_bits.strat_bits"),
    (_with(TUTORIAL, f"{QT}.quantize_period", 8), f"{QT}.quantize_period"),  # belongs in quantize_schedule
    (_with(TUTORIAL, f"{QT}.quantize_algo", {"q_type": "symmetric"}), f"{QT}.quantize-algo"),
    (_with(TUTORIAL, f"{QT}.quantize_type", "symmetric"), f"{QT}.quantize_type"),  # contradicts q_type
    (_with(TUTORIAL, f"{QT}.quantize-algo.q_type", "signed"), f"{QT}.quantize-algo.q_type"),
    (_with(TUTORIAL, f"{QT}.quantize-algo.rounding", "up"), f"{QT}.quantize-algo.rounding"),
    (_with(TUTORIAL, f"{QT}.quantize_bits.target_bits", 13), f"{QT}.quantize_bits.start_bits"),
    (_with(TUTORIAL, f"{QT}.quantize_bits.start_bits", 17), f"{QT}.quantize_bits.start_bits"),
    (_with(TUTORIAL, f"{QT}.quantize_bits.start_bits", True), f"{QT}.quantize_bits.start_bits"),
    (_with(TUTORIAL, f"{QT}.quantize_bits.target_bits", 1), f"{QT}.quantize_bits.target_bits"),  # kernel: >= 2
    (_with(TUTORIAL, f"{QT}.quantize_schedule.quantize_period", 0), f"{QT}.quantize_schedule.quantize_period"),
    (_with(TUTORIAL, f"{QT}.quantize_schedule.schedule_offset", -1), f"{QT}.quantize_schedule.schedule_offset"),
    (_with(TUTORIAL, f"{QT}.quantize_groups", 0), f"{QT}.quantize_groups"),
    (
        _with(TUTORIAL, f"{QT}.fp16_mixed_quantize.quantize_change_ratio", 0),
        f"{QT}.fp16_mixed_quantize.quantize_change_ratio",
    ),
    (_with(TUTORIAL, f"{QT}.fp16_mixed_quantize", True), f"{QT}.fp16_mixed_quantize"),
    (_with(TUTORIAL, f"{QT}.eigenvalue.max_iters", 5), f"{QT}.eigenvalue.max_iters"),
    (_with(TUTORIAL, f"{QT}.eigenvalue.max_iter", 0), f"{QT}.eigenvalue.max_iter"),
    (_with(TUTORIAL, f"{QT}.quantizer_kernel", "yes"), f"{QT}.quantizer_kernel"),
    (_without(TUTORIAL, f"{QT}.enabled"), f"{QT}.enabled"),
    ({"fp16": {"enabled": True}}, "quantize_training"),
    ({**copy.deepcopy(TUTORIAL), **copy.deepcopy(COMPRESSION)}, WQ),  # both enabled
    (_with(COMPRESSION, f"{SP}.quantize_weight_in_forward", True), f"{SP}.quantize_weight_in_forward"),
    (_with(COMPRESSION, f"{SP}.quantization_type", "asym"), f"{SP}.quantization_type"),
    (_with(COMPRESSION, f"{SP}.schedule_offset_end", 10), f"{SP}.schedule_offset_end"),
    (_with(COMPRESSION, f"{SP}.quantize_groups", -2), f"{SP}.quantize_groups"),
    (_without(COMPRESSION, f"{SP}.enabled"), f"{SP}.enabled"),
    (_with(COMPRESSION, f"{WQ}.different_groups", {}), f"{WQ}.different_groups"),
    (_without(COMPRESSION, f"{G1}.params.target_bits"), f"{G1}.params.target_bits"),
    (_with(COMPRESSION, f"{G1}.params.target_bits", 9), f"{G1}.params.start_bits"),
    (_with(COMPRESSION, f"{G1}.params.quantization_period", 0), f"{G1}.params.quantization_period"),
    (_with(COMPRESSION, f"{G1}.params.bits", 4), f"{G1}.params.bits"),
    (_with(COMPRESSION, f"{G1}.related_modules", ["x"]), f"{G1}.related_modules"),
    (_without(COMPRESSION, f"{G1}.modules"), f"{G1}.modules"),
    (_with(COMPRESSION, f"{G1}.modules", ["("]), f"{G1}.modules[0]"),
    (_with(COMPRESSION, "compression_training.weight_pruning", {}), "compression_training.weight_pruning"),
    # 2-bit (ternary) needs symmetric, nearest rounding on the pure-PyTorch path
    (_with(_with(COMPRESSION, f"{G1}.params.target_bits", 2), f"{SP}.rounding", "stochastic"), f"{SP}.rounding"),
]


@pytest.mark.parametrize(("cfg", "key"), BAD, ids=[key for _, key in BAD])
def test_bad_configs_are_rejected_naming_the_key(cfg: dict, key: str) -> None:
    with pytest.raises(MoQConfigError) as info:
        MoQConfig.from_deepspeed(cfg)
    assert info.value.key == key, str(info.value)
    assert f"`{key}`" in str(info.value)


def test_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{ not json")
    with pytest.raises(MoQConfigError, match="not valid JSON"):
        MoQConfig.from_deepspeed(path)


def _in_deepspeed_syntax(config: dict[str, Any]) -> str:
    """``config`` as a file in DeepSpeed's syntax (hjson): a comment, and a trailing comma after
    every object's last member, which DeepSpeed accepted and strict JSON refuses (issue 16, item 7)."""
    text, before = json.dumps(config, indent=2), ""
    while text != before:  # nested objects close one after another: one comma per pass
        before, text = text, re.sub(r"([^,{\[\s])\n(\s*[}\]])", r"\1,\n\2", text)
    return "// MoQ tutorial: eigenvalue example\n" + text + "\n"


TUTORIAL_HJSON = _in_deepspeed_syntax(TUTORIAL)


def test_deepspeed_syntax_trailing_commas_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "ds_config.json"
    path.write_text(TUTORIAL_HJSON)
    assert MoQConfig.from_deepspeed(path) == MoQConfig.from_deepspeed(TUTORIAL)


def test_deepspeed_syntax_keeps_the_strict_key_checks(tmp_path: Path) -> None:
    misspelt = tmp_path / "misspelt.json"
    misspelt.write_text(TUTORIAL_HJSON.replace('"quantize_groups": 8,', '"quantize_group": 8,'))
    with pytest.raises(MoQConfigError) as info:
        MoQConfig.from_deepspeed(misspelt)
    assert info.value.key == "quantize_training.quantize_group", str(info.value)
    # hjson reads a bare True as the string "True": still a type error naming the key.
    capital = tmp_path / "capital.json"
    capital.write_text(TUTORIAL_HJSON.replace('"quantize_verbose": true,', '"quantize_verbose": True\n'))
    with pytest.raises(MoQConfigError) as info:
        MoQConfig.from_deepspeed(capital)
    assert info.value.key == "quantize_training.quantize_verbose", str(info.value)
    # Duplicate keys: refused (as DeepSpeed does), instead of the last one silently winning.
    dup = tmp_path / "dup.json"
    dup.write_text(TUTORIAL_HJSON.replace('"quantize_groups": 8,', '"quantize_groups": 8, "quantize_groups": 4,'))
    with pytest.raises(MoQConfigError, match="appears twice") as info:
        MoQConfig.from_deepspeed(dup)
    assert info.value.key == "quantize_groups"


def test_without_hjson_plain_json_still_reads_and_the_error_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "hjson", None)  # as if installed with --no-deps
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(TUTORIAL))
    assert MoQConfig.from_deepspeed(plain) == MoQConfig.from_deepspeed(TUTORIAL)
    relaxed = tmp_path / "relaxed.json"
    relaxed.write_text(TUTORIAL_HJSON)
    with pytest.raises(MoQConfigError, match="pip install hjson"):
        MoQConfig.from_deepspeed(relaxed)


def test_other_enabled_techniques_warn() -> None:
    cfg = _with(COMPRESSION, "compression_training.sparse_pruning.shared_parameters.enabled", True)
    with pytest.warns(UserWarning, match="sparse_pruning"):
        MoQConfig.from_deepspeed(cfg)


def test_eigenvalue_layer_num_takes_deepspeeds_default_container() -> None:
    cfg = MoQConfig.from_deepspeed({"quantize_training": {"enabled": True, "eigenvalue": {"layer_num": 4}}})
    assert (cfg.eigenvalue.layer_name, cfg.eigenvalue.layer_num) == ("bert.encoder.layer", 4)


# ---------------------------------------------------------------- the dataclasses directly


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"start_bits": 4, "target_bits": 5}, "start_bits"),
        ({"rounding": "floor"}, "rounding"),
        ({"groups": 1.5}, "groups"),
        ({"quantize_change_ratio": 1.5}, "quantize_change_ratio"),
        ({"target_bits": 2, "symmetric": False}, "symmetric"),
        ({"target_bits": 1, "use_quantizer_kernel": True}, "target_bits"),
        ({"include": ["*", "["]}, "include[1]"),
        ({"exclude": [3]}, "exclude[0]"),
        ({"master_weights": 1}, "master_weights"),
        ({"eigenvalue": {"layer_num": 2}}, "eigenvalue.layer_num"),
        ({"different_groups": (GroupConfig("a"), GroupConfig("a"))}, "different_groups.a"),
        ({"different_groups": (GroupConfig("a", start_bits=3, target_bits=4),)}, "different_groups.a.start_bits"),
    ],
)
def test_moq_config_validation(kwargs: dict, key: str) -> None:
    with pytest.raises(MoQConfigError) as info:
        MoQConfig(**kwargs)
    assert info.value.key == key, str(info.value)


def test_group_scheme() -> None:
    spec = QuantSpec(bits=4, symmetric=False, group_size=8)
    g = GroupConfig("attn", ("attn",), start_bits=8, scheme=spec)
    assert g.target_bits == 4  # the scheme's bits are the target
    assert MoQConfig(different_groups=(g,)).bits_of(g) == (8, 4)
    with pytest.raises(MoQConfigError, match=r"scheme\.bits"):
        GroupConfig("attn", target_bits=3, scheme=spec)
    with pytest.raises(MoQConfigError, match="granularity"):
        GroupConfig("attn", groups=2, scheme=spec)
    with pytest.raises(MoQConfigError, match="QuantSpec"):
        GroupConfig("attn", scheme={"bits": 4})  # type: ignore[arg-type]


def test_config_is_frozen_and_replace_validates() -> None:
    cfg = MoQConfig()
    with pytest.raises(AttributeError):
        cfg.start_bits = 4  # type: ignore[misc]
    assert cfg.replace(target_bits=4).target_bits == 4
    with pytest.raises(MoQConfigError, match="start_bits"):
        cfg.replace(start_bits=4)
