"""Readers of every benchmark format and of the user's own nnU-Net-style data, on tiny replicas
written here in the exact on-disk layout; `data inspect` problem reports; geometry kept end to end."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from semidiff.cli import main
from semidiff.data import create_reader, detect_reader, inspect_dataset
from semidiff.data.image_io import read_image, read_label_png, write_prediction
from semidiff.errors import ConfigError, DataError

H, W = 24, 32  # frame size of the 2D replicas


def _jpg(path: Path, value: int, rgb: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((H, W, 3) if rgb else (H, W), value, np.uint8)
    arr[: H // 2] = 255 - value  # some contrast, so min-max scaling is defined
    Image.fromarray(arr).save(path, quality=95)


def _class_map(seed: int, classes: int) -> np.ndarray:
    lab = np.zeros((H, W), np.uint8)
    for c in range(1, classes):
        q = (seed * 7 + c * 5) % (H - 6)
        lab[q : q + 5, 2 + 4 * c : 6 + 4 * c] = c
    return lab


# ---------------------------------------------------------------- EndoScapes2023 ------------
def _endoscapes(root: Path) -> dict[str, np.ndarray]:
    """Videos 1-3 train (1, 2 Seg50), 4 val, 5 test; returns the semseg masks written."""
    frames = {"train": {1: [100, 125, 150], 2: [200, 225], 3: [300, 325]}, "val": {4: [400, 425]},
              "test": {5: [500]}}
    masked = {"train": ["1_150", "2_225"], "val": ["4_400"], "test": ["5_500"]}
    seg_videos = {"train": [1, 2], "val": [4], "test": [5]}
    masks = {}
    root.mkdir(parents=True, exist_ok=True)
    for split, vids in frames.items():
        (root / f"{split}_vids.txt").write_text("".join(f"{v:.18e}\n" for v in vids))
        (root / f"{split}_seg_vids.txt").write_text("".join(f"{v:.18e}\n" for v in seg_videos[split]))
        for v, fs in vids.items():
            for f in fs:
                fid = f"{v}_{f}"
                folder = f"{split}_seg" if v in seg_videos[split] else split
                _jpg(root / folder / f"{fid}.jpg", 40 + f % 100)
                _jpg(root / split / f"{fid}.jpg", 40 + f % 100)
        for i, fid in enumerate(masked[split]):
            lab = _class_map(i + len(masks), 7)
            masks[fid] = lab
            (root / "semseg").mkdir(exist_ok=True)
            Image.fromarray(np.stack([lab] * 3, -1)).save(root / "semseg" / f"{fid}.png")
    # Official 12.5% fold 0 holds frames of video 2 only.
    _jpg(root / "12_5" / "train_0" / "2_200.jpg", 90)
    return masks


def _coco_json(root: Path, split: str, masks: dict[str, np.ndarray]) -> None:
    """COCO instance annotations (compressed RLE, as the release) equivalent to the semseg masks."""
    from pycocotools import mask as mask_utils

    images, anns = [], []
    for img_id, (fid, lab) in enumerate(sorted(masks.items()), 1):
        images.append({"id": img_id, "file_name": f"{fid}.jpg", "height": H, "width": W})
        for c in np.unique(lab[lab > 0]):
            rle = mask_utils.encode(np.asfortranarray((lab == c).astype(np.uint8)))
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": int(c), "iscrowd": 0,
                         "area": float((lab == c).sum()), "bbox": [0, 0, 1, 1],
                         "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    cats = [{"id": i, "name": n} for i, n in enumerate(
        ["cystic_plate", "calot_triangle", "cystic_artery", "cystic_duct", "gallbladder", "tool"], 1)]
    (root / f"{split}_seg").mkdir(exist_ok=True)
    (root / f"{split}_seg" / "annotation_coco.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
def test_endoscapes_labeled_unlabeled_folds_and_coco(tmp_path):
    masks = _endoscapes(tmp_path)
    assert detect_reader(tmp_path) == "endoscapes"
    reader = create_reader("endoscapes", tmp_path)
    assert reader.num_classes == 7 and reader.splits() == ["train", "val", "test"]
    train = reader.cases("train")
    assert [r.case_id for r in train] == ["1_150", "2_225"]
    assert [r.group for r in train] == ["1", "2"]
    case = reader.load(train[0])
    assert case.image.shape == (3, H, W) and case.image.dtype == np.float32
    assert 0.0 <= case.image.min() and case.image.max() <= 1.0
    np.testing.assert_array_equal(case.label, masks["1_150"])
    # Unlabeled: the unmasked frames of the Seg50 videos, of the other videos, or both.
    assert [r.case_id for r in reader.unlabeled_cases("train")] == ["1_100", "1_125", "2_200"]
    assert reader.load(reader.unlabeled_cases("train")[0]).label is None
    other = create_reader("endoscapes", tmp_path, unlabeled_source="other_videos")
    assert [r.case_id for r in other.unlabeled_cases("train")] == ["3_300", "3_325"]
    both = create_reader("endoscapes", tmp_path, unlabeled_source="all")
    assert len(both.unlabeled_cases("train")) == 5
    # Frames of one video never cross splits.
    train_groups = {r.group for r in train + both.unlabeled_cases("train")}
    assert train_groups.isdisjoint({r.group for r in reader.cases("val") + reader.cases("test")})
    # Official partial-label fold: only its videos give labeled frames.
    fold = create_reader("endoscapes", tmp_path, labeled_videos="12_5/train_0")
    assert [r.case_id for r in fold.cases("train")] == ["2_225"]
    _jpg(tmp_path / "25" / "train_0" / "3_300.jpg", 90)  # a fold of a video without masks
    with pytest.raises(DataError, match=r"25/train_0: none of the fold's 1 videos has semseg masks"):
        create_reader("endoscapes", tmp_path, labeled_videos="25/train_0").cases("train")
    with pytest.raises(ConfigError, match="fold folder"):
        create_reader("endoscapes", tmp_path, labeled_videos="25/train_9")
    # COCO instance masks as the source give the same class maps.
    _coco_json(tmp_path, "train", {k: masks[k] for k in ("1_150", "2_225")})
    coco = create_reader("endoscapes", tmp_path, mask_source="coco")
    refs = coco.cases("train")
    assert [r.case_id for r in refs] == ["1_150", "2_225"]
    for ref in refs:
        np.testing.assert_array_equal(coco.load(ref).label, masks[ref.case_id])


def test_endoscapes_video_in_two_splits_is_an_error(tmp_path):
    _endoscapes(tmp_path)
    (tmp_path / "val_vids.txt").write_text("4.0\n2.0\n")
    with pytest.raises(DataError, match=r"val_vids.txt.*video 2"):
        create_reader("endoscapes", tmp_path).splits()


# ---------------------------------------------------------------- MOSXAV --------------------
PALETTE = [0, 0, 0, 200, 30, 30, 30, 200, 30, 200, 200, 30, 30, 30, 200, 120, 120, 120]


def _palette_png(path: Path, lab: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(lab)
    img.putpalette(PALETTE + [0] * (768 - len(PALETTE)))
    img.save(path)


def _mosxav(root: Path) -> None:
    for part, seqs, n, every in (("trainval", ["v01", "v02", "v03"], 10, 5), ("test", ["v01"], 3, 1)):
        for s, seq in enumerate(seqs):
            for f in range(n):
                _jpg(root / part / "JPEGImages" / seq / f"{f:05d}.jpg", 30 + 10 * f, rgb=False)
                if f % every == 0:
                    lab = _class_map(f + s, 5)
                    if part == "test":
                        lab[-3:, -3:] = 5  # "others"
                    _palette_png(root / part / "Annotations_Semantic" / seq / f"{f:05d}.png", lab)
    (root / "trainval" / "ImageSets").mkdir(parents=True)
    (root / "trainval" / "ImageSets" / "train.txt").write_text("v01\nv02\n")
    (root / "trainval" / "ImageSets" / "val.txt").write_text("v03\n")


def test_mosxav_frames_sequences_ignore_class_and_palette(tmp_path):
    _mosxav(tmp_path)
    assert detect_reader(tmp_path) == "mosxav"
    reader = create_reader("mosxav", tmp_path)
    assert reader.splits() == ["train", "val", "test"] and reader.num_classes == 5
    train, unl = reader.cases("train"), reader.unlabeled_cases("train")
    assert len(train) == 4 and len(unl) == 16  # every 5th of 2 x 10 frames annotated
    assert {r.group for r in train} == {r.group for r in unl} == {"trainval/v01", "trainval/v02"}
    assert {r.group for r in reader.cases("val")} == {"trainval/v03"}
    case = reader.load(train[1])
    assert case.case_id == "trainval_v01_00005" and case.image.shape == (1, H, W)
    np.testing.assert_array_equal(case.label, _class_map(5, 5))
    assert reader.load(unl[0]).label is None
    # Test class 5 becomes the ignore value that evaluation leaves out; or stays a class.
    test = reader.load(reader.cases("test")[0])
    assert test.meta["ignore_index"] == 255
    assert (test.label[-3:, -3:] == 255).all() and set(np.unique(test.label)) <= {0, 1, 2, 3, 4, 255}
    keep = create_reader("mosxav", tmp_path, test_ignore_class=None, num_classes=6)
    assert (keep.load(keep.cases("test")[0]).label[-3:, -3:] == 5).all()
    with pytest.raises(DataError, match=r"Annotations_Semantic/v01/00000.png.*label values 5"):
        create_reader("mosxav", tmp_path, test_ignore_class=None).load(reader.cases("test")[0])
    # Predictions are written as palette PNGs with the dataset's palette.
    assert reader.palette[: len(PALETTE)] == PALETTE
    src = read_image(train[0].path)
    out = write_prediction(case.label, src, tmp_path / "pred.png", palette=reader.palette)
    ids, pal = read_label_png(out)
    assert Image.open(out).mode == "P" and pal[: len(PALETTE)] == PALETTE
    np.testing.assert_array_equal(ids, case.label)


# ---------------------------------------------------------------- nnU-Net (own data) --------
GEOM = {"spacing": (0.8, 0.9, 2.5), "origin": (10.0, -4.0, 7.5),
        "direction": (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)}


def _nii(path: Path, arr: np.ndarray, geom: dict = GEOM) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(geom["spacing"])
    img.SetOrigin(geom["origin"])
    img.SetDirection(geom["direction"])
    sitk.WriteImage(img, str(path))


def _nnunet3d(root: Path, n_cases: int = 4, n_unlabeled: int = 2, shape=(6, 10, 12)) -> dict:
    """Two-channel 3D replica; returns {case: (channels, label)}."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "tumour": 1, "oedema": 2},
        "numTraining": n_cases, "file_ending": ".nii.gz"}))
    rng = np.random.default_rng(0)
    data = {}
    for i in range(n_cases):
        case = f"case{i:03d}"
        lab = np.zeros(shape, np.uint8)
        lab[1:4, 2:6, 3:8] = 1
        lab[2:3, 3:5, 4:6] = 2
        chans = [rng.normal(100 * c + 10 * lab, 1.0).astype(np.float32) for c in (1, 2)]
        for c, arr in enumerate(chans):
            _nii(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", arr)
        _nii(root / "labelsTr" / f"{case}.nii.gz", lab)
        data[case] = (np.stack(chans), lab)
    for i in range(n_unlabeled):
        for c in range(2):
            _nii(root / "imagesUnlabeled" / f"extra{i:03d}_{c:04d}.nii.gz", rng.normal(size=shape).astype(np.float32))
    return data


def test_nnunet_3d_multichannel_geometry_splits_and_unlabeled(tmp_path):
    data = _nnunet3d(tmp_path / "ds")
    root = tmp_path / "ds"
    assert detect_reader(root) == "nnunet"
    reader = create_reader("nnunet", root, normalize="none")
    assert (reader.spatial_dims, reader.num_classes, reader.in_channels) == (3, 3, 2)
    assert reader.class_names == ["background", "tumour", "oedema"]
    train, val = reader.cases("train"), reader.cases("val")
    assert len(train) == 3 and len(val) == 1  # seeded hold-out of 20% of 4 cases
    assert {r.case_id for r in train + val} == set(data)
    # Same seed, same split; another seed may differ but still covers every case once.
    assert [r.case_id for r in create_reader("nnunet", root).cases("val")] == [val[0].case_id]
    unl = reader.unlabeled_cases("train")
    assert [r.case_id for r in unl] == ["unlabeled_extra000", "unlabeled_extra001"]
    case = reader.load(train[0])
    image, label = data[train[0].case_id]
    np.testing.assert_allclose(case.image, image)
    np.testing.assert_array_equal(case.label, label)
    assert case.spacing == pytest.approx(GEOM["spacing"][::-1])  # array (z, y, x) order
    assert case.meta["geometry"]["origin"] == pytest.approx(GEOM["origin"])
    assert case.meta["geometry"]["direction"] == pytest.approx(GEOM["direction"])
    u = reader.load(unl[0])
    assert u.label is None and u.image.shape == (2, 6, 10, 12)
    z = create_reader("nnunet", root).load(train[0]).image  # default z-score per channel
    np.testing.assert_allclose(z.reshape(2, -1).mean(1), 0.0, atol=1e-5)
    # nnU-Net folds file takes precedence over the seeded hold-out.
    (root / "splits_final.json").write_text(json.dumps([{"train": ["case000", "case001"], "val": ["case003"]}]))
    folded = create_reader("nnunet", root)
    assert [r.case_id for r in folded.cases("train")] == ["case000", "case001"]
    assert [r.case_id for r in folded.cases("val")] == ["case003"]
    # A list of unlabeled images adds to the folder.
    (root / "more.txt").write_text("imagesUnlabeled/extra000_0000.nii.gz\n")
    listed = create_reader("nnunet", root, unlabeled_dir=None, unlabeled_list="more.txt")
    assert [r.case_id for r in listed.unlabeled_cases()] == ["unlabeled_extra000"]


def _nnunet2d(root: Path, n_cases: int = 4, n_unlabeled: int = 3) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "grey"}, "labels": {"background": 0, "a": 1, "b": 2, "c": 3},
        "numTraining": n_cases, "file_ending": ".png"}))
    out = {}
    for i in range(n_cases):
        lab = _class_map(i, 4)
        img = (40 + 50 * lab + 3 * i).astype(np.uint8)
        (root / "imagesTr").mkdir(exist_ok=True)
        (root / "labelsTr").mkdir(exist_ok=True)
        Image.fromarray(img).save(root / "imagesTr" / f"img{i}_0000.png")
        Image.fromarray(lab).save(root / "labelsTr" / f"img{i}.png")
        out[f"img{i}"] = (img, lab)
    (root / "imagesUnlabeled").mkdir(exist_ok=True)
    for i in range(n_unlabeled):
        Image.fromarray((40 + 50 * _class_map(i + 9, 4)).astype(np.uint8)).save(
            root / "imagesUnlabeled" / f"u{i}_0000.png")
    return out


