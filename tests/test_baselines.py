"""The semi-supervised baselines (Mean Teacher, UA-MT, CPS, BCP) and their shared pieces.

Tiny networks and shapes throughout; one short Lightning run per method at the end.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from semidiff.config import config_from_dict
from semidiff.data.synthetic import make_synthetic_dataset
from semidiff.errors import ConfigError
from semidiff.methods import NetSpec, Progress, create_method, list_methods
from semidiff.methods import bcp as bcp_module
from semidiff.methods.common import (
    block_mask,
    ema_update,
    largest_component,
    make_ema_copy,
    mix,
    pseudo_label,
    sigmoid_rampup,
)
from semidiff.methods.ua_mt import predictive_entropy, uncertainty_mask

BASELINES = ["mean_teacher", "ua_mt", "cps", "bcp"]
PARTS = {
    "mean_teacher": {"loss", "loss_sup", "loss_cons", "cons_weight"},
    "ua_mt": {"loss", "loss_sup", "loss_cons", "cons_weight", "mask_ratio"},
    "cps": {"loss", "loss_sup", "loss_cps", "cps_weight"},
    "bcp": {"loss", "loss_sup", "loss_unsup", "stage"},
}
SMALL_UNET = {"features": [4, 8, 8, 16, 16]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spec(dims: int, num_classes: int = 3) -> NetSpec:
    if dims == 2:
        return NetSpec("unet2d", 1, num_classes, 2, dict(SMALL_UNET))
    return NetSpec("vnet", 1, num_classes, 3, {"n_filters": 4, "has_dropout": True})


def _batch(dims: int, n_l: int, n_u: int, num_classes: int = 3):
    shape = (32, 32) if dims == 2 else (32, 32, 16)
    labeled = {"image": torch.randn(n_l, 1, *shape), "label": torch.randint(0, num_classes, (n_l, 1, *shape))}
    return labeled, {"image": torch.randn(n_u, 1, *shape)}


# ---- shared pieces ------------------------------------------------------------------------------
def test_all_baselines_are_registered():
    assert set(BASELINES) <= set(list_methods())


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == 1.0
    assert sigmoid_rampup(250, 100) == 1.0
    assert sigmoid_rampup(7, 0) == 1.0  # no ramp


def test_ema_copy_is_frozen_and_independent():
    student = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    teacher = make_ema_copy(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    with torch.no_grad():
        student[0].weight.add_(1.0)
    assert not torch.equal(student[0].weight, teacher[0].weight)


@pytest.mark.parametrize("step", [0, 5, 1000])
def test_ema_update_is_the_closed_form_blend(step):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Conv2d(2, 3, 1))
    teacher = make_ema_copy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student(torch.randn(2, 1, 8, 8))  # moves the student's BN running statistics
    before = [t.clone() for t in teacher.parameters()]
    alpha = ema_update(teacher, student, decay=0.99, step=step)
    assert alpha == pytest.approx(min(1 - 1 / (step + 1), 0.99))
    params = list(zip(before, teacher.parameters(), student.parameters(), strict=True))
    assert len(params) == 6
    for t0, t1, s in params:
        torch.testing.assert_close(t1, alpha * t0 + (1 - alpha) * s)
    for tb, sb in zip(teacher.buffers(), student.buffers(), strict=True):
        assert torch.equal(tb, sb)


def test_pseudo_label_and_confidence_mask():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.05, 0.9, 0.05]]).T.reshape(1, 3, 3, 1)
    labels, mask = pseudo_label(probs, threshold=0.6)
    assert labels.shape == (1, 1, 3, 1) and labels.dtype == torch.int64
    assert labels.flatten().tolist() == [0, 2, 1]
    assert mask.flatten().tolist() == [1.0, 0.0, 1.0]
    assert pseudo_label(probs)[1].flatten().tolist() == [1.0, 1.0, 1.0]


def test_largest_component_keeps_the_biggest_blob_per_class():
    lab = torch.zeros(1, 1, 10, 10, dtype=torch.long)
    lab[0, 0, 0:4, 0:4] = 1  # 16 voxels: kept
    lab[0, 0, 7:9, 7:9] = 1  # 4 voxels: removed
    lab[0, 0, 0:2, 7:10] = 2  # the only class-2 blob: kept
    out = largest_component(lab, num_classes=3)
    expected = lab.clone()
    expected[0, 0, 7:9, 7:9] = 0
    assert torch.equal(out, expected)


@pytest.mark.parametrize("shape", [(30, 45), (24, 33, 12)])
def test_block_mask_is_one_block_of_two_thirds_inside_the_image(shape):
    starts = set()
    for seed in range(20):
        torch.manual_seed(seed)
        mask = block_mask(shape)
        assert mask.shape == (1, 1, *shape)
        nz = mask[0, 0].nonzero()
        lo, hi = nz.min(0).values, nz.max(0).values + 1
        sides = [int(s * 2 / 3) for s in shape]
        assert (hi - lo).tolist() == sides and int(mask.sum()) == math.prod(sides)  # one full block
        assert (lo >= 0).all() and all(h <= s for h, s in zip(hi.tolist(), shape))
        starts.add(tuple(lo.tolist()))
    assert len(starts) > 1  # the position is random
    centred = block_mask(shape, centered=True)[0, 0].nonzero().min(0).values.tolist()
    assert centred == [(s - int(s * 2 / 3)) // 2 for s in shape]


def test_mix_takes_inside_from_a_and_outside_from_b_and_keeps_dtype():
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., 1:4, 2:5] = 1
    a, b = torch.full((2, 1, 6, 6), 3), torch.full((2, 1, 6, 6), 7)
    out = mix(a, b, mask)
    assert out.dtype == a.dtype
    assert (out[..., 1:4, 2:5] == 3).all() and int((out == 7).sum()) == 2 * (36 - 9)


def test_uncertainty_mask_keeps_exactly_the_voxels_under_the_threshold():
    # Four voxels, two classes: the mean over two passes is p; entropies are known in closed form.
    p = torch.tensor([0.5, 0.9, 0.99, 0.7])
    d = torch.tensor([0.3, 0.05, 0.005, 0.2])
    pass1 = torch.stack([p + d, 1 - p - d])
    pass2 = torch.stack([p - d, 1 - p + d])
    stack = torch.stack([pass1, pass2]).reshape(2, 1, 2, 2, 2)  # (T, B, C, 2, 2)
    entropy = [-(q * math.log(q) + (1 - q) * math.log(1 - q)) for q in p.tolist()]
    torch.testing.assert_close(predictive_entropy(stack.mean(0)).flatten(), torch.tensor(entropy),
                               atol=1e-4, rtol=0)
    threshold = 0.62  # between H(0.7) = 0.611 and H(0.5) = 0.693
    mask = uncertainty_mask(stack, threshold)
    assert mask.shape == (1, 1, 2, 2)
    assert mask.flatten().tolist() == [float(h < threshold) for h in entropy] == [0.0, 1.0, 1.0, 1.0]


def test_ua_mt_threshold_ramps_to_ln_c():
    m = create_method("ua_mt", _spec(2, num_classes=4), {})
    assert m.uncertainty_threshold(Progress(0, 100)) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(4))
    assert m.uncertainty_threshold(Progress(100, 100)) == pytest.approx(math.log(4))


# ---- what each baseline logs (training, prediction, resume, noise hook: test_method_conformance) --
@pytest.mark.parametrize("name", BASELINES)
def test_each_baseline_logs_its_parts(name):
    torch.manual_seed(0)
    method = create_method(name, _spec(2), {})
    labeled, unlabeled = _batch(2, 2, 2)
    max_steps = 5  # BCP: pre-training is step 0 (0.2 * 5), self-training from step 1
    for step in range(2):
        parts = method.training_step(labeled, unlabeled, Progress(step, max_steps))
        assert set(parts) == PARTS[name]
        if name == "bcp":
            assert parts["stage"].item() == (0.0 if step == 0 else 1.0)
        parts["loss"].backward()
        method.on_step_end(Progress(step + 1, max_steps))


@pytest.mark.parametrize("name,option", [("mean_teacher", "student_forward"), ("ua_mt", "student_forward"),
                                         ("cps", "net_forward")])
@pytest.mark.parametrize("mode,independent", [("joint", False), ("separate", True)])
def test_separate_forward_keeps_unlabeled_images_out_of_the_labeled_batch_statistics(name, option, mode,
                                                                                       independent):
    # The U-Net has BatchNorm: in one pass the labeled loss depends on the unlabeled images beside
    # them; in one pass per stream it does not (same seeds: same weights, dropout and noise).
    labeled, _ = _batch(2, 2, 2)
    losses = []
    for unlabeled in (torch.rand(2, 1, 32, 32), 3.0 + 5.0 * torch.rand(2, 1, 32, 32)):
        torch.manual_seed(0)
        method = create_method(name, _spec(2), {option: mode})
        method.train()
        torch.manual_seed(1)
        losses.append(method.training_step(labeled, {"image": unlabeled}, Progress(5, 10))["loss_sup"])
    assert torch.allclose(losses[0], losses[1]) == independent


def test_teacher_methods_evaluate_the_student_or_the_teacher():
    torch.manual_seed(0)
    image = torch.randn(1, 1, 32, 32)
    for eval_model in ("student", "teacher"):
        m = create_method("mean_teacher", _spec(2), {"eval_model": eval_model}).eval()
        with torch.no_grad():
            m.teacher.classifier.bias.add_(5.0)  # make the two networks disagree
        expected = torch.softmax(getattr(m, eval_model)(image), 1)
        torch.testing.assert_close(m.predict(image), expected)


def test_cps_networks_start_different_and_mean_prediction_averages():
    torch.manual_seed(0)
    m = create_method("cps", _spec(2), {"eval_model": "mean"}).eval()
    assert not torch.equal(m.net_a.classifier.weight, m.net_b.classifier.weight)
    image = torch.randn(1, 1, 32, 32)
    expected = 0.5 * (torch.softmax(m.net_a(image), 1) + torch.softmax(m.net_b(image), 1))
    torch.testing.assert_close(m.predict(image), expected)


def test_bcp_options_accept_steps_or_a_fraction():
    m = create_method("bcp", _spec(2), {"pretrain_steps": 0.25})
    assert m.options.pretrain_length(1000) == 250
    assert create_method("bcp", _spec(2), {"pretrain_steps": 40}).options.pretrain_length(1000) == 40
    with pytest.raises(ConfigError, match="pretrain_steps"):
        create_method("bcp", _spec(2), {"pretrain_steps": 1.5})


# ---- BCP copy-paste, both directions ------------------------------------------------------------
class _FixedTeacher(nn.Module):
    """Pseudo-labels 2 where the image is positive and 3 elsewhere (a known, spatial pattern)."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x), 10.0 * (x > 0), 10.0 * (x <= 0)], dim=1)


