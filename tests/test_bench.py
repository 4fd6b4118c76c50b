"""`semidiff bench` and `semidiff report`: the grid runs, survives a kill, and its table is exactly
the per-run metrics aggregated over seeds."""

import contextlib
import csv
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from semidiff.bench.records import record_mismatch, sync_records
from semidiff.bench.runner import finished_seconds, run_bench, select_cells, time_left
from semidiff.bench.spec import Cell, cell_done, grid_cells, load_bench
from semidiff.cli import main
from semidiff.data.synthetic import make_synthetic_dataset
from semidiff.errors import ConfigError
from semidiff.methods.protodiff import ProtoDiffOptions
from semidiff.report.build import write_report
from semidiff.report.collect import (
    aggregate,
    collect,
    mean_std,
    read_logged_scalars,
    uses_unlabeled,
    variant_labels,
)
from semidiff.report.figures import (
    curve_runs,
    labels_only_row,
    noise_panels,
    per_class_metric,
)


def _train_config(root: Path, method: str) -> dict:
    return {
        "experiment": {"name": "x", "output_dir": "unused", "seed": 0},
        "data": {"reader": "synthetic", "root": str(root), "labeled": 4, "patch_size": [32, 32]},
        "model": {"net": "unet2d", "num_classes": 3, "net_options": {"features": [4, 8, 8, 16, 16]}},
        "method": {"name": method},
        "train": {"max_steps": 3, "labeled_batch": 2, "unlabeled_batch": 2, "optimizer": "adamw",
                  "lr": 1e-3, "val_every": 3, "log_every": 1, "accelerator": "cpu", "num_threads": 1},
        "eval": {"overlay_cases": 2},
    }


@pytest.fixture(scope="module")
def bench_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bench")
    root = make_synthetic_dataset(d / "data", spatial_dims=2, num_cases=8, size=(32, 32), num_classes=3,
                                  val_cases=2, seed=0)
    for m in ("supervised", "mean_teacher"):
        (d / f"{m}.yaml").write_text(yaml.safe_dump(_train_config(root, m)))
    bench = {"bench": {"name": "tiny", "output_dir": str(d / "out"),
                       "methods": [{"name": "sup", "config": "supervised.yaml"},
                                   {"name": "mt", "config": "mean_teacher.yaml"}],
                       "labeled": [2, 4], "seeds": [0, 1], "qualitative_cases": 2}}
    (d / "bench.yaml").write_text(yaml.safe_dump(bench))
    return d / "bench.yaml"


def test_bench_killed_mid_grid_finishes_without_redoing_cells_and_table_matches_runs(bench_file):
    bench_dir = bench_file.parent / "out" / "tiny"
    runs = bench_dir / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "semidiff", "bench", str(bench_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (runs.is_dir() and any(cell_done(r) for r in runs.iterdir())):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the bench and the cell it is training
    proc.wait()
    finished = {r.name: (r / "timing.json").stat().st_mtime_ns for r in runs.iterdir() if cell_done(r)}
    assert finished, "no cell finished before the deadline"

    # Finish in-process (no interpreter start-up per cell, to keep the test short).
    assert run_bench(bench_file, ["bench.isolation=in_process"], log=lambda _m: None) == 0
    cells = sorted(r.name for r in runs.iterdir())
    assert len(cells) == 8 and all(cell_done(runs / c) for c in cells)
    # Cells finished before the kill were not trained again.
    for name, mtime in finished.items():
        assert (runs / name / "timing.json").stat().st_mtime_ns == mtime

    # Every table number is the seed mean/std of the per-run summary files.
    with open(bench_dir / "table.csv") as f:
        table = list(csv.DictReader(f))
    for method in ("sup", "mt"):
        for labeled in (2, 4):
            per_run = [json.loads((runs / f"{method}_l{labeled}_s{s}" / "eval_val_last" / "summary.json").read_text())
                       for s in (0, 1)]
            want = [r["mean"]["dice"] for r in per_run]
            row = next(r for r in table if r["method"] == method and r["labeled"] == str(labeled)
                       and r["checkpoint"] == "last" and r["metric"] == "dice" and r["class"] == "mean")
            assert float(row["mean"]) == pytest.approx(np.mean(want), rel=1e-5)
            assert float(row["std"]) == pytest.approx(np.std(want, ddof=1), rel=1e-5, abs=1e-7)
            assert row["n_seeds"] == "2"
    text = (bench_dir / "table.md").read_text()
    assert "## Protocol" in text and "seeds: 0, 1" in text and "empty-mask rule" in text
    assert "(8 of 8 cells finished)" in text
    hours = sum(json.loads((runs / c / "timing.json").read_text())["wall_seconds"] for c in cells) / 3600
    assert f"training wall time: {hours:.2f} h" in text
    timing0 = json.loads((runs / cells[0] / "timing.json").read_text())
    assert (f"training precision, memory format: {timing0['precision']}, {timing0['memory_format']} (8 runs)"
            in text)
    for fig in ("dice_vs_labeled.png", "per_class.png", "curves.png", "qualitative.png"):
        assert (bench_dir / fig).stat().st_size > 5000, fig

    # `semidiff report` rebuilds the same table from disk alone.
    before = (bench_dir / "table.csv").read_text()
    (bench_dir / "table.csv").unlink()
    assert main(["report", str(bench_dir)]) == 0
    assert (bench_dir / "table.csv").read_text() == before

    # benchmarks/paired_differences.py: mt minus sup, seed by seed, from the same summary files.
    paired = _paired_script()
    rows = paired.paired_rows(paired.dice_by_cell(bench_dir, "last"), baseline="sup")
    for labeled in (2, 4):
        d = [json.loads((runs / f"{m}_l{labeled}_s{s}" / "eval_val_last" / "summary.json").read_text())["mean"]["dice"]
             for s in (0, 1) for m in ("mt", "sup")]
        diffs = np.array([d[0] - d[1], d[2] - d[3]])
        assert f"| {labeled} | clean | mt | 0,1 | {diffs.mean():+.3f} ± {diffs.std(ddof=1):.3f} | " \
               f"{int((diffs > 0).sum())}/2 |" in rows
    assert not any("| sup |" in r for r in rows)  # the baseline is not compared with itself


def _paired_script():
    spec = importlib.util.spec_from_file_location(
        "paired", Path(__file__).parents[1] / "benchmarks" / "paired_differences.py")
    paired = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paired)
    return paired


