"""``qkit bench`` as a tool: its baselines do the same work as qkit (bit for bit, so the
figures compare like with like), and a tiny run writes a complete JSON report and plot.
No timing is asserted."""

from __future__ import annotations

import json
import time

import pytest
import torch

import qkit
from helpers import FLOAT_DTYPES, assert_same
from qkit.bench import baselines as base
from qkit.bench import cli as bench


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("bits", [4, 8])
def test_eager_baselines_compute_what_qkit_computes(dtype, bits):
    x = (torch.randn(64 * 96, generator=torch.Generator().manual_seed(1)) * 5).to(dtype)
    groups = 96
    assert_same(base.eager_fake_quantize(x, groups, bits), qkit.fake_quantize(x, groups, bits), "fake_quantize")
    q, params = qkit.quantize(x, groups, bits)
    want_q, want_params = base.eager_quantize(x, groups, bits)
    assert_same(q.reshape(-1), want_q.reshape(-1), "codes")
    assert_same(params, want_params, "params")
    assert_same(
        base.eager_dequantize(q, params, groups, bits, dtype),
        qkit.dequantize(q, params, groups, bits, dtype=dtype).reshape(-1),
        "dequantize",
    )
    aten = base.aten_per_channel_fake_quantize(x.float(), groups, bits)
    torch.testing.assert_close(aten, qkit.fake_quantize(x.float(), groups, bits), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("fmt", "scaling"), [("e4m3", "absmax"), ("e5m2", "mx"), ("e3m2", "absmax"), ("e2m1", "mx"), ("e2m1", "nvfp4")]
)
def test_fp_eager_baselines_compute_what_qkit_computes(dtype, fmt, scaling):
    x = (torch.randn(64 * 96, generator=torch.Generator().manual_seed(2)) * 5).to(dtype)
    x[64:128] = 0  # an all-zero group
    x[7] = 1e-30  # below every format's smallest subnormal once scaled
    groups = 96 if scaling == "absmax" else x.numel() // bench.FIXED_BLOCKS[scaling][0]
    want = qkit.fake_quantize_fp(x, groups, fmt, scaling)
    assert_same(base.eager_fake_quantize_fp(x, groups, fmt, scaling), want, "fake_quantize_fp")
    if fmt in ("e3m2", "e2m3"):
        return  # the bench stores FP8 and FP4 only
    codes, scales = qkit.quantize_fp(x, groups, fmt, scaling)
    eager_codes, eager_scales = base.eager_quantize_fp(x, groups, fmt, scaling)
    assert_same(eager_codes.view(torch.uint8), codes.view(torch.uint8), "codes")
    assert_same(eager_scales.view(torch.uint8), scales.view(torch.uint8), "scales")
    assert_same(
        base.eager_dequantize_fp(eager_codes, eager_scales, groups, fmt, dtype, scaling),
        qkit.dequantize_fp(codes, scales, groups, fmt, scaling, dtype).reshape(-1),
        "dequantize_fp",
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scaling", ["mx", "nvfp4"])
def test_torchao_baselines_compute_what_qkit_computes(dtype, scaling):
    """The bench's torchao cases (its own tensor scale for NVFP4) give qkit's values."""
    libs = bench.Baselines.load("cpu", mx=scaling == "mx", nvfp4=scaling == "nvfp4")
    if (libs.torchao_mx if scaling == "mx" else libs.torchao_nvfp4) is None:
        pytest.skip("torchao not installed")
    x = (torch.randn(64 * 96, generator=torch.Generator().manual_seed(3)) * 5).to(dtype)
    x[64:128] = 0  # an all-zero block
    groups = x.numel() // bench.FIXED_BLOCKS[scaling][0]
    want = qkit.fake_quantize_fp(x, groups, "e2m1", scaling)
    fake, _ = bench.torchao_fp("fake", x, "e2m1", scaling, libs)
    assert_same(fake().reshape(-1), want, "torchao fake quantization")
    dequantize, _ = bench.torchao_fp("dequantize", x, "e2m1", scaling, libs)
    assert_same(dequantize().reshape(-1), want, "torchao dequantization")
    assert bench.torchao_fp("quantize", x, "e2m1", scaling, libs)[0] is not None
    if scaling == "nvfp4":
        assert bench.torchao_fp("fake", x.half(), "e2m1", scaling, libs) == (
            None,
            "torchao's NVFP4 takes float32 or bfloat16",
        )


def test_a_tiny_run_reports_every_case(tmp_path, capsys):
    report = tmp_path / "bench.json"
    args = ["--sizes", "4K", "--dtypes", "float32,bfloat16", "--groups", "64,row", "--row", "256", "--repeat", "1"]
    args += ["--warmup", "0"]
    assert bench.main([*args, "--json", str(report), "--no-progress", "--latency"]) == 0
    data = json.loads(report.read_text())
    assert data["environment"]["qkit"] == qkit.__version__
    rows = data["rows"]
    assert len(rows) == 2 * 2 * len(bench.OPS)
    for row in rows:
        timed = set(row["gbps"])
        assert {"eager", "compile", "qkit"} <= timed, row
        if row["op"] not in bench.FP_OPS:  # DeepSpeed has no FP8/MX kernel to compare with
            assert row["skipped"]["deepspeed"] == "CUDA only"
        if row["op"] in ("fake_quantize", "quantize8", "dequantize4", "swizzle_quantize", *bench.FP_OPS):
            assert "qkit_out" in timed
        if row["op"].endswith("mxfp4"):
            assert row["group"] == "mx32" and row["group_size"] == 32
            if base.load_torchao_mx()[0] is not None:
                assert "torchao" in timed, row
        if row["op"].endswith("nvfp4"):
            assert row["group"] == "nv16" and row["group_size"] == 16
            if base.load_torchao_nvfp4()[0] is not None:
                assert "torchao" in timed, row
        assert all(v > 0 for v in row["gbps"].values())
        assert row["copy_gbps"] > 0 and row["clone_gbps"] > 0  # the out= and the fresh-output ceilings
    assert [r["numel"] for r in data["latency"]] == [64, 1024, 4096, 16384, 65536]
    assert "torch.add" in data["latency"][0]["us"]
    capsys.readouterr()
    assert bench.main(["--report", str(report)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| op | dtype | group | threads | copy | clone |") and len(table) == 2 + len(rows)
    assert "fresh of clone" in table[0]
    cells = [line.split(" | ") for line in table]
    assert {len(c) for c in cells} == {len(cells[0])}  # every row has every column
    clone, share = cells[0].index("clone"), cells[0].index("fresh of clone")
    for row, row_cells in zip(rows, cells[2:], strict=True):  # the table's rows in the report's order
        assert row_cells[clone] == f"{row['clone_gbps']:.1f}"
        assert row_cells[share] == f"{row['gbps']['qkit'] / row['clone_gbps']:.0%}"
    # a report written before clone was timed still renders, with "-" for it
    for row in data["rows"]:
        del row["clone_gbps"]
    report.write_text(json.dumps(data))
    assert bench.main(["--report", str(report)]) == 0
    old_table = capsys.readouterr().out.strip().splitlines()
    assert all(line.split(" | ")[clone] == "-" for line in old_table[2:])


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    args = ["--sizes", "1K,4K", "--dtypes", "float32", "--groups", "64", "--ops", "fake_quantize,quantize8"]
    assert bench.main([*args, "--repeat", "1", "--warmup", "0", "--no-progress", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_op_is_refused():
    with pytest.raises(SystemExit):
        bench.main(["--ops", "fake_quantise"])


@pytest.mark.parametrize(
    "args, words",
    [
        (["--sizes", "0"], "sizes must be >= 1"),
        (["--sizes", "4K,lots"], "'lots' is not a size"),
        (["--groups", "64,0"], "'0' is neither a group size"),
        (["--repeat", "0"], "--repeat and --row must be >= 1"),
        (["--warmup", "-1"], "--warmup >= 0"),
    ],
)
def test_bad_arguments_are_refused_by_name(capsys, args, words):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*args, "--no-progress"])
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err


def test_warm_up_runs_for_its_seconds_before_the_timed_calls():
    calls = []

    def fn():
        calls.append(time.perf_counter())
        time.sleep(0.01)

    bench.time_seconds(fn, repeat=3, warmup=0.1)
    # the first timed call starts once the warm-up's seconds have passed since the first call
    assert calls[-3] - calls[0] >= 0.1 and len(calls) >= 1 + 2 + 3
    calls.clear()
    bench.time_seconds(fn, repeat=3, warmup=0)
    assert len(calls) == 1 + 3


@pytest.mark.parametrize("prebuilt", [False, True])
def test_no_jit_takes_deepspeed_only_when_prebuilt(monkeypatch, prebuilt):
    """--no-jit (ci/gpu_check.sh): DeepSpeed's quantizer op is loaded only when DeepSpeed was
    installed with it prebuilt, never compiled just in time; without --no-jit it loads as before."""
    import sys
    import types

    loads = []

    class QuantizerBuilder:
        name = "quantizer"

        def load(self):
            loads.append(self.name)
            return types.SimpleNamespace(name="ds op")

    modules = {name: types.ModuleType(name) for name in ("deepspeed", "deepspeed.ops", "deepspeed.ops.op_builder")}
    modules["deepspeed.ops.op_builder"].QuantizerBuilder = QuantizerBuilder
    modules["deepspeed.git_version_info"] = types.ModuleType("deepspeed.git_version_info")
    modules["deepspeed.git_version_info"].installed_ops = {"quantizer": prebuilt}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    op, reason = base.load_deepspeed(allow_jit=False)
    if prebuilt:
        assert op is not None and reason is None and loads == ["quantizer"]
    else:
        assert op is None and "not prebuilt" in reason and loads == []
    loads.clear()
    op, reason = base.load_deepspeed()
    assert op is not None and loads == ["quantizer"]
    assert bench.build_parser().parse_args(["--no-jit"]).no_jit
