"""Diff-CL: the HFM block, the time-conditioned denoiser, the memory bank and contrastive loss, the
method's training step, ablation variants and named outputs (``predict(image, output)``).

The generic DDIM properties (same seed -> same result, a perfect x0 predictor lands on the label
for any number of steps, state shapes in 2D and 3D) are tested on ``LabelDiffusion`` itself in
``test_label_diffusion.py``; here they are checked through the method's own DS wiring.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semidiff.config import config_from_dict
from semidiff.data.synthetic import make_synthetic_dataset
from semidiff.errors import ConfigError
from semidiff.methods import NetSpec, Progress, create_method, list_methods
from semidiff.methods.diffcl import (
    ClassMemoryBank,
    memory_infonce,
    sample_balanced,
    sample_per_class,
)
from semidiff.nets import create_net
from semidiff.nets.denoiser import create_denoiser
from semidiff.nets.hfm import (
    HFMBlock,
    MambaMixer,
    SkipTransformNet,
    add_hfm,
    high_pass,
    mamba_ssm_available,
)

SMALL_UNET = {"features": [4, 8, 8, 16, 16]}
# Cheap settings for every method test: short chains, a narrow Mamba.
FAST = {"timesteps": 20, "test_steps": 2, "pl_steps": 2, "hfm_dim": 8, "hfm_d_state": 4, "proj_hidden": 16,
        "proj_dim": 8, "bank_size": 16, "bank_push": 8, "contrast_voxels": 256, "ds_time_dim": 8}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spec(dims: int, num_classes: int = 3) -> NetSpec:
    if dims == 2:
        return NetSpec("unet2d", 1, num_classes, 2, dict(SMALL_UNET))
    return NetSpec("vnet", 1, num_classes, 3, {"n_filters": 4})


def _batch(dims: int, n_l: int = 2, n_u: int = 2, num_classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (32, 32) if dims == 2 else (16, 16, 16)
    labeled = {"image": torch.randn(n_l, 1, *shape, generator=g),
               "label": torch.randint(0, num_classes, (n_l, 1, *shape), generator=g)}
    return labeled, {"image": torch.randn(n_u, 1, *shape, generator=g)}


def _method(dims: int = 2, **options):
    return create_method("diffcl", _spec(dims), {**FAST, **options})


# ---- HFM --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 8, 12), (1, 2, 6, 8, 4)])
def test_constant_input_has_no_high_frequency(shape):
    x = torch.full(shape, 3.7)
    torch.testing.assert_close(high_pass(x, 0.25), torch.zeros(shape), atol=1e-5, rtol=0)
    torch.testing.assert_close(high_pass(x, 0.0), torch.zeros(shape), atol=1e-5, rtol=0)  # r=0 still drops the mean


def test_high_pass_keeps_high_and_drops_low_frequencies():
    n = 16
    pos = torch.arange(n, dtype=torch.float32)
    low = torch.cos(2 * math.pi * 1 / n * pos)[None, None, :, None].expand(1, 1, n, n)  # f = 1/16 < r
    high = torch.cos(math.pi * pos)[None, None, :, None].expand(1, 1, n, n)  # f = 0.5 > r
    torch.testing.assert_close(high_pass(low + high, 0.25), high, atol=1e-5, rtol=0)
    # A frequency of 0.3 on one axis but 0 on the other lies outside the box: it is kept.
    mid = torch.cos(2 * math.pi * 5 / n * pos)[None, None, :, None].expand(1, 1, n, n)  # f = 0.3125
    torch.testing.assert_close(high_pass(mid, 0.25), mid, atol=1e-5, rtol=0)
    torch.testing.assert_close(high_pass(mid, 0.4), torch.zeros_like(mid), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(2, 8, 6, 5), (2, 8, 4, 3, 5)])
def test_hfm_block_keeps_shape_and_gates_with_a_residual(shape):
    block = HFMBlock(8, len(shape) - 2, radius=0.25, backend="mambapy", d_state=4, gate="multiply")
    x = torch.randn(shape)
    y = block(x)
    assert y.shape == x.shape
    # X * (1 + A) with A = sigmoid(.) in (0, 1): the output lies between X and 2X.
    ratio = y / x
    assert torch.all(ratio > 1.0 - 1e-5) and torch.all(ratio < 2.0 + 1e-5)
    y.sum().backward()
    assert block.forward_scan.block.in_proj.weight.grad is not None


@pytest.mark.parametrize("shape", [(2, 8, 6, 5), (2, 8, 4, 3, 5)])
def test_residual_gate_starts_as_the_identity_and_learns_through_the_mamba(shape):
    torch.manual_seed(0)
    block = HFMBlock(8, len(shape) - 2, radius=0.25, backend="mambapy", d_state=4, gate="residual")
    x = torch.randn(shape)
    torch.testing.assert_close(block(x), x, atol=0, rtol=0)  # zero-initialised: exactly X at start
    # The first gradient reaches only the zero convolution (the branch behind it sees zero weights);
    # once that has moved, the Mamba gets gradients and the output departs from X.
    block(x).pow(2).sum().backward()
    assert block.gate.weight.grad.abs().sum() > 0
    assert block.forward_scan.block.in_proj.weight.grad.abs().sum() == 0
    with torch.no_grad():
        block.gate.weight.add_(0.1)
    block.zero_grad()
    y = block(x)
    assert (y - x).abs().max() > 1e-3
    y.pow(2).sum().backward()
    assert block.forward_scan.block.in_proj.weight.grad.abs().sum() > 0
    # The multiplicative gate of the spec is not the identity at start.
    torch.manual_seed(0)
    assert not torch.allclose(HFMBlock(8, len(shape) - 2, backend="mambapy", d_state=4, gate="multiply")(x), x)


def test_bidirectional_scan_sees_later_tokens_one_way_does_not():
    torch.manual_seed(0)
    block = HFMBlock(6, 2, backend="mambapy", d_state=4)
    tokens = torch.randn(1, 10, 6)
    later = tokens.clone()
    later[:, -1] += 5.0  # change only the last token: the sequence is asymmetric
    one_way = block.forward_scan
    # A causal scan: the first output ignores later tokens...
    torch.testing.assert_close(one_way(tokens)[:, 0], one_way(later)[:, 0])
    # ...the bidirectional one does not.
    assert not torch.allclose(block.scan(tokens)[:, 0], block.scan(later)[:, 0])
    # And on the same sequence the two differ (the reversed scan adds information).
    assert not torch.allclose(block.scan(tokens), one_way(tokens))


def test_shared_direction_scan_is_mirror_symmetric():
    torch.manual_seed(1)
    block = HFMBlock(4, 2, backend="mambapy", share_directions=True, d_state=4)
    half = torch.randn(1, 5, 4)
    palindrome = torch.cat([half, half.flip(1)], dim=1)
    out = block.scan(palindrome)
    torch.testing.assert_close(out, out.flip(1), atol=1e-5, rtol=1e-5)


def test_mamba_backend_choice():
    mixer = MambaMixer(4, backend="auto", d_state=4)
    assert mixer.resolved_backend(torch.zeros(1, 3, 4)) == "mambapy"
    with pytest.raises(ConfigError, match="backend"):
        MambaMixer(4, backend="cuda_kernels")
    if mamba_ssm_available():
        with pytest.raises(ConfigError, match="CUDA"):
            MambaMixer(4, backend="mamba_ssm").resolved_backend(torch.zeros(1, 3, 4))
    else:
        with pytest.raises(ConfigError, match="mamba_ssm"):
            MambaMixer(4, backend="mamba_ssm")


@pytest.mark.skipif(not (torch.cuda.is_available() and mamba_ssm_available()), reason="needs CUDA and mamba_ssm")
def test_mamba_ssm_matches_mambapy_on_the_same_weights():
    torch.manual_seed(0)
    block = HFMBlock(16, 3, backend="mambapy", gate="multiply").cuda()  # not the identity at start
    fast = HFMBlock(16, 3, backend="mamba_ssm", gate="multiply").cuda()
    fast.load_state_dict(block.state_dict())
    x = torch.randn(2, 16, 6, 6, 4, device="cuda")
    torch.testing.assert_close(fast(x), block(x), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("dims", [2, 3])
def test_add_hfm_transforms_only_the_chosen_skips(dims):
    spec = _spec(dims)
    torch.manual_seed(0)
    plain = create_net(spec.name, 1, 3, **spec.options)
    # The multiplicative gate changes a skip from the start (the residual one is the identity then).
    wrapped = add_hfm(plain, [3, -1], backend="mambapy", dim=4, d_state=4, gate="multiply")
    assert isinstance(wrapped, SkipTransformNet) and wrapped.levels == [3, 4]
    plain.eval()
    wrapped.eval()
    x = torch.randn(1, 1, *((32, 32) if dims == 2 else (16, 16, 16)))
    skips = plain.encode(x)
    out = wrapped.transform_skips(skips)
    for level in range(len(skips)):
        same = torch.equal(out[level], skips[level])
        assert same == (level not in (3, 4))
        assert out[level].shape == skips[level].shape
    logits, feats = wrapped(x, return_features=True)
    assert logits.shape == (1, 3, *x.shape[2:]) and feats.shape[1] == wrapped.feature_channels
    assert add_hfm(plain, []) is plain
    with pytest.raises(ConfigError, match="do not exist"):
        add_hfm(plain, [7])


# ---- the denoiser -----------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "opts", "shape"), [
    ("unet2d", SMALL_UNET, (2, 1, 20, 28)),
    ("vnet", {"n_filters": 4}, (2, 1, 12, 16, 8)),
    ("unet3d", {"features": [4, 4, 8, 8, 8]}, (2, 1, 12, 16, 8)),
])
def test_denoiser_shapes_and_time_conditioning(name, opts, shape):
    torch.manual_seed(0)
    ds = create_denoiser(name, 1, 3, time_dim=8, **opts).eval()
    image, y_t = torch.randn(shape), torch.randn(shape[0], 3, *shape[2:])
    out_a = ds(image, y_t, torch.tensor([0, 0]))
    assert out_a.shape == (shape[0], 3, *shape[2:])
    # The timestep reaches the output, and so does the noisy label.
    assert not torch.allclose(out_a, ds(image, y_t, torch.tensor([900, 900])))
    assert not torch.allclose(out_a, ds(image, torch.randn_like(y_t), torch.tensor([0, 0])))
    # One bias projection per block: every encoder and decoder block is conditioned.
    assert len(ds.time_proj) == 9
    with pytest.raises(ValueError, match="y_t"):
        ds(image, y_t[:, :2], torch.tensor([0, 0]))


def test_ds_sampling_through_the_method_is_seeded_and_exact_with_a_perfect_predictor():
    method = _method(2, timesteps=20).eval()
    image, _ = _batch(2)
    a = method.predict(image["image"], "ds")
    b = method.predict(image["image"], "ds")
    assert torch.equal(a, b)  # fixed sample_seed
    method.options.sample_seed = 1
    assert not torch.allclose(a, method.predict(image["image"], "ds"))

    # A perfect x0 predictor in DS's place, steps == T: the chain ends on the label.
    label = image["label"][:, 0]

    class Perfect(nn.Module):
        def forward(self, img, y_t, t):
            assert img is image["image"]  # DS is conditioned on the image being segmented
            return 30.0 * F.one_hot(label, 3).movedim(-1, 1).float()

    method.ds = Perfect()
    probs = method.sample_ds(image["image"], steps=20)
    assert torch.equal(probs.argmax(1), label)


# ---- memory bank and contrastive loss ---------------------------------------------------------
def test_memory_bank_is_fifo_per_class_with_capacity():
    bank = ClassMemoryBank(num_classes=2, size=3, dim=1)
    feats = torch.arange(1.0, 6.0)[:, None].requires_grad_(True)  # 1..5 with a gradient
    bank.push(feats, torch.tensor([0, 1, 0, 0, 1]))
    assert bank.entries(0).flatten().tolist() == [1.0, 3.0, 4.0]
    assert bank.entries(1).flatten().tolist() == [2.0, 5.0]
    bank.push(torch.tensor([[6.0], [7.0]]), torch.tensor([0, 0]))
    assert bank.entries(0).flatten().tolist() == [4.0, 6.0, 7.0]  # 1 and 3 dropped, oldest first
    assert bank.count.tolist() == [3, 2]
    bank.push(torch.arange(10.0, 15.0)[:, None], torch.zeros(5, dtype=torch.long))  # more than K at once
    assert bank.entries(0).flatten().tolist() == [12.0, 13.0, 14.0]
    assert bank.entries(1).flatten().tolist() == [2.0, 5.0]
    assert bank.valid().tolist() == [[True, True, True], [True, True, False]]
    assert not bank.features.requires_grad and bank.features.grad_fn is None
    # Buffers: the bank is part of the state dict (checkpointed).
    state = bank.state_dict()
    assert {"features", "pointer", "count"} <= set(state)
    fresh = ClassMemoryBank(2, 3, 1)
    fresh.load_state_dict(state)
    assert fresh.entries(0).flatten().tolist() == [12.0, 13.0, 14.0]


def _class_directions(num_classes: int, dim: int, seed: int = 0) -> Tensor:
    return F.normalize(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_contrastive_loss_is_lower_next_to_the_own_class_memory():
    g = torch.Generator().manual_seed(0)
    dirs = _class_directions(3, 16)
    memory = F.normalize(dirs[:, None, :] + 0.1 * torch.randn(3, 8, 16, generator=g), dim=2)
    valid = torch.ones(3, 8, dtype=torch.bool)
    classes = torch.randint(0, 3, (60,), generator=g)
    anchors = F.normalize(dirs[classes] + 0.1 * torch.randn(60, 16, generator=g), dim=1)
    matched = memory_infonce(anchors, classes, memory, valid, tau=0.1)
    shuffled = memory_infonce(anchors, (classes + 1) % 3, memory, valid, tau=0.1)
    assert matched < 0.1 < shuffled
    # Empty slots are ignored, whatever they hold: a half-filled bank of 8 equals a full bank of 4.
    half = valid.clone()
    half[:, 4:] = False
    junk = memory.clone()
    junk[:, 4:] = memory[(torch.arange(3) + 1) % 3, :4]  # other classes' directions, but not valid
    torch.testing.assert_close(memory_infonce(anchors, classes, junk, half, 0.1),
                               memory_infonce(anchors, classes, memory[:, :4], valid[:, :4], 0.1))
    # Nothing to contrast against: zero, and the graph still works.
    anchors.requires_grad_(True)
    zero = memory_infonce(anchors, classes, memory, torch.zeros_like(valid), 0.1)
    zero.backward()
    assert zero.item() == 0.0


def test_contrastive_loss_matches_the_formula_on_one_anchor():
    memory = F.normalize(torch.randn(2, 2, 4, generator=torch.Generator().manual_seed(3)), dim=2)
    anchor = F.normalize(torch.randn(1, 4, generator=torch.Generator().manual_seed(4)), dim=1)
    s = (anchor @ memory.reshape(4, 4).t())[0] / 0.5
    neg = torch.exp(s[2:]).sum()
    expected = -0.5 * (torch.log(torch.exp(s[0]) / (torch.exp(s[0]) + neg))
                       + torch.log(torch.exp(s[1]) / (torch.exp(s[1]) + neg)))
    got = memory_infonce(anchor, torch.tensor([0]), memory, torch.ones(2, 2, dtype=torch.bool), tau=0.5)
    torch.testing.assert_close(got, expected)


def test_voxel_sampling_is_class_balanced_and_capped():
    classes = torch.cat([torch.zeros(1000), torch.ones(30), torch.full((500,), 2.0)]).long()
    idx = sample_balanced(classes, cap=300, num_classes=3)
    counts = torch.bincount(classes[idx], minlength=3).tolist()
    assert counts == [100, 30, 100] and len(set(idx.tolist())) == len(idx)
    per = sample_per_class(torch.tensor([-1, 0, 0, 1, -1, 1, 1]), quota=2, num_classes=2)
    assert sorted(torch.tensor([-1, 0, 0, 1, -1, 1, 1])[per].tolist()) == [0, 0, 1, 1]


# ---- the method -------------------------------------------------------------------------------
FULL_PARTS = {"loss", "loss_c_sup", "loss_c_pseudo", "loss_d_sup", "loss_d_pseudo", "loss_contrast",
              "loss_contrast_u", "loss_contrast_l", "bank_fill", "mu"}


def test_diffcl_is_registered():
    assert "diffcl" in list_methods()


@pytest.mark.parametrize("dims", [2, 3])
def test_training_step_every_part_finite_and_named(dims):
    method = _method(dims)
    labeled, unlabeled = _batch(dims)
    for step in range(2):  # the second step contrasts against the entries the first one stored
        parts = method.training_step(labeled, unlabeled, Progress(step, 10))
        assert set(parts) == FULL_PARTS
        assert all(torch.isfinite(v).all() for v in parts.values())
        method.zero_grad()
        parts["loss"].backward()
        method.on_step_end(Progress(step + 1, 10))
    assert parts["loss_contrast_u"] > 0 and parts["loss_contrast_l"] > 0
    assert 0 < parts["bank_fill"] <= 1
    # Gradients reach CS (HFM and projection head included) and DS.
    for name in ("cs.base.classifier.weight", "cs.skip_modules.3.gate.weight", "proj_head.0.weight",
                 "ds.backbone.classifier.weight", "ds.time_mlp.0.weight", "ds.time_proj.0.1.weight"):
        assert dict(method.named_parameters())[name].grad is not None, name


def test_the_loss_is_the_weighted_sum_of_its_parts():
    method = _method(2, mu1=0.7, mu2=0.4, eta=0.3, rampup_steps=0)
    labeled, unlabeled = _batch(2)
    method.training_step(labeled, unlabeled, Progress(0, 10))
    method.on_step_end(Progress(1, 10))  # fill the bank
    p = method.training_step(labeled, unlabeled, Progress(1, 10))
    expected = (p["loss_c_sup"] + p["loss_d_sup"] + 0.7 * p["loss_d_pseudo"]
                + 0.4 * (p["loss_c_pseudo"] + 0.3 * p["loss_contrast"]))
    torch.testing.assert_close(p["loss"].detach(), expected)
    torch.testing.assert_close(p["loss_contrast"], p["loss_contrast_u"] + p["loss_contrast_l"])


def test_weights_follow_the_ramp():
    method = _method(2, rampup_fraction=0.4, use_contrast=False)
    labeled, unlabeled = _batch(2)
    assert method.training_step(labeled, unlabeled, Progress(0, 100))["mu"].item() == pytest.approx(math.exp(-5))
    assert method.training_step(labeled, unlabeled, Progress(40, 100))["mu"].item() == pytest.approx(1.0)


ABLATIONS = {
    "cs_only": ({"peer": "none", "use_hfm": False, "use_contrast": False}, {"loss", "loss_c_sup", "mu"}),
    "cs_cs_cps": ({"peer": "cs", "use_hfm": False, "use_contrast": False},
                  {"loss", "loss_c_sup", "loss_c_pseudo", "loss_peer_sup", "loss_peer_pseudo", "mu"}),
    "ds_cs": ({"peer": "ds", "use_hfm": False, "use_contrast": False},
              {"loss", "loss_c_sup", "loss_c_pseudo", "loss_d_sup", "loss_d_pseudo", "mu"}),
    "ds_cs_hfm": ({"peer": "ds", "use_hfm": True, "use_contrast": False},
                  {"loss", "loss_c_sup", "loss_c_pseudo", "loss_d_sup", "loss_d_pseudo", "mu"}),
    "ds_cs_contrast": ({"peer": "ds", "use_hfm": False, "use_contrast": True}, FULL_PARTS),
    "full": ({}, FULL_PARTS),
}


@pytest.mark.parametrize("variant", list(ABLATIONS))
def test_each_ablation_variant_builds_and_steps(variant):
    options, parts_expected = ABLATIONS[variant]
    method = _method(2, **options)
    assert (method.ds is not None) == (method.options.peer == "ds")
    assert (method.cs_peer is not None) == (method.options.peer == "cs")
    assert isinstance(method.cs, SkipTransformNet) == method.options.use_hfm
    assert (method.bank is not None) == method.options.use_contrast
    labeled, unlabeled = _batch(2)
    parts = method.training_step(labeled, None if options.get("peer") == "none" else unlabeled, Progress(3, 10))
    assert set(parts) == parts_expected
    assert all(torch.isfinite(v).all() for v in parts.values())
    parts["loss"].backward()


def test_cs_peer_starts_from_other_weights():
    method = _method(2, peer="cs", use_hfm=False, use_contrast=False)
    assert not torch.equal(method.cs.classifier.weight, method.cs_peer.classifier.weight)


@pytest.mark.parametrize("dims", [2, 3])
def test_predict_returns_probabilities_for_each_output(dims):
    method = _method(dims).eval()
    image = _batch(dims)[0]["image"]
    assert method.outputs == ("cs", "ds", "mean")
    results = {}
    for name in method.outputs:
        probs = method.predictor(name)(image)
        assert probs.shape == (2, 3, *image.shape[2:])
        assert torch.all(probs >= 0)
        torch.testing.assert_close(probs.sum(1), torch.ones(2, *image.shape[2:]))
        results[name] = probs
    torch.testing.assert_close(results["mean"], 0.5 * (results["cs"] + results["ds"]))
    torch.testing.assert_close(method.predict(image), results["cs"])  # test_output: cs
    assert method.default_output == "cs"
    with pytest.raises(ConfigError, match="no output"):
        method.predictor("teacher")


def test_outputs_a_variant_lacks_are_clear_errors():
    cs_only = _method(2, peer="none", use_hfm=False, use_contrast=False).eval()
    image = _batch(2)[0]["image"]
    for name in ("ds", "mean"):
        with pytest.raises(ConfigError, match="peer"):
            cs_only.predict(image, name)
    cps = _method(2, peer="cs", use_hfm=False, use_contrast=False).eval()
    torch.testing.assert_close(
        cps.predict(image, "mean"),
        0.5 * (torch.softmax(cps.cs(image), 1) + torch.softmax(cps.cs_peer(image), 1)))
    with pytest.raises(ConfigError, match="peer"):
        create_method("diffcl", _spec(2), {**FAST, "peer": "none", "test_output": "ds"})


def test_single_output_methods_keep_their_plain_predict():
    method = create_method("supervised", _spec(2), {})
    assert method.outputs == ("default",) and method.default_output == "default"
    assert method.predictor(None) == method.predict and method.predictor("default") == method.predict
    with pytest.raises(ConfigError, match="no output 'ds'"):
        method.predictor("ds")


@pytest.mark.parametrize(("options", "key"), [
    ({"pl_steps": 30}, "pl_steps"),
    ({"test_steps": 21}, "test_steps"),
    ({"hfm_backend": "cuda"}, "hfm_backend"),
    ({"hfm_radius": 0.7}, "hfm_radius"),
    ({"hfm_gate": "add"}, "hfm_gate"),
    ({"peer": "teacher"}, "peer"),
    ({"hfm_levels": [9]}, "levels"),
    ({"schedule": "linear"}, "schedule"),
    ({"ds_net": "resnet"}, "resnet"),
    ({"bank": 5}, "bank"),
])
def test_bad_options_are_config_errors(options, key):
    with pytest.raises(ConfigError, match=key):
        create_method("diffcl", _spec(2), {**FAST, **options})


def test_bank_and_networks_round_trip_through_the_state_dict():
    method = _method(2)
    labeled, unlabeled = _batch(2)
    method.training_step(labeled, unlabeled, Progress(0, 10))
    method.on_step_end(Progress(1, 10))  # the bank receives the step's candidates here
    state = method.state_dict()
    assert "bank.features" in state and int(state["bank.count"].sum()) > 0
    fresh = _method(2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.bank.features, method.bank.features)
    fresh.eval()
    method.eval()
    image = labeled["image"]
    torch.testing.assert_close(fresh.predict(image, "ds"), method.predict(image, "ds"))


# ---- engine and `semidiff eval --output` -------------------------------------------------------
def test_engine_trains_and_eval_reports_the_output(tmp_path: Path):
    from semidiff.cli import main
    from semidiff.engine.train import train

    root = make_synthetic_dataset(tmp_path / "data", spatial_dims=2, num_cases=6, size=(32, 32), val_cases=2, seed=0)
    cfg = config_from_dict({
        "experiment": {"name": "diffcl", "output_dir": str(tmp_path / "runs"), "seed": 0},
        "data": {"reader": "synthetic", "root": str(root), "labeled": 2, "patch_size": [32, 32]},
        "model": {"net": "unet2d", "num_classes": 4, "net_options": dict(SMALL_UNET)},
        "method": {"name": "diffcl", "options": dict(FAST)},
        "train": {"max_steps": 2, "labeled_batch": 2, "unlabeled_batch": 2, "optimizer": "adamw", "lr": 1e-3,
                  "val_every": 2, "log_every": 1, "accelerator": "cpu", "progress_bar": False, "num_threads": 1},
        "eval": {"overlay_cases": 0},
    })
    results = train(cfg, log=lambda *_: None)
    assert results["last"]["protocol"]["output"] == "cs"
    run = cfg.run_dir()
    assert main(["eval", str(run), "--checkpoint", "final", "--output", "mean"]) == 0
    protocol = json.loads((run / "eval_val_final_mean" / "protocol.json").read_text())
    assert protocol["method"] == "diffcl" and protocol["output"] == "mean"
    assert main(["eval", str(run), "--checkpoint", "final", "--output", "teacher"]) == 2
    # DDIM steps change at evaluation and are stated in the header; options that shaped the weights do not.
    out = tmp_path / "ds_steps1"
    assert main(["eval", str(run), "--checkpoint", "final", "--output", "ds", "--out", str(out),
                 "method.options.test_steps=1"]) == 0
    assert json.loads((out / "protocol.json").read_text())["prediction_options"]["test_steps"] == 1
    # The CS output uses no DDIM option, so none is stated for it.
    assert results["last"]["protocol"]["prediction_options"] == {"test_output": "cs"}
    assert main(["eval", str(run), "--checkpoint", "final", "method.options.proj_dim=4"]) == 2


def test_eval_options_change_prediction_and_nothing_else():
    method = _method(2).eval()
    image = _batch(2)[0]["image"]
    two_steps = method.predict(image, "ds")  # FAST: test_steps 2
    method.override_eval_options({"test_steps": 1, "peer": "ds"})  # peer unchanged: accepted
    assert method.options.test_steps == 1
    assert not torch.allclose(method.predict(image, "ds"), two_steps)
    with pytest.raises(ConfigError, match="hfm_radius .*cannot change at evaluation"):
        method.override_eval_options({"hfm_radius": 0.1})
    with pytest.raises(ConfigError, match="test_steps"):
        method.override_eval_options({"test_steps": 0})


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_ds_image_only_share_trains_ds_from_pure_noise(share):
    method = _method(2, ds_image_only_share=share)
    seen = []
    method.ds.register_forward_pre_hook(lambda _m, args: seen.append(args[2].clone()))
    labeled, unlabeled = _batch(2, n_l=4, n_u=4)
    torch.manual_seed(0)
    method.training_step(labeled, unlabeled, Progress(0, 10))
    # The last DS call of a step is its training pass (the earlier ones sample pseudo-labels).
    t = seen[-1]
    last = method.diffusion.num_train_timesteps - 1
    if share == 1.0:
        assert (t == last).all()
    else:
        assert len(t) == 8 and (t < last).any()


def _infonce_over_all_pairs(anchors, anchor_classes, memory, valid, tau):
    """The loss written pair by pair over the flat list of valid entries (the definition)."""
    num_classes, size, _ = memory.shape
    keys = memory.reshape(num_classes * size, -1)[valid.reshape(-1)]
    key_classes = torch.arange(num_classes).repeat_interleave(size)[valid.reshape(-1)]
    losses = []
    for a, c in zip(anchors, anchor_classes, strict=True):
        s = keys @ a / tau
        pos, neg = s[key_classes == c], s[key_classes != c]
        if len(pos) and len(neg):
            losses.append((torch.logaddexp(pos, torch.logsumexp(neg, 0)) - pos).mean())
    return torch.stack(losses).mean()


def test_contrastive_loss_and_gradient_match_the_pairwise_definition_on_a_partly_filled_bank():
    g = torch.Generator().manual_seed(5)
    memory = F.normalize(torch.randn(4, 6, 8, generator=g), dim=2)
    valid = torch.rand(4, 6, generator=g) > 0.4
    valid[3] = False  # a class with no entry: its anchors are skipped
    classes = torch.randint(0, 4, (40,), generator=g)
    anchors = F.normalize(torch.randn(40, 8, generator=g), dim=1).requires_grad_(True)
    got = memory_infonce(anchors, classes, memory, valid, tau=0.1)
    (grad_got,) = torch.autograd.grad(got, anchors)
    want = _infonce_over_all_pairs(anchors, classes, memory, valid, tau=0.1)
    (grad_want,) = torch.autograd.grad(want, anchors)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad_got, grad_want)
    assert torch.isfinite(grad_got).all() and grad_got[classes == 3].abs().sum() == 0


# ---- how a weak peer may teach (issue 23) ------------------------------------------------------
def test_pseudo_mask_keeps_confident_and_agreeing_voxels():
    conf = torch.tensor([0.95, 0.5, 0.99, 0.91]).view(1, 1, 2, 2)
    teacher = torch.tensor([1, 1, 2, 0]).view(1, 1, 2, 2)
    student = torch.tensor([1, 1, 0, 0]).view(1, 1, 2, 2)
    masks = {kind: _method(2, pseudo_mask=kind).pseudo_mask(conf, teacher, student)
             for kind in ("none", "confidence", "agreement", "both")}
    assert masks["none"] is None
    assert masks["confidence"].flatten().tolist() == [1, 0, 1, 1]
    assert masks["agreement"].flatten().tolist() == [1, 1, 0, 1]
    assert masks["both"].flatten().tolist() == [1, 0, 0, 1]


def test_pseudo_loss_counts_only_masked_voxels_and_ce_drops_the_dice_term():
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 3, (2, 1, 8, 8), generator=g)
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    ce = _method(2, pseudo_loss="ce")
    garbage = torch.where(mask.bool(), labels, (labels + 1) % 3)  # other labels where the mask is 0
    torch.testing.assert_close(ce.pseudo_loss(logits, labels, mask), ce.pseudo_loss(logits, garbage, mask))
    keep = mask[:, 0].bool()
    expected = F.cross_entropy(logits.movedim(1, -1)[keep], labels[:, 0][keep])
    torch.testing.assert_close(ce.pseudo_loss(logits, labels, mask), expected)
    seg = _method(2)
    assert seg.pseudo_loss(logits, labels, None) > 0.5 * ce.pseudo_loss(logits, labels, None)  # + Dice term


@pytest.mark.parametrize("kind", ["confidence", "agreement", "both"])
def test_masked_training_step_logs_the_kept_share_and_steps(kind):
    method = _method(2, pseudo_mask=kind, pseudo_loss="ce", contrast_anchors="agree", ds_sample_mode="eval")
    labeled, unlabeled = _batch(2)
    parts = method.training_step(labeled, unlabeled, Progress(3, 10))
    assert set(parts) == FULL_PARTS | {"pseudo_mask_ratio"}
    assert 0 <= parts["pseudo_mask_ratio"] <= 1
    assert all(torch.isfinite(v).all() for v in parts.values())
    parts["loss"].backward()


def test_eval_mode_sampling_switches_dropout_off_and_restores_train_mode():
    method = _method(2)
    method.train()
    x = torch.randn(2, 1, 32, 32)
    eval_a = method.sample_ds(x, 2, torch.Generator().manual_seed(0), eval_mode=True)
    assert method.ds.training
    eval_b = method.sample_ds(x, 2, torch.Generator().manual_seed(0), eval_mode=True)
    torch.testing.assert_close(eval_a, eval_b)  # no dropout: the same noise gives the same sample
    method.eval()
    torch.testing.assert_close(method.sample_ds(x, 2, torch.Generator().manual_seed(0)), eval_a)
    assert not method.ds.training


def test_balanced_sampling_leaves_out_voxels_marked_minus_one():
    classes = torch.tensor([0] * 50 + [-1] * 50 + [1] * 50)
    idx = sample_balanced(classes, 40, 2)
    assert len(idx) == 40 and (classes[idx] >= 0).all()


def test_strong_view_cs_learns_the_weak_views_pseudo_labels_on_the_mixed_images(monkeypatch):
    """``cs_view: strong``: CS labels the weak view (no gradient), learns on the strong view, and
    DS's pseudo-labels, the mask and the agreement follow the same CutMix geometry."""
    from semidiff.data.transforms import cutmix
    from semidiff.methods.common import StrongViewOptions

    method = _method(2, cs_view="strong", pseudo_mask="both", pseudo_threshold=0.0, pseudo_loss="ce",
                     contrast_anchors="agree", jitter_contrast=0.0, jitter_brightness=0.0, blur_prob=0.0,
                     cutmix_prob=1.0)
    labeled, unlabeled = _batch(2, n_u=3)
    x_l, x_u = labeled["image"], unlabeled["image"]
    # DS "samples" class i on the left half and class i + 1 on the right half of image i.
    ds_labels = torch.arange(3).view(3, 1, 1, 1).repeat(1, 1, 32, 32)
    ds_labels[..., 16:] = (ds_labels[..., 16:] + 1) % 3
    probs = F.one_hot(ds_labels[:, 0], 3).movedim(-1, 1).float()
    monkeypatch.setattr(method, "sample_ds", lambda image, steps, eval_mode=False: probs)
    masks, cs_inputs, cs_targets = [], [], []
    real_view = StrongViewOptions.strong_view

    def spy_view(self, images):
        out = real_view(self, images)
        masks.append(out[1])
        return out

    monkeypatch.setattr(StrongViewOptions, "strong_view", spy_view)
    real_cs_forward = method.cs.forward
    monkeypatch.setattr(method.cs, "forward", lambda x, **kw: (cs_inputs.append(x), real_cs_forward(x, **kw))[1])
    real_loss = method.pseudo_loss
    monkeypatch.setattr(method, "pseudo_loss",
                        lambda logits, labels, mask: (cs_targets.append(labels), real_loss(logits, labels, mask))[1])
    parts = method.training_step(labeled, unlabeled, Progress(5, 10))

    mask = masks[0]
    assert mask is not None and 0 < mask.mean() < 1
    weak, strong = cs_inputs
    torch.testing.assert_close(weak, x_u)  # CS's own pseudo-labels come from the weak view
    torch.testing.assert_close(strong, torch.cat([x_l, cutmix(x_u, mask)]))
    assert not torch.equal(strong[2:], x_u)
    # cs_targets: [DS's pseudo-loss target (CS's weak labels), CS's target (DS's labels, mixed)]
    torch.testing.assert_close(cs_targets[1], cutmix(ds_labels, mask))
    assert not torch.equal(cs_targets[1], ds_labels)
    assert torch.isfinite(parts["loss"]) and 0 <= parts["pseudo_mask_ratio"] <= 1
    parts["loss"].backward()