def test_nnunet_2d_png(tmp_path):
    data = _nnunet2d(tmp_path)
    reader = create_reader("nnunet", tmp_path, normalize="minmax", val_fraction=0.0)
    assert reader.spatial_dims == 2 and reader.splits() == ["train"]
    refs = reader.cases("train")
    assert [r.case_id for r in refs] == ["img0", "img1", "img2", "img3"]
    assert len(reader.unlabeled_cases()) == 3
    case = reader.load(refs[2])
    img, lab = data["img2"]
    assert case.image.shape == (1, H, W) and case.spacing is None
    np.testing.assert_allclose(case.image[0], (img - img.min()) / np.ptp(img), atol=1e-6)
    np.testing.assert_array_equal(case.label, lab)


# ---------------------------------------------------------------- 3D h5 presets -------------
def _h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["image"], f["label"] = image, label


def test_brats_and_pancreas_h5_presets(tmp_path):
    rng = np.random.default_rng(1)
    brats, panc = tmp_path / "BraTS2019", tmp_path / "Pancreas"
    for split, ids in (("train", ["BraTS19_a", "BraTS19_b"]), ("val", ["BraTS19_c"]), ("test", ["BraTS19_d"])):
        (brats / "data").mkdir(parents=True, exist_ok=True)
        (brats / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for i in ids:
            _h5(brats / "data" / f"{i}.h5", rng.normal(size=(8, 9, 10)).astype(np.float32),
                (rng.random((8, 9, 10)) > 0.7).astype(np.uint8))
    for split, ids in (("train", ["image0001", "image0002"]), ("test", ["image0003"])):
        panc.mkdir(exist_ok=True)
        (panc / f"{split}.list").write_text("".join(f"{i}\n" for i in ids))
        for i in ids:
            _h5(panc / "Pancreas_h5" / f"{i}_norm.h5", rng.random((10, 9, 8)).astype(np.float32),
                np.zeros((10, 9, 8), np.uint8))
    assert detect_reader(brats) == "brats" and detect_reader(panc) == "pancreas"
    b = create_reader("brats", brats)
    assert b.splits() == ["train", "val", "test"] and len(b.cases("train")) == 2
    case = b.load(b.cases("val")[0])
    assert case.image.shape == (1, 8, 9, 10) and set(np.unique(case.label)) <= {0, 1}
    p = create_reader("pancreas", panc)
    assert p.splits() == ["train", "test"]
    assert p.load(p.cases("test")[0]).image.shape == (1, 10, 9, 8)


# ---------------------------------------------------------------- inspect problems ----------
def test_inspect_reports_every_problem_with_its_file(tmp_path, capsys):
    root = tmp_path / "own"
    _nnunet3d(root, n_cases=7, n_unlabeled=1)
    shape = (6, 10, 12)
    (root / "labelsTr" / "case001.nii.gz").unlink()  # image without label
    bad = np.zeros(shape, np.uint8)
    bad[0, 0, 0] = 7
    _nii(root / "labelsTr" / "case002.nii.gz", bad)  # value not in dataset.json
    _nii(root / "labelsTr" / "case003.nii.gz", np.zeros((6, 10, 11), np.uint8))  # shape mismatch
    _nii(root / "labelsTr" / "case004.nii.gz", np.zeros(shape, np.uint8), {**GEOM, "spacing": (1.0, 0.9, 2.5)})
    (root / "imagesTr" / "case005_0001.nii.gz").write_bytes(b"not a nifti")  # unreadable
    _nii(root / "labelsTr" / "case009.nii.gz", np.zeros(shape, np.uint8))  # label without image
    (root / "imagesUnlabeled" / "extra000_0001.nii.gz").unlink()  # unlabeled case lacks a channel

    assert main(["data", "inspect", str(root)]) == 1
    out = capsys.readouterr().out
    expected = {
        "labelsTr/case001.nii.gz": "label of image case001_0000.nii.gz is missing",
        "labelsTr/case002.nii.gz": "label values 7 are not among the declared classes [0, 1, 2]",
        "labelsTr/case003.nii.gz": "label shape (6, 10, 11) differs",
        "labelsTr/case004.nii.gz": "label spacing",
        "imagesTr/case005_0001.nii.gz": "cannot read image",
        "imagesTr/case009_0000.nii.gz": "is missing",
        "imagesUnlabeled/extra000_0001.nii.gz": "channel 1 of case extra000_0000.nii.gz is missing",
    }
    lines = out.splitlines()
    for path, problem in expected.items():
        assert any(path in line and problem in line for line in lines), f"{path}: {problem}\n{out}"
    assert not any("case000" in line or "case006" in line for line in lines)  # the good cases
    # The only good labeled case still loads; the report counts it.
    reader = create_reader("nnunet", root, val_fraction=0.0)
    report = inspect_dataset(reader)
    assert report.splits["train"].loaded == 2 and report.splits["train"].listed == 8  # case000, case006

    empty = tmp_path / "empty"
    (empty / "imagesTr").mkdir(parents=True)
    (empty / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1},
                                                    "file_ending": ".nii.gz"}))
    assert main(["data", "inspect", str(empty)]) == 1
    assert "empty labeled set" in capsys.readouterr().out
    _nii(empty / "imagesTr" / "scan1.nii.gz", np.zeros((2, 3, 4), np.float32))  # forgot the _0000 suffix
    assert main(["data", "inspect", str(empty)]) == 1
    out = capsys.readouterr().out
    assert "imagesTr: no <case>_0000.nii.gz files: empty labeled set (scan1.nii.gz and others lack" in out