def test_paired_differences_against_clean_subtract_each_methods_own_clean_run_seed_by_seed():
    paired = _paired_script()
    dice = {("sup", 7, "clean"): {0: 0.60, 1: 0.50},
            ("mt", 7, "clean"): {0: 0.70, 1: 0.64, 2: 0.66},
            ("mt", 7, "pseudo-flip-0.3"): {0: 0.60, 1: 0.66},      # -0.10 and +0.02; seed 2 unpaired
            ("proto", 7, "clean"): {0: 0.55},
            ("proto", 7, "pseudo-flip-0.3"): {0: 0.54},
            ("proto", 7, "pseudo-erode-k4"): {1: 0.50}}             # no clean run of seed 1: no row
    rows = paired.paired_rows(dice, against="clean")
    assert "| 7 | pseudo-flip-0.3 | mt | 0,1 | -0.040 ± 0.085 | 1/2 |" in rows
    assert "| 7 | pseudo-flip-0.3 | proto | 0 | -0.010 | 0/1 |" in rows
    assert len(rows) == 4  # header, rule and those two: no clean row, no row without a pair
    # Against labels only, a pseudo-noise cell is paired with the baseline's clean run of its seed.
    rows = paired.paired_rows(dice, baseline="sup")
    assert "| 7 | pseudo-flip-0.3 | mt | 0,1 | +0.080 ± 0.113 | 1/2 |" in rows
    assert "| 7 | clean | mt | 0,1 | +0.120 ± 0.028 | 2/2 |" in rows


@pytest.mark.parametrize("isolation", ["subprocess", "in_process"])
def test_sigterm_to_the_bench_stops_the_cell_it_is_training(tmp_path, isolation):
    # `kill BENCH_PID` used to leave the cell's training running on its own: it kept a core busy,
    # and a bench started again on the same grid trained the same run folder beside it.
    root = make_synthetic_dataset(tmp_path / "data", spatial_dims=2, num_cases=6, size=(32, 32), num_classes=3,
                                  val_cases=2, seed=0)
    config = _train_config(root, "supervised")
    config["train"].update(max_steps=100000, val_every=100000)  # trains until stopped
    (tmp_path / "sup.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump({"bench": {
        "name": "long", "output_dir": str(tmp_path / "out"), "methods": [{"name": "sup", "config": "sup.yaml"}],
        "labeled": [2], "seeds": [0, 1], "isolation": isolation}}))
    trainings = tmp_path / "tmp" / "semidiff-trainings"  # where every training registers its process id
    trainings.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")}
    bench = subprocess.Popen([sys.executable, "-m", "semidiff", "bench", str(tmp_path / "bench.yaml")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (cells := [int(p.name) for p in trainings.iterdir()]):
            assert bench.poll() is None, bench.stdout.read()
            time.sleep(0.5)
        assert cells, "the cell's training never started"
        # Stop it once it trains (its CSV log exists), long before its first validation.
        run = tmp_path / "out" / "long" / "runs" / "sup_l2_s0"
        while time.time() < deadline and not list(run.glob("csv/version_*/metrics.csv")):
            assert bench.poll() is None, bench.stdout.read()
            time.sleep(0.2)
        bench.send_signal(signal.SIGTERM)
        out, _ = bench.communicate(timeout=180)
    finally:
        bench.kill()
        for pid in (int(p.name) for p in trainings.iterdir()):  # a training left behind by a failure
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with pytest.raises(ProcessLookupError):
        os.kill(cells[0], 0)  # the training stopped with its bench
    if isolation == "in_process":  # the training is the bench: SIGTERM's default action ends both
        assert bench.returncode == -signal.SIGTERM, out
        return
    assert bench.returncode == 128 + signal.SIGTERM, out
    assert "sup_l2_s0: stopped (SIGTERM)" in out
    # ... with the step it stopped at saved (no validation had written a checkpoint): nothing lost.
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] > 0
    assert not (tmp_path / "out" / "long" / "runs" / "sup_l2_s1").exists()  # and no other cell was started


def test_records_let_a_fresh_checkout_continue_the_grid_without_retraining(tmp_path):
    root = make_synthetic_dataset(tmp_path / "data", spatial_dims=2, num_cases=6, size=(32, 32), num_classes=3,
                                  val_cases=2, seed=0)
    (tmp_path / "sup.yaml").write_text(yaml.safe_dump(_train_config(root, "supervised")))
    bench = {"bench": {"name": "rec", "output_dir": str(tmp_path / "machine_a"), "records": "records",
                       "methods": [{"name": "sup", "config": "sup.yaml"}], "labeled": [2], "seeds": [0, 1],
                       "isolation": "in_process", "qualitative_cases": 1}}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(bench))
    assert run_bench(tmp_path / "bench.yaml", log=lambda _m: None) == 0
    records = tmp_path / "records"
    assert sorted(r.name for r in records.iterdir()) == ["sup_l2_s0", "sup_l2_s1"]
    for r in records.iterdir():  # the report's inputs, without the weights and the event files
        assert cell_done(r) and (r / "eval_val_last" / "overlay_slices.npz").is_file()
        assert not (r / "checkpoints").exists() and not (r / "tensorboard").exists()
        run = tmp_path / "machine_a" / "rec" / "runs" / r.name
        assert (run / "eval_val_last" / "overlays.png").is_file() and (run / "checkpoints").is_dir()
        assert not list(r.rglob("overlays.png")) and not (r / "eval_val_best" / "overlay_slices.npz").exists()
    table_a = (tmp_path / "machine_a" / "rec" / "table.csv").read_text()

    # Another machine: the same checkout (bench file, configs, records), none of the finished run
    # folders; one cell was started there and killed (a stale checkpoint of it is left).
    stale = tmp_path / "machine_b" / "rec" / "runs" / "sup_l2_s0" / "checkpoints" / "last.ckpt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"interrupted")
    logs: list[str] = []
    assert run_bench(tmp_path / "bench.yaml", ["bench.output_dir=" + str(tmp_path / "machine_b")],
                     log=logs.append) == 0
    bench_b = tmp_path / "machine_b" / "rec"
    assert not (bench_b / "logs").exists()  # no cell was trained (run_cell writes a log per cell)
    assert "2 finished cell(s) restored" in " ".join(logs)
    assert not stale.exists()  # the interrupted attempt gave way to the finished record
    assert (bench_b / "table.csv").read_text() == table_a
    assert main(["report", str(bench_b)]) == 0 and (bench_b / "table.csv").read_text() == table_a

    # `semidiff report CONFIG` rebuilds the same table from the records alone, training nothing.
    assert main(["report", str(tmp_path / "bench.yaml"), "bench.output_dir=" + str(tmp_path / "machine_d")]) == 0
    assert (tmp_path / "machine_d" / "rec" / "table.csv").read_text() == table_a
    assert not (tmp_path / "machine_d" / "rec" / "logs").exists()

    # A record made with other settings is not taken for the cell: that cell trains again.
    logs.clear()
    assert run_bench(tmp_path / "bench.yaml", ["bench.output_dir=" + str(tmp_path / "machine_c"),
                                               "bench.overrides=[train.lr=0.002]"], log=logs.append) == 0
    assert "train.lr" in " ".join(logs)
    assert sorted(f.name for f in (tmp_path / "machine_c" / "rec" / "logs").iterdir()) == [
        "sup_l2_s0.log", "sup_l2_s1.log"]
    assert yaml.safe_load((records / "sup_l2_s0" / "config.yaml").read_text())["train"]["lr"] == 0.002


