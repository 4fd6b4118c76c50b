"""Mean of each logged training metric over a window of steps, for one or more runs, as Markdown.

    python benchmarks/train_metrics.py RUN_DIR [RUN_DIR ...] [--steps 800:1000] [--keys loss_sup,conf_ratio]

Reads each run's Lightning CSV log through ``semidiff.report.collect.read_logged_scalars`` (every
``csv/version_N/metrics.csv`` of a resumed run, a step logged twice keeping its last value). The
results notes quote numbers like "CS's supervised loss over steps 800-1000"; this is the command
that gives them.
Training metrics are logged every ``train.log_every`` steps, so a window averages those logged
points, not every step.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from semidiff.report.collect import read_logged_scalars


def window_means(run: Path, first: int, last: int) -> tuple[dict[str, float], int]:
    """Mean of each ``train/*`` metric of ``run`` over its logged steps in ``[first, last]``, and
    how many steps in that window logged training metrics."""
    scalars = read_logged_scalars(run)
    means, steps = {}, set()
    for key, points in scalars.items():
        if not key.startswith("train/"):
            continue
        picked = [(s, v) for s, v in points if first <= s <= last]
        steps.update(s for s, _ in picked)
        xs = [v for _, v in picked if math.isfinite(v)]
        if picked:
            means[key.removeprefix("train/")] = sum(xs) / len(xs) if xs else float("nan")
    return means, len(steps)


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
        if not any((run / "csv").glob("version_*/metrics.csv")):
            print(f"error: {run}: no csv/version_*/metrics.csv (is this a semidiff run folder?)", file=sys.stderr)
            return 2
        means, n = window_means(run, first, last)
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