def test_inspect_frame_datasets_name_missing_frames(tmp_path, capsys):
    _endoscapes(tmp_path / "endo")
    for p in ((tmp_path / "endo" / "train_seg" / "2_225.jpg"), (tmp_path / "endo" / "train" / "2_225.jpg")):
        p.unlink()
    assert main(["data", "inspect", str(tmp_path / "endo")]) == 1
    out = capsys.readouterr().out
    assert "train_seg/2_225.jpg: file not found" in out and "reader: endoscapes" in out
    _mosxav(tmp_path / "mos")
    assert main(["data", "inspect", str(tmp_path / "mos")]) == 0
    out = capsys.readouterr().out
    assert "train (unlabeled): 16/16 cases loaded" in out and "no problems found" in out


# ---------------------------------------------------------------- end to end ----------------
def _train_cfg(tmp_path: Path, root: Path, dims: int, name: str) -> dict:
    patch = [16, 16] if dims == 2 else [16, 16, 16]
    net = ({"net": "unet2d", "net_options": {"features": [4, 8, 8, 8, 8]}} if dims == 2
           else {"net": "unet3d", "net_options": {"features": [4, 4, 8, 8, 8]}})
    classes = 4 if dims == 2 else 3
    return {
        "experiment": {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 0},
        "data": {"reader": "nnunet", "root": str(root), "reader_options": {"val_fraction": 0.25},
                 "labeled": 2, "patch_size": patch, "normalize": "zscore", "volume_axes": "zyx", "cache": True},
        "model": {**net, "num_classes": classes, "in_channels": 1 if dims == 2 else 2},
        "method": {"name": "mean_teacher"},
        "train": {"max_steps": 2, "labeled_batch": 2, "unlabeled_batch": 2, "optimizer": "adamw", "lr": 1e-3,
                  "val_every": 2, "log_every": 1, "accelerator": "cpu", "progress_bar": False},
        "eval": {"overlay_cases": 0, "stride": [8, 8] if dims == 2 else [8, 8, 8]},
    }