def test_same_view_cs_sees_the_unlabeled_images_as_they_are(monkeypatch):
    method = _method(2, pseudo_mask="both", contrast_anchors="agree")
    assert method.options.cs_view == "same"
    labeled, unlabeled = _batch(2)
    cs_inputs = []
    real_cs_forward = method.cs.forward
    monkeypatch.setattr(method.cs, "forward", lambda x, **kw: (cs_inputs.append(x), real_cs_forward(x, **kw))[1])
    method.training_step(labeled, unlabeled, Progress(5, 10))
    assert len(cs_inputs) == 1  # one forward of CS, on labeled + unlabeled images unchanged
    torch.testing.assert_close(cs_inputs[0], torch.cat([labeled["image"], unlabeled["image"]]))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_weak_view_pass_runs_in_the_chosen_mode_and_restores_train_mode(monkeypatch, mode):
    method = _method(2, cs_view="strong", pseudo_mask="both", cs_weak_mode=mode)
    method.train()
    labeled, unlabeled = _batch(2)
    modes = []
    real_cs_forward = method.cs.forward
    monkeypatch.setattr(method.cs, "forward",
                        lambda x, **kw: (modes.append(method.cs.training), real_cs_forward(x, **kw))[1])
    method.training_step(labeled, unlabeled, Progress(5, 10))
    assert modes == [mode == "train", True]  # weak view (no gradient), then the strong view
    assert method.cs.training


