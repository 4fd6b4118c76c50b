"""Run guards: a non-finite loss stops the run naming the step and the loss part (or, with
``train.nonfinite: skip``, skips the step, counting skips); an unwritable
or full output folder is refused before training starts; neither leaves a run folder behind."""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml

from semidiff.cli import main
from semidiff.config import config_from_dict
from semidiff.data.sampler import TwoStreamBatchSampler
from semidiff.data.synthetic import make_synthetic_dataset
from semidiff.engine import train as train_module
from semidiff.engine.module import CHECKPOINT_STATE_KEY, SemidiffModule
from semidiff.engine.train import train
from semidiff.methods.supervised import Supervised


def _config(out: Path, root: Path) -> dict:
    return {
        "experiment": {"name": "guarded", "output_dir": str(out), "seed": 0},
        "data": {"reader": "synthetic", "root": str(root), "labeled": 2, "patch_size": [32, 32]},
        "model": {"net": "unet2d", "num_classes": 3, "net_options": {"features": [4, 8, 8, 16, 16]}},
        "method": {"name": "supervised"},
        "train": {"max_steps": 6, "labeled_batch": 2, "val_every": 100, "accelerator": "cpu",
                  "progress_bar": False, "num_threads": 1},
        "eval": {"overlay_cases": 0},
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("guards"), spatial_dims=2, num_cases=4, size=(32, 32),
                                  num_classes=3, val_cases=0, seed=0)


def _write(tmp_path: Path, tree: dict) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_non_finite_loss_part_stops_the_run_naming_step_and_part(tmp_path, data, capsys, monkeypatch):
    original = Supervised.training_step

    def nan_at_step_3(self, labeled, unlabeled, progress):
        parts = original(self, labeled, unlabeled, progress)
        if progress.step == 3:
            parts["loss_sup"] = torch.tensor(float("nan"))
        return parts

    monkeypatch.setattr(Supervised, "training_step", nan_at_step_3)
    code = main(["train", _write(tmp_path, _config(tmp_path / "runs", data))])
    err = capsys.readouterr().err
    assert code == 2
    assert "non-finite loss at step 3: loss_sup = nan" in err
    assert not (tmp_path / "runs" / "guarded").exists()  # no checkpoint yet: nothing to resume


