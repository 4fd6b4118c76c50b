"""Noise-robustness sweep: validation Dice of each method against the level of label noise.

    python benchmarks/noise_sweep.py --config configs/acdc/supervised_reduced.yaml \\
        --methods supervised configs/acdc/mean_teacher_reduced.yaml configs/acdc/bcp_reduced.yaml \\
        --levels flip:0 flip:0.1 flip:0.2 flip:0.3 erode:2 erode:4 dilate:2 dilate:4 \\
        --target pseudo --steps 2500 --out benchmarks/results/noise_sweep_acdc

Each (method, level) pair is one ordinary ``semidiff train`` run (a subprocess, one at a time; its
console output goes to ``OUT/logs/<run>.log``), configured by the ``noise`` config section
(:class:`semidiff.config.NoiseConfig`). Run folders live in ``OUT/runs/<method>__<level>`` and the
resolved configs in ``OUT/configs``. Started again with the same arguments, the sweep skips finished
runs (their ``eval_val_last/summary.json`` exists), resumes half-trained ones from their last
checkpoint, and refuses to mix in a finished run whose saved config differs from the one it would
train now. At the end (and with ``--report-only``) it writes:

- ``OUT/noise_sweep.md``: protocol header, a method x level table of validation Dice (mean over
  foreground classes, last checkpoint), the change from each method's clean run, and every run's
  Dice at the last and the best checkpoint;
- ``OUT/noise_sweep.png``: Dice against noise level, one panel per noise kind, one line per method
  (the clean run is the 0 of every panel);
- ``OUT/noise_sweep.json``: the same numbers, machine-readable.

Methods: a registered method name (the base config with ``method.name`` set and its
``method.options`` emptied unless the base config already is that method) or a YAML config (used
whole for that method, e.g. the ``*_reduced.yaml`` of each method). Levels: ``none`` (noise off),
``flip:P``, ``drop:Q`` (rates in [0, 1]) and ``erode:K``, ``dilate:K`` (pixels). ``flip:0`` and
``none`` are both the clean run. ``--set key=value`` overrides apply to every run. With
``--target pseudo``, a method that makes no pseudo-labels (``supervised``) trains only its clean
run, which then stands for its every level (pseudo-label noise cannot change it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from semidiff.config import Config, load_config
from semidiff.errors import ConfigError, SemidiffError
from semidiff.methods import method_class
from semidiff.noise import describe_noise

DEFAULT_LEVELS = ["flip:0", "flip:0.1", "flip:0.2", "flip:0.3", "erode:2", "erode:4", "dilate:2", "dilate:4"]
# Keys of the protocol header shared by every run of a sweep (the noise itself differs per run).
PROTOCOL_KEYS = ["dataset", "split", "cases", "labeled", "network", "budget", "inference", "post_processing",
                 "units", "empty_rule", "seed", "machine", "semidiff"]


@dataclass(frozen=True)
class Level:
    """One noise level: ``kind`` (none | flip | drop | erode | dilate) and its value (rate or k)."""

    kind: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Level:
        if text == "none":
            return cls("none", 0.0)
        kind, sep, raw = text.partition(":")
        if not sep or kind not in ("flip", "drop", "erode", "dilate"):
            raise ConfigError(f"--levels: {text!r} must be none, flip:P, drop:Q, erode:K or dilate:K")
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"--levels: {text!r}: {raw!r} is not a number") from None
        if kind in ("erode", "dilate") and (value != int(value) or value < 0):
            raise ConfigError(f"--levels: {text!r}: k must be a whole number of pixels >= 0")
        if kind in ("flip", "drop") and not 0.0 <= value <= 1.0:
            raise ConfigError(f"--levels: {text!r}: the rate must be in [0, 1]")
        return cls(kind, value)

    @property
    def clean(self) -> bool:
        return self.kind == "none" or self.value == 0

    @property
    def tag(self) -> str:
        """Short name for run folders and table columns, e.g. ``flip0.1``, ``erode2``, ``none``."""
        if self.kind == "none":
            return "none"
        return f"{self.kind}{int(self.value)}" if self.kind in ("erode", "dilate") else f"{self.kind}{self.value:g}"

    @property
    def title(self) -> str:
        if self.kind == "none":
            return "no noise"
        return f"{self.kind} k={int(self.value)}" if self.kind in ("erode", "dilate") else f"{self.kind} {self.value:g}"

    def overrides(self, target: str) -> list[str]:
        """The ``noise.*`` overrides of this level (``target``: pseudo or labeled)."""
        if self.kind == "none":
            return ["noise.target=none", "noise.kind=flip", "noise.rate=0", "noise.k=0"]
        if self.kind in ("erode", "dilate"):
            return [f"noise.target={target}", f"noise.kind={self.kind}", "noise.rate=0", f"noise.k={int(self.value)}"]
        return [f"noise.target={target}", f"noise.kind={self.kind}", f"noise.rate={self.value:g}", "noise.k=0"]


@dataclass
class Planned:
    """One run of the sweep."""

    method: str
    level: Level
    name: str
    config: Config
    #: the clean run this one is identical to (pseudo-label noise on a method with no pseudo-labels)
    reuses: Planned | None = None


def method_entry(entry: str, base: str) -> tuple[str, str, list[str]]:
    """``(label, config path, overrides)`` of a ``--methods`` entry: a method name or a YAML config."""
    if entry.endswith((".yaml", ".yml")):
        path = Path(entry)
        if not path.is_file():
            raise ConfigError(f"--methods: {path}: config file not found")
        return load_config(path).method.name, str(path), []
    base_method = load_config(base).method.name
    extra = [f"method.name={entry}"] + ([] if entry == base_method else ["method.options={}"])
    return entry, base, extra


def plan_sweep(base: str, methods: list[str], levels: list[Level], target: str, steps: int | None, out: Path,
               labeled_share: float, noise_seed: int, extra: list[str]) -> list[Planned]:
    """Every run's validated config, before anything trains (a bad key fails in seconds)."""
    plans, seen = [], set()
    for entry in methods:
        label, path, method_overrides = method_entry(entry, base)
        if label in seen:
            raise ConfigError(f"--methods: method {label!r} given twice")
        seen.add(label)
        for level in levels:
            name = f"{label}__{level.tag}"
            overrides = [*method_overrides, *extra, *level.overrides(target),
                         f"noise.labeled_share={labeled_share:g}", f"noise.seed={noise_seed}",
                         f"experiment.name={name}", f"experiment.output_dir={out / 'runs'}"]
            if steps is not None:
                overrides.append(f"train.max_steps={steps}")
            plans.append(Planned(label, level, name, load_config(path, overrides)))
        _reuse_clean_runs(plans, label, target)
    return plans


