"""Dice differences paired by seed, from a bench folder: against labels only, or against clean labels.

    python benchmarks/paired_differences.py BENCH_DIR [--against labels-only|clean]
                                            [--baseline supervised] [--checkpoint last]

Every cell of a seed shares its labeled patients and seed; when a seed moves every method
together, the difference taken seed by seed has a smaller spread than two overlapping
mean ± std suggest, and when it does not, its spread shows that too.

- ``--against labels-only`` (default): each method's mean Dice minus the baseline's
  (``--baseline``, the labels-only run) at the same labeled count, noise level and seed.
- ``--against clean``: each method's mean Dice at a noise level minus its own clean run at the
  same labeled count and seed: what the noise costs it (the robustness claim of issue 5).

Prints a Markdown table: the mean difference ± its sample std over the paired seeds, and on how
many seeds the difference is positive.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from semidiff.report.collect import collect

Dice = dict[tuple[str, float, str], dict[int, float]]  # (method, labeled, noise) -> seed -> mean Dice


def dice_by_cell(bench_dir: Path, checkpoint: str) -> Dice:
    dice: Dice = {}
    for r in collect(bench_dir):
        if checkpoint in r.summaries:
            dice.setdefault((r.method, r.labeled, r.noise), {})[r.seed] = r.summaries[checkpoint]["mean"]["dice"]
    return dice


def paired_rows(dice: Dice, against: str = "labels-only", baseline: str = "supervised") -> list[str]:
    title = f"Dice - {baseline}" if against == "labels-only" else "Dice - its clean Dice"
    lines = [f"| labeled | noise | method | seeds | {title} (mean ± std over seeds) | above on |",
             "|---|---|---|---|---|---|"]
    for (method, labeled, noise), by_seed in sorted(dice.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if against == "labels-only":
            if method == baseline:
                continue
            # Supervised has no pseudo-labels to corrupt, so a pseudo-noise cell is paired with its clean run.
            base = dice.get((baseline, labeled, noise)) or dice.get((baseline, labeled, "clean"), {})
        else:
            if noise == "clean":
                continue
            base = dice.get((method, labeled, "clean"), {})
        seeds = sorted(set(by_seed) & set(base))
        if not seeds:
            continue
        d = np.array([by_seed[s] - base[s] for s in seeds])
        spread = f" ± {d.std(ddof=1):.3f}" if len(d) > 1 else ""
        lines.append(f"| {labeled:g} | {noise} | {method} | {','.join(map(str, seeds))} | "
                     f"{d.mean():+.3f}{spread} | {int((d > 0).sum())}/{len(d)} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench_dir", type=Path)
    p.add_argument("--against", default="labels-only", choices=["labels-only", "clean"])
    p.add_argument("--baseline", default="supervised", help="row name of the labels-only run")
    p.add_argument("--checkpoint", default="last", choices=["last", "best"])
    a = p.parse_args()
    print("\n".join(paired_rows(dice_by_cell(a.bench_dir, a.checkpoint), a.against, a.baseline)))


if __name__ == "__main__":
    main()
