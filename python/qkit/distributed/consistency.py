"""The cross-rank check every collective of qkit.distributed runs by default.

A collective whose ranks pass different shapes, tensor counts or settings exchanges buffers
of different sizes or layouts: depending on the backend one rank aborts, another hangs, or
returns values built from memory no peer wrote. So before communicating, every rank of the
group all-gathers a fixed-size *fingerprint* of its call (one 64-bit hash per field: the
function, any argument error it found locally, shapes, dtypes, groups, bits, settings). All
ranks then hold the same table and reach the same verdict: either they go on, or every rank
raises the same :class:`ValueError`, naming each field that differs and what each rank passed
(a second all-gather, of the descriptions, runs only then).

``validate`` takes three values:

- ``"once"`` (default): check each distinct call signature once. A signature that passed is
  remembered (per process, function and process group; at most :data:`CACHE_SIZE`, least
  recently used first out) and the same call again costs a dictionary look-up and no
  communication: steady-state training pays nothing. The ranks decide *locally* whether a
  signature is new, so a mismatch where some ranks repeat a signature they already checked
  while others pass a new one is not caught (the ranks disagree on whether to check; the
  backend then fails or times out as it would without the check). Mismatches from the
  configuration show up at the first call, where the check catches them.
- ``True``: check every call (one tiny all-gather each), which closes that gap: for
  debugging, or for calls whose shapes vary by rank at run time.
- ``False``: no check. **Unsafe**: ranks that pass different calls may hang, abort, or
  return garbage.

Every rank must pass the same ``validate``.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist

__all__ = ["CACHE_SIZE", "Validate", "check_validate", "clear_cache", "ensure_consistent", "stats"]

Validate = bool | Literal["once"]

CACHE_SIZE = 4096
"""Call signatures remembered per process (beyond that the least recently used is checked again)."""

# Slot 0: the function; slot 1: the local argument error (or "none"); then up to 7 fields.
# A fixed length, so fingerprints of any two calls can be gathered together.
_SLOTS = 9
_MAX_FIELDS = _SLOTS - 2
_VALUE_CHARS = 160  # per rank and field in the error message

_passed: OrderedDict[Hashable, None] = OrderedDict()
stats = {"checks": 0}
"""How many fingerprint all-gathers this process ran (tests read it to see the cache work)."""


def clear_cache() -> None:
    """Forget every signature that passed: the next call of each is checked again.

    Collective in effect: call it on every rank at the same point, or the ranks disagree on
    which calls they check.
    """
    _passed.clear()


def check_validate(validate: object, fn: str) -> None:
    """Raise unless ``validate`` is ``"once"``, ``True`` or ``False``."""
    if validate is not True and validate is not False and validate != "once":
        raise ValueError(f"qkit.distributed.{fn}: `validate` must be 'once', True or False, got {validate!r}")


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _device(group: Any, device: torch.device | None) -> torch.device:
    """Where the check's tensors live: with the data when there is some (the backend takes that
    device), else on the current GPU for NCCL and on the CPU otherwise."""
    if device is not None:
        return device
    if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# deviation: collective-validation (DeepSpeed checked nothing)
def ensure_consistent(
    fn: str,
    fields: Mapping[str, object],
    *,
    group: Any = None,
    device: torch.device | None = None,
    validate: Validate = "once",
    error: Exception | None = None,
) -> None:
    """Check that every rank of ``group`` makes the same call, then raise ``error`` if given.

    Collective (unless skipped, see the module doc): every rank of ``group`` must call it.

    Args:
        fn: the public function's name (for the messages, and part of the fingerprint).
        fields: name -> value (compared by ``repr``), at most 7, in a fixed order per ``fn``.
        group: the process group the call communicates on (``None``: the default group).
        device: where the call's data lives (``None``: chosen from the backend).
        validate: ``"once"``, ``True`` or ``False`` (no check; ``error`` is still raised).
        error: an argument error this rank found locally. It is raised after the check, so
            ranks that did not find it raise too instead of waiting for this rank forever.

    Raises:
        ValueError: the ranks' fingerprints differ (the same message on every rank).
        Exception: ``error``, when every rank found the same one.
    """
    if len(fields) > _MAX_FIELDS:
        raise AssertionError(f"{fn}: at most {_MAX_FIELDS} fingerprint fields")  # a qkit bug, not the user's
    if validate is False:
        if error is not None:
            raise error
        return
    desc = [("call", fn), ("argument error", "none" if error is None else f"{type(error).__name__}: {error}")]
    desc += [(name, repr(value)) for name, value in fields.items()]
    hashes = [_hash(f"{name}={value}") for name, value in desc] + [0] * (_SLOTS - len(desc))
    key = (fn, id(group if group is not None else dist.group.WORLD), tuple(hashes))
    if error is None and validate == "once" and key in _passed:
        _passed.move_to_end(key)
        return
    encoded = json.dumps(desc).encode()
    dev = _device(group, device)
    k = dist.get_world_size(group)
    mine = torch.tensor([*hashes, len(encoded)], dtype=torch.int64, device=dev)
    every = torch.empty(k, _SLOTS + 1, dtype=torch.int64, device=dev)
    stats["checks"] += 1
    # Not through comm: count_wire_bytes counts the data, not this one-off check.
    dist.all_gather_into_tensor(every.view(-1), mine, group=group)
    table = every[:, :_SLOTS].cpu()
    differ = [s for s in range(_SLOTS) if not bool((table[:, s] == table[0, s]).all())]
    if differ:
        # Every rank computed the same `differ`, so every rank joins this second all-gather.
        raise ValueError(_mismatch_message(fn, differ, encoded, int(every[:, _SLOTS].max()), group, dev))
    if error is not None:
        raise error
    _passed[key] = None
    if len(_passed) > CACHE_SIZE:
        _passed.popitem(last=False)


def _mismatch_message(fn: str, differ: list[int], encoded: bytes, longest: int, group: Any, dev: torch.device) -> str:
    k = dist.get_world_size(group)
    mine = torch.zeros(longest, dtype=torch.uint8, device=dev)
    mine[: len(encoded)] = torch.frombuffer(bytearray(encoded), dtype=torch.uint8).to(dev)
    every = torch.empty(k, longest, dtype=torch.uint8, device=dev)
    dist.all_gather_into_tensor(every.view(-1), mine, group=group)
    descs = [json.loads(bytes(row).rstrip(b"\0").decode()) for row in every.cpu().tolist()]
    if 0 in differ:  # different functions: their other fields do not line up
        differ = [0]
    parts, names = [], []
    for s in differ:
        name = next(d[s][0] for d in descs if len(d) > s)
        names.append(name)
        by_value: dict[str, list[int]] = {}
        for r, d in enumerate(descs):
            by_value.setdefault(d[s][1] if len(d) > s else "-", []).append(r)
        shown = ", ".join(f"{_ranks(rs)} = {_clip(v)}" for v, rs in by_value.items())
        parts.append(f"{name}: {shown}")
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return (
        f"qkit.distributed.{fn}: ranks passed different {listed} — {'; '.join(parts)}. "
        "Every rank of the group must make the same call; nothing was exchanged but this check "
        "(validate=False skips it, unsafe: mismatched calls can hang or return garbage)"
    )


def _ranks(ranks: list[int]) -> str:
    """Ranks (in the check's group) as ``rank 0``, ``ranks 1-3`` or ``ranks 0-1 4``."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][-1] + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    return "ranks " + " ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


def _clip(value: str) -> str:
    return value if len(value) <= _VALUE_CHARS else value[: _VALUE_CHARS - 3] + "..."
