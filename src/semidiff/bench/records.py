"""The records folder of a bench: a copy of every finished cell without its bulk, so that a grid
whose records are committed can be continued, and its report rebuilt, from a fresh checkout."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from semidiff.bench.spec import Cell, cell_done
from semidiff.config import Config, load_config
from semidiff.methods import method_options

#: Parts of a run folder a record leaves out, the bulk of its size: the report reads none of them
#: (``overlays.png`` is drawn from ``overlay_slices.npz``; the qualitative panel reads that file
#: from ``eval_val_last/`` only).
RECORD_LEAVES_OUT = ("checkpoints", "tensorboard", "overlays.png")


def _left_out_of_record(folder: str, names: list[str]) -> list[str]:
    left_out = set(RECORD_LEAVES_OUT) | ({"overlay_slices.npz"} if Path(folder).name != "eval_val_last" else set())
    return [n for n in names if n in left_out]


#: Config keys that name where a run was written or read, which differ between machines.
MACHINE_KEYS = (("experiment", "output_dir"), ("data", "root"))


def save_record(run_dir: Path, records: Path) -> Path:
    """Copy a finished run to ``records/<run>``, less :data:`RECORD_LEAVES_OUT`; returns the record.

    The copy is made beside the record and moved into place, so a kill leaves the old record or
    the new one, never half of one.
    """
    dest = records / run_dir.name
    partial = records / f".{run_dir.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(run_dir, partial, ignore=_left_out_of_record)
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    return dest


def record_mismatch(cell: Cell, record: Path) -> list[str]:
    """Config keys on which a recorded run differs from what ``cell`` would train now ([] = same).

    The paths of :data:`MACHINE_KEYS` are not compared: a record made on another machine is the
    same run. A key the record lacks (added to the schema or to the method's options after it was
    made, or a method option its config left out) matches when it is at its default, the value
    every earlier run had in effect. So a default must not change once runs are recorded: set
    the new value in the configs instead.
    """
    def flat(tree: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):  # an empty mapping adds no key (as one left out)
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    want = yaml.safe_load(load_config(cell.config, cell.train_overrides).to_yaml())
    have = yaml.safe_load((record / "config.yaml").read_text()) or {}
    for section, key in MACHINE_KEYS:
        for tree in (want, have):
            (tree.get(section) or {}).pop(key, None)
    default = yaml.safe_load(Config().to_yaml())
    if name := (want.get("method") or {}).get("name"):
        # Method options a config leaves out are not written to it: their defaults count as well.
        default["method"]["options"] = method_options(name, {}).model_dump(mode="json")
    want, have, default = flat(want), flat(have), flat(default)
    missing = object()
    return sorted(k for k in set(want) | set(have)
                  if have.get(k, default.get(k, missing)) != want.get(k, missing))


def sync_records(cells: list[Cell], runs: Path, records: Path, log: Callable[[str], None] = print) -> int:
    """Bring the bench folder and its records folder level; returns the cells restored from records.

    A finished cell without a record gets one. A recorded cell that is not finished in ``runs`` is
    copied there, replacing an interrupted attempt, when its config is what the cell would train
    now; a record that differs is reported and left alone, and the cell trains again.
    """
    records.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    restored = 0
    for cell in cells:
        run, record = runs / cell.name, records / cell.name
        if cell_done(run):
            if not cell_done(record):
                save_record(run, records)
            continue
        if not cell_done(record):
            continue
        if differ := record_mismatch(cell, record):
            log(f"record {record} was made with other settings ({', '.join(differ[:5])}"
                f"{', ...' if len(differ) > 5 else ''}): {cell.name} trains again")
            continue
        shutil.rmtree(run, ignore_errors=True)
        # Copied beside the run and renamed into place, so that two bench processes started
        # together on a fresh checkout (one per core, each with its own --cells) can restore the
        # same records at once: whichever renames second finds the finished copy and keeps it.
        staging = Path(tempfile.mkdtemp(prefix=f".restoring-{cell.name}-", dir=runs))
        shutil.copytree(record, staging, dirs_exist_ok=True)
        try:
            staging.rename(run)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not cell_done(run):
                raise
        restored += 1
    return restored

