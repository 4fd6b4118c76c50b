"""``table.md`` (readable, with the protocol header) and ``table.csv`` (every number, long form)."""

from __future__ import annotations

import csv
import platform
from pathlib import Path

import numpy as np

from semidiff.bench.spec import grid_cells, load_bench
from semidiff.report.collect import METRICS, POOLED_METRICS, CellResult, run_count


def labeled_cell(labeled: float, labeled_text: str) -> str:
    """A labeled count as written in tables and legends: ``3`` (in the unit of the header's
    ``labeled`` line), or ``100%`` for a fraction, which a bare ``1`` would pass off as one case."""
    first = str(labeled_text).split(" ")[0]
    return first if first.endswith("%") else f"{labeled:g}"


def format_mean_std(ms: tuple[float, float], digits: int, n: int = 2) -> str:
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


def _precision_line(results: list[CellResult]) -> str:
    """Each run's training precision and memory format (from its timing.json), counted; the runs
    outside the most common setting are named, so a row that mixes settings shows which run is which
    (cells of one grid may train on machines where ``precision: auto`` resolves differently)."""
    groups: dict[str, list[str]] = {}
    for r in {r.run_dir: r for r in results}.values():
        prec = r.timing.get("precision")
        key = f"{prec}, {r.timing.get('memory_format', 'contiguous')}" if prec else "not recorded"
        groups.setdefault(key, []).append(r.run_dir.name)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    parts = []
    for i, (key, names) in enumerate(ordered):
        part = f"{key} ({len(names)} run{'s' * (len(names) > 1)}"
        parts.append(part + (f": {', '.join(sorted(names))})" if i > 0 else ")"))
    return "- training precision, memory format: " + (" / ".join(parts) or "n/a")


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
    timings = [r.timing for r in {r.run_dir: r for r in results}.values()]
    train_hours = sum(t.get("wall_seconds") or 0 for t in timings) / 3600
    partly_timed = sum(1 for t in timings if t.get("timed_steps"))
    return [
        f"- bench: `{bench_dir.name}` ({finished}"
        + (f", {extra} extra evaluation{'s' * (extra > 1)} of their last checkpoints)" if extra else ")"),
        (f"- training wall time: {train_hours:.2f} h, the sum over the runs (validation included, "
         "final evaluation not)"
         + (f"; {partly_timed} run{'s' * (partly_timed > 1)} resumed from checkpoints that kept no time count only "
            "their last piece (s/step from the steps it covers)" if partly_timed else "")),
        _precision_line(results),
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
        ("- cost: s/step = training wall time / the steps it covers (validation included); peak memory = peak RSS "
         "(CPU) or peak CUDA allocation; inference s/case over the validation split"),
    ]


def write_tables(rows: list[dict], header: list[str], out: Path, figures: list[str] | None = None) -> None:
    """``table.md`` (readable) and ``table.csv`` (every number, long form)."""
    lines = ["# Bench results", "", "## Protocol", "", *header, "", "## Accuracy", ""]
    noise_axis = len({r["noise"] for r in rows}) > 1
    # Pooled columns once any run has the voxel counts (runs evaluated before them show n/a).
    pooled = any(np.isfinite(r["pooled_dice"][0]) for r in rows)
    cols = ["method", "labeled"] + (["noise"] if noise_axis else []) + [
        "ckpt", "seeds", "Dice", "per-class Dice", "Jaccard", "HD95", "ASD"] + (
        ["pooled Dice", "pooled per-class Dice", "pooled IoU"] if pooled else [])
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        n = len(r["seeds"])
        per_class = ", ".join(f"{c} {format_mean_std(r[f'dice/{c}'], 3, n)}" for c in r["class_names"])
        labeled = labeled_cell(r["labeled"], r["labeled_text"])
        cells = [r["method"], labeled] + ([r["noise"]] if noise_axis else []) + [
            r["checkpoint"], str(n), format_mean_std(r["dice"], 4, n), per_class, format_mean_std(r["jaccard"], 4, n),
            format_mean_std(r["hd95"], 2, n), format_mean_std(r["asd"], 2, n)]
        if pooled:
            cells += [format_mean_std(r["pooled_dice"], 4, n),
                      ", ".join(f"{c} {format_mean_std(r[f'pooled_dice/{c}'], 3, n)}" for c in r["class_names"]),
                      format_mean_std(r["pooled_jaccard"], 4, n)]
        lines.append("| " + " | ".join(cells) + " |")
    if pooled:
        lines += ["", ("Dice, Jaccard, HD95 and ASD: per case, then averaged (empty-mask rule above). Pooled: the "
                       "voxel counts of all cases summed per class first, no empty rule (a class never predicted "
                       "pools to 0), as semantic-segmentation benchmarks report mIoU.")]
    lines += ["", "## Cost", "", "| method | labeled | s/step | peak memory (MiB) | inference s/case |",
              "|---|---|---|---|---|"]
    for r in rows:
        if r["checkpoint"] == "last" and r["noise"] in ("clean", rows[0]["noise"]):
            n = len(r["seeds"])
            lines.append(f"| {r['method']} | {labeled_cell(r['labeled'], r['labeled_text'])} | "
                         f"{format_mean_std(r['s_per_step'], 3, n)} | "
                         f"{format_mean_std(r['peak_mib'], 0, n)} | {format_mean_std(r['infer_s_per_case'], 3, n)} |")
    if figures:
        lines += ["", "Figures: " + ", ".join(f"`{f}`" for f in figures) + "."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "labeled", "noise", "checkpoint", "n_seeds", "metric", "class", "mean", "std"])
        for r in rows:
            for metric in METRICS + POOLED_METRICS:
                for cname in [None, *r["class_names"]]:
                    m, s = r[metric] if cname is None else r[f"{metric}/{cname}"]
                    if not np.isfinite(m):  # a pooled metric of runs evaluated before the counts
                        continue
                    w.writerow([r["method"], f"{r['labeled']:g}", r["noise"], r["checkpoint"], len(r["seeds"]),
                                metric, cname or "mean", f"{m:.6g}", f"{s:.6g}"])

