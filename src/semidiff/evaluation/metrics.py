"""Segmentation metrics (Dice, Jaccard, HD95, ASD, ASSD), their summary and their report files.

The surface and distance definitions follow ``medpy.metric.binary`` exactly (checked against medpy in
``tests/test_metrics.py``), but only scipy is used here, so medpy stays a test-only dependency:

* surface of a mask ``M``: ``M XOR binary_erosion(M, generate_binary_structure(ndim, 1))``, with
  everything outside the image counted as background (so a mask touching the border has a surface
  there);
* directed distances ``d(P -> R)``: for every surface voxel of ``P``, the Euclidean distance (scaled
  by the spacing) to the nearest surface voxel of ``R``;
* ``hd95``: 95th percentile (numpy's linear interpolation) of ``d(P -> R)`` and ``d(R -> P)`` pooled;
* ``asd``: mean of ``d(P -> R)`` only, prediction to reference (medpy's one-way ``asd``, the value the
  literature reports as "ASD");
* ``assd``: mean of ``d(P -> R)`` and ``d(R -> P)`` pooled (medpy 0.5's ``assd``).

Next to these per-case means, :func:`summarize` reports **pooled** Dice and Jaccard (IoU) per class:
the voxel counts of every case added before dividing, ``2 sum|P & R| / (sum|P| + sum|R|)``, as
semantic-segmentation benchmarks compute mIoU over a dataset. No empty rule enters them, so on 2D
frames where a class is often absent they cannot reward a network for never predicting it (a class
never predicted pools to 0), which the strict per-case mean does (Dice 1 on every frame without it).

Distances are in voxels when no spacing is given, else in the spacing's units (mm).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from semidiff.errors import ConfigError

__all__ = [
    "COUNT_NAMES",
    "METRIC_NAMES",
    "EmptyRule",
    "binary_metrics",
    "case_metrics",
    "format_summary_table",
    "parse_empty_rule",
    "summarize",
    "write_metrics",
]

#: Metrics computed for every foreground class, in report order.
METRIC_NAMES: tuple[str, ...] = ("dice", "jaccard", "hd95", "asd", "assd")

# Columns that flag emptiness; stored as 0.0/1.0 next to the metrics so a record stays a flat
# ``dict[str, float]`` that writes straight to CSV.
_FLAG_NAMES: tuple[str, ...] = ("pred_empty", "ref_empty")

#: Voxel counts per case and class, the sums behind the pooled Dice and Jaccard: ``|P & R|``, ``|P|``, ``|R|``.
COUNT_NAMES: tuple[str, ...] = ("intersection", "pred_voxels", "ref_voxels")


class EmptyRule(str, Enum):
    """How a class is scored when the prediction or the reference (or both) is empty.

    Attributes:
        STRICT: the project's default (protocols.md). Both empty: Dice 1, Jaccard 1, every distance 0.
            Exactly one empty: Dice 0, Jaccard 0, HD95/ASD/ASSD = the image diagonal
            ``sqrt(sum((shape * spacing) ** 2))`` (in voxels when spacing is None). Nothing is NaN,
            nothing is dropped, and ``summarize`` counts the one-empty cases.
        LITERATURE: the SSL4MIS/medpy convention. Metrics come from medpy's definitions only when
            both masks are non-empty; as soon as either is empty (both included) every metric is 0
            (Dice 0, Jaccard 0, HD95/ASD/ASSD 0). This is exactly SSL4MIS ``cal_metric`` (3D) and
            what its 2D ``calculate_metric_percase`` (``if pred.sum() > 0: medpy ... else: return 0, 0``)
            returns for every case it does not crash on: an empty prediction scores Dice 0 *and*
            HD95 0, even when the reference is empty too; a non-empty prediction with an empty
            reference makes medpy raise there, and is scored 0 everywhere here.
    """

    STRICT = "strict"
    LITERATURE = "literature"


def parse_empty_rule(value: str | EmptyRule) -> EmptyRule:
    """Return the :class:`EmptyRule` named by ``value``.

    Raises:
        ConfigError: ``value`` is not one of ``"strict"``, ``"literature"``.
    """
    try:
        return EmptyRule(value)
    except ValueError:
        choices = ", ".join(repr(r.value) for r in EmptyRule)
        raise ConfigError(f"empty_rule: unknown value {value!r} (choose one of {choices})") from None


def _spacing_array(spacing: Sequence[float] | None, ndim: int) -> np.ndarray | None:
    if spacing is None:
        return None
    arr = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, ndim)
    if arr.size != ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {arr.size} values for a {ndim}-D mask")
    if np.any(arr <= 0):
        raise ValueError(f"spacing must be positive, got {tuple(spacing)}")
    return arr


def _diagonal(shape: Sequence[int], spacing: np.ndarray | None) -> float:
    extent = np.asarray(shape, dtype=np.float64)
    if spacing is not None:
        extent = extent * spacing
    return float(math.sqrt(float(np.sum(extent**2))))


def _crop_to_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus one voxel.

    Exact for the surface distances: the margin keeps the erosion identical (outside the box is
    background either way, inside or outside the image), and every surface voxel, hence every
    zero of the distance transform, lies inside the box. It only saves time on large volumes.
    """
    coords = np.nonzero(pred | ref)
    box = tuple(
        slice(max(int(c.min()) - 1, 0), min(int(c.max()) + 2, n)) for c, n in zip(coords, pred.shape)
    )
    return pred[box], ref[box]


