"""Collecting finished runs (a bench folder, a run folder or a folder of runs) and aggregating
their metrics over seeds: the numbers every table and figure of the report is drawn from."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from semidiff.bench.spec import (
    cell_done,
    config_uses_unlabeled,
    grid_cells,
    load_bench,
    noise_label,
)
from semidiff.errors import ConfigError

METRICS = ("dice", "jaccard", "hd95", "asd")
#: Dice and Jaccard of the voxel counts summed over cases (evaluation/metrics.py); NaN for a run
#: evaluated before the counts were recorded.
POOLED_METRICS = ("pooled_dice", "pooled_jaccard")
CHECKPOINTS = ("last", "best")


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


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def seconds_per_step(timing: dict) -> float | None:
    """Training seconds per step of a run's ``timing.json``; None without steps.

    ``timed_steps`` (a run resumed from a checkpoint that kept no time) are the steps that
    ``wall_seconds`` covers; otherwise it covers all ``steps``.
    """
    steps = timing.get("timed_steps") or timing.get("steps")
    return timing["wall_seconds"] / steps if steps and timing.get("wall_seconds") is not None else None


def _cell_result(run: Path, cfg: dict, method: str, labeled: float, seed: int, noise: str) -> CellResult:
    sums = {w: s for w in CHECKPOINTS if (s := read_json(run / f"eval_val_{w}" / "summary.json"))}
    names = list(next(iter(sums.values()))["per_class"])
    try:
        unlabeled = config_uses_unlabeled(cfg)
    except ConfigError:  # a method this version does not know: the report still reads its numbers
        unlabeled = True
    return CellResult(method, labeled, seed, noise, run, sums, read_json(run / "timing.json") or {}, names,
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
    # A folder of runs has no row order of its own: the methods' table_rank gives it.
    from semidiff.methods import list_methods, method_class

    rank = {name: method_class(name).table_rank for name in list_methods()}
    base = [base_method(r.method) for r in results]
    keyed = sorted(zip(base, results), key=lambda br: (rank.get(br[0], max(rank.values(), default=0) + 1),
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
        summary = read_json(d / "summary.json")
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
            for metric in POOLED_METRICS:
                row[metric] = mean_std([pooled_value(r.summaries[which], metric) for r in have])
                for cname in have[0].class_names:
                    row[f"{metric}/{cname}"] = mean_std(
                        [pooled_value(r.summaries[which], metric, cname) for r in have])
            row["s_per_step"] = mean_std([v for r in have if (v := seconds_per_step(r.timing)) is not None])
            row["peak_mib"] = mean_std([r.timing.get("peak_memory_mib") for r in have])
            row["infer_s_per_case"] = mean_std(
                [r.summaries[which]["protocol"].get("inference_seconds_per_case") for r in have])
            row["class_names"] = have[0].class_names
            row["labeled_text"] = have[0].labeled_text
            rows.append(row)
    return rows


def pooled_value(summary: dict, metric: str, class_name: str | None = None) -> float:
    """``pooled_dice``/``pooled_jaccard`` of a summary, over the classes or of one; NaN when absent."""
    name = metric.removeprefix("pooled_")
    entry = summary.get("pooled") if class_name is None else summary["per_class"][class_name].get("pooled")
    return float(entry[name]) if entry else float("nan")


def uses_unlabeled(results: list[CellResult]) -> dict[str, bool]:
    """Per row name: whether its run's method learns from unlabeled data."""
    return {r.method: r.uses_unlabeled for r in results}


def run_count(results: list[CellResult]) -> int:
    """Trainings behind ``results``: a run's extra evaluations (``--output ds``) are rows, not runs."""
    return len({r.run_dir for r in results})


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
