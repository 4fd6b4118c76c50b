"""Reliability of checkpoints: atomic writes, and exact resume of a run killed with SIGKILL.

The kill-and-resume test runs real ``semidiff train`` processes (tiny U-Net, 32x32 synthetic
images, Mean Teacher), kills one with SIGKILL once its first ``last.ckpt`` exists, continues it
with ``semidiff train RUN_DIR`` and requires bit-identical final weights and equal validation
metrics compared with an uninterrupted run of the same seed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from semidiff.config import config_from_dict
from semidiff.data.synthetic import make_synthetic_dataset
from semidiff.engine import checkpoint_io
from semidiff.engine.checkpoint_io import (
    TEMP_PREFIX,
    atomic_torch_save,
    remove_stale_temporaries,
)
from semidiff.engine.train import train

TINY_UNET = {"features": [4, 8, 8, 16, 16]}
STEPS = 24  # of the kill-and-resume runs; a checkpoint (after validation) every 8


def tiny_config(out: Path, root: Path, name: str, steps: int = 30, every: int = 5, method="mean_teacher") -> dict:
    """A run that takes a few seconds on one busy core."""
    semi = method != "supervised"
    return {
        "experiment": {"name": name, "output_dir": str(out), "seed": 3},
        "data": {"reader": "synthetic", "root": str(root), "labeled": 2, "patch_size": [32, 32]},
        "model": {"net": "unet2d", "num_classes": 3, "net_options": TINY_UNET},
        "method": {"name": method},
        "train": {"max_steps": steps, "labeled_batch": 2, "unlabeled_batch": 2 if semi else 0,
                  "optimizer": "adamw", "lr": 3e-3, "val_every": every, "log_every": 1,
                  "accelerator": "cpu", "progress_bar": False, "num_threads": 1},
        "eval": {"overlay_cases": 0},
    }


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny2d")
    return make_synthetic_dataset(root, spatial_dims=2, num_cases=8, size=(32, 32), num_classes=3,
                                  val_cases=2, seed=0)


# ---- atomic writes ------------------------------------------------------------------------------
def _visible_checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".ckpt")


def test_failed_rename_keeps_previous_file_and_leaves_no_partial(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.arange(10.0)}, target)

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_io.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        atomic_torch_save({"step": 2, "w": torch.zeros(10)}, target)
    kept = torch.load(target, weights_only=True)
    assert kept["step"] == 1 and torch.equal(kept["w"], torch.arange(10.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_trainer_checkpoints_go_through_the_atomic_writer(tmp_path, tiny_data, monkeypatch):
    """A save that fails between write and rename inside a real run leaves the previous
    ``last.ckpt`` loadable and no stray partial file."""
    cfg = config_from_dict(tiny_config(tmp_path, tiny_data, "interrupted", steps=12, every=4, method="supervised"))
    real_replace = os.replace
    calls = []

    def replace_then_fail(src, dst):
        calls.append(Path(dst).name)
        if len(calls) >= 3:  # the first save (best + last) succeeds, the next one is cut off
            raise OSError(5, "simulated I/O error during rename")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_io.os, "replace", replace_then_fail)
    with pytest.raises(OSError, match="simulated I/O error"):
        train(cfg, log=lambda *_: None)
    folder = cfg.run_dir() / "checkpoints"
    assert calls[:2] == ["best.ckpt", "last.ckpt"] or set(calls[:2]) == {"best.ckpt", "last.ckpt"}
    last = torch.load(folder / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4
    assert _visible_checkpoints(folder) == ["best.ckpt", "last.ckpt"]
    assert not [p for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_last_checkpoint_follows_every_validation_even_when_best_does_not(tmp_path):
    """Lightning alone kept ``last.ckpt`` at the best validation (step 1500 of a 2500-step run), so a
    kill lost everything since; ``last`` now moves at every validation while ``best`` stays put."""
    import lightning as L

    from semidiff.engine.checkpoint_io import AtomicCheckpointIO, BestAndLastCheckpoint

    class Worsening(L.LightningModule):  # validation score 1, 1/2, 1/3: only the first is best
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
            self.validations = 0

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            pass

        def on_validation_epoch_end(self):
            self.validations += 1
            self.log("val/dice_mean", 1.0 / self.validations)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 2)), batch_size=4)
    ckpt = BestAndLastCheckpoint(dirpath=tmp_path, filename="best", monitor="val/dice_mean", mode="max",
                                 save_last=True, save_top_k=1, enable_version_counter=False)
    ckpt.CHECKPOINT_NAME_LAST = "last"
    trainer = L.Trainer(max_steps=12, val_check_interval=4, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                        limit_val_batches=1, callbacks=[ckpt], plugins=[AtomicCheckpointIO()], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Worsening(), data, data)
    assert torch.load(tmp_path / "best.ckpt", weights_only=False)["global_step"] == 4
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["global_step"] == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]


def test_killed_writer_never_corrupts_the_target(tmp_path):
    """SIGKILL a process that keeps rewriting a large checkpoint: the file always loads."""
    target = tmp_path / "last.ckpt"
    script = textwrap.dedent(f"""
        import torch
        from semidiff.engine.checkpoint_io import atomic_torch_save
        i = 0
        while True:
            atomic_torch_save({{"i": i, "w": torch.full((4_000_000,), float(i))}}, {str(target)!r})
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not target.exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # land somewhere inside a later save
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = torch.load(target, weights_only=True)
    assert torch.equal(ckpt["w"], torch.full((4_000_000,), float(ckpt["i"])))
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# ---- SIGKILL and resume -------------------------------------------------------------------------
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "semidiff.cli", "train", *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_sigkill_then_resume_gives_identical_weights_and_metrics(tmp_path, tiny_data):
    out = tmp_path / "runs"
    out.mkdir()
    for name in ("straight", "killed"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(tiny_config(out, tiny_data, name, steps=STEPS, every=8)))

    # The uninterrupted run goes on beside the one that is killed (saves wall time).
    straight = subprocess.Popen(_cli(str(tmp_path / "straight.yaml")), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed_dir = out / "killed"
    last = killed_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(_cli(str(tmp_path / "killed.yaml")), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = torch.load(last, weights_only=False)
    step_at_kill = at_kill["global_step"]
    seconds_at_kill = at_kill["semidiff_engine"]["train_seconds"]
    assert seconds_at_kill > 0 and at_kill["semidiff_engine"]["timed_from_step"] == 0
    assert 0 < step_at_kill < STEPS and not (killed_dir / "checkpoints" / "final.ckpt").exists(), \
        "the run must be killed mid-run for this test to mean anything"

    resumed = subprocess.run(_cli(str(killed_dir)), env=_env(), capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _, straight_err = straight.communicate(timeout=300)
    assert straight.returncode == 0, straight_err[-2000:]

    a = torch.load(out / "straight" / "checkpoints" / "final.ckpt", weights_only=False)
    b = torch.load(killed_dir / "checkpoints" / "final.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:  # student, EMA teacher and BatchNorm buffers alike
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), f"{key} differs after resume"
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"]):
        for sa, sb in zip(opt_a["state"].values(), opt_b["state"].values()):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    metrics_a = json.loads((out / "straight" / "eval_val_last" / "summary.json").read_text())["mean"]
    metrics_b = json.loads((killed_dir / "eval_val_last" / "summary.json").read_text())["mean"]
    assert metrics_a == metrics_b
    # The resumed run's time counts its first piece (up to the checkpoint it resumed) and its last.
    timing = json.loads((killed_dir / "timing.json").read_text())
    assert timing["steps"] == STEPS and "timed_steps" not in timing
    assert timing["wall_seconds"] > seconds_at_kill


def test_a_run_resumed_from_a_checkpoint_without_time_says_which_steps_its_time_covers(tiny_data, tmp_path):
    from semidiff.engine.module import CHECKPOINT_STATE_KEY, SemidiffModule
    from semidiff.report.collect import seconds_per_step

    cfg = config_from_dict(tiny_config(tmp_path, tiny_data, "old"), "test").model_dump(mode="json")
    module = SemidiffModule(cfg)
    module.on_load_checkpoint({"global_step": 300, CHECKPOINT_STATE_KEY: {"skipped_steps": 2}})
    assert (module.skipped_steps, module.timed_from_step, module.seconds_before) == (2, 300, 0.0)
    module.on_load_checkpoint({"global_step": 300, CHECKPOINT_STATE_KEY: {
        "skipped_steps": 0, "train_seconds": 12.5, "timed_from_step": 0}})
    assert (module.timed_from_step, module.train_seconds()) == (0, 12.5)
    saved: dict = {}
    module.start_clock(time.perf_counter() - 2.0)  # this invocation began 2 s ago
    module.on_save_checkpoint(saved)
    assert saved[CHECKPOINT_STATE_KEY]["train_seconds"] >= 14.5
    # s/step from the steps the wall time covers
    assert seconds_per_step({"wall_seconds": 100.0, "steps": 1000, "timed_steps": 250}) == 0.4
    assert seconds_per_step({"wall_seconds": 100.0, "steps": 1000}) == 0.1