def test_records_restored_by_two_bench_processes_at_once_do_not_collide(tmp_path, monkeypatch):
    # Two `semidiff bench --cells ...` started together on a fresh checkout both restore every
    # record; the second to finish its copy must keep the first one's run folder, not fail on it.
    from semidiff.config import load_config

    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"data": {"reader": "synthetic", "root": "here"},
                                                     "method": {"name": "mean_teacher"}}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"bench": {"name": "x", "labeled": [3],
                                                               "methods": [{"name": "mt", "config": "t.yaml"}]}}))
    spec, base = load_bench(tmp_path / "b.yaml")
    runs = tmp_path / "out" / "runs"
    cell = grid_cells(spec, base, runs)[0]
    record = tmp_path / "records" / cell.name
    (record / "eval_val_last").mkdir(parents=True)
    (record / "config.yaml").write_text(load_config(cell.config, cell.train_overrides).to_yaml())
    (record / "timing.json").write_text("{}")
    (record / "eval_val_last" / "summary.json").write_text("{}")

    real_rmtree = shutil.rmtree

    def other_process_restores_meanwhile(path, *args, **kwargs):
        real_rmtree(path, *args, **kwargs)
        if Path(path) == runs / cell.name:  # this process cleared the way; the other one's copy lands
            shutil.copytree(record, path)

    monkeypatch.setattr(shutil, "rmtree", other_process_restores_meanwhile)
    assert sync_records([cell], runs, tmp_path / "records", log=lambda _m: None) == 1
    assert cell_done(runs / cell.name)
    assert [p.name for p in runs.iterdir()] == [cell.name]  # no half copy left beside it


def test_record_mismatch_ignores_machine_paths_and_keys_added_at_their_default(tmp_path):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"data": {"reader": "synthetic", "root": "here"},
                                                     "method": {"name": "mean_teacher"}}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"bench": {"name": "x", "labeled": [3],
                                                               "methods": [{"name": "mt", "config": "t.yaml"}]}}))
    spec, base = load_bench(tmp_path / "b.yaml")
    cell = grid_cells(spec, base, tmp_path / "out")[0]
    from semidiff.config import load_config
    recorded = yaml.safe_load(load_config(cell.config, cell.train_overrides).to_yaml())
    recorded["experiment"]["output_dir"] = "/elsewhere/runs"
    recorded["data"]["root"] = "/elsewhere/data"
    del recorded["train"]["max_skips"]  # a key the schema gained later, at its default here
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "config.yaml").write_text(yaml.safe_dump(recorded))
    assert record_mismatch(cell, tmp_path / "rec") == []
    recorded["train"]["max_steps"] = 7
    recorded["method"]["options"] = {"ema_decay": 0.9}
    (tmp_path / "rec" / "config.yaml").write_text(yaml.safe_dump(recorded))
    assert record_mismatch(cell, tmp_path / "rec") == ["method.options.ema_decay", "train.max_steps"]
    cell_with_override = grid_cells(load_bench(tmp_path / "b.yaml", ["bench.overrides=[train.max_skips=3]"])[0],
                                    base, tmp_path / "out")[0]
    assert "train.max_skips" in record_mismatch(cell_with_override, tmp_path / "rec")


def test_record_mismatch_counts_a_method_option_left_out_as_its_default(tmp_path):
    # A record made before an option existed (or whose config left it out) matches a cell that sets
    # that option to its default, and differs from one that sets another value.
    from semidiff.config import load_config
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"data": {"reader": "synthetic"},
                                                     "method": {"name": "protodiff"}}))

    def cell(overrides: list[str]):
        (tmp_path / "b.yaml").write_text(yaml.safe_dump({"bench": {"name": "x", "labeled": [3], "methods": [
            {"name": "p", "config": "t.yaml", "overrides": overrides}]}}))
        spec, base = load_bench(tmp_path / "b.yaml")
        return grid_cells(spec, base, tmp_path / "out")[0]

    plain = cell([])
    recorded = yaml.safe_load(load_config(plain.config, plain.train_overrides).to_yaml())
    assert "student_forward" not in recorded["method"]["options"]
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "config.yaml").write_text(yaml.safe_dump(recorded))
    assert record_mismatch(cell(["method.options.student_forward=joint"]), tmp_path / "rec") == []
    assert record_mismatch(cell(["method.options.student_forward=separate"]), tmp_path / "rec") == [
        "method.options.student_forward"]


def _fake_run(run: Path, method: str, labeled: int, seed: int, dice: float, hd95: float,
              options: dict | None = None, folder: str = "eval_val_last") -> None:
    """A finished run folder with known metrics (what training and evaluation would have written)."""
    (run / folder).mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "experiment": {"seed": seed}, "data": {"labeled": labeled},
        "method": {"name": method, "options": options or {}}}))
    (run / "timing.json").write_text(json.dumps({"wall_seconds": 10.0 * (seed + 1), "steps": 10}))
    proto = {"dataset": "d", "split": "val", "cases": 2, "labeled": f"{labeled} cases (first)", "budget": "b",
             "units": "voxels", "empty_rule": "strict", "machine": "m", "semidiff": "0", "date": "now",
             "inference_seconds_per_case": 0.5}
    metric = {"dice": dice, "jaccard": dice / 2, "hd95": hd95, "asd": 1.0}
    per_class = {"fg": {k: {"mean": v} for k, v in metric.items()}}
    (run / folder / "summary.json").write_text(
        json.dumps({"protocol": proto, "mean": metric, "per_class": per_class}))


