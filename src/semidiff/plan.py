"""``semidiff plan``: from a dataset's fingerprint to a complete, commented training config.

Each decision is one small rule below, written so that it reproduces the hand-written configs on
the data they were written for (ACDC: 2D slices of median 256x216; LA: 3D crops of median
88x143x193 voxels) and documented in ``docs/own_data.md``. A rule returns its value and the
reason, which the printed plan and the config's comments repeat.

Budgets:

- ``reduced``: runs on 2 CPU cores (the ``configs/*/*_reduced.yaml`` budgets);
- ``full``: the literature's GPU budget (``configs/*/*_full.yaml``).
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from semidiff.data.fingerprint import Fingerprint, fingerprint_dataset
from semidiff.errors import ConfigError

__all__ = ["BUDGETS", "Plan", "make_plan", "normalization_rule", "patch_2d", "patch_3d", "plan_dataset",
           "render_config"]

BUDGETS = ("reduced", "full")
#: 2D: the training size's shorter side (ACDC reduced 128x128, ACDC/EndoScapes full 256).
SIDE_2D = {"reduced": 128, "full": 256}
#: 2D: images whose sides differ by less than this ratio are trained square (ACDC 256x216 -> 128x128).
SQUARE_BELOW = 1.25
#: 3D: voxels of the full patch (LA full 112x112x80) and of the reduced patch (LA reduced 56x56x40).
VOXELS_3D = {"full": 112 * 112 * 80, "reduced": 56 * 56 * 40}
#: Schedules of the hand-written configs (steps, validation interval, optimiser), per budget and dims.
SCHEDULE = {
    ("reduced", 2): {"max_steps": 2500, "val_every": 500},
    ("reduced", 3): {"max_steps": 1000, "val_every": 500},
    ("full", 2): {"max_steps": 30000, "val_every": 200},
    ("full", 3): {"max_steps": 15000, "val_every": 1000},
}
OPTIMIZER = {
    "reduced": {"optimizer": "adamw", "lr": 0.003, "weight_decay": 0.0001, "lr_schedule": "poly"},
    "full": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0001, "lr_schedule": "poly"},
}
#: Labeled + unlabeled items per step (ACDC reduced 4+4, full 12+12; LA 2+2 in both budgets).
BATCH = {("reduced", 2): 4, ("reduced", 3): 2, ("full", 2): 12, ("full", 3): 2}
#: Method options of the hand-written configs (tests/test_plan.py checks they still agree).
_DIFFCL = {"peer": "ds", "use_hfm": True, "hfm_gate": "residual", "use_contrast": True, "timesteps": 1000, "schedule": "linear_beta",
           "pl_steps": 2, "test_steps": 10, "hfm_levels": [3], "hfm_radius": 0.25, "hfm_dim": 32,
           "bank_size": 256, "tau": 0.1, "contrast_voxels": 4096, "mu1": 1.0, "mu2": 1.0, "eta": 0.1,
           "rampup_fraction": 0.4, "test_output": "cs"}
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "supervised": {},
    "mean_teacher": {"consistency": 0.1, "rampup_fraction": 0.4, "ema_decay": 0.99, "noise_std": 0.1,
                     "noise_clip": 0.2},
    "ua_mt": {"consistency": 0.1, "rampup_fraction": 0.4, "ema_decay": 0.99, "mc_passes": 8, "threshold_start": 0.75},
    "cps": {"cps_weight": 0.1, "rampup_fraction": 0.4, "pseudo_loss": "ce", "include_labeled": False},
    "bcp": {"pretrain_steps": 0.2, "u_weight": 0.5, "ema_decay": 0.99, "largest_component": True},
    "diffcl": _DIFFCL,
    "protodiff": {"label_scale": 0.01, "schedule": "cosine", "sampling_steps": 3, "pseudo_label_steps": None,
                  "ema_decay": 0.99, "confidence_threshold": 0.95, "lambda_u": 1.0, "lambda_p": 0.1,
                  "warmup": 0.1, "prototype_loss": "both", "prototype_momentum": 0.99, "temperature": 0.1},
}
#: The full budget's Diff-CL keeps HFM on two skip levels at full width (the GPU's).
FULL_DIFFCL = {**{k: v for k, v in _DIFFCL.items() if k != "hfm_dim"}, "hfm_levels": [2, 3], "hfm_backend": "auto"}
PROTODIFF_NET = {"features": [16, 32, 64, 128, 256], "feature_stride": 4, "decoder_skips": True, "latent_blocks": 2}
#: nnU-Net's normalisation names, when dataset.json's channel names are one of them.
NNUNET_SCHEMES = {"zscore": "zscore", "rescale_to_0_1": "minmax", "rgb_to_0_1": "rgb_to_0_1", "nonorm": "none",
                  "ct": "zscore"}
#: The default method when the dataset has unlabeled images: above supervised with 3 and 7 ACDC
#: patients on the 1000-step bench (benchmarks/results/acdc_bench_1000steps) and the cheapest to run.
DEFAULT_SEMI = "mean_teacher"
#: Above this the training cache (every case as float32) is not held in memory.
CACHE_LIMIT_BYTES = 4 * 2**30
#: Warnings: fewer labeled cases than this; spacing anisotropy above this (nnU-Net's threshold).
FEW_LABELED = 5
ANISOTROPY = 3.0


def _round(v: float, step: int) -> int:
    return max(step, round(v / step) * step)


def patch_2d(median_shape: tuple[int, int], budget: str) -> list[int]:
    """2D training size (images are resized to it, not cropped).

    Near-square images (sides differ by less than ``SQUARE_BELOW``) are trained square, with side
    ``SIDE_2D[budget]`` (128 reduced, 256 full) or the images' longer side when that is smaller
    (ACDC 256x216: 128x128 and 256x256). Other images keep their median aspect: the shorter side is
    ``SIDE_2D[budget]`` or the images' own when smaller (EndoScapes 480x854, full: 256x448). Sides
    are multiples of 16 (the U-Net halves the size four times).
    """
    h, w = median_shape
    short, long_ = min(h, w), max(h, w)
    aspect = long_ / short
    if aspect < SQUARE_BELOW:
        side = min(SIDE_2D[budget], math.ceil(long_ / 16) * 16)
        return [side, side]
    side = min(SIDE_2D[budget], math.ceil(short / 16) * 16)
    other = _round(side * aspect, 16)
    return [side, other] if h <= w else [other, side]


def patch_3d(median_shape: tuple[int, ...], budget: str) -> tuple[list[int], float]:
    """3D patch (random crops) and resampling factor.

    Full: the median shape rounded down to multiples of 16 (at least 16), its largest axis shrunk
    by 16 until the patch holds at most ``VOXELS_3D["full"]`` voxels (LA: 88x143x193 ->
    80x112x112). Reduced: the volumes are resampled by the factor that brings that full patch to
    ``VOXELS_3D["reduced"]`` voxels (cube root, rounded down to a multiple of 0.05), so the
    reduced patch covers the same field at a coarser grid (LA: 0.5 and 40x56x56); axes rounded to
    multiples of 8. Data already within the reduced size keep factor 1 and the full patch.
    """
    patch = [max(16, int(s) // 16 * 16) for s in median_shape]
    while math.prod(patch) > VOXELS_3D["full"] and max(patch) > 16:
        i = max(range(len(patch)), key=lambda a: (patch[a], a))
        patch[i] -= 16
    if budget == "full" or math.prod(patch) <= VOXELS_3D["reduced"]:
        return patch, 1.0
    factor = math.floor(round((VOXELS_3D["reduced"] / math.prod(patch)) ** (1 / 3), 6) * 20) / 20
    factor = max(0.05, factor)
    return [_round(p * factor, 8) for p in patch], factor


def normalization_rule(fp: Fingerprint) -> tuple[str, str]:
    """The reader's on-load normalisation and why (per image and channel; :data:`NNUNET_SCHEMES`)."""
    names = [n.casefold() for n in fp.channel_names]
    if all(n in NNUNET_SCHEMES for n in names) and len({NNUNET_SCHEMES[n] for n in names}) == 1:
        mode = NNUNET_SCHEMES[names[0]]
        why = f"dataset.json names nnU-Net's scheme {fp.channel_names[0]!r}"
        if names[0] == "ct":
            why += ("; nnU-Net clips CT to the dataset's foreground percentiles, semidiff z-scores each "
                    "image (no dataset-wide CT scheme yet)")
        return mode, why
    if fp.in_channels == 3 and all(c.eight_bit for c in fp.channels):
        return "rgb_to_0_1", ("8-bit colour: one scale (/255) for all channels keeps the colour balance "
                              "that per-channel z-score or min-max would change")
    if fp.spatial_dims == 2 and fp.in_channels == 1:
        core = fp.channels[0].core_share
        if core >= 0.5:
            return "minmax", (f"2D grey images: each scaled to [0, 1] by its own range, as the ACDC "
                              f"slices (99% of the voxels span {core:.0%} of the range)")
        return "zscore", (f"2D grey images with outliers: 99% of the voxels span only {core:.0%} of the "
                          "range, which min-max would squeeze; z-score per image")
    return "zscore", ("z-score per image and channel: nnU-Net's default for MR and multi-channel data, "
                      "as the LA volumes")


