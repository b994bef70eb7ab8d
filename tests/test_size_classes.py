"""Every size class of the quantizing kernels, and every boundary between them.

The CUDA quantizer picks a path per call (kernels/cuda/quantize_cuda.cu): a single
pass whose groups sit in registers, in four classes (threads per group x elements
per thread: 4 x 8, 32 x 8, 32 x 32, 256 x 32, so groups of up to 32, 256, 1024 and
8192 elements), with 16-byte vector accesses when the group size and the pointers
allow and scalar ones otherwise; larger groups, and 4-bit codes of odd groups, take
the chunked three-launch path. Grids stop at 4096 blocks and stride. These cases
put a group size on each side of every boundary, misaligned pointers, every
dtype, 4- and 8-bit codes, stochastic rounding and grids that stride, and compare
bit for bit with the pure-PyTorch reference on every device (``emu`` runs the CUDA
kernels themselves; on "cpu" they check the same contract for the CPU kernels).
"""

from __future__ import annotations

import pytest
import torch

import qkit
from helpers import assert_same, make_input
from reference import (
    ref_dequantize,
    ref_dequantize_unsigned,
    ref_fake_quantize,
    ref_quantize,
    ref_stochastic_fake_quantize,
)
from test_zeropp_ops import check_loco_swizzle, check_reduction, check_swizzle, make_tensors

# Class capacities 32, 256, 1024, 8192 (then the chunked path); 16-bit vectors hold 8
# elements, fp32 vectors 4: sizes that are multiples of 8 take vectors in every dtype,
# sizes that are multiples of 4 only in fp32, odd sizes never.
GROUP_SIZES = [1, 2, 3, 4, 8, 12, 31, 32, 33, 40, 255, 256, 257, 264, 1023, 1024, 1025, 1032, 8191, 8192, 8193, 8200]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))


def _groups_for(group_size: int) -> int:
    return 3 if group_size <= 1024 else 2


@DTYPE
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_fake_quantize_each_class(device, dtype, group_size):
    groups = _groups_for(group_size)
    x = make_input((groups, group_size), dtype, seed=group_size)
    for bits, symmetric in ((8, True), (3, False)):
        got = qkit.fake_quantize(x.to(device), groups=groups, bits=bits, symmetric=symmetric)
        assert_same(got, ref_fake_quantize(x, groups, bits, symmetric), f"E={group_size} {bits}-bit sym={symmetric}")


@DTYPE
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_each_class(device, dtype, group_size, bits):
    groups = 2 if bits == 4 else _groups_for(group_size)  # 4 bits: an even element count (odd groups straddle bytes)
    x = make_input((group_size, 2) if bits == 4 else (groups, group_size), dtype, seed=7 + group_size)
    for symmetric in (True, False):
        q, params = qkit.quantize(x.to(device), groups=groups, bits=bits, symmetric=symmetric)
        want_q, want_params = ref_quantize(x, groups, bits, symmetric)
        assert_same(params, want_params, f"params E={group_size}")
        assert_same(q, want_q, f"codes E={group_size} {bits}-bit sym={symmetric}")


@pytest.mark.parametrize("group_size", [32, 256, 1024, 8192])
@pytest.mark.parametrize("offset", [1, 2, 3])
def test_misaligned_pointers_take_the_scalar_path(device, group_size, offset):
    """A view starting `offset` elements into its storage: vector-sized groups, unaligned addresses."""
    groups = 2
    storage = make_input((groups * group_size + offset,), torch.float32, seed=offset).to(device)
    x = storage[offset:]
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    assert_same(qkit.fake_quantize(x, groups=groups, bits=8), ref_fake_quantize(x.cpu(), groups, 8, True))
    q, params = qkit.quantize(x, groups=groups, bits=8, symmetric=False)
    want_q, want_params = ref_quantize(x.cpu(), groups, 8, False)
    assert_same(q, want_q, "codes")
    assert_same(params, want_params, "params")
    out = torch.empty(groups * group_size + 1, device=device)[1:]  # unaligned output, aligned input
    qkit.fake_quantize(storage[:-offset] if offset else storage, groups=groups, bits=8, out=out)
    assert_same(out, ref_fake_quantize(storage[: groups * group_size].cpu(), groups, 8, True), "unaligned out=")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group_size", [3, 32, 33, 256, 264, 1024, 1025, 8192, 8193])
def test_stochastic_each_class(device, dtype, group_size):
    """Element e draws word e % 4 of Philox block e // 4 in every class and access width."""
    groups = 2
    x = make_input((groups * group_size,), dtype, seed=group_size).to(device)
    torch.manual_seed(99)
    seed = torch.empty(1, dtype=torch.int64, device=device).random_().item()
    torch.manual_seed(99)
    got = qkit.fake_quantize(x, groups=groups, bits=4, symmetric=False, stochastic=True)
    assert_same(got, ref_stochastic_fake_quantize(x.cpu(), groups, 4, False, seed))


