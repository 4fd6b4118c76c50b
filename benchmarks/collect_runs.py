"""Tabulate finished runs (their eval_val_{last,best}/summary.json and timing.json) as Markdown.

    python benchmarks/collect_runs.py RUN_DIR [RUN_DIR ...] > benchmarks/results/table.md

The header repeats each run's protocol (dataset, split, labeled, budget, units, empty rule,
seed, machine); rows give mean Dice, per-class Dice, HD95, ASD (mean ± std over cases), wall
time and seconds per step (wall time / steps: validation included).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(run: Path, which: str) -> tuple[dict, str] | None:
    f = run / f"eval_val_{which}" / "summary.json"
    if not f.is_file():
        return None
    s = json.loads(f.read_text())
    timing = json.loads((run / "timing.json").read_text()) if (run / "timing.json").is_file() else {}
    p = s["protocol"]
    per_class = ", ".join(f"{name} {v['dice']['mean']:.4f}" for name, v in s["per_class"].items())
    m, sd = s["mean"], s.get("std", {})
    wall = timing.get("wall_seconds")
    steps = timing.get("steps")
    sps = f"{wall / steps:.3f}" if wall and steps else "n/a"
    wall_s = f"{wall:.0f}" if wall else "n/a"
    line = (f"| {run.name} | {p['labeled']} | {which} | {m['dice']:.4f} ± {sd.get('dice', 0):.4f} | {per_class} | "
            f"{m['jaccard']:.4f} | {m['hd95']:.2f} ± {sd.get('hd95', 0):.2f} | {m['asd']:.2f} | "
            f"{wall_s} | {sps} |")
    return p, line


def main(runs: list[str]) -> None:
    lines, protocols = [], []
    for r in runs:
        for which in ("last", "best"):
            got = row(Path(r), which)
            if got:
                protocols.append(got[0])
                lines.append(got[1])
    if not protocols:
        sys.exit("no finished runs with eval_val_*/summary.json")
    keys = ["dataset", "split", "cases", "budget", "inference", "post_processing", "units", "empty_rule",
            "seed", "machine", "semidiff", "date"]
    print("## Protocol\n")
    for k in keys:
        values = sorted({str(p.get(k)) for p in protocols})
        print(f"- {k}: {' / '.join(values)}")
    print("- checkpoint: `last` = end of training; `best` = best mean Dice on the validation split "
          "(selected on the same split that is reported: no separate test split here)")
    print("- Dice/Jaccard in [0, 1]; HD95 and ASD (one-way, prediction to reference) in voxels; "
          "mean ± std over validation cases; s/step = wall time / steps, validation included\n")
    print("| run | labeled | checkpoint | mean Dice | per-class Dice | Jaccard | HD95 | ASD | wall s | s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
