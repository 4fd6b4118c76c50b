"""``semidiff bench``: a grid of ordinary training runs, and the report built from them.

A bench config names training configs (one per method row) and the axes of the grid: labeled
counts, seeds and, optionally, label-noise levels. Every cell is a normal ``semidiff train`` run in
``BENCH/runs/<cell>``, started in a subprocess so that a crash in one cell cannot take the grid
down. The grid is resumable: finished cells are skipped and an interrupted cell continues from its
``last`` checkpoint. After every cell the report (tables, figures, costs) is rebuilt from what is
on disk, so :func:`write_report` alone (``semidiff report``) reproduces it without training.

Data flow: bench YAML -> :class:`BenchSpec` -> :func:`grid_cells` -> runs on disk ->
:func:`collect` -> :func:`write_report`.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from semidiff.config import apply_overrides, format_validation_error
from semidiff.errors import ConfigError

METRICS = ("dice", "jaccard", "hd95", "asd")
CHECKPOINTS = ("last", "best")


# ---- the bench config ---------------------------------------------------------------------------
class BenchMethod(BaseModel):
    """One row family of the table: a training config (and overrides) under a display name."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.+-]+$")
    config: str
    overrides: list[str] = []
    #: Labeled counts for this row only (e.g. the fully supervised upper bound); default: the bench's.
    labeled: list[float] | None = Field(default=None, min_length=1)


class BenchSpec(BaseModel):
    """The ``bench`` section of a bench YAML file.

    Attributes:
        name: Folder name of the bench under ``output_dir``.
        methods: The rows; each is a training config path, relative to the bench file's folder.
        labeled: Labeled counts (in each config's ``data.labeled_unit``).
        seeds: ``experiment.seed`` values; mean and std in the table are over these.
        noise: Optional label-noise levels, each a mapping of ``noise`` config keys (e.g.
            ``{target: pseudo, kind: flip, rate: 0.1}``); ``{}`` is the clean level. Empty list
            means no noise axis.
        overrides: Dotted overrides applied to every cell (the shared budget).
        workers: Cells run at the same time (separate processes).
        isolation: ``subprocess`` (default: a crashing cell cannot take the grid down, each cell gets a
            fresh interpreter) or ``in_process`` (no interpreter start-up per cell; one worker only).
        gpus: CUDA device ids handed out round-robin to the workers (``CUDA_VISIBLE_DEVICES``).
        qualitative_cases: Validation cases shown in the qualitative panel.
        records: Optional folder, relative to the bench file, that keeps a record of every finished
            cell: what the report reads, without checkpoints or TensorBoard events (see
            :func:`save_record`). A cell recorded there with the configuration it would train now
            is not trained again, so a grid whose records are committed can be continued on
            another machine from a fresh checkout, and its report rebuilt there.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    output_dir: str = "benches"
    methods: list[BenchMethod] = Field(min_length=1)
    labeled: list[float] = Field(min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)
    noise: list[dict[str, Any]] = []
    overrides: list[str] = []
    workers: int = Field(default=1, ge=1)
    gpus: list[int] = []
    isolation: Literal["subprocess", "in_process"] = "subprocess"
    qualitative_cases: int = Field(default=3, ge=0)
    records: str | None = None

    @model_validator(mode="after")
    def _in_process_is_serial(self) -> BenchSpec:
        if self.isolation == "in_process" and self.workers > 1:
            raise ValueError("isolation 'in_process' runs one cell at a time; use workers: 1 or 'subprocess'")
        return self

    @field_validator("methods")
    @classmethod
    def _unique_names(cls, v: list[BenchMethod]) -> list[BenchMethod]:
        names = [m.name for m in v]
        if len(set(names)) != len(names):
            raise ValueError(f"method names must be unique, got {names}")
        return v


def load_bench(path: str | Path, overrides: list[str] | None = None) -> tuple[BenchSpec, Path]:
    """Read and validate a bench YAML file; returns the spec and the folder paths are relative to."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: bench config not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(tree, dict) or "bench" not in tree:
        raise ConfigError(f"{path}: a bench config needs a top-level 'bench' section")
    for item in overrides or []:
        if not item.startswith("bench."):
            raise ConfigError(f"bench override {item!r}: expected bench.KEY=VALUE")
    apply_overrides(tree, list(overrides or []))
    try:
        spec = BenchSpec.model_validate(tree["bench"])
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path), prefix="bench.")) from None
    base = path.resolve().parent
    for m in spec.methods:
        if not (base / m.config).is_file():
            raise ConfigError(f"{path}: method {m.name!r}: training config {base / m.config} not found")
    return spec, base


# ---- the grid -----------------------------------------------------------------------------------
def noise_label(level: dict[str, Any]) -> str:
    """Short, file-name-safe label of a noise level: ``clean``, ``pseudo-flip-0.1``, ``labeled-erode-k2``."""
    if not level or level.get("target", "none") == "none":
        return "clean"
    kind = level.get("kind", "flip")
    amount = f"k{level['k']}" if kind in ("erode", "dilate") else f"{level.get('rate', 0)}"
    return f"{level.get('target')}-{kind}-{amount}"


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    method: str
    config: Path
    labeled: float
    seed: int
    noise: str
    overrides: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        base = f"{self.method}_l{self.labeled:g}_s{self.seed}"
        return base if self.noise == "clean" else f"{base}_{self.noise}"

    @property
    def train_overrides(self) -> list[str]:
        """The overrides ``semidiff train`` gets for this cell."""
        return [*self.overrides, "train.progress_bar=false"]


def grid_cells(spec: BenchSpec, base: Path, bench_dir: Path) -> list[Cell]:
    """Every cell of the grid, in run order (labeled count, then seed, then noise, then method)."""
    levels = spec.noise or [{}]
    cells = []
    counts = sorted(set(spec.labeled).union(*(m.labeled or [] for m in spec.methods)))
    for labeled, seed, level, m in itertools.product(counts, spec.seeds, levels, spec.methods):
        if labeled not in (m.labeled or spec.labeled):
            continue
        if level.get("target") == "pseudo" and not _makes_pseudo_labels(base / m.config):
            continue  # pseudo-label noise cannot change it: its clean run stands for every level
        nlabel = noise_label(level)
        noise_over = [f"noise.{k}={v}" for k, v in level.items()]
        cell = Cell(m.name, base / m.config, labeled, seed, nlabel)
        own = [
            f"experiment.output_dir={bench_dir / 'runs'}",
            f"experiment.name={cell.name}",
            f"experiment.seed={seed}",
            f"data.labeled={labeled:g}",
        ]
        # Later overrides win: shared budget, then the method's own, then the cell's coordinates.
        cells.append(Cell(m.name, cell.config, labeled, seed, nlabel,
                          tuple(spec.overrides) + tuple(m.overrides) + tuple(noise_over) + tuple(own)))
    return cells