def _spy_bcp(monkeypatch, method):
    """Record the student's input and every (label_in, label_out, mask) given to region_losses."""
    seen = {"inputs": [], "regions": []}
    method.student.register_forward_pre_hook(lambda mod, args: seen["inputs"].append(args[0].detach().clone()))
    real = bcp_module.region_losses

    def spy(logits, label_in, label_out, mask):
        seen["regions"].append((label_in.clone(), label_out.clone(), mask.clone()))
        return real(logits, label_in, label_out, mask)

    monkeypatch.setattr(bcp_module, "region_losses", spy)
    return seen


def test_bcp_self_training_pastes_blocks_both_ways(monkeypatch):
    torch.manual_seed(0)
    method = create_method("bcp", _spec(2, num_classes=4), {"pretrain_steps": 0, "largest_component": False})
    method.teacher = _FixedTeacher()
    method.teacher_synced.fill_(True)  # the stub teacher cannot be reset from the student
    seen = _spy_bcp(monkeypatch, method)
    x_l = torch.stack([torch.full((1, 32, 32), 10.0), torch.full((1, 32, 32), 11.0)])
    y_l = torch.stack([torch.zeros(1, 32, 32), torch.ones(1, 32, 32)]).long()
    x_u = torch.randn(2, 1, 32, 32)
    pseudo = torch.where(x_u > 0, 2, 3)
    torch.manual_seed(3)
    expected_mask = block_mask((32, 32))
    torch.manual_seed(3)
    method.training_step({"image": x_l, "label": y_l}, {"image": x_u}, Progress(5, 10))

    inside = expected_mask[0, 0].bool()
    (student_in,) = seen["inputs"]
    # Direction 1: labeled item 0 pasted into unlabeled item 0.
    assert (student_in[0, 0][inside] == 10.0).all()
    assert torch.equal(student_in[0, 0][~inside], x_u[0, 0][~inside])
    # Direction 2: unlabeled item 1 pasted into labeled item 1.
    assert torch.equal(student_in[1, 0][inside], x_u[1, 0][inside])
    assert (student_in[1, 0][~inside] == 11.0).all()
    # The labels follow the same block: ground truth where labeled pixels are, pseudo-labels elsewhere.
    (in_1, out_1, mask_1), (in_2, out_2, mask_2) = seen["regions"]
    assert torch.equal(mask_1, expected_mask) and torch.equal(mask_2, expected_mask)
    label_1, label_2 = mix(in_1, out_1, mask_1)[0, 0], mix(in_2, out_2, mask_2)[0, 0]
    assert (label_1[inside] == 0).all() and torch.equal(label_1[~inside], pseudo[0, 0][~inside])
    assert torch.equal(label_2[inside], pseudo[1, 0][inside]) and (label_2[~inside] == 1).all()


