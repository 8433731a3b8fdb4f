"""A summary of py-spy's raw output (`py-spy record --format raw --threads`): the share of
samples per thread name, per function including what it calls, and per innermost line.

    python3 bench/spy_summary.py stacks.txt [rows]
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path


def summary(path: Path, rows: int = 40) -> str:
    threads: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        threads[frames[0].partition(": ")[2] or frames[0]] += n  # by thread name
        for name in {_function(f) for f in frames[1:]}:
            inclusive[name] += n
        leaves[frames[-1]] += n
    if not total:
        return "no samples\n"
    lines = [f"{total} samples"]
    for title, counter, k in (
        ("threads", threads, 12),
        ("functions, with what they call", inclusive, rows),
        ("innermost lines", leaves, rows // 2),
    ):
        lines.append(f"-- {title}")
        lines += [f"{n / total:6.1%}  {what}" for what, n in counter.most_common(k)]
    return "\n".join(lines) + "\n"


def _function(frame: str) -> str:
    """`name (path/file.py:line)` -> `name (file.py)`."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rpartition('/')[2].partition(':')[0]})" if where else name


if __name__ == "__main__":
    print(summary(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 40), end="")
