"""``python -m qkit.bench.zeropp --fsdp NxL``: the FSDP2 step-time mode runs end to end (tiny
MLP, 2 gloo ranks) and reports, for every run, step >= time in comms >= time in collectives.
No timed assertion beyond those inequalities, which hold by construction of the timers."""

from __future__ import annotations

import pytest

from qkit.bench import zeropp


def test_fsdp_mode_reports_every_run() -> None:
    res = zeropp.run_fsdp(1, 2, width=48, layers=2, steps=2, warmup=1)
    assert set(res) == set(zeropp.FSDP_RUNS)
    for label, (step, comm, collective) in res.items():
        assert step >= comm >= collective > 0, label


def test_fsdp_mode_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert zeropp.main(["--fsdp", "1x2", "--fsdp-width", "32", "--fsdp-layers", "2", "--fsdp-steps", "1"]) == 0
    out = capsys.readouterr().out
    for word in ("quant/dequant", "step vs default", *zeropp.FSDP_RUNS):
        assert word in out
