"""The Lightning wrapper around a Method: optimiser, schedule, logging, validation, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from semidiff.config import Config, config_from_dict
from semidiff.errors import SemidiffError
from semidiff.evaluation.evaluate import labels_from_probs, overlay_row, predict_image
from semidiff.evaluation.figures import overlay_figure_tensor
from semidiff.evaluation.metrics import case_metrics, summarize
from semidiff.methods import NetSpec, Progress, create_method


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
    def __init__(self, config: dict[str, Any]):
        super().__init__()
        # The full resolved config travels in every checkpoint: eval/predict read it from there.
        self.save_hyperparameters({"config": config})
        self.cfg = config_from_dict(config, "checkpoint config")
        self.method = build_method(self.cfg)
        self._val_records: list[dict] = []
        self._val_images: list[tuple] = []

    # ---- training -------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        # torch's RNG (dropout, noise, diffusion timesteps) is a function of (seed, step), so a
        # run resumed from any checkpoint replays exactly what an uninterrupted run would do.
        torch.manual_seed((self.cfg.experiment.seed * 1_000_003 + self.global_step) % (2**63))
        self.method.start_pseudo_noise_step(self.global_step)  # noise benchmark: draws keyed by step
        progress = Progress(self.global_step, self.cfg.train.max_steps)
        parts = self.method.training_step(batch["labeled"], batch["unlabeled"], progress)
        for name, value in parts.items():
            if not torch.isfinite(value).all():
                raise SemidiffError(
                    f"non-finite loss at step {self.global_step}: {name} = {value.item()} "
                    "(lower train.lr, check the data for NaN, or set train.grad_clip)"
                )
        bs = batch["labeled"]["image"].shape[0]
        self.log_dict({f"train/{k}": v.detach().float() for k, v in parts.items()}, on_step=True,
                      on_epoch=False, batch_size=bs)
        self.log("loss", parts["loss"].detach().float(), prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=bs, logger=False)
        return parts["loss"]

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
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
        metrics = case_metrics(pred, case.label, self.cfg.model.num_classes, empty_rule=self.cfg.eval.empty_rule)
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
        self.log_dict({k: float(v) for k, v in values.items()}, prog_bar=False, sync_dist=False)
        self.log("val_dice", float(summary["mean"]["dice"]), prog_bar=True, logger=False)
        for logger in self.loggers:
            writer = getattr(logger, "experiment", None)
            if self._val_images and hasattr(writer, "add_image"):
                img = overlay_figure_tensor(self._val_images, class_names=self.cfg.model.class_names)
                writer.add_image("val/overlays", img, self.global_step, dataformats="HWC")


def load_module(checkpoint: str, map_location: str | torch.device = "cpu") -> SemidiffModule:
    """Rebuild the module from a checkpoint (config included) without the training data."""
    path = Path(checkpoint)
    if not path.is_file():
        raise SemidiffError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # corrupt or not a torch file
        raise SemidiffError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    config = (ckpt.get("hyper_parameters") or {}).get("config")
    if config is None:
        raise SemidiffError(f"{path}: checkpoint has no semidiff config (not written by semidiff train?)")
    module = SemidiffModule(config)
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    module.checkpoint_step = int(ckpt.get("global_step", -1))
    return module

