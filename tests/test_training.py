"""End to end on synthetic data: training lowers the loss, resume continues, eval and predict work,
and bad input gives one clear line from the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from semidiff.cli import main
from semidiff.config import config_from_dict
from semidiff.data.synthetic import make_synthetic_dataset
from semidiff.engine.train import train


def _cfg(tmp_path: Path, root: Path, steps: int, name="run", **train_kw) -> dict:
    return {
        "experiment": {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 0},
        "data": {"reader": "synthetic", "root": str(root), "labeled": 4, "patch_size": [64, 64]},
        "model": {"net": "unet2d", "num_classes": 4},
        "method": {"name": "supervised"},
        "train": {"max_steps": steps, "labeled_batch": 4, "optimizer": "adamw", "lr": 3e-3,
                  "val_every": 10, "log_every": 1, "accelerator": "cpu", "progress_bar": False, **train_kw},
        "eval": {"overlay_cases": 1},
    }


@pytest.fixture(scope="module")
def synth2d(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth2d")
    return make_synthetic_dataset(root, spatial_dims=2, num_cases=12, size=(64, 64), val_cases=3, seed=0)


def _rows(run_dir: Path) -> list[dict]:
    import csv

    rows = []
    for f in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        rows += [r for r in csv.DictReader(f.read_text().splitlines()) if r.get("train/loss")]
    return rows


def _losses(run_dir: Path) -> list[float]:
    return [float(r["train/loss"]) for r in _rows(run_dir)]


def test_short_training_lowers_loss_and_writes_everything(tmp_path, synth2d):
    cfg = config_from_dict(_cfg(tmp_path, synth2d, 40))
    results = train(cfg, log=lambda *_: None)
    run = cfg.run_dir()
    losses = _losses(run)
    assert len(losses) >= 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    for name in ("last", "best", "final"):
        assert (run / "checkpoints" / f"{name}.ckpt").is_file()
    assert (run / "config.yaml").is_file() and (run / "splits.json").is_file()
    assert list((run / "tensorboard").glob("events.*"))
    summary = json.loads((run / "eval_val_last" / "summary.json").read_text())
    assert summary["protocol"]["split"] == "val" and summary["protocol"]["units"] == "voxels"
    # Validation logs the pooled Dice beside the per-case mean; at the end it is the evaluation's.
    import csv

    logged = [r for f in sorted((run / "csv").glob("version_*/metrics.csv"))
              for r in csv.DictReader(f.read_text().splitlines()) if r.get("val/pooled_dice_mean")]
    assert logged and 0.0 <= float(logged[-1]["val/pooled_dice_mean"]) <= 1.0
    assert float(logged[-1]["val/pooled_dice_mean"]) == pytest.approx(summary["pooled"]["dice"], abs=1e-4)
    assert (run / "eval_val_last" / "per_case.csv").is_file()
    assert (run / "eval_val_last" / "overlays.png").stat().st_size > 1000
    assert 0.0 <= results["last"]["summary"]["mean"]["dice"] <= 1.0


def test_resume_continues_from_saved_step(tmp_path, synth2d):
    cfg = config_from_dict(_cfg(tmp_path, synth2d, 20, name="resumed"))
    train(cfg, log=lambda *_: None)
    first = torch.load(cfg.run_dir() / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 20
    longer = config_from_dict(_cfg(tmp_path, synth2d, 30, name="resumed"))
    train(longer, resume=True, log=lambda *_: None)
    second = torch.load(longer.run_dir() / "checkpoints" / "last.ckpt", weights_only=False)
    assert second["global_step"] == 30
    steps = [int(r["step"]) for r in _rows(longer.run_dir())]
    # Both parts' logs are kept and every step was trained once: nothing was redone from zero.
    assert len(steps) == 30 and len(set(steps)) == 30


@pytest.mark.parametrize("interruption", ["crash", "sigterm"])
def test_interrupted_at_step_13_then_resumed_equals_uninterrupted_run(tmp_path, synth2d, monkeypatch, interruption):
    """A crash loses the steps since the last checkpoint (validation at step 10). A SIGTERM (a
    scheduler's, a bench's) finishes the step in progress, saves it and exits 143; it used to exit 0
    with nothing saved since the last validation."""
    import os
    import signal

    from semidiff.engine.module import SemidiffModule

    full = config_from_dict(_cfg(tmp_path, synth2d, 20, name="straight"))
    train(full, log=lambda *_: None)

    cut = config_from_dict(_cfg(tmp_path, synth2d, 20, name=interruption))
    original = SemidiffModule.training_step

    def interrupt_at_13(self, batch, batch_idx):
        if self.global_step == 13:
            if interruption == "crash":
                raise RuntimeError("simulated crash")
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(SemidiffModule, "training_step", interrupt_at_13)
    lines = []
    with pytest.raises(RuntimeError if interruption == "crash" else SystemExit) as stop:
        train(cut, log=lines.append)
    monkeypatch.setattr(SemidiffModule, "training_step", original)
    run = cut.run_dir()
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    if interruption == "crash":
        assert saved == 10
    else:
        assert stop.value.code == 128 + signal.SIGTERM
        assert saved == 14  # step 13 finished: 14 steps done
        assert any("SIGTERM" in line and "step 14 of 20" in line and "--resume" in line for line in lines), lines
        assert not (run / "checkpoints" / "final.ckpt").exists() and not (run / "timing.json").exists()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler goes with the run
    train(cut, resume=True, log=lambda *_: None)
    if interruption == "sigterm":
        steps = [int(r["step"]) for r in _rows(run)]
        assert len(steps) == 20 and len(set(steps)) == 20  # no step trained twice, none skipped
    a = torch.load(full.run_dir() / "checkpoints" / "final.ckpt", weights_only=False)["state_dict"]
    b = torch.load(run / "checkpoints" / "final.ckpt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=f"{k} differs after resume")


def test_cli_eval_and_predict(tmp_path, synth2d, capsys):
    cfg = config_from_dict(_cfg(tmp_path, synth2d, 10, name="cli"))
    train(cfg, log=lambda *_: None)
    run = cfg.run_dir()
    assert main(["eval", str(run), "--checkpoint", "last", "--out", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "summary.json").is_file()
    # Predict on a PNG made from a validation case, and on a 3D NIfTI (a 2D model goes slice by slice).
    import h5py
    import SimpleITK as sitk
    from PIL import Image

    case = max((synth2d / "cases").glob("*.h5"))
    img = np.asarray(h5py.File(case)["image"])
    png = tmp_path / "in.png"
    Image.fromarray(((img - img.min()) / (np.ptp(img)) * 255).astype(np.uint8)).save(png)
    assert main(["predict", str(run), str(png), str(tmp_path / "out.png")]) == 0
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.shape == img.shape and out.max() < 4
    vol = sitk.GetImageFromArray(np.stack([img] * 3).astype(np.float32))
    vol.SetSpacing((0.7, 0.8, 5.0))
    vol.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(vol, str(tmp_path / "vol.nii.gz"))
    assert main(["predict", str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "vol.nii.gz"),
                 str(tmp_path / "pred.nii.gz")]) == 0
    pred = sitk.ReadImage(str(tmp_path / "pred.nii.gz"))
    assert pred.GetSize() == vol.GetSize()
    assert pred.GetSpacing() == pytest.approx(vol.GetSpacing())
    assert pred.GetOrigin() == pytest.approx(vol.GetOrigin())


def test_cli_errors_are_one_clear_line(tmp_path, synth2d, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {max_steps: -1}\n")
    assert main(["train", str(bad)]) == 2
    assert "train.max_steps" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing.ckpt"), "a.png", "b.png"]) == 2
    assert "missing.ckpt: checkpoint not found" in capsys.readouterr().err
    cfgfile = tmp_path / "empty_labeled.yaml"
    cfgfile.write_text(
        f"experiment: {{output_dir: {tmp_path / 'r'}}}\n"
        f"data: {{reader: synthetic, root: {synth2d}, labeled: 100, patch_size: [64, 64]}}\n"
        "train: {max_steps: 2, accelerator: cpu, progress_bar: false}\n")
    assert main(["train", str(cfgfile)]) == 2
    assert "available" in capsys.readouterr().err
    (tmp_path / "corrupt.nii.gz").write_bytes(b"not an image")
    ckpt = tmp_path / "runs"  # no run here yet
    assert main(["predict", str(ckpt), str(tmp_path / "corrupt.nii.gz"), str(tmp_path / "o.nii.gz")]) == 2


def test_3d_run_with_resampling_and_sliding_window(tmp_path):
    """The LA-reduced path: V-Net on volumes resampled by 0.5, sliding-window validation,
    metrics on the original grid."""
    root = make_synthetic_dataset(tmp_path / "s3d", spatial_dims=3, num_cases=5, size=(64, 64, 32),
                                  num_classes=2, val_cases=2, seed=1)
    tree = _cfg(tmp_path, root, 4, name="v3d")
    tree["data"].update({"labeled": 2, "patch_size": [24, 24, 16], "resample_factor": 0.5})
    tree["model"] = {"net": "vnet", "num_classes": 2}
    tree["train"].update({"labeled_batch": 1, "val_every": 4})
    tree["eval"] = {"stride": [8, 8, 8], "overlay_cases": 1}
    cfg = config_from_dict(tree)
    res = train(cfg, log=lambda *_: None)
    import csv

    rows = list(csv.DictReader((cfg.run_dir() / "eval_val_last" / "per_case.csv").read_text().splitlines()))
    assert len(rows) == 2  # 2 validation cases x 1 foreground class
    summary = res["last"]["summary"]
    assert res["last"]["protocol"]["inference"].startswith("sliding_window, patch [24, 24, 16], stride [8, 8, 8]")
    # The prediction was brought back to the 64x64x32 grid (its Dice is computed against the
    # original label; a shape mismatch would raise).
    assert 0.0 <= summary["mean"]["dice"] <= 1.0


def test_resampled_prediction_returns_to_the_original_grid_in_2d_and_3d():
    from semidiff.evaluation.evaluate import predict_image

    for patch, image_shape in (([32, 32], (1, 60, 44)), ([16, 16, 8], (1, 40, 36, 20))):
        cfg = config_from_dict({"data": {"patch_size": patch, "resample_factor": 0.5},
                                "model": {"num_classes": 3}})

        def uniform(x):
            return torch.full((x.shape[0], 3, *x.shape[2:]), 1 / 3)

        probs = predict_image(uniform, cfg, np.random.rand(*image_shape).astype(np.float32))
        assert probs.shape == (3, *image_shape[1:])
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