@pytest.mark.parametrize("view", ["same", "strong"])
@pytest.mark.parametrize("mode,independent", [("joint", False), ("separate", True)])
def test_separate_cs_forward_keeps_unlabeled_images_out_of_the_labeled_batch_statistics(view, mode, independent):
    # CS has BatchNorm: in one pass its labeled logits depend on the unlabeled (or strong-view)
    # images beside them; in separate passes they do not (same seeds: same dropout, view, noise).
    labeled, _ = _batch(2)
    losses = []
    for unlabeled in (torch.rand(2, 1, 32, 32), 3.0 + 5.0 * torch.rand(2, 1, 32, 32)):
        torch.manual_seed(0)
        method = _method(2, cs_view=view, cs_forward=mode)
        method.train()
        torch.manual_seed(1)
        losses.append(method.training_step(labeled, {"image": unlabeled}, Progress(5, 10))["loss_c_sup"])
    assert torch.allclose(losses[0], losses[1]) == independent


def test_separate_cs_forward_runs_cs_once_per_stream(monkeypatch):
    method = _method(2, cs_forward="separate")
    labeled, unlabeled = _batch(2, n_l=2, n_u=3)
    sizes = []
    real_cs_forward = method.cs.forward
    monkeypatch.setattr(method.cs, "forward", lambda x, **kw: (sizes.append(len(x)), real_cs_forward(x, **kw))[1])
    out = method.training_step(labeled, unlabeled, Progress(5, 10))
    assert sizes == [2, 3]
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("view", ["same", "strong"])
def test_labeled_bn_stats_record_the_labeled_pass_only_and_leave_training_unchanged(view):
    labeled, unlabeled = _batch(2)
    runs = {}
    for stats in ("all", "labeled"):
        torch.manual_seed(0)
        method = _method(2, cs_view=view, cs_forward="separate", cs_bn_stats=stats)
        method.train()
        for m in method.cs.modules():  # no dropout, so a pass outside the step is the step's pass
            if isinstance(m, torch.nn.modules.dropout._DropoutNd):
                m.p = 0.0
        before = copy.deepcopy(method.cs)
        torch.manual_seed(1)
        runs[stats] = (method.training_step(labeled, unlabeled, Progress(5, 10))["loss"], method.cs, before)
    torch.testing.assert_close(runs["all"][0], runs["labeled"][0])  # the same step, the same loss
    _, cs, fresh = runs["labeled"]
    fresh(labeled["image"])  # a pass over the labeled images alone, in train mode
    buffers = [name for name, _ in cs.named_buffers() if name.endswith("running_mean")]
    assert buffers
    for name in buffers:
        torch.testing.assert_close(cs.get_buffer(name), fresh.get_buffer(name))
    assert any(not torch.allclose(runs["all"][1].get_buffer(n), cs.get_buffer(n)) for n in buffers)
    assert all(m.track_running_stats for m in cs.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_labeled_bn_stats_need_separate_passes():
    with pytest.raises(Exception, match="cs_forward 'separate'"):
        _method(2, cs_forward="joint", cs_bn_stats="labeled")


def _masks_of_one_step(monkeypatch, method):
    """(the ``kind`` argument of each ``pseudo_mask`` call, the mask each ``pseudo_loss`` got) of one step."""
    calls, seen = [], []
    real_mask, real_loss = method.pseudo_mask, method.pseudo_loss
    monkeypatch.setattr(method, "pseudo_mask", lambda *a: (calls.append(a[3:]), real_mask(*a))[1])
    monkeypatch.setattr(method, "pseudo_loss",
                        lambda logits, labels, mask: (seen.append(mask), real_loss(logits, labels, mask))[1])
    labeled, unlabeled = _batch(2)
    method.training_step(labeled, unlabeled, Progress(5, 10))
    return calls, seen


def test_ds_pseudo_mask_sets_the_cs_to_ds_direction_alone(monkeypatch):
    """``ds_pseudo_mask: confidence``: DS learns CS's confident labels where it disagrees with CS,
    while CS still learns only where both agree (``pseudo_mask: both``)."""
    masks = {}
    for ds_kind in (None, "confidence"):
        method = _method(2, pseudo_mask="both", pseudo_threshold=0.0, ds_pseudo_mask=ds_kind)
        calls, masks[ds_kind] = _masks_of_one_step(monkeypatch, method)
        assert calls == [(ds_kind,), ()]  # DS's direction first, then CS's with pseudo_mask
    # Threshold 0: confidence keeps every voxel; both keeps only agreeing ones (an untrained pair disagrees).
    assert masks["confidence"][0].min() == 1
    assert masks[None][0].mean() < 1
    assert masks["confidence"][1].mean() < 1  # CS's direction keeps the agreement
