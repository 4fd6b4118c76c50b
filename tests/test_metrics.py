"""Metrics agree with medpy, empty-mask rules, per-class metrics, summaries and report files."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy import ndimage

from semidiff.errors import ConfigError
from semidiff.evaluation.metrics import (
    METRIC_NAMES,
    EmptyRule,
    binary_metrics,
    case_metrics,
    format_summary_table,
    parse_empty_rule,
    pooled_class_dice,
    summarize,
    write_metrics,
)

binary = pytest.importorskip("medpy.metric.binary")


def _blob(rng: np.random.Generator, shape: tuple[int, ...], sigma: float, quantile: float) -> np.ndarray:
    """Random blobs: smoothed noise thresholded at a quantile (never empty)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > np.quantile(field, quantile)


# (shape, spacing, sigma, quantile): 2D and 3D, voxels, isotropic and anisotropic spacing,
# sparse and dense masks (dense ones touch the image border).
_CASES = [
    ((48, 40), None, 3.0, 0.7),
    ((48, 40), None, 1.5, 0.9),
    ((48, 40), None, 4.0, 0.3),
    ((64, 64), (0.7, 1.3), 3.0, 0.8),
    ((64, 64), (1.0, 1.0), 2.0, 0.6),
    ((30, 50), (2.0, 0.5), 5.0, 0.95),
    ((33, 29), None, 1.0, 0.97),
    ((24, 24, 16), None, 2.0, 0.7),
    ((24, 24, 16), None, 3.0, 0.85),
    ((24, 24, 16), (0.625, 0.625, 2.5), 2.0, 0.7),
    ((24, 24, 16), (0.625, 0.625, 2.5), 3.0, 0.9),
    ((32, 28, 12), (0.625, 0.625, 2.5), 1.5, 0.5),
    ((20, 30, 10), (1.0, 1.0, 1.0), 2.5, 0.8),
    ((20, 30, 10), (0.8, 0.8, 0.8), 2.5, 0.2),
    ((16, 16, 16), (1.5, 0.9, 3.0), 2.0, 0.75),
    ((16, 16, 16), None, 1.0, 0.98),
    ((18, 22, 14), (0.5, 0.5, 5.0), 3.0, 0.6),
    ((12, 40, 40), (2.5, 0.7, 0.7), 2.0, 0.88),
    ((40, 36), (0.3, 0.3), 6.0, 0.5),
    ((26, 26, 8), (0.625, 0.625, 2.5), 2.0, 0.93),
]


def _medpy(pred: np.ndarray, ref: np.ndarray, spacing) -> dict[str, float]:
    return {
        "dice": binary.dc(pred, ref),
        "jaccard": binary.jc(pred, ref),
        "hd95": binary.hd95(pred, ref, voxelspacing=spacing),
        "asd": binary.asd(pred, ref, voxelspacing=spacing),
        "assd": binary.assd(pred, ref, voxelspacing=spacing),
    }


def _assert_matches(ours: dict[str, float], ref: dict[str, float]) -> None:
    for name, expected in ref.items():
        assert math.isclose(ours[name], float(expected), rel_tol=1e-6, abs_tol=1e-12), (name, ours[name], expected)


@pytest.mark.parametrize("index", range(len(_CASES)))
def test_binary_metrics_equal_medpy(index: int) -> None:
    shape, spacing, sigma, quantile = _CASES[index]
    rng = np.random.default_rng(100 + index)
    pred = _blob(rng, shape, sigma, quantile)
    ref = _blob(rng, shape, sigma, quantile)
    ours = binary_metrics(pred, ref, spacing=spacing)
    _assert_matches(ours, _medpy(pred, ref, spacing))
    assert ours["pred_empty"] == 0.0 and ours["ref_empty"] == 0.0
    # The spacing is really used: anisotropic spacing changes the distances.
    if spacing is not None and len(set(spacing)) > 1:
        assert not math.isclose(binary_metrics(pred, ref)["asd"], ours["asd"])