def method_rule(requested: str | None, fp: Fingerprint) -> tuple[str, str]:
    """The method, and why; a semi-supervised method without unlabeled images is refused.

    Raises:
        ConfigError: unknown method, or a semi-supervised one on a dataset without unlabeled images.
    """
    from semidiff.methods import list_methods, method_class

    if requested is None:
        if fp.unlabeled:
            return DEFAULT_SEMI, (f"default with unlabeled images ({fp.unlabeled}): above supervised on the ACDC "
                                  "bench with 3 and 7 patients, and the cheapest semi-supervised method")
        return "supervised", "default without unlabeled images (no imagesUnlabeled/ folder or an empty one)"
    if requested not in list_methods():
        raise ConfigError(f"--method {requested!r}: unknown; known methods: {', '.join(list_methods())}")
    if method_class(requested).uses_unlabeled and not fp.unlabeled:
        raise ConfigError(f"{fp.root}: --method {requested} is semi-supervised but the dataset has no unlabeled "
                          "images; put them in imagesUnlabeled/<case>_0000" + fp.file_ending +
                          ", or plan --method supervised")
    return requested, "requested"


def validation_rule(fp: Fingerprint) -> tuple[float, str]:
    """Fraction of the labeled cases held out for validation (the best checkpoint is chosen on it)."""
    if fp.labeled < 2:
        return 0.0, "one labeled case: nothing can be held out; no validation, the last checkpoint is the model"
    n = max(1, round(0.2 * fp.labeled))
    return 0.2, f"20% of the labeled cases ({n} of {fp.labeled}), seeded, as nnU-Net's first fold"


