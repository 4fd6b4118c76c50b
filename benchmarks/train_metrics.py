"""Mean of each logged training metric over a window of steps, for one or more runs, as Markdown.

    python benchmarks/train_metrics.py RUN_DIR [RUN_DIR ...] [--steps 800:1000] [--keys loss_sup,conf_ratio]

Reads each run's Lightning CSV log (``RUN_DIR/csv/**/metrics.csv``; a resumed run may have several
versions, all are read and a step logged twice keeps its last value). The results notes quote
numbers like "CS's supervised loss over steps 800-1000"; this is the command that gives them.
Training metrics are logged every ``train.log_every`` steps, so a window averages those logged
points, not every step.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path


def read_train_metrics(run: Path) -> dict[int, dict[str, float]]:
    """``step -> {metric: value}`` for the ``train/*`` columns of every CSV log under ``run``."""
    files = sorted(run.glob("csv/**/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"{run}: no csv/**/metrics.csv (is this a semidiff run folder?)")
    rows: dict[int, dict[str, float]] = {}
    for f in files:
        with f.open(newline="") as fh:
            for rec in csv.DictReader(fh):
                values = {k.removeprefix("train/"): float(v) for k, v in rec.items()
                          if k.startswith("train/") and v not in ("", None)}
                if values:
                    rows.setdefault(int(rec["step"]), {}).update(values)
    return rows


def window_means(rows: dict[int, dict[str, float]], first: int, last: int) -> tuple[dict[str, float], int]:
    """Mean of each metric over the logged steps in ``[first, last]``, and how many steps were logged."""
    picked = [v for s, v in rows.items() if first <= s <= last]
    keys = sorted({k for v in picked for k in v})
    means = {}
    for k in keys:
        xs = [v[k] for v in picked if k in v and math.isfinite(v[k])]
        means[k] = sum(xs) / len(xs) if xs else float("nan")
    return means, len(picked)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--steps", default="800:1000", help="inclusive window FIRST:LAST of logged steps")
    ap.add_argument("--keys", default="", help="comma-separated metric names (default: all)")
    args = ap.parse_args(argv)
    try:
        first, last = (int(x) for x in args.steps.split(":"))
    except ValueError:
        ap.error(f"--steps {args.steps!r}: expected FIRST:LAST, e.g. 800:1000")
    table = []
    for run in args.runs:
        try:
            means, n = window_means(read_train_metrics(run), first, last)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if n == 0:
            print(f"error: {run}: no training metrics logged between steps {first} and {last}", file=sys.stderr)
            return 2
        table.append((run.name, n, means))
    keys = [k for k in args.keys.split(",") if k] or sorted({k for _, _, m in table for k in m})
    print(f"Mean over the logged training steps {first}-{last} (train/* columns of the CSV log).\n")
    print("| run | logged steps | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for name, n, means in table:
        cells = [f"{means[k]:.4g}" if k in means else "n/a" for k in keys]
        print(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
