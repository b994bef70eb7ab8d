"""Large fresh CPU outputs are advised to use transparent huge pages (Linux), which
cuts the page faults of their first write; QKIT_HUGE_PAGES=0 turns the advice off.
The advice must never change a result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qkit
from helpers import assert_same
from reference import ref_dequantize, ref_fake_quantize, ref_quantize

ROOT = Path(__file__).resolve().parents[1]
SMAPS = Path("/proc/self/smaps")
BIG = 8 * 2**20  # float32 elements: a 32 MiB output, the smallest that is advised

needs_smaps = pytest.mark.skipif(not SMAPS.exists(), reason="needs Linux /proc/self/smaps")


def vm_flags_at(address: int) -> set[str]:
    """VmFlags of the mapping that holds ``address`` in this process."""
    inside = False
    for line in SMAPS.read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def huge_page_middle(t: torch.Tensor) -> int:
    """An address inside ``t`` that lies in a whole, aligned 2 MiB page of it."""
    return (t.data_ptr() + 2 * 2**20 - 1) // 2**20 * 2**20 + 2**20


def test_big_outputs_are_still_exact() -> None:
    x = torch.randn(BIG // 64, 64, generator=torch.Generator().manual_seed(0))
    groups = x.shape[0]
    assert_same(qkit.fake_quantize(x, groups, 8), ref_fake_quantize(x, groups, 8), "fake")
    q, p = qkit.quantize(x, groups, 8)
    rq, rp = ref_quantize(x, groups, 8)
    assert_same(q, rq, "codes")
    assert_same(p, rp, "params")
    got = qkit.dequantize(q, p, groups, 8, dtype=torch.float32)
    assert_same(got, ref_dequantize(rq, rp, groups, 8, True, torch.float32), "dequant")


@needs_smaps
def test_big_fresh_output_is_advised_small_one_is_not() -> None:
    """In a fresh process, so the 32 MiB output gets a mapping of its own: in a long test run
    glibc may serve it from a hole in its main heap, which is never advised (next test)."""
    if "madvise" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(errors="ignore"):
        pytest.skip("this kernel has no transparent huge pages")
    script = (
        "import torch, qkit, sys; sys.path.insert(0, sys.argv[1]);"
        "from test_huge_pages import BIG, huge_page_middle, vm_flags_at;"
        "big = qkit.fake_quantize(torch.randn(BIG), 1024, 8);"
        "small = qkit.fake_quantize(torch.randn(BIG // 4), 1024, 8);"  # 8 MiB: left alone
        "print('hg' in vm_flags_at(huge_page_middle(big)), 'hg' in vm_flags_at(small.data_ptr() + small.numel() * 2))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(ROOT / "tests")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False"], "advised: (32 MiB output, 8 MiB output) = " + result.stdout


@needs_smaps
def test_a_block_carved_from_the_heap_is_not_advised() -> None:
    """glibc can serve a 32 MiB output from a free hole in its main heap; advice there would
    outlive the output and put a later, small allocation on huge pages."""
    if "madvise" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(errors="ignore"):
        pytest.skip("this kernel has no transparent huge pages")
    script = (
        "import torch, qkit, sys; sys.path.insert(0, sys.argv[1]);"
        "from test_huge_pages import BIG, vm_flags_at;"
        "x = torch.randn(BIG);"
        "t = torch.empty(4 << 20); del t;"  # a freed 16 MiB mapping raises glibc's mmap threshold
        "blocks = [torch.empty(256 << 10) for _ in range(40)]; keeper = torch.empty(256 << 10);"
        "del blocks;"  # a 40 MiB hole in the heap, below `keeper`
        "heap = [l.split()[0].split('-') for l in open('/proc/self/maps') if '[heap]' in l];"
        "y = qkit.fake_quantize(x, 1024, 8); at = y.data_ptr();"
        "in_heap = any(int(lo, 16) <= at < int(hi, 16) for lo, hi in heap) or at < int(heap[-1][1], 16);"
        "del y; small = qkit.fake_quantize(torch.randn(BIG // 4), 1024, 8);"
        "print(in_heap, 'hg' in vm_flags_at(small.data_ptr() + small.numel() * 2))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(ROOT / "tests")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    in_heap, small_advised = result.stdout.split()
    if in_heap != "True":
        pytest.skip("this allocator gave the output its own mapping")
    assert small_advised == "False", "advice on heap pages outlived the output"


@needs_smaps
def test_opt_out_leaves_pages_alone() -> None:
    script = (
        "import torch, qkit, sys; sys.path.insert(0, sys.argv[1]);"
        "from test_huge_pages import BIG, huge_page_middle, vm_flags_at;"
        "y = qkit.fake_quantize(torch.randn(BIG), 1024, 8);"
        "assert 'hg' not in vm_flags_at(huge_page_middle(y)); print('ok')"
    )
    env = {**os.environ, "QKIT_HUGE_PAGES": "0"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(ROOT / "tests")], env=env, capture_output=True, text=True, check=False
    )
    assert result.stdout.strip() == "ok", result.stdout + result.stderr
