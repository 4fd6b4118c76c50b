"""The one file-to-input preprocessing (issue 29): LA raw scans get the documented equivalent of the
stored h5, a contradicting config is refused, every input/output format pair of `semidiff predict`
writes a valid file or is refused with a named error, and a run whose best checkpoint is its last
one is evaluated once."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from semidiff.cli import main
from semidiff.config import config_from_dict, load_config
from semidiff.data.prepare import prepare_la
from semidiff.data.preprocessing import preprocessing_from_config, read_model_input
from semidiff.data.synthetic import make_synthetic_dataset, synthetic_case
from semidiff.engine.train import train
from semidiff.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = Path(__file__).parents[1] / "configs"


def _raw_la(raw: Path, seed: int = 0) -> Path:
    """A raw LA 2018 case: 8-bit LGE-like scan (z, y, x) and its 0/255 atrium mask, as NRRD."""
    rng = np.random.default_rng(seed)
    shape = (12, 40, 44)
    scan = rng.normal(20, 6, shape)
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    atrium = (zz - 6) ** 2 / 16 + (yy - 22) ** 2 / 36 + (xx - 18) ** 2 / 49 < 1
    scan[atrium] += 90
    case = raw / "CASE01"
    case.mkdir(parents=True)
    img = sitk.GetImageFromArray(np.clip(np.round(scan), 0, 255).astype(np.uint8))
    img.SetSpacing((0.625, 0.625, 0.625))
    sitk.WriteImage(img, str(case / "lgemri.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray((atrium * 255).astype(np.uint8)), str(case / "laendo.nrrd"))
    return case / "lgemri.nrrd"


def test_la_raw_scan_gets_what_the_stored_h5_carries(tmp_path):
    """Predict's raw-scan path for LA (z-score of the whole scan) reproduces the UA-MT h5 that
    `semidiff data prepare la` writes from the same NRRD, on the crop; the h5 itself is taken as stored."""
    nrrd = _raw_la(tmp_path / "raw")
    prepare_la(tmp_path / "raw", tmp_path / "LA", margin=3, min_size=(16, 16), log=lambda *_: None)
    h5 = tmp_path / "LA" / "2018LA_Seg_Training Set" / "CASE01" / "mri_norm2.h5"
    with h5py.File(h5) as f:
        stored, (x0, x1, y0, y1) = np.asarray(f["image"]), f.attrs["crop_xy"]
    assert abs(float(stored.mean())) > 0.3  # the crop is not zero-mean: z-scoring it again would shift it
    cfg = load_config(CONFIGS / "la" / "supervised_reduced.yaml", [f"data.root={tmp_path / 'LA'}"])
    prep = preprocessing_from_config(cfg, strict=True)
    assert (prep.stored, prep.on_load, prep.volume_axes, prep.resample_factor) == ("zscore", "none", "xyz", 0.5)

    _, from_raw, note = read_model_input(nrrd, prep)
    assert "z-score (as the dataset's stored files were made)" in note and "warning" not in note
    np.testing.assert_allclose(from_raw[0, x0:x1, y0:y1], stored, atol=1e-5)
    _, from_h5, note = read_model_input(h5, prep)
    np.testing.assert_array_equal(from_h5[0], stored)
    assert "already carries the stored z-score" in note

    # A NIfTI written from the stored crop is not a raw scan: auto z-scores it again and warns; stored does not.
    nii = tmp_path / "crop.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(stored.transpose(2, 1, 0))), str(nii))
    _, again, note = read_model_input(nii, prep)
    assert "--intensity stored" in note and abs(float(again.mean())) < 1e-4
    np.testing.assert_array_equal(read_model_input(nii, prep, "stored")[1][0], stored)


@pytest.mark.parametrize("overrides, key", [
    ({"reader": "acdc", "normalize": "zscore"}, "data.normalize"),
    ({"reader": "nnunet", "normalize": "minmax"}, "data.normalize"),
    ({"reader": "nnunet", "volume_axes": "xyz", "patch_size": [8, 8, 8]}, "data.volume_axes"),
    ({"reader": "h5caselist", "reader_options": {"stored_normalize": "minmax"}, "normalize": "zscore"}, "data.normalize"),
])
def test_a_config_that_contradicts_its_reader_is_refused_naming_the_key(overrides, key):
    cfg = config_from_dict({"data": {"root": "nowhere", **overrides}})
    with pytest.raises(ConfigError, match=key):
        preprocessing_from_config(cfg, strict=True)
    preprocessing_from_config(cfg)  # an old checkpoint keeps what its reader did


# ---- format pairs ----------------------------------------------------------------------------------
def _tiny_run(tmp: Path, dims: int, name: str) -> Path:
    if dims == 2:
        root = make_synthetic_dataset(tmp / "d2", spatial_dims=2, num_cases=3, size=(32, 32), num_classes=3,
                                      val_cases=1)
        data = {"reader": "synthetic", "root": str(root), "patch_size": [32, 32]}
        model = {"net": "unet2d", "net_options": {"features": [4, 8, 8, 16, 16]}, "num_classes": 3}
    else:
        root = tmp / "d3"
        for i, cid in enumerate(["a", "b", "v"]):
            image, label = synthetic_case(np.random.default_rng(i), (20, 16, 16), 2)
            path = root / "2018LA_Seg_Training Set" / cid / "mri_norm2.h5"
            path.parent.mkdir(parents=True)
            with h5py.File(path, "w") as f:
                f.create_dataset("image", data=image)
                f.create_dataset("label", data=label)
        (root / "train.list").write_text("a\nb\n")
        (root / "val.list").write_text("v\n")
        data = {"reader": "la", "root": str(root), "patch_size": [16, 16, 16], "normalize": "zscore", "volume_axes": "xyz"}
        model = {"net": "unet3d", "net_options": {"features": [4, 4, 8, 8, 8]}, "num_classes": 2}
    cfg = config_from_dict({
        "experiment": {"name": name, "output_dir": str(tmp / "runs")}, "data": {"labeled": 2, **data}, "model": model,
        "train": {"max_steps": 2, "labeled_batch": 2, "val_every": 2, "accelerator": "cpu", "progress_bar": False,
                  "num_threads": 1},
        "eval": {"overlay_cases": 0, "stride": [8] * dims}})
    lines: list[str] = []
    train(cfg, log=lines.append)
    (cfg.run_dir() / "train.log").write_text("\n".join(map(str, lines)))
    return cfg.run_dir()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("formats")
    return {2: _tiny_run(tmp, 2, "r2"), 3: _tiny_run(tmp, 3, "r3")}


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(["predict", *map(str, argv)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out + captured.err


def test_best_equal_to_last_is_evaluated_once_and_both_summaries_say_so(runs):
    for run in runs.values():
        log = (run / "train.log").read_text()
        assert log.count("evaluating the") == 1 and "last = best (step 2; evaluated once)" in log
        for which in ("last", "best"):
            assert "checkpoint: last = best (step 2; evaluated once)" in (run / f"eval_val_{which}" / "summary.md").read_text()


def test_volume_inputs_to_every_output_format(runs, tmp_path, capsys):
    run = runs[3]
    image, _ = synthetic_case(np.random.default_rng(5), (20, 16, 16), 2)  # (x, y, z), as UA-MT stores it
    plain, spaced = tmp_path / "plain.h5", tmp_path / "spaced.h5"
    for path, attrs in ((plain, {}), (spaced, {"spacing": [0.6, 0.7, 0.8]})):
        with h5py.File(path, "w") as f:
            f.create_dataset("image", data=image)
            f.attrs.update(attrs)
    # h5 -> NIfTI: a stated default geometry, or the h5's spacing; the array comes back in (x, y, z).
    code, out = _run(capsys, run, plain, tmp_path / "p.nii.gz")
    assert code == 0 and "spacing 1, origin 0, identity direction (stated default)" in out
    written = sitk.ReadImage(str(tmp_path / "p.nii.gz"))
    assert written.GetSize() == image.shape and written.GetSpacing() == (1.0, 1.0, 1.0)
    code, out = _run(capsys, run, spaced, tmp_path / "s.nrrd")
    assert code == 0 and sitk.ReadImage(str(tmp_path / "s.nrrd")).GetSpacing() == pytest.approx((0.6, 0.7, 0.8))
    assert _run(capsys, run, spaced, tmp_path / "s.h5")[0] == 0
    with h5py.File(tmp_path / "s.h5") as f:
        assert f["label"].shape == image.shape and list(f.attrs["spacing"]) == pytest.approx([0.6, 0.7, 0.8])
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "s.nrrd"))).transpose(2, 1, 0)
    np.testing.assert_array_equal(labels, np.asarray(h5py.File(tmp_path / "s.h5")["label"]))
    # NIfTI -> MHA and h5 keep the input's geometry.
    nii = sitk.GetImageFromArray(np.ascontiguousarray(image.transpose(2, 1, 0)))
    nii.SetSpacing((0.5, 0.6, 0.7))
    nii.SetOrigin((3.0, 2.0, 1.0))
    sitk.WriteImage(nii, str(tmp_path / "in.nii.gz"))
    code, out = _run(capsys, run, tmp_path / "in.nii.gz", tmp_path / "o.mha")
    assert code == 0 and "geometry (spacing, origin, direction) from the input" in out
    mha = sitk.ReadImage(str(tmp_path / "o.mha"))
    assert mha.GetSpacing() == pytest.approx((0.5, 0.6, 0.7)) and mha.GetOrigin() == pytest.approx((3.0, 2.0, 1.0))
    assert _run(capsys, run, tmp_path / "in.nii.gz", tmp_path / "o.h5")[0] == 0
    # Refused up front, naming the file and the problem; nothing written.
    for target, problem in (("v.png", "a 3D prediction of shape (20, 16, 16) cannot be written as .png"),
                            ("v.jpg", "JPEG is lossy"), ("v.xyz", "cannot write a prediction as '.xyz'")):
        code, out = _run(capsys, run, plain, tmp_path / target)
        assert code == 2 and f"{tmp_path / target}: {problem}" in out and not (tmp_path / target).exists()


def test_image_inputs_to_every_output_format(runs, tmp_path, capsys):
    run = runs[2]
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 40), dtype=np.uint8)).save(tmp_path / "in.png")
    results = {}
    for name in ("o.nii.gz", "o.h5", "o.tif", "o.png"):
        code, out = _run(capsys, run, tmp_path / "in.png", tmp_path / name)
        assert code == 0, out
    results["nii"] = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "o.nii.gz")))
    results["h5"] = np.asarray(h5py.File(tmp_path / "o.h5")["label"])
    results["tif"] = np.asarray(Image.open(tmp_path / "o.tif"))
    results["png"] = np.asarray(Image.open(tmp_path / "o.png"))
    assert results["png"].shape == (32, 40)
    for name, arr in results.items():
        np.testing.assert_array_equal(arr, results["png"], err_msg=name)


def test_eval_refuses_an_override_that_changes_the_recorded_preprocessing(runs, capsys):
    assert main(["eval", str(runs[3]), "data.resample_factor=0.5"]) == 2
    assert "makes model inputs differently from training" in capsys.readouterr().err
