"""``python -m qkit.bench``: the same as ``qkit bench``."""

from qkit.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
