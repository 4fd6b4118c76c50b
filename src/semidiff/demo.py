"""``semidiff demo``: few labels plus unlabeled images against labels alone, in minutes on 2 CPU cores.

The task (:mod:`semidiff.data.demo_data`): 4 labeled images from one clean acquisition regime, 40
unlabeled images and 48 validation images from a varied one (contrast, noise, bias field, blur,
structure sizes), so the unlabeled images show what the labeled ones miss, as a hospital's own
unlabeled scans look like its test scans. The demo trains supervised (labels only), a classic
semi-supervised baseline and ProtoDiff (label diffusion) with the same network, budget and seed
through the normal training path (:func:`semidiff.engine.train.train`), two trainings at a time on
a machine with 2 cores or more, evaluates each on the validation images, prints one table and
draws one figure.

What it prints is measured, not staged: ``benchmarks/demo_seeds.py`` runs this protocol with
training seeds 0, 1, 2 (``benchmarks/results/demo_seeds/``): ProtoDiff is above supervised on all
three (+14.5, +4.8, +9.8 points), with options tuned on seeds 10-12."""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from semidiff.config import config_from_dict
from semidiff.data.demo_data import DEMO_CLASSES, make_demo_dataset
from semidiff.errors import ConfigError
from semidiff.hardware import available_cores

__all__ = ["DEMO_METHODS", "DEMO_STEPS", "demo_config", "demo_table", "plot_demo", "run_demo", "write_demo_data"]

DEMO_LABELED = 4
DEMO_UNLABELED = 40
DEMO_VAL = 48  # enough validation images that one odd image moves the mean little
DEMO_SIZE = (64, 64)
DEMO_STEPS = 2000
#: supervised first: every other row is compared with it. BCP is the classic baseline because it
#: measured best of those tried on this task (tuning seed 10, 2000 steps: BCP 0.605, Mean Teacher
#: 0.458, supervised 0.599) and cost less than Mean Teacher (113 s against 156 s).
DEMO_METHODS = ("supervised", "bcp", "protodiff")
DEMO_CLASS_NAMES = ["background", "organ", "ring", "vessel"]
# Half the SSL4MIS widths: at 64x64 it trains about 1.6x faster and loses nothing measurable here.
DEMO_FEATURES = [8, 16, 32, 64, 128]
OVERLAY_CASES = 3
#: Method options that differ from the defaults, measured on this task with tuning seeds 10-12
#: (never the checked seeds 0-2; benchmarks/results/demo_seeds/README.md has every row):
#: - ``student_forward: separate``: here the labeled images (clean) and the unlabeled ones (varied)
#:   look different, and one BatchNorm batch over both cost ProtoDiff's student 20 points with no
#:   unlabeled loss at all (seed 10: 0.55 alone, 0.35 with the unlabeled images in the batch).
#: - ``confidence_threshold: 0.6``, ``lambda_u: 0.5``: at the default 0.95 the thin ring is never
#:   confident, pseudo-labels teach background around it and the ring collapses (seed 10, ring Dice
#:   0.19 at 0.95, 0.45 at 0.8, 0.48 at 0.6); 0.6 beat 0.8 on all three tuning seeds (+1.4 to +2.2
#:   points of mean Dice at 1000 steps).
#: - ``pseudo_label_steps: 1``: the teacher's pseudo-labels from one DDIM step instead of 3: the
#:   same Dice (seed 10, 2000 steps: 0.637 against 0.638) in 18% less time (196 s against 240 s).
DEMO_OPTIONS = {"protodiff": {"confidence_threshold": 0.6, "lambda_u": 0.5, "student_forward": "separate",
                              "pseudo_label_steps": 1}}
#: The package's two diffusion methods (the demo trains the cheaper, ProtoDiff).
DIFFUSION_METHODS = ("protodiff", "diffcl")
#: How the table names each method.
DESCRIPTIONS = {
    "supervised": "labels only",
    "mean_teacher": "classic baseline",
    "bcp": "classic baseline",
    "protodiff": "label diffusion",
}


