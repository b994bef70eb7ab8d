"""pytest plugin for ci/gpu_check.sh: keep only the CUDA cases of qkit's test suite.

Load it with ``-p qkit_gpu_select`` and ``ci/`` on ``PYTHONPATH``. A collected case is kept
when it needs a GPU to run, which the suite expresses in three ways:

1. the ``device`` fixture's ``cuda`` value (tests/conftest.py marks it ``cuda``); a case
   with a ``device`` parameter is kept only for ``cuda`` (``cpu`` and any emulated backend
   are dropped, whatever their marks);
2. the ``cuda`` marker on the test (``@pytest.mark.cuda``) or on a parameter;
3. no marker, but the test is gated on a GPU at run time: its code (not its strings)
   calls ``torch.cuda.is_available()`` or ``.cuda()``, or passes ``device="cuda"``. All
   its parameter sets are kept (the ones that need no GPU are cheap).

``-m cuda`` alone would miss the third kind. Everything else is deselected (and reported
as such). ``QKIT_GPU_SELECT_LIST=PATH`` also writes the kept node ids to PATH.
"""

from __future__ import annotations

import ast
import inspect
import os
import textwrap

import pytest


def _device_param(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    if callspec is None or "device" not in callspec.params:
        return None
    return str(callspec.params["device"])


def _uses_gpu(node: ast.AST) -> bool:
    """``torch.cuda.is_available``, ``<x>.cuda(...)`` or ``device="cuda"`` (the third kind above)."""
    if isinstance(node, ast.Attribute) and node.attr == "is_available":
        inner = node.value
        return (
            isinstance(inner, ast.Attribute)
            and inner.attr == "cuda"
            and isinstance(inner.value, ast.Name)
            and inner.value.id == "torch"
        )
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr == "cuda"
    if isinstance(node, ast.keyword) and node.arg == "device" and isinstance(node.value, ast.Constant):
        return node.value.value == "cuda"
    return False


def _source_names_gpu(item: pytest.Item) -> bool:
    function = getattr(item, "function", None)
    if function is None:
        return False
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return False
    return any(_uses_gpu(node) for node in ast.walk(tree))


def is_cuda_case(item: pytest.Item) -> bool:
    """Whether ``item`` is one of the suite's CUDA cases (see the module docstring)."""
    device = _device_param(item)
    if device is not None:
        return device == "cuda" or device.startswith("cuda:")
    if item.get_closest_marker("cuda") is not None:
        return True
    return _source_names_gpu(item)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    chosen = {id(item): is_cuda_case(item) for item in items}
    kept = [item for item in items if chosen[id(item)]]
    dropped = [item for item in items if not chosen[id(item)]]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept
    listing = os.environ.get("QKIT_GPU_SELECT_LIST")
    if listing:
        with open(listing, "w") as f:
            f.writelines(f"{item.nodeid}\n" for item in kept)


def pytest_report_header(config: pytest.Config) -> str:
    return "qkit_gpu_select: only the CUDA cases run (ci/qkit_gpu_select.py)"