def _makes_pseudo_labels(config: Path) -> bool:
    """Whether the training config's method learns from unlabeled data (supervised does not)."""
    return _config_uses_unlabeled(yaml.safe_load(config.read_text()) or {})


def _config_uses_unlabeled(tree: dict) -> bool:
    from semidiff.methods import method_class

    return method_class((tree.get("method") or {}).get("name", "supervised")).uses_unlabeled


def cell_done(run_dir: Path) -> bool:
    """A cell is finished once training ended and its end-of-training evaluation was written."""
    return (run_dir / "timing.json").is_file() and (run_dir / "eval_val_last" / "summary.json").is_file()


def run_cell(cell: Cell, bench_dir: Path, env: dict[str, str] | None = None, in_process: bool = False) -> int:
    """Train (or continue) one cell; its output goes to ``BENCH/logs/<cell>.log``; returns the exit code."""
    log_dir = bench_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    # --resume continues from last.ckpt when there is one and starts fresh otherwise.
    args = ["train", str(cell.config), *cell.train_overrides, "--resume"]
    cmd = [sys.executable, "-m", "semidiff", *args]
    with open(log_dir / f"{cell.name}.log", "a") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        if not in_process:
            return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        from semidiff.cli import main

        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            return main(args)


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
    same run. A key the record lacks (added to the schema after it was made) matches when it is
    at its default, the value every earlier run had in effect.
    """
    from semidiff.config import Config, load_config

    def flat(tree: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict) and v:
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    want = yaml.safe_load(load_config(cell.config, cell.train_overrides).to_yaml())
    have = yaml.safe_load((record / "config.yaml").read_text()) or {}
    for section, key in MACHINE_KEYS:
        for tree in (want, have):
            (tree.get(section) or {}).pop(key, None)
    want, have, default = flat(want), flat(have), flat(yaml.safe_load(Config().to_yaml()))
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
        shutil.copytree(record, run)
        restored += 1
    return restored


def time_left(pending: list[Cell], seconds: dict[str, list[float]]) -> str:
    """What is left of a grid, in hours, from the mean time of the finished cells of each method.

    A method has one cost whatever its labeled count or noise level (the same steps and batch), but
    methods differ 10-fold, so a method with no finished cell yet is counted apart, not guessed.
    """
    timed = [c for c in pending if seconds.get(c.method)]
    hours = sum(float(np.mean(seconds[c.method])) for c in timed) / 3600
    text = f"{len(pending)} cell(s) left"
    if timed:
        text += f", about {hours:.1f} h for {len(timed)} of them"
    if untimed := len(pending) - len(timed):
        methods = ", ".join(dict.fromkeys(c.method for c in pending if not seconds.get(c.method)))
        text += f" ({untimed} of methods not timed yet: {methods})"
    return text


def finished_seconds(cells: list[Cell], runs: Path) -> dict[str, list[float]]:
    """Training seconds of each method's finished cells (``timing.json``; evaluation adds seconds to a
    minute), records included, so the first estimate of what is left does not wait for a method's
    first cell of this invocation."""
    seconds: dict[str, list[float]] = {}
    for cell in cells:
        if cell_done(runs / cell.name) and (wall := (_read_json(runs / cell.name / "timing.json") or {})
                                            .get("wall_seconds")):
            seconds.setdefault(cell.method, []).append(float(wall))
    return seconds


def prepare_bench(config: str | Path, overrides: list[str] | None = None,
                  log: Callable[[str], None] = print) -> tuple[BenchSpec, Path, list[Cell], Path | None]:
    """Make a bench's folder and saved ``bench.yaml``, restore its records; returns the spec, the
    folder, the grid's cells and the records folder (None without one)."""
    spec, base = load_bench(config, overrides)
    bench_dir = Path(spec.output_dir) / spec.name
    if not Path(spec.output_dir).is_absolute():
        bench_dir = Path.cwd() / bench_dir
    bench_dir.mkdir(parents=True, exist_ok=True)
    records = (base / spec.records).resolve() if spec.records else None
    (bench_dir / "bench.yaml").write_text(yaml.safe_dump(
        {"bench": {**spec.model_dump(mode="json"), "methods": [
            {**m.model_dump(mode="json"), "config": str(base / m.config)} for m in spec.methods],
            "records": str(records) if records else None}},
        sort_keys=False))
    cells = grid_cells(spec, base, bench_dir)
    if records and (restored := sync_records(cells, bench_dir / "runs", records, log)):
        log(f"{restored} finished cell(s) restored from the records in {records}")
    return spec, bench_dir, cells, records


def report_from_config(config: str | Path, overrides: list[str] | None = None,
                       log: Callable[[str], None] = print) -> Path:
    """The report of a bench config's finished cells, its records included, without training any."""
    _, bench_dir, _, _ = prepare_bench(config, overrides, log)
    return write_report(bench_dir, log=log)


def run_bench(config: str | Path, overrides: list[str] | None = None, log: Callable[[str], None] = print) -> int:
    """Run every unfinished cell of a bench, rebuilding the report after each; returns the failures."""
    spec, bench_dir, cells, records = prepare_bench(config, overrides, log)
    todo = [c for c in cells if not cell_done(bench_dir / "runs" / c.name)]
    # For the estimate of what is left, logged at the start and after every cell.
    pending, seconds = list(todo), finished_seconds(cells, bench_dir / "runs")
    log(f"bench {spec.name}: {len(cells)} cells, {len(cells) - len(todo)} already finished, "
        f"{len(todo)} to run with {spec.workers} worker(s); folder {bench_dir}; {time_left(pending, seconds)}")
    lock, failures = threading.Lock(), []
    started = time.time()

    def work(i_cell: tuple[int, Cell]) -> None:
        i, cell = i_cell
        env = dict(os.environ)
        if spec.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(spec.gpus[i % len(spec.gpus)])
        t0 = time.time()
        rc = run_cell(cell, bench_dir, env, in_process=spec.isolation == "in_process")
        with lock:
            state = "done" if rc == 0 and cell_done(bench_dir / "runs" / cell.name) else f"FAILED (exit {rc})"
            pending.remove(cell)
            if state != "done":
                failures.append(cell.name)
            else:
                seconds.update(finished_seconds(cells, bench_dir / "runs"))
                if records:
                    save_record(bench_dir / "runs" / cell.name, records)
            log(f"[{time.strftime('%H:%M:%S')}] {cell.name}: {state} in {time.time() - t0:.0f} s "
                f"(log: {bench_dir / 'logs' / (cell.name + '.log')}); {time_left(pending, seconds)}")
            write_report(bench_dir, log=lambda _m: None)

    with ThreadPoolExecutor(max_workers=spec.workers) as pool:
        list(pool.map(work, enumerate(todo)))
    timing = {"wall_seconds_this_invocation": round(time.time() - started, 1), "cells": len(cells),
              "cells_run": len(todo), "failed": failures}
    (bench_dir / "bench_timing.json").write_text(json.dumps(timing, indent=1))
    write_report(bench_dir, log=log)
    if failures:
        log(f"{len(failures)} cell(s) failed: {', '.join(failures)}; rerun the same command to retry them")
    return len(failures)