def test_short_semi_supervised_training_on_own_data_then_predict_keeps_geometry(tmp_path):
    import nibabel as nib

    from semidiff.config import config_from_dict
    from semidiff.engine.data import build_reader, build_splits
    from semidiff.engine.train import train

    root3d = tmp_path / "own3d"
    _nnunet3d(root3d, n_cases=4, n_unlabeled=2, shape=(8, 10, 12))
    cfg = config_from_dict(_train_cfg(tmp_path, root3d, 3, "own3d"))
    splits = build_splits(cfg, build_reader(cfg))
    # 3 training cases, 2 labeled; the third and the unlabeled folder feed the unlabeled stream.
    assert len(splits.labeled) == 2 and len(splits.unlabeled) == 3 and len(splits.val) == 1
    res = train(cfg, log=lambda *_: None)
    assert 0.0 <= res["last"]["summary"]["mean"]["dice"] <= 1.0
    run = cfg.run_dir()
    # predict on a two-channel case: the output NIfTI has the input's affine (spacing, origin, direction).
    src = root3d / "imagesTr" / "case000_0000.nii.gz"
    assert main(["predict", str(run), str(src), str(tmp_path / "pred.nii.gz")]) == 0
    pred, ref = nib.load(tmp_path / "pred.nii.gz"), nib.load(src)
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-5)
    assert pred.shape == ref.shape and set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}
    # A folder of nnU-Net files predicts per case, named <case>.nii.gz.
    assert main(["predict", str(run), str(root3d / "imagesUnlabeled"), str(tmp_path / "preds")]) == 0
    assert sorted(p.name for p in (tmp_path / "preds").iterdir()) == ["extra000.nii.gz", "extra001.nii.gz"]

    root2d = tmp_path / "own2d"
    _nnunet2d(root2d)
    cfg2 = config_from_dict(_train_cfg(tmp_path, root2d, 2, "own2d"))
    assert len(build_splits(cfg2, build_reader(cfg2)).unlabeled) == 4  # 1 unselected + 3 unlabeled
    res2 = train(cfg2, log=lambda *_: None)
    assert 0.0 <= res2["last"]["summary"]["mean"]["dice"] <= 1.0