def test_report_mean_and_std_over_seeds_from_known_values(tmp_path):
    dices, hds = [0.5, 0.7, 0.9], [4.0, 2.0, 3.0]
    for s, (d, h) in enumerate(zip(dices, hds)):
        _fake_run(tmp_path / f"r{s}", "mt", 3, s, d, h)
    _fake_run(tmp_path / "other", "sup", 3, 0, 0.1, 9.0)
    write_report(tmp_path, log=lambda _m: None)
    rows = list(csv.DictReader((tmp_path / "table.csv").read_text().splitlines()))
    mt = {(r["metric"], r["class"]): (float(r["mean"]), float(r["std"])) for r in rows if r["method"] == "mt"}
    assert mt[("dice", "mean")] == pytest.approx((0.7, 0.2))  # sample std of 0.5, 0.7, 0.9
    assert mt[("hd95", "fg")] == pytest.approx((3.0, 1.0))
    sup = {(r["metric"], r["class"]): float(r["std"]) for r in rows if r["method"] == "sup"}
    assert sup[("dice", "mean")] == 0.0  # one seed: no spread
    text = (tmp_path / "table.md").read_text()
    assert "| mt | 3 | last | 3 | 0.7000 ± 0.2000 |" in text
    assert "| sup | 3 | last | 1 | 0.1000 |" in text  # one seed: no ± claimed
    assert len(collect(tmp_path)) == 4


def test_the_pooled_columns_appear_once_a_run_has_them_and_runs_without_show_na(tmp_path):
    _fake_run(tmp_path / "a", "sup", 3, 0, 0.5, 4.0)
    write_report(tmp_path, log=lambda _m: None)
    assert "pooled Dice" not in (tmp_path / "table.md").read_text()
    for seed, pooled in ((1, 0.2), (2, 0.4)):
        _fake_run(tmp_path / f"p{seed}", "mt", 3, seed, 0.6, 4.0)
        summary = tmp_path / f"p{seed}" / "eval_val_last" / "summary.json"
        s = json.loads(summary.read_text())
        s["pooled"] = {"dice": pooled, "jaccard": pooled / 2}
        s["per_class"]["fg"]["pooled"] = {"dice": pooled, "jaccard": pooled / 2}
        summary.write_text(json.dumps(s))
    write_report(tmp_path, log=lambda _m: None)
    text = (tmp_path / "table.md").read_text()
    assert "| pooled Dice | pooled per-class Dice | pooled IoU |" in text
    assert "| 0.3000 ± 0.1414 | fg 0.300 ± 0.141 | 0.1500 ± 0.0707 |" in text  # mt: seeds 1 and 2
    assert "| sup | 3 | last | 1 | 0.5000 |" in text and "| n/a | fg n/a | n/a |" in text
    rows = list(csv.DictReader((tmp_path / "table.csv").read_text().splitlines()))
    assert {(r["method"], r["class"]) for r in rows if r["metric"] == "pooled_dice"} == {("mt", "mean"), ("mt", "fg")}
    table_rows = aggregate(collect(tmp_path))
    assert per_class_metric(table_rows) == "dice"  # sup has no counts: the bars stay per-case means
    assert per_class_metric([r for r in table_rows if r["method"] == "mt"]) == "pooled_dice"


def test_a_fraction_of_the_labels_is_written_as_a_share_not_as_a_count(tmp_path):
    _fake_run(tmp_path / "few", "supervised", 3, 0, 0.5, 4.0)
    _fake_run(tmp_path / "all", "supervised", 1, 0, 0.8, 2.0)  # all labels: data.labeled=1.0
    summary = tmp_path / "all" / "eval_val_last" / "summary.json"
    s = json.loads(summary.read_text())
    s["protocol"]["labeled"] = "100% of the training cases (first)"
    summary.write_text(json.dumps(s))
    write_report(tmp_path, log=lambda _m: None)
    text = (tmp_path / "table.md").read_text()
    assert "| supervised | 100% | last | 1 | 0.8000 |" in text  # not "| 1 |": one case
    assert "| supervised | 3 | last | 1 | 0.5000 |" in text


def test_the_default_row_is_one_runs_setting_even_when_most_runs_switch_the_same_option_off():
    # An ablation ladder: the default twice (3 and 7 labeled), then five rungs, four of which
    # turn use_hfm off. A per-option majority would call use_hfm=false the default and name the
    # real default "(use_hfm=True)"; the reference must be the setting most runs share as a whole.
    def cfg(**opts):
        base = {"peer": "ds", "use_hfm": True, "use_contrast": True}
        return {"method": {"name": "diffcl", "options": {**base, **opts}}, "train": {"max_steps": 1000}}
    configs = [cfg(), cfg(), cfg(peer="cs", use_hfm=False, use_contrast=False),
               cfg(use_hfm=False, use_contrast=False), cfg(use_hfm=False), cfg(use_contrast=False),
               cfg(peer="none", use_hfm=False)]
    assert variant_labels(configs) == [
        "diffcl", "diffcl",
        "diffcl (peer=cs, use_contrast=False, use_hfm=False)",
        "diffcl (use_contrast=False, use_hfm=False)",
        "diffcl (use_hfm=False)",
        "diffcl (use_contrast=False)",
        "diffcl (peer=none, use_hfm=False)"]


def test_runs_that_differ_in_options_are_rows_not_seeds_and_extra_evaluations_are_rows(tmp_path):
    # Two seeds of bcp with the usual options, one bcp run with a longer pre-training: not a third seed.
    _fake_run(tmp_path / "a", "bcp", 7, 0, 0.5, 3.0, {"pretrain_steps": 0.2})
    _fake_run(tmp_path / "b", "bcp", 7, 1, 0.7, 3.0, {"pretrain_steps": 0.2})
    _fake_run(tmp_path / "c", "bcp", 7, 0, 0.9, 3.0, {"pretrain_steps": 0.5})
    # A second evaluation of run a with another output (`semidiff eval --output ds`).
    _fake_run(tmp_path / "a", "bcp", 7, 0, 0.3, 3.0, {"pretrain_steps": 0.2}, folder="eval_val_last_ds")
    write_report(tmp_path, log=lambda _m: None)
    rows = [r for r in csv.DictReader((tmp_path / "table.csv").read_text().splitlines()) if r["metric"] == "dice" and r["class"] == "mean"]
    dice = {r["method"]: (float(r["mean"]), r["n_seeds"]) for r in rows}
    assert dice["bcp"] == (pytest.approx(0.6), "2")
    assert dice["bcp (pretrain_steps=0.5)"] == (pytest.approx(0.9), "1")
    assert dice["bcp [ds]"] == (pytest.approx(0.3), "1")
    assert {r.method for r in collect(tmp_path)} == {"bcp", "bcp (pretrain_steps=0.5)", "bcp [ds]"}
    # The header counts runs, not rows: the second evaluation of run a is not a fourth run.
    assert "(3 finished runs, 1 extra evaluation of their last checkpoints)" in (tmp_path / "table.md").read_text()