# ---- collecting finished runs -------------------------------------------------------------------
@dataclass
class CellResult:
    """What the report needs from one finished run."""

    method: str
    labeled: float
    seed: int
    noise: str
    run_dir: Path
    summaries: dict[str, dict]  # checkpoint -> summary.json
    timing: dict
    class_names: list[str]
    uses_unlabeled: bool  # whether the run's method learns from unlabeled data (has pseudo-labels)

    @property
    def labeled_text(self) -> str:
        """The labeled count as its evaluation protocol states it: ``3 patients (first)``."""
        return next(iter(self.summaries.values()))["protocol"].get("labeled", f"{self.labeled:g}")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _cell_result(run: Path, cfg: dict, method: str, labeled: float, seed: int, noise: str) -> CellResult:
    sums = {w: s for w in CHECKPOINTS if (s := _read_json(run / f"eval_val_{w}" / "summary.json"))}
    names = list(next(iter(sums.values()))["per_class"])
    try:
        unlabeled = _config_uses_unlabeled(cfg)
    except ConfigError:  # a method this version does not know: the report still reads its numbers
        unlabeled = True
    return CellResult(method, labeled, seed, noise, run, sums, _read_json(run / "timing.json") or {}, names,
                      unlabeled)


def collect(target: Path) -> list[CellResult]:
    """Finished runs of a bench folder (its saved ``bench.yaml``), of one run folder, or of a folder of runs."""
    target = Path(target)
    if (target / "bench.yaml").is_file():
        spec, base = load_bench(target / "bench.yaml")
        results = []
        for c in grid_cells(spec, base, target):
            if cell_done(run := target / "runs" / c.name):
                cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
                results.append(_cell_result(run, cfg, c.method, c.labeled, c.seed, c.noise))
                results += _extra_output_results(results[-1])
        return results
    runs = [target] if (target / "config.yaml").is_file() else sorted(
        d for d in target.iterdir() if (d / "config.yaml").is_file()) if target.is_dir() else []
    if not runs:
        raise ConfigError(f"{target}: neither a bench folder (bench.yaml), a run folder (config.yaml) "
                          "nor a folder of run folders")
    done = [(run, yaml.safe_load((run / "config.yaml").read_text())) for run in runs if cell_done(run)]
    labels = variant_labels([cfg for _, cfg in done])
    results = []
    for (run, cfg), label in zip(done, labels):
        noise = noise_label(cfg.get("noise") or {})
        labeled, seed = float(cfg["data"]["labeled"]), int(cfg["experiment"]["seed"])
        results.append(_cell_result(run, cfg, label, labeled, seed, noise))
        results += _extra_output_results(results[-1])
    # A folder of runs has no row order of its own: baselines first, in the order of methods.md.
    order = ["supervised", "mean_teacher", "ua_mt", "cps", "bcp", "diffcl", "protodiff"]
    base = [base_method(r.method) for r in results]
    keyed = sorted(zip(base, results), key=lambda br: (order.index(br[0]) if br[0] in order else len(order),
                                                       br[1].method, br[1].run_dir.name))
    return [r for _, r in keyed]


def variant_labels(configs: list[dict]) -> list[str]:
    """Row names for the runs of a folder: the method's name, plus what sets a run apart.

    Runs of one method that differ in ``method.options`` or ``train.max_steps`` are different
    rows, not seeds of one row. The method's reference is the whole setting most of its runs
    share (a tie goes to the first run in folder order), and it keeps the plain name; any other
    run is named by how it departs from it, e.g. ``bcp (pretrain_steps=0.5)``. The reference is
    one run's setting, not a per-option majority: an ablation ladder that switches one option
    off in most runs must not make that "off" part of the default.
    """
    def settings(cfg: dict) -> dict[str, str]:
        flat = {k: json.dumps(v, sort_keys=True) for k, v in ((cfg.get("method") or {}).get("options") or {}).items()}
        flat["max_steps"] = json.dumps((cfg.get("train") or {}).get("max_steps"))
        return flat

    all_settings = [settings(c) for c in configs]
    names = [(c.get("method") or {}).get("name", "supervised") for c in configs]
    reference: dict[str, dict[str, str]] = {}
    for name in dict.fromkeys(names):
        mine = [tuple(sorted(st.items())) for n, st in zip(names, all_settings) if n == name]
        reference[name] = dict(max(dict.fromkeys(mine), key=mine.count))  # first most frequent
    labels = []
    for name, mine in zip(names, all_settings):
        ref = reference[name]
        differing = [f"{k}={json.loads(mine.get(k, 'null'))}" for k in sorted(set(ref) | set(mine))
                     if mine.get(k, "null") != ref.get(k, "null")]
        labels.append(f"{name} ({', '.join(differing)})" if differing else name)
    return labels


def _extra_output_results(base: CellResult) -> list[CellResult]:
    """Rows for the extra evaluations of a run's last checkpoint (``eval_val_last_<name>/``, written by
    ``semidiff eval --output NAME`` or ``--out``): another output, or other prediction options.
    They are named ``<row> [<name>]`` and share the run's training cost."""
    rows = []
    for d in sorted(base.run_dir.glob("eval_val_last_*")):
        summary = _read_json(d / "summary.json")
        if summary is None:
            continue
        suffix = d.name[len("eval_val_last_"):]
        rows.append(CellResult(f"{base.method} [{suffix}]", base.labeled, base.seed, base.noise, base.run_dir,
                               {"last": summary}, base.timing, list(summary["per_class"]), base.uses_unlabeled))
    return rows


def base_method(row_name: str) -> str:
    """The method a row belongs to: ``bcp (u_weight=0)`` and ``bcp [ds]`` -> ``bcp``."""
    return row_name.split(" ")[0]


def is_extra_evaluation(row_name: str) -> bool:
    """Whether a row is a second evaluation of a run (see :func:`_extra_output_results`)."""
    return row_name.endswith("]") and " [" in row_name


def is_variant(row_name: str) -> bool:
    """Whether a row is a method run with other settings (``bcp (u_weight=0)``), not the method's default."""
    return not is_extra_evaluation(row_name) and row_name != base_method(row_name)