def test_edge_cases_equal_medpy() -> None:
    """Identical masks, disjoint far-apart masks, single voxels, a mask filling the image, 1D."""
    a = np.zeros((20, 20, 10), bool)
    a[3:9, 4:10, 2:6] = True
    b = np.zeros_like(a)
    b[14:19, 12:18, 6:9] = True
    single = np.zeros_like(a)
    single[10, 10, 5] = True
    full = np.ones_like(a)
    pairs = [(a, a), (a, b), (single, a), (a, single), (full, a), (a, full)]
    for spacing in (None, (0.625, 0.625, 2.5)):
        for p, r in pairs:
            _assert_matches(binary_metrics(p, r, spacing=spacing), _medpy(p, r, spacing))
    line_p = np.zeros(30, bool)
    line_p[3:12] = True
    line_r = np.zeros(30, bool)
    line_r[8:25] = True
    _assert_matches(binary_metrics(line_p, line_r, spacing=(0.5,)), _medpy(line_p, line_r, (0.5,)))


def test_identical_masks_are_perfect() -> None:
    mask = _blob(np.random.default_rng(1), (30, 30), 2.0, 0.7)
    m = binary_metrics(mask, mask)
    assert m["dice"] == 1.0 and m["jaccard"] == 1.0
    assert m["hd95"] == 0.0 and m["asd"] == 0.0 and m["assd"] == 0.0


def test_asd_is_one_way_and_assd_symmetric() -> None:
    small = np.zeros((30, 30), bool)
    small[10:14, 10:14] = True
    big = np.zeros_like(small)
    big[5:25, 5:25] = True
    pb, bp = binary_metrics(small, big), binary_metrics(big, small)
    assert pb["asd"] != pytest.approx(bp["asd"])
    assert pb["assd"] == pytest.approx(bp["assd"])
    assert pb["hd95"] == pytest.approx(bp["hd95"])


def _empty_cases(shape=(10, 20, 30)):
    some = np.zeros(shape, bool)
    some[2:5, 3:9, 4:10] = True
    none = np.zeros(shape, bool)
    return some, none


def test_strict_empty_rule() -> None:
    some, none = _empty_cases()
    both = binary_metrics(none, none)
    assert both == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0, "assd": 0.0,
                    "pred_empty": 1.0, "ref_empty": 1.0, "intersection": 0.0, "pred_voxels": 0.0, "ref_voxels": 0.0}
    diag_vox = math.sqrt(10**2 + 20**2 + 30**2)
    spacing = (0.625, 0.625, 2.5)
    diag_mm = math.sqrt((10 * 0.625) ** 2 + (20 * 0.625) ** 2 + (30 * 2.5) ** 2)
    for pred, ref, flags in ((none, some, (1.0, 0.0)), (some, none, (0.0, 1.0))):
        m = binary_metrics(pred, ref)
        assert (m["dice"], m["jaccard"]) == (0.0, 0.0)
        assert m["hd95"] == pytest.approx(diag_vox) and m["asd"] == pytest.approx(diag_vox)
        assert m["assd"] == pytest.approx(diag_vox)
        assert (m["pred_empty"], m["ref_empty"]) == flags
        mm = binary_metrics(pred, ref, spacing=spacing)
        assert mm["hd95"] == pytest.approx(diag_mm) and mm["asd"] == pytest.approx(diag_mm)


def test_literature_empty_rule() -> None:
    some, none = _empty_cases()
    zeros = dict.fromkeys(METRIC_NAMES, 0.0)
    # SSL4MIS: any empty mask -> every metric 0, including both empty (Dice 0, HD95 0).
    for pred, ref in ((none, none), (none, some), (some, none)):
        m = binary_metrics(pred, ref, empty_rule="literature")
        assert {k: m[k] for k in METRIC_NAMES} == zeros
    assert binary_metrics(none, none, empty_rule=EmptyRule.LITERATURE)["pred_empty"] == 1.0
    # Non-empty masks: identical to strict (and to medpy).
    rng = np.random.default_rng(5)
    p, r = _blob(rng, (20, 20, 10), 2.0, 0.7), _blob(rng, (20, 20, 10), 2.0, 0.7)
    assert binary_metrics(p, r, empty_rule="literature") == binary_metrics(p, r, empty_rule="strict")


def test_invalid_arguments() -> None:
    some, _ = _empty_cases()
    with pytest.raises(ConfigError, match="empty_rule"):
        binary_metrics(some, some, empty_rule="lenient")
    with pytest.raises(ConfigError):
        parse_empty_rule("STRICT ")
    assert parse_empty_rule("literature") is EmptyRule.LITERATURE
    with pytest.raises(ValueError, match="shape"):
        binary_metrics(some, some[:5])
    with pytest.raises(ValueError, match="spacing"):
        binary_metrics(some, some, spacing=(1.0, 1.0))