def network_rule(fp: Fingerprint, method: str) -> tuple[str, dict[str, Any], str]:
    if method == "protodiff":
        return "protodiff_net", dict(PROTODIFF_NET), "ProtoDiff builds its own segmenter (encoder, label latent, decoder)"
    if fp.spatial_dims == 2:
        return "unet2d", {}, "2D: the SSL4MIS U-Net of the ACDC configs"
    options = {"has_dropout": True} if method == "ua_mt" else {}
    return "vnet", options, "3D: the 16-filter V-Net of the LA configs" + (" (dropout for UA-MT's uncertainty)"
                                                                             if options else "")


def warnings_rule(fp: Fingerprint, resample: float) -> list[str]:
    """What is unusual in the data, in words."""
    out = []
    if fp.labeled < FEW_LABELED:
        out.append(f"very few labeled cases ({fp.labeled}): validation on so few cases is noisy, and a "
                   "semi-supervised method has little to start from")
    if fp.spatial_dims == 3 and fp.anisotropy > ANISOTROPY:
        sp = "x".join(f"{v:g}" for v in fp.median_spacing or ())
        out.append(f"extreme anisotropy: median spacing {sp} (ratio {fp.anisotropy:.1f} > {ANISOTROPY:g}); the "
                   "3D patch is chosen in voxels and " + (f"the resampling by {resample:g} thins the coarse axis "
                                                          "too; " if resample < 1 else "")
                   + "nnU-Net would also train a 2D model on slices")
    if len(fp.spacings) > 1:
        lo, hi = min(min(s) for s in fp.spacings), max(max(s) for s in fp.spacings)
        per_axis = [max(s[a] for s in fp.spacings) / min(s[a] for s in fp.spacings) for a in range(len(fp.spacings[0]))]
        if max(per_axis) > 1.25:
            out.append(f"voxel spacings differ between cases (from {lo:g} to {hi:g} mm): training uses each "
                       "case's own grid, it does not resample cases to one spacing")
    for c, ids in sorted(fp.missing.items()):
        if c == 0:
            continue
        name = fp.class_names[c]
        if len(ids) == fp.labeled:
            out.append(f"class {c} ({name}) appears in no label map: the network cannot learn it")
        else:
            shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
            out.append(f"class {c} ({name}) is missing from {len(ids)} of {fp.labeled} labeled cases ({shown})")
    if fp.unlabeled and fp.unlabeled < fp.labeled:
        out.append(f"fewer unlabeled ({fp.unlabeled}) than labeled ({fp.labeled}) cases: little for a "
                   "semi-supervised method to add")
    return out