def test_output_folder_that_cannot_be_created_is_refused_before_training(tmp_path, data, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("training must not start")

    monkeypatch.setattr(SemidiffModule, "training_step", never)
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    code = main(["train", _write(tmp_path, _config(blocker / "runs", data))])
    err = capsys.readouterr().err
    assert code == 2 and "output folder is not writable" in err and str(blocker / "runs" / "guarded") in err


def test_full_disk_is_refused_before_training(tmp_path, data, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("training must not start")

    monkeypatch.setattr(SemidiffModule, "training_step", never)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(train_module.shutil, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30, 10 * 2**20))
    code = main(["train", _write(tmp_path, _config(tmp_path / "runs", data))])
    err = capsys.readouterr().err
    assert code == 2 and "only 10 MiB free" in err


# ---- train.nonfinite: skip ------------------------------------------------------------------------
NAN_BATCHES = (3, 5)


def _inject_nan_at_batches(monkeypatch, batches=NAN_BATCHES) -> dict:
    """Make the loss NaN at the given batch numbers (batches consumed, not optimiser steps: a skipped
    step repeats the step number) and record what the run did."""
    record = {"batch": -1, "drawn": [], "step_ends": 0}
    module_step = SemidiffModule.training_step

    def tracking_module_step(self, batch, batch_idx):
        record["batch"] = self.batch_number
        return module_step(self, batch, batch_idx)

    original = Supervised.training_step

    def nan_at_chosen_batches(self, labeled, unlabeled, progress):
        parts = original(self, labeled, unlabeled, progress)
        if record["batch"] in batches:
            parts["loss"] = parts["loss"] * float("nan")
            parts["loss_sup"] = torch.tensor(float("nan"))
        return parts

    def counting_step_end(self, progress):
        record["step_ends"] += 1

    batch = TwoStreamBatchSampler.batch

    def recording_batch(self, k):
        record["drawn"].append(k)
        return batch(self, k)

    monkeypatch.setattr(SemidiffModule, "training_step", tracking_module_step)
    monkeypatch.setattr(Supervised, "training_step", nan_at_chosen_batches)
    monkeypatch.setattr(Supervised, "on_step_end", counting_step_end)
    monkeypatch.setattr(TwoStreamBatchSampler, "batch", recording_batch)
    return record


def _skip_config(tmp_path: Path, data: Path, **train) -> dict:
    tree = _config(tmp_path / "runs", data)
    tree["train"].update({"nonfinite": "skip", "val_every": 4, "log_every": 1, "optimizer": "adamw", "lr": 1e-3,
                          **train})
    return tree


def test_skip_mode_skips_non_finite_steps_and_still_makes_max_steps_updates(tmp_path, data, monkeypatch):
    record = _inject_nan_at_batches(monkeypatch)
    cfg = config_from_dict(_skip_config(tmp_path, data))
    train(cfg, log=lambda *_: None)
    run_dir = cfg.run_dir()
    final = torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=False)
    # 6 optimiser steps from 8 batches; the 2 skipped ones made no update and no on_step_end.
    assert final["global_step"] == 6 and final[CHECKPOINT_STATE_KEY]["skipped_steps"] == 2
    assert record["step_ends"] == 6
    assert json.loads((run_dir / "timing.json").read_text())["steps"] == 6
    # The 8 batches are the first 8 of the run's sequence: none repeated when the sampler's first
    # pass (max_steps batches) ran out and Lightning started a second epoch.
    assert record["drawn"] == list(range(8))
    # The optimiser and the schedule follow optimiser steps, not batches.
    assert all(int(state["step"]) == 6 for state in final["optimizer_states"][0]["state"].values())
    assert final["lr_schedulers"][0]["last_epoch"] == 6
    # The count is logged.
    metrics = next((run_dir / "csv").rglob("metrics.csv")).read_text().splitlines()
    column = metrics[0].split(",").index("train/skipped_steps")
    logged = [float(row.split(",")[column]) for row in metrics[1:] if row.split(",")[column]]
    assert max(logged) == 2.0 and logged == sorted(logged)
    # The checkpoint written at step 4 (after one skip) keeps the count, so a run resumed from it
    # draws from the right batch, skips batch 5 again and ends with the same weights.
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4 and last[CHECKPOINT_STATE_KEY]["skipped_steps"] == 1
    record["drawn"].clear()
    train(cfg, resume=True, log=lambda *_: None)
    resumed = torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=False)
    assert record["drawn"][:3] == [5, 6, 7]
    assert resumed["global_step"] == 6 and resumed[CHECKPOINT_STATE_KEY]["skipped_steps"] == 2
    for key, value in final["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)


def test_skip_mode_under_bf16_autocast_skips_the_same_steps(tmp_path, data, monkeypatch):
    """The skip path calls the training closure itself; under bf16 autocast the step must still run
    in bf16 (Lightning's autocast wraps the training step, inside that closure) and be skipped."""
    record = _inject_nan_at_batches(monkeypatch)
    dtypes = []
    original_forward = SemidiffModule.training_step

    def recording(self, batch, batch_idx):
        dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return original_forward(self, batch, batch_idx)

    monkeypatch.setattr(SemidiffModule, "training_step", recording)
    cfg = config_from_dict(_skip_config(tmp_path, data, precision="bf16-mixed"))
    train(cfg, log=lambda *_: None)
    final = torch.load(cfg.run_dir() / "checkpoints" / "final.ckpt", weights_only=False)
    assert final["global_step"] == 6 and final[CHECKPOINT_STATE_KEY]["skipped_steps"] == 2
    assert record["step_ends"] == 6
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_skip_mode_stops_once_max_skips_is_exceeded(tmp_path, data, capsys, monkeypatch):
    _inject_nan_at_batches(monkeypatch)
    tree = _skip_config(tmp_path, data, max_skips=1, val_every=100)
    code = main(["train", _write(tmp_path, tree)])
    err = capsys.readouterr().err
    assert code == 2
    assert "non-finite loss at step 4: loss = nan" in err and "loss_sup = nan" in err
    assert "2 steps skipped, more than train.max_skips=1" in err


def test_nonfinite_options_are_validated():
    from semidiff.errors import ConfigError

    with pytest.raises(ConfigError, match="train.nonfinite"):
        config_from_dict({"train": {"nonfinite": "ignore"}})
    with pytest.raises(ConfigError, match="train.max_skips"):
        config_from_dict({"train": {"max_skips": -1}})
    assert config_from_dict({}).train.nonfinite == "stop"
