"""Own data the nnU-Net way (issue 26): RGB natural images in one file, colour never silently grey,
`semidiff plan` rules against the hand-written configs, and the README's three commands end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from PIL import Image

from semidiff.cli import main
from semidiff.config import read_config_tree
from semidiff.data import create_reader
from semidiff.data.fingerprint import ChannelStats, Fingerprint
from semidiff.data.preprocessing import Preprocessing, read_model_input
from semidiff.errors import ConfigError, DataError
from semidiff.methods import list_methods
from semidiff.plan import (
    make_plan,
    normalization_rule,
    patch_2d,
    patch_3d,
    plan_dataset,
    warnings_rule,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RGB = {"0": "R", "1": "G", "2": "B"}


def _config(dataset: str, method: str, budget: str) -> dict:
    return read_config_tree(CONFIGS / dataset / f"{method}_{budget}.yaml")  # its base merged in


# ---------------------------------------------------------------- generated datasets --------
def _polyp(i: int, size=(40, 48), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """An RGB frame with a reddish blob (the class is visible in colour, less so in grey)."""
    rng = np.random.default_rng(seed + i)
    lab = np.zeros(size, np.uint8)
    y, x = 4 + i % 12, 6 + (3 * i) % 16
    lab[y:y + 14, x:x + 16] = 1
    rgb = np.stack([110 + 70 * lab, 70 + 10 * lab, 100 - 50 * lab], -1) + rng.normal(0, 6, (*size, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8), lab


def _rgb_dataset(root: Path, n: int = 5, n_unlabeled: int = 4, channel_names=RGB) -> Path:
    """nnU-Net natural-image layout: one <case>_0000.png holds R, G, B."""
    for d in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": channel_names, "file_ending": ".png",
                                                   "labels": {"background": 0, "polyp": 1}, "numTraining": n}))
    for i in range(n):
        rgb, lab = _polyp(i)
        Image.fromarray(rgb).save(root / "imagesTr" / f"c{i}_0000.png")
        Image.fromarray(lab).save(root / "labelsTr" / f"c{i}.png")
    for i in range(n_unlabeled):
        Image.fromarray(_polyp(20 + i)[0]).save(root / "imagesUnlabeled" / f"u{i}_0000.png")
    Image.fromarray(_polyp(40)[0]).save(root / "imagesTs" / "t0_0000.png")
    return root


def _write_nii(path: Path, arr: np.ndarray, spacing=(0.8, 0.9, 2.5), origin=(5.0, -3.0, 1.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))


def _blob(shape, i: int) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    c = [s // 2 + (i % 3) - 1 for s in shape]
    r = [max(2, s // 4) for s in shape]
    lab[tuple(slice(ci - ri, ci + ri) for ci, ri in zip(c, r))] = 1
    return lab


def _mc3d_dataset(root: Path, shape=(16, 20, 24), n: int = 4, n_unlabeled: int = 2) -> Path:
    """Two-channel 3D NIfTI (one file per channel), with a scanner geometry."""
    (root / "dataset.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "lesion": 1}}))
    rng = np.random.default_rng(3)
    for i in range(n + n_unlabeled):
        lab = _blob(shape, i)
        folder, case = ("imagesTr", f"case{i}") if i < n else ("imagesUnlabeled", f"extra{i}")
        for c in range(2):
            _write_nii(root / folder / f"{case}_{c:04d}.nii.gz",
                       (300.0 * (c + 1) + 80.0 * lab + rng.normal(0, 5, shape)).astype(np.float32))
        if i < n:
            _write_nii(root / "labelsTr" / f"{case}.nii.gz", lab)
    return root


# ---------------------------------------------------------------- reader: RGB and colour -----
def test_rgb_in_one_file_is_three_channels(tmp_path, capsys):
    root = _rgb_dataset(tmp_path / "polyp")
    Image.fromarray(_polyp(0)[0]).convert("RGBA").save(root / "imagesTr" / "c0_0000.png")  # opaque alpha: RGB
    reader = create_reader("nnunet", root, normalize="none", val_fraction=0.0)
    assert reader.in_channels == 3 and reader.spatial_dims == 2
    for ref in reader.cases("train") + reader.unlabeled_cases():
        case = reader.load(ref)
        expected = np.moveaxis(np.asarray(Image.open(ref.path).convert("RGB"), dtype=np.float32), -1, 0)
        np.testing.assert_array_equal(case.image, expected)
    assert main(["data", "inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert "image shapes (3, 40, 48)" in out and "no problems found" in out

    rgba = np.dstack([_polyp(1)[0], np.full((40, 48), 128, np.uint8)])  # a varying alpha is not RGB
    Image.fromarray(rgba, "RGBA").save(root / "imagesTr" / "c1_0000.png")
    with pytest.raises(DataError, match=r"c1_0000.png: image holds 4 channels but dataset.json declares 3"):
        reader.load(reader.cases("train")[1])
    # A grey file where three channels are declared is one channel of a multi-file case: its _0001 is missing.
    Image.fromarray(_polyp(2)[1] * 200).save(root / "imagesTr" / "c2_0000.png")
    with pytest.raises(DataError, match=r"c2_0001.png: channel 1 of case c2_0000.png is missing.*this one is grey"):
        reader.load(reader.cases("train")[2])


def test_colour_is_never_silently_grey(tmp_path, capsys):
    root = _rgb_dataset(tmp_path / "grey", channel_names={"0": "grey"})
    first = root / "imagesTr" / "c0_0000.png"
    assert main(["data", "inspect", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"{first}: colour (RGB) image" in out and '"channel_names": {"0": "R", "1": "G", "2": "B"}' in out
    reader = create_reader("nnunet", root, normalize="none", val_fraction=0.0)
    with pytest.raises(DataError, match="colour_to_grey"):
        reader.load(reader.cases("train")[0])
    assert main(["plan", str(root), "-o", str(tmp_path / "p.yaml")]) == 2
    assert "c0_0000.png: colour (RGB) image" in capsys.readouterr().err and not (tmp_path / "p.yaml").exists()
    # The opt-in converts with Pillow's luma.
    opted = create_reader("nnunet", root, normalize="none", val_fraction=0.0, colour_to_grey=True)
    np.testing.assert_array_equal(opted.load(opted.cases("train")[0]).image[0],
                                  np.asarray(Image.open(first).convert("L"), dtype=np.float32))
    with pytest.raises(ConfigError, match="colour_to_grey applies to a dataset that declares one channel"):
        create_reader("nnunet", _rgb_dataset(tmp_path / "rgb"), colour_to_grey=True)
    # A colour-mode file whose channels are equal holds no colour: read as grey, nothing lost.
    grey = np.asarray(Image.open(first).convert("L"))
    Image.fromarray(np.dstack([grey] * 3)).save(first)
    np.testing.assert_array_equal(reader.load(reader.cases("train")[0]).image[0], grey.astype(np.float32))

    # Prediction: a one-channel model refuses a colour file unless its training converted colour.
    colour = root / "imagesTr" / "c1_0000.png"
    with pytest.raises(DataError, match=r"c1_0000.png: colour \(RGB\) image.*one grey channel"):
        read_model_input(colour, Preprocessing(spatial_dims=2, channels=1))
    _, image, _ = read_model_input(colour, Preprocessing(spatial_dims=2, channels=1, colour_to_grey=True))
    np.testing.assert_array_equal(image[0], np.asarray(Image.open(colour).convert("L"), dtype=np.float32))
    # rgb_to_0_1 is for 8-bit colour: a 16-bit image is refused, naming it.
    Image.fromarray(np.full((40, 48), 4000, np.uint16)).save(tmp_path / "deep_0000.png")
    with pytest.raises(DataError, match=r"deep_0000.png: normalisation rgb_to_0_1 needs 8-bit values"):
        read_model_input(tmp_path / "deep_0000.png", Preprocessing(spatial_dims=2, channels=1, on_load="rgb_to_0_1"))


# ---------------------------------------------------------------- plan rules -----------------
def _fp(dims: int, shapes, spacings=(), unlabeled: int = 10, names=("MR",), eight_bit=False, core=1.0,
        labeled: int = 20, classes=("background", "a"), missing=None) -> Fingerprint:
    stats = [ChannelStats(n, 0.0, 100.0, 40.0, 10.0, 0.0, 100.0 * core, eight_bit) for n in names]
    return Fingerprint(root="/data/own", spatial_dims=dims, channel_names=list(names), class_names=list(classes),
                       file_ending=".png" if dims == 2 else ".nii.gz", labeled_ids=[f"c{i}" for i in range(labeled)],
                       unlabeled=unlabeled, test=0, shapes=[tuple(s) for s in shapes],
                       spacings=[tuple(s) for s in spacings], channels=stats, missing=missing or {})


def test_patch_rules_reproduce_the_hand_written_configs():
    """ACDC's median slice (256x216) and LA's median crop (88x143x193 z,y,x; `shared/realdata`)."""
    for budget in ("reduced", "full"):
        assert patch_2d((256, 216), budget) == _config("acdc", "supervised", budget)["data"]["patch_size"]
        la = _config("la", "supervised", budget)["data"]
        patch, factor = patch_3d((88, 143, 193), budget)
        assert patch == la["patch_size"][::-1] and factor == la["resample_factor"]  # LA's h5 arrays are x, y, z
    # EndoScapes' 16:9 frames (480x854) at the full budget: the config's 256x448.
    assert patch_2d((480, 854), "full") == _config("endoscapes", "supervised", "full")["data"]["patch_size"]
    assert patch_2d((854, 480), "full") == [448, 256]
    assert patch_2d((40, 48), "reduced") == [48, 48]  # small images: their own size, multiple of 16
    assert patch_3d((12, 16, 16), "reduced") == ([16, 16, 16], 1.0)  # within the reduced size: no resampling


def test_normalisation_rules():
    assert normalization_rule(_fp(2, [(256, 216)]))[0] == _config("acdc", "supervised", "reduced")["data"]["normalize"]
    assert normalization_rule(_fp(3, [(88, 143, 193)]))[0] == _config("la", "supervised", "reduced")["data"]["normalize"]
    assert normalization_rule(_fp(2, [(64, 64)], names="RGB", eight_bit=True))[0] == "rgb_to_0_1"
    assert normalization_rule(_fp(2, [(64, 64)], names="RGB", eight_bit=False))[0] == "zscore"  # 16-bit colour
    assert normalization_rule(_fp(2, [(64, 64)], core=0.2))[0] == "zscore"  # outliers would squeeze min-max
    assert normalization_rule(_fp(3, [(8, 8, 8)], names=("noNorm",)))[0] == "none"  # nnU-Net's scheme names
    mode, why = normalization_rule(_fp(3, [(8, 8, 8)], names=("CT",)))
    assert mode == "zscore" and "clips CT" in why


@pytest.mark.parametrize("dataset, fp", [("acdc", _fp(2, [(256, 216)])), ("la", _fp(3, [(88, 143, 193)]))])
@pytest.mark.parametrize("budget", ["reduced", "full"])
@pytest.mark.parametrize("method", list_methods())
def test_planned_budget_matches_every_hand_written_config(dataset, fp, budget, method):
    if not (CONFIGS / dataset / f"{method}_{budget}.yaml").is_file():
        pytest.skip(f"no hand-written {dataset} {budget} config for {method}")
    plan = make_plan(fp, method, budget).tree
    cfg = _config(dataset, method, budget)
    assert plan["method"]["options"] == cfg["method"].get("options", {})
    assert plan["model"]["net"] == cfg["model"]["net"]
    assert plan["model"]["net_options"] == cfg["model"].get("net_options", {})
    for key in ("max_steps", "val_every", "labeled_batch", "unlabeled_batch", "optimizer", "lr", "weight_decay",
                "lr_schedule", "precision", "accelerator"):
        assert plan["train"][key] == cfg["train"][key], key
    for key in ("patch_size", "resample_factor"):
        assert plan["data"][key] == (cfg["data"][key][::-1] if key == "patch_size" and dataset == "la"
                                     else cfg["data"].get(key, 1.0)), key


def test_plan_warnings_and_semi_supervised_without_unlabeled():
    fp = _fp(3, [(10, 256, 216)], spacings=[(10.0, 1.5, 1.5)], labeled=3, unlabeled=0,
             missing={0: [], 1: ["c0"]}, classes=("background", "scar"))
    text = " | ".join(warnings_rule(fp, 0.5))
    assert "very few labeled cases (3)" in text and "extreme anisotropy" in text and "ratio 6.7" in text
    assert "class 1 (scar) is missing from 1 of 3 labeled cases (c0)" in text
    # Decision: an explicitly requested semi-supervised method is refused, never swapped; the default is supervised.
    with pytest.raises(ConfigError, match="--method mean_teacher is semi-supervised but the dataset has no unlabeled"):
        make_plan(fp, "mean_teacher")
    plan = make_plan(fp)
    assert plan.tree["method"]["name"] == "supervised" and plan.tree["train"]["unlabeled_batch"] == 0
    assert make_plan(_fp(2, [(64, 64)], unlabeled=5)).tree["method"]["name"] == "mean_teacher"
    assert not warnings_rule(_fp(3, [(88, 143, 193)], spacings=[(0.625,) * 3] * 3, labeled=8, unlabeled=72), 0.5)


def test_plan_of_acdc_and_la_like_generated_data(tmp_path):
    """Generated nnU-Net datasets with ACDC's slice sizes (16-bit grey PNG) and LA's crop sizes (uint8
    NIfTI, 0.625 mm): the planned patch and normalisation are the hand-written configs'."""
    acdc = tmp_path / "acdc_like"
    for d in ("imagesTr", "labelsTr", "imagesUnlabeled"):
        (acdc / d).mkdir(parents=True)
    (acdc / "dataset.json").write_text(json.dumps({"channel_names": {"0": "cineMRI"}, "file_ending": ".png",
                                                   "labels": {"background": 0, "RV": 1, "Myo": 2, "LV": 3}}))
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(256, 216), (256, 216), (224, 208), (288, 232), (256, 216), (256, 216)]):
        lab = np.zeros(shape, np.uint8)
        for c in (1, 2, 3):
            lab[40 * c:40 * c + 30, 50:120] = c
        img = (200 + 150 * lab + rng.normal(0, 20, shape)).clip(0).astype(np.uint16)
        folder = "imagesTr" if i < 5 else "imagesUnlabeled"
        Image.fromarray(img).save(acdc / folder / f"p{i}_0000.png")
        if i < 5:
            Image.fromarray(lab).save(acdc / "labelsTr" / f"p{i}.png")
    la = tmp_path / "la_like"
    (la / "dataset.json").parent.mkdir()
    (la / "dataset.json").write_text(json.dumps({"channel_names": {"0": "LGE-MRI"}, "file_ending": ".nii.gz",
                                                 "labels": {"background": 0, "LA": 1}}))
    for i, shape in enumerate([(88, 143, 193), (88, 136, 180), (88, 150, 200)]):
        lab = _blob(shape, i)
        _write_nii(la / "imagesTr" / f"la{i}_0000.nii.gz", (60 + 90 * lab + rng.integers(0, 30, shape)).astype(np.uint8),
                   spacing=(0.625,) * 3)
        _write_nii(la / "labelsTr" / f"la{i}.nii.gz", lab, spacing=(0.625,) * 3)
    for budget in ("reduced", "full"):
        for root, dataset, method in ((acdc, "acdc", "mean_teacher"), (la, "la", "supervised")):
            plan = plan_dataset(root, method, budget).tree
            cfg = _config(dataset, method, budget)["data"]
            assert plan["data"]["patch_size"] == (cfg["patch_size"][::-1] if dataset == "la" else cfg["patch_size"])
            assert plan["data"]["resample_factor"] == cfg.get("resample_factor", 1.0)
            assert plan["data"]["reader_options"]["normalize"] == cfg["normalize"]


