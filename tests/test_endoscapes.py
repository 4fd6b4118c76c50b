"""EndoScapes2023 Seg50 as it is on disk (train_seg/, val_seg/, semseg/, *_seg_vids.txt; no train/,
no COCO): the not-annotated label 255 end to end (reader, every method's losses, copy-paste, metrics,
validation, inspect), the video-level labeled/unlabeled split, and unlabeled masks never reaching a
method. Real-data checks at the end skip without SEMIDIFF_REALDATA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semidiff.cli import main
from semidiff.config import load_config
from semidiff.data import create_reader, inspect_dataset
from semidiff.data.record import IGNORE_INDEX, Case
from semidiff.errors import ConfigError, DataError
from semidiff.methods import NetSpec, Progress, create_method
from semidiff.methods.bcp import region_losses
from semidiff.methods.losses import ce_loss, seg_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
H, W = 24, 40
#: Seg50-only replica: training videos in list order (not numeric order) with their frame numbers.
TRAIN = {7: [100, 125], 3: [200], 12: [300, 325, 350]}
VAL = {20: [400, 425]}


def _frame(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path, quality=95)


def _seg50(root: Path) -> dict[str, np.ndarray]:
    """The Seg50 subset's layout; masks with a not-annotated (255) patch in every other frame."""
    masks = {}
    for split, videos in (("train", TRAIN), ("val", VAL)):
        root.mkdir(parents=True, exist_ok=True)
        (root / f"{split}_seg_vids.txt").write_text("".join(f"{v:.18e}\n" for v in videos))
        for v, frames in videos.items():
            for f in frames:
                fid = f"{v}_{f}"
                _frame(root / f"{split}_seg" / f"{fid}.jpg", f)
                lab = np.zeros((H, W), np.uint8)
                for c in range(1, 7):
                    lab[2 + (f + c) % 12 : 8 + (f + c) % 12, 5 * c : 5 * c + 4] = c
                if len(masks) % 2 == 0:
                    lab[-4:, -6:] = IGNORE_INDEX
                masks[fid] = lab
                (root / "semseg").mkdir(exist_ok=True)
                Image.fromarray(lab).save(root / "semseg" / f"{fid}.png")
    return masks


def _config(root: Path, tmp_path: Path, method: str = "supervised", extra: tuple[str, ...] = ()):
    name = {"protodiff": "protodiff_unet"}.get(method, method)
    width = "backbone_options.features" if method == "protodiff" else "features"
    return load_config(REPO / "configs" / "endoscapes" / f"{name}_reduced.yaml", [
        f"data.root={root}", "data.patch_size=[16,32]", "data.labeled=1", f"model.net_options.{width}=[4,8,8,8,8]",
        f"experiment.output_dir={tmp_path / 'runs'}", "train.max_steps=2", "train.val_every=2",
        "train.labeled_batch=2", f"train.unlabeled_batch={0 if method == 'supervised' else 2}",
        "train.progress_bar=false", "train.precision=32", "eval.overlay_cases=0", *extra])


# ---- reader ----------------------------------------------------------------------------------
def test_seg50_folder_as_it_is_255_kept_other_values_name_the_file(tmp_path):
    masks = _seg50(tmp_path)
    reader = create_reader("endoscapes", tmp_path)
    assert reader.splits() == ["train", "val"]
    refs = reader.cases("train")
    assert [r.group for r in refs] == ["7", "7", "3", "12", "12", "12"]  # list order of videos, then frames
    assert reader.unlabeled_cases("train") == []  # every Seg50 frame has a mask; no train/ folder
    found = "\n".join(reader.describe())
    assert "train: 3 videos listed, 6 frames with semseg masks" in found and "not present: train/" in found
    case = reader.load(refs[0])  # 7_100, the first mask written: has the 255 patch
    np.testing.assert_array_equal(case.label, masks["7_100"])
    assert case.meta["ignore_index"] == IGNORE_INDEX and (case.label == IGNORE_INDEX).sum() == 24
    # Any other value outside the classes: an error naming the mask file, and how to declare it.
    bad = masks["7_100"].copy()
    bad[0, 0] = 7
    Image.fromarray(bad).save(tmp_path / "semseg" / "7_100.png")
    with pytest.raises(DataError, match=r"semseg/7_100\.png: label values 7 are not among.*treat_as_ignore"):
        reader.load(refs[0])
    declared = create_reader("endoscapes", tmp_path, treat_as_ignore=[7]).load(refs[0])
    assert declared.label[0, 0] == IGNORE_INDEX and (declared.label == IGNORE_INDEX).sum() == 25
    for wrong in ([3], [255], [300]):
        with pytest.raises(ConfigError, match="treat_as_ignore"):
            create_reader("endoscapes", tmp_path, treat_as_ignore=wrong)


