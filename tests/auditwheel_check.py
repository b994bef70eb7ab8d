"""Holds a repaired qkit wheel to its manylinux tag with ``auditwheel show`` (ci/package.sh runs it).

    python tests/auditwheel_check.py WHEEL [--plat manylinux_2_28_x86_64] [--auditwheel PATH]

Passes when:

* the wheel's file name carries the platform tag ``--plat`` (auditwheel repair adds it only
  when _C fits that policy; it may add an older one too, e.g. manylinux_2_24);
* ``auditwheel show``'s symbol-version verdict (``sym_tag``: the glibc/libstdc++/libgcc
  versions _C needs) is that tag or an older one;
* the only shared libraries auditwheel finds outside its policy are torch's own
  (libc10, libtorch*), which the user's torch provides and repair leaves out on purpose.
  They are why ``auditwheel show`` calls the wheel as a whole ``linux_x86_64``: every torch
  extension links them, and none may vendor them.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

#: Libraries of the user's torch that _C links and that no qkit wheel may vendor.
TORCH_LIBRARIES = re.compile(r"^lib(c10|torch|torch_cpu|torch_cuda|c10_cuda|torch_hip|c10_hip)\.so(\.\d+)*$")


def glibc_of(platform_tag: str) -> tuple[int, int] | None:
    """``(2, 28)`` for ``manylinux_2_28_x86_64``; legacy manylinux2014 is glibc 2.17."""
    found = re.match(r"manylinux_(\d+)_(\d+)_", platform_tag)
    if found:
        return int(found.group(1)), int(found.group(2))
    return (2, 17) if platform_tag.startswith("manylinux2014_") else None


def wheel_platform_tags(wheel: Path) -> list[str]:
    """The platform tags of a wheel's file name (``a.b`` compressed tag sets split)."""
    parts = wheel.name.removesuffix(".whl").split("-")
    return parts[-1].split(".")


def problems(wheel: Path, plat: str, shown: dict[str, Any]) -> list[str]:
    """What does not hold, given ``auditwheel show --json``'s output ``shown`` (empty: all holds)."""
    found = []
    target = glibc_of(plat)
    if target is None:
        return [f"--plat {plat} is not a manylinux tag"]
    tags = wheel_platform_tags(wheel)
    if plat not in tags:
        found.append(f"the wheel's name has platform tags {tags}, not {plat}")
    sym_tag = str(shown.get("sym_tag", ""))
    needed = glibc_of(sym_tag)
    if needed is None or needed > target:
        found.append(f"auditwheel show: _C's symbol versions need {sym_tag or 'an unknown policy'}, newer than {plat}")
    external = sorted(shown.get("external_libs") or {})
    foreign = [lib for lib in external if not TORCH_LIBRARIES.match(lib)]
    if foreign:
        found.append(f"auditwheel show: libraries outside the policy that are not torch's: {foreign}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument(
        "--plat", default="manylinux_2_28_x86_64", help="the tag the wheel must have (default: %(default)s)"
    )
    parser.add_argument("--auditwheel", default="auditwheel", help="the auditwheel executable")
    args = parser.parse_args(argv)
    done = subprocess.run([args.auditwheel, "show", "--json", str(args.wheel)], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"auditwheel_check: auditwheel show failed:\n{done.stderr}", file=sys.stderr)
        return 1
    shown = json.loads(done.stdout)
    print(
        f"auditwheel show {args.wheel.name}: symbol versions fit {shown.get('sym_tag')}; "
        f"outside the policy: {sorted(shown.get('external_libs') or {})} (the user's torch); "
        f"file name tags: {', '.join(wheel_platform_tags(args.wheel))}"
    )
    found = problems(args.wheel, args.plat, shown)
    for problem in found:
        print(f"auditwheel_check: FAILED: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
