"""`semidiff demo`: its dataset (split as declared, deterministic, the two regimes really differ) and a
tiny end-to-end run (table, figure, run folders)."""

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from semidiff.cli import main
from semidiff.config import config_from_dict
from semidiff.data.demo_data import LABELED_REGIME, VARIED_REGIME, make_demo_dataset
from semidiff.data.synthetic import Appearance, synthetic_case
from semidiff.demo import (
    DEMO_CLASS_NAMES,
    DEMO_LABELED,
    DEMO_METHODS,
    DEMO_UNLABELED,
    DEMO_VAL,
    demo_config,
    run_demo,
)
from semidiff.engine.data import build_reader, build_splits
from semidiff.errors import ConfigError


def _arrays(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for f in sorted((root / "cases").glob("*.h5")):
        with h5py.File(f, "r") as h:
            out[f.stem] = (h["image"][()], h["label"][()])
    return out


def test_demo_dataset_is_deterministic_and_split_as_declared(tmp_path):
    a = make_demo_dataset(tmp_path / "a", labeled=3, unlabeled=5, val=4, size=(32, 32), seed=0)
    b = make_demo_dataset(tmp_path / "b", labeled=3, unlabeled=5, val=4, size=(32, 32), seed=0)
    c = make_demo_dataset(tmp_path / "c", labeled=3, unlabeled=5, val=4, size=(32, 32), seed=1)
    cases_a, cases_b, cases_c = _arrays(a), _arrays(b), _arrays(c)
    assert len(cases_a) == 12 and cases_a.keys() == cases_b.keys()
    for k in cases_a:
        assert all(np.array_equal(x, y) for x, y in zip(cases_a[k], cases_b[k])), k
    assert not np.array_equal(cases_a["val_000"][0], cases_c["val_000"][0])  # the seed matters
    info = json.loads((a / "dataset.json").read_text())
    assert info["demo"]["labeled"] == 3 and info["demo"]["unlabeled"] == 5 and info["demo"]["val"] == 4
    assert info == json.loads((b / "dataset.json").read_text())

    # Through the normal data pipeline: the first `labeled` ids are labeled, the rest of train.list
    # unlabeled, val.list the validation cases.
    cfg = config_from_dict({"data": {"reader": "synthetic", "root": str(a), "labeled": 3, "labeled_unit": "cases",
                                     "patch_size": [32, 32]}})
    splits = build_splits(cfg, build_reader(cfg))
    assert [r.case_id for r in splits.labeled] == ["lab_000", "lab_001", "lab_002"]
    assert [r.case_id for r in splits.unlabeled] == [f"unl_{k:03d}" for k in range(5)]
    assert [r.case_id for r in splits.val] == [f"val_{k:03d}" for k in range(4)]

    # Each case's recorded appearance lies in its regime's ranges.
    for case_id, look in info["demo"]["appearance"].items():
        regime = LABELED_REGIME if case_id.startswith("lab") else VARIED_REGIME
        for name, (lo, hi) in regime.items():
            assert lo - 1e-4 <= look[name] <= hi + 1e-4, (case_id, name)


def _background_roughness(image: np.ndarray, label: np.ndarray) -> float:
    """Pixel-to-pixel variation inside the background: noise (and texture), not the structures."""
    dx = np.abs(np.diff(image, axis=1))[(label[:, 1:] == 0) & (label[:, :-1] == 0)]
    return float(np.median(dx))


def test_demo_regimes_differ_in_the_images(tmp_path):
    """The unlabeled and validation images are measurably noisier than the labeled ones."""
    cases = _arrays(make_demo_dataset(tmp_path / "d", labeled=4, unlabeled=4, val=4, size=(64, 64)))
    rough = {k: _background_roughness(*v) for k, v in cases.items()}
    labeled = [v for k, v in rough.items() if k.startswith("lab")]
    varied = [v for k, v in rough.items() if not k.startswith("lab")]
    assert max(labeled) < min(varied)


def test_appearance_scales_what_it_names():
    rng = lambda: np.random.default_rng([3, 1])  # the same draws for every variant
    base_image, base_label = synthetic_case(rng(), (64, 64), 4)
    image, label = synthetic_case(rng(), (64, 64), 4, Appearance())
    assert np.array_equal(image, base_image) and np.array_equal(label, base_label)
    small = synthetic_case(rng(), (64, 64), 4, Appearance(size=0.7))[1]
    large = synthetic_case(rng(), (64, 64), 4, Appearance(size=1.3))[1]
    assert (small == 1).sum() < (base_label == 1).sum() < (large == 1).sum()  # the organ grows with size
    clean = synthetic_case(rng(), (64, 64), 4, Appearance(noise=0.0, texture=0.0, bias=0.0))[0]
    assert _background_roughness(clean, base_label) < 0.5 * _background_roughness(base_image, base_label)
    with pytest.raises(ConfigError, match="noise"):
        Appearance(noise=-0.1)
    with pytest.raises(ConfigError, match="unlabeled"):
        make_demo_dataset("unused", unlabeled=0)


def test_every_demo_method_gets_the_same_budget(tmp_path):
    cfgs = {m: demo_config(tmp_path, m, steps=123, seed=4) for m in ("supervised", "bcp", "protodiff")}
    for cfg in cfgs.values():
        config_from_dict(cfg)  # a valid config
        assert cfg["train"]["max_steps"] == 123 and cfg["experiment"]["seed"] == 4
        assert {k: v for k, v in cfg["train"].items() if k != "unlabeled_batch"} == \
               {k: v for k, v in cfgs["supervised"]["train"].items() if k != "unlabeled_batch"}
    # ProtoDiff on the same U-Net as the others.
    assert cfgs["protodiff"]["model"]["net_options"]["backbone_options"] == cfgs["supervised"]["model"]["net_options"]


def test_tiny_demo_prints_table_and_draws_figure(tmp_path, capsys):
    result = run_demo(tmp_path / "demo", steps=2, train_log=lambda *_: None)
    out = capsys.readouterr().out
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == list(DEMO_METHODS)
    # The table: protocol line, one row per method with its Dice and its difference to supervised.
    assert result["table"] in out
    protocol = next(line for line in out.splitlines() if line.startswith("protocol:"))
    for part in (f"{DEMO_LABELED} labeled", f"{DEMO_UNLABELED} unlabeled", f"{DEMO_VAL} validation",
                 "2 steps", "seed 0", "last checkpoint", "Dice in [0, 1]"):
        assert part in protocol, part
    for method, r in rows.items():
        line = next(line for line in out.splitlines() if line.startswith(f"| {method} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[2]) == pytest.approx(r["dice"], abs=5e-4)
        if method != "supervised":
            assert float(cells[3]) == pytest.approx(r["dice"] - rows["supervised"]["dice"], abs=1e-3)
        for name, cell in zip(DEMO_CLASS_NAMES[1:], cells[4:7]):
            assert float(cell) == pytest.approx(r["per_class"][name], abs=5e-4)
        # The row's Dice is the run's own evaluation.
        summary = json.loads((tmp_path / "demo" / "runs" / f"demo_{method}" / "eval_val_last" / "summary.json").read_text())
        assert summary["mean"]["dice"] == pytest.approx(r["dice"])
        splits = json.loads((tmp_path / "demo" / "runs" / f"demo_{method}" / "splits.json").read_text())
        assert splits["labeled"] == [f"lab_{k:03d}" for k in range(DEMO_LABELED)]
        assert splits["unlabeled_count"] == DEMO_UNLABELED and len(splits["val"]) == DEMO_VAL
    # Where the figure is; and it is a real picture: wide enough for 5 panels + bars, not blank.
    figure = result["figure"]
    assert re.search(rf"figure: {re.escape(str(figure))}", out)
    from PIL import Image

    with Image.open(figure) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape[1] > 900 and pixels.shape[0] > 500
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # images, overlays and bars, not a blank canvas
    assert (tmp_path / "demo" / "results.md").read_text().count("| protodiff |") == 1


def test_demo_cli_refuses_bad_steps(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_demo_in_parallel_processes_gives_the_runs_of_one_after_the_other(tmp_path):
    # Only the order in time changes: same configs, same seeds, same rows in the same order.
    one = run_demo(tmp_path / "one", steps=2, methods=["supervised", "protodiff"], parallel=1,
                   log=lambda *_: None, train_log=lambda *_: None)
    two = run_demo(tmp_path / "two", steps=2, methods=["supervised", "protodiff"], parallel=2,
                   log=lambda *_: None)
    assert [r["method"] for r in two["rows"]] == ["supervised", "protodiff"]
    for a, b in zip(one["rows"], two["rows"]):
        assert b["dice"] == pytest.approx(a["dice"], abs=1e-4)
        assert (tmp_path / "two" / "runs" / f"demo_{b['method']}" / "checkpoints" / "last.ckpt").is_file()


def test_demo_cell_script_trains_one_changed_run_and_prints_its_result(tmp_path, capsys):
    # benchmarks/demo_cell.py, the tuning tool behind the demo's options: overrides reach the run.
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "demo_cell.py"
    spec = importlib.util.spec_from_file_location("demo_cell", path)
    cell = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cell)
    assert cell.main([str(tmp_path), "c1", "protodiff", "3", "2", "method.options.confidence_threshold=0.7"]) == 0
    result = json.loads(next(line for line in capsys.readouterr().out.splitlines()
                             if line.startswith("RESULT "))[len("RESULT "):])
    assert result["name"] == "c1" and result["steps"] == 2 and set(result["per_class"]) == set(DEMO_CLASS_NAMES[1:])
    summary = json.loads((tmp_path / "runs" / "c1" / "eval_val_last" / "summary.json").read_text())
    assert result["dice"] == pytest.approx(summary["mean"]["dice"])
    import yaml

    options = yaml.safe_load((tmp_path / "runs" / "c1" / "config.yaml").read_text())["method"]["options"]
    assert options["confidence_threshold"] == 0.7 and options["student_forward"] == "separate"
