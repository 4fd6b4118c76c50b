"""The demo's protocol with several training seeds: is its result measured or a lucky seed?

    python benchmarks/demo_seeds.py [--seeds 0 1 2] [--steps N] [--out demo_seeds_output]

Runs ``semidiff demo`` (:func:`semidiff.demo.run_demo`: the same data, methods, budget and code
path) once per training seed, each into ``OUT/seed_<s>/``, then prints a Markdown table: each
method's mean Dice per seed, and each method minus supervised per seed, with on how many seeds
the difference is positive. The table is also written to ``OUT/table.md`` and the numbers to
``OUT/results.json``. The committed output is in ``benchmarks/results/demo_seeds/``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from semidiff.demo import DEMO_METHODS, DEMO_STEPS, DEMO_VAL, run_demo


def seeds_table(dice: dict[int, dict[str, float]]) -> str:
    """Markdown: Dice per method and seed, then each method minus supervised, seed by seed."""
    seeds = sorted(dice)
    methods = list(next(iter(dice.values())))
    head = "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |"
    rule = "|---|" + "---|" * (len(seeds) + 1)
    lines = [f"Mean Dice on the {DEMO_VAL} validation images (last checkpoint):", "", head, rule]
    for m in methods:
        values = [dice[s][m] for s in seeds]
        lines.append(f"| {m} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {np.mean(values):.4f} |")
    lines += ["", "Minus supervised, paired by seed:", "",
              "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | seeds above supervised |",
              "|---|" + "---|" * (len(seeds) + 2)]
    for m in methods[1:]:
        diffs = [dice[s][m] - dice[s]["supervised"] for s in seeds]
        lines.append(f"| {m} | " + " | ".join(f"{d:+.4f}" for d in diffs)
                     + f" | {np.mean(diffs):+.4f} | {sum(d > 0 for d in diffs)} of {len(seeds)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=DEMO_STEPS)
    parser.add_argument("--out", default="demo_seeds_output")
    args = parser.parse_args(argv)
    out = Path(args.out)
    dice: dict[int, dict[str, float]] = {}
    walls = {}
    for seed in args.seeds:
        start = time.perf_counter()
        result = run_demo(out / f"seed_{seed}", steps=args.steps, seed=seed, methods=DEMO_METHODS,
                          train_log=lambda *_: None)
        walls[seed] = round(time.perf_counter() - start, 1)
        dice[seed] = {r["method"]: r["dice"] for r in result["rows"]}
    table = seeds_table(dice)
    print(f"\n=== demo protocol, {args.steps} steps, training seeds {args.seeds} ===")
    print(result["protocol"].replace(f"training seed {args.seeds[-1]}", "training seed s"))
    print()
    print(table)
    print("\ndemo wall time per seed (s): " + ", ".join(f"seed {s}: {w:.0f}" for s, w in walls.items()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"steps": args.steps, "dice": dice, "wall_seconds": walls}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