def test_case_metrics_per_class() -> None:
    rng = np.random.default_rng(7)
    ref = np.zeros((24, 24, 12), np.uint8)
    ref[_blob(rng, ref.shape, 2.0, 0.6)] = 1
    ref[_blob(rng, ref.shape, 2.0, 0.85)] = 2
    pred = ref.copy()
    pred[_blob(rng, ref.shape, 2.0, 0.9)] = 2
    spacing = (0.625, 0.625, 2.5)
    out = case_metrics(pred, ref, num_classes=4, spacing=spacing)
    assert sorted(out) == [1, 2, 3]
    for c in (1, 2):
        _assert_matches(out[c], _medpy(pred == c, ref == c, spacing))
    assert out[3]["dice"] == 1.0 and out[3]["pred_empty"] == 1.0 and out[3]["ref_empty"] == 1.0
    lit = case_metrics(pred, ref, num_classes=4, empty_rule="literature")
    assert lit[3]["dice"] == 0.0 and lit[3]["hd95"] == 0.0


def test_case_metrics_ignore_index() -> None:
    ref = np.zeros((20, 20), np.uint8)
    ref[2:8, 2:8] = 1
    ref[10:18, 10:18] = 5  # unannotated ("others")
    pred = np.zeros_like(ref)
    pred[2:8, 2:8] = 1
    pred[10:18, 10:18] = 1  # whatever is predicted under "ignore" does not count
    out = case_metrics(pred, ref, num_classes=2, ignore_index=5)
    assert out[1]["dice"] == 1.0 and out[1]["hd95"] == 0.0
    assert case_metrics(pred, ref, num_classes=2)[1]["dice"] < 1.0


def _record(case_id: str, values: dict[int, dict[str, float]]) -> dict:
    metrics = {}
    for c, v in values.items():
        m = dict.fromkeys(METRIC_NAMES, 0.0)
        m.update(v)
        m.setdefault("pred_empty", 0.0)
        m.setdefault("ref_empty", 0.0)
        metrics[c] = m
    return {"case_id": case_id, "metrics": metrics}


def _known_records() -> list[dict]:
    return [
        _record("a", {1: {"dice": 0.9, "hd95": 2.0}, 2: {"dice": 0.5, "hd95": 4.0}}),
        _record("b", {1: {"dice": 0.7, "hd95": 6.0}, 2: {"dice": 0.0, "hd95": 50.0, "pred_empty": 1.0}}),
        _record("c", {1: {"dice": 0.8, "hd95": 1.0}, 2: {"dice": 1.0, "pred_empty": 1.0, "ref_empty": 1.0}}),
        _record("d", {1: {"dice": 0.0, "hd95": 50.0, "ref_empty": 1.0}, 2: {"dice": 0.6, "hd95": 3.0}}),
    ]


def test_summarize_known_values() -> None:
    records = _known_records()
    s = summarize(records, ["background", "LV", "RV"])
    assert s["num_cases"] == 4 and list(s["per_class"]) == ["LV", "RV"]
    d1 = np.array([0.9, 0.7, 0.8, 0.0])
    d2 = np.array([0.5, 0.0, 1.0, 0.6])
    h2 = np.array([4.0, 50.0, 0.0, 3.0])
    assert s["per_class"]["LV"]["dice"]["mean"] == pytest.approx(d1.mean())
    assert s["per_class"]["LV"]["dice"]["std"] == pytest.approx(d1.std())
    assert s["per_class"]["RV"]["dice"]["std"] == pytest.approx(d2.std())
    assert s["per_class"]["RV"]["hd95"]["mean"] == pytest.approx(h2.mean())
    assert s["mean"]["dice"] == pytest.approx((d1.mean() + d2.mean()) / 2)
    assert s["std"]["dice"] == pytest.approx(((d1 + d2) / 2).std())
    # One-empty: case d for LV (reference empty), case b for RV; case c (both empty) is not one.
    assert s["per_class"]["LV"]["one_empty"] == 1 and s["per_class"]["RV"]["one_empty"] == 1
    assert s["per_class"]["RV"]["both_empty"] == 1
    assert s["one_empty_cases"] == 2
    assert s["per_class"]["RV"]["class_id"] == 2


def test_summarize_names_and_json_keys() -> None:
    records = _known_records()
    assert list(summarize(records, None)["per_class"]) == ["1", "2"]
    assert list(summarize(records, ["LV", "RV"])["per_class"]) == ["LV", "RV"]  # foreground-only names
    reloaded = json.loads(json.dumps(records))  # class keys become strings
    assert summarize(reloaded, None)["mean"] == summarize(records, None)["mean"]
    with pytest.raises(ValueError):
        summarize([], None)


