"""ZeRO++ ops against the pure-PyTorch reference, bit for bit (docs/ops.md §3).

swizzle_quantize is a permutation of plain per-group quantization, the quantized
reduction is dequantize -> fp32 sum -> quantize, the LoCo variants add the error
first and update it in place, and dequantize_unsigned reads DeepSpeed's unsigned
inference codes. The worked examples are docs/ops.md §3's table and
deepspeed-behaviour.md §7-8.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from helpers import FLOAT_DTYPES, assert_same, make_input
from qkit import zeropp_ops
from reference import (
    codes_of_storage,
    ref_dequantize,
    ref_dequantize_unsigned,
    ref_finite_mask,
    ref_loco_quantized_reduction,
    ref_loco_swizzle_quantize,
    ref_quantize,
    ref_quantized_reduction,
    ref_reduction_sum,
    ref_swizzle,
    ref_swizzle_order,
    ref_swizzle_quantize,
)

ops = torch.ops.qkit

WIRE_BITS = (4, 8)
SYM = pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
DTYPE = pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
BITS = pytest.mark.parametrize("bits", WIRE_BITS)

# (nodes, devices_per_node, pipeline)
LAYOUTS = [(1, 1, 1), (2, 4, 1), (2, 4, 2), (3, 2, 1)]
LAYOUT = pytest.mark.parametrize(("nodes", "devices", "pipeline"), LAYOUTS, ids=lambda v: str(v))

# (bits, E): odd and tiny groups for 8 bits, even ones (whole bytes) for 4 bits
SWIZZLE_SIZES = [(8, 1), (8, 2), (8, 3), (8, 131), (4, 2), (4, 6), (4, 130)]


def on(device: str, *tensors: Tensor) -> list[Tensor]:
    return [t.to(device) for t in tensors]


def copy_on(device: str, t: Tensor) -> Tensor:
    """A copy of `t` on `device` with the same strides (the LoCo ops write to it)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).copy_(t)


# ------------------------------------------------------------------ swizzle: worked examples


SWIZZLE_TABLE = {  # docs/ops.md §3, nodes=2, devices=4, G=16: output slot -> input group
    1: [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15],
    2: [0, 8, 2, 10, 4, 12, 6, 14, 1, 9, 3, 11, 5, 13, 7, 15],
}


