"""The Lightning wrapper around a Method: optimiser, schedule, logging, validation, checkpoints."""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from semidiff.config import Config, config_from_dict
from semidiff.data.preprocessing import (
    DERIVED,
    Preprocessing,
    fill_colour_rule,
    preprocessing_from_config,
)
from semidiff.errors import SemidiffError
from semidiff.evaluation.evaluate import labels_from_probs, overlay_row, predict_image
from semidiff.evaluation.figures import overlay_figure_tensor
from semidiff.evaluation.metrics import case_metrics, summarize
from semidiff.hardware import resolve_memory_format, resolve_precision
from semidiff.methods import NetSpec, Progress, create_method
from semidiff.methods.base import all_reduce_sum

#: Key of the engine's own state in a Lightning checkpoint (skipped-step count).
CHECKPOINT_STATE_KEY = "semidiff_engine"


def build_method(cfg: Config):
    spec = NetSpec(
        name=cfg.model.net,
        in_channels=cfg.model.in_channels,
        num_classes=cfg.model.num_classes,
        spatial_dims=cfg.spatial_dims,
        options=cfg.model.net_options,
    )
    method = create_method(cfg.method.name, spec, cfg.method.options)
    method.set_pseudo_noise(cfg.noise)  # noise benchmark: a no-op unless noise.target is pseudo
    return method


def lr_factor(cfg: Config, step: int) -> float:
    """Multiplier of the base learning rate at ``step`` (linear warm-up, then the schedule)."""
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    if t.lr_schedule == "poly":
        return (1.0 - progress) ** t.poly_power
    if t.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


