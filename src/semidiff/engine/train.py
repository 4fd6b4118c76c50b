"""``semidiff train``: run folder, loggers, checkpoints, resume, final evaluation."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from semidiff.config import Config
from semidiff.data.preprocessing import preprocessing_from_config
from semidiff.data.record import check_label_values
from semidiff.engine.checkpoint_io import (
    AtomicCheckpointIO,
    BestAndLastCheckpoint,
    remove_stale_temporaries,
)
from semidiff.engine.data import SemidiffData
from semidiff.engine.module import SemidiffModule
from semidiff.engine.threads import ThreadShare
from semidiff.errors import ConfigError, DataError, SemidiffError
from semidiff.evaluation.evaluate import evaluate
from semidiff.hardware import resolve_precision
from semidiff.methods import method_options


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


def check_method_options(cfg: Config, source: str) -> None:
    """Check ``method.name`` and ``method.options`` against the method's own schema, naming ``source``
    (the config file) in the error.

    ``load_config`` checks only the shared schema, so that reading a YAML file imports neither torch
    nor the methods; every command that trains calls this before anything runs.
    """
    try:
        method_options(cfg.method.name, cfg.method.options)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def checkpoint_path(run_dir: Path, which: str) -> Path:
    return run_dir / "checkpoints" / f"{which}.ckpt"


def is_launch_rank_zero() -> bool:
    """Whether this process is global rank 0, from the launcher's environment.

    Read before ``torch.distributed`` exists: torchrun sets ``RANK``, SLURM ``SLURM_PROCID``, and
    Lightning's own launcher ``NODE_RANK``/``LOCAL_RANK`` for the processes it starts. Only rank 0
    prepares the run folder; the other ranks must not check, delete or write it.
    """
    for var in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value) == 0
    return os.environ.get("LOCAL_RANK", "0") in ("", "0") and os.environ.get("NODE_RANK", "0") in ("", "0")


def peak_memory_mib() -> float:
    """Peak CUDA allocation when training ran on a GPU, else the process's peak resident memory."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)


def preflight_data(data: SemidiffData) -> None:
    """Load every training and validation case once, so a bad file fails before the run starts
    (naming the file), not at the step that first draws it.

    Training cases land in the cache that training would fill anyway; without ``data.cache``
    they are not loaded twice (a bad one then fails when drawn, and the run folder is removed if
    no checkpoint was written yet).
    """
    items = data.train_items
    if items.cache:
        for index in range(len(items)):
            check_case_fits_model(items._case(index), data.cfg)
    else:  # the first labeled case still shows a config that does not fit the data
        check_case_fits_model(items._case(0), data.cfg)
    for ref in data.splits.val:
        check_case_fits_model(data.reader.load(ref), data.cfg)


def check_case_fits_model(case, cfg: Config) -> None:
    """A case whose channels or class ids the configured network cannot take is a config error
    that names the file and the key to change, not a shape error deep inside the first step."""
    if case.image.shape[0] != cfg.model.in_channels:
        raise ConfigError(f"{case.source}: image has {case.image.shape[0]} channel(s) but model.in_channels is "
                          f"{cfg.model.in_channels}; set model.in_channels (or the reader's channels option) to match")
    if case.label is not None:
        n = cfg.model.num_classes
        try:  # the readers' own label check, against the network's classes instead of the dataset's
            check_label_values(case.label, set(range(n)), case.source, case.meta.get("ignore_index"))
        except DataError as exc:
            raise ConfigError(f"{exc}; model.num_classes is {n} (ids 0..{n - 1}): set model.num_classes") from None


def train(cfg: Config, resume: bool = False, overwrite: bool = False, log=print,
          extra_files: dict[str, str] | None = None) -> dict:
    """Train one run; returns the final evaluation summaries (last and best on validation).

    ``extra_files`` (name -> text) are written into the run folder beside ``config.yaml`` (the plan).
    """
    threads = ThreadShare(cfg.train.num_threads, log=log, loader_workers=cfg.data.num_workers)
    threads.register()  # counted among this machine's trainings until training and evaluation end
    try:
        return _train(cfg, resume, overwrite, log, threads, extra_files or {})
    finally:
        threads.unregister()


