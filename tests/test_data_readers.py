"""Readers, synthetic data and dataset inspection: replicas of the real layouts, bad input, real data."""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import ndimage

from semidiff.data import (
    BRATS_LAYOUT,
    PANCREAS_LAYOUT,
    ACDCReader,
    H5CaseListReader,
    create_reader,
    inspect_dataset,
    make_synthetic_dataset,
    select_labeled,
)
from semidiff.errors import ConfigError, DataError

# --------------------------------------------------------------------------- replica writers


def write_h5(path: Path, image: np.ndarray | None = None, label: np.ndarray | None = None, **extra) -> Path:
    """Write an h5 case with the given datasets (None: key left out)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        if image is not None:
            f.create_dataset("image", data=image)
        if label is not None:
            f.create_dataset("label", data=label)
        for k, v in extra.items():
            f.create_dataset(k, data=v)
    return path


def _img(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _lab(shape, num_classes, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, shape).astype(np.uint8)


def make_acdc_replica(root: Path) -> Path:
    """SSL4MIS ACDC layout: 2 training patients as slices, 2 val volumes; messy list files."""
    slices = {
        "patient007": [("frame01", 3, (20, 24)), ("frame02", 2, (20, 24))],
        "patient002": [("frame01", 2, (18, 16))],
    }
    lines = []
    for patient, frames in slices.items():
        for frame, n, shape in frames:
            for s in range(1, n + 1):
                cid = f"{patient}_{frame}_slice_{s}"
                write_h5(root / "data" / "slices" / f"{cid}.h5", _img(shape, s), _lab(shape, 4, s))
                lines.append(cid)
    # Blank lines, trailing whitespace and an id that already carries ".h5" must all be accepted.
    text = lines[0] + "  \n\n" + lines[1] + ".h5\n" + "\n".join(lines[2:]) + "\n\n"
    (root / "train_slices.list").write_text(text)
    for vid, shape in (("patient050_frame01", (5, 20, 22)), ("patient050_frame02", (4, 20, 22))):
        write_h5(root / "data" / f"{vid}.h5", _img(shape), _lab(shape, 4))
    (root / "val.list").write_text("patient050_frame01\npatient050_frame02\n")
    return root


LA_IDS = ["0RZDK210BSMWAA6467LU", "1D7CUD1955YZPGK8XHJX", "06SR5RBREL16DQ6M8LWS"]


def make_la_replica(root: Path, shape=(12, 10, 8)) -> Path:
    """UA-MT LA layout, with the space in the folder name."""
    for i, cid in enumerate(LA_IDS):
        write_h5(root / "2018LA_Seg_Training Set" / cid / "mri_norm2.h5", _img(shape, i), _lab(shape, 2, i))
    (root / "train.list").write_text("\n".join(LA_IDS[:2]) + "\n")
    (root / "val.list").write_text(LA_IDS[2] + "\n")
    return root


# --------------------------------------------------------------------------- replicas


def test_acdc_replica_ids_shapes_groups(tmp_path):
    reader = create_reader("acdc", make_acdc_replica(tmp_path / "ACDC"))
    assert isinstance(reader, ACDCReader)
    assert (reader.name, reader.spatial_dims, reader.num_classes) == ("acdc", 2, 4)
    assert reader.splits() == ["train", "val"]

    train = reader.cases("train")
    assert [r.case_id for r in train][:3] == [
        "patient007_frame01_slice_1",
        "patient007_frame01_slice_2",
        "patient007_frame01_slice_3",
    ]
    assert len(train) == 7
    assert [r.group for r in train] == ["patient007"] * 5 + ["patient002"] * 2
    assert all(Path(r.path).parent.name == "slices" for r in train)

    case = reader.load(train[0])
    assert case.image.shape == (1, 20, 24) and case.image.dtype == np.float32
    assert case.label.shape == (20, 24) and case.label.dtype == np.uint8
    assert case.spacing is None and case.group == "patient007" and case.meta["kind"] == "slice"
    np.testing.assert_array_equal(case.image[0], _img((20, 24), 1))

    val = reader.cases("val")
    assert [r.case_id for r in val] == ["patient050_frame01", "patient050_frame02"]
    vol = reader.load(val[1])
    assert vol.image.shape == (1, 4, 20, 22) and vol.label.shape == (4, 20, 22)
    assert vol.group == "patient050" and vol.meta["kind"] == "volume"

    with pytest.raises(DataError, match="test.list"):
        reader.cases("test")  # the list is absent
    with pytest.raises(ConfigError, match="known splits"):
        reader.cases("training")


def test_la_replica_ids_shapes_groups(tmp_path):
    reader = create_reader("h5caselist", make_la_replica(tmp_path / "LA"))
    assert (reader.name, reader.spatial_dims, reader.num_classes) == ("h5caselist", 3, 2)
    assert reader.splits() == ["train", "val"]
    train = reader.cases("train")
    assert [r.case_id for r in train] == LA_IDS[:2]
    assert [r.group for r in train] == LA_IDS[:2]
    assert "2018LA_Seg_Training Set" in train[0].path
    case = reader.load(reader.cases("val")[0])
    assert case.image.shape == (1, 12, 10, 8) and case.label.shape == (12, 10, 8)
    assert case.case_id == LA_IDS[2] and case.source.endswith("mri_norm2.h5")


def test_pancreas_and_brats_layouts(tmp_path):
    pan = tmp_path / "Pancreas"
    write_h5(pan / "Pancreas_h5" / "image0001_norm.h5", _img((9, 8, 7)), _lab((9, 8, 7), 2))
    (pan / "train.list").write_text("image0001\n")
    reader = H5CaseListReader(pan, **PANCREAS_LAYOUT)
    assert reader.splits() == ["train"]
    assert reader.load(reader.cases("train")[0]).image.shape == (1, 9, 8, 7)

    brats = tmp_path / "BraTS2019"
    # An image stored with a channel axis already (ndim == spatial_dims + 1) is accepted.
    write_h5(brats / "data" / "BraTS19_X_1.h5", _img((2, 6, 6, 5)), _lab((6, 6, 5), 2))
    for split in ("train", "val", "test"):
        (brats / f"{split}.txt").write_text("BraTS19_X_1\n")
    reader = create_reader("h5caselist", brats, **BRATS_LAYOUT)
    assert reader.splits() == ["train", "val", "test"]
    assert reader.load(reader.cases("test")[0]).image.shape == (2, 6, 6, 5)


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def la_bad(tmp_path) -> tuple[H5CaseListReader, Path]:
    root = make_la_replica(tmp_path / "LA", shape=(6, 5, 4))
    return create_reader("h5caselist", root), root


def _case_path(root: Path, cid: str) -> Path:
    return root / "2018LA_Seg_Training Set" / cid / "mri_norm2.h5"


@pytest.mark.parametrize(
    "kind, match",
    [
        ("missing", "file is missing"),
        ("corrupt", "not a readable HDF5 file"),
        ("truncated", "not a readable HDF5 file"),
        ("label_high", r"label values outside \[0, 1\].*: 2, 7"),
        ("shape", r"shapes differ.*\(6, 5, 4\).*\(6, 5, 3\)"),
        ("nan", "3 non-finite"),
        ("nokey", r"missing key 'label' \(the file has keys \['image', 'mask'\]\)"),
        ("ndim", "image has 2 axes .* expected 3"),
        ("float_label", "not integer-valued"),
        ("empty", "image is empty"),
    ],
)
def test_bad_case_gives_data_error(la_bad, kind, match):
    reader, _root = la_bad
    ref = reader.cases("train")[0]
    path = Path(ref.path)
    shape = (6, 5, 4)
    if kind == "missing":
        path.unlink()
    elif kind == "corrupt":
        path.write_bytes(b"this is not an HDF5 file at all" * 10)
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "label_high":
        lab = _lab(shape, 2)
        lab[0, 0, 0], lab[1, 1, 1] = 7, 2
        write_h5(path, _img(shape), lab)
    elif kind == "shape":
        write_h5(path, _img(shape), _lab((6, 5, 3), 2))
    elif kind == "nan":
        img = _img(shape)
        img[0, 0, :3] = np.nan
        write_h5(path, img, _lab(shape, 2))
    elif kind == "nokey":
        write_h5(path, _img(shape), None, mask=_lab(shape, 2))
    elif kind == "ndim":
        write_h5(path, _img((6, 5)), _lab((6, 5), 2))
    elif kind == "float_label":
        write_h5(path, _img(shape), _lab(shape, 2).astype(np.float32) * 0.5)
    elif kind == "empty":
        write_h5(path, np.zeros((6, 0, 4), np.float32), np.zeros((6, 0, 4), np.uint8))
    with pytest.raises(DataError, match=match) as info:
        reader.load(ref)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)


def test_acdc_label_above_class_count(tmp_path):
    root = make_acdc_replica(tmp_path / "ACDC")
    ref = ACDCReader(root).cases("train")[0]
    lab = _lab((20, 24), 4)
    lab[3, 3] = 4
    write_h5(Path(ref.path), _img((20, 24)), lab)
    with pytest.raises(DataError, match=r"outside \[0, 3\].*: 4") as info:
        ACDCReader(root).load(ref)
    assert info.value.path == ref.path
    # A 3D array in the slice folder is not silently read as channels.
    write_h5(Path(ref.path), _img((3, 20, 24)), _lab((3, 20, 24), 4))
    with pytest.raises(DataError, match="image has 3 axes .* expected 2"):
        ACDCReader(root).load(ref)


def test_missing_root_list_and_unknown_reader(tmp_path):
    with pytest.raises(DataError, match="root folder is missing") as info:
        ACDCReader(tmp_path / "nowhere")
    assert info.value.path == str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="root folder is missing"):
        create_reader("h5caselist", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    reader = H5CaseListReader(tmp_path / "empty")
    assert reader.splits() == []
    with pytest.raises(DataError, match="split list file is missing") as info:
        reader.cases("train")
    assert info.value.path == str(tmp_path / "empty" / "train.list")
    with pytest.raises(ConfigError, match="unknown dataset reader 'nnunetv3'.*acdc.*h5caselist.*nnunet.*synthetic"):
        create_reader("nnunetv3", tmp_path)
    with pytest.raises(ConfigError, match="bad options"):
        create_reader("acdc", tmp_path, num_clases=4)
    with pytest.raises(DataError, match="dataset.json"):
        create_reader("synthetic", tmp_path / "empty")


# --------------------------------------------------------------------------- synthetic data


def test_synthetic_2d_deterministic_complete_and_readable(tmp_path):
    t0 = time.perf_counter()
    root = make_synthetic_dataset(tmp_path / "a", seed=3)
    elapsed = time.perf_counter() - t0
    assert elapsed < 4.0, f"24 synthetic 2D cases took {elapsed:.2f} s"  # target < 2 s; CPU is shared
    make_synthetic_dataset(tmp_path / "b", seed=3)
    make_synthetic_dataset(tmp_path / "c", num_cases=4, val_cases=1, seed=4)

    info = json.loads((root / "dataset.json").read_text())
    assert info["name"] == "synthetic" and info["spatial_dims"] == 2 and info["num_classes"] == 4
    assert info["path_pattern"] == "cases/{id}.h5"
    assert info["labels"] == {"background": 0, "organ": 1, "ring": 2, "vessel": 3}

    reader = create_reader("synthetic", root)
    assert (reader.name, reader.spatial_dims, reader.num_classes) == ("synthetic", 2, 4)
    train, val = reader.cases("train"), reader.cases("val")
    assert len(train) == 18 and len(val) == 6
    assert val[-1].case_id == "case_023"

    other = create_reader("synthetic", tmp_path / "b")
    different = create_reader("synthetic", tmp_path / "c")
    for ref in train[:3]:
        a = reader.load(ref)
        b = other.load(other.cases("train")[train.index(ref)])
        assert a.image.shape == (1, 96, 96) and a.image.dtype == np.float32
        assert a.label.dtype == np.uint8
        assert a.image.tobytes() == b.image.tobytes() and a.label.tobytes() == b.label.tobytes()
        # Every class in every case; roughly z-scored image.
        assert set(np.unique(a.label)) == {0, 1, 2, 3}
        assert abs(a.image.mean()) < 1e-3 and abs(a.image.std() - 1) < 1e-2
        # The vessel class is thin: two erosions with a 3x3 square remove nearly all of it,
        # while the organ blob survives them.
        vessel, organ = a.label == 3, a.label == 1
        assert ndimage.binary_erosion(vessel, np.ones((3, 3)), iterations=2).sum() < 0.05 * vessel.sum()
        assert ndimage.binary_erosion(organ, np.ones((3, 3)), iterations=2).sum() > 0.3 * organ.sum()
    c0 = different.load(different.cases("train")[0])
    assert not np.array_equal(c0.image, reader.load(train[0]).image)


def test_synthetic_3d_readable(tmp_path):
    t0 = time.perf_counter()
    root = make_synthetic_dataset(tmp_path / "s3", spatial_dims=3, num_cases=4, val_cases=1, num_classes=5)
    assert time.perf_counter() - t0 < 4.0
    reader = create_reader("synthetic", root)
    assert reader.spatial_dims == 3 and reader.num_classes == 5
    case = reader.load(reader.cases("val")[0])
    assert case.image.shape == (1, 48, 48, 48)
    assert set(np.unique(case.label)) == {0, 1, 2, 3, 4}
    with pytest.raises(ConfigError):
        make_synthetic_dataset(tmp_path / "bad", num_cases=3, val_cases=3)


# --------------------------------------------------------------------------- inspection


def test_inspect_reports_each_problem_with_its_file(tmp_path):
    root = make_acdc_replica(tmp_path / "ACDC")
    reader = ACDCReader(root)
    good = inspect_dataset(reader)
    assert good.ok and good.problems == []
    assert good.splits["train"].listed == 7 and good.splits["train"].loaded == 7
    assert good.splits["train"].groups == 2
    assert good.splits["train"].shape_min == (1, 18, 16) and good.splits["train"].shape_max == (1, 20, 24)
    assert good.splits["val"].label_values == {0, 1, 2, 3}
    assert "train: 7/7 cases loaded" in good.format()

    train = reader.cases("train")
    bad = {}
    bad[train[0].path] = "file is missing"
    Path(train[0].path).unlink()
    Path(train[1].path).write_bytes(b"\x00garbage" * 50)
    bad[train[1].path] = "not a readable HDF5"
    lab = _lab((20, 24), 4)
    lab[0, 0] = 9
    write_h5(Path(train[2].path), _img((20, 24)), lab)
    bad[train[2].path] = "label values outside"
    img = _img((20, 24))
    img[1, 1] = np.inf
    write_h5(Path(train[3].path), img, _lab((20, 24), 4))
    bad[train[3].path] = "1 non-finite"
    write_h5(Path(train[4].path), _img((20, 24)), _lab((20, 23), 4))
    bad[train[4].path] = "shapes differ"
    write_h5(Path(train[5].path), _img((18, 16)), None)
    bad[train[5].path] = "missing key 'label'"

    report = inspect_dataset(reader)
    assert not report.ok
    assert report.splits["train"].loaded == 1 and report.splits["val"].loaded == 2
    assert len(report.problems) == len(bad)
    for path, problem in bad.items():
        line = next(p for p in report.problems if p.startswith(path))
        assert problem in line
    text = report.format()
    assert "6 problem(s)" in text and train[4].path in text


def test_inspect_reports_group_leak_and_missing_list(tmp_path):
    root = make_la_replica(tmp_path / "LA")
    (root / "val.list").write_text(LA_IDS[0] + "\n")  # also in train.list
    reader = H5CaseListReader(root, lists={"train": "train.list", "val": "val.list"})
    report = inspect_dataset(reader, splits=["train", "val", "test"])
    assert not report.ok
    assert any(p.startswith(str(_case_path(root, LA_IDS[0]))) and "data leak" in p for p in report.problems)
    assert any("unknown split 'test'" in p for p in report.problems)


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_acdc(realdata):
    reader = create_reader("acdc", realdata / "ACDC")
    assert reader.num_classes == 4 and reader.spatial_dims == 2
    train, val = reader.cases("train"), reader.cases("val")
    assert len(train) == 1312 and len(val) == 20
    assert len({r.group for r in train}) == 70 and len({r.group for r in val}) == 10
    assert not {r.group for r in train} & {r.group for r in val}
    for ref in (train[0], train[700]):
        case = reader.load(ref)
        assert case.image.ndim == 3 and case.image.shape[0] == 1
        assert case.label.shape == case.image.shape[1:]
        assert set(np.unique(case.label)) <= {0, 1, 2, 3}
        assert 0.0 <= case.image.min() and case.image.max() <= 1.0
    vol = reader.load(val[0])
    assert vol.image.ndim == 4 and vol.image.shape[0] == 1 and vol.label.shape == vol.image.shape[1:]
    assert set(np.unique(vol.label)) == {0, 1, 2, 3}
    counts = [len(select_labeled(train, n, unit="patients")[0]) for n in (1, 3, 7, 14)]
    assert counts == [32, 68, 136, 256]


@pytest.mark.realdata
def test_real_la(realdata):
    reader = create_reader("h5caselist", realdata / "LA")
    assert reader.num_classes == 2 and reader.spatial_dims == 3
    assert reader.splits() == ["train", "val"]
    train, val = reader.cases("train"), reader.cases("val")
    assert len(train) == 32 and len(val) == 8
    for ref in (train[0], val[-1]):
        case = reader.load(ref)
        assert case.image.ndim == 4 and case.image.shape[0] == 1 and case.image.shape[-1] == 88
        assert case.label.shape == case.image.shape[1:]
        assert set(np.unique(case.label)) == {0, 1}