def test_bcp_all_pairing_trains_on_every_labeled_pixel_in_both_directions(monkeypatch):
    torch.manual_seed(0)
    method = create_method("bcp", _spec(2, num_classes=4),
                           {"pretrain_steps": 0, "largest_component": False, "pairing": "all"})
    method.teacher = _FixedTeacher()
    method.teacher_synced.fill_(True)
    teacher_inputs = []
    method.teacher.register_forward_pre_hook(lambda mod, args: teacher_inputs.append(args[0].shape[0]))
    seen = _spy_bcp(monkeypatch, method)
    x_l = torch.stack([torch.full((1, 32, 32), 10.0 + i) for i in range(3)])
    y_l = torch.arange(3).view(3, 1, 1, 1).expand(3, 1, 32, 32).clone()
    x_u = torch.randn(2, 1, 32, 32)
    pseudo = torch.where(x_u > 0, 2, 3)
    torch.manual_seed(3)
    inside = block_mask((32, 32))[0, 0].bool()
    torch.manual_seed(3)
    method.training_step({"image": x_l, "label": y_l}, {"image": x_u}, Progress(5, 10))

    (student_in,) = seen["inputs"]
    assert student_in.shape[0] == 6 and teacher_inputs == [2]  # each unlabeled image labeled once
    (in_1, out_1, _), (in_2, out_2, _) = seen["regions"]
    for i in range(3):
        # Direction 1: labeled i pasted into unlabeled i mod 2, ground truth inside the block.
        assert (student_in[i, 0][inside] == 10.0 + i).all()
        assert torch.equal(student_in[i, 0][~inside], x_u[i % 2, 0][~inside])
        assert (in_1[i, 0] == i).all() and torch.equal(out_1[i], pseudo[i % 2])
        # Direction 2: a block of unlabeled (i + 1) mod 2 pasted into labeled i, ground truth around it.
        assert torch.equal(student_in[3 + i, 0][inside], x_u[(i + 1) % 2, 0][inside])
        assert (student_in[3 + i, 0][~inside] == 10.0 + i).all()
        assert torch.equal(in_2[i], pseudo[(i + 1) % 2]) and (out_2[i, 0] == i).all()