def variant_groups(rows: list[dict]) -> dict[tuple[float, str], list[dict]]:
    """The rows of the variants figure: (labeled, noise) -> rows, last checkpoint.

    Only (labeled, noise) cells with a variant row; in them each method that has variants, its default
    row first (when it was run there) and then its variants, methods in table order.
    """
    rows = [r for r in rows if r["checkpoint"] == "last" and not is_extra_evaluation(r["method"])]
    groups: dict[tuple[float, str], list[dict]] = {}
    for cell in dict.fromkeys((r["labeled"], r["noise"]) for r in rows if is_variant(r["method"])):
        here = [r for r in rows if (r["labeled"], r["noise"]) == cell]
        bases = dict.fromkeys(base_method(r["method"]) for r in here if is_variant(r["method"]))
        groups[cell] = [r for b in bases for r in sorted(
            (r for r in here if base_method(r["method"]) == b), key=lambda r: is_variant(r["method"]))]
    return groups


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) of finite values."""
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def aggregate(results: list[CellResult]) -> list[dict]:
    """One row per (method, labeled, noise, checkpoint): mean and std over seeds of every metric."""
    groups: dict[tuple, list[CellResult]] = {}
    for r in results:
        groups.setdefault((r.method, r.labeled, r.noise), []).append(r)
    order = {m: i for i, m in enumerate(dict.fromkeys(r.method for r in results))}
    rows = []
    for (method, labeled, noise), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], order[kv[0][0]])):
        for which in CHECKPOINTS:
            have = [r for r in rs if which in r.summaries]
            if not have:
                continue
            row: dict[str, Any] = {"method": method, "labeled": labeled, "noise": noise, "checkpoint": which,
                                   "seeds": sorted(r.seed for r in have)}
            for metric in METRICS:
                row[metric] = mean_std([r.summaries[which]["mean"][metric] for r in have])
                for cname in have[0].class_names:
                    row[f"{metric}/{cname}"] = mean_std(
                        [r.summaries[which]["per_class"][cname][metric]["mean"] for r in have])
            row["s_per_step"] = mean_std([r.timing["wall_seconds"] / r.timing["steps"] for r in have
                                          if r.timing.get("steps")])
            row["peak_mib"] = mean_std([r.timing.get("peak_memory_mib") for r in have])
            row["infer_s_per_case"] = mean_std(
                [r.summaries[which]["protocol"].get("inference_seconds_per_case") for r in have])
            row["class_names"] = have[0].class_names
            row["labeled_text"] = have[0].labeled_text
            rows.append(row)
    return rows


# ---- the report ---------------------------------------------------------------------------------
def labeled_cell(labeled: float, labeled_text: str) -> str:
    """A labeled count as written in tables and legends: ``3`` (in the unit of the header's
    ``labeled`` line), or ``100%`` for a fraction, which a bare ``1`` would pass off as one case."""
    first = str(labeled_text).split(" ")[0]
    return first if first.endswith("%") else f"{labeled:g}"


def _fmt(ms: tuple[float, float], digits: int, n: int = 2) -> str:
    """``mean ± std``; the mean alone for a single seed (a std of 0 would claim a spread was measured)."""
    m, s = ms
    if not np.isfinite(m):
        return "n/a"
    return f"{m:.{digits}f}" if n < 2 else f"{m:.{digits}f} ± {s:.{digits}f}"


def _date_range(protos: list[dict]) -> str:
    """Evaluation dates: all of them when few, else first and last (ISO-like strings sort by time)."""
    dates = sorted({str(p["date"]) for p in protos if p.get("date")})
    if len(dates) <= 3:
        return " / ".join(dates) or "n/a"
    return f"{dates[0]} to {dates[-1]} ({len(dates)} evaluations)"


def run_count(results: list[CellResult]) -> int:
    """Trainings behind ``results``: a run's extra evaluations (``--output ds``) are rows, not runs."""
    return len({r.run_dir for r in results})


def protocol_lines(results: list[CellResult], bench_dir: Path) -> list[str]:
    """The header every table carries: what was measured, how, where and with what software."""
    import lightning
    import monai
    import torch

    protos = [r.summaries[w]["protocol"] for r in results for w in r.summaries]

    def values(key: str) -> str:
        return " / ".join(sorted({str(p.get(key)) for p in protos})) or "n/a"

    runs = run_count(results)
    extra = len(results) - runs
    finished = f"{runs} finished runs"
    if (bench_dir / "bench.yaml").is_file():  # a grid, perhaps unfinished: say how much of it
        spec, base = load_bench(bench_dir / "bench.yaml")
        finished = f"{runs} of {len(grid_cells(spec, base, bench_dir))} cells finished"
    train_hours = sum(r.timing.get("wall_seconds") or 0 for r in
                      {r.run_dir: r for r in results}.values()) / 3600
    return [
        f"- bench: `{bench_dir.name}` ({finished}"
        + (f", {extra} extra evaluation{'s' * (extra > 1)} of their last checkpoints)" if extra else ")"),
        (f"- training wall time: {train_hours:.2f} h, the sum over the runs (validation included, "
         "final evaluation not)"),
        f"- dataset: {values('dataset')}",
        f"- split: {values('split')} ({values('cases')} cases)",
        f"- labeled: {values('labeled')}",
        f"- budget: {values('budget')}",
        f"- inference: {values('inference')}; post-processing: {values('post_processing')}",
        (f"- units: {values('units')} (Dice/Jaccard in [0, 1]; HD95/ASD in {values('units')}); "
         f"empty-mask rule: {values('empty_rule')}"),
        (f"- seeds: {', '.join(str(s) for s in sorted({r.seed for r in results}))}; "
         "cells show mean ± sample std (ddof=1) over seeds of the per-run means over cases"),
        ("- checkpoints: `last` = end of training; `best` = best mean validation Dice "
         "(selected on the reported split: optimistic)"),
        (f"- machine: {values('machine')}; python {platform.python_version()}, torch {torch.__version__}, "
         f"monai {monai.__version__}, lightning {lightning.__version__}, semidiff {values('semidiff')}"),
        f"- dates: {_date_range(protos)}",
        ("- cost: s/step = training wall time / steps (validation included); peak memory = peak RSS "
         "(CPU) or peak CUDA allocation; inference s/case over the validation split"),
    ]


