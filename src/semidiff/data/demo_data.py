"""The demo's synthetic task: a few clean labeled images, many varied unlabeled ones, validation like them.

Why semi-supervision can help here, for the reason it helps in a hospital: the few labeled images
come from one narrow acquisition regime (high contrast, little noise, a weak bias field, mid-sized
structures), while the unlabeled images, and the validation images drawn the same way, cover the
variation the labeled ones miss: lower contrast, stronger noise and bias field, more blur, smaller
and larger structures. A model trained on the labeled images alone sees none of that; a
semi-supervised method sees it in the unlabeled images, without their labels.

Every case is a :func:`~semidiff.data.synthetic.synthetic_case` (organ, ring, vessel tree) with an
:class:`~semidiff.data.synthetic.Appearance` drawn per case from its regime (:data:`LABELED_REGIME`
or :data:`VARIED_REGIME`). Case ``i`` is generated from ``numpy.random.default_rng([seed, i])`` and
its appearance from ``default_rng([seed, i, 1])``, so the dataset is a pure function of its
arguments.

Layout (the synthetic reader's, :func:`~semidiff.data.synthetic.open_synthetic`)::

    <root>/cases/<id>.h5   image float32 (H, W), label uint8
    <root>/train.list      the labeled ids first, then the unlabeled ones
    <root>/val.list        the validation ids
    <root>/dataset.json    the synthetic reader's keys, plus "demo": counts, regimes, seed

A run labels the first ``labeled`` ids of ``train.list`` (``data.labeled: <labeled>``,
``labeled_unit: cases``, ``labeled_rule: first``); the unlabeled ones lose their masks in the data
pipeline before any method sees them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np

from semidiff.data.synthetic import (
    SYNTHETIC_PATH_PATTERN,
    Appearance,
    _class_names,
    synthetic_case,
)
from semidiff.errors import ConfigError

__all__ = ["DEMO_CLASSES", "LABELED_REGIME", "VARIED_REGIME", "demo_appearance", "make_demo_dataset"]

DEMO_CLASSES = 4  # background, organ, ring, vessel
# Each regime maps an Appearance field to the (low, high) of a uniform draw per case.
LABELED_REGIME: dict[str, tuple[float, float]] = {
    "contrast": (1.0, 1.0),
    "texture": (0.1, 0.1),
    "blur": (0.7, 0.7),
    "bias": (0.05, 0.1),
    "noise": (0.08, 0.12),
    "size": (0.9, 1.1),
}
VARIED_REGIME: dict[str, tuple[float, float]] = {
    "contrast": (0.8, 1.0),
    "texture": (0.15, 0.25),
    "blur": (0.7, 0.9),
    "bias": (0.15, 0.35),
    "noise": (0.12, 0.25),
    "size": (0.7, 1.3),
}


def demo_appearance(regime: dict[str, tuple[float, float]], rng: np.random.Generator) -> Appearance:
    """One case's appearance: each field uniform in its regime's range (in field order)."""
    return Appearance(**{name: float(rng.uniform(lo, hi)) for name, (lo, hi) in regime.items()})


def make_demo_dataset(
    root: str | Path,
    labeled: int = 4,
    unlabeled: int = 40,
    val: int = 12,
    size: Sequence[int] = (64, 64),
    seed: int = 0,
) -> Path:
    """Write the demo task (module docstring), deterministically from ``seed``.

    Args:
        root: output folder (created; existing case files are overwritten).
        labeled: labeled cases, from :data:`LABELED_REGIME`; ids ``lab_000``...
        unlabeled: unlabeled cases, from :data:`VARIED_REGIME`; ids ``unl_000``...
        val: validation cases, from :data:`VARIED_REGIME`; ids ``val_000``...
        size: 2D image size.
        seed: the dataset's seed; every case has its own generator (module docstring).

    Returns:
        ``root`` as a Path; read it with ``create_reader("synthetic", root)``.

    Raises:
        ConfigError: a count below 1 or a bad size.
    """
    for name, n in (("labeled", labeled), ("unlabeled", unlabeled), ("val", val)):
        if int(n) != n or n < 1:
            raise ConfigError(f"demo dataset: {name} must be a whole number >= 1, got {n!r}")
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 16:
        raise ConfigError(f"demo dataset: size must have 2 axes of at least 16, got {size}")
    root = Path(root)
    (root / "cases").mkdir(parents=True, exist_ok=True)
    groups = [("lab", labeled, LABELED_REGIME), ("unl", unlabeled, VARIED_REGIME), ("val", val, VARIED_REGIME)]
    ids: dict[str, list[str]] = {}
    appearances: dict[str, dict] = {}
    i = 0  # running case number: every case of the dataset has its own generator
    for prefix, count, regime in groups:
        ids[prefix] = []
        for k in range(count):
            case_id = f"{prefix}_{k:03d}"
            look = demo_appearance(regime, np.random.default_rng([seed, i, 1]))
            image, label = synthetic_case(np.random.default_rng([seed, i]), size, DEMO_CLASSES, look)
            with h5py.File(root / SYNTHETIC_PATH_PATTERN.format(id=case_id), "w") as f:
                f.create_dataset("image", data=image)
                f.create_dataset("label", data=label)
            ids[prefix].append(case_id)
            appearances[case_id] = {key: round(v, 4) for key, v in asdict(look).items()}
            i += 1
    (root / "train.list").write_text("\n".join(ids["lab"] + ids["unl"]) + "\n")
    (root / "val.list").write_text("\n".join(ids["val"]) + "\n")
    info = {
        "name": "synthetic_demo",
        "spatial_dims": 2,
        "num_classes": DEMO_CLASSES,
        "labels": {name: k for k, name in enumerate(_class_names(DEMO_CLASSES))},
        "path_pattern": SYNTHETIC_PATH_PATTERN,
        "lists": {"train": "train.list", "val": "val.list"},
        "size": list(size),
        "num_cases": labeled + unlabeled + val,
        "val_cases": val,
        "seed": seed,
        "demo": {
            "labeled": labeled,
            "unlabeled": unlabeled,
            "val": val,
            "labeled_regime": {k: list(v) for k, v in LABELED_REGIME.items()},
            "unlabeled_and_val_regime": {k: list(v) for k, v in VARIED_REGIME.items()},
            "appearance": appearances,
        },
    }
    (root / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return root