@BITS
@pytest.mark.parametrize("pipeline", [1, 2])
def test_swizzle_table(device, bits, pipeline):
    """Group g holds [g, g+1]: its asymmetric offset g + 0.5 says where it went."""
    assert ref_swizzle_order(16, pipeline, 2, 4) == SWIZZLE_TABLE[pipeline]
    x = torch.arange(16, dtype=torch.float32).repeat_interleave(2)
    x[1::2] += 1
    q, params = ops.swizzle_quantize(x.to(device), 16, bits, False, pipeline, 2, 4)
    assert q.shape == (32 * bits // 8,) and q.dtype == torch.int8
    assert params.shape == (16, 2) and params.dtype == torch.float32
    assert (params[:, 1].cpu() - 0.5).tolist() == SWIZZLE_TABLE[pipeline]
    # every group is [min, max]: codes Qmin, Qmax in each slot
    codes = codes_of_storage(q, bits).reshape(16, 2)
    assert codes.tolist() == [[-(2 ** (bits - 1)), 2 ** (bits - 1) - 1]] * 16


@pytest.mark.parametrize(("nodes", "devices"), [(2, 4), (3, 2), (4, 1), (1, 3)])
def test_swizzle_pipeline1_gives_each_device_a_contiguous_chunk(device, nodes, devices):
    """pipeline=1: device d's data (partitions n*L + d for every node n, in node order) is the
    contiguous slot range [d*N*g_p, (d+1)*N*g_p), so an even all_to_all split delivers it."""
    per_partition = 3
    groups = nodes * devices * per_partition
    x = torch.arange(groups, dtype=torch.float32).repeat_interleave(2)
    x[1::2] += 1
    _, params = ops.swizzle_quantize(x.to(device), groups, 8, False, 1, nodes, devices)
    got = (params[:, 1].cpu() - 0.5).to(torch.int64).reshape(devices, nodes * per_partition)
    for d in range(devices):
        partitions = [n * devices + d for n in range(nodes)]
        want = [z * per_partition + w for z in partitions for w in range(per_partition)]
        assert got[d].tolist() == want


# ------------------------------------------------------------------ swizzle vs reference


def check_swizzle(x: Tensor, groups: int, bits: int, symmetric: bool, layout: tuple[int, int, int], device: str):
    nodes, devices, pipeline = layout
    q, params = ops.swizzle_quantize(x.to(device), groups, bits, symmetric, pipeline, nodes, devices)
    want_q, want_params = ref_swizzle_quantize(x, groups, bits, symmetric, pipeline, nodes, devices)
    assert q.device.type == params.device.type == torch.device(device).type
    assert_same(params, want_params, "params")
    finite = ref_finite_mask(ref_swizzle(x, groups, pipeline, nodes, devices), groups)
    assert_same(codes_of_storage(q, bits)[finite], codes_of_storage(want_q, bits)[finite], "q")
    assert q.shape == want_q.shape


@DTYPE
@SYM
@LAYOUT
@pytest.mark.parametrize(("bits", "group_size"), SWIZZLE_SIZES, ids=lambda v: str(v))
def test_swizzle_matches_reference(device, dtype, symmetric, nodes, devices, pipeline, bits, group_size):
    groups = 2 * nodes * devices * pipeline
    x = make_input((groups, group_size), dtype, seed=group_size + bits)
    check_swizzle(x.reshape(2, -1), groups, bits, symmetric, (nodes, devices, pipeline), device)


@DTYPE
@SYM
@BITS
@pytest.mark.parametrize("kind", ["ties", "ints"])
def test_swizzle_ties_and_repeated_values(device, dtype, symmetric, bits, kind):
    x = make_input((24, 16), dtype, seed=4, kind=kind)
    for layout in LAYOUTS[1:]:
        check_swizzle(x, 48, bits, symmetric, layout, device)


@DTYPE
@SYM
@BITS
def test_swizzle_large_groups(device, dtype, symmetric, bits):
    """E = 70002 > 65536: the core's chunked large-group path, in a 2x2 layout, LoCo too."""
    x = make_input((4, 70002), dtype, seed=bits)
    x[1, 5] = 300.0  # the extremes sit deep inside a chunk
    x[2, -1] = -4000.0
    check_swizzle(x, 4, bits, symmetric, (2, 2, 1), device)
    e = make_input((4 * 70002,), dtype, seed=9) * 1e-2
    check_loco_swizzle(x, e, 0.5, 4, bits, symmetric, (2, 2, 1), device)


@DTYPE
@SYM
@BITS
def test_swizzle_direct_path_many_groups_per_slice(device, dtype, symmetric, bits):
    """Slices of >= 64K elements are quantized straight into their slots (no natural-order
    pass): 8 slices of 16 groups, pipelined, with a NaN and a -Inf group inside."""
    x = make_input((128, 4096), dtype, seed=bits + 3)
    x[37, 100] = float("nan")
    x[90, 5] = float("-inf")
    check_swizzle(x, 128, bits, symmetric, (2, 2, 2), device)


# ------------------------------------------------------------------ swizzle_quantize out=


def _sentinel(shape, dtype, device) -> Tensor:
    return torch.full(shape, -7 if dtype == torch.int8 else float("nan"), dtype=dtype, device=device)


@DTYPE
@SYM
@BITS
@pytest.mark.parametrize("shape", [(16, 12), (64, 4096)], ids=["two-pass", "direct"])
def test_swizzle_out_matches_the_functional_op(device, dtype, symmetric, bits, shape):
    """Both routes (natural order then swizzle; slices straight into their slots) write the
    caller's buffers bit for bit as the functional op, and those match the reference."""
    x = make_input(shape, dtype, seed=bits + shape[0]).to(device)
    x[5, 3] = float("nan")
    groups, layout = shape[0], (2, 2, 2)
    want_q, want_params = ops.swizzle_quantize(x, groups, bits, symmetric, 2, 2, 2)
    q = _sentinel(want_q.shape, torch.int8, device)
    params = _sentinel(want_params.shape, torch.float32, device)
    got = zeropp_ops.swizzle_quantize(x, groups, bits, symmetric, 2, 2, 2, out=(q, params))
    assert got[0] is q and got[1] is params
    assert_same(q, want_q, "q")
    assert_same(params, want_params, "params")
    check_swizzle(x.cpu(), groups, bits, symmetric, layout, device)


@SYM
def test_swizzle_out_into_strided_buffers(device, symmetric):
    """Non-contiguous q/params (every other byte; transposed params) get the same values,
    and the bytes between them stay untouched."""
    x = make_input((8, 64), torch.bfloat16, seed=31).to(device)
    want_q, want_params = ops.swizzle_quantize(x, 8, 8, symmetric, 1, 2, 2)
    q_store = _sentinel((2 * want_q.numel(),), torch.int8, device)
    per_group = want_params.shape[1]
    p_store = _sentinel((per_group, 8), torch.float32, device)
    ops.swizzle_quantize.out(x, 8, 8, symmetric, 1, 2, 2, q=q_store[::2], params=p_store.t())
    assert_same(q_store[::2], want_q, "q")
    assert bool((q_store[1::2] == -7).all()), "bytes between the strided codes were written"
    assert_same(p_store.t(), want_params, "params")


def test_bad_swizzle_out_is_refused_before_writing(device):
    x = make_input((8, 16), torch.float32, seed=32).to(device)
    q = _sentinel((128,), torch.int8, device)
    params = _sentinel((8, 1), torch.float32, device)

    def refused(call, match):
        before = (q.clone(), params.clone())
        with pytest.raises(RuntimeError, match=match):
            call()
        assert_same(q, before[0], "q written by a refused call")
        assert_same(params, before[1], "params written by a refused call")

    refused(lambda: zeropp_ops.swizzle_quantize(x, 8, 4, out=(q, params)), r"`q` must have shape \[64\]")
    refused(lambda: zeropp_ops.swizzle_quantize(x, 8, 8, False, out=(q, params)), r"`params` must have shape \[8, 2\]")
    refused(
        lambda: zeropp_ops.swizzle_quantize(x, 8, 8, out=(q.view(torch.uint8), params)), "`q` must be int8, got uint8"
    )
    refused(lambda: zeropp_ops.swizzle_quantize(x, 8, 8, out=(q, params.double())), "`params` must be float32")
    refused(lambda: zeropp_ops.swizzle_quantize(x, 6, 8, out=(q, params)), "`groups` \\(6\\) must divide")
    shared = torch.zeros(128, dtype=torch.int8, device=device)
    with pytest.raises(RuntimeError, match="`params` shares memory with `q`"):
        zeropp_ops.swizzle_quantize(x, 8, 8, out=(shared, shared[96:].view(torch.float32).view(8, 1)))
    assert bool((shared == 0).all())
    leaf = torch.zeros(8, 1, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="`params` requires grad"):
        zeropp_ops.swizzle_quantize(x, 8, 8, out=(q, leaf))


def test_swizzle_out_bumps_versions_and_passes_opcheck(device):
    from torch.library import opcheck

    x = make_input((8, 12), torch.float16, seed=33).to(device)
    q, params = torch.empty(96, dtype=torch.int8, device=device), torch.empty(8, 2, device=device)
    versions = (q._version, params._version)
    zeropp_ops.swizzle_quantize(x, 8, 8, False, 1, 2, 2, out=(q, params))
    assert (q._version, params._version) == (versions[0] + 1, versions[1] + 1)
    opcheck(ops.swizzle_quantize.out, (x, 8, 8, False, 2, 2, 2), {"q": q, "params": params})
    opcheck(ops.swizzle_quantize.out, (x, 8, 4, True, 1, 2, 2), {"q": q[:48], "params": params[:, :1]})


@SYM
@BITS
def test_swizzle_non_contiguous_input(device, symmetric, bits):
    base = make_input((40, 24), torch.bfloat16, seed=5)
    for x in (base.t(), base[:, ::2], base.t()[2:18]):
        groups = 8 if x.numel() % 16 == 0 else 4
        check_swizzle(x, groups, bits, symmetric, (2, 2, 2) if groups == 8 else (2, 2, 1), device)


@DTYPE
@SYM
@BITS
@pytest.mark.parametrize("shape", [(0,), (0, 8), (3, 0)])
def test_swizzle_empty(device, dtype, symmetric, bits, shape):
    x = torch.empty(shape, dtype=dtype)
    check_swizzle(x, 8, bits, symmetric, (2, 4, 1), device)
    e = torch.empty(shape, dtype=dtype)
    check_loco_swizzle(x, e, 0.5, 8, bits, symmetric, (2, 2, 2), device)


@SYM
@BITS
def test_swizzle_non_finite_group_is_isolated(device, symmetric, bits):
    x = make_input((8, 6), torch.float32, seed=6)
    x[3, 1] = float("nan")
    x[6, 0] = float("inf")
    layout = (2, 2, 1)
    check_swizzle(x, 8, bits, symmetric, layout, device)
    _, params = ops.swizzle_quantize(x.to(device), 8, bits, symmetric, 1, 2, 2)
    bad_slots = {ref_swizzle_order(8, 1, 2, 2).index(g) for g in (3, 6)}
    for slot in range(8):
        assert bool(params[slot].isnan().all()) == (slot in bad_slots)
    # LoCo: the error of those two groups becomes NaN, every other group's is exact
    e = make_input((48,), torch.float32, seed=7) * 1e-2
    check_loco_swizzle(x, e, 0.5, 8, bits, symmetric, layout, device)


# ------------------------------------------------------------------ quantized reduction


def make_tensors(
    devices: int, per_tensor: int, values: int, bits: int, symmetric: bool, kind: str, seed: int
) -> tuple[Tensor, Tensor]:
    """L tensors of `values` values in `per_tensor` groups each, back to back: (q 1-D, params).

    kind "quantized": real quantizer output (the reference's) of random data per tensor;
    "arbitrary": random codes and random params (any step sign or size, any offset).
    """
    gen = torch.Generator().manual_seed(seed)
    if kind == "quantized":
        qs, ps = [], []
        for j in range(devices):
            x = make_input((values,), torch.float32, seed=seed * 31 + j) * (j + 1)
            q, p = ref_quantize(x, per_tensor, bits, symmetric)
            qs.append(q)
            ps.append(p)
        return torch.cat(qs), torch.cat(ps)
    q = torch.randint(-128, 128, (devices * values * bits // 8,), generator=gen, dtype=torch.int8)
    params = torch.randn(devices * per_tensor, 1 if symmetric else 2, generator=gen)
    params *= 10.0 ** torch.randint(-4, 4, params.shape, generator=gen)
    return q, params


def check_reduction(q, params, in_groups, out_groups, bits, symmetric, devices, device):
    got_q, got_p = ops.quantized_reduction(*on(device, q, params), in_groups, out_groups, bits, symmetric, devices)
    want_q, want_p = ref_quantized_reduction(q, params, in_groups, out_groups, bits, symmetric, devices)
    assert got_q.device.type == got_p.device.type == torch.device(device).type
    assert_same(got_p, want_p, "params")
    total = ref_reduction_sum(q, params, in_groups, bits, symmetric, devices)
    finite = ref_finite_mask(total, out_groups)
    assert_same(codes_of_storage(got_q, bits)[finite], codes_of_storage(want_q, bits)[finite], "q")
    assert got_q.shape == want_q.shape and got_q.dtype == torch.int8


# (L, groups per tensor, in-group size, out_groups): out groups of 1..3 values, out groups
# that cross in-group boundaries, in groups of 1..3 values, the qgZ shape (out = in / L).
REDUCTION_CASES = [
    (1, 1, 8, 1),
    (2, 1, 8, 1),
    (2, 3, 6, 6),  # out group size 3
    (2, 4, 6, 12),  # out group size 2
    (4, 2, 6, 12),  # out group size 1
    (3, 4, 3, 2),  # in groups of 3, out groups of 6 straddle them
    (3, 2, 2, 1),  # in groups of 2 values
    (8, 2, 8, 2),  # qgZ: in_groups = G = 16, out_groups = G / L
    (16, 2, 10, 2),  # L = 16
    (4, 5, 26, 13),  # odd out groups (10 values) in 4-bit: pairs straddle output groups
]


@SYM
@BITS
@pytest.mark.parametrize("kind", ["quantized", "arbitrary"])
@pytest.mark.parametrize(("devices", "per_tensor", "in_size", "out_groups"), REDUCTION_CASES, ids=str)
def test_reduction_matches_reference(device, symmetric, bits, kind, devices, per_tensor, in_size, out_groups):
    values = per_tensor * in_size
    q, params = make_tensors(devices, per_tensor, values, bits, symmetric, kind, seed=devices + in_size)
    check_reduction(q, params, devices * per_tensor, out_groups, bits, symmetric, devices, device)


@SYM
@BITS
def test_reduction_tiny_groups(device, symmetric, bits):
    """Groups of E = 1, 2, 3 values in the inputs and the output (4-bit too: the nibble pairs
    of a byte then belong to different groups)."""
    for in_size, out_size in [(1, 1), (1, 3), (3, 1), (2, 3), (3, 2)]:
        values = 12 * out_size  # divisible by both sizes
        per_tensor = values // in_size
        q, params = make_tensors(2, per_tensor, values, bits, symmetric, "quantized", seed=in_size)
        check_reduction(q, params, 2 * per_tensor, values // out_size, bits, symmetric, 2, device)


@SYM
@BITS
def test_reduction_multidim_q(device, symmetric, bits):
    """q [2, B]: the L tensors are still equal slices of the flat stream; out shape [2, B/L]."""
    q, params = make_tensors(2, 4, 48, bits, symmetric, "quantized", seed=3)
    q2 = q.reshape(2, -1)
    got_q, _ = ops.quantized_reduction(q2.to(device), params.to(device), 8, 4, bits, symmetric, 2)
    assert got_q.shape == (2, q2.shape[1] // 2)
    check_reduction(q2, params, 8, 4, bits, symmetric, 2, device)
    check_reduction(q2.t().contiguous().t(), params.t().contiguous().t(), 8, 4, bits, symmetric, 2, device)


@SYM
@BITS
def test_reduction_large_groups(device, symmetric, bits):
    """Input and output groups of 70000 values: the chunked path; out groups of 140000 too."""
    q, params = make_tensors(2, 2, 140000, bits, symmetric, "quantized", seed=11)
    for out_groups in (2, 1):
        check_reduction(q, params, 4, out_groups, bits, symmetric, 2, device)
    e = make_input((140000,), torch.float16, seed=12) * 1e-2
    check_loco_reduction(q, params, e, 0.5, 4, 2, bits, symmetric, 2, device)


# (L, groups per tensor, in-group size, out_groups) sized for the CPU's fused reduction
# (kernels/cpu/zeropp_cpu_impl.h), which sums and quantizes tiles of whole output groups
# of about 4096 values: several tiles per task with a short last tile, in groups whose
# pieces cross the 1024-value sub-tiles, one group per tile (5000 and 14000 values),
# L = 8 (qgZ), and odd output groups (unfused for 4 bits).
FUSED_REDUCTION_CASES = [
    (8, 200, 96, 300),  # out groups of 64: tiles of 64 groups, tasks of 256, last tile 44
    (2, 75, 400, 600),  # out groups of 50 straddle in groups of 400
    (2, 2, 5000, 2),  # out groups of 5000 > one tile
    (3, 4, 7000, 2),  # out groups of 14000 = 2 in groups
    (8, 4, 1024, 4096),  # out groups of 1 value
    (2, 9, 1001, 3),  # out groups of 3003 (odd)
]


@SYM
@BITS
@pytest.mark.parametrize("kind", ["quantized", "arbitrary"])
@pytest.mark.parametrize(("devices", "per_tensor", "in_size", "out_groups"), FUSED_REDUCTION_CASES, ids=str)
def test_reduction_fused_tiles(device, symmetric, bits, kind, devices, per_tensor, in_size, out_groups):
    values = per_tensor * in_size
    if bits == 4 and values % 2:
        pytest.skip("4-bit codes of L tensors of an odd value count do not split into whole bytes")
    q, params = make_tensors(devices, per_tensor, values, bits, symmetric, kind, seed=per_tensor + in_size)
    check_reduction(q, params, devices * per_tensor, out_groups, bits, symmetric, devices, device)


@SYM
@BITS
@pytest.mark.parametrize(("shape", "devices"), [((0,), 1), ((0,), 2), ((3, 0), 2)], ids=str)
def test_reduction_empty(device, symmetric, bits, shape, devices):
    q = torch.empty(shape, dtype=torch.int8)
    params = torch.ones(devices, 1 if symmetric else 2)
    check_reduction(q, params, devices, 1, bits, symmetric, devices, device)
    got_q, got_p = ops.quantized_reduction(q.to(device), params.to(device), devices, 1, bits, symmetric, devices)
    assert got_q.shape == (*shape[:-1], 0)
    assert got_p.cpu().tolist() == ([[1.0]] if symmetric else [[1.0, 0.0]])  # step 1, offset 0
    check_loco_reduction(q, params, torch.empty(0), 0.5, devices, 1, bits, symmetric, devices, device)


def test_reduction_deepspeed_example(device):
    """deepspeed-behaviour.md §7: L=2, 8-bit symmetric, one group of 8 values per tensor."""
    t0 = torch.tensor([1, -0.5, 0.25, -2, 0, 0.75, 2, -1.5])
    t1 = torch.tensor([0.5] * 4 + [-0.5] * 4)
    q0, p0 = ops.quantize(t0.to(device), 1, 8, True)
    q1, p1 = ops.quantize(t1.to(device), 1, 8, True)
    assert q0.tolist() == [64, -32, 16, -128, 0, 48, 127, -96] and p0.item() == 1 / 64
    assert q1.tolist() == [127] * 4 + [-128] * 4 and p1.item() == 1 / 256
    q, p = ops.quantized_reduction(torch.cat([q0, q1]), torch.cat([p0, p1]), 2, 1, 8, True, 2)
    assert q.tolist() == [96, 0, 48, -96, -32, 16, 95, -128]
    assert p.tolist() == [[1 / 64]]
    sum_ = ref_reduction_sum(torch.cat([q0, q1]), torch.cat([p0, p1]), 2, 8, True, 2)
    assert sum_.tolist() == pytest.approx([1.496, -0.0039, 0.746, -1.504, -0.5, 0.25, 1.484, -2.0], abs=1e-3)


@BITS
@pytest.mark.parametrize("devices", [2, 4, 8])
def test_reduction_asymmetric_reads_each_tensors_params(device, bits, devices):
    """DeepSpeed read tensor j's [step, offset] rows at float offset j*g_t instead of 2*j*g_t.
    Here all codes are 0, so group k of tensor j dequantizes to its offset 100*j + 10*k exactly,
    and output group k is the constant sum_j (100*j + 10*k): params [1, that sum], codes 0."""
    per_tensor, size = 3, 4
    q = torch.zeros(devices * per_tensor * size * bits // 8, dtype=torch.int8)
    params = torch.tensor([[2.0 ** -(j + k), 100.0 * j + 10.0 * k] for j in range(devices) for k in range(per_tensor)])
    got_q, got_p = ops.quantized_reduction(
        q.to(device), params.to(device), devices * per_tensor, per_tensor, bits, False, devices
    )
    want = [[1.0, sum(100.0 * j + 10.0 * k for j in range(devices))] for k in range(per_tensor)]
    assert got_p.cpu().tolist() == want
    assert bool((got_q == 0).all())
    # random codes too: the dequantized output is within one output step of the exact sum
    q, _ = make_tensors(devices, per_tensor, per_tensor * size, bits, False, "arbitrary", seed=devices)
    check_reduction(q, params, devices * per_tensor, per_tensor, bits, False, devices, device)
    got_q, got_p = ops.quantized_reduction(
        q.to(device), params.to(device), devices * per_tensor, per_tensor, bits, False, devices
    )
    codes = codes_of_storage(q, bits).to(torch.float64).reshape(devices, per_tensor, size)
    p64 = params.to(torch.float64).reshape(devices, per_tensor, 1, 2)
    exact = (codes * p64[..., 0] + p64[..., 1]).sum(0).reshape(-1)
    y = ref_dequantize(got_q, got_p, per_tensor, bits, False, torch.float32).to(torch.float64).reshape(-1)
    steps = got_p[:, 0].cpu().to(torch.float64).repeat_interleave(size)
    assert bool(((y - exact).abs() <= steps * 1.001).all())


@pytest.mark.parametrize("devices", [8, 16])
def test_reduction_accumulates_in_fp32(device, devices):
    """Each tensor holds +-60000 (finite in fp16), the sums +-480000 / 960000 would be inf in an
    fp16 accumulator; and 1 + 15 * 2^-12 (fp16 would round each add back to 1) stays exact."""
    size = 4
    codes = torch.tensor([120, -120, 120, 0], dtype=torch.int8).repeat(devices)  # 120 * 500 = 60000
    steps = torch.full((devices, 1), 500.0)
    q, p = ops.quantized_reduction(codes.to(device), steps.to(device), devices, 1, 8, True, devices)
    total = 60000.0 * devices
    assert p.tolist() == [[total / 128]]
    assert q.tolist() == [127, -128, 127, 0]
    check_reduction(codes, steps, devices, 1, 8, True, devices, device)

    ones = torch.tensor([64] * size + [1] * size * (devices - 1), dtype=torch.int8)  # tensor 0: 1.0, then 2^-12
    steps = torch.tensor([[1 / 64]] + [[2.0**-12]] * (devices - 1))
    q, p = ops.quantized_reduction(ones.to(device), steps.to(device), devices, 1, 8, True, devices)
    s = 1 + (devices - 1) * 2.0**-12
    assert p.item() == (torch.tensor(1.0) / (torch.tensor(128.0) / torch.tensor(s))).item()
    assert s != float(torch.tensor(1.0, dtype=torch.float16) + torch.tensor(2.0**-12, dtype=torch.float16))
    check_reduction(ones, steps, devices, 1, 8, True, devices, device)


@SYM
@BITS
def test_reduction_non_finite_group_is_isolated(device, symmetric, bits):
    """A NaN (or inf) param row of one input group poisons exactly the output groups holding it."""
    devices, per_tensor, size = 2, 4, 6
    q, params = make_tensors(devices, per_tensor, per_tensor * size, bits, symmetric, "quantized", seed=2)
    params[per_tensor + 1, 0] = float("nan")  # tensor 1, group 1: values 6..11
    params[2, 0] = float("inf")  # tensor 0, group 2: values 12..17
    for out_groups in (4, 8, 2):
        check_reduction(q, params, devices * per_tensor, out_groups, bits, symmetric, devices, device)
        _, got_p = ops.quantized_reduction(
            q.to(device), params.to(device), devices * per_tensor, out_groups, bits, symmetric, devices
        )
        out_size = per_tensor * size // out_groups
        bad = {v // out_size for v in range(6, 18)}
        for k in range(out_groups):
            assert bool(got_p[k].isnan().all()) == (k in bad), (out_groups, k)


# ------------------------------------------------------------------ LoCo


def check_loco_swizzle(x, e, beta, groups, bits, symmetric, layout, device) -> tuple[Tensor, Tensor]:
    """Runs the op on a copy of `e` on `device` (kept in its layout), compares q, params and the
    updated error with the reference; returns the op's (q, params)."""
    nodes, devices, pipeline = layout
    e_dev = copy_on(device, e)
    q, params = ops.loco_swizzle_quantize(x.to(device), e_dev, beta, groups, bits, symmetric, pipeline, nodes, devices)
    want_q, want_p, want_e = ref_loco_swizzle_quantize(x, e, beta, groups, bits, symmetric, pipeline, nodes, devices)
    assert_same(params, want_p, "params")
    finite = _finite_codes(want_p, x.numel())
    assert_same(codes_of_storage(q, bits)[finite], codes_of_storage(want_q, bits)[finite], "q")
    assert_same(e_dev, want_e, "error_feedback")
    return q, params


def _finite_codes(params: Tensor, numel: int) -> Tensor:
    """Per code: True where its group's params are finite (codes of other groups are undefined)."""
    groups = params.shape[0]
    ok = torch.isfinite(params).all(dim=1)
    return ok.repeat_interleave(numel // groups) if groups else ok


def check_loco_reduction(q, params, e, beta, in_groups, out_groups, bits, symmetric, devices, device):
    e_dev = copy_on(device, e)
    got_q, got_p = ops.loco_quantized_reduction(
        *on(device, q, params), e_dev, beta, in_groups, out_groups, bits, symmetric, devices
    )
    want_q, want_p, want_e = ref_loco_quantized_reduction(
        q, params, e, beta, in_groups, out_groups, bits, symmetric, devices
    )
    assert_same(got_p, want_p, "params")
    finite = _finite_codes(want_p, e.numel())
    assert_same(codes_of_storage(got_q, bits)[finite], codes_of_storage(want_q, bits)[finite], "q")
    assert got_q.shape == want_q.shape
    assert_same(e_dev, want_e, "error_feedback")
    return got_q, got_p


def test_loco_swizzle_deepspeed_example(device):
    """deepspeed-behaviour.md §8 (4-bit symmetric, beta = 0.5; DeepSpeed computed in fp16)."""
    x = torch.tensor([0.3, -0.1, 0.8, -0.55, 0.05, 0.2, -0.9, 0.4], device=device)
    e = torch.tensor([0.02, 0.01, -0.03, 0, 0.01, -0.02, 0.05, 0], device=device)
    q, p = ops.loco_swizzle_quantize(x, e, 0.5, 1, 4, True, 1, 1, 1)
    assert codes_of_storage(q, 4).tolist() == [3, -1, 7, -5, 1, 2, -8, 4]
    assert p.item() == pytest.approx(0.10626, abs=2e-5)
    want = [0.0106, 0.0132, -0.0018, -0.0093, -0.0181, -0.0263, 0.025, -0.0126]
    assert e.cpu().tolist() == pytest.approx(want, abs=1.5e-4)  # DeepSpeed's figures: fp16, 4 decimals


@DTYPE
@SYM
@LAYOUT
@BITS
def test_loco_swizzle_matches_reference(device, dtype, symmetric, nodes, devices, pipeline, bits):
    groups = 2 * nodes * devices * pipeline
    x = make_input((groups, 6), dtype, seed=bits)
    e = make_input((groups * 6,), dtype, seed=bits + 1) * 0.05
    check_loco_swizzle(x, e, 0.5, groups, bits, symmetric, (nodes, devices, pipeline), device)


@SYM
@BITS
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0, 1 / 3])
def test_loco_swizzle_other_betas(device, symmetric, bits, beta):
    x = make_input((48, 10), torch.float16, seed=2)
    e = make_input((480,), torch.float16, seed=3) * 0.01
    check_loco_swizzle(x, e, beta, 48, bits, symmetric, (3, 2, 2), device)
    if beta == 1.0:  # e <- 1*e + 0*(s - d): unchanged
        e2 = copy_on(device, e)
        ops.loco_swizzle_quantize(x.to(device), e2, 1.0, 48, bits, symmetric, 2, 3, 2)
        assert torch.equal(e2.cpu(), e)


def half_ulp(v: Tensor, dtype: torch.dtype) -> Tensor:
    """Half a unit in the last place of `dtype` at |v| (float64), subnormals included."""
    info = torch.finfo(dtype)
    mant = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[dtype]
    v = v.to(torch.float64).abs()
    _, exp = torch.frexp(v)
    ulp = torch.pow(2.0, (exp - 1 - mant).to(torch.float64))
    tiny = torch.tensor(info.smallest_normal * info.eps, dtype=torch.float64)  # the subnormal step
    return torch.where(v == 0, tiny, torch.maximum(ulp, tiny)) / 2


def check_invariant(s32: Tensor, d: Tensor, e_new: Tensor, exact: bool) -> None:
    """beta = 0: s == dequant(q) + e_new, with s the kernel's fp32 x + e_old.

    e_new = fl32(s - d) rounded to e's dtype. In fp32, symmetric, s - d is exact (Sterbenz:
    q != 0 puts s within [d/2, 2d]; q == 0 gives d == 0), so the identity holds bit for bit in
    fp32 arithmetic. Otherwise (asymmetric: s and d may straddle 0; or e stored in fp16/bf16)
    the gap is at most the rounding of s - d in fp32 plus the rounding of e_new to its dtype.
    """
    s64, d64, e64 = (t.cpu().reshape(-1).to(torch.float64) for t in (s32, d, e_new))
    if exact:
        assert_same(d.cpu().reshape(-1) + e_new.cpu().reshape(-1), s32.cpu().reshape(-1), "d + e_new == s")
        return
    residual = s64 - d64
    bound = half_ulp(residual, torch.float32) + half_ulp(e64, e_new.dtype)
    gap = (s64 - (d64 + e64)).abs()
    assert bool((gap <= bound).all()), f"max gap {gap.max().item()} > bound {bound[gap.argmax()].item()}"


@DTYPE
@SYM
@BITS
@pytest.mark.parametrize("layout", [(2, 4, 2), (3, 2, 1)], ids=str)
def test_loco_swizzle_invariant_beta0(device, dtype, symmetric, bits, layout):
    nodes, devices, pipeline = layout
    groups = 4 * nodes * devices * pipeline
    x = make_input((groups, 20), torch.float32, seed=1)
    # groups shifted off centre: asymmetric ranges that straddle 0 unevenly (s and d of
    # opposite signs, where fp32 s - d rounds)
    x = (x + torch.linspace(-1, 1, groups)[:, None] * x.abs().amax(1, keepdim=True)).to(dtype)
    e_old = make_input((groups * 20,), dtype, seed=2) * 0.05
    e = e_old.clone().to(device)
    q, params = ops.loco_swizzle_quantize(x.to(device), e, 0.0, groups, bits, symmetric, pipeline, nodes, devices)
    s32 = ref_swizzle(x, groups, pipeline, nodes, devices).float() + e_old.float()  # swizzled(x) + e_old
    d = ops.dequantize(q, params, groups, bits, symmetric, torch.float32)
    check_invariant(s32, d, e, exact=dtype == torch.float32 and symmetric)
    # and |e_new| is the quantization error: half a step, about one step for the clamped top
    # value (Qmax*p0 misses m by ~Qmax roundings of p0), plus the rounding of e_new to its dtype
    steps = params[:, 0].cpu().to(torch.float64).repeat_interleave(20)
    assert bool((e.cpu().to(torch.float64).abs() <= steps * 1.001 + half_ulp(steps, dtype)).all())


def test_loco_error_feedback_averages_out(device):
    """beta = 0, T steps on the same x: s_t = fl32(x + e_{t-1}) = x + e_{t-1} + r_t and
    d_t = s_t - e_t, so mean_t d_t = x + (e_0 - e_T + sum_t r_t) / T: the error of the mean
    shrinks like 1/T (bounded by |e_T| and the fp32 roundings r_t), unlike plain quantization."""
    x = make_input((16, 32), torch.float32, seed=3)
    xs = ref_swizzle(x, 16, 1, 2, 2)
    e = torch.zeros(512, device=device)
    total = torch.zeros(512, dtype=torch.float64)
    roundings = torch.zeros(512, dtype=torch.float64)
    steps = 64
    for _ in range(steps):
        roundings += half_ulp(xs + e.cpu(), torch.float32)  # |r_t| <= half an ulp of s_t
        q, p = ops.loco_swizzle_quantize(x.to(device), e, 0.0, 16, 4, True, 1, 2, 2)
        total += ops.dequantize(q, p, 16, 4, True, torch.float32).cpu().double()
    err = (total / steps - xs.double()).abs()
    bound = (e.cpu().double().abs() + roundings) / steps
    assert bool((err <= bound * (1 + 1e-9)).all()), (err - bound).max()
    plain = ops.dequantize(*ops.swizzle_quantize(x.to(device), 16, 4, True, 1, 2, 2), 16, 4, True, torch.float32)
    assert err.mean() < (plain.cpu().double() - xs.double()).abs().mean() / 16


@DTYPE
@SYM
def test_loco_swizzle_non_contiguous(device, dtype, symmetric):
    """A strided and a transposed error buffer are updated in place; their neighbours are not."""
    x = make_input((64, 12), dtype, seed=4).t()  # non-contiguous input too
    before = make_input((768, 2), dtype, seed=5) * 0.05
    check_loco_swizzle(x, before[:, 0], 0.5, 16, 8, symmetric, (2, 4, 2), device)  # stride 2
    storage = before.clone().to(device)
    ops.loco_swizzle_quantize(x.to(device), storage[:, 0], 0.5, 16, 8, symmetric, 2, 2, 4)
    want = ref_loco_swizzle_quantize(x, before[:, 0], 0.5, 16, 8, symmetric, 2, 2, 4)[2]
    assert_same(storage[:, 0], want, "strided error updated in place")
    assert_same(storage[:, 1], before[:, 1], "the other column is untouched")

    e2 = (make_input((48, 16), dtype, seed=6) * 0.05).t()  # [16, 48] transposed, logical order
    check_loco_swizzle(x, e2, 0.5, 16, 4, symmetric, (2, 4, 2), device)


@SYM
@BITS
@pytest.mark.parametrize("e_dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("devices", "per_tensor", "in_size", "out_groups"), REDUCTION_CASES[1:6], ids=str)
def test_loco_reduction_matches_reference(device, symmetric, bits, e_dtype, devices, per_tensor, in_size, out_groups):
    values = per_tensor * in_size
    q, params = make_tensors(devices, per_tensor, values, bits, symmetric, "quantized", seed=devices)
    e = make_input((values,), e_dtype, seed=in_size) * 0.05
    check_loco_reduction(q, params, e, 0.5, devices * per_tensor, out_groups, bits, symmetric, devices, device)


@SYM
@BITS
@pytest.mark.parametrize("e_dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_loco_reduction_invariant_beta0(device, symmetric, bits, e_dtype):
    devices, per_tensor, size, out_groups = 4, 3, 40, 3
    values = per_tensor * size
    q, params = make_tensors(devices, per_tensor, values, bits, symmetric, "quantized", seed=7)
    e_old = make_input((values,), e_dtype, seed=8) * 0.05
    e = e_old.clone().to(device)
    got_q, got_p = ops.loco_quantized_reduction(
        q.to(device), params.to(device), e, 0.0, devices * per_tensor, out_groups, bits, symmetric, devices
    )
    s32 = ref_reduction_sum(q, params, devices * per_tensor, bits, symmetric, devices) + e_old.float()
    d = ops.dequantize(got_q, got_p, out_groups, bits, symmetric, torch.float32)
    check_invariant(s32, d, e, exact=e_dtype == torch.float32 and symmetric)
    check_loco_reduction(q, params, e_old, 0.0, devices * per_tensor, out_groups, bits, symmetric, devices, device)


@SYM
def test_loco_reduction_non_contiguous_error(device, symmetric):
    """A strided error buffer (every third element of a bigger tensor) is updated in place."""
    q, params = make_tensors(2, 4, 48, 4, symmetric, "quantized", seed=9)
    before = make_input((144,), torch.bfloat16, seed=10) * 0.05
    check_loco_reduction(q, params, before[1::3], 0.5, 8, 6, 4, symmetric, 2, device)
    storage = before.clone().to(device)
    ops.loco_quantized_reduction(q.to(device), params.to(device), storage[1::3], 0.5, 8, 6, 4, symmetric, 2)
    want = ref_loco_quantized_reduction(q, params, before[1::3], 0.5, 8, 6, 4, symmetric, 2)[2]
    assert_same(storage[1::3], want, "strided error updated in place")
    untouched = torch.ones(144, dtype=torch.bool)
    untouched[1::3] = False
    assert_same(storage[untouched], before[untouched], "neighbours untouched")
    # a transposed 2-D buffer: indexed in logical (row-major) order like every qkit tensor
    check_loco_reduction(q, params, before[:48].reshape(8, 6).t(), 0.5, 8, 6, 4, symmetric, 2, device)


@SYM
def test_loco_reduction_non_finite_is_isolated(device, symmetric):
    q, params = make_tensors(2, 4, 24, 8, symmetric, "quantized", seed=11)
    e = make_input((24,), torch.float32, seed=12) * 0.05
    e[7] = float("nan")  # output group 1 (values 6..11)
    check_loco_reduction(q, params, e, 0.5, 8, 4, 8, symmetric, 2, device)


def test_loco_bumps_version_counter(device):
    """Like every in-place op (and fake_quantize_), the LoCo ops tell autograd that
    `error_feedback` changed, so a saved tensor aliasing it is detected as modified."""
    x = make_input((4, 8), torch.float32, seed=1).to(device)
    e = torch.zeros(32, device=device)
    v = e._version
    ops.loco_swizzle_quantize(x, e, 0.5, 4, 8, True, 1, 2, 2)
    assert e._version > v, "loco_swizzle_quantize"
    q, p = ops.quantize(x, 4, 8, True)
    e2 = torch.zeros(16, device=device)
    v = e2._version
    ops.loco_quantized_reduction(q, p, e2, 0.5, 4, 2, 8, True, 2)
    assert e2._version > v, "loco_quantized_reduction"


@pytest.mark.parametrize("op", ["loco_swizzle_quantize", "loco_quantized_reduction"])
def test_loco_error_feedback_requiring_grad(device, op):
    """Like fake_quantize_ (and aten's in-place ops on a leaf that requires grad), the LoCo ops
    refuse to overwrite an error buffer that requires grad, naming it; under no_grad they may."""
    x = make_input((4, 8), torch.float32, seed=1).to(device)
    q, p = ops.quantize(x, 4, 8, True)

    def call(e):
        if op == "loco_swizzle_quantize":
            return ops.loco_swizzle_quantize(x, e, 0.5, 4, 8, True, 1, 2, 2)
        return ops.loco_quantized_reduction(q, p, e, 0.5, 4, 2, 8, True, 2)

    numel = 32 if op == "loco_swizzle_quantize" else 16
    e = torch.zeros(numel, device=device, requires_grad=True)
    with pytest.raises((RuntimeError, ValueError), match=rf"qkit\.{op}:.*`error_feedback`"):
        call(e)
    assert bool((e == 0).all()), "refused before writing"
    with torch.no_grad():
        call(e)
    assert not bool((e == 0).all())


# ------------------------------------------------------------------ dequantize_unsigned


def test_unsigned_example(device):
    """int4: byte 0xF0 is codes (15, 0), 0x1E is (1, 14); y = code / scale + minv."""
    data = torch.tensor([0xF0, 0x1E], dtype=torch.uint8)
    for raw in (data, data.view(torch.int8)):
        y = ops.dequantize_unsigned(
            raw.to(device), torch.tensor([2.0]).half().to(device), torch.tensor([-1.0]).half().to(device), 1, 4, 4
        )
        assert y.dtype == torch.float16 and y.shape == (1, 4)
        assert y.cpu().tolist() == [[6.5, -1.0, -0.5, 6.0]]
    y = ops.dequantize_unsigned(
        torch.tensor([255, 0, 128], dtype=torch.uint8).to(device),
        torch.tensor([4.0]).to(device),
        torch.tensor([0.5]).to(device),
        1,
        3,
        8,
    )
    assert y.cpu().tolist() == [[64.25, 0.5, 32.5]]


@BITS
@pytest.mark.parametrize("num_groups", [0, 1, 2, 3, 33])
@pytest.mark.parametrize("group_size", [1, 3, 8, 130])
@pytest.mark.parametrize("pdtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_unsigned_matches_reference(device, bits, num_groups, group_size, pdtype):
    numel = num_groups * group_size
    if bits == 4 and numel % 2:
        group_size *= 2  # 4-bit codes come in pairs (odd group sizes still straddle bytes)
        numel = num_groups * group_size
    gen = torch.Generator().manual_seed(num_groups * 131 + group_size)
    data = torch.randint(0, 256, (numel * bits // 8,), generator=gen, dtype=torch.uint8)
    scale = ((torch.rand(num_groups, generator=gen) + 0.1) * 100).to(pdtype)
    minv = (torch.randn(num_groups, generator=gen) * 3).to(pdtype)
    for raw in (data, data.view(torch.int8)):
        got = ops.dequantize_unsigned(*on(device, raw, scale, minv), num_groups, group_size, bits)
        assert_same(got, ref_dequantize_unsigned(raw, scale, minv, num_groups, group_size, bits))


@BITS
def test_unsigned_round_trip_of_deepspeed_producer(device, bits):
    """deepspeed/inference/quantization's producer: scale = (2^b - 1)/(mx - mn), q = round((x - mn)*scale).
    Dequantizing returns x within half a step (plus fp16 rounding), with 1..3 groups (DeepSpeed: no launch)."""
    for num_groups in (1, 2, 3):
        x = make_input((num_groups, 64), torch.float32, seed=num_groups)
        mn, mx = x.amin(1), x.amax(1)
        scale = (2**bits - 1) / (mx - mn)
        codes = torch.round((x - mn[:, None]) * scale[:, None]).clamp(0, 2**bits - 1).to(torch.int32).reshape(-1)
        if bits == 4:
            codes = (codes[0::2] << 4) | codes[1::2]
        data = codes.to(torch.uint8)
        y = ops.dequantize_unsigned(*on(device, data, scale.half(), mn.half()), num_groups, 64, bits).cpu().float()
        tol = 0.5 / scale.half().float()[:, None] + 2e-3 * x.abs().amax() + 1e-3
        assert bool(((y - x).abs() <= tol).all())


@BITS
def test_unsigned_non_contiguous_inputs(device, bits):
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (2, 3 * 16 * bits // 8), generator=gen, dtype=torch.uint8)[1]
    wide = torch.randint(0, 256, (3 * 16 * bits // 8, 2), generator=gen, dtype=torch.uint8)
    scale = torch.tensor([[3.0, 9.0], [5.0, 9.0], [7.0, 9.0]]).half()[:, 0]
    minv = torch.tensor([-1.0, 0.0, 1.0]).half().expand(2, 3)[1]
    for raw in (data, wide[:, 1]):
        got = ops.dequantize_unsigned(*on(device, raw, scale, minv), 3, 16, bits)
        assert_same(got, ref_dequantize_unsigned(raw.contiguous(), scale, minv, 3, 16, bits))


@pytest.mark.parametrize("bad", ["scale-nan", "minv-nan", "scale-zero", "minv-inf"])
def test_unsigned_non_finite_group_is_isolated(device, bad):
    gen = torch.Generator().manual_seed(2)
    data = torch.randint(1, 256, (3 * 8,), generator=gen, dtype=torch.uint8)
    scale = torch.tensor([2.0, 3.0, 5.0])
    minv = torch.tensor([0.5, -0.5, 1.0])
    what, value = bad.split("-")
    (scale if what == "scale" else minv)[1] = {"nan": float("nan"), "zero": 0.0, "inf": float("inf")}[value]
    got = ops.dequantize_unsigned(*on(device, data, scale, minv), 3, 8, 8).cpu()
    assert_same(got, ref_dequantize_unsigned(data, scale, minv, 3, 8, 8))
    assert bool(torch.isfinite(got[[0, 2]]).all())
    assert not bool(torch.isfinite(got[1]).any())


# ------------------------------------------------------------------ threads


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_any_thread_count(set_threads, threads):
    """Results never depend on how the CPU work is split (pieces of groups across tasks)."""
    set_threads(threads)
    x = make_input((8, 20002), torch.bfloat16, seed=threads)
    e = make_input((8 * 20002,), torch.bfloat16, seed=1) * 1e-2
    for bits in WIRE_BITS:
        check_swizzle(x, 8, bits, False, (2, 2, 2), "cpu")
        check_loco_swizzle(x, e, 0.5, 8, bits, True, (2, 2, 2), "cpu")
        q, params = make_tensors(4, 2, 20002, bits, True, "quantized", seed=threads)
        check_reduction(q, params, 8, 73, bits, True, 4, "cpu")
        check_loco_reduction(q, params, e[:20002], 0.3, 8, 2, bits, True, 4, "cpu")
