"""``qkit <command>``: ``demo`` (the main job) or ``info`` (build and runtime record)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("demo", "info"):
        print("usage: qkit {demo,info} [options]", file=sys.stderr)
        return 2
    if args[0] == "demo":
        from qkit.demo import main as run
    else:
        from qkit.info import main as run
    return run(args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