def demo_config(out: Path, method: str, steps: int = DEMO_STEPS, seed: int = 0) -> dict:
    """The config of one demo run: the same data, network, optimiser and budget for every method.

    ProtoDiff is built on the same U-Net (``protodiff_unet``, as ``configs/acdc/protodiff_unet_reduced.yaml``).
    """
    if method == "protodiff":
        model = {"net": "protodiff_unet", "net_options": {"feature_stride": 4, "backbone_options": {"features": DEMO_FEATURES}}}
    else:
        model = {"net": "unet2d", "net_options": {"features": DEMO_FEATURES}}
    return {
        "experiment": {"name": f"demo_{method}", "output_dir": str(out / "runs"), "seed": seed},
        "data": {"reader": "synthetic", "root": str(out / "data"), "labeled": DEMO_LABELED,
                 "labeled_unit": "cases", "labeled_rule": "first", "patch_size": list(DEMO_SIZE)},
        "model": {**model, "num_classes": DEMO_CLASSES, "class_names": DEMO_CLASS_NAMES},
        "method": {"name": method, "options": dict(DEMO_OPTIONS.get(method, {}))},  # a copy: callers may change it
        "train": {"max_steps": steps, "labeled_batch": 4, "unlabeled_batch": 0 if method == "supervised" else 4,
                  "optimizer": "adamw", "lr": 3e-3, "weight_decay": 1e-4, "lr_schedule": "poly",
                  "val_every": steps, "precision": "32", "accelerator": "cpu", "progress_bar": False},
        "eval": {"overlay_cases": OVERLAY_CASES},
    }


def write_demo_data(root: Path) -> Path:
    """The demo's dataset (its counts and size, data seed 0) written to ``root``."""
    return make_demo_dataset(root, labeled=DEMO_LABELED, unlabeled=DEMO_UNLABELED, val=DEMO_VAL, size=DEMO_SIZE,
                             seed=0)


def demo_table(rows: Sequence[dict], protocol: str, figure: Path | None, runs: Path) -> str:
    """The demo's result as text: protocol line, one row per method, where the figures are."""
    classes = DEMO_CLASS_NAMES[1:]
    ref = rows[0]["dice"] if rows and rows[0]["method"] == "supervised" else None
    lines = [f"protocol: {protocol}", "",
             "| method | what | mean Dice | minus supervised | " + " | ".join(classes) + " | train s |",
             "|---|---|---|---|" + "---|" * len(classes) + "---|"]
    for r in rows:
        diff = "" if ref is None or r["method"] == "supervised" else f"{r['dice'] - ref:+.3f}"
        lines.append(f"| {r['method']} | {DESCRIPTIONS.get(r['method'], '')} | {r['dice']:.3f} | {diff} | "
                     + " | ".join(f"{r['per_class'][c]:.3f}" for c in classes) + f" | {r['train_s']:.0f} |")
    lines.append("")
    if figure is not None:
        lines.append(f"figure: {figure} (image | truth | each method on {OVERLAY_CASES} validation cases; Dice by method)")
    lines.append(f"runs: {runs}/demo_<method>/ (config.yaml, checkpoints/, eval_val_last/summary.md, overlays.png)")
    return "\n".join(lines)