def write_tables(rows: list[dict], header: list[str], out: Path, figures: list[str] | None = None) -> None:
    """``table.md`` (readable) and ``table.csv`` (every number, long form)."""
    lines = ["# Bench results", "", "## Protocol", "", *header, "", "## Accuracy", ""]
    noise_axis = len({r["noise"] for r in rows}) > 1
    cols = ["method", "labeled"] + (["noise"] if noise_axis else []) + [
        "ckpt", "seeds", "Dice", "per-class Dice", "Jaccard", "HD95", "ASD"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        n = len(r["seeds"])
        per_class = ", ".join(f"{c} {_fmt(r[f'dice/{c}'], 3, n)}" for c in r["class_names"])
        labeled = labeled_cell(r["labeled"], r["labeled_text"])
        cells = [r["method"], labeled] + ([r["noise"]] if noise_axis else []) + [
            r["checkpoint"], str(n), _fmt(r["dice"], 4, n), per_class, _fmt(r["jaccard"], 4, n),
            _fmt(r["hd95"], 2, n), _fmt(r["asd"], 2, n)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Cost", "", "| method | labeled | s/step | peak memory (MiB) | inference s/case |",
              "|---|---|---|---|---|"]
    for r in rows:
        if r["checkpoint"] == "last" and r["noise"] in ("clean", rows[0]["noise"]):
            n = len(r["seeds"])
            lines.append(f"| {r['method']} | {labeled_cell(r['labeled'], r['labeled_text'])} | "
                         f"{_fmt(r['s_per_step'], 3, n)} | "
                         f"{_fmt(r['peak_mib'], 0, n)} | {_fmt(r['infer_s_per_case'], 3, n)} |")
    if figures:
        lines += ["", "Figures: " + ", ".join(f"`{f}`" for f in figures) + "."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "labeled", "noise", "checkpoint", "n_seeds", "metric", "class", "mean", "std"])
        for r in rows:
            for metric in METRICS:
                for cname in [None, *r["class_names"]]:
                    m, s = r[metric] if cname is None else r[f"{metric}/{cname}"]
                    w.writerow([r["method"], f"{r['labeled']:g}", r["noise"], r["checkpoint"], len(r["seeds"]),
                                metric, cname or "mean", f"{m:.6g}", f"{s:.6g}"])


def _colours(methods) -> dict[str, str]:
    """One colour per row, the same in every panel and figure of a report.

    Up to 10 rows get matplotlib's default cycle. More (variant rows such as ``bcp (u_weight=0)``)
    get ``tab20``: each method its dark shade, its first variant the light shade of the same hue,
    further rows the unused colours, so up to 20 rows no two share a colour. Past 20 colours repeat;
    the line figures then tell rows apart by marker (``_markers``), the bar figure by hatch (``_hatches``).
    """
    names = list(dict.fromkeys(methods))
    if len(names) <= 10:
        return {m: f"C{i}" for i, m in enumerate(names)}
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    tab20 = [to_hex(c) for c in colormaps["tab20"].colors]
    dark, light = tab20[0::2], tab20[1::2]
    hue = {b: i % 10 for i, b in enumerate(dict.fromkeys(base_method(n) for n in names))}
    out: dict[str, str] = {}
    for n in names:  # methods first: their dark shade
        if n == base_method(n):
            out[n] = dark[hue[n]]
    for n in names:  # variants: the light shade of their method's hue, else the first unused colour
        if n not in out:
            wanted = [light[hue[base_method(n)]], dark[hue[base_method(n)]]]
            free = [c for c in wanted + tab20 if c not in out.values()]
            out[n] = free[0] if free else tab20[len(out) % 20]
    return {n: out[n] for n in names}


def _colour_rank(colours: dict[str, str]) -> dict[str, int]:
    """How many earlier rows share each row's colour (0 for the first): the key of its second style."""
    seen: dict[str, int] = {}
    rank = {}
    for name, colour in colours.items():
        rank[name] = seen.get(colour, 0)
        seen[colour] = rank[name] + 1
    return rank


def _markers(colours: dict[str, str]) -> dict[str, str]:
    """A marker per row: the n-th row drawn in a colour gets the n-th shape, so no two rows look alike."""
    shapes = ["o", "s", "^", "D", "v", "P", "X", "*"]
    return {name: shapes[n % len(shapes)] for name, n in _colour_rank(colours).items()}


def _hatches(colours: dict[str, str]) -> dict[str, str]:
    """The bar-figure twin of ``_markers``: the n-th row in a colour gets the n-th hatch (none first)."""
    patterns = ["", "//", "..", "xx", "\\\\", "++", "oo", "**"]
    return {name: patterns[n % len(patterns)] for name, n in _colour_rank(colours).items()}


def _seeds_text(rows: list[dict]) -> str:
    counts = sorted({len(r["seeds"]) for r in rows})
    if counts == [1]:
        return "one seed, no error bars"
    return f"error bars: std over {'/'.join(map(str, counts))} seeds"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _sideways(i: int, n: int, step: float) -> float:
    """The x offset of the i-th of n curves that share x values, centred on them, ``step`` apart."""
    return (i - (n - 1) / 2) * step


def plot_dice_vs(rows: list[dict], axis: str, out_file: Path, xlabel: str,
                 colours: dict[str, str] | None = None) -> None:
    """Mean Dice (last checkpoint, error bar = std over seeds) against labeled count or noise level."""
    rows = [r for r in rows if r["checkpoint"] == "last"]
    # Past a handful of rows an in-axes legend covers points or error bars (seen on the ACDC grid's
    # 8 rows): it goes to the right of the plot.
    legend_outside = len({r["method"] for r in rows}) > 5
    fig = _figure(9 if legend_outside else 6, 4)
    ax = fig.add_subplot()
    # A row trained at a count no other row uses (the all-labels upper bound) is a reference line.
    by_method: dict[str, set] = {}
    for r in rows:
        by_method.setdefault(r["method"], set()).add(r[axis])
    reference = {m for m, xs in by_method.items() if axis == "labeled" and len(xs) == 1
                 and not any(xs & other for o, other in by_method.items() if o != m)}
    for i, method in enumerate(sorted(reference)):
        r = next(r for r in rows if r["method"] == method)
        n = len(r["seeds"])
        ax.axhline(r["dice"][0], color="0.3", ls=["--", ":", "-."][i % 3], lw=1,
                   label=f"{method} ({labeled_cell(r['labeled'], r['labeled_text'])} labeled): "
                         f"{_fmt(r['dice'], 3, n)}"
                         + (f" ({n} seeds)" if n > 1 else ""))
    colours = colours or _colours(r["method"] for r in rows)
    markers = _markers(colours)
    rows = [r for r in rows if r["method"] not in reference]
    xs_all = list(dict.fromkeys(r[axis] for r in rows))
    if axis == "labeled":
        xs_all = sorted(xs_all)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    # Methods at one x are spread sideways, so that their error bars do not hide each other.
    dodge = min(0.04, 0.3 / max(len(methods), 1))
    for j, method in enumerate(methods):
        pts = [(xs_all.index(r[axis]), r["dice"], len(r["seeds"])) for r in rows if r["method"] == method
               and (axis == "noise" or r["noise"] == rows[0]["noise"])]
        if not pts:
            continue
        pts.sort()
        shift = _sideways(j, len(methods), dodge)
        ax.errorbar([p[0] + shift for p in pts], [p[1][0] for p in pts],
                    yerr=[p[1][1] if p[2] > 1 else 0.0 for p in pts],
                    marker=markers[method], capsize=3 if any(p[2] > 1 for p in pts) else 0, color=colours[method],
                    label=method)
    ax.set_xticks(range(len(xs_all)), [f"{x:g}" if isinstance(x, float) else str(x) for x in xs_all])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean Dice (validation, last checkpoint)")
    ax.set_title(_seeds_text(rows), fontsize=8)
    ax.grid(alpha=0.3)
    if legend_outside:
        fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    else:
        ax.legend(fontsize=8)
    fig.savefig(out_file)


