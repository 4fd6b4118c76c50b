"""Validation mean Dice against training step for run folders (or their records), one line per
run, and a Markdown table of the values: the check that a budget has converged (doubling the
steps moves the final Dice by less than a point).

    python benchmarks/convergence_curves.py RUN_OR_RECORD... [-o curves.png]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def val_curve(run: Path) -> list[tuple[int, float]]:
    """``(step, val/dice_mean)`` of every validation of a run, in order (all CSV versions)."""
    points = {}
    for f in sorted(run.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(f.read_text().splitlines()):
            if row.get("val/dice_mean"):
                points[int(row["step"]) + 1] = float(row["val/dice_mean"])
    return sorted(points.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("-o", "--output", type=Path, default=None)
    args = ap.parse_args()
    curves = {run.name: val_curve(run) for run in args.runs}
    steps = sorted({s for c in curves.values() for s, _ in c})
    print("| run | " + " | ".join(str(s) for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for name, curve in curves.items():
        values = dict(curve)
        print(f"| {name} | " + " | ".join(f"{values[s]:.3f}" if s in values else "" for s in steps) + " |")
    if args.output:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, curve in curves.items():
            ax.plot([s for s, _ in curve], [d for _, d in curve], marker="o", ms=3, label=name)
        ax.set_xlabel("training step")
        ax.set_ylabel("validation mean Dice (during training)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.output, dpi=120)


if __name__ == "__main__":
    main()
