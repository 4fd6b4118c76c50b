"""Run guards: a non-finite loss stops the run naming the step and the loss part; an unwritable
or full output folder is refused before training starts; neither leaves a run folder behind."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml

from semidiff.cli import main
from semidiff.data.synthetic import make_synthetic_dataset
from semidiff.engine import train as train_module
from semidiff.engine.module import SemidiffModule
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