def test_bcp_all_pairing_pretrains_on_every_labeled_image(monkeypatch):
    torch.manual_seed(0)
    method = create_method("bcp", _spec(2, num_classes=4), {"pretrain_steps": 100, "pairing": "all"})
    seen = _spy_bcp(monkeypatch, method)
    x_l = torch.stack([torch.full((1, 32, 32), float(i)) for i in range(3)])
    y_l = torch.arange(3).view(3, 1, 1, 1).expand(3, 1, 32, 32).clone()
    unlabeled = {"image": torch.randn(2, 1, 32, 32)}
    torch.manual_seed(4)
    inside = block_mask((32, 32))[0, 0].bool()
    torch.manual_seed(4)
    method.training_step({"image": x_l, "label": y_l}, unlabeled, Progress(0, 1000))
    (student_in,) = seen["inputs"]
    assert student_in.shape[0] == 3
    ((label_in, label_out, mask),) = seen["regions"]
    for i in range(3):  # image i inside the block, image i + 1 (cyclic) around it
        assert (student_in[i, 0][inside] == i).all() and (student_in[i, 0][~inside] == (i + 1) % 3).all()
        mixed = mix(label_in, label_out, mask)[i, 0]
        assert (mixed[inside] == i).all() and (mixed[~inside] == (i + 1) % 3).all()


def test_bcp_pretraining_mixes_two_labeled_images(monkeypatch):
    torch.manual_seed(0)
    method = create_method("bcp", _spec(2, num_classes=4), {"pretrain_steps": 100})
    seen = _spy_bcp(monkeypatch, method)
    x_l = torch.stack([torch.full((1, 32, 32), 1.0), torch.full((1, 32, 32), 2.0)])
    y_l = torch.stack([torch.full((1, 32, 32), 1), torch.full((1, 32, 32), 3)])
    unlabeled = {"image": torch.randn(2, 1, 32, 32)}
    torch.manual_seed(4)
    inside = block_mask((32, 32))[0, 0].bool()
    torch.manual_seed(4)
    parts = method.training_step({"image": x_l, "label": y_l}, unlabeled, Progress(0, 1000))
    assert parts["stage"].item() == 0.0 and parts["loss_unsup"].item() == 0.0
    (student_in,) = seen["inputs"]
    assert student_in.shape[0] == 1
    assert (student_in[0, 0][inside] == 1.0).all() and (student_in[0, 0][~inside] == 2.0).all()
    ((label_in, label_out, mask),) = seen["regions"]
    mixed = mix(label_in, label_out, mask)[0, 0]
    assert (mixed[inside] == 1).all() and (mixed[~inside] == 3).all()
    assert not bool(method.teacher_synced)