def _noise_kind_amount(label: str) -> tuple[str, str, float]:
    """``pseudo-flip-0.1`` -> ("pseudo", "flip", 0.1); ``labeled-erode-k2`` -> ("labeled", "erode", 2)."""
    target, kind, amount = label.split("-", 2)
    return target, kind, float(amount.lstrip("k"))


def noise_panels(rows: list[dict], unlabeled: dict[str, bool] | None = None,
                 ) -> dict[tuple[float, str, str], dict[str, list[tuple[float, tuple]]]]:
    """Points of the Dice-against-noise figure: panel (labeled, target, kind) -> method -> [(amount, dice)].

    Only labeled counts with at least one noisy run get panels (a folder of runs may hold others).
    The clean run of the same method and labeled count is the point at amount 0 of every panel; a
    method with only a clean run there is kept only if it has no pseudo-labels to corrupt
    (supervised, in a pseudo-label panel; ``unlabeled`` maps row names to
    :func:`uses_unlabeled`): a single point at 0, drawn as a reference line.
    """
    rows = [r for r in rows if r["checkpoint"] == "last"]
    # (target, kind, amount) of every row; a clean run is amount 0 of every kind.
    level = {r["noise"]: _noise_kind_amount(r["noise"]) for r in rows if r["noise"] != "clean"}
    panels: dict[tuple[float, str, str], dict[str, list[tuple[float, tuple]]]] = {}
    for r in sorted(rows, key=lambda r: (r["labeled"], r["noise"])):
        if r["noise"] in level:
            panels.setdefault((r["labeled"], *level[r["noise"]][:2]), {})
    for (labeled, target, kind), methods in panels.items():
        for r in rows:
            if r["labeled"] != labeled:
                continue
            if r["noise"] == "clean" or level[r["noise"]][:2] == (target, kind):
                amount = 0.0 if r["noise"] == "clean" else level[r["noise"]][2]
                methods.setdefault(r["method"], []).append((amount, r["dice"], len(r["seeds"])))
        for method, pts in list(methods.items()):
            pts.sort(key=lambda p: p[0])
            if len(pts) == 1 and not (target == "pseudo" and not (unlabeled or {}).get(method, True)):
                del methods[method]  # a clean run whose noisy runs are missing is no reference
    return panels


def uses_unlabeled(results: list[CellResult]) -> dict[str, bool]:
    """Per row name: whether its run's method learns from unlabeled data."""
    return {r.method: r.uses_unlabeled for r in results}