def _reuse_clean_runs(plans: list[Planned], label: str, target: str) -> None:
    """Pseudo-label noise cannot change a method that makes no pseudo-labels (supervised): its noisy
    levels reuse its clean run instead of training identical copies."""
    mine = [p for p in plans if p.method == label]
    clean = next((p for p in mine if p.level.clean), None)
    if target != "pseudo" or clean is None or method_class(clean.config.method.name).uses_unlabeled:
        return
    for p in mine:
        if not p.level.clean:
            p.reuses = clean


def finished(plan: Planned) -> bool:
    """True when the run has its final validation; a finished run with another config is an error."""
    run = plan.config.run_dir()
    if not (run / "eval_val_last" / "summary.json").is_file():
        return False
    saved = run / "config.yaml"
    if saved.is_file() and yaml.safe_load(saved.read_text()) != plan.config.model_dump(mode="json"):
        raise SemidiffError(f"{run}: finished with a different config than this sweep asks for; "
                            "delete the folder or use another --out")
    return True


def train_one(plan: Planned, out: Path, in_process: bool, log=print) -> bool:
    """Train (or resume) one run through the normal ``semidiff train`` path; True on success."""
    cfg_path = out / "configs" / f"{plan.name}.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(plan.config.to_yaml())
    if in_process:
        from semidiff.engine.train import train

        train(plan.config, resume=True, log=lambda *_: None)
        return True
    log_path = out / "logs" / f"{plan.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as f:
        code = subprocess.call([sys.executable, "-m", "semidiff.cli", "train", str(cfg_path), "--resume"],
                               stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        log(f"  {plan.name}: semidiff train failed (exit {code}); see {log_path}")
    return code == 0


def _dice(run: Path, which: str) -> float | None:
    f = run / f"eval_val_{which}" / "summary.json"
    return json.loads(f.read_text())["mean"]["dice"] if f.is_file() else None


def collect(plans: list[Planned]) -> list[dict]:
    """One record per planned run: its Dice (None while unfinished), protocol and timing."""
    records = []
    for p in plans:
        run = (p.reuses or p).config.run_dir()
        summary = run / "eval_val_last" / "summary.json"
        timing = run / "timing.json"
        protocol = json.loads(summary.read_text())["protocol"] if summary.is_file() else None
        if protocol and p.reuses:
            protocol["noise"] = (f"{describe_noise(p.config.noise)}; the method makes no pseudo-labels: "
                                 f"clean run {p.reuses.name} reused")
        records.append({
            "run": p.name, "method": p.method, "kind": p.level.kind, "value": p.level.value,
            "level": p.level.title, "clean": p.level.clean,
            "dice_last": _dice(run, "last"), "dice_best": _dice(run, "best"),
            "protocol": protocol,
            "timing": json.loads(timing.read_text()) if timing.is_file() else None,
        })
    return records


def _fmt(x: float | None, points: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:+.1f}" if points else f"{x:.4f}"


def clean_dice(records: list[dict], method: str) -> float | None:
    vals = [r["dice_last"] for r in records if r["method"] == method and r["clean"] and r["dice_last"] is not None]
    return vals[0] if vals else None


def markdown(records: list[dict], target: str, labeled_share: float) -> str:
    """The sweep's Markdown report: protocol header, Dice table, drops, and all runs."""
    protocols = [r["protocol"] for r in records if r["protocol"]]
    lines = ["# Noise-robustness sweep", "", "## Protocol", ""]
    for key in PROTOCOL_KEYS:
        values = sorted({str(p.get(key)) for p in protocols})
        lines.append(f"- {key}: {' / '.join(values) if values else 'n/a'}")
    where = "pseudo-labels (every method's hard pseudo-labels / soft targets where they are made)" \
        if target == "pseudo" else f"labeled masks ({labeled_share:.0%} of the labeled cases, fixed for the run)"
    lines += [
        (f"- noise target: {where}; the levels are the columns; each run's exact setting is its "
         "protocol's `noise` line (last table)"),
        ("- Dice: mean over foreground classes and validation cases, in [0, 1], last checkpoint "
         "(the best-on-validation checkpoint is in the last table; it is selected on the reported split)"),
        "- change: Dice points against the same method's clean run (noisy minus clean: negative = worse)",
        "",
    ]
    methods = list(dict.fromkeys(r["method"] for r in records))
    levels = list(dict.fromkeys(r["level"] for r in records))
    by = {(r["method"], r["level"]): r for r in records}
    head = "| method | " + " | ".join(levels) + " |"
    rule = "|---|" + "---|" * len(levels)
    lines += ["## Validation Dice", "", head, rule]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_fmt(by[m, lv]["dice_last"]) if (m, lv) in by else "" for lv in levels) + " |")
    noisy_levels = [lv for lv in levels if not any(r["clean"] for r in records if r["level"] == lv)]
    if noisy_levels:
        lines += ["", "## Change from the clean run (Dice points)", "",
                  "| method | " + " | ".join(noisy_levels) + " | mean change |", "|---|" + "---|" * (len(noisy_levels) + 1)]
        for m in methods:
            ref = clean_dice(records, m)
            drops = [None if ref is None or (m, lv) not in by or by[m, lv]["dice_last"] is None
                     else by[m, lv]["dice_last"] - ref for lv in noisy_levels]
            known = [d for d in drops if d is not None]
            mean = sum(known) / len(known) if known else None
            lines.append(f"| {m} | " + " | ".join(_fmt(d, True) for d in drops) + f" | {_fmt(mean, True)} |")
    lines += ["", "## All runs", "", "| run | noise | Dice last | Dice best | steps | wall s |", "|---|---|---|---|---|---|"]
    for r in records:
        noise = r["protocol"].get("noise", "n/a") if r["protocol"] else "not finished"
        t = r["timing"] or {}
        lines.append(f"| {r['run']} | {noise} | {_fmt(r['dice_last'])} | {_fmt(r['dice_best'])} | "
                     f"{t.get('steps', 'n/a')} | {t.get('wall_seconds', 'n/a')} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    """Dice against noise level, one panel per noise kind; the clean run is every panel's 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("flip", "erode", "dilate", "drop") if any(r["kind"] == k and not r["clean"] for r in records)]
    kinds = kinds or ["flip"]
    xlabels = {"flip": "flip rate p", "drop": "drop probability q", "erode": "erosion k (px)", "dilate": "dilation k (px)"}
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), sharey=True, squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in records))
    for ax, kind in zip(axes[0], kinds):
        for m in methods:
            pts = {0.0: clean_dice(records, m)}
            pts.update({r["value"]: r["dice_last"] for r in records if r["method"] == m and r["kind"] == kind
                        and not r["clean"]})
            xs = sorted(x for x, y in pts.items() if y is not None)
            if xs:
                ax.plot(xs, [pts[x] for x in xs], marker="o", label=m)
        ax.set_xlabel(xlabels[kind])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation Dice (last checkpoint)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Dice against label-noise level")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(plans: list[Planned], out: Path, target: str, labeled_share: float) -> list[dict]:
    records = collect(plans)
    (out / "noise_sweep.md").write_text(markdown(records, target, labeled_share))
    (out / "noise_sweep.json").write_text(json.dumps(records, indent=1))
    plot(records, out / "noise_sweep.png")
    return records


