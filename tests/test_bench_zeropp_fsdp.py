"""``python -m qkit.bench.zeropp --fsdp NxL``: the FSDP2 step-time mode runs end to end (tiny
MLP, 2 gloo ranks) and reports, for every run, step >= time in comms >= time in collectives.
No timed assertion beyond those inequalities, which hold by construction of the timers."""

from __future__ import annotations

import pytest

from qkit.bench import zeropp


def test_fsdp_mode_reports_every_run() -> None:
    res = zeropp.run_fsdp(1, 2, width=48, layers=2, steps=2, warmup=1, grad_format="e4m3")
    assert set(res) == set(zeropp.fsdp_runs("e4m3")) == {*zeropp.FSDP_RUNS, "qgZ e4m3 + qwZ"}
    for label, (step, comm, collective, _, _) in res.items():
        assert step >= comm >= collective > 0, label
    # gradient bytes per step: int4 codes < FP8 codes < the fp32 default (same groups, same scales)
    grad = {label: r[3] for label, r in res.items()}
    assert grad["qgZ + qwZ"] < grad["qgZ e4m3 + qwZ"] < grad["default"], grad


def test_fsdp_mode_cli(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--fsdp", "1x2", "--fsdp-width", "32", "--fsdp-layers", "2", "--fsdp-steps", "1", "--grad-format", "e5m2"]
    assert zeropp.main(argv) == 0
    out = capsys.readouterr().out
    for word in ("quant/dequant", "step vs default", "grad KiB/step", "last loss", *zeropp.fsdp_runs("e5m2")):
        assert word in out
