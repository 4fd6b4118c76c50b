"""`semidiff predict` sees exactly what training and `semidiff eval` saw (issue 29).

For every reader, a tiny model is trained once (3 steps) on a replica written in the reader's exact
on-disk layout, with the intensities the real data has (LA: z-scored over the whole scan, then
cropped, so the stored crop is not zero-mean; nnU-Net: raw intensities in the hundreds; frames:
8-bit JPEGs). Then the labels `semidiff predict` writes for a validation case, from the case's
original file, must equal the labels `semidiff eval` computes for it, voxel for voxel; and so must
those of the model exported to TorchScript and ONNX.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from semidiff.cli import main
from semidiff.config import config_from_dict, load_config
from semidiff.data.image_io import read_label_png
from semidiff.data.synthetic import make_synthetic_dataset, synthetic_case
from semidiff.engine.data import build_reader, build_splits
from semidiff.engine.module import load_module
from semidiff.engine.train import train
from semidiff.evaluation.evaluate import evaluate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_2D = {"net": "unet2d", "net_options": {"features": [4, 8, 8, 16, 16]}}
TINY_3D = {"net": "unet3d", "net_options": {"features": [4, 4, 8, 8, 8]}}
LA_PATTERN = "2018LA_Seg_Training Set/{id}/mri_norm2.h5"


def _case(shape, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return synthetic_case(np.random.default_rng(seed), tuple(shape), classes)


def _h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image.astype(np.float32))
        f.create_dataset("label", data=label.astype(np.uint8))


def _raw_8bit(image: np.ndarray) -> np.ndarray:
    """A z-scored synthetic image as a scanner's 8-bit intensities."""
    return np.clip(np.round(60 + 40 * image), 0, 255).astype(np.uint8)


# ---- replicas, one per reader: (data section, model section) ------------------------------------
def acdc(root: Path):
    """SSL4MIS layout: training slices of one min-max scaled volume per patient; one validation volume."""
    ids = []
    for p in (1, 2, 9):
        vol = [_case((32, 32), 4, 10 * p + s) for s in range(3)]
        image = np.stack([v[0] for v in vol])
        image = (image - image.min()) / (image.max() - image.min())  # min-max per volume, as stored
        label = np.stack([v[1] for v in vol])
        if p == 9:
            _h5(root / "data" / "patient009_frame01.h5", image, label)
            continue
        for s in range(3):
            ids.append(f"patient00{p}_frame01_slice_{s}")
            _h5(root / "data" / "slices" / f"{ids[-1]}.h5", image[s], label[s])
    (root / "train_slices.list").write_text("\n".join(ids) + "\n")
    (root / "val.list").write_text("patient009_frame01\n")
    data = {"reader": "acdc", "labeled": 2, "labeled_unit": "patients", "patch_size": [32, 32], "normalize": "minmax"}
    return data, {**TINY_2D, "num_classes": 4}


def la(root: Path):
    """UA-MT layout: each (x, y, z) scan z-scored whole, then cropped in x and y around the atrium."""
    for i, case_id in enumerate(["caseA", "caseB", "caseV"]):
        image, label = _case((40, 24, 16), 2, i)
        raw = _raw_8bit(image).astype(np.float64)
        z = (raw - raw.mean()) / raw.std()
        xs = np.flatnonzero(label.any(axis=(1, 2)))
        x0, x1 = max(xs[0] - 2, 0), min(xs[-1] + 3, 40)
        x0, x1 = (x0, max(x1, x0 + 20)) if x1 - x0 < 20 else (x0, x1)
        _h5(root / LA_PATTERN.format(id=case_id), z[x0:x1], label[x0:x1])
    (root / "train.list").write_text("caseA\ncaseB\n")
    (root / "val.list").write_text("caseV\n")
    data = {"reader": "h5caselist", "reader_options": {"num_classes": 2}, "labeled": 2, "patch_size": [16, 16, 16],
            "normalize": "zscore", "volume_axes": "xyz", "resample_factor": 0.9}
    return data, {**TINY_3D, "num_classes": 2}


def synthetic(root: Path):
    make_synthetic_dataset(root, spatial_dims=2, num_cases=4, size=(40, 36), num_classes=3, val_cases=1, seed=0)
    return {"reader": "synthetic", "labeled": 2, "patch_size": [32, 32]}, {**TINY_2D, "num_classes": 3}