def test_time_left_counts_each_method_at_its_own_mean_and_untimed_methods_apart(tmp_path):
    cells = [Cell(m, tmp_path, 3, 0, "clean") for m in ("sup", "sup", "diffcl", "mt")]
    assert time_left(cells, {"sup": [600.0, 1200.0], "diffcl": [3600.0]}) == (
        "4 cell(s) left, about 1.5 h for 3 of them (1 of methods not timed yet: mt)")
    assert time_left(cells[:2], {"sup": [1800.0]}) == "2 cell(s) left, about 1.0 h for 2 of them"
    assert time_left([], {}) == "0 cell(s) left"


def test_the_estimate_starts_from_the_finished_cells_and_their_records(tmp_path):
    cells = [Cell(m, tmp_path, 3, s, "clean") for m, s in (("sup", 0), ("sup", 1), ("mt", 0), ("mt", 1))]
    for cell, wall in zip(cells[:3], (600.0, 1200.0, 300.0)):
        run = tmp_path / cell.name
        (run / "eval_val_last").mkdir(parents=True)
        (run / "timing.json").write_text(json.dumps({"wall_seconds": wall, "steps": 1000}))
        if cell.method == "sup":  # mt seed 0 trained but was never evaluated: not finished, not counted
            (run / "eval_val_last" / "summary.json").write_text("{}")
    assert finished_seconds(cells, tmp_path) == {"sup": [600.0, 1200.0]}
    assert time_left(cells[2:], finished_seconds(cells, tmp_path)) == (
        "2 cell(s) left (2 of methods not timed yet: mt)")


def test_mean_std_ignores_missing_values():
    assert mean_std([1.0, None, 3.0, float("nan")]) == pytest.approx((2.0, np.sqrt(2.0)))
    m, s = mean_std([])
    assert np.isnan(m) and np.isnan(s)


def test_bad_bench_configs_name_the_problem(tmp_path):
    f = tmp_path / "b.yaml"
    f.write_text(yaml.safe_dump({"bench": {"name": "x", "methods": [{"name": "a", "config": "missing.yaml"}],
                                           "labeled": [3]}}))
    with pytest.raises(ConfigError, match="missing.yaml.*not found"):
        load_bench(f)
    f.write_text(yaml.safe_dump({"bench": {"name": "x", "methods": [], "labeled": [3], "sedes": [1]}}))
    with pytest.raises(ConfigError, match="bench.sedes: unknown key"):
        load_bench(f)
    with pytest.raises(ConfigError, match="not a bench folder|neither"):
        write_report(tmp_path / "nothing_here")


def test_noise_axis_skips_supervised_pseudo_cells_and_plots_one_panel_per_kind(tmp_path):
    base = {"experiment": {"name": "x"}, "data": {"reader": "synthetic", "root": "r"},
            "model": {"net": "unet2d", "num_classes": 2}}
    (tmp_path / "sup.yaml").write_text(yaml.safe_dump({**base, "method": {"name": "supervised"}}))
    (tmp_path / "mt.yaml").write_text(yaml.safe_dump({**base, "method": {"name": "mean_teacher"}}))
    levels = [{}, {"target": "pseudo", "kind": "flip", "rate": 0.2}, {"target": "pseudo", "kind": "erode", "k": 2},
              {"target": "labeled", "kind": "flip", "rate": 0.2}]
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"bench": {
        "name": "n", "labeled": [3], "noise": levels,
        "methods": [{"name": "sup", "config": "sup.yaml"}, {"name": "mt", "config": "mt.yaml"}]}}))
    spec, base_dir = load_bench(tmp_path / "b.yaml")
    names = [c.name for c in grid_cells(spec, base_dir, tmp_path)]
    # Supervised makes no pseudo-labels: only its clean and labeled-noise cells exist.
    assert names == ["sup_l3_s0", "mt_l3_s0", "mt_l3_s0_pseudo-flip-0.2", "mt_l3_s0_pseudo-erode-k2",
                     "sup_l3_s0_labeled-flip-0.2", "mt_l3_s0_labeled-flip-0.2"]
    mt_cell = next(c for c in grid_cells(spec, base_dir, tmp_path) if c.name == "mt_l3_s0_pseudo-erode-k2")
    assert "noise.kind=erode" in mt_cell.overrides and "noise.k=2" in mt_cell.overrides

    runs = tmp_path / "runs"
    for i, (method, noise, dice) in enumerate([("supervised", {}, 0.5), ("mean_teacher", {}, 0.6),
                                               ("mean_teacher", levels[1], 0.55),
                                               ("mean_teacher", levels[2], 0.52)]):
        _fake_run(runs / f"r{i}", method, 3, 0, dice, 1.0)
        cfg = yaml.safe_load((runs / f"r{i}" / "config.yaml").read_text())
        (runs / f"r{i}" / "config.yaml").write_text(yaml.safe_dump({**cfg, "noise": noise}))
    write_report(runs, log=lambda _m: None)
    assert (runs / "dice_vs_noise.png").stat().st_size > 5000
    rows = list(csv.DictReader((runs / "table.csv").read_text().splitlines()))
    got = {(r["method"], r["noise"]): float(r["mean"]) for r in rows
           if r["metric"] == "dice" and r["class"] == "mean" and r["checkpoint"] == "last"}
    assert got == {("supervised", "clean"): 0.5, ("mean_teacher", "clean"): 0.6,
                   ("mean_teacher", "pseudo-flip-0.2"): 0.55, ("mean_teacher", "pseudo-erode-k2"): 0.52}


def test_noise_panels_use_the_clean_run_of_the_same_labeled_count_only(tmp_path):
    # A folder of runs (not a bench) holds clean runs at 3 and 7 patients and noisy runs at 7 only.
    runs = tmp_path / "runs"
    flip = {"target": "pseudo", "kind": "flip", "rate": 0.3}
    for i, (method, labeled, noise, dice) in enumerate([
            ("supervised", 3, {}, 0.40), ("supervised", 7, {}, 0.60), ("mean_teacher", 3, {}, 0.45),
            ("mean_teacher", 7, {}, 0.65), ("mean_teacher", 7, flip, 0.50), ("cps", 7, {}, 0.66)]):
        _fake_run(runs / f"r{i}", method, labeled, 0, dice, 1.0)
        cfg = yaml.safe_load((runs / f"r{i}" / "config.yaml").read_text())
        (runs / f"r{i}" / "config.yaml").write_text(yaml.safe_dump({**cfg, "noise": noise}))
    rows = aggregate(collect(runs))
    panels = noise_panels(rows, uses_unlabeled(collect(runs)))
    assert list(panels) == [(7.0, "pseudo", "flip")]
    points = {m: [(x, d[0], n) for x, d, n in pts] for m, pts in panels[(7.0, "pseudo", "flip")].items()}
    assert points["mean_teacher"] == [(0.0, pytest.approx(0.65), 1), (0.3, pytest.approx(0.50), 1)]
    assert points["supervised"] == [(0.0, pytest.approx(0.60), 1)]  # no pseudo-labels: a reference line
    assert "cps" not in points  # makes pseudo-labels but has no noisy run: nothing to compare
    # The training curves draw the clean runs only: their key has no place for the noise level.
    assert sorted(r.run_dir.name for r in curve_runs(collect(runs))) == ["r0", "r1", "r2", "r3", "r5"]
    write_report(runs, log=lambda _m: None)
    assert (runs / "dice_vs_noise.png").stat().st_size > 5000


