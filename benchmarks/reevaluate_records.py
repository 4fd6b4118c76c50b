"""Evaluate the checkpoints of finished bench runs again with today's metrics, and refresh their records.

Why: a record keeps its evaluation (summary.json, per_case.csv), not its checkpoints. When the
evaluation gains a number (e.g. the pooled Dice/IoU of evaluation/metrics.py), the runs still on this
machine can be evaluated again instead of trained again. Each run's ``final.ckpt`` is evaluated into
``eval_val_last`` and ``best.ckpt`` into ``eval_val_best`` (a copy when the old evaluation said
"last = best"), under the checkpoint label the old evaluation had; the mean Dice must equal the old
one within ``--tolerance`` (else the script stops: the prediction path changed, and the record would no
longer be what its run produced). Both the run folder and its record are rewritten.

    python benchmarks/reevaluate_records.py benches/endoscapes_seg50 benchmarks/results/endoscapes_seg50/records
"""
import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from semidiff.engine.data import build_reader, build_splits
from semidiff.engine.module import load_module
from semidiff.evaluation.evaluate import evaluate


def per_case_dice(folder: Path) -> dict[tuple[str, str], float]:
    with open(folder / "per_case.csv", newline="") as f:
        return {(r["case_id"], r["class_id"]): float(r["dice"]) for r in csv.DictReader(f)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", type=Path, help="bench folder (its runs/ hold the checkpoints), or a folder of runs")
    ap.add_argument("records", type=Path, help="the bench's records folder")
    ap.add_argument("--cells", nargs="*", help="only these cells (default: every record with a run here)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="largest change of the mean Dice accepted: under bf16 autocast a loaded checkpoint's "
                         "logits differ in the last bits from the trained module's (memory layout), which flips "
                         "a few boundary pixels")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = args.bench / "runs" if (args.bench / "runs").is_dir() else args.bench  # a bench, or a folder of runs
    names = args.cells or sorted(p.name for p in args.records.iterdir() if (runs / p.name).is_dir())
    for name in names:
        run, record = runs / name, args.records / name
        if not (run / "checkpoints" / "final.ckpt").is_file():
            print(f"{name}: no final.ckpt in {run}, skipped")
            continue
        module = load_module(str(run / "checkpoints" / "final.ckpt"))
        cfg, method = module.cfg, module.method
        reader = build_reader(cfg)
        splits = build_splits(cfg, reader)
        for which, ckpt in (("last", "final.ckpt"), ("best", "best.ckpt")):
            old = record / f"eval_val_{which}"
            if not (old / "protocol.json").is_file():
                continue
            label = json.loads((old / "protocol.json").read_text())["checkpoint"]
            new = run / f"eval_val_{which}"
            if which == "best" and label.startswith("last = best"):
                shutil.copytree(run / "eval_val_last", new, dirs_exist_ok=True)
            else:
                state = torch.load(run / "checkpoints" / ckpt, map_location="cpu", weights_only=False)
                module.load_state_dict(state["state_dict"])
                evaluate(method, cfg, reader, splits.val, new, split=cfg.data.val_split or "holdout",
                         checkpoint=label, log=lambda *_: None)
            before, after = per_case_dice(old), per_case_dice(new)
            if before.keys() != after.keys():
                print(f"{name} {which}: the evaluation covers other cases than the record's; record left as it was")
                return 1
            shift = abs(np.mean(list(before.values())) - np.mean(list(after.values())))
            largest = max(abs(before[k] - after[k]) for k in before)
            if shift > args.tolerance:
                print(f"{name} {which}: mean Dice differs from the record's by {shift:.3g}; record left as it was")
                return 1
            for f in old.iterdir():  # the files the record keeps (no full-size figures)
                shutil.copy2(new / f.name, f)
            pooled = json.loads((new / "summary.json").read_text())["pooled"]
            print(f"{name} {which}: mean Dice moved {shift:.1e} (largest per-case change {largest:.1e}); pooled Dice {pooled['dice']:.4f}, "
                  f"pooled IoU {pooled['jaccard']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