# Groups beyond what 4096 blocks cover at once (64, 8, 8 and 1 groups a block), so every
# single-pass class runs its grid-stride loop; one group more than a whole number of strides.
STRIDED = [(4, 4096 * 64 + 1), (64, 4096 * 8 + 1), (264, 4096 * 8 + 1), (1032, 4096 + 1)]


@pytest.mark.parametrize(("group_size", "groups"), STRIDED, ids=["4x8", "32x8", "32x32", "256x32"])
def test_grids_that_stride(device, group_size, groups):
    x = make_input((groups, group_size), torch.float32, seed=groups)
    q, params = qkit.quantize(x.to(device), groups=groups, bits=8, symmetric=False)
    want_q, want_params = ref_quantize(x, groups, 8, False)
    assert_same(params, want_params, "params")
    assert_same(q, want_q, "codes")


# The element-wise kernels stop at 4096 blocks of 256 threads as well: past that many
# threads' worth of work (8 elements a thread in the quantizer's value pass and in
# dequantize, one in the ZeRO++ kernels) they stride.
VALUE_PASS_STRIDE = 4096 * 256 * 8
ZEROPP_STRIDE = 4096 * 256


def test_chunked_value_pass_and_dequantize_stride(device):
    """Two groups of 4M elements take the chunked path; its value pass and dequantize both stride."""
    groups = 2
    x = make_input((groups, VALUE_PASS_STRIDE // 2 + 4), torch.float32, seed=5)
    q, params = qkit.quantize(x.to(device), groups=groups, bits=8, symmetric=False)
    want_q, want_params = ref_quantize(x, groups, 8, False)
    assert_same(params, want_params, "params")
    assert_same(q, want_q, "codes")
    got = qkit.dequantize(q, params, groups=groups, bits=8, symmetric=False, dtype=torch.float32)
    assert_same(got, ref_dequantize(want_q, want_params, groups, 8, False, torch.float32), "dequantize")


def test_zeropp_kernels_stride(device):
    """Every ZeRO++ kernel over more than 4096 x 256 elements: swizzling by the two-pass route
    (32 slices of 40,000 elements), LoCo's error passes, the reduction's sum, unsigned codes."""
    groups, group_size = 160, 8000  # 1.28M elements; layout 4 nodes x 4 devices x pipeline 2
    assert groups * group_size > ZEROPP_STRIDE
    x = make_input((groups, group_size), torch.bfloat16, seed=3)
    e = make_input((groups * group_size,), torch.bfloat16, seed=4) * 1e-2
    check_swizzle(x, groups, 8, False, (4, 4, 2), device)
    check_loco_swizzle(x, e, 0.5, groups, 8, True, (4, 4, 2), device)
    values = ZEROPP_STRIDE + 4
    q, params = make_tensors(2, 2, values, 8, True, "quantized", seed=6)
    check_reduction(q, params, 4, 4, 8, True, 2, device)
    data = torch.randint(0, 256, (ZEROPP_STRIDE + 64,), generator=torch.Generator().manual_seed(8), dtype=torch.uint8)
    scale, minv = torch.tensor([3.0, 5.0]), torch.tensor([-1.0, 0.5])
    got = torch.ops.qkit.dequantize_unsigned(
        data.to(device), scale.to(device), minv.to(device), 2, data.numel() // 2, 8
    )
    assert_same(got, ref_dequantize_unsigned(data, scale, minv, 2, data.numel() // 2, 8), "dequantize_unsigned")


CHUNK = 8192  # the chunked path's statistics work item (kChunk)


@pytest.mark.parametrize("spot", [0, CHUNK - 1, CHUNK, 2 * CHUNK - 1, 2 * CHUNK, 3 * CHUNK + 4])
def test_chunked_statistics_see_both_sides_of_every_chunk_boundary(device, spot):
    """One element far outside the rest of its group, on either side of a chunk boundary."""
    groups, group_size = 2, 3 * CHUNK + 5
    x = make_input((groups, group_size), torch.float32, seed=spot)
    x = x / x.abs().max()
    x[0, spot], x[1, spot] = -64.0, 64.0  # group 0's minimum and max |x|, group 1's maximum
    for symmetric in (True, False):
        q, params = qkit.quantize(x.to(device), groups=groups, bits=8, symmetric=symmetric)
        want_q, want_params = ref_quantize(x, groups, 8, symmetric)
        assert_same(params, want_params, f"params, spike at {spot}")
        assert_same(q, want_q, f"codes, spike at {spot}")