def plot_dice_vs_noise(rows: list[dict], out_file: Path, colours: dict[str, str] | None = None,
                       unit: str = "labeled", unlabeled: dict[str, bool] | None = None) -> None:
    """Mean Dice (last checkpoint) against noise amount, one panel per labeled count and noise kind.

    Error bars (std over seeds) only where a point has more than one seed.
    """
    panels = noise_panels(rows, unlabeled)
    colours = colours or _colours(r["method"] for r in rows)
    markers = _markers(colours)
    fig = _figure(4.2 * max(1, len(panels)), 3.8)
    for i, ((labeled, target, kind), methods) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        lines = [m for m, pts in methods.items() if len(pts) > 1 or pts[0][0] != 0.0]
        # Curves are spread sideways by a sliver of the amount axis, so their error bars do not hide
        # each other at a shared amount.
        dodge = 0.015 * (max(p[0] for pts in methods.values() for p in pts) or 1.0)
        for method, pts in methods.items():
            if method not in lines:
                ax.axhline(pts[0][1][0], color=colours.get(method, "0.3"), ls="--", lw=1,
                           label=f"{method} (no pseudo-labels)")
                continue
            seeded = any(p[2] > 1 for p in pts)
            shift = _sideways(lines.index(method), len(lines), dodge)
            ax.errorbar([p[0] + shift for p in pts], [p[1][0] for p in pts],
                        yerr=[p[1][1] if p[2] > 1 else 0.0 for p in pts] if seeded else None,
                        marker=markers.get(method, "o"), capsize=3 if seeded else 0, color=colours.get(method, "0.3"),
                        label=method)
        amount = "k (pixels)" if kind in ("erode", "dilate") else "rate"
        ax.set(xlabel=f"{kind} {amount} (0 = clean run)", ylabel="mean Dice (validation, last)",
               title=f"{labeled:g} {unit}, {target} labels: {kind}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    # The seed count of the curves (reference lines carry no error bar).
    curves = {(m, labeled) for (labeled, _, _), methods in panels.items() for m, pts in methods.items() if len(pts) > 1}
    fig.suptitle(_seeds_text([r for r in rows if r["checkpoint"] == "last" and (r["method"], r["labeled"]) in curves]
                             or rows), fontsize=8)
    fig.savefig(out_file)


def plot_per_class(rows: list[dict], out_file: Path, colours: dict[str, str] | None = None) -> None:
    """Per-class Dice bars, one panel per labeled count, one bar group per class."""
    from matplotlib.patches import Patch

    rows = [r for r in rows if r["checkpoint"] == "last" and r["noise"] == rows[0]["noise"]]
    counts = sorted({r["labeled"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours = colours or _colours(methods)
    hatches = _hatches(colours)
    classes = rows[0]["class_names"]
    fig = _figure(4.5 * len(counts) + 1.8, 3.8)
    for i, n in enumerate(counts):
        ax = fig.add_subplot(1, len(counts), i + 1)
        present = [m for m in methods if any(r["method"] == m and r["labeled"] == n for r in rows)]
        width = 0.8 / max(1, len(present))
        for j, method in enumerate(present):  # a method missing at this count leaves no gap
            r = next(r for r in rows if r["method"] == method and r["labeled"] == n)
            spread = len(r["seeds"]) > 1
            ax.bar(np.arange(len(classes)) + j * width, [r[f"dice/{c}"][0] for c in classes], width,
                   yerr=[r[f"dice/{c}"][1] for c in classes] if spread else None, capsize=2,
                   color=colours[method], hatch=hatches[method], label=method)
        ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes)
        ax.set_ylim(0, 1)
        ax.set_title(next(r["labeled_text"] for r in rows if r["labeled"] == n), fontsize=9)
        ax.set_ylabel("Dice (validation, last checkpoint)")
        ax.grid(axis="y", alpha=0.3)
    handles = [Patch(facecolor=c, hatch=hatches[m], label=m) for m, c in colours.items() if m in methods]
    fig.legend(handles=handles, loc="outside right upper", fontsize=7, title=_seeds_text(rows), title_fontsize=7)
    fig.savefig(out_file)


def labels_only_row(rows: list[dict], labeled: float, noise: str, unlabeled: dict[str, bool],
                    exclude: set[str] | frozenset[str] = frozenset()) -> dict | None:
    """The last-checkpoint row of a method that learns from labels alone (``unlabeled`` maps row names
    to :func:`uses_unlabeled`), at this labeled count and noise, not a variant and not in ``exclude``."""
    return next((r for r in rows if (r["labeled"], r["noise"], r["checkpoint"]) == (labeled, noise, "last")
                 and unlabeled.get(r["method"]) is False and not is_variant(r["method"])
                 and base_method(r["method"]) not in exclude), None)


def plot_variants(rows: list[dict], out_file: Path, colours: dict[str, str] | None = None,
                  unlabeled: dict[str, bool] | None = None) -> bool:
    """Each variant row's mean Dice beside its method's default, one panel per (labeled, noise) cell.

    A dot per row (error bar = std over seeds where there are several), the row's name on the axis,
    its value beside it, and the default's value as a dashed line through its method's rows; a
    labels-only run of the same cell (``unlabeled``: see :func:`labels_only_row`), when there is
    one, as a dotted line across the panel. Returns False (and draws nothing) without variant rows.
    """
    groups = variant_groups(rows)
    if not groups:
        return False
    colours = colours or _colours(base_method(r["method"]) for g in groups.values() for r in g)
    heights = [len(g) for g in groups.values()]
    fig = _figure(8.5, 0.8 + 0.27 * sum(heights) + 0.5 * len(groups))
    axes = fig.subplots(len(groups), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, ((labeled, noise), group) in zip(axes, groups.items()):
        ys = np.arange(len(group))[::-1]
        for y, r in zip(ys, group):
            n = len(r["seeds"])
            colour = colours.get(base_method(r["method"]), "0.3")
            ax.errorbar(r["dice"][0], y, xerr=r["dice"][1] if n > 1 else None, fmt="o" if is_variant(r["method"])
                        else "D", color=colour, capsize=3)
            seeds = f"  ({n} seeds)" if n > 1 else ""
            ax.annotate(f"{r['dice'][0]:.3f}{seeds}", (r["dice"][0], y), xytext=(6, 3), textcoords="offset points",
                        fontsize=7)
        for b in dict.fromkeys(base_method(r["method"]) for r in group):
            mine = [(y, r) for y, r in zip(ys, group) if base_method(r["method"]) == b]
            default = next((r for _, r in mine if not is_variant(r["method"])), None)
            if default is not None:
                ax.vlines(default["dice"][0], min(y for y, _ in mine) - 0.4, max(y for y, _ in mine) + 0.4,
                          colors=colours.get(b, "0.3"), linestyles="--", lw=1)
        # Labels alone, same count and noise: the bar every semi-supervised row has to clear.
        sup = labels_only_row(rows, labeled, noise, unlabeled or {}, {base_method(r["method"]) for r in group})
        if sup is not None:
            ax.axvline(sup["dice"][0], color="0.4", ls=":", lw=1.2,
                       label=f"{sup['method']}, same labels: {sup['dice'][0]:.3f}")
            ax.legend(fontsize=7, loc="lower left")
        ax.set_yticks(ys, [r["method"] + ("  [default]" if not is_variant(r["method"]) else "") for r in group],
                      fontsize=7)
        ax.set_ylim(-0.6, len(group) - 0.4)
        right = max([r["dice"][0] + r["dice"][1] for r in group] + ([sup["dice"][0]] if sup else []))
        ax.set_xlim(right=right + 0.08)  # room for the values written beside the dots
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(f"{group[0]['labeled_text']}, {noise}: variants against their method's default (dashed)",
                     fontsize=8)
    axes[-1].set_xlabel("mean Dice (validation, last checkpoint)")
    fig.savefig(out_file)
    return True


def read_logged_scalars(run_dir: Path, keys: list[str] | None = None) -> dict[str, list[tuple[int, float]]]:
    """``key -> [(step, value)]`` (sorted by step) from every CSV log version of a run.

    A resumed run has one ``csv/version_N`` folder per start; they are read in start order, so a
    step logged twice keeps its last value. ``keys``: the columns to read, each in the result even
    if never logged (None: every logged column but ``epoch`` and ``step``).
    """
    points: dict[str, dict[int, float]] = {k: {} for k in keys or []}
    versions = sorted((run_dir / "csv").glob("version_*/metrics.csv"),
                      key=lambda f: int(f.parent.name.removeprefix("version_") or 0))
    for f in versions:
        with open(f, newline="") as fh:
            for rec in csv.DictReader(fh):
                for key in keys or (k for k in rec if k not in ("epoch", "step")):
                    if rec.get(key) not in (None, ""):
                        points.setdefault(key, {})[int(rec["step"])] = float(rec[key])
    return {k: sorted(v.items()) for k, v in points.items()}


def curve_runs(results: list[CellResult]) -> list[CellResult]:
    """The runs the training-curve figure draws: the clean ones when there are any, since colour
    (method) and line style (labeled count) leave no key for the noise level."""
    return [r for r in results if r.noise == "clean"] or results


def plot_curves(results: list[CellResult], out_file: Path, colours: dict[str, str] | None = None) -> None:
    """Training loss and validation Dice against step for every run (colour = method)."""
    from matplotlib.lines import Line2D

    fig = _figure(12.5, 4)
    ax_loss, ax_dice = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    drawn = curve_runs(results)
    if len(drawn) < len(results):
        fig.suptitle("clean runs only (the noisy runs are in dice_vs_noise.png)", fontsize=8)
    results = drawn
    colours = colours or _colours(r.method for r in results)
    markers = _markers(colours)  # before dropping the undrawn rows: each row keeps its marker of the other figures
    colours = {m: c for m, c in colours.items() if any(r.method == m for r in results)}
    styles = ["-", "--", ":", "-."]
    counts = sorted({r.labeled for r in results})
    for r in results:
        c = read_logged_scalars(r.run_dir, ["train/loss", "val/dice_mean"])
        colour, style = colours[r.method], styles[counts.index(r.labeled) % 4]
        if c["train/loss"]:
            steps, vals = zip(*c["train/loss"])
            ax_loss.plot(steps, vals, style, color=colour, alpha=0.7, lw=0.8)
        if c["val/dice_mean"]:
            steps, vals = zip(*c["val/dice_mean"])
            ax_dice.plot(steps, vals, style, color=colour, marker=markers[r.method], ms=3)
    ax_loss.set(xlabel="step", ylabel="training loss (total, method-specific)", yscale="log", title="training loss")
    ax_dice.set(xlabel="step", ylabel="mean Dice", title="validation Dice")
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
    # Two keys: colour = method, line style = labeled count.
    handles = [Line2D([], [], color=colour, marker=markers[m], ms=3, label=m) for m, colour in colours.items()]
    # "100% labeled" for the all-labels run, not "1 labeled" (labeled_cell).
    shares = {r.labeled: labeled_cell(r.labeled, r.labeled_text) for r in results}
    handles += [Line2D([], [], color="0.2", ls=styles[i % 4], label=f"{shares.get(n, f'{n:g}')} labeled")
                for i, n in enumerate(counts)]
    fig.legend(handles=handles, loc="outside right upper", fontsize=7)
    fig.savefig(out_file)


def plot_qualitative(results: list[CellResult], out_file: Path, max_cases: int) -> bool:
    """Image, truth and each method's prediction on the same validation slices.

    Drawn for the labeled count and seed that the most methods share (fewest labels on a tie).

    Uses the ``overlay_slices.npz`` that evaluation writes; returns False when there is none.
    """
    from matplotlib.patches import Patch

    from semidiff.evaluation.figures import class_colour, overlay_rgb

    if max_cases == 0 or not results:
        return False
    with_slices = [r for r in results if r.noise == results[0].noise
                   and (r.run_dir / "eval_val_last" / "overlay_slices.npz").is_file()]
    # Variant rows (``bcp (u_weight=0)``) are diagnostics: the panel shows each method once.
    with_slices = [r for r in with_slices if r.method == base_method(r.method)] or with_slices
    if not with_slices:
        return False
    # The labeled count and seed where most methods can be compared (fewest labels on a tie).
    n, seed = max(sorted({(r.labeled, r.seed) for r in with_slices}),
                  key=lambda ls: len({r.method for r in with_slices if (r.labeled, r.seed) == ls}))
    chosen = {}
    for r in with_slices:
        if (r.labeled, r.seed) == (n, seed) and r.method not in chosen:
            chosen[r.method] = np.load(r.run_dir / "eval_val_last" / "overlay_slices.npz")
    first = next(iter(chosen.values()))
    cases = [k[len("image/"):] for k in first.files if k.startswith("image/")][:max_cases]
    ncol = 2 + len(chosen)
    fig = _figure(2.2 * ncol, 2.3 * len(cases) + 0.4)
    shown = next(r for r in with_slices if (r.labeled, r.seed) == (n, seed))
    fig.suptitle(f"validation slices, {shown.labeled_text}, seed {seed}, last checkpoint", fontsize=9)
    for i, case in enumerate(cases):
        image, truth = first[f"image/{case}"], first[f"truth/{case}"]
        panels = [("image", overlay_rgb(image, None)), ("truth", overlay_rgb(image, truth))]
        panels += [(m, overlay_rgb(image, z[f"pred/{case}"])) for m, z in chosen.items() if f"pred/{case}" in z]
        for j, (title, rgb) in enumerate(panels):
            ax = fig.add_subplot(len(cases), ncol, i * ncol + j + 1)
            ax.imshow(rgb)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
            if j == 0:
                ax.set_ylabel(case, fontsize=7)
    # Class colours: the foreground classes are 1.. in the order of the summaries' per-class names.
    names = with_slices[0].class_names
    fig.legend(handles=[Patch(color=np.asarray(class_colour(i + 1)) / 255.0, label=c) for i, c in enumerate(names)],
               loc="outside lower center", ncol=len(names), fontsize=8)
    fig.savefig(out_file)
    return True


def write_report(target: str | Path, log: Callable[[str], None] = print) -> Path:
    """Rebuild tables and figures of a bench folder from its finished runs; returns ``table.md``."""
    bench_dir = Path(target)
    results = collect(bench_dir)
    if not results:
        raise ConfigError(f"{bench_dir}: no finished runs yet (a run is finished once timing.json and "
                          "eval_val_last/ exist)")
    rows = aggregate(results)
    # Figures show each run's default output; extra evaluations ("method [name]") are table rows only.
    # Variant rows ("bcp (u_weight=0)") get a figure of their own beside their method's default: in
    # the method figures a dozen single-point variants bury the comparison the figures are for.
    main_rows = [r for r in rows if not is_extra_evaluation(r["method"]) and not is_variant(r["method"])]
    main_results = [r for r in results if not is_extra_evaluation(r.method) and not is_variant(r.method)]
    # "3 patients (first)" -> "labeled patients"; mixed units -> "labeled count". A fraction row
    # (the all-labels reference) names its share itself (``labeled_cell``), so it sets no unit.
    units = {str(r["labeled_text"]).split(" ")[1] for r in main_rows
             if len(str(r["labeled_text"]).split(" ")) > 1
             and not labeled_cell(r["labeled"], r["labeled_text"]).endswith("%")}
    xlabel = f"labeled {units.pop()}" if len(units) == 1 else "labeled count"
    colours = _colours(r.method for r in main_results)  # one colour per method in every figure
    plot_dice_vs(main_rows, "labeled", bench_dir / "dice_vs_labeled.png", xlabel, colours)
    plot_per_class(main_rows, bench_dir / "per_class.png", colours)
    figures = ["dice_vs_labeled.png", "per_class.png", "curves.png"]
    if len({r["noise"] for r in main_rows}) > 1:
        plot_dice_vs_noise(main_rows, bench_dir / "dice_vs_noise.png", colours,
                           "labeled" if xlabel == "labeled count" else xlabel.removeprefix("labeled "),
                           uses_unlabeled(main_results))
        figures.append("dice_vs_noise.png")
    plot_curves(main_results, bench_dir / "curves.png", colours)
    if plot_variants(rows, bench_dir / "variants.png", colours, uses_unlabeled(results)):
        figures.append("variants.png")
    else:
        (bench_dir / "variants.png").unlink(missing_ok=True)
    if plot_qualitative(main_results, bench_dir / "qualitative.png", max_cases=_qualitative_cases(bench_dir)):
        figures.append("qualitative.png")
    else:
        (bench_dir / "qualitative.png").unlink(missing_ok=True)  # a stale panel would show other runs
    write_tables(rows, protocol_lines(results, bench_dir), bench_dir, figures)
    log(f"report of {run_count(results)} runs: {bench_dir / 'table.md'}")
    return bench_dir / "table.md"


def _qualitative_cases(target: Path) -> int:
    if not (target / "bench.yaml").is_file():
        return BenchSpec.model_fields["qualitative_cases"].default
    spec, _ = load_bench(target / "bench.yaml")
    return spec.qualitative_cases
