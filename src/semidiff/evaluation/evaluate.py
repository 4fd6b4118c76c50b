"""One prediction path for validation, ``semidiff eval`` and ``semidiff predict``.

Everything that decides how an image is fed to the model (training size, resampling factor,
window size and stride, intensity preprocessing) comes from the run's own config, stored in the
checkpoint, never from a default: the pitfall of resizing to a hard-coded size is impossible here.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from semidiff.config import Config
from semidiff.data.transforms import resample_to_shape, resample_volume
from semidiff.evaluation.figures import display_colour, overlay_panel, pick_slice
from semidiff.evaluation.inference import keep_largest_component, predict_case
from semidiff.evaluation.metrics import (
    case_metrics,
    format_summary_table,
    summarize,
    write_metrics,
)
from semidiff.hardware import resolve_precision
from semidiff.noise import describe_noise


def inference_mode(cfg: Config, image_spatial_dims: int) -> str:
    """How to feed an image of ``image_spatial_dims`` to the model of this config."""
    if cfg.eval.mode != "auto":
        return cfg.eval.mode
    if cfg.spatial_dims == 3:
        return "sliding_window"
    return "slicewise" if image_spatial_dims == 3 else "whole"


def default_stride(cfg: Config) -> list[int]:
    return cfg.eval.stride or [max(1, p // 2) for p in cfg.data.patch_size]


def autocast_for(cfg: Config, device: torch.device):
    precision = resolve_precision(cfg.train.precision, "cuda" if device.type == "cuda" else device.type)
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def predict_image(predict: Callable[[torch.Tensor], torch.Tensor], cfg: Config, image: np.ndarray,
                  device: torch.device | str = "cpu") -> np.ndarray:
    """Class probabilities ``(num_classes, *spatial)`` on the image's own grid.

    Args:
        predict: the method's ``predict`` (images -> probabilities).
        cfg: the run's config (training size, resampling, window, stride).
        image: ``(C, *spatial)`` float32, already intensity-normalised like the training data.
    """
    device = torch.device(device)
    factor = cfg.data.resample_factor
    x = image
    if factor != 1.0:
        x = resample_volume(image, factor, is_label=False, spatial_dims=image.ndim - 1)
    mode = inference_mode(cfg, x.ndim - 1)

    def fn(t: torch.Tensor) -> torch.Tensor:
        with autocast_for(cfg, device):
            return predict(t.to(device)).float()

    probs = predict_case(
        fn, x, mode, cfg.model.num_classes,
        patch_size=cfg.data.patch_size, stride=default_stride(cfg),
        train_size=cfg.data.patch_size, device=device,
    )
    probs = np.asarray(probs, dtype=np.float32)
    if factor != 1.0:
        # Metrics are computed on the original grid (protocols.md, LA-reduced).
        probs = resample_to_shape(probs, image.shape[1:], is_label=False)
    return probs


def labels_from_probs(cfg: Config, probs: np.ndarray) -> np.ndarray:
    label = probs.argmax(0).astype(np.uint8)
    if cfg.eval.largest_component:
        label = keep_largest_component(label)
    return label


def overlay_row(case, pred: np.ndarray) -> tuple:
    """(case id, image, truth, prediction) in 2D: volumes show their slice with most foreground.

    A 2D colour frame (3 channels, e.g. endoscopy) is kept in colour, as a small uint8 display image
    (:func:`~semidiff.evaluation.figures.display_colour`); other images show their first channel.
    """
    if case.image.ndim == 3 and case.image.shape[0] == 3:
        return case.case_id, display_colour(case.image), case.label, pred
    img = case.image[0]
    if img.ndim == 3:
        s = pick_slice(case.label)
        return case.case_id, img[s], case.label[s], pred[s]
    return case.case_id, img, case.label, pred


def protocol_header(cfg: Config, split: str, checkpoint: str, n_cases: int, mode: str,
                    output: str = "default") -> dict[str, object]:
    """What every reported number must state (protocols.md); ``output`` names the method's output used."""
    import semidiff

    return {
        "dataset": f"{cfg.data.reader}:{cfg.data.root}",
        "split": split,
        "cases": n_cases,
        "labeled": (f"{cfg.data.labeled:.0%} of the training cases ({cfg.data.labeled_rule})"
                    if cfg.data.labeled_unit == "fraction"
                    else f"{cfg.data.labeled:g} {cfg.data.labeled_unit} ({cfg.data.labeled_rule})"),
        "method": cfg.method.name,
        "output": output,
        "network": cfg.model.net,
        "budget": f"{cfg.train.max_steps} steps, batch {cfg.train.labeled_batch}+{cfg.train.unlabeled_batch}, "
                  f"patch {cfg.data.patch_size}, resample {cfg.data.resample_factor:g}",
        "checkpoint": checkpoint,
        "inference": mode + (f", patch {cfg.data.patch_size}, stride {default_stride(cfg)}" if mode == "sliding_window"
                             else f", resized to {cfg.data.patch_size} and back"),
        "post_processing": "largest connected component" if cfg.eval.largest_component else "none",
        "units": cfg.eval.units,
        "empty_rule": cfg.eval.empty_rule,
        "seed": cfg.experiment.seed,
        "noise": describe_noise(cfg.noise),
        "machine": f"{platform.machine()}{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
                   + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "semidiff": semidiff.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def cpu_model() -> str:
    """`` (CPU model)`` from /proc/cpuinfo, or "" where it cannot be read: runs of one grid may come
    from machines of one architecture that differ several times in speed, and the cost columns
    must say so."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f" ({line.split(':', 1)[1].strip()})"
    except OSError:
        pass
    return ""


@torch.no_grad()
def evaluate(method, cfg: Config, reader, refs, out_dir: str | Path, split: str, checkpoint: str,
             device: torch.device | str = "cpu", log: Callable[[str], None] = print,
             output: str | None = None, on_prediction: Callable | None = None) -> dict:
    """Predict every case of ``refs``, compute metrics, write CSV/JSON/figure; return the summary.

    ``output`` names one of ``method.outputs`` (e.g. Diff-CL's ``cs``, ``ds``, ``mean``); None uses
    the method's default output. ``on_prediction(case, labels)``, when given, sees every case's
    predicted labels (``semidiff predict`` is checked against them voxel for voxel).
    """
    predict = method.predictor(output)
    output_name = output or method.default_output
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    method.eval()
    records, panel_rows, modes = [], [], set()
    start = time.perf_counter()
    for i, ref in enumerate(refs):
        case = reader.load(ref)
        modes.add(inference_mode(cfg, case.image.ndim - 1))
        t0 = time.perf_counter()
        probs = predict_image(predict, cfg, case.image, device)
        pred = labels_from_probs(cfg, probs)
        if on_prediction is not None:
            on_prediction(case, pred)
        spacing = case.spacing if cfg.eval.units == "mm" else None
        if cfg.eval.units == "mm" and spacing is None:
            from semidiff.errors import ConfigError

            raise ConfigError(f"eval.units=mm but {case.source} stores no spacing; use eval.units=voxels")
        # Readers mark unannotated pixels (MOSXAV test "others") with meta["ignore_index"].
        metrics = case_metrics(pred, case.label, cfg.model.num_classes, spacing=spacing, empty_rule=cfg.eval.empty_rule,
                               ignore_index=case.meta.get("ignore_index"))
        records.append({"case_id": case.case_id, "metrics": metrics, "seconds": time.perf_counter() - t0})
        if i < cfg.eval.overlay_cases:
            panel_rows.append(overlay_row(case, pred))
        log(f"  [{i + 1}/{len(refs)}] {case.case_id}: mean Dice "
            f"{np.mean([m['dice'] for m in metrics.values()]):.4f}")
    summary = summarize(records, cfg.model.class_names)
    protocol = protocol_header(cfg, split, checkpoint, len(refs), " + ".join(sorted(modes)) or "none", output_name)
    if method.eval_options:  # e.g. DDIM steps: they change the numbers, so the header states them
        protocol["prediction_options"] = method.prediction_options(output_name)
    protocol["inference_seconds_per_case"] = round((time.perf_counter() - start) / max(1, len(refs)), 3)
    write_metrics(records, summary, out_dir, protocol)
    if panel_rows:
        # The raw slices too, so `semidiff report` can put several methods side by side on the same cases.
        np.savez_compressed(out_dir / "overlay_slices.npz", **{
            f"{kind}/{cid}": arr for cid, img, truth, pred in panel_rows
            for kind, arr in (("image", img), ("truth", truth), ("pred", pred))})
        overlay_panel(panel_rows, out_dir / "overlays.png", class_names=cfg.model.class_names,
                      title=f"{cfg.method.name}{'' if output_name == 'default' else f' [{output_name}]'} "
                            f"({checkpoint} checkpoint), {split}")
    table = format_summary_table(summary)
    (out_dir / "summary.md").write_text(
        "\n".join(f"- {k}: {v}" for k, v in protocol.items()) + "\n\n" + table + "\n"
    )
    with open(out_dir / "protocol.json", "w") as f:
        json.dump(protocol, f, indent=2)
    return {"summary": summary, "protocol": protocol, "table": table}