def test_bcp_resets_the_teacher_at_the_first_self_training_step():
    torch.manual_seed(0)
    method = create_method("bcp", _spec(2), {"pretrain_steps": 1})
    labeled, unlabeled = _batch(2, 2, 2)
    with torch.no_grad():
        method.student.classifier.bias.add_(1.0)  # differs from the teacher made at init
    method.on_step_end(Progress(1, 4))  # stage 0: the teacher does not follow the student
    assert not torch.equal(method.teacher.classifier.bias, method.student.classifier.bias)
    method.training_step(labeled, unlabeled, Progress(1, 4))
    assert bool(method.teacher_synced)
    assert torch.equal(method.teacher.classifier.bias, method.student.classifier.bias)


# ---- the Lightning engine -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth_small(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_small")
    return make_synthetic_dataset(root, spatial_dims=2, num_cases=8, size=(32, 32), val_cases=2, seed=0)


@pytest.mark.parametrize("name", BASELINES)
def test_engine_runs_each_baseline(tmp_path: Path, synth_small, name):
    from semidiff.engine.train import train

    cfg = config_from_dict({
        "experiment": {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 0},
        "data": {"reader": "synthetic", "root": str(synth_small), "labeled": 2, "patch_size": [32, 32]},
        "model": {"net": "unet2d", "num_classes": 4, "net_options": dict(SMALL_UNET)},
        "method": {"name": name, "options": {"ua_mt": {"mc_passes": 2},
                                             "bcp": {"pretrain_steps": 2, "self_train_from": "best"}}.get(name, {})},
        "train": {"max_steps": 4, "labeled_batch": 2, "unlabeled_batch": 2, "optimizer": "adamw", "lr": 1e-3,
                  "val_every": 2, "log_every": 1, "accelerator": "cpu", "progress_bar": False,
                  "num_threads": 1},
        "eval": {"overlay_cases": 0},
    })
    results = train(cfg, log=lambda *_: None)
    rows = []
    for f in sorted((cfg.run_dir() / "csv").glob("version_*/metrics.csv")):
        rows += [r for r in csv.DictReader(f.read_text().splitlines()) if r.get("train/loss")]
    assert len(rows) == 4
    for part in PARTS[name]:
        assert all(math.isfinite(float(r[f"train/{part}"])) for r in rows)
    assert 0.0 <= results["last"]["summary"]["mean"]["dice"] <= 1.0
    if name == "bcp":  # the engine reported the validation at the end of pre-training to the method
        state = torch.load(cfg.run_dir() / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        assert 0.0 <= float(state["method.best_pretrained_dice"]) <= 1.0


def test_bcp_self_training_starts_from_the_best_pretrained_validation():
    method = create_method("bcp", _spec(2), {"pretrain_steps": 4, "self_train_from": "best"})
    labeled, unlabeled = _batch(2, 2, 2)

    def nudge(scale):  # stands in for optimiser steps between validations
        with torch.no_grad():
            for p in method.student.parameters():
                p.add_(scale)

    nudge(0.01)
    method.on_validation(Progress(2, 10), 0.5)
    best = [p.clone() for p in method.student.parameters()]
    nudge(0.02)
    method.on_validation(Progress(3, 10), 0.4)  # worse: not kept
    nudge(0.03)
    method.training_step(labeled, unlabeled, Progress(4, 10))  # first self-training step
    # The parameters are the kept ones (the step's forward moves only BatchNorm's running statistics).
    for value, kept in zip(method.student.parameters(), best, strict=True):
        torch.testing.assert_close(value, kept)
    for t, s in zip(method.teacher.parameters(), method.student.parameters(), strict=True):
        torch.testing.assert_close(t, s)
    method.on_validation(Progress(6, 10), 0.9)  # after pre-training: does not touch the copy
    assert float(method.best_pretrained_dice) == 0.5
    assert "best_pretrained_dice" in method.state_dict()
    # Default (last): no copy kept, the hook does nothing.
    plain = create_method("bcp", _spec(2), {"pretrain_steps": 4})
    plain.on_validation(Progress(2, 10), 0.5)
    assert plain.best_pretrained is None