def _nnunet(root: Path, dims: int):
    shape = (32, 32) if dims == 2 else (12, 16, 16)
    ending = ".png" if dims == 2 else ".nii.gz"
    channels = 1 if dims == 2 else 2
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {str(c): f"ch{c}" for c in range(channels)},
        "labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ending}))
    for i in range(4):
        image, label = _case(shape, 3, i)
        if dims == 2:
            Image.fromarray(_raw_8bit(image)).save(root / "imagesTr" / f"case{i}_0000.png")
            Image.fromarray(label.astype(np.uint8)).save(root / "labelsTr" / f"case{i}.png")
            continue
        # Raw intensities in the hundreds, one scale per channel; a scanner's geometry.
        arrays = {f"imagesTr/case{i}_{c:04d}": (300 * (c + 1) + 80 * image).astype(np.float32) for c in range(channels)}
        for name, arr in {**arrays, f"labelsTr/case{i}": label.astype(np.uint8)}.items():
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing((0.8, 0.9, 2.5))
            img.SetOrigin((5.0, -3.0, 1.0))
            sitk.WriteImage(img, str(root / f"{name}.nii.gz"))
    data = {"reader": "nnunet", "reader_options": {"val_fraction": 0.25}, "labeled": 3,
            "patch_size": list(shape) if dims == 2 else [12, 16, 16]}
    return data, {**(TINY_2D if dims == 2 else TINY_3D), "num_classes": 3, "in_channels": channels}


def nnunet_2d(root: Path):
    return _nnunet(root, 2)


def nnunet_3d(root: Path):
    return _nnunet(root, 3)


def endoscapes(root: Path):
    """Seg50 layout: RGB JPEG frames, grey class-id masks in semseg/; videos 1, 2 train, 4 val."""
    for n, (split, video) in enumerate([("train", 1), ("train", 2), ("val", 4)]):
        (root / f"{split}_seg").mkdir(parents=True, exist_ok=True)
        image, label = _case((32, 48), 7, n)
        rgb = np.stack([_raw_8bit(image), _raw_8bit(0.8 * image), _raw_8bit(-image)], -1)
        Image.fromarray(rgb).save(root / f"{split}_seg" / f"{video}_100.jpg", quality=95)
        (root / "semseg").mkdir(exist_ok=True)
        Image.fromarray(label.astype(np.uint8)).save(root / "semseg" / f"{video}_100.png")
    (root / "train_seg_vids.txt").write_text("1.0e+00\n2.0e+00\n")
    (root / "val_seg_vids.txt").write_text("4.0e+00\n")
    data = {"reader": "endoscapes", "reader_options": {"channels": 3}, "labeled": 1.0, "labeled_unit": "fraction",
            "patch_size": [32, 32], "normalize": "minmax"}
    return data, {**TINY_2D, "num_classes": 7, "in_channels": 3}


def mosxav(root: Path):
    """trainval layout: grey JPEG frames, palette masks on every 5th frame; v01, v02 train, v03 val."""
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128]
    for n, seq in enumerate(["v01", "v02", "v03"]):
        for f in (0, 1):
            image, label = _case((32, 40), 5, 2 * n + f)
            (root / "trainval" / "JPEGImages" / seq).mkdir(parents=True, exist_ok=True)
            Image.fromarray(_raw_8bit(image)).save(root / "trainval" / "JPEGImages" / seq / f"{5 * f:05d}.jpg")
            if f == 0:
                (root / "trainval" / "Annotations_Semantic" / seq).mkdir(parents=True, exist_ok=True)
                mask = Image.fromarray(label.astype(np.uint8), mode="P")
                mask.putpalette(palette + [0] * (768 - len(palette)))
                mask.save(root / "trainval" / "Annotations_Semantic" / seq / "00000.png")
    (root / "trainval" / "ImageSets").mkdir()
    (root / "trainval" / "ImageSets" / "train.txt").write_text("v01\nv02\n")
    (root / "trainval" / "ImageSets" / "val.txt").write_text("v03\n")
    data = {"reader": "mosxav", "labeled": 1.0, "labeled_unit": "fraction", "patch_size": [32, 32],
            "normalize": "minmax", "test_split": None}
    return data, {**TINY_2D, "num_classes": 5}


READER_REPLICAS = [acdc, la, synthetic, nnunet_2d, nnunet_3d, endoscapes, mosxav]