def test_logged_scalars_follow_the_resume_order_of_the_csv_versions(tmp_path):
    # A run started once and resumed ten times: version_10 is the last start although it sorts
    # before version_2 as text; a step logged by two starts keeps the later start's value.
    for version, rows in {2: [(9, "0.5", ""), (19, "0.4", "0.30")], 10: [(19, "0.2", ""), (29, "0.1", "0.45")]}.items():
        d = tmp_path / "csv" / f"version_{version}"
        d.mkdir(parents=True)
        with open(d / "metrics.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["epoch", "step", "train/loss", "val/dice_mean"])
            w.writerows([0, step, loss, dice] for step, loss, dice in rows)
    assert read_logged_scalars(tmp_path) == {"train/loss": [(9, 0.5), (19, 0.2), (29, 0.1)],
                                             "val/dice_mean": [(19, 0.30), (29, 0.45)]}
    # Asked-for keys are present even when never logged.
    assert read_logged_scalars(tmp_path, ["train/loss_sup"]) == {"train/loss_sup": []}


def test_protocol_dates_are_a_range_when_many():
    from semidiff.report.tables import _date_range

    protos = [{"date": f"2026-11-22 0{h}:00"} for h in (5, 3, 9, 3, 7)]
    assert _date_range(protos) == "2026-11-22 03:00 to 2026-11-22 09:00 (4 evaluations)"
    assert _date_range(protos[:2]) == "2026-11-22 03:00 / 2026-11-22 05:00"


def test_report_colours_are_distinct_and_variants_share_their_methods_hue():
    from semidiff.report.figures import row_colours

    names = ["supervised", "mean_teacher", "ua_mt", "cps", "bcp", "diffcl", "protodiff",
             "bcp (u_weight=0)", "bcp (pretrain_steps=0.5)", "diffcl (peer=none)", "protodiff (lambda_u=0)"]
    colours = row_colours(names)
    assert len(set(colours.values())) == len(names)
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    tab20 = [to_hex(c) for c in colormaps["tab20"].colors]
    # bcp is tab20's dark shade 4 (index 8); its first variant the light shade of the same hue.
    assert colours["bcp"] == tab20[8] and colours["bcp (u_weight=0)"] == tab20[9]
    assert row_colours(names[:3]) == {"supervised": "C0", "mean_teacher": "C1", "ua_mt": "C2"}


def test_rows_past_twenty_share_colours_but_never_colour_and_marker_or_hatch():
    from semidiff.report.figures import row_colours, row_hatches, row_markers

    names = ["supervised", "mean_teacher", "protodiff"] + [f"protodiff (option={i})" for i in range(20)]
    colours = row_colours(names)
    assert len(set(colours.values())) == 20  # tab20 is exhausted: colours repeat
    markers = row_markers(colours)
    looks = {(colours[n], markers[n]) for n in names}
    assert len(looks) == len(names)
    assert markers["supervised"] == "o"  # the first row in a colour keeps the plain dot
    hatches = row_hatches(colours)
    assert len({(colours[n], hatches[n]) for n in names}) == len(names)
    assert hatches["supervised"] == ""  # and the plain bar


def test_variant_rows_get_their_own_figure_beside_their_methods_default(tmp_path):
    from semidiff.report.collect import is_variant, variant_groups

    runs = tmp_path / "runs"
    specs = [("supervised", 3, 0, {}, 0.40), ("supervised", 7, 0, {}, 0.60),
             ("bcp", 3, 0, {"u_weight": 1.0}, 0.45), ("bcp", 7, 0, {"u_weight": 1.0}, 0.62),
             ("bcp", 7, 1, {"u_weight": 1.0}, 0.66), ("bcp", 7, 0, {"u_weight": 0.0}, 0.58),
             ("supervised", 7, 1, {}, 0.61), ("bcp", 3, 1, {"u_weight": 1.0}, 0.47)]
    for i, (method, labeled, seed, options, dice) in enumerate(specs):
        _fake_run(runs / f"r{i}", method, labeled, seed, dice, 1.0, options=options)
    rows = aggregate(collect(runs))
    assert [r["method"] for r in rows if is_variant(r["method"])] == ["bcp (u_weight=0.0)"]
    groups = variant_groups(rows)
    # One cell has a variant (7 labeled, clean); there BCP's default comes first, then its variant;
    # supervised has no variant, so it is not in the figure.
    assert list(groups) == [(7.0, "clean")]
    got = [(r["method"], r["seeds"], round(r["dice"][0], 4)) for r in groups[(7.0, "clean")]]
    assert got == [("bcp", [0, 1], 0.64), ("bcp (u_weight=0.0)", [0], 0.58)]
    # The reference line is the labels-only row of the same cell, found by what the method learns
    # from, not by its name (a bench names its rows, e.g. "sup").
    ref = labels_only_row(rows, 7.0, "clean", uses_unlabeled(collect(runs)))
    assert (ref["method"], ref["seeds"]) == ("supervised", [0, 1])
    assert labels_only_row(rows, 7.0, "clean", {"sup": False, "bcp": True}) is None  # no such row here
    assert labels_only_row(rows, 7.0, "clean", uses_unlabeled(collect(runs)), {"supervised"}) is None

    write_report(runs, log=lambda _m: None)
    assert (runs / "variants.png").stat().st_size > 5000
    assert "`variants.png`" in (runs / "table.md").read_text()
    assert "| bcp (u_weight=0.0) | 7 |" in (runs / "table.md").read_text()  # still a table row
    # Without variants the figure is not drawn, and a stale one from an earlier report is removed.
    import shutil

    shutil.rmtree(runs / "r5")
    write_report(runs, log=lambda _m: None)
    assert not (runs / "variants.png").exists()
    assert "variants.png" not in (runs / "table.md").read_text()


def test_a_row_can_run_its_own_seeds(tmp_path):
    base = {"experiment": {"name": "x"}, "data": {"reader": "synthetic", "root": "r"},
            "model": {"net": "unet2d", "num_classes": 2}, "method": {"name": "supervised"}}
    (tmp_path / "sup.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"bench": {
        "name": "n", "labeled": [3], "seeds": [0],
        "methods": [{"name": "a", "config": "sup.yaml", "seeds": [0, 1, 2]}, {"name": "b", "config": "sup.yaml"},
                    {"name": "c", "config": "sup.yaml", "seeds": [1]}]}}))
    spec, base_dir = load_bench(tmp_path / "b.yaml")
    cells = grid_cells(spec, base_dir, tmp_path)
    assert [c.name for c in cells] == ["a_l3_s0", "b_l3_s0", "a_l3_s1", "c_l3_s1", "a_l3_s2"]
    assert "experiment.seed=2" in cells[-1].overrides
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"bench": {
        "name": "n", "labeled": [3], "methods": [{"name": "a", "config": "sup.yaml", "seeds": []}]}}))
    with pytest.raises(ConfigError, match="seeds"):
        load_bench(tmp_path / "b.yaml")