def test_inspect_reports_not_annotated_pixels_and_frames(tmp_path, capsys):
    _seg50(tmp_path)
    report = inspect_dataset(create_reader("endoscapes", tmp_path))
    assert report.ok
    train, val = report.splits["train"], report.splits["val"]
    # Masks 0, 2, 4 (train) and 6 (val) of the writing order carry 24 pixels of 255 each.
    assert (train.ignore_pixels, train.ignore_cases, train.labeled) == (72, 3, 6)
    assert (val.ignore_pixels, val.ignore_cases, val.labeled) == (24, 1, 2)
    assert main(["data", "inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "not annotated (label 255, left out of losses and metrics): 72 pixels in 3 of 6 labeled cases" in out
    assert "val: 1 videos listed, 2 frames with semseg masks" in out
    # A value outside the classes fails the report naming the file, unless declared not annotated.
    bad = np.asarray(Image.open(tmp_path / "semseg" / "3_200.png")).copy()
    bad[0, :3] = 7
    Image.fromarray(bad).save(tmp_path / "semseg" / "3_200.png")
    assert main(["data", "inspect", str(tmp_path)]) == 1
    assert "semseg/3_200.png: label values 7 are not among" in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path), "--option", "treat_as_ignore=[7]"]) == 0
    assert "75 pixels in 3 of 6 labeled cases" in capsys.readouterr().out  # 3_200 had 255 already


# ---- the semi-supervised protocol ------------------------------------------------------------
def test_video_level_split_and_unlabeled_masks_never_reach_the_method(tmp_path, monkeypatch):
    """labeled = the first N videos of train_seg_vids.txt, whole; unlabeled = the other training
    videos' frames, whose masks are dropped before caching; a real training run shows the method
    only ever receives images for them."""
    from semidiff.engine.data import SemidiffData
    from semidiff.engine.train import train
    from semidiff.methods.mean_teacher import MeanTeacher

    _seg50(tmp_path / "data")
    cfg = _config(tmp_path / "data", tmp_path, "mean_teacher")
    data = SemidiffData(cfg, uses_unlabeled=True)
    s = data.splits.summary()
    assert s["labeled_groups"] == ["7"] and s["unlabeled_groups"] == ["3", "12"] and s["val_groups"] == ["20"]
    assert s["labeled"] == ["7_100", "7_125"] and s["unlabeled_count"] == 4
    assert all(data.train_items._case(i).label is None for i in range(2, 6))
    assert all(data.train_items._case(i).label is not None for i in range(2))
    with pytest.raises(ConfigError, match="whole number of videos"):  # never a part of a video
        SemidiffData(_config(tmp_path / "data", tmp_path, extra=("data.labeled=1.5",)), uses_unlabeled=False)

    seen = []
    original = MeanTeacher.training_step

    def spy(self, labeled, unlabeled, progress):
        seen.append((sorted(labeled), sorted(unlabeled)))
        return original(self, labeled, unlabeled, progress)

    monkeypatch.setattr(MeanTeacher, "training_step", spy)
    train(cfg, log=lambda *_: None)
    assert seen == [(["image", "label"], ["image"])] * 2