def test_frame_dataset_training_eval_with_ignore_and_palette_predictions(tmp_path, monkeypatch):
    """MOSXAV replica: unannotated frames feed the unlabeled stream, the test set's ignore class is
    left out of the metrics, and predictions of JPEG frames are palette PNGs like the masks."""
    from semidiff.config import config_from_dict
    from semidiff.engine.data import build_reader, build_splits
    from semidiff.engine.train import train

    root = tmp_path / "mos"
    _mosxav(root)
    tree = {
        "experiment": {"name": "mos", "output_dir": str(tmp_path / "runs"), "seed": 0},
        "data": {"reader": "mosxav", "root": str(root), "labeled": 3, "patch_size": [16, 16], "normalize": "minmax"},
        "model": {"net": "unet2d", "net_options": {"features": [4, 8, 8, 8, 8]}, "num_classes": 5},
        "method": {"name": "mean_teacher"},
        "train": {"max_steps": 2, "labeled_batch": 2, "unlabeled_batch": 2, "optimizer": "adamw", "lr": 1e-3,
                  "val_every": 2, "log_every": 1, "accelerator": "cpu", "progress_bar": False},
        "eval": {"overlay_cases": 0},
    }
    cfg = config_from_dict(tree)
    splits = build_splits(cfg, build_reader(cfg))
    assert len(splits.labeled) == 3 and len(splits.unlabeled) == 1 + 16 and len(splits.val) == 2
    train(cfg, log=lambda *_: None)
    run = cfg.run_dir()
    import semidiff.evaluation.evaluate as evaluate_module

    scored_with = []
    original = evaluate_module.case_metrics

    def recording(*args, **kwargs):
        scored_with.append(kwargs.get("ignore_index"))
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "case_metrics", recording)
    assert main(["eval", str(run), "--split", "test", "--checkpoint", "last", "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["protocol"]["split"] == "test"
    assert scored_with == [255, 255, 255]  # every test frame scored with "others" ignored
    frames = root / "test" / "JPEGImages" / "v01"
    assert main(["predict", str(run), str(frames), str(tmp_path / "pred")]) == 0
    outs = sorted((tmp_path / "pred").iterdir())
    assert [p.name for p in outs] == ["00000.png", "00001.png", "00002.png"]
    ids, pal = read_label_png(outs[0])
    assert Image.open(outs[0]).mode == "P" and pal[: len(PALETTE)] == PALETTE
    assert ids.shape == (H, W) and ids.max() < 5


_FRAME_CONFIGS = sorted(p for d in ("endoscapes", "mosxav")
                        for p in (Path(__file__).resolve().parents[1] / "configs" / d).glob("[!_]*.yaml"))  # not bases


@pytest.mark.parametrize("config", _FRAME_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_frame_dataset_config_matches_its_reader(tmp_path, config):
    """The EndoScapes and MOSXAV configs fit their reader as shipped (channels, class count and names,
    splits, reader options): only size, steps and the replica's labeled share are changed, and two
    training steps with the end-of-training validation run on a replica in the release layout."""
    from semidiff.config import load_config
    from semidiff.engine.train import train

    root = tmp_path / "data"
    (_endoscapes if config.parent.name == "endoscapes" else _mosxav)(root)
    semi = not config.stem.startswith("supervised")
    cfg = load_config(config, [
        f"data.root={root}", "data.patch_size=[16,32]", "data.num_workers=0",
        # one of the replica's two training videos/sequences (EndoScapes counts videos, MOSXAV a share)
        "data.labeled=1" if config.parent.name == "endoscapes" else "data.labeled=0.5",
        # protodiff_unet takes the width through its backbone's options
        f"model.net_options.{'backbone_options.' if 'protodiff_unet' in config.stem else ''}features=[4,8,8,8,8]",
        f"experiment.output_dir={tmp_path / 'runs'}", "train.max_steps=2", "train.val_every=2",
        "train.labeled_batch=2", f"train.unlabeled_batch={2 if semi else 0}",
        "train.accelerator=cpu", "train.progress_bar=false", "eval.overlay_cases=0",
    ])
    train(cfg, log=lambda *_: None)
    summary = json.loads((cfg.run_dir() / "eval_val_last" / "summary.json").read_text())
    assert list(summary["per_class"]) == cfg.model.class_names[1:]
    assert summary["protocol"]["method"] == cfg.method.name
    assert np.isfinite(summary["mean"]["dice"])


@pytest.mark.parametrize("override, key", [(["model.in_channels=1"], "model.in_channels"),
                                            (["model.num_classes=3", "model.class_names=null"], "model.num_classes")])
def test_config_that_does_not_fit_the_data_is_named_before_training(tmp_path, override, key):
    """RGB EndoScapes frames with a one-channel network, or class ids beyond the network's classes:
    a ConfigError naming the frame's file and the key to change, before a run folder is made."""
    from semidiff.config import load_config
    from semidiff.engine.train import train
    from semidiff.errors import ConfigError

    root = tmp_path / "data"
    _endoscapes(root)
    config = Path(__file__).resolve().parents[1] / "configs" / "endoscapes" / "supervised_full.yaml"
    cfg = load_config(config, [f"data.root={root}", "data.patch_size=[16,32]", "data.num_workers=0",
                               "data.labeled=1", f"experiment.output_dir={tmp_path / 'runs'}",
                               "train.accelerator=cpu", *override])
    with pytest.raises(ConfigError, match=key) as err:
        train(cfg, log=lambda *_: None)
    assert str(root) in str(err.value)
    assert not cfg.run_dir().exists()
