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
    return create_method(cfg.method.name, spec, cfg.method.options)


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

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.method.on_step_end(Progress(self.global_step, self.cfg.train.max_steps))

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

    def on_validation_epoch_end(self) -> None:
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

