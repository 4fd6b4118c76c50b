"""How much of the gap between labels alone and all labels a method closes, by groups of cases.

    python benchmarks/gap_closed.py BENCH_DIR --method protodiff_scale_1
        [--baseline supervised] [--ceiling supervised_all] [--checkpoint last]
        [--group ED=frame01 --group ES=frame02 --group RV=/RV$ ...]

A method's mean Dice gain over the baseline says little on its own when the baseline is already
close to what all the labels give. For every labeled count and seed where the method, the baseline
(same labeled count) and the ceiling (same seed) were all evaluated, this prints the three mean
Dice scores over a group of per-case, per-class values (``eval_val_<checkpoint>/per_case.csv``),
the baseline's gap to the ceiling, the method's gain, and the share of the gap it closes. A group
is ``NAME=REGEX``, matched (``re.search``) against ``<case id>/<class name>``; ``all`` is always
there. For ACDC as SSL4MIS ships it, ``frame01`` is end-diastole and ``frame02`` end-systole.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from pathlib import Path

import numpy as np

from semidiff.report.collect import collect

PerCase = dict[tuple[str, float, int], dict[str, float]]  # (method, labeled, seed) -> "case/class" -> Dice


def per_case_dice(bench_dir: Path, checkpoint: str) -> PerCase:
    """Per-case, per-class Dice of every finished, noise-free cell of a bench folder."""
    out: PerCase = {}
    for r in collect(bench_dir):
        path = r.run_dir / f"eval_val_{checkpoint}" / "per_case.csv"
        if r.noise != "clean" or not path.is_file():
            continue
        with open(path) as f:
            out[(r.method, r.labeled, r.seed)] = {f"{row['case_id']}/{row['class_name']}": float(row["dice"])
                                                  for row in csv.DictReader(f)}
    return out


def _mean(values: dict[str, float], pattern: str) -> float:
    picked = [v for k, v in values.items() if re.search(pattern, k) and not math.isnan(v)]
    return float(np.mean(picked)) if picked else math.nan


def gap_rows(dice: PerCase, method: str, baseline: str = "supervised", ceiling: str = "supervised_all",
             groups: list[tuple[str, str]] | None = None) -> list[str]:
    """Markdown rows: per labeled count, group and seed, then the seeds' mean share closed."""
    groups = [("all", "")] + list(groups or [])
    ceilings = {seed: v for (m, _, seed), v in dice.items() if m == ceiling}
    rows = ["| labeled | group | seed | all labels | baseline | method | gap | gained | closed |",
            "|---|---|---|---|---|---|---|---|---|"]
    for labeled in sorted({lab for (m, lab, _) in dice if m == method}):
        seeds = sorted(s for (m, lab, s) in dice if m == method and lab == labeled
                       and (baseline, labeled, s) in dice and s in ceilings)
        for name, pattern in groups:
            shares = []
            for s in seeds:
                top, base, ours = (_mean(v, pattern) for v in (ceilings[s], dice[(baseline, labeled, s)],
                                                               dice[(method, labeled, s)]))
                gap, gained = top - base, ours - base
                share = gained / gap if gap > 0 else math.nan
                shares.append(share)
                rows.append(f"| {labeled:g} | {name} | {s} | {top:.3f} | {base:.3f} | {ours:.3f} | "
                            f"{100 * gap:+.1f} | {100 * gained:+.1f} | {100 * share:.0f}% |")
            if len(seeds) > 1:
                rows.append(f"| {labeled:g} | {name} | mean of {len(seeds)} | | | | | | "
                            f"{100 * np.nanmean(shares):.0f}% |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_dir", type=Path)
    ap.add_argument("--method", required=True)
    ap.add_argument("--baseline", default="supervised")
    ap.add_argument("--ceiling", default="supervised_all", help="the all-labels row")
    ap.add_argument("--checkpoint", default="last", choices=("last", "best"))
    ap.add_argument("--group", action="append", default=[], metavar="NAME=REGEX")
    args = ap.parse_args()
    groups = []
    for g in args.group:
        name, sep, pattern = g.partition("=")
        if not sep or not name:
            ap.error(f"--group {g!r}: expected NAME=REGEX, e.g. ED=frame01")
        groups.append((name, pattern))
    dice = per_case_dice(args.bench_dir, args.checkpoint)
    if not any(m == args.method for (m, _, _) in dice):
        ap.error(f"{args.bench_dir}: no finished cell of method {args.method!r}")
    print("\n".join(gap_rows(dice, args.method, args.baseline, args.ceiling, groups)))


if __name__ == "__main__":
    main()
