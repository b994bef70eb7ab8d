"""``qkit <command>``: ``demo`` (the main job), ``info`` (build and runtime record) or ``bench``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("demo", "info", "bench"):
        print("usage: qkit {demo,info,bench} [options]", file=sys.stderr)
        return 2
    if args[0] == "demo":
        from qkit.demo import main as run
    elif args[0] == "bench":
        from qkit.bench.cli import main as run
    else:
        from qkit.info import main as run
    return run(args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