def plot_demo(rows: Sequence[dict], run_dirs: dict[str, Path], out_file: Path, title: str) -> bool:
    """Image | truth | each method's prediction on the first validation cases, and Dice by method.

    Reads the ``overlay_slices.npz`` each run's evaluation wrote; returns False when none has one.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from semidiff.evaluation.figures import class_colour, overlay_rgb
    from semidiff.report.figures import row_colours

    slices = {m: np.load(d / "eval_val_last" / "overlay_slices.npz") for m, d in run_dirs.items()
              if (d / "eval_val_last" / "overlay_slices.npz").is_file()}
    if not slices:
        return False
    first = next(iter(slices.values()))
    cases = [k.removeprefix("image/") for k in first.files if k.startswith("image/")][:OVERLAY_CASES]
    ncol = 2 + len(slices)
    fig = Figure(figsize=(2.0 * ncol + 3.6, 2.0 * len(cases) + 0.9), dpi=110, layout="constrained")
    fig.suptitle(title, fontsize=9)
    grid = fig.add_gridspec(len(cases), ncol + 2)
    dice = {r["method"]: r["dice"] for r in rows}
    for i, case in enumerate(cases):
        image, truth = first[f"image/{case}"], first[f"truth/{case}"]
        panels = [("image", overlay_rgb(image, None)), ("truth", overlay_rgb(image, truth))]
        panels += [(m, overlay_rgb(image, z[f"pred/{case}"])) for m, z in slices.items()]
        for j, (name, rgb) in enumerate(panels):
            ax = fig.add_subplot(grid[i, j])
            ax.imshow(rgb)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name if name not in dice else f"{name}\n(mean Dice {dice[name]:.3f})", fontsize=8)
            if j == 0:
                ax.set_ylabel(case, fontsize=8)
    colours = row_colours(r["method"] for r in rows)
    bars = fig.add_subplot(grid[:, ncol:])
    names = [r["method"] for r in rows]
    values = [r["dice"] for r in rows]
    bars.bar(range(len(rows)), values, color=[colours[n] for n in names])
    if "supervised" in dice:  # the level to beat
        bars.axhline(dice["supervised"], color="0.3", ls="--", lw=1, label="supervised (labels only)")
        bars.legend(fontsize=7, loc="upper left")
    for k, v in enumerate(values):
        bars.text(k, v + 0.01, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    bars.set_xticks(range(len(rows)), names, rotation=20, fontsize=8)
    bars.set_ylim(0, 1)
    bars.set_ylabel("mean Dice on the validation cases", fontsize=8)
    bars.set_title("Dice by method", fontsize=9)
    fig.legend(handles=[Patch(color=np.asarray(class_colour(i + 1)) / 255.0, label=c)
                        for i, c in enumerate(DEMO_CLASS_NAMES[1:])],
               loc="outside lower center", ncol=len(DEMO_CLASS_NAMES) - 1, fontsize=8)
    fig.savefig(out_file)
    return True


def _train_one(out: Path, method: str, steps: int, seed: int, train_log=None, log=print) -> dict:
    """Train and evaluate one method through the normal training path; its table row.

    ``train_log`` None keeps the training's own lines quiet (the demo's worker processes).
    """
    from semidiff.engine.train import train

    cfg = config_from_dict(demo_config(out, method, steps, seed), "demo")
    log(f"=== {method}: {steps} steps, {DEMO_LABELED} labeled images"
        + ("" if method == "supervised" else f" + {DEMO_UNLABELED} unlabeled") + " ===")
    # Lightning's start-up notes (accelerators, tips) would bury the demo's own lines, and two
    # warnings every training prints say nothing to a demo user: a library's own deprecation inside
    # Lightning, and Lightning noticing a hook the engine overrides on purpose. Only for this
    # training: the caller's log level and warning filters are restored after it.
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")
            warnings.filterwarnings("ignore", message="You have overridden `on_after_batch_transfer`")
            result = train(cfg, overwrite=True, log=train_log or (lambda *_: None))["last"]["summary"]
    finally:
        lightning_log.setLevel(level)
    timing = json.loads((cfg.run_dir() / "timing.json").read_text())
    return {"method": method, "dice": result["mean"]["dice"],
            "per_class": {name: result["per_class"][name]["dice"]["mean"] for name in DEMO_CLASS_NAMES[1:]},
            "train_s": timing["wall_seconds"], "run_dir": cfg.run_dir()}


def _train_in_parallel(out: Path, methods: Sequence[str], steps: int, seed: int, workers: int, log) -> list[dict]:
    """The methods' trainings in ``workers`` processes, the costliest first; rows in ``methods`` order.

    Each training counts the others running on the machine and takes its share of the cores
    (:class:`~semidiff.engine.threads.ThreadShare`), so two trainings on 2 cores run with one
    thread each instead of fighting over both. Runs and results are exactly those of
    :func:`_train_one` in this process: only the order in time changes.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # The diffusion method costs most: start it first, the cheaper ones share the other worker.
    order = sorted(methods, key=lambda m: m not in DIFFUSION_METHODS)
    log(f"training {', '.join(order)} in {workers} processes (the cores are shared among them)")
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {m: pool.submit(_train_one, out, m, steps, seed) for m in order}
        rows = {}
        for m in order:
            rows[m] = futures[m].result()
            log(f"{m}: mean Dice {rows[m]['dice']:.3f} ({rows[m]['train_s']:.0f} s)")
    return [rows[m] for m in methods]