def _train(cfg: Config, resume: bool, overwrite: bool, log, threads: ThreadShare, extra_files: dict[str, str]) -> dict:
    run_dir = cfg.run_dir()
    last = checkpoint_path(run_dir, "last")
    rank_zero = is_launch_rank_zero()
    existing = run_dir.exists() and any(run_dir.iterdir())
    if rank_zero and existing and not resume and not overwrite:
        raise SemidiffError(
            f"{run_dir}: run folder exists; pass --resume to continue it or --overwrite to start again"
        )

    threads.update()  # before the model and data are built (preflight loads every case)
    L.seed_everything(cfg.experiment.seed, workers=True, verbose=False)
    # The file-to-input preprocessing, checked against the reader (a contradicting data.normalize fails
    # here) and recorded in every checkpoint for eval, predict and export.
    prep = preprocessing_from_config(cfg, strict=True)
    module = SemidiffModule(cfg.model_dump(mode="json"), preprocessing=prep.to_dict())
    data = SemidiffData(cfg, uses_unlabeled=module.method.uses_unlabeled)
    # Config and data problems surface here, before anything is written: no half-made run folder.
    preflight_data(data)
    fresh = not existing or overwrite  # this call creates the folder (so may remove it on failure)
    if rank_zero:
        if existing and overwrite and not resume:
            shutil.rmtree(run_dir)
        if resume and not last.is_file():
            log(f"no checkpoint at {last}: starting a new run")
        check_output_dir(run_dir)
        remove_stale_temporaries(run_dir / "checkpoints")  # left by a run killed mid-save
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        for name, text in extra_files.items():
            (run_dir / name).write_text(text)
    if rank_zero:
        (run_dir / "splits.json").write_text(json.dumps(data.splits.summary(), indent=1))
    log(f"run folder: {run_dir}")
    for line in (data.reader.describe() if hasattr(data.reader, "describe") else []):
        log(f"data found: {line}")  # what the dataset folder holds and lacks (EndoScapes)
    log(f"data: {len(data.splits.labeled)} labeled, "
        f"{len(data.splits.unlabeled) if data.uses_unlabeled else 0} unlabeled used, "
        f"{len(data.splits.val)} validation cases")

    has_val = bool(data.splits.val)
    ckpt_cb = BestAndLastCheckpoint(
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
    precision = resolve_precision(cfg.train.precision, cfg.train.accelerator)
    log(f"precision: {precision}" + (" (train.precision auto)" if cfg.train.precision == "auto" else ""))
    trainer = L.Trainer(
        max_steps=cfg.train.max_steps,
        max_epochs=-1,
        accelerator=cfg.train.accelerator,
        devices=cfg.train.devices,
        num_nodes=cfg.train.num_nodes,
        precision=precision,
        deterministic=cfg.train.deterministic,
        gradient_clip_val=cfg.train.grad_clip,
        log_every_n_steps=cfg.train.log_every,
        val_check_interval=cfg.train.val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the two-stream sampler shards itself by rank
        callbacks=[ckpt_cb, threads],
        plugins=[AtomicCheckpointIO()],  # last/best/final: temporary file, then os.replace
        logger=loggers,
        enable_progress_bar=cfg.train.progress_bar,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
    )
    module.start_clock()
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(last) if resume and last.is_file() else None)
    except SIGTERMException:
        # Lightning stopped after the step in progress and BestAndLastCheckpoint saved it. Exit as a
        # process killed by SIGTERM would (128 + 15), not 0: the run has not finished.
        log(f"stopped by SIGTERM at step {trainer.global_step} of {cfg.train.max_steps}: saved in {last}; "
            f"continue with `semidiff train {run_dir} --resume`")
        raise SystemExit(128 + signal.SIGTERM) from None
    except BaseException:
        # A run that failed before its first checkpoint has nothing to resume: leave no folder.
        if rank_zero and fresh and not resume and not any((run_dir / "checkpoints").glob("*.ckpt")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    wall = module.train_seconds()  # every piece of a resumed run
    trainer.save_checkpoint(checkpoint_path(run_dir, "final"))  # collective: every rank calls it
    if not trainer.is_global_zero:
        return {}  # rank 0 alone writes timing and evaluates (once, over the whole set)
    steps_done = trainer.global_step
    timing = {"wall_seconds": round(wall, 1), "steps": steps_done, "peak_memory_mib": peak_memory_mib(),
              "precision": precision, "memory_format": str(module.memory_format or "contiguous").removeprefix("torch."),
              "threads": threads.threads}
    if module.timed_from_step:  # resumed from a checkpoint that kept no time: wall_seconds covers these steps
        timing["timed_steps"] = steps_done - module.timed_from_step
    (run_dir / "timing.json").write_text(json.dumps(timing, indent=1))
    log(f"trained {steps_done} steps in {wall:.0f} s")

    results = {}
    if has_val:
        device = module.device
        best = checkpoint_path(run_dir, "best")
        best_state = torch.load(best, map_location=device, weights_only=False) if best.is_file() else None
        # The best checkpoint is often the last one (its validation was the best so far): then one
        # evaluation serves both, and both summaries say so.
        same = best_state is not None and _same_weights(best_state["state_dict"], module.state_dict())
        for which in ("last", "best"):
            if which == "best" and (best_state is None or same):
                continue
            if which == "best":
                module.load_state_dict(best_state["state_dict"])
            label = f"last = best (step {steps_done}; evaluated once)" if same else which
            log(f"evaluating the {label} checkpoint on {cfg.data.val_split or 'held-out'} cases")
            res = evaluate(module.method, cfg, data.reader, data.splits.val, run_dir / f"eval_val_{which}",
                           split=cfg.data.val_split or "holdout", checkpoint=label, device=device, log=log)
            results[which] = res
            log(res["table"])
        if same:
            shutil.copytree(run_dir / "eval_val_last", run_dir / "eval_val_best", dirs_exist_ok=True)
            results["best"] = results["last"]
    return results


def _same_weights(a: dict, b: dict) -> bool:
    """Whether two state dicts hold identical tensors (best checkpoint = final weights)."""
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