def _directed_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Surface distances ``pred -> ref`` and ``ref -> pred`` (both masks non-empty)."""
    pred, ref = _crop_to_union(pred, ref)
    footprint = ndimage.generate_binary_structure(pred.ndim, 1)
    pred_surface = pred ^ ndimage.binary_erosion(pred, structure=footprint, iterations=1)
    ref_surface = ref ^ ndimage.binary_erosion(ref, structure=footprint, iterations=1)
    # The EDT measures distance to the nearest zero, so the surface must be the zeros.
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[ref_surface]
    return to_ref, to_pred


def binary_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] | None = None,
    empty_rule: str | EmptyRule = "strict",
) -> dict[str, float]:
    """Dice, Jaccard, HD95, ASD and ASSD of one binary prediction against its reference.

    On non-empty masks the values equal medpy's ``dc``, ``jc``, ``hd95``, ``asd`` (prediction to
    reference) and ``assd`` (to 1e-6 relative, tested). See the module docstring for the surface
    definition and :class:`EmptyRule` for empty masks.

    Args:
        pred: prediction mask of any dimension (non-zero = foreground).
        ref: reference mask of the same shape.
        spacing: voxel size per axis (or one value for all); None gives distances in voxels.
        empty_rule: ``"strict"`` (default) or ``"literature"``, see :class:`EmptyRule`.

    Returns:
        ``{"dice", "jaccard", "hd95", "asd", "assd", "pred_empty", "ref_empty", "intersection",
        "pred_voxels", "ref_voxels"}``, all floats; the two ``*_empty`` flags are 1.0 when that mask
        has no foreground voxel, else 0.0; the counts are ``|P & R|``, ``|P|`` and ``|R|`` in voxels.

    Raises:
        ConfigError: unknown ``empty_rule``.
        ValueError: shapes differ, or ``spacing`` does not match the number of axes.
    """
    rule = parse_empty_rule(empty_rule)
    pred = np.atleast_1d(np.asarray(pred).astype(bool))
    ref = np.atleast_1d(np.asarray(ref).astype(bool))
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    sp = _spacing_array(spacing, pred.ndim)

    n_pred = int(np.count_nonzero(pred))
    n_ref = int(np.count_nonzero(ref))
    inter = int(np.count_nonzero(pred & ref))
    flags = {"pred_empty": float(n_pred == 0), "ref_empty": float(n_ref == 0),
             "intersection": float(inter), "pred_voxels": float(n_pred), "ref_voxels": float(n_ref)}

    if n_pred == 0 or n_ref == 0:
        if rule is EmptyRule.LITERATURE:
            values = dict.fromkeys(METRIC_NAMES, 0.0)
        elif n_pred == 0 and n_ref == 0:
            values = {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0, "assd": 0.0}
        else:
            diag = _diagonal(pred.shape, sp)
            values = {"dice": 0.0, "jaccard": 0.0, "hd95": diag, "asd": diag, "assd": diag}
        return {**values, **flags}

    to_ref, to_pred = _directed_distances(pred, ref, sp)
    both = np.concatenate([to_ref, to_pred])
    values = {
        "dice": 2.0 * inter / float(n_pred + n_ref),
        "jaccard": inter / float(n_pred + n_ref - inter),
        "hd95": float(np.percentile(both, 95)),
        "asd": float(to_ref.mean()),
        "assd": float(both.mean()),
    }
    return {**values, **flags}


def case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    num_classes: int,
    spacing: Sequence[float] | None = None,
    empty_rule: str | EmptyRule = "strict",
    ignore_index: int | None = None,
) -> dict[int, dict[str, float]]:
    """:func:`binary_metrics` for every foreground class ``1 .. num_classes - 1`` of a label map.

    Args:
        pred: predicted label map (integer class ids), any dimension.
        ref: reference label map of the same shape.
        num_classes: number of classes including background (class 0).
        spacing: voxel size per axis; None gives distances in voxels.
        empty_rule: ``"strict"`` or ``"literature"``, see :class:`EmptyRule`.
        ignore_index: reference value marking unannotated pixels (e.g. MOSXAV "others"). Those
            pixels are set to background in *both* maps before scoring, so whatever the model
            predicts there counts neither for nor against it.

    Returns:
        ``{class_id: {metric: value}}`` for the foreground classes.

    Raises:
        ConfigError: unknown ``empty_rule``.
        ValueError: shapes differ or ``num_classes < 2``.
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 (background + one class), got {num_classes}")
    rule = parse_empty_rule(empty_rule)
    if ignore_index is not None:
        keep = ref != ignore_index
        pred = np.where(keep, pred, 0)
        ref = np.where(keep, ref, 0)
    return {
        c: binary_metrics(pred == c, ref == c, spacing=spacing, empty_rule=rule)
        for c in range(1, num_classes)
    }