def _train(tmp: Path, data: dict, model: dict, name: str) -> Path:
    cfg = config_from_dict({
        "experiment": {"name": name, "output_dir": str(tmp / "runs"), "seed": 0},
        "data": {"val_split": "val", **data},
        "model": model,
        "method": {"name": "supervised"},
        "train": {"max_steps": 3, "labeled_batch": 2, "val_every": 3, "optimizer": "adamw", "lr": 0.01,
                  "accelerator": "cpu", "progress_bar": False, "num_threads": 1},
        "eval": {"overlay_cases": 0, "stride": [p // 2 for p in data["patch_size"]]},
    })
    train(cfg, log=lambda *_: None)
    return cfg.run_dir()


@pytest.fixture(scope="module", params=READER_REPLICAS, ids=lambda f: f.__name__)
def trained(request, tmp_path_factory):
    """(run folder, the eval labels of every validation case {case id: (source file, labels)})."""
    tmp = tmp_path_factory.mktemp(request.param.__name__)
    data, model = request.param(tmp / "data")
    data["root"] = str(tmp / "data")
    run = _train(tmp, data, model, request.param.__name__)
    module = load_module(str(run / "checkpoints" / "best.ckpt"))
    reader = build_reader(module.cfg)
    labels: dict[str, tuple[str, np.ndarray]] = {}
    evaluate(module.method, module.cfg, reader, build_splits(module.cfg, reader).val, tmp / "eval", split="val",
             checkpoint="best", log=lambda *_: None,
             on_prediction=lambda case, pred: labels.__setitem__(case.case_id, (case.source, pred)))
    assert labels, "the replica has no validation case"
    return run, labels


def _read_labels(path: Path, volume_axes: str) -> np.ndarray:
    if path.name.endswith(".png"):
        return read_label_png(path)[0]
    if path.suffix == ".h5":
        return np.asarray(h5py.File(path)["label"])
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return arr.transpose(2, 1, 0) if arr.ndim == 3 and volume_axes == "xyz" else arr


def _predict(model: Path, source: str, out: Path, capsys) -> np.ndarray:
    assert main(["predict", str(model), source, str(out)]) == 0, capsys.readouterr().err
    if model.suffix in (".pt", ".onnx"):
        from semidiff.export import load_exported

        axes = load_exported(model).preprocessing.volume_axes
    else:
        axes = load_module(str(model)).preprocessing.volume_axes
    return _read_labels(out, axes)


def test_predict_on_the_original_file_writes_the_labels_eval_computes(trained, tmp_path, capsys):
    run, labels = trained
    ckpt = run / "checkpoints" / "best.ckpt"
    models = [ckpt]
    assert main(["export", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    models.append(tmp_path / "m.pt")
    try:
        import onnxruntime  # noqa: F401

        assert main(["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
        models.append(tmp_path / "m.onnx")
    except ImportError:
        pass
    for case_id, (source, expected) in labels.items():
        # 2D frames come back as PNG; volumes (h5 or NIfTI in) as NIfTI, which needs no geometry in the input.
        suffix = ".png" if expected.ndim == 2 and not source.endswith(".h5") else ".nii.gz"
        for model in models:
            got = _predict(model, source, tmp_path / f"{case_id}-{model.suffix[1:]}{suffix}", capsys)
            assert got.shape == expected.shape, (model.name, case_id)
            differ = int((got != expected).sum())
            assert differ == 0, f"{model.name}: {differ} of {got.size} voxels differ from eval on {case_id}"
    # The check can fail: the trained model does not predict one class everywhere.
    assert any(len(np.unique(pred)) > 1 for _, pred in labels.values())


def test_old_checkpoint_without_recorded_preprocessing_predicts_the_same(tmp_path, capsys, trained):
    """A checkpoint written before preprocessing was recorded derives it from its config, and says so."""
    import torch

    run, labels = trained
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["preprocessing"]["version"] == 1
    del ckpt["hyper_parameters"]["preprocessing"]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    source, expected = next(iter(labels.values()))
    out = tmp_path / "old.h5"
    assert main(["predict", str(old), source, str(out)]) == 0
    assert "derived from the run's config" in capsys.readouterr().out
    np.testing.assert_array_equal(_read_labels(out, "zyx"), expected)


def test_la_validation_case_of_the_shipped_config_predicts_as_evaluated(tmp_path, realdata, capsys):
    """The issue's case: configs/la/supervised_reduced.yaml, validation case A5RNNK0A891WUSC2V624, from its h5."""
    case = "A5RNNK0A891WUSC2V624"
    la_root = realdata / "LA"
    root = tmp_path / "LA"  # one training and one validation case of the real data, by link
    for cid in (case, (la_root / "train.list").read_text().split()[0]):
        (root / "2018LA_Seg_Training Set").mkdir(parents=True, exist_ok=True)
        (root / "2018LA_Seg_Training Set" / cid).symlink_to(la_root / "2018LA_Seg_Training Set" / cid)
    (root / "train.list").write_text((la_root / "train.list").read_text().split()[0] + "\n")
    (root / "val.list").write_text(case + "\n")
    cfg = load_config(Path(__file__).parents[1] / "configs" / "la" / "supervised_reduced.yaml", [
        f"data.root={root}", f"experiment.output_dir={tmp_path / 'runs'}", "data.labeled=1", "train.max_steps=2",
        "train.val_every=2", "train.num_threads=1", "train.progress_bar=false", "model.net_options={n_filters: 4}",
        "eval.stride=[28, 28, 20]", "eval.overlay_cases=0"])
    train(cfg, log=lambda *_: None)
    run = cfg.run_dir()
    module = load_module(str(run / "checkpoints" / "best.ckpt"))
    assert (module.preprocessing.stored, module.preprocessing.on_load, module.preprocessing.volume_axes) == (
        "zscore", "none", "xyz")
    reader = build_reader(module.cfg)
    got: dict[str, np.ndarray] = {}
    evaluate(module.method, module.cfg, reader, reader.cases("val"), tmp_path / "eval", split="val", checkpoint="best",
             log=lambda *_: None, on_prediction=lambda c, p: got.__setitem__(c.case_id, p))
    source = root / "2018LA_Seg_Training Set" / case / "mri_norm2.h5"
    predicted = _predict(run / "checkpoints" / "best.ckpt", str(source), tmp_path / "pred.nii.gz", capsys)
    np.testing.assert_array_equal(predicted, got[case])
