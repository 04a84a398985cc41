"""Run every benchmark of this folder, one after the other, each in its own process: ``python -m benchmarks``.

``python -m benchmarks chat_stream`` runs only the named ones. Each prints its own table and its targets as
PASS or MISS; the exit status is that of the first benchmark that failed to run, else 0.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def names() -> list[str]:
    """The benchmark modules: every ``*.py`` here but this one."""
    return sorted(path.stem for path in HERE.glob("*.py") if not path.stem.startswith("_"))


def main(argv: list[str]) -> int:
    """Run the benchmarks named in ``argv`` (all when empty)."""
    chosen = argv or names()
    unknown = sorted(set(chosen) - set(names()))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(names())}", file=sys.stderr)
        return 2
    status = 0
    for name in chosen:
        print(f"== benchmarks.{name}", flush=True)
        code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}"], cwd=HERE.parent)
        if code and not status:
            status = code
        print(flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