def _class_labels(class_ids: Sequence[int], class_names: Sequence[str] | None) -> dict[int, str]:
    """Display name per class id; ``class_names`` is indexed by class id (background first).

    A list with exactly one name per foreground class is accepted too.
    """
    labels: dict[int, str] = {}
    for c in class_ids:
        name = str(c)
        if class_names is not None:
            if len(class_names) > max(class_ids):
                name = str(class_names[c])
            elif len(class_names) == len(class_ids):
                name = str(class_names[list(class_ids).index(c)])
        labels[c] = name
    if len(set(labels.values())) != len(labels):  # duplicate names would collide as keys
        labels = {c: f"{c}:{n}" for c, n in labels.items()}
    return labels


def summarize(per_case: Sequence[Mapping[str, Any]], class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Mean and standard deviation over cases, per class and over the foreground classes.

    Args:
        per_case: records ``{"case_id": ..., "metrics": {class_id: {metric: value}}}`` as built from
            :func:`case_metrics`; other keys are ignored.
        class_names: names indexed by class id (background first, as ``model.class_names``), or one
            name per foreground class; None names classes by their id.

    Returns:
        A JSON-ready dict::

            {
              "num_cases": N,
              "metrics": ["dice", "jaccard", "hd95", "asd", "assd"],
              "per_class": {name: {"class_id": c, "dice": {"mean": m, "std": s}, ...,
                                   "one_empty": k, "both_empty": j, "num_cases": n}},
              "mean": {metric: mean over foreground classes of the class means},
              "std": {metric: std over cases of each case's foreground-class average},
              "one_empty_cases": total of "one_empty" over classes,
              "pooled": {"dice": ..., "jaccard": ...},  # mean over foreground classes
            }

        Each class also carries ``"pooled": {"dice", "jaccard"}``, its Dice and Jaccard of the voxel
        counts summed over cases (module docstring); both are left out when the records lack counts.

        Standard deviations are population ones (numpy's default ``ddof=0``). ``one_empty`` counts
        the cases where exactly one of prediction and reference is empty for that class
        (reported, protocols.md); ``both_empty`` the cases where both are.

    Raises:
        ValueError: ``per_case`` is empty.
    """
    if not per_case:
        raise ValueError("summarize needs at least one case")
    class_ids = sorted({int(c) for rec in per_case for c in rec["metrics"]})
    labels = _class_labels(class_ids, class_names)

    per_class: dict[str, Any] = {}
    class_means: dict[str, list[float]] = {m: [] for m in METRIC_NAMES}
    for c in class_ids:
        rows = [_lookup(rec["metrics"], c) for rec in per_case]
        rows = [r for r in rows if r is not None]
        entry: dict[str, Any] = {"class_id": c}
        for m in METRIC_NAMES:
            vals = np.asarray([r[m] for r in rows], dtype=np.float64)
            entry[m] = {"mean": float(vals.mean()), "std": float(vals.std())}
            class_means[m].append(entry[m]["mean"])
        pe = [bool(r.get("pred_empty", 0)) for r in rows]
        re_ = [bool(r.get("ref_empty", 0)) for r in rows]
        entry["one_empty"] = int(sum(p != r for p, r in zip(pe, re_)))
        entry["both_empty"] = int(sum(p and r for p, r in zip(pe, re_)))
        entry["num_cases"] = len(rows)
        if rows and all(k in r for r in rows for k in COUNT_NAMES):  # records made before the counts have none
            entry["pooled"] = pooled_scores(*(sum(float(r[k]) for r in rows) for k in COUNT_NAMES))
        per_class[labels[c]] = entry

    # Per-case foreground average, so the std of the mean describes case-to-case spread.
    case_avgs: dict[str, list[float]] = {m: [] for m in METRIC_NAMES}
    for rec in per_case:
        rows = [r for r in (_lookup(rec["metrics"], c) for c in class_ids) if r is not None]
        for m in METRIC_NAMES:
            case_avgs[m].append(float(np.mean([r[m] for r in rows])))

    summary: dict[str, Any] = {
        "num_cases": len(per_case),
        "metrics": list(METRIC_NAMES),
        "per_class": per_class,
        "mean": {m: float(np.mean(class_means[m])) for m in METRIC_NAMES},
        "std": {m: float(np.std(case_avgs[m])) for m in METRIC_NAMES},
        "one_empty_cases": int(sum(e["one_empty"] for e in per_class.values())),
    }
    if all("pooled" in e for e in per_class.values()):
        summary["pooled"] = {m: float(np.mean([e["pooled"][m] for e in per_class.values()]))
                             for m in ("dice", "jaccard")}
    return summary


def pooled_scores(intersection: float, pred_voxels: float, ref_voxels: float) -> dict[str, float]:
    """Dice and Jaccard of voxel counts summed over cases (a class absent from every prediction and
    reference: 1, nothing to find and nothing found)."""
    total = pred_voxels + ref_voxels
    if total == 0:
        return {"dice": 1.0, "jaccard": 1.0}
    return {"dice": 2.0 * intersection / total, "jaccard": intersection / (total - intersection)}


def pooled_class_dice(pred: Any, ref: Any, class_ids: Sequence[int]) -> list[float]:
    """Dice of each class in ``class_ids`` pooled over every voxel of two label maps of one shape
    (numpy arrays or torch tensors), by :func:`pooled_scores`' rule."""
    return [pooled_scores(float(((pred == c) & (ref == c)).sum()), float((pred == c).sum()),
                          float((ref == c).sum()))["dice"] for c in class_ids]


def _lookup(metrics: Mapping[Any, Mapping[str, float]], c: int) -> Mapping[str, float] | None:
    # Records reloaded from JSON carry string class keys.
    if c in metrics:
        return metrics[c]
    return metrics.get(str(c))


def format_summary_table(summary: Mapping[str, Any], protocol: Mapping[str, Any] | None = None) -> str:
    """A Markdown table ``class | Dice | Jaccard | HD95 | ASD | ASSD | one empty`` (mean ± std).

    Args:
        summary: output of :func:`summarize`.
        protocol: optional protocol dict; its ``units`` and ``empty_rule`` are named under the table.

    Returns:
        The table as a string (no trailing newline).
    """
    head = ["class", "Dice", "Jaccard", "HD95", "ASD", "ASSD", "one empty"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells(stats: Mapping[str, Any]) -> list[str]:
        return [f"{stats[m]['mean']:.4f} ± {stats[m]['std']:.4f}" for m in METRIC_NAMES]

    for name, stats in summary["per_class"].items():
        lines.append("| " + " | ".join([str(name), *cells(stats), str(stats["one_empty"])]) + " |")
    mean = {m: {"mean": summary["mean"][m], "std": summary["std"][m]} for m in METRIC_NAMES}
    lines.append("| " + " | ".join(["**mean**", *cells(mean), str(summary["one_empty_cases"])]) + " |")
    note = f"{summary['num_cases']} cases; ASD = prediction to reference, ASSD = symmetric"
    if "pooled" in summary:
        per = ", ".join(f"{n} {e['pooled']['dice']:.4f}" for n, e in summary["per_class"].items())
        note += (f"\n\npooled over cases (voxel counts summed, no empty rule): mean Dice "
                 f"{summary['pooled']['dice']:.4f}, mean Jaccard {summary['pooled']['jaccard']:.4f}; Dice per class: {per}")
    if protocol is not None:
        note += f"; distances in {protocol.get('units', '?')}; empty rule {protocol.get('empty_rule', '?')}"
    return "\n".join(lines) + "\n\n" + note


def write_metrics(
    per_case: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    out_dir: str | Path,
    protocol: Mapping[str, Any],
) -> str:
    """Write ``per_case.csv`` and ``summary.json`` and return the printable Markdown table.

    ``per_case.csv`` has one row per case and foreground class: ``case_id, class_id, class_name``,
    the metrics, the ``pred_empty``/``ref_empty`` flags, the voxel counts, then any other scalar field of the record
    (e.g. ``seconds``). ``summary.json`` is ``{"protocol": protocol, **summary}``, so every number
    travels with its dataset, split, units, empty rule and checkpoint.

    Args:
        per_case: records as given to :func:`summarize`.
        summary: output of :func:`summarize`.
        out_dir: folder to write into (created if missing).
        protocol: what the numbers mean (dataset, split, units, empty rule, checkpoint, ...).

    Returns:
        :func:`format_summary_table` of the summary, with the protocol's units and empty rule.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = {int(e["class_id"]): str(n) for n, e in summary["per_class"].items()}
    extra = sorted(
        {k for rec in per_case for k, v in rec.items() if k not in ("case_id", "metrics") and np.isscalar(v)}
    )
    columns = ["case_id", "class_id", "class_name", *METRIC_NAMES, *_FLAG_NAMES, *COUNT_NAMES, *extra]
    with open(out / "per_case.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for rec in per_case:
            for c in sorted(int(k) for k in rec["metrics"]):
                vals = _lookup(rec["metrics"], c) or {}
                row: dict[str, Any] = {"case_id": rec["case_id"], "class_id": c, "class_name": names.get(c, str(c))}
                row.update({m: vals.get(m) for m in (*METRIC_NAMES, *_FLAG_NAMES, *COUNT_NAMES)})
                row.update({k: rec.get(k) for k in extra})
                writer.writerow(row)
    with open(out / "summary.json", "w") as f:
        json.dump({"protocol": dict(protocol), **summary}, f, indent=2, default=str)
    return format_summary_table(summary, protocol)