@dataclass
class Plan:
    """A planned config (``tree``), the reasons per key, and the warnings."""

    fingerprint: Fingerprint
    budget: str
    tree: dict[str, Any]
    why: dict[str, str] = field(default_factory=dict)  # dotted key -> reason
    warnings: list[str] = field(default_factory=list)

    def format(self) -> str:
        """The printed plan: what was measured, what was decided and why, what is unusual."""
        lines = self.fingerprint.summary()
        lines.append(f"plan ({self.budget} budget):")
        for key, reason in self.why.items():
            section, _, name = key.partition(".")
            value = self.tree[section][name] if name else self.tree[section]
            lines.append(f"  {key} = {_flow(value)}: {reason}")
        if self.warnings:
            lines.append(f"{len(self.warnings)} warning(s):")
            lines += [f"  - {w}" for w in self.warnings]
        return "\n".join(lines)


def make_plan(fp: Fingerprint, method: str | None = None, budget: str = "reduced", colour_to_grey: bool = False,
              name: str | None = None) -> Plan:
    """Apply every rule to a fingerprint.

    Raises:
        ConfigError: unknown budget or method, or a semi-supervised method without unlabeled images.
    """
    if budget not in BUDGETS:
        raise ConfigError(f"--budget {budget!r}: one of {', '.join(BUDGETS)}")
    method, method_why = method_rule(method, fp)
    from semidiff.methods import method_class

    semi = method_class(method).uses_unlabeled
    dims = fp.spatial_dims
    shape = "x".join(map(str, fp.median_shape))
    if dims == 2:
        patch, resample = patch_2d(fp.median_shape, budget), 1.0
        patch_why = (f"median image {shape}: square with side {SIDE_2D[budget]} (or the longer side when smaller) "
                     f"when the sides differ by less than {SQUARE_BELOW}x, else shorter side {SIDE_2D[budget]} and "
                     "the aspect kept; multiples of 16; images are resized to it")
    else:
        patch, resample = patch_3d(fp.median_shape, budget)
        patch_why = (f"median volume {shape} (z, y, x): multiples of 16 within {VOXELS_3D['full']} voxels"
                     + (f", resampled to about {VOXELS_3D['reduced']}" if resample < 1 else ""))
    norm, norm_why = normalization_rule(fp)
    val_fraction, val_why = validation_rule(fp)
    net, net_options, net_why = network_rule(fp, method)
    lab = BATCH[(budget, dims)]
    sched = {**SCHEDULE[(budget, dims)], **OPTIMIZER[budget]}
    options = FULL_DIFFCL if (method == "diffcl" and budget == "full") else METHOD_OPTIONS.get(method, {})
    reader_options: dict[str, Any] = {"normalize": norm, "val_fraction": val_fraction}
    if colour_to_grey:
        reader_options["colour_to_grey"] = True
    cache = fp.cache_bytes * resample ** dims <= CACHE_LIMIT_BYTES
    dataset = Path(fp.root).name
    tree: dict[str, Any] = {
        "experiment": {"name": name or f"{dataset}_{method}_{budget}", "output_dir": "runs", "seed": 0},
        "data": {"reader": "nnunet", "root": fp.root, "reader_options": reader_options, "train_split": "train",
                 "val_split": "val" if val_fraction > 0 else None, "test_split": "test" if fp.test else None,
                 "labeled": 1.0, "labeled_unit": "fraction", "patch_size": patch, "resample_factor": resample,
                 "normalize": "none", "volume_axes": "zyx", "num_workers": 0 if budget == "reduced" else 4,
                 "cache": cache},
        "model": {"net": net, "net_options": net_options, "in_channels": fp.in_channels,
                  "num_classes": fp.num_classes, "class_names": fp.class_names},
        "method": {"name": method, "options": dict(options)},
        "train": {**sched, "labeled_batch": lab, "unlabeled_batch": lab if semi else 0,
                  "precision": "auto" if (budget, dims) == ("reduced", 2) else "32",
                  "accelerator": "cpu" if budget == "reduced" else "auto"},
        "eval": {"stride": [max(1, p // 2) for p in patch] if dims == 3 else None, "empty_rule": "strict",
                 "units": "voxels"},
    }
    why = {
        "data.patch_size": patch_why,
        **({"data.resample_factor": "the reduced patch covers the full patch's field on a coarser grid"}
           if resample < 1 else {}),
        "data.reader_options": f"normalize {norm}: {norm_why}; val_fraction {val_fraction:g}: {val_why}",
        "data.labeled": "every case of imagesTr/labelsTr is labeled; unlabeled images come from imagesUnlabeled/",
        "data.cache": (f"all cases take {fp.cache_bytes * resample ** dims / 2**30:.2g} GiB as float32: "
                       + ("held in memory" if cache else f"over {CACHE_LIMIT_BYTES / 2**30:g} GiB, read on demand")),
        "model.net": net_why,
        "model.in_channels": f"dataset.json declares {fp.in_channels}: {', '.join(fp.channel_names)}"
                             + ("; colour images converted to grey (--colour-to-grey)" if colour_to_grey else ""),
        "method.name": method_why,
        "train.labeled_batch": (f"{lab} labeled" + (f" + {lab} unlabeled" if semi else "") + " per step, as the "
                                + ("ACDC" if dims == 2 else "LA") + f" {budget} configs"),
        "train.max_steps": (f"{sched['max_steps']} steps, validation every {sched['val_every']}, "
                            f"{sched['optimizer']} lr {sched['lr']:g} poly: the {('ACDC' if dims == 2 else 'LA')} "
                            f"{budget} schedule"),
        "train.precision": ("auto: bf16 on CPUs with native bf16, as the ACDC reduced configs"
                            if (budget, dims) == ("reduced", 2) else "fp32, as the hand-written configs"),
    }
    if dims == 3:
        why["eval.stride"] = "half the patch (nnU-Net's tile step 0.5); the LA literature uses a denser 18x18x4"
    return Plan(fp, budget, tree, why, warnings_rule(fp, resample))


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip().removesuffix(
        "...").strip()


def render_config(plan: Plan) -> str:
    """The config as YAML: the fingerprint and warnings on top, each planned key after its reason."""
    head = ["# Planned by `semidiff plan` (rules: docs/own_data.md); `semidiff train THIS_FILE` trains it.",
            f"# Budget: {plan.budget}. Measured:"]
    head += [f"#   {line.strip()}" for line in plan.fingerprint.summary()]
    head += [f"# WARNING: {w}" for w in plan.warnings]
    body = []
    for section, values in plan.tree.items():
        body.append(f"{section}:")
        for key, value in values.items():
            reason = plan.why.get(f"{section}.{key}")
            if reason:
                body += [f"  # {line}" for line in textwrap.wrap(reason, 96)]
            body.append(f"  {key}: {_flow(value)}")
    return "\n".join(head + body) + "\n"


def plan_dataset(root: str | Path, method: str | None = None, budget: str = "reduced",
                 colour_to_grey: bool = False) -> Plan:
    """Fingerprint an nnU-Net-layout dataset and plan its config.

    Raises:
        DataError: naming the file, a case the reader refuses.
        ConfigError: see :func:`make_plan`.
    """
    if budget not in BUDGETS:
        raise ConfigError(f"--budget {budget!r}: one of {', '.join(BUDGETS)}")
    return make_plan(fingerprint_dataset(root, colour_to_grey=colour_to_grey), method, budget, colour_to_grey)
