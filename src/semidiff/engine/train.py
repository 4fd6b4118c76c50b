"""``semidiff train``: run folder, loggers, checkpoints, resume, final evaluation."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from semidiff.config import Config
from semidiff.engine.data import SemidiffData
from semidiff.engine.module import SemidiffModule
from semidiff.errors import SemidiffError
from semidiff.evaluation.evaluate import evaluate


def check_output_dir(run_dir: Path) -> None:
    """Fail before training, not after an hour, when results could not be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_bytes(b"0" * 1024)
        probe.unlink()
    except OSError as exc:
        raise SemidiffError(f"{run_dir}: output folder is not writable ({exc.strerror or exc})") from None
    free = shutil.disk_usage(run_dir).free
    if free < 200 * 2**20:
        raise SemidiffError(f"{run_dir}: only {free / 2**20:.0f} MiB free on disk; need at least 200 MiB")


def checkpoint_path(run_dir: Path, which: str) -> Path:
    return run_dir / "checkpoints" / f"{which}.ckpt"


def train(cfg: Config, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    """Train one run; returns the final evaluation summaries (last and best on validation)."""
    run_dir = cfg.run_dir()
    last = checkpoint_path(run_dir, "last")
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        if not overwrite:
            raise SemidiffError(
                f"{run_dir}: run folder exists; pass --resume to continue it or --overwrite to start again"
            )
        shutil.rmtree(run_dir)
    if resume and not last.is_file():
        log(f"no checkpoint at {last}: starting a new run")
    check_output_dir(run_dir)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())

    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    L.seed_everything(cfg.experiment.seed, workers=True, verbose=False)
    module = SemidiffModule(cfg.model_dump(mode="json"))
    data = SemidiffData(cfg, uses_unlabeled=module.method.uses_unlabeled)
    (run_dir / "splits.json").write_text(json.dumps(data.splits.summary(), indent=1))
    log(f"run folder: {run_dir}")
    log(f"data: {len(data.splits.labeled)} labeled, "
        f"{len(data.splits.unlabeled) if data.uses_unlabeled else 0} unlabeled used, "
        f"{len(data.splits.val)} validation cases")

    has_val = bool(data.splits.val)
    ckpt_cb = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor="val/dice_mean" if has_val else None,
        mode="max",
        save_last=True,
        save_top_k=1 if has_val else 0,
        # With validation: saved after each validation (every train.val_every steps);
        # without: every train.val_every steps.
        every_n_train_steps=None if has_val else cfg.train.val_every,
        enable_version_counter=False,
    )
    ckpt_cb.CHECKPOINT_NAME_LAST = "last"
    loggers = [
        TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""),
        # One CSV folder per (re)start: Lightning's CSV writer would overwrite the earlier part.
        CSVLogger(save_dir=str(run_dir), name="csv"),
    ]
    trainer = L.Trainer(
        max_steps=cfg.train.max_steps,
        max_epochs=-1,
        accelerator=cfg.train.accelerator,
        devices=cfg.train.devices,
        num_nodes=cfg.train.num_nodes,
        precision=cfg.train.precision,
        deterministic=cfg.train.deterministic,
        gradient_clip_val=cfg.train.grad_clip,
        log_every_n_steps=cfg.train.log_every,
        val_check_interval=cfg.train.val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the two-stream sampler shards itself by rank
        callbacks=[ckpt_cb],
        logger=loggers,
        enable_progress_bar=cfg.train.progress_bar,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if resume and last.is_file() else None)
    wall = time.perf_counter() - start
    trainer.save_checkpoint(checkpoint_path(run_dir, "final"))
    steps_done = trainer.global_step
    timing = {"wall_seconds": round(wall, 1), "steps": steps_done}
    (run_dir / "timing.json").write_text(json.dumps(timing, indent=1))
    log(f"trained {steps_done} steps in {wall:.0f} s")

    results = {}
    if has_val:
        device = module.device
        for which in ("last", "best"):
            path = checkpoint_path(run_dir, "final" if which == "last" else "best")
            if not path.is_file():
                continue
            if which == "best":
                module.load_state_dict(torch.load(path, map_location=device, weights_only=False)["state_dict"])
            log(f"evaluating the {which} checkpoint on {cfg.data.val_split or 'held-out'} cases")
            res = evaluate(module.method, cfg, data.reader, data.splits.val, run_dir / f"eval_val_{which}",
                           split=cfg.data.val_split or "holdout", checkpoint=which, device=device, log=log)
            results[which] = res
            log(res["table"])
    return results