def test_cells_are_picked_by_name_in_the_order_asked_and_a_typo_is_an_error(tmp_path):
    """`semidiff bench CONFIG --cells 'b_*' a_l3_s1 --list`: the grid in pieces, longest cells first."""
    base = {"experiment": {"name": "x"}, "data": {"reader": "synthetic", "root": "r"},
            "model": {"net": "unet2d", "num_classes": 2}, "method": {"name": "supervised"}}
    (tmp_path / "sup.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"bench": {
        "name": "n", "output_dir": str(tmp_path / "out"), "labeled": [3], "seeds": [0, 1],
        "methods": [{"name": "a", "config": "sup.yaml"}, {"name": "b", "config": "sup.yaml"}]}}))
    spec, base_dir = load_bench(tmp_path / "b.yaml")
    cells = grid_cells(spec, base_dir, tmp_path)
    assert [c.name for c in select_cells(cells, None)] == ["a_l3_s0", "b_l3_s0", "a_l3_s1", "b_l3_s1"]
    # in the patterns' order, each cell once
    assert [c.name for c in select_cells(cells, ["b_*", "a_l3_s1", "b_l3_s0"])] == ["b_l3_s0", "b_l3_s1", "a_l3_s1"]
    with pytest.raises(ConfigError, match="'c_\\*' matches no cell.*a_l3_s0"):
        select_cells(cells, ["a_l3_s0", "c_*"])
    # --list trains nothing and says which selected cells are finished
    finished = tmp_path / "out" / "n" / "runs" / "b_l3_s1"
    (finished / "eval_val_last").mkdir(parents=True)
    (finished / "eval_val_last" / "summary.json").write_text("{}")
    (finished / "timing.json").write_text(json.dumps({"wall_seconds": 7200.0}))
    lines: list[str] = []
    assert run_bench(tmp_path / "b.yaml", log=lines.append, cells_wanted=["b_*"], list_only=True) == 0
    assert lines[-3:] == ["b_l3_s0: to run", "b_l3_s1: finished",
                          "2 cell(s) selected of 4; 1 cell(s) left, about 2.0 h for 1 of them"]
    assert sorted(p.name for p in (tmp_path / "out" / "n" / "runs").iterdir()) == ["b_l3_s1"]
    # A run of a selection counts the finished cells of the grid, not the cells left out of it.
    lines.clear()
    _fake_run(tmp_path / "made", "supervised", 3, 1, 0.5, 4.0)  # what the report reads of a finished run
    for f in ("config.yaml", "eval_val_last/summary.json"):
        (finished / f).write_text((tmp_path / "made" / f).read_text())
    run_bench(tmp_path / "b.yaml", log=lines.append, cells_wanted=["b_l3_s1"])
    assert any(line.startswith("bench n: 4 cells (1 selected), 1 already finished, 0 to run") for line in lines)


def test_the_committed_records_are_what_their_cells_would_train_now():
    # A change to a training config or a bench's overrides would make the bench train those cells
    # again (hours of CPU), so it must be a decision: move the records aside with it.
    repo = Path(__file__).resolve().parents[1]
    checked = 0
    for f in sorted((repo / "configs" / "bench").glob("*.yaml")):
        spec, base = load_bench(f)
        if not spec.records:
            continue
        for cell in grid_cells(spec, base, Path("/nonexistent")):
            if cell_done(record := base / spec.records / cell.name):
                assert record_mismatch(cell, record) == [], f"{f.name}: {record}"
                checked += 1
    assert checked > 0, "no committed records found under the bench configs' records folders"


def test_a_folder_of_runs_is_ordered_by_the_methods_table_rank(tmp_path):
    """Rows follow each registered method's table_rank (labels-only reference first, the papers'
    methods after the baselines); a newly registered method without one comes after them all."""
    from semidiff.methods import METHODS, Method, register_method

    class Newcomer(Method):
        pass

    register_method("newcomer")(Newcomer)
    try:
        for i, name in enumerate(["newcomer", "protodiff", "diffcl", "bcp", "supervised", "mean_teacher"]):
            _fake_run(tmp_path / f"r{i}", name, 3, 0, 0.5, 4.0)
        assert [r.method for r in collect(tmp_path)] == [
            "supervised", "mean_teacher", "bcp", "diffcl", "protodiff", "newcomer"]
    finally:
        METHODS.unregister("newcomer")


def test_empty_frames_separates_the_frames_without_the_class_from_those_with_it(tmp_path):
    """benchmarks/empty_frames.py: a network that never predicts a class absent from 3 of 4 frames
    scores 0.75 on it under the strict rule, and 0 on the one frame that has it."""
    spec = importlib.util.spec_from_file_location(
        "empty_frames", Path(__file__).parents[1] / "benchmarks" / "empty_frames.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    per_case = tmp_path / "per_case.csv"
    rows = [("f0", "artery", 1.0, 1, 1), ("f1", "artery", 1.0, 1, 1), ("f2", "artery", 1.0, 1, 1),
            ("f3", "artery", 0.0, 1, 0),
            ("f0", "tool", 0.5, 0, 0), ("f1", "tool", 0.7, 0, 0), ("f2", "tool", 0.0, 1, 0), ("f3", "tool", 0.0, 0, 1)]
    with open(per_case, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "class_name", "dice", "pred_empty", "ref_empty"])
        w.writerows(rows)
    lines, strict, present = module.summary(module.class_rows(per_case))
    assert lines[0] == ("artery", 4, 4, 3, 0.75, 0.0)
    assert lines[1][:4] == ("tool", 4, 1, 1) and lines[1][4] == pytest.approx(0.3) and lines[1][5] == pytest.approx(0.4)
    assert strict == pytest.approx(0.525) and present == pytest.approx(0.2)