def test_write_metrics(tmp_path) -> None:
    records = _known_records()
    for r in records:
        r["seconds"] = 0.5
    summary = summarize(records, ["background", "LV", "RV"])
    protocol = {"dataset": "toy", "split": "test", "units": "voxels", "empty_rule": "strict", "checkpoint": "best"}
    table = write_metrics(records, summary, tmp_path / "out", protocol)
    with open(tmp_path / "out" / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    assert rows[0]["case_id"] == "a" and rows[0]["class_name"] == "LV" and float(rows[0]["dice"]) == 0.9
    assert {"hd95", "asd", "assd", "pred_empty", "ref_empty", "seconds"} <= set(rows[0])
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["protocol"] == protocol
    assert saved["mean"]["dice"] == pytest.approx(summary["mean"]["dice"])
    assert "| LV |" in table and "**mean**" in table and "voxels" in table and "strict" in table
    assert table.startswith(format_summary_table(summary).split("\n\n")[0])


def test_pooled_dice_sums_the_voxel_counts_and_gives_silence_no_credit(tmp_path) -> None:
    """Four 2D frames; class 1 is in one frame only. A network that never predicts it scores 0.75 per
    frame under the strict rule, and 0 pooled; one that finds half of it scores the pooled 2*8/(8+16)."""
    ref = np.zeros((4, 8, 8), np.uint8)
    ref[0, :2, :] = 1  # 16 voxels of class 1 in frame 0
    ref[:, 4:, :] = 2  # class 2 everywhere: 32 voxels per frame
    silent = np.where(ref == 1, 0, ref)
    half = silent.copy()
    half[0, :1, :] = 1  # 8 of the 16
    half[1, 4:6, :] = 1  # and 16 false positives of class 1 in a frame without it (taken from class 2)

    def summary_of(pred):
        records = [{"case_id": str(i), "metrics": case_metrics(pred[i], ref[i], 3)} for i in range(4)]
        return records, summarize(records, ["bg", "one", "two"])

    _, s = summary_of(silent)
    assert s["per_class"]["one"]["dice"]["mean"] == pytest.approx(0.75)  # strict: 3 empty frames score 1
    assert s["per_class"]["one"]["pooled"] == {"dice": 0.0, "jaccard": 0.0}
    assert s["per_class"]["two"]["pooled"]["dice"] == 1.0
    assert s["pooled"]["dice"] == pytest.approx(0.5)
    records, s = summary_of(half)
    assert s["per_class"]["one"]["pooled"]["dice"] == pytest.approx(2 * 8 / (24 + 16))
    assert s["per_class"]["one"]["pooled"]["jaccard"] == pytest.approx(8 / (24 + 16 - 8))
    assert s["per_class"]["two"]["pooled"]["dice"] == pytest.approx(2 * 112 / (112 + 128))
    table = write_metrics(records, s, tmp_path, {"units": "voxels", "empty_rule": "strict"})
    assert "pooled over cases" in table
    with open(tmp_path / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert (rows[0]["intersection"], rows[0]["pred_voxels"], rows[0]["ref_voxels"]) == ("8.0", "8.0", "16.0")
    # Records written before the counts existed (no counts): no pooled numbers, nothing invented.
    assert "pooled" not in summarize(_known_records(), None)


def test_pooled_class_dice_of_label_maps_agrees_with_the_summary_counts() -> None:
    """The label-map shortcut the diagnostic scripts use gives the summary's pooled Dice, on numpy
    arrays and torch tensors alike; a class in neither map scores 1 (pooled_scores' rule)."""
    torch = pytest.importorskip("torch")
    ref = np.zeros((4, 8, 8), np.uint8)
    ref[0, :2, :] = 1
    ref[:, 4:, :] = 2
    pred = np.where(ref == 1, 0, ref)
    pred[0, :1, :] = 1
    pred[1, 4:6, :] = 1
    expected = [2 * 8 / (24 + 16), 2 * 112 / (112 + 128), 1.0]
    assert pooled_class_dice(pred, ref, [1, 2, 3]) == pytest.approx(expected)
    assert pooled_class_dice(torch.from_numpy(pred), torch.from_numpy(ref), [1, 2, 3]) == pytest.approx(expected)
