"""Each method's Dice minus the labels-only run's, paired by seed, from a bench folder.

    python benchmarks/paired_vs_labels_only.py BENCH_DIR [--baseline supervised] [--checkpoint last]

Every cell of a seed shares its labeled patients and seed; when a seed moves every
method together, the difference taken seed by seed has a smaller spread than two overlapping
mean ± std suggest, and when it does not, its spread shows that too. Prints a
Markdown table: per (labeled count, noise level), each method's mean difference of mean Dice ±
its sample std over the paired seeds, and on how many of them the method is above.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from semidiff.bench import collect


def paired_rows(bench_dir: Path, baseline: str, checkpoint: str) -> list[str]:
    dice: dict[tuple[str, float, str], dict[int, float]] = {}
    for r in collect(bench_dir):
        if checkpoint in r.summaries:
            dice.setdefault((r.method, r.labeled, r.noise), {})[r.seed] = r.summaries[checkpoint]["mean"]["dice"]
    lines = [f"| labeled | noise | method | seeds | Dice - {baseline} (mean ± std over seeds) | above on |",
             "|---|---|---|---|---|---|"]
    for (method, labeled, noise), by_seed in sorted(dice.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        # Supervised has no pseudo-labels to corrupt, so a pseudo-noise cell is paired with its clean run.
        base = dice.get((baseline, labeled, noise)) or dice.get((baseline, labeled, "clean"), {})
        seeds = sorted(set(by_seed) & set(base))
        if method == baseline or not seeds:
            continue
        d = np.array([by_seed[s] - base[s] for s in seeds])
        spread = f" ± {d.std(ddof=1):.3f}" if len(d) > 1 else ""
        lines.append(f"| {labeled:g} | {noise} | {method} | {','.join(map(str, seeds))} | "
                     f"{d.mean():+.3f}{spread} | {int((d > 0).sum())}/{len(d)} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench_dir", type=Path)
    p.add_argument("--baseline", default="supervised", help="row name of the labels-only run")
    p.add_argument("--checkpoint", default="last", choices=["last", "best"])
    a = p.parse_args()
    print("\n".join(paired_rows(a.bench_dir, a.baseline, a.checkpoint)))


if __name__ == "__main__":
    main()