def run_demo(out: str | Path = "demo_output", steps: int | None = None, seed: int = 0,
             methods: Sequence[str] = DEMO_METHODS, log: Callable[[str], None] = print,
             train_log: Callable[[str], None] | None = None, parallel: int | None = None) -> dict:
    """Write the demo data, train and evaluate each method, print the table, draw the figure.

    Args:
        out: folder for the data, the runs, ``demo.png`` and ``results.md``.
        steps: training steps per method (default :data:`DEMO_STEPS`).
        seed: the training seed (the data are always generated with seed 0).
        methods: methods to train; the first must be ``supervised``, the reference of the table.
        log: where the table and progress lines go.
        train_log: where the training's own lines go (default ``log``; in parallel runs they are quiet).
        parallel: trainings at once, each in its own process (None: one per core, at most one per
            method; 1: one after the other in this process).

    Returns:
        ``{"rows": [...], "table": str, "figure": Path | None, "protocol": str, "wall_seconds": float}``;
        each row has ``method``, ``dice``, ``per_class`` (Dice per class) and ``train_s``.
    """
    out = Path(out)
    steps = steps or DEMO_STEPS
    methods = list(methods)
    if not methods or methods[0] != "supervised":
        raise ConfigError(f"the demo compares with supervised, which must come first; got {methods}")
    start = time.perf_counter()
    root = write_demo_data(out / "data")
    log(f"demo data: {root} ({DEMO_LABELED} labeled, {DEMO_UNLABELED} unlabeled, {DEMO_VAL} validation images)")
    workers = min(available_cores(), len(methods)) if parallel is None else max(1, int(parallel))
    if workers == 1:
        rows = [_train_one(out, method, steps, seed, train_log or log, log) for method in methods]
    else:
        rows = _train_in_parallel(out, methods, steps, seed, workers, log)
    run_dirs = {row["method"]: row.pop("run_dir") for row in rows}
    protocol = (f"synthetic demo task (2D {DEMO_SIZE[0]}x{DEMO_SIZE[1]}, {DEMO_CLASSES - 1} structures, data seed 0): "
                f"{DEMO_LABELED} labeled images (clean regime), {DEMO_UNLABELED} unlabeled + {DEMO_VAL} validation "
                f"images (varied regime) | {steps} steps per method, batch 4 labeled (+4 unlabeled), same U-Net, "
                f"AdamW 3e-3 | training seed {seed} | last checkpoint | Dice in [0, 1], mean over the 3 structures "
                f"and the {DEMO_VAL} validation images")
    figure = out / "demo.png"
    if not plot_demo(rows, run_dirs, figure, f"validation images (varied regime), {DEMO_LABELED} labeled images, "
                                              f"{steps} steps, seed {seed}"):
        figure = None
    table = demo_table(rows, protocol, figure, out / "runs")
    wall = time.perf_counter() - start
    (out / "results.md").write_text(f"# semidiff demo\n\n{table}\n\nfinished in {wall:.0f} s\n")
    log("\n=== semidiff demo: few labels + unlabeled images against labels alone ===")
    log(table)
    log(f"table: {out / 'results.md'}")
    log(f"demo finished in {wall:.0f} s")
    return {"rows": rows, "table": table, "figure": figure, "protocol": protocol, "wall_seconds": wall}
