"""Every integer argument of every op over int64 extremes, and pairs whose product wraps.

Each call runs in a child process (tests/int_fuzz.py, a few children for all the cases): a
call that kills its process with a signal (SIGFPE, SIGSEGV) is reported as that case's
failure instead of taking the test run down. Every case must either succeed or raise
ValueError/RuntimeError/TypeError/OverflowError naming one of the arguments it changed,
leave the tensors it would write untouched when it raises, and the kernels (CPU) and the
fake impls (meta) must accept and refuse the same calls.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import pytest

from int_fuzz import OPS, Case, cases

CHILD = Path(__file__).with_name("int_fuzz.py")
CHILDREN = 3  # concurrent child processes; each imports torch once


def _describe_signal(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"exit status {returncode}"


def _run_all(todo: list[Case], children: int = CHILDREN) -> dict[str, dict]:
    """Runs `todo` in `children` concurrent children; a child killed by a signal is restarted
    after the case that killed it, which is recorded as an outcome "signal"."""
    outcomes: dict[str, dict] = {}
    queues = [todo[i::children] for i in range(children)]
    while any(queues):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        procs = [
            (
                queue,
                subprocess.Popen(
                    [sys.executable, str(CHILD)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                ),
            )
            for queue in queues
            if queue
        ]
        next_queues = []
        for queue, proc in procs:
            stdout, stderr = proc.communicate(json.dumps([asdict(c) for c in queue]), timeout=300)
            started = None
            done = 0
            for line in stdout.splitlines():
                if line.startswith("start "):
                    started = int(line.split()[1])
                elif line.startswith("{"):
                    result = json.loads(line)
                    outcomes[queue[result["index"]].name] = result
                    done += 1
            if proc.returncode == 0:
                assert done == len(queue), f"fuzz child stopped early:\n{stderr[-4000:]}"
                continue
            if proc.returncode > 0 or started is None or done != started:
                raise AssertionError(f"fuzz child failed (rc {proc.returncode}):\n{stderr[-4000:]}")
            outcomes[queue[started].name] = {"outcome": "signal", "signal": _describe_signal(proc.returncode)}
            next_queues.append(queue[started + 1 :])
        queues = next_queues
    return outcomes


ALL_CASES = cases()


@pytest.fixture(scope="module")
def outcomes() -> dict[str, dict]:
    return _run_all(ALL_CASES)


def _names_an_argument(message: str, names: list[str]) -> bool:
    # qkit's errors backquote the argument; torch's own parser (for ints outside int64)
    # says "argument 'groups'".
    return any(f"`{n}`" in message or f"argument '{n}'" in message for n in names)


def _problems(case: Case, result: dict) -> list[str]:
    if result["outcome"] == "signal":
        return [f"{case.name}: killed the process ({result['signal']})"]
    if result["outcome"] == "ok":
        return []
    aliases = OPS[case.path].aliases
    names = sorted({n for arg in case.ints for n in (arg, aliases.get(arg, arg))})
    problems = []
    if not result["allowed"]:
        problems.append(f"{case.name}: raised {result['type']}")
    if not _names_an_argument(result["message"], names):
        problems.append(f"{case.name}: the error names none of {names}: {result['message'][:300]!r}")
    if not result["untouched"]:
        problems.append(f"{case.name}: raised after writing to a tensor")
    return problems


@pytest.mark.parametrize("path", sorted(OPS))
def test_int_args_fuzz(outcomes, path):
    mine = [c for c in ALL_CASES if c.path == path]
    assert mine, path
    problems = [p for c in mine for p in _problems(c, outcomes[c.name])]
    # The kernels (cpu) and the fake impls (meta) accept and refuse the same calls.
    by_call: dict[str, dict[str, str]] = defaultdict(dict)
    for c in mine:
        key = json.dumps([c.ints, c.empty], sort_keys=True)
        by_call[key][c.device] = outcomes[c.name]["outcome"]
    problems += [
        f"{path} {k}: eager {v['cpu']} but fake {v['meta']}" for k, v in by_call.items() if len(set(v.values())) > 1
    ]
    # ... and word each refusal the same, whole message (int64 overflow included).
    said: dict[str, dict[str, str]] = defaultdict(dict)
    for c in mine:
        if outcomes[c.name]["outcome"] == "error":
            said[json.dumps([c.ints, c.empty], sort_keys=True)][c.device] = outcomes[c.name]["message"]
    problems += [
        f"{path} {k}: eager says {v['cpu']!r} but fake says {v['meta']!r}"
        for k, v in said.items()
        if len(v) == 2 and v["cpu"] != v["meta"]
    ]
    assert not problems, "\n".join(problems)


def test_fuzz_covers_every_defined_op():
    from qkit.ops import DEFINED_OPS

    covered = set()
    for path in OPS:
        op = path.split("/")[0]
        kind = path.split("/")[1]
        covered.add(op)
        if kind.endswith("-out"):
            covered.add(f"{op}.out")
        if kind.endswith("-inplace"):
            covered.add(f"{op}_")
        if kind.endswith("-loco"):
            covered.add(f"loco_{op}")
    assert set(DEFINED_OPS) <= covered, set(DEFINED_OPS) - covered


def test_a_signal_is_detected_and_named():
    """The harness itself: a case that kills its child is reported with its signal, and
    the cases queued after it in the same child still run."""
    crash = Case("harness/raise-signal", "cpu", {"signal": int(signal.SIGSEGV)})
    after = Case("fake_quantize/op", "cpu", {"groups": 2})
    got = _run_all([crash, after, after], children=1)
    assert got[crash.name] == {"outcome": "signal", "signal": "SIGSEGV"}
    assert got[after.name]["outcome"] == "ok"