# ---------------------------------------------------------------- the README's 3 commands ----
TINY = ["train.max_steps=3", "train.val_every=3", "train.precision=32", "train.progress_bar=false",
        "train.labeled_batch=2", "train.unlabeled_batch=2", "eval.overlay_cases=0"]


def test_rgb_folder_to_model_to_predictions_without_yaml(tmp_path, capsys):
    from semidiff.engine.module import load_module

    root = _rgb_dataset(tmp_path / "polyp")
    runs = tmp_path / "runs"
    assert main(["data", "inspect", str(root)]) == 0
    assert main(["train", str(root), "--method", "mean_teacher", f"experiment.output_dir={runs}",
                 "model.net_options.features=[4,8,8,8,8]", *TINY]) == 0
    out = capsys.readouterr().out
    assert "normalize rgb_to_0_1" in out and "method.name = mean_teacher: requested" in out
    run = runs / "polyp_mean_teacher_reduced"
    assert (run / "plan.yaml").is_file() and json.loads((run / "splits.json").read_text())["unlabeled_count"] == 4
    module = load_module(str(run / "checkpoints" / "last.ckpt"))
    assert module.preprocessing.channels == 3 and module.preprocessing.on_load == "rgb_to_0_1"
    # The model sees three channels: the input of its first convolution when predicting a frame.
    first_conv = next(m for m in module.method.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 3
    seen = []
    first_conv.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    _, image, _ = read_model_input(root / "imagesTs" / "t0_0000.png", module.preprocessing)
    module.method.predict(torch.as_tensor(image)[None])
    x = seen[0]
    assert x.shape[1] == 3 and not torch.equal(x[:, 0], x[:, 1]) and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    # Predictions back to the input format and size, named <case>.png as nnU-Net does.
    preds = tmp_path / "preds"
    assert main(["predict", str(run), str(root / "imagesTs"), str(preds)]) == 0
    assert [p.name for p in preds.iterdir()] == ["t0.png"]
    pred = np.asarray(Image.open(preds / "t0.png"))
    assert pred.shape == (40, 48) and set(np.unique(pred)) <= {0, 1}


def test_multichannel_3d_plan_train_predict_keeps_geometry(tmp_path, capsys):
    import nibabel as nib

    root = _mc3d_dataset(tmp_path / "mc3d")
    cfg_path = tmp_path / "mc3d.yaml"
    assert main(["plan", str(root), "--method", "cps", "-o", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "normalize zscore" in out and f"wrote {cfg_path}" in out
    planned = yaml.safe_load(cfg_path.read_text())
    assert planned["model"]["in_channels"] == 2 and planned["data"]["patch_size"] == [16, 16, 16]
    assert "# " in cfg_path.read_text().split("data:")[1]  # the reasons are comments in the file
    runs = tmp_path / "runs"
    assert main(["train", str(cfg_path), f"experiment.output_dir={runs}", "model.net_options.n_filters=4", *TINY]) == 0
    run = runs / planned["experiment"]["name"]
    preds = tmp_path / "preds"
    assert main(["predict", str(run), str(root / "imagesUnlabeled"), str(preds)]) == 0
    assert sorted(p.name for p in preds.iterdir()) == ["extra4.nii.gz", "extra5.nii.gz"]
    pred, src = nib.load(preds / "extra4.nii.gz"), nib.load(root / "imagesUnlabeled" / "extra4_0000.nii.gz")
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
    assert pred.shape == src.shape and set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}