# ---- losses, methods and mixing ----------------------------------------------------------------
def test_ignored_pixels_weigh_nothing_in_the_shared_losses():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 8, 8, requires_grad=True)
    target = torch.randint(0, 7, (2, 1, 8, 8))
    target[:, :, :3] = IGNORE_INDEX
    for loss_fn in (seg_loss, ce_loss):
        loss = loss_fn(logits, target)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and grad[:, :, :3].abs().max() == 0 and grad[:, :, 3:].abs().max() > 0
        # Equal to the loss with those pixels given any class and masked out explicitly.
        filled = target.masked_fill(target == IGNORE_INDEX, 4)
        torch.testing.assert_close(loss, loss_fn(logits, filled, (target != IGNORE_INDEX).float()))
    # No ignore value: the plain loss (mean over all pixels).
    plain = torch.randint(0, 7, (2, 1, 8, 8))
    torch.testing.assert_close(ce_loss(logits, plain), torch.nn.functional.cross_entropy(logits, plain[:, 0]))


def test_bcp_copy_paste_keeps_ignored_pixels_ignored():
    """A labeled mask pasted into an unlabeled image supervises only its block; its 255 pixels
    there give no gradient, and outside the block the other label governs."""
    torch.manual_seed(0)
    logits = torch.randn(1, 7, 12, 12, requires_grad=True)
    mask = torch.zeros(1, 1, 12, 12)
    mask[..., 2:10, 2:10] = 1
    label_in = torch.full((1, 1, 12, 12), IGNORE_INDEX)  # the pasted labeled block: all not annotated
    label_out = torch.full((1, 1, 12, 12), 2)
    inside, outside = region_losses(logits, label_in, label_out, mask)
    assert inside.item() == 0.0
    (grad,) = torch.autograd.grad(inside + outside, logits)
    assert grad[..., 2:10, 2:10].abs().max() == 0 and grad[..., :2, :].abs().min() > 0


# Every method with labels not annotated anywhere or in part:
# test_method_conformance.py::test_not_annotated_pixels_never_count (ProtoDiff there on its own
# network; here on the shared backbone, with RGB frames and EndoScapes' 7 classes).
def test_protodiff_on_the_shared_backbone_takes_not_annotated_labels():
    torch.manual_seed(0)
    spec = NetSpec("protodiff_unet", 3, 7, 2, {"backbone_options": {"features": [4, 8, 8, 8, 8]}})
    method = create_method("protodiff", spec, {})
    image, unlabeled = torch.randn(2, 3, 16, 32), {"image": torch.randn(2, 3, 16, 32)}
    progress = Progress(9, 10)  # past the warm-up
    parts = method.training_step({"image": image, "label": torch.full((2, 1, 16, 32), IGNORE_INDEX)}, unlabeled,
                                 progress)
    assert parts["loss_sup"].item() == 0.0
    method.on_step_end(Progress(10, 10))
    partly = torch.randint(0, 7, (2, 1, 16, 32))
    partly[..., :5, :] = IGNORE_INDEX
    parts = method.training_step({"image": image, "label": partly}, unlabeled, progress)
    assert all(torch.isfinite(v).all() for v in parts.values()) and parts["loss"].requires_grad
    parts["loss"].backward()


def test_protodiff_prototypes_leave_not_annotated_pixels_out():
    torch.manual_seed(0)
    spec = NetSpec("protodiff_unet", 3, 7, 2, {"backbone_options": {"features": [4, 8, 8, 8, 8]}})
    method = create_method("protodiff", spec, {"prototype_unlabeled_weight": 0.0})
    hidden = torch.randn(1, 8, 4, 4)
    label = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    valid = torch.ones(1, 1, 4, 4)
    valid[..., :2, :] = 0  # half the pixels not annotated (filled with 0 = background)
    _, totals = method._prototype_sums(hidden, label, valid, label, torch.ones(1, 1, 4, 4))
    assert totals[0].item() == 8.0 and totals[1:].sum().item() == 0.0


