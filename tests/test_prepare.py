"""`semidiff data prepare`: raw LA NRRD and ACDC NIfTI to the benchmark h5 layouts, deterministic
to the byte, with a sha256 manifest, read back by the readers with the expected arrays."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from semidiff.cli import main
from semidiff.data import create_reader
from semidiff.data.prepare import LA_FOLDER, MANIFEST_NAME, prepare_acdc, prepare_la
from semidiff.errors import DataError


def _write(path: Path, arr: np.ndarray, spacing=(0.625, 0.625, 2.5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def _la_raw(raw: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Two cases, arrays in SimpleITK (z, y, x) order, atrium 255 in laendo."""
    rng = np.random.default_rng(3)
    cases = {}
    for case, (y0, x0) in (("CASE_A", (10, 12)), ("CASE_B", (4, 25))):
        image = rng.normal(50, 10, size=(6, 30, 40)).astype(np.int16)
        label = np.zeros_like(image, dtype=np.uint8)
        label[1:5, y0 : y0 + 6, x0 : x0 + 9] = 255
        _write(raw / case / "lgemri.nrrd", image)
        _write(raw / case / "laendo.nrrd", label)
        cases[case] = (image, label)
    return cases


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_la_matches_ua_mt_layout_and_is_byte_identical(tmp_path):
    raw = tmp_path / "raw"
    cases = _la_raw(raw)
    (tmp_path / "test_ids.txt").write_text("CASE_B\n")
    splits = prepare_la(raw, tmp_path / "out1", margin=2, min_size=(8, 8), test_list=tmp_path / "test_ids.txt",
                        log=lambda *_: None)
    assert splits == {"train": ["CASE_A"], "test": ["CASE_B"]}
    reader = create_reader("la", tmp_path / "out1", lists={"train": "train.list", "test": "test.list"})
    for split, case_id in (("train", "CASE_A"), ("test", "CASE_B")):
        (ref,) = reader.cases(split)
        case = reader.load(ref)
        image_zyx, label_zyx = cases[case_id]
        # Expected: (x, y, z) arrays, z-score over the whole scan, x/y crop around the atrium +- 2.
        image = image_zyx.transpose(2, 1, 0).astype(np.float64)
        image = (image - image.mean()) / image.std()
        label = (label_zyx.transpose(2, 1, 0) > 0).astype(np.uint8)
        xs, ys = np.flatnonzero(label.any((1, 2))), np.flatnonzero(label.any((0, 2)))
        x0, x1 = max(xs[0] - 2, 0), min(xs[-1] + 3, label.shape[0])
        y0, y1 = max(ys[0] - 2, 0), min(ys[-1] + 3, label.shape[1])
        np.testing.assert_allclose(case.image[0], image[x0:x1, y0:y1], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(case.label, label[x0:x1, y0:y1])
        assert case.spacing == pytest.approx((0.625, 0.625, 2.5))  # (x, y, z)
        with h5py.File(ref.path) as f:
            assert sorted(f.keys()) == ["image", "label"]
    assert Path(reader.cases("train")[0].path) == tmp_path / "out1" / LA_FOLDER / "CASE_A" / "mri_norm2.h5"

    # A second run writes the same bytes (no HDF5 timestamps), and the manifest checks out.
    prepare_la(raw, tmp_path / "out2", margin=2, min_size=(8, 8), test_list=tmp_path / "test_ids.txt",
               log=lambda *_: None)
    first, second = _tree_bytes(tmp_path / "out1"), _tree_bytes(tmp_path / "out2")
    assert first == second
    manifest = (tmp_path / "out1" / MANIFEST_NAME).read_text().splitlines()
    assert len(manifest) == len(first) - 1  # every written file but the manifest itself
    for line in manifest:
        digest, rel = line.split("  ", 1)
        assert hashlib.sha256(first[rel]).hexdigest() == digest


def test_prepare_la_widens_small_crops_and_rejects_bad_labels(tmp_path):
    raw = tmp_path / "raw"
    _la_raw(raw)
    prepare_la(raw, tmp_path / "out", margin=0, min_size=(20, 16), log=lambda *_: None)
    with h5py.File(tmp_path / "out" / LA_FOLDER / "CASE_A" / "mri_norm2.h5") as f:
        assert f["image"].shape == (20, 16, 6)  # the 9x6 atrium box grown to the patch size
        assert list(f.attrs["crop_xy"]) == [7, 27, 5, 21]
    _write(raw / "CASE_A" / "laendo.nrrd", np.full((6, 30, 40), 3, np.uint8))
    with pytest.raises(DataError, match=r"CASE_A/laendo.nrrd: label values \[3\]"):
        prepare_la(raw, tmp_path / "bad", log=lambda *_: None)


def _acdc_raw(raw: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(4)
    vols = {}
    for patient, frames in (("patient001", (1, 12)), ("patient002", (1, 10)), ("patient003", (1,))):
        for fr in frames:
            vid = f"{patient}_frame{fr:02d}"
            image = rng.integers(0, 900, size=(3, 12, 14)).astype(np.int16)
            label = rng.integers(0, 4, size=(3, 12, 14)).astype(np.uint8)
            _write(raw / "training" / patient / f"{vid}.nii.gz", image, (1.5, 1.5, 10.0))
            _write(raw / "training" / patient / f"{vid}_gt.nii.gz", label, (1.5, 1.5, 10.0))
            vols[vid] = (image, label)
        _write(raw / "training" / patient / f"{patient}_4d.nii.gz", np.zeros((2, 3, 4, 5), np.int16))
    return vols


def test_prepare_acdc_via_cli_gives_ssl4mis_layout(tmp_path, capsys):
    vols = _acdc_raw(tmp_path / "raw")
    (tmp_path / "val.txt").write_text("patient002\n")
    (tmp_path / "test.txt").write_text("patient003\n")
    args = ["data", "prepare", "acdc", str(tmp_path / "raw"), str(tmp_path / "out"),
            "--val-list", str(tmp_path / "val.txt"), "--test-list", str(tmp_path / "test.txt")]
    assert main(args) == 0
    assert "train 6, val 2, test 1" in capsys.readouterr().out
    reader = create_reader("acdc", tmp_path / "out")
    train = reader.cases("train")
    assert [r.case_id for r in train] == [f"patient001_frame{f}_slice_{k}" for f in ("01", "12") for k in range(3)]
    assert [r.case_id for r in reader.cases("val")] == ["patient002_frame01", "patient002_frame10"]
    assert [r.case_id for r in reader.cases("test")] == ["patient003_frame01"]
    image, label = vols["patient001_frame12"]
    expected = (image - image.min()) / (image.max() - image.min())
    sl = reader.load(train[4])  # frame12, slice 1
    np.testing.assert_allclose(sl.image[0], expected[1], rtol=1e-6)
    np.testing.assert_array_equal(sl.label, label[1])
    vol = reader.load(reader.cases("val")[1])
    image, label = vols["patient002_frame10"]
    assert vol.image.shape == (1, 3, 12, 14)
    np.testing.assert_allclose(vol.image[0], (image - image.min()) / (image.max() - image.min()), rtol=1e-6)
    np.testing.assert_array_equal(vol.label, label)
    # Rerun: identical bytes; the inspect command accepts the result.
    assert main(args[:4] + [str(tmp_path / "again")] + args[5:]) == 0
    assert _tree_bytes(tmp_path / "out") == _tree_bytes(tmp_path / "again")
    assert main(["data", "inspect", str(tmp_path / "out")]) == 0


def test_prepare_acdc_errors_name_the_file(tmp_path):
    _acdc_raw(tmp_path / "raw")
    (tmp_path / "raw" / "training" / "patient002" / "patient002_frame10_gt.nii.gz").unlink()
    with pytest.raises(DataError, match=r"patient002_frame10_gt.nii.gz: file is missing"):
        prepare_acdc(tmp_path / "raw", tmp_path / "out", log=lambda *_: None)
    with pytest.raises(DataError, match="no patientXXX_frameYY"):
        prepare_acdc(tmp_path / "nothing", tmp_path / "out2", log=lambda *_: None)
