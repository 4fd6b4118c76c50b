"""Per-frame Dice split by whether the class is in the frame: what the strict empty rule hides.

With the strict rule (protocols.md) a class absent from both a frame's reference and prediction
scores Dice 1. On EndoScapes the cystic plate, hepatocystic triangle and cystic artery are absent
from 55-67% of the validation frames, so a network that never predicts them scores 0.55-0.67 on
them. This prints, for each run's ``eval_val_<checkpoint>/per_case.csv``: per class, the frames
where the network predicts nothing, the frames without the class, the strict mean and the mean
Dice over the frames that contain the class; then both means over the classes, beside the pooled
Dice of ``summary.json`` (pixel counts summed over the frames; n/a for an evaluation without them).

    python benchmarks/empty_frames.py benches/endoscapes_seg50 [--checkpoint last]
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path


def class_rows(per_case: Path) -> dict[str, list[dict[str, float]]]:
    """``class name -> [{dice, pred_empty, ref_empty}, ...]`` (one entry per frame)."""
    by_class: dict[str, list[dict[str, float]]] = defaultdict(list)
    with open(per_case, newline="") as f:
        for row in csv.DictReader(f):
            by_class[row["class_name"]].append({k: float(row[k]) for k in ("dice", "pred_empty", "ref_empty")})
    return by_class


def summary(by_class: dict[str, list[dict[str, float]]]) -> tuple[list[tuple], float, float]:
    """Per class ``(name, frames, predicted empty, reference empty, strict mean, mean where present)``,
    then the strict mean and the present-frame mean over the classes (NaN-free: a class absent
    from every frame is left out of the second mean)."""
    lines, strict, present = [], [], []
    for name, rows in by_class.items():
        with_class = [r["dice"] for r in rows if not r["ref_empty"]]
        s = sum(r["dice"] for r in rows) / len(rows)
        p = sum(with_class) / len(with_class) if with_class else float("nan")
        lines.append((name, len(rows), int(sum(r["pred_empty"] for r in rows)),
                      int(sum(r["ref_empty"] for r in rows)), s, p))
        strict.append(s)
        if with_class:
            present.append(p)
    return lines, sum(strict) / len(strict), sum(present) / len(present)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", type=Path, help="a bench folder (its runs/) or a folder of run folders")
    parser.add_argument("--checkpoint", default="last", choices=["last", "best"])
    args = parser.parse_args()
    runs = args.bench / "runs" if (args.bench / "runs").is_dir() else args.bench
    table = []
    for run in sorted(p for p in runs.iterdir() if (p / f"eval_val_{args.checkpoint}" / "per_case.csv").is_file()):
        lines, strict, present = summary(class_rows(run / f"eval_val_{args.checkpoint}" / "per_case.csv"))
        print(f"{run.name} ({args.checkpoint} checkpoint)")
        for name, n, pred_empty, ref_empty, s, p in lines:
            print(f"  {name:24s} predicted in {n - pred_empty:2d}/{n} frames, present in {n - ref_empty:2d};"
                  f" strict {s:.3f}, on the frames with it {p:.3f}")
        pooled = json.loads((run / f"eval_val_{args.checkpoint}" / "summary.json").read_text()).get("pooled")
        table.append((run.name, strict, present, f"{pooled['dice']:.3f}" if pooled else "n/a"))
    print("\n| run | strict mean Dice | mean Dice on the frames with the class | pooled Dice |\n|---|---|---|---|")
    for name, strict, present, pooled in table:
        print(f"| {name} | {strict:.3f} | {present:.3f} | {pooled} |")


if __name__ == "__main__":
    main()