# ---- metrics and validation ------------------------------------------------------------------
def test_validation_leaves_not_annotated_pixels_out(tmp_path, monkeypatch):
    """The training-time validation scores as `semidiff eval` does: a prediction that is wrong only
    on not-annotated pixels gets Dice 1 (it got 2/3 before the reader's ignore_index was passed)."""
    from semidiff.engine import module as module_mod

    cfg = _config(tmp_path, tmp_path)
    mod = module_mod.SemidiffModule(cfg.model_dump(mode="json"))
    label = np.zeros((8, 8), np.uint8)
    label[:, :4] = 1
    label[:, 4:] = IGNORE_INDEX
    probs = np.zeros((7, 8, 8), np.float32)
    probs[1] = 1.0  # class 1 everywhere, so also on every not-annotated pixel
    monkeypatch.setattr(module_mod, "predict_image", lambda *a, **k: probs)
    mod.on_validation_epoch_start()
    case = Case("v_1", np.zeros((3, 8, 8), np.float32), label, meta={"ignore_index": IGNORE_INDEX})
    mod.validation_step(case, 0)
    metrics = mod._val_records[0]["metrics"]
    assert metrics[1]["dice"] == 1.0 and metrics[1]["jaccard"] == 1.0
    assert all(metrics[c]["dice"] == 1.0 and metrics[c]["pred_empty"] == 1.0 for c in range(2, 7))  # strict rule


def test_shipped_endoscapes_configs_state_the_protocol():
    for path in sorted((REPO / "configs" / "endoscapes").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.data.labeled == 6 and cfg.data.labeled_unit == "videos" and cfg.data.labeled_rule == "first"
        assert cfg.data.reader_options["treat_as_ignore"] == [7] and cfg.model.in_channels == 3
        assert cfg.data.root.endswith("/EndoScapes") and cfg.eval.empty_rule == "strict"
    bench = (REPO / "configs" / "bench" / "endoscapes_seg50.yaml").read_text()
    assert "records: ../../benchmarks/results/endoscapes_seg50/records" in bench


# ---- the real frames -----------------------------------------------------------------------------
def test_real_seg50_protocol_and_labels(realdata):
    from semidiff.engine.data import build_splits

    root = realdata / "EndoScapes"
    if not root.is_dir():
        pytest.skip(f"{root} missing: real EndoScapes test skipped")
    sizes = {}
    for n in (6, 3):
        cfg = load_config(REPO / "configs" / "endoscapes" / "supervised_reduced.yaml",
                          [f"data.root={root}", f"data.labeled={n}"])
        splits = build_splits(cfg, create_reader(cfg.data.reader, cfg.data.root, **cfg.data.reader_options))
        lab, unl, val = ({r.group for r in x} for x in (splits.labeled, splits.unlabeled, splits.val))
        assert len(lab) == n and len(unl) == 30 - n and len(val) == 10
        assert not (lab & unl) and not (lab & val) and not (unl & val)
        sizes[n] = (len(splits.labeled), len(splits.unlabeled), len(splits.val))
    assert sizes == {6: (57, 286, 76), 3: (34, 309, 76)}
    reader = create_reader("endoscapes", root)
    refs = {r.case_id: r for r in reader.cases("val")}
    with pytest.raises(DataError, match=r"semseg/153_32700\.png: label values 7"):
        reader.load(refs["153_32700"])
    case = create_reader("endoscapes", root, treat_as_ignore=[7]).load(refs["153_32700"])
    assert case.image.shape == (3, 480, 854) and (case.label == IGNORE_INDEX).sum() >= 24522


def test_labeled_mask_noise_leaves_not_annotated_pixels_alone():
    """The noise benchmark corrupts annotated pixels only; 255 stays 255 and is never a class."""
    from semidiff.config import NoiseConfig
    from semidiff.noise import LabeledMaskNoise

    label = np.zeros((8, 8), np.uint8)
    label[:4] = IGNORE_INDEX
    label[4:, :4] = 3
    flip = LabeledMaskNoise(NoiseConfig(target="labeled", kind="flip", rate=0.5, labeled_share=1.0), ["a"], 7)
    out = flip("a", label)
    assert (out[:4] == IGNORE_INDEX).all() and set(np.unique(out[4:])) <= set(range(7)) and (out[4:] != 3).any()
    grow = LabeledMaskNoise(NoiseConfig(target="labeled", kind="dilate", k=2, labeled_share=1.0), ["a"], 7)
    out = grow("a", label)
    assert (out[:4] == IGNORE_INDEX).all() and (out[4:, 4:6] == 3).all() and (out[4:, 6:] == 0).all()
