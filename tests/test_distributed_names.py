"""qkit.distributed's public names (issue 18, item 6): one name per concept, old keyword names
kept with a DeprecationWarning. No process group needed: the names are resolved before any
collective (which then stops at "not initialized")."""

from __future__ import annotations

import warnings

import pytest
import torch

import qkit.distributed as qd


def test_process_groups_keyword_and_its_deprecated_name() -> None:
    t = torch.zeros(4, 4)
    p = torch.nn.Parameter(torch.zeros(4, 4))
    p.grad = torch.zeros(4, 4)
    calls = [
        lambda **kw: qd.all_to_all_quant_reduce([t], **kw),
        lambda **kw: qd.all_to_all_loco_quant_reduce([p], **kw),
        lambda **kw: qd.LocoReducer()([p], **kw),
    ]
    for call in calls:
        deprecated = pytest.warns(DeprecationWarning, match="`groups` is deprecated.*`process_groups`")
        with deprecated, pytest.raises(RuntimeError, match="not initialized"):
            call(groups={})
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the new name warns about nothing
            with pytest.raises(RuntimeError, match="not initialized"):
                call(process_groups={})
        with pytest.raises(TypeError, match="`process_groups` and its deprecated name `groups`"):
            call(process_groups={}, groups={})
        with pytest.raises(TypeError, match="missing `process_groups`"):
            call()


def test_topology_local_world_size_and_its_deprecated_name() -> None:
    topo = qd.Topology(world=8, nodes=2, local_world_size=4, rank=6, local_group=None, global_group=None)
    assert (topo.node, topo.device) == (1, 2)
    with pytest.warns(DeprecationWarning, match="Topology.local is deprecated; use Topology.local_world_size"):
        assert topo.local == 4


def test_ranks_per_node_is_local_world_size_everywhere() -> None:
    import inspect

    for fn in (qd.hierarchical_groups, qd.zeropp, qd.QuantizedReduceScatter, qd.wire_bytes):
        assert "local_world_size" in inspect.signature(fn).parameters, fn
    for name in ("devices_per_node", "devices", "local"):
        for fn in (qd.hierarchical_groups, qd.zeropp, qd.QuantizedReduceScatter, qd.wire_bytes):
            assert name not in inspect.signature(fn).parameters, (fn, name)


def test_grad_format_is_one_keyword_everywhere() -> None:
    import inspect

    fns = (
        qd.all_to_all_quant_reduce,
        qd.all_to_all_loco_quant_reduce,
        qd.LocoReducer.__call__,
        qd.wire_bytes,
        qd.zeropp,
        qd.QuantizedReduceScatter,
        qd.QuantizedAllReduceState,
    )
    for fn in fns:
        param = inspect.signature(fn).parameters.get("grad_format")
        assert param is not None and param.default is None and param.kind is param.KEYWORD_ONLY, fn