class SemidiffModule(L.LightningModule):
    def __init__(self, config: dict[str, Any], preprocessing: dict[str, Any] | None = None):
        super().__init__()
        cfg = config_from_dict(config, "checkpoint config")
        # A checkpoint from before preprocessing was recorded: derive it the way its training did.
        self.preprocessing = (Preprocessing.from_dict(fill_colour_rule(preprocessing, cfg)) if preprocessing is not None
                              else preprocessing_from_config(cfg, origin=DERIVED))
        # The full resolved config and the file-to-input preprocessing travel in every checkpoint:
        # eval/predict/export read them from there.
        self.save_hyperparameters({"config": config, "preprocessing": self.preprocessing.to_dict()})
        self.cfg = cfg
        self.method = build_method(self.cfg)
        self._val_records: list[dict] = []
        self._val_images: list[tuple] = []
        #: steps skipped for a non-finite loss (``train.nonfinite: skip``); checkpointed
        self.skipped_steps = 0
        self._skipping = False  # the current batch is being skipped
        #: training seconds of earlier invocations (from the checkpoint resumed), and the step from
        #: which they are known (> 0: resumed from a checkpoint made before time was kept in it)
        self.seconds_before = 0.0
        self.timed_from_step = 0
        self._clock_start: float | None = None  # perf_counter when this invocation began (train.py)
        #: channels-last (or None) for networks and batches, set per machine in :meth:`setup`
        self.memory_format: torch.memory_format | None = None

    def setup(self, stage: str) -> None:
        # Resolved on the machine that trains (train.precision / memory_format: auto), so the
        # config and checkpoints stay the same on every machine.
        t = self.cfg.train
        precision = resolve_precision(t.precision, t.accelerator)
        self.memory_format = resolve_memory_format(t.memory_format, self.cfg.spatial_dims, precision)
        if self.memory_format is not None:
            self.method.to(memory_format=self.memory_format)
        if t.compile:
            # In place: the state-dict keys (checkpoints) stay those of the uncompiled networks.
            for net in self.method.children():
                if any(True for _ in net.parameters()):
                    net.compile()

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.memory_format is not None and isinstance(batch, dict):  # training batches (not val cases)
            for stream in batch.values():
                if stream is not None:
                    stream["image"] = stream["image"].contiguous(memory_format=self.memory_format)
        return batch

    @property
    def batch_number(self) -> int:
        """Batches consumed so far: optimiser steps plus skipped steps (the sampler's position)."""
        return self.global_step + self.skipped_steps

    # ---- training -------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        # torch's RNG (dropout, noise, diffusion timesteps) is a function of (seed, step), so a
        # run resumed from any checkpoint replays exactly what an uninterrupted run would do.
        # Keyed by the batch number, not the step: equal without skips, and a batch that follows a
        # skipped one draws fresh randomness.
        self._skipping = False
        torch.manual_seed((self.cfg.experiment.seed * 1_000_003 + self.batch_number) % (2**63))
        self.method.start_pseudo_noise_step(self.batch_number)  # noise benchmark: draws keyed by step
        progress = Progress(self.global_step, self.cfg.train.max_steps)
        parts = self.method.training_step(batch["labeled"], batch["unlabeled"], progress)
        bad = [(name, value) for name, value in parts.items() if not torch.isfinite(value).all()]
        bs = batch["labeled"]["image"].shape[0]
        # The decision is all-reduced: every DDP process must skip, or stop, at the same step (a
        # process that stopped alone would leave the others waiting in the next collective).
        if self._any_rank(bool(bad)):
            if self.cfg.train.nonfinite == "skip":
                return self._skip_step(bad, bs)
            where = ", ".join(f"{name} = {_scalar_text(value)}" for name, value in bad) or "on another process"
            raise SemidiffError(
                f"non-finite loss at step {self.global_step}: {where} "
                "(lower train.lr, check the data for NaN, set train.grad_clip, or set "
                "train.nonfinite=skip to skip such steps)"
            )
        if self.cfg.train.nonfinite == "skip":
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False, batch_size=bs)
        self.log_dict({f"train/{k}": v.detach().float() for k, v in parts.items()}, on_step=True,
                      on_epoch=False, batch_size=bs)
        self.log("loss", parts["loss"].detach().float(), prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=bs, logger=False)
        return parts["loss"]

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any DDP process: all ranks must skip the same steps (collective)."""
        total = torch.tensor([float(flag)], device=self.device)
        all_reduce_sum(total)
        return bool(total.item() > 0)

    def _skip_step(self, bad: list[tuple[str, torch.Tensor]], batch_size: int) -> torch.Tensor:
        """Count a skipped step (``train.nonfinite: skip``); stop once ``train.max_skips`` is exceeded.

        Returns a zero loss that reaches every trainable parameter (Lightning refuses a None
        return under DDP, and DDP's gradient all-reduce needs every rank to run a backward);
        :meth:`optimizer_step` then makes no optimiser update, leaves out the EMA/bank/prototype
        update and takes the step back out of Lightning's step count, and
        :meth:`lr_scheduler_step` holds the schedule, so a run still makes ``train.max_steps``
        optimiser steps.
        """
        where = ", ".join(f"{name} = {_scalar_text(value)}" for name, value in bad) or "on another process"
        self.skipped_steps += 1
        self._skipping = True
        limit = self.cfg.train.max_skips
        if self.skipped_steps > limit:
            raise SemidiffError(
                f"non-finite loss at step {self.global_step}: {where}; {self.skipped_steps} steps skipped, more "
                f"than train.max_skips={limit} (lower train.lr, check the data for NaN, or set train.grad_clip)"
            )
        rank_zero_warn(f"non-finite loss at step {self.global_step}: {where}; step skipped "
                       f"({self.skipped_steps} of at most {limit})")
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False,
                 batch_size=batch_size)
        params = [p for p in self.method.parameters() if p.requires_grad]
        return torch.stack([p.sum() for p in params]).sum() * 0.0

    def _uncount_skipped_step(self) -> None:
        """Take a skipped step back out of Lightning's optimiser-step count (``trainer.global_step``).

        Lightning counts every call of the ``optimizer_step`` hook as a step, whether or not the
        optimiser updated anything (it increments 'ready' before the hook and 'completed' after it).
        Decrementing both here leaves the count unchanged by a skipped step, so ``max_steps``,
        checkpoints and schedules count real updates only.
        """
        counter = self.trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step
        for tracker in (counter.total, counter.current):
            tracker.ready -= 1
            tracker.completed -= 1

    def lr_scheduler_step(self, scheduler, metric) -> None:
        # The schedule follows optimiser steps: a skipped step does not advance it.
        if not self._skipping:
            super().lr_scheduler_step(scheduler, metric)

    def start_clock(self, started: float | None = None) -> None:
        """Count this invocation's training time from ``started`` (``time.perf_counter()``; now by default)."""
        self._clock_start = time.perf_counter() if started is None else started

    def train_seconds(self) -> float:
        """Training seconds over every invocation of this run so far (from :attr:`timed_from_step`)."""
        now = 0.0 if self._clock_start is None else time.perf_counter() - self._clock_start
        return self.seconds_before + now

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The time travels with the step, so a run resumed after SIGTERM or a kill reports the time
        # of all its pieces (up to this checkpoint), not of its last one.
        checkpoint[CHECKPOINT_STATE_KEY] = {"skipped_steps": self.skipped_steps,
                                            "train_seconds": self.train_seconds(),
                                            "timed_from_step": self.timed_from_step}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A resumed run keeps its skip count, hence its batch position (engine/data.py).
        state = checkpoint.get(CHECKPOINT_STATE_KEY) or {}
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if "train_seconds" in state:
            self.seconds_before = float(state["train_seconds"])
            self.timed_from_step = int(state.get("timed_from_step", 0))
        else:  # a checkpoint from before time was kept: only the steps from here on are timed
            self.seconds_before = 0.0
            self.timed_from_step = int(checkpoint.get("global_step", 0))

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        if self.cfg.train.nonfinite == "skip":
            # The closure (training_step, backward) runs first, so the step can be left out once
            # it is known to be skipped: no optimiser update (its zero gradients are cleared by
            # the next step's zero_grad), no EMA, bank or prototype update.
            loss = optimizer_closure()
            if self._skipping:
                self._uncount_skipped_step()
                return
            optimizer_closure = functools.partial(_already_computed, loss)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Right after the optimiser step, not in on_train_batch_end: ModelCheckpoint saves in its
        # own on_train_batch_end, which Lightning calls before the module's, so an EMA update made
        # there would be missing from a checkpoint taken at that step (inexact resume).
        # Lightning counts the step only after this hook returns; ema_update expects the count
        # including it (1 after the first step).
        # DDP: the hook runs on every rank. Gradients are all-reduced, so the students are equal
        # after every step; the teachers start equal (same seed, and DDP broadcasts rank 0's
        # parameters at wrap time), so an EMA of equal students stays equal on every rank with no
        # communication. BatchNorm running statistics are rank 0's (DDP broadcasts buffers from
        # rank 0 before each forward), and rank 0 writes the checkpoints.
        self.method.on_step_end(Progress(self.global_step + 1, self.cfg.train.max_steps))

    def configure_optimizers(self):
        t = self.cfg.train
        params = [p for p in self.method.parameters() if p.requires_grad]
        if t.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(self.cfg, step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- validation -----------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_records, self._val_images = [], []

    def validation_step(self, case, batch_idx):
        probs = predict_image(self.method.predict, self.cfg, case.image, self.device)
        pred = labels_from_probs(self.cfg, probs)
        # Not-annotated pixels (reader's meta["ignore_index"]) count in no metric, as in evaluate().
        metrics = case_metrics(pred, case.label, self.cfg.model.num_classes, empty_rule=self.cfg.eval.empty_rule,
                               ignore_index=case.meta.get("ignore_index"))
        self._val_records.append({"case_id": case.case_id, "metrics": metrics})
        if batch_idx < self.cfg.eval.overlay_cases:
            self._val_images.append(overlay_row(case, pred))

    def _gather_val_records(self) -> list[dict]:
        """Per-case records of every rank, once per case (each DDP rank validates its share).

        Every rank then summarises the same full list, so the logged metrics (and the best
        checkpoint they select) are those of the whole validation set, identical on all ranks.
        """
        records = self._val_records
        dist = torch.distributed
        if self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            shards: list = [None] * self.trainer.world_size
            dist.all_gather_object(shards, records)
            seen: set[str] = set()
            records = []
            for record in (r for shard in shards for r in shard):
                if record["case_id"] not in seen:  # unsharded (fewer cases than ranks): duplicates
                    seen.add(record["case_id"])
                    records.append(record)
        return records

    def on_validation_epoch_end(self) -> None:
        self._val_records = self._gather_val_records()  # collective: before any early return
        if not self._val_records:
            return
        summary = summarize(self._val_records, self.cfg.model.class_names)
        values = {"val/dice_mean": summary["mean"]["dice"], "val/hd95_mean": summary["mean"]["hd95"]}
        for cls, stats in summary["per_class"].items():
            values[f"val/dice_{cls}"] = stats["dice"]["mean"]
            values[f"val/pooled_dice_{cls}"] = stats["pooled"]["dice"]
        values["val/pooled_dice_mean"] = summary["pooled"]["dice"]  # no empty rule: silence scores 0
        self.log_dict({k: float(v) for k, v in values.items()}, prog_bar=False, sync_dist=False)
        self.method.on_validation(Progress(self.global_step, self.cfg.train.max_steps), float(summary["mean"]["dice"]))
        self.log("val_dice", float(summary["mean"]["dice"]), prog_bar=True, logger=False)
        for logger in self.loggers:
            writer = getattr(logger, "experiment", None)
            if self._val_images and hasattr(writer, "add_image"):
                img = overlay_figure_tensor(self._val_images, class_names=self.cfg.model.class_names)
                writer.add_image("val/overlays", img, self.global_step, dataformats="HWC")


def _already_computed(loss):
    """Stands in for Lightning's closure once it has run (the optimiser calls its closure)."""
    return loss


def _scalar_text(value: torch.Tensor) -> str:
    """A loss part for an error message: its value, or its first non-finite entry."""
    if value.numel() == 1:
        return str(value.item())
    return f"{value[~torch.isfinite(value)].flatten()[0].item()} (in a tensor of {value.numel()})"


def load_module(checkpoint: str, map_location: str | torch.device = "cpu") -> SemidiffModule:
    """Rebuild the module from a checkpoint (config included) without the training data."""
    path = Path(checkpoint)
    if not path.is_file():
        raise SemidiffError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 (corrupt or not a torch file: any unpickling error)
        raise SemidiffError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    config = (ckpt.get("hyper_parameters") or {}).get("config")
    if config is None:
        raise SemidiffError(f"{path}: checkpoint has no semidiff config (not written by semidiff train?)")
    module = SemidiffModule(config, preprocessing=ckpt["hyper_parameters"].get("preprocessing"))
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    module.checkpoint_step = int(ckpt.get("global_step", -1))
    return module

