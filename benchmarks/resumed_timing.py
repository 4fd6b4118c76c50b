"""Mark which steps a resumed run's ``timing.json`` covers, for runs trained before checkpoints kept time.

Until session 34, a run continued from a checkpoint (after SIGTERM or a kill) wrote the wall time of
its last piece only, against all its steps, so the report's s/step of such runs was too low (Mean
Teacher's 7-patient cell: 0.093 s/step, where its last piece ran 0.31). Checkpoints now carry the
time (``engine/module.py``); for the runs made before, this script reads where the last piece began
from the run's CSV logs (Lightning starts a new ``csv/version_*`` per invocation) and writes
``timed_steps``, the steps its ``wall_seconds`` covers, which ``semidiff report`` then uses.

    python benchmarks/resumed_timing.py benchmarks/results/*/records benches/*/runs [--dry-run]

A run with one CSV version, or whose timing already says ``timed_steps``, is left as it is.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import yaml


def last_piece_start(run: Path) -> int | None:
    """The step the run's last invocation resumed from (None: one invocation only)."""
    versions = sorted((run / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if len(versions) < 2:
        return None
    steps = [int(r["step"]) for r in csv.DictReader(versions[-1].open()) if r.get("step")]
    if not steps:
        return None
    log_every = int((yaml.safe_load((run / "config.yaml").read_text()) or {}).get("train", {}).get("log_every", 1))
    # Lightning logs after each log_every-th step (step column = global step - 1 of that step):
    # the first row of a piece that resumed at step k is at k + log_every - 1 (to a log interval).
    return max(0, min(steps) + 1 - log_every)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders of runs (records/ or runs/)")
    parser.add_argument("--dry-run", action="store_true", help="print what would change, write nothing")
    args = parser.parse_args()
    for folder in args.folders:
        for run in sorted(p for p in folder.iterdir() if (p / "timing.json").is_file()):
            timing = json.loads((run / "timing.json").read_text())
            if "timed_steps" in timing or not timing.get("steps") or (start := last_piece_start(run)) is None:
                continue
            timing["timed_steps"] = timing["steps"] - start
            print(f"{run}: wall {timing['wall_seconds']} s covers steps {start}-{timing['steps']}: "
                  f"{timing['wall_seconds'] / timing['timed_steps']:.3f} s/step "
                  f"(was {timing['wall_seconds'] / timing['steps']:.3f})")
            if not args.dry_run:
                (run / "timing.json").write_text(json.dumps(timing, indent=1))


if __name__ == "__main__":
    main()