def test_pseudo_label_quality_separates_taught_from_left_out_errors():
    """benchmarks/pseudo_label_quality.py: on a 1x4x4 map with one foreground square, a confident
    wrong pixel counts as taught, an unconfident wrong pixel as left out, and the edge band is the
    pixels with another class within the radius."""
    spec = importlib.util.spec_from_file_location(
        "pseudo_label_quality", Path(__file__).parents[1] / "benchmarks" / "pseudo_label_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    truth = torch.zeros(1, 4, 4, dtype=torch.long)
    truth[0, :2, :2] = 1  # class 1 in the top-left 2x2 block
    pred = truth.clone()
    pred[0, 3, 3] = 1  # wrong and confident (far from the edge)
    pred[0, 1, 1] = 0  # wrong and unconfident (inside the block, at its edge)
    conf = torch.full((1, 4, 4), 0.99)
    conf[0, 1, 1] = 0.6
    conf[0, 0, 0] = 0.7  # right but unconfident
    probs = torch.zeros(1, 2, 4, 4)
    probs.scatter_(1, pred[:, None], conf[:, None])
    probs.scatter_(1, 1 - pred[:, None], 1 - conf[:, None])
    q = module.quality(probs, truth, threshold=0.95, num_classes=2)
    assert q["dice"] == pytest.approx(2 * 3 / (4 + 4))  # 3 overlap, 4 predicted, 4 true
    assert q["confident_share"] == pytest.approx(14 / 16)
    assert q["confident_accuracy"] == pytest.approx(13 / 14) and q["other_accuracy"] == pytest.approx(0.5)
    assert q["wrong_share"] == pytest.approx(2 / 16) and q["wrong_confident_share"] == pytest.approx(0.5)
    assert q["foreground_covered"] == pytest.approx(2 / 4)
    edge = module.near_edge(truth, radius=1)
    assert edge[0].tolist() == [[False, True, True, False], [True, True, True, False],
                                [True, True, True, False], [False, False, False, False]]
    assert q["left_out_near_edge"] == pytest.approx(1.0)  # both left-out pixels are within 2 of the edge


def test_pseudo_label_quality_samples_with_the_asked_ddim_steps():
    """benchmarks/pseudo_label_quality.py --steps: ProtoDiff's teacher samples with the steps asked for,
    and with the run's pseudo_label_steps (else sampling_steps) when none is asked."""
    spec = importlib.util.spec_from_file_location(
        "pseudo_label_quality", Path(__file__).parents[1] / "benchmarks" / "pseudo_label_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    used = []

    class Teacher:
        options = ProtoDiffOptions(pseudo_label_steps=None, sampling_steps=3)
        teacher = None

        def sample(self, net, x, steps, generator):
            used.append(steps)
            return torch.softmax(torch.zeros(len(x), 2, *x.shape[2:]), dim=1), None

    x = torch.zeros(5, 1, 4, 4)
    assert module.pseudo_probs(Teacher(), "protodiff", x, batch=2, steps=1).shape == (5, 2, 4, 4)
    assert used == [1, 1, 1]
    used.clear()
    module.pseudo_probs(Teacher(), "protodiff", x, batch=8)
    assert used == [3]
    Teacher.options = ProtoDiffOptions(pseudo_label_steps=2, sampling_steps=3)
    used.clear()
    module.pseudo_probs(Teacher(), "protodiff", x, batch=8)
    assert used == [2]


def test_gap_closed_shares_the_baselines_gap_to_all_labels_per_group_and_seed():
    spec = importlib.util.spec_from_file_location("gap", Path(__file__).parents[1] / "benchmarks" / "gap_closed.py")
    gap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gap)

    def cells(ed: float, es: float) -> dict[str, float]:
        return {"p1_frame01/RV": ed, "p1_frame01/LV": ed, "p1_frame02/RV": es, "p1_frame02/LV": es}

    dice = {("all", 1.0, 0): cells(0.90, 0.80), ("sup", 7, 0): cells(0.80, 0.60), ("m", 7, 0): cells(0.85, 0.70),
            ("all", 1.0, 1): cells(0.90, 0.80), ("sup", 7, 1): cells(0.70, 0.60), ("m", 7, 1): cells(0.70, 0.80),
            ("m", 7, 2): cells(0.99, 0.99)}  # seed 2: no baseline and no ceiling, so no row
    rows = gap.gap_rows(dice, "m", baseline="sup", ceiling="all", groups=[("ED", "frame01"), ("ES", "frame02$|frame02/")])
    # seed 0: all 0.85 / 0.70 / 0.775 -> gap +15.0, gained +7.5, 50%; ED gap 10, gained 5; ES gap 20, gained 10
    assert "| 7 | all | 0 | 0.850 | 0.700 | 0.775 | +15.0 | +7.5 | 50% |" in rows
    assert "| 7 | ED | 0 | 0.900 | 0.800 | 0.850 | +10.0 | +5.0 | 50% |" in rows
    # seed 1: ED gains nothing of a 20-point gap, ES closes all of its 20
    assert "| 7 | ED | 1 | 0.900 | 0.700 | 0.700 | +20.0 | +0.0 | 0% |" in rows
    assert "| 7 | ES | 1 | 0.800 | 0.600 | 0.800 | +20.0 | +20.0 | 100% |" in rows
    assert "| 7 | ED | mean of 2 | | | | | | 25% |" in rows
    assert not any(r.startswith("| 7 | all | 2 |") for r in rows)
    assert len(rows) == 2 + 3 * 3  # header, rule; per group: two seeds and their mean


def test_protocol_header_names_the_runs_trained_at_another_precision(tmp_path):
    # A grid whose cells trained on different machines (precision auto): the minority is named.
    from types import SimpleNamespace

    from semidiff.report.tables import _precision_line

    def run(name, timing):
        return SimpleNamespace(run_dir=tmp_path / name, timing=timing)

    bf16 = {"precision": "bf16-mixed", "memory_format": "channels_last"}
    results = [run("a_l3_s0", bf16), run("a_l3_s0", bf16),  # an extra evaluation of the same run
               run("a_l3_s1", bf16), run("b_l3_s0", {"precision": "32", "memory_format": "contiguous"}),
               run("old_l3_s0", {})]
    line = _precision_line(results)
    assert line == ("- training precision, memory format: bf16-mixed, channels_last (2 runs) / "
                    "32, contiguous (1 run: b_l3_s0) / not recorded (1 run: old_l3_s0)")