def main(argv: list[str] | None = None, log=print) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="base config (dataset, net, budget)")
    ap.add_argument("--methods", nargs="+", required=True, help="method names or per-method YAML configs")
    ap.add_argument("--levels", nargs="+", default=DEFAULT_LEVELS, help=f"default: {' '.join(DEFAULT_LEVELS)}")
    ap.add_argument("--target", choices=["pseudo", "labeled"], default="pseudo")
    ap.add_argument("--labeled-share", type=float, default=1.0, help="target labeled: share of labeled cases corrupted")
    ap.add_argument("--noise-seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="train.max_steps of every run (default: the config's)")
    ap.add_argument("--out", required=True, help="output folder (runs, configs, logs, table, plot)")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for every run")
    ap.add_argument("--in-process", action="store_true", help="train in this process (tests) instead of a subprocess")
    ap.add_argument("--report-only", action="store_true", help="only (re)write the table and plot")
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        levels = [Level.parse(t) for t in args.levels]
        plans = plan_sweep(args.config, args.methods, levels, args.target, args.steps, out,
                           args.labeled_share, args.noise_seed, args.set)
        out.mkdir(parents=True, exist_ok=True)
        failed = []
        if not args.report_only:
            for i, plan in enumerate(plans, 1):
                if plan.reuses:
                    log(f"[{i}/{len(plans)}] {plan.name}: no pseudo-labels to corrupt, reuses {plan.reuses.name}")
                    continue
                if finished(plan):
                    log(f"[{i}/{len(plans)}] {plan.name}: finished, skipped")
                    continue
                log(f"[{i}/{len(plans)}] {plan.name}: training ({plan.level.title}, {args.target})")
                if not train_one(plan, out, args.in_process, log):
                    failed.append(plan.name)
        report(plans, out, args.target, args.labeled_share)
    except SemidiffError as exc:
        print(f"noise_sweep: error: {exc}", file=sys.stderr)
        return 2
    log(f"table: {out / 'noise_sweep.md'}; plot: {out / 'noise_sweep.png'}")
    if failed:
        log(f"failed runs (start the sweep again to retry): {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
