"""One training of the demo's protocol with changed settings: how the demo's options were tuned.

    python benchmarks/demo_cell.py OUT NAME METHOD SEED STEPS [dotted.key=yaml ...]

Writes the demo's data (:func:`semidiff.demo.write_demo_data`, as ``semidiff demo``
does) to ``OUT/data`` if it is not there, trains ``METHOD`` with :func:`semidiff.demo.demo_config`
changed by the overrides (e.g. ``method.options.confidence_threshold=0.6``,
``train.accelerator=gpu``), evaluates the last checkpoint and prints one ``RESULT {json}`` line:
mean and per-class Dice on the validation images and the training's wall seconds. The rows of
``benchmarks/results/demo_seeds/tuning.md`` are such lines.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import yaml

from semidiff.config import config_from_dict
from semidiff.demo import DEMO_CLASS_NAMES, demo_config, write_demo_data
from semidiff.engine.train import train


def main(argv: list[str]) -> int:
    if len(argv) < 5:
        print(__doc__, file=sys.stderr)
        return 2
    out, name, method, seed, steps, overrides = Path(argv[0]), argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5:]
    if not (out / "data" / "dataset.json").is_file():
        write_demo_data(out / "data")
    d = demo_config(out, method, steps, seed)
    d["experiment"]["name"] = name
    for item in overrides:
        key, value = item.split("=", 1)
        *path, last = key.split(".")
        node = d
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    cfg = config_from_dict(d, "demo_cell")
    summary = train(cfg, overwrite=True, log=lambda *_: None)["last"]["summary"]
    wall = json.loads((cfg.run_dir() / "timing.json").read_text())["wall_seconds"]
    print("RESULT " + json.dumps({
        "name": name, "method": method, "seed": seed, "steps": steps, "opts": overrides,
        "dice": summary["mean"]["dice"],
        "per_class": {c: summary["per_class"][c]["dice"]["mean"] for c in DEMO_CLASS_NAMES[1:]},
        "wall": wall}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
