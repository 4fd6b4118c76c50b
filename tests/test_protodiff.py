"""ProtoDiff: the segmenter, the latent DDIM, the prototypes, the losses and the training step.

Tiny networks and images throughout (32x32, 16^3, widths 4-16); one thread.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from semidiff.config import config_from_dict, load_config
from semidiff.errors import ConfigError
from semidiff.methods import NetSpec, Progress, create_method, list_methods
from semidiff.methods.protodiff import (
    ProtoDiff,
    class_feature_sums,
    cutmix,
    intensity_jitter,
    prototype_infonce,
    prototype_kl,
    update_prototypes,
)
from semidiff.nets import create_net, list_nets
from semidiff.nets.protodiff_net import ProtoDiffNet

SMALL = {"features": [4, 8, 8, 16, 16], "time_embed_dim": 16}
PARTS = {"loss", "loss_sup", "loss_unsup", "loss_proto", "loss_nce", "loss_cons", "u_weight", "p_weight",
         "conf_ratio", "prototypes_ready"}
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _method(dims: int = 2, num_classes: int = 3, **options) -> ProtoDiff:
    spec = NetSpec("protodiff_net", 1, num_classes, dims, dict(SMALL))
    # No warm-up, so the first step already exercises every term.
    return create_method("protodiff", spec, {"warmup": 0, **options})  # type: ignore[return-value]


def _batch(dims: int, n_l: int = 2, n_u: int = 2, num_classes: int = 3):
    shape = (32, 32) if dims == 2 else (16, 16, 16)
    # Every class present in every labeled image, so every prototype starts at the first update.
    label = torch.randint(0, num_classes, (n_l, 1, *shape))
    image = label.float() / num_classes + 0.1 * torch.randn(n_l, 1, *shape)
    return {"image": image, "label": label}, {"image": torch.rand(n_u, 1, *shape)}


def _unit(d: int, i: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(i), d).float()


# ---- the network ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dims,shape", [(2, (30, 42)), (3, (20, 18, 12))])
@pytest.mark.parametrize("skips", [True, False])
def test_net_shapes_in_2d_and_3d(dims, shape, skips):
    net = ProtoDiffNet(1, 3, dims, decoder_skips=skips, **SMALL)
    x = torch.randn(2, 1, *shape)
    encoded = net.encode(x)
    latent = net.latent_shape(shape)
    assert tuple(encoded.features.shape[2:]) == latent
    assert latent == tuple(-(-s // 16) * 16 // 4 for s in shape)  # padded to 16, then 1/4
    z0 = net.embed(torch.randint(0, 3, (2, 1, *shape)))
    assert z0.shape == (2, net.embed_dim, *latent)
    logits, h = net.decode(encoded, z0, torch.tensor([0, 999]))
    assert logits.shape == (2, 3, *shape)
    hidden_grid = shape if skips else latent
    assert h.shape == (2, net.feature_channels, *hidden_grid)
    assert tuple(net.to_hidden_grid(torch.zeros(2, 1, *shape)).shape[2:]) == hidden_grid


def test_label_latent_is_the_scaled_sigmoid_of_the_embedding():
    net = ProtoDiffNet(1, 3, 2, label_scale=0.05, **SMALL)
    label = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    label[..., 16:, :] = 2  # bottom half class 2: rows 4..7 of the 8x8 latent grid
    z0 = net.embed(label)
    e = net.label_embedding.weight.detach()
    expected0 = 0.05 * (2 * torch.sigmoid(e[0]) - 1)
    expected2 = 0.05 * (2 * torch.sigmoid(e[2]) - 1)
    assert torch.allclose(z0[0, :, :4, :], expected0[:, None, None].expand(-1, 4, 8))
    assert torch.allclose(z0[0, :, 4:, :], expected2[:, None, None].expand(-1, 4, 8))
    assert z0.abs().max() < 0.05
    with pytest.raises(ValueError, match="label values"):
        net.embed(torch.full((1, 1, 32, 32), 3))


def test_net_is_registered_and_rejects_bad_options():
    assert "protodiff_net" in list_nets()
    assert isinstance(create_net("protodiff_net", 1, 2, spatial_dims=3, **SMALL), ProtoDiffNet)
    with pytest.raises(ConfigError, match="feature_stride"):
        create_net("protodiff_net", 1, 2, feature_stride=3)
    with pytest.raises(ConfigError, match="decoder_features"):
        create_net("protodiff_net", 1, 2, decoder_features=[8, 8])


# ---- prototypes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.9, 0.99])
def test_prototype_update_follows_the_momentum_rule(momentum):
    num_classes, d = 3, 4
    old = F.normalize(torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]), dim=1)
    ready = torch.tensor([True, True, False])
    # Every pixel's feature is exactly a class's unit vector: class 0 -> e0, class 2 -> e3
    # (scaled, to check the normalisation); class 1 has no pixel.
    labels = torch.tensor([0, 0, 2, 0, 2, 2]).view(1, 1, 2, 3)
    vectors = {0: 3.0 * _unit(d, 0), 2: 0.5 * _unit(d, 3)}
    feats = torch.stack([vectors[int(c)] for c in labels.flatten()]).t().reshape(1, d, 2, 3)
    sums, totals = class_feature_sums(feats, labels, torch.ones_like(labels, dtype=torch.float32), num_classes)
    new, new_ready = update_prototypes(old, ready, sums, totals, momentum)
    # Closed form for a ready class: p <- normalize(m p + (1 - m) e).
    expected0 = momentum * old[0] + (1 - momentum) * _unit(d, 0)
    assert torch.allclose(new[0], expected0 / expected0.norm(), atol=1e-6)
    assert torch.allclose(new[1], old[1])  # no pixel: unchanged
    assert torch.allclose(new[2], _unit(d, 3))  # first sight: starts at the class mean
    assert torch.allclose(new.norm(dim=1), torch.ones(3), atol=1e-6)
    assert new_ready.tolist() == [True, True, True]
    # It moved towards e0: the cosine to e0 grew, by the closed form's amount.
    assert new[0, 0] > old[0, 0]


def test_prototype_update_through_the_method_and_weighted_pixels():
    method = _method(prototype_momentum=0.9)
    d = method.student.feature_channels
    method.prototypes[0] = _unit(d, 1)
    method.prototype_ready[0] = True
    labels = torch.zeros(1, 1, 2, 2, dtype=torch.long)
    feats = _unit(d, 0)[None, :, None, None].expand(1, d, 2, 2).clone()
    feats[0, :, 0, 0] = _unit(d, 2)  # one pixel elsewhere, with weight 0: must not count
    weights = torch.ones(1, 1, 2, 2)
    weights[0, 0, 0, 0] = 0.0
    method.apply_prototype_update(*class_feature_sums(feats, labels, weights, 3))
    expected = 0.9 * _unit(d, 1) + 0.1 * _unit(d, 0)
    assert torch.allclose(method.prototypes[0], expected / expected.norm(), atol=1e-6)
    assert method.prototype_ready.tolist() == [True, False, False]
    assert "prototypes" in method.state_dict() and "prototype_ready" in method.state_dict()


# ---- losses --------------------------------------------------------------------------------------
def _orthonormal_setup(num_classes: int = 4, d: int = 8, pixels: int = 64):
    protos = torch.eye(d)[:num_classes]
    labels = torch.arange(pixels).remainder(num_classes).view(1, 1, 8, pixels // 8)
    scale = torch.rand(pixels) + 0.5  # features need not be unit length
    feats = (protos[labels.flatten()] * scale[:, None]).t().reshape(1, d, 8, pixels // 8)
    return protos, labels, feats


def test_infonce_is_minimal_on_prototypes_and_high_when_swapped():
    tau, c = 0.1, 4
    protos, labels, feats = _orthonormal_setup(c)
    ready, weights = torch.ones(c, dtype=torch.bool), torch.ones_like(labels, dtype=torch.float32)
    loss = prototype_infonce(feats, labels, weights, protos, ready, tau, None)
    # Minimum over unit features for orthonormal prototypes: cosine 1 to its own, 0 to the others.
    minimum = math.log(1 + (c - 1) * math.exp(-1 / tau))
    assert loss.item() == pytest.approx(minimum, rel=1e-3)
    swapped = prototype_infonce(feats, (labels + 1) % c, weights, protos, ready, tau, None)
    assert swapped.item() == pytest.approx(1 / tau + minimum, rel=1e-3)
    assert swapped > loss + 5


def test_infonce_is_class_balanced_and_weighted():
    tau = 0.1
    protos = torch.eye(2)
    ready = torch.ones(2, dtype=torch.bool)
    # 99 background pixels on their prototype, 1 foreground pixel on the wrong prototype.
    labels = torch.zeros(1, 1, 10, 10, dtype=torch.long)
    labels[0, 0, 0, 0] = 1
    feats = protos[0][None, :, None, None].expand(1, 2, 10, 10)
    w = torch.ones_like(labels, dtype=torch.float32)
    loss = prototype_infonce(feats, labels, w, protos, ready, tau, None)
    bad = F.cross_entropy(torch.tensor([[1 / tau, 0.0]]), torch.tensor([1])).item()
    good = F.cross_entropy(torch.tensor([[1 / tau, 0.0]]), torch.tensor([0])).item()
    assert loss.item() == pytest.approx((good + bad) / 2, rel=1e-4)  # per-class mean, not per-pixel
    # Weight 0 removes the pixel (and its class) from the loss.
    w[0, 0, 0, 0] = 0.0
    assert prototype_infonce(feats, labels, w, protos, ready, tau, None).item() == pytest.approx(good, rel=1e-4)
    # An uninitialised prototype is no negative: only class 0 left, whose loss is then 0.
    only0 = prototype_infonce(feats, labels, w, protos, torch.tensor([True, False]), tau, None)
    assert only0.item() == pytest.approx(0.0, abs=1e-6)
    # Sampling cap: still finite and close for identical pixels.
    capped = prototype_infonce(feats, labels, torch.ones_like(w), protos, ready, tau, 5)
    assert capped.item() == pytest.approx((good + bad) / 2, rel=1e-4)


def test_prototype_kl_is_zero_for_equal_maps_and_positive_otherwise():
    protos, _, feats = _orthonormal_setup()
    ready = torch.ones(4, dtype=torch.bool)
    assert prototype_kl(feats, feats, protos, ready, 0.1).item() == pytest.approx(0.0, abs=1e-6)
    other = feats.roll(1, dims=3)
    assert prototype_kl(other, feats, protos, ready, 0.1).item() > 1.0
    assert prototype_kl(other, feats, protos, torch.tensor([True, False, False, False]), 0.1).item() == 0.0


# ---- latent DDIM ---------------------------------------------------------------------------------
def test_latent_ddim_is_deterministic_and_returns_probabilities():
    method = _method(sampling_steps=3).eval()
    x = torch.randn(2, 1, 32, 32)
    p1, p2 = method.predict(x), method.predict(x)
    assert p1.shape == (2, 3, 32, 32)
    assert torch.equal(p1, p2)
    assert torch.allclose(p1.sum(dim=1), torch.ones(2, 32, 32), atol=1e-5)
    assert (p1 >= 0).all()
    # Same generator seed -> same output; the seed does matter.
    a, _ = method.sample(method.student, x, 3, torch.Generator().manual_seed(5))
    b, _ = method.sample(method.student, x, 3, torch.Generator().manual_seed(5))
    c, _ = method.sample(method.student, x, 3, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_predict_outputs_choose_the_number_of_steps(monkeypatch):
    method = _method(sampling_steps=3).eval()
    x = torch.randn(1, 1, 32, 32)
    used = []
    sample = method.sample

    def spy(net, image, steps, generator=None):
        used.append(steps)
        return sample(net, image, steps, generator)

    monkeypatch.setattr(method, "sample", spy)
    assert method.default_output == "ddim"
    for output in (None, "ddim", "ddim_s1", "ddim_s5"):
        probs = method.predictor(output)(x)
        assert torch.allclose(probs.sum(dim=1), torch.ones(1, 32, 32), atol=1e-5)
    assert used == [3, 3, 1, 5]
    with pytest.raises(ConfigError, match="ddim_s2"):
        method.predictor("ddim_s2")


def test_latent_ddim_encodes_once_decodes_per_step_and_averages(monkeypatch):
    method = _method().eval()
    net = method.student
    calls = {"encode": 0, "decode": []}
    encode, decode = net.encode, net.decode

    def counting_encode(x):
        calls["encode"] += 1
        return encode(x)

    def recording_decode(encoded, z_t, t):
        logits, h = decode(encoded, z_t, t)
        calls["decode"].append((int(t[0]), torch.softmax(logits, dim=1)))
        return logits, h

    monkeypatch.setattr(net, "encode", counting_encode)
    monkeypatch.setattr(net, "decode", recording_decode)
    probs, hidden = method.sample(net, torch.randn(1, 1, 32, 32), 3, torch.Generator().manual_seed(0))
    assert calls["encode"] == 1
    assert [t for t, _ in calls["decode"]] == method.diffusion.sampling_timesteps(3).tolist()
    assert torch.allclose(probs, torch.stack([p for _, p in calls["decode"]]).mean(0), atol=1e-6)
    assert hidden.shape == (1, net.feature_channels, 32, 32)


# ---- strong view and CutMix ----------------------------------------------------------------------
def test_cutmix_geometry_is_identical_for_image_pseudo_label_and_confidence():
    method = _method(jitter_contrast=0.0, jitter_brightness=0.0, blur_prob=0.0, cutmix_prob=1.0, cutmix_ratio=0.5)
    labels = torch.randint(0, 3, (3, 1, 32, 32))
    conf = torch.rand(3, 1, 32, 32)
    images = labels.float()  # the image *is* the label map: any geometric mismatch shows
    strong, mask = method.strong_view(images)
    assert mask is not None and 0 < mask.mean() < 1
    mixed_labels, mixed_conf = cutmix(labels, mask), cutmix(conf, mask)
    assert torch.equal(strong, mixed_labels.float())
    inside = mask[0, 0] > 0.5
    for i in range(3):
        src = (i - 1) % 3  # item i receives the block from item i - 1
        assert torch.equal(mixed_labels[i, 0][inside], labels[src, 0][inside])
        assert torch.equal(mixed_labels[i, 0][~inside], labels[i, 0][~inside])
        assert torch.equal(mixed_conf[i, 0][inside], conf[src, 0][inside])
    assert mixed_labels.dtype == labels.dtype


def test_training_step_mixes_student_input_and_pseudo_label_alike(monkeypatch):
    method = _method(jitter_contrast=0.0, jitter_brightness=0.0, blur_prob=0.0, cutmix_prob=1.0)
    labeled, _ = _batch(2)
    u_labels = torch.randint(0, 3, (3, 1, 32, 32))
    unlabeled = {"image": u_labels.float()}  # image == the pseudo-label the teacher will give

    def fake_sample(net, image, steps, generator=None):
        # A teacher that reads the class off the image (labeled images: their own labels).
        classes = torch.cat([labeled["label"], image[len(labeled["label"]):].round().long()])
        probs = F.one_hot(classes[:, 0], 3).movedim(-1, 1).float()
        return probs, torch.randn(len(image), net.feature_channels, *image.shape[2:])

    seen = {}
    noisy_latent, forward = method.noisy_latent, method.student.forward

    def spy_latent(net, label):
        seen["targets"] = label
        return noisy_latent(net, label)

    def spy_forward(image, z_t, t):
        seen["inputs"] = image
        return forward(image, z_t, t)

    monkeypatch.setattr(method, "sample", fake_sample)
    monkeypatch.setattr(method, "noisy_latent", spy_latent)
    monkeypatch.setattr(method.student, "forward", spy_forward)
    method.training_step(labeled, unlabeled, Progress(0, 10))
    student_u, target_u = seen["inputs"][2:], seen["targets"][2:]
    assert not torch.equal(target_u, u_labels)  # CutMix did move pixels
    assert torch.equal(student_u, target_u.float())  # ... the same pixels in image and target
    assert torch.equal(seen["targets"][:2], labeled["label"])


def test_strong_view_changes_intensities_only():
    method = _method(cutmix_prob=0.0, blur_prob=1.0)
    x = torch.rand(2, 1, 32, 32)
    strong, mask = method.strong_view(x)
    assert mask is None and strong.shape == x.shape and not torch.allclose(strong, x)
    jittered = intensity_jitter(x, 0.5, 0.5)
    # A positive affine intensity change per image: no geometry change, pixel order kept.
    assert not torch.allclose(jittered, x)
    for i in range(2):
        assert torch.equal(torch.argsort(jittered[i].flatten()), torch.argsort(x[i].flatten()))


# ---- training step -------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [2, 3])
def test_training_step_runs_with_finite_named_parts(dims):
    method = _method(dims, cutmix_prob=1.0, confidence_threshold=0.0)
    labeled, unlabeled = _batch(dims)
    for step in range(2):  # step 0 initialises the prototypes, step 1 uses them
        parts = method.training_step(labeled, unlabeled, Progress(step, 10))
        assert set(parts) == PARTS
        assert all(torch.isfinite(v).all() for v in parts.values())
        parts["loss"].backward()
        method.on_step_end(Progress(step + 1, 10))
    assert parts["loss_proto"] > 0 and parts["loss_nce"] > 0 and parts["loss_unsup"] > 0
    assert parts["prototypes_ready"].item() == 3
    assert torch.allclose(method.prototypes.norm(dim=1), torch.ones(3), atol=1e-5)
    assert all(p.grad is not None for p in method.student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in method.teacher.parameters())
    # The label embedding learns through the noisy latent.
    assert method.student.label_embedding.weight.grad.abs().sum() > 0


def test_warmup_is_supervised_only():
    method = _method(warmup=5)
    labeled, unlabeled = _batch(2)
    parts = method.training_step(labeled, unlabeled, Progress(4, 10))
    assert parts["loss"].item() == pytest.approx(parts["loss_sup"].item())
    assert parts["loss_unsup"] == 0 and parts["loss_proto"] == 0
    method.on_step_end(Progress(5, 10))
    assert not method.prototype_ready.any()
    parts = method.training_step(labeled, unlabeled, Progress(5, 10))
    method.on_step_end(Progress(6, 10))
    assert method.prototype_ready.all()


def test_unsup_normalisation_all_scales_l_u_by_the_confident_share():
    parts = {}
    for norm in ("confident", "all"):
        torch.manual_seed(0)  # same weights, noise and views for both
        method = _method(confidence_threshold=0.4, unsup_normalisation=norm)
        labeled, unlabeled = _batch(2)
        parts[norm] = method.training_step(labeled, unlabeled, Progress(0, 10))
    share = parts["all"]["conf_ratio"].item()
    assert 0.0 < share < 1.0  # some pixels confident, some not: the two rules differ
    assert parts["all"]["conf_ratio"].item() == pytest.approx(parts["confident"]["conf_ratio"].item())
    assert parts["all"]["loss_unsup"].item() == pytest.approx(share * parts["confident"]["loss_unsup"].item(),
                                                              rel=1e-5)
    assert parts["all"]["loss_sup"].item() == pytest.approx(parts["confident"]["loss_sup"].item(), rel=1e-5)


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_image_only_share_trains_the_decoder_from_pure_noise(share):
    method = _method(image_only_share=share)
    seen = []
    method.student.register_forward_pre_hook(lambda _m, args: seen.append(args[2].clone()))
    labeled, unlabeled = _batch(2, n_l=4, n_u=4)
    method.training_step(labeled, unlabeled, Progress(0, 10))
    t = torch.cat(seen)  # every student pass of the step (labeled and strong unlabeled views)
    last = method.diffusion.num_train_timesteps - 1
    assert len(t) >= 8
    assert (t == last).all() if share == 1.0 else (t < last).any()


@pytest.mark.parametrize("options", [
    {"prototype_loss": "none"},
    {"prototype_loss": "infonce"},
    {"prototype_loss": "consistency"},
    {"sampling_steps": 1},
    {"sampling_steps": 5, "pseudo_label_steps": 2},
    {"label_scale": 0.1},
    {"label_scale": 1.0, "image_only_share": 0.5},
    {"prototype_momentum": 0.999},
    {"prototype_unlabeled_weight": 0.5, "confidence_threshold": 0.0},
    {"unsup_normalisation": "all"},
])
def test_each_ablation_builds_and_steps(options):
    method = _method(cutmix_prob=1.0, **options)
    labeled, unlabeled = _batch(2)
    for step in range(2):
        parts = method.training_step(labeled, unlabeled, Progress(step, 10))
        assert all(torch.isfinite(v).all() for v in parts.values())
        parts["loss"].backward()
        method.on_step_end(Progress(step + 1, 10))
    kind = options.get("prototype_loss", "both")
    assert (parts["loss_nce"] > 0) == (kind in ("both", "infonce"))
    assert (parts["loss_cons"] > 0) == (kind in ("both", "consistency"))
    assert method.prototype_ready.any() == (kind != "none")
    assert method.predict(labeled["image"]).shape == (2, 3, 32, 32)


def test_options_and_network_errors_are_clear():
    spec = NetSpec("protodiff_net", 1, 3, 2, dict(SMALL))
    with pytest.raises(ConfigError, match="method.options.prototype_loss"):
        create_method("protodiff", spec, {"prototype_loss": "all"})
    with pytest.raises(ConfigError, match="method.options.sampling_stepz"):
        create_method("protodiff", spec, {"sampling_stepz": 3})
    with pytest.raises(ConfigError, match="model.net"):
        create_method("protodiff", NetSpec("unet2d", 1, 3, 2, {}), {})
    with pytest.raises(ConfigError, match="spatial_dims"):
        create_method("protodiff", NetSpec("protodiff_net", 1, 3, 2, {"spatial_dims": 3}), {})


# ---- configs and engine --------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["acdc/protodiff_reduced", "acdc/protodiff_unet_reduced", "acdc/protodiff_full",
                                  "la/protodiff_reduced", "la/protodiff_full"])
def test_configs_build_the_method(path):
    cfg = load_config(REPO / "configs" / f"{path}.yaml", [])
    assert cfg.method.name == "protodiff" and "protodiff" in list_methods()
    spec = NetSpec(cfg.model.net, cfg.model.in_channels, cfg.model.num_classes, cfg.spatial_dims,
                   cfg.model.net_options)
    method = create_method(cfg.method.name, spec, cfg.method.options)
    assert method.student.spatial_dims == cfg.spatial_dims
    assert method.options.sampling_steps == 3 and method.options.lambda_p == 0.1


def test_engine_runs_protodiff(tmp_path: Path):
    from semidiff.data.synthetic import make_synthetic_dataset
    from semidiff.engine.train import train

    root = make_synthetic_dataset(tmp_path / "synth", spatial_dims=2, num_cases=6, size=(32, 32), val_cases=2, seed=0)
    cfg = config_from_dict({
        "experiment": {"name": "pd", "output_dir": str(tmp_path / "runs"), "seed": 0},
        "data": {"reader": "synthetic", "root": str(root), "labeled": 2, "patch_size": [32, 32]},
        "model": {"net": "protodiff_net", "num_classes": 4, "net_options": dict(SMALL)},
        "method": {"name": "protodiff", "options": {"warmup": 1}},
        "train": {"max_steps": 3, "labeled_batch": 2, "unlabeled_batch": 2, "optimizer": "adamw", "lr": 1e-3,
                  "val_every": 3, "log_every": 1, "accelerator": "cpu", "progress_bar": False, "num_threads": 1},
        "eval": {"overlay_cases": 0},
    })
    results = train(cfg, log=lambda *_: None)
    rows = []
    for f in sorted((cfg.run_dir() / "csv").glob("version_*/metrics.csv")):
        with open(f) as fh:
            rows += [r for r in csv.DictReader(fh) if r.get("train/loss")]
    assert len(rows) == 3
    for part in PARTS:
        assert all(math.isfinite(float(r[f"train/{part}"])) for r in rows)
    assert 0.0 <= results["last"]["summary"]["mean"]["dice"] <= 1.0
    # The protocol states the DDIM steps actually used: the option's, or the output's own count.
    assert results["last"]["protocol"]["prediction_options"] == {"sampling_steps": 3, "sample_seed": 0}
    method = create_method("protodiff", NetSpec("protodiff_net", 1, 4, 2, dict(SMALL)), {})
    assert method.prediction_options("ddim_s1")["sampling_steps"] == 1


# ---- ProtoDiff on the shared backbone (issue 23) -------------------------------------------------
SHARED = {"backbone_options": {"features": [4, 8, 8, 16, 16]}, "time_embed_dim": 16}


def test_shared_backbone_net_starts_as_the_plain_backbone_and_reads_the_latent_once_trained():
    from semidiff.nets.protodiff_unet import ProtoDiffUNet

    net = create_net("protodiff_unet", 1, 3, spatial_dims=2, label_scale=1.0, **SHARED)
    assert isinstance(net, ProtoDiffUNet) and type(net.backbone).__name__ == "UNet2D"
    net.eval()
    image, label = torch.rand(2, 1, 30, 42), torch.randint(0, 3, (2, 1, 30, 42))
    encoded = net.encode(image)
    assert net.embed(label).shape == (2, net.embed_dim, *net.latent_shape((30, 42))) == (2, 8, 8, 12)
    t = torch.tensor([5, 500])
    logits, h = net.decode(encoded, net.embed(label), t)
    assert logits.shape == (2, 3, 30, 42) and h.shape == (2, net.feature_channels, 30, 42)
    # Zero-initialised injection: exactly the backbone's segmentation, whatever the latent.
    torch.testing.assert_close(logits, net.backbone(image))
    # Once the injection has weights, the latent and the timestep change the output.
    torch.nn.init.normal_(net.fuse.weight, std=0.1)
    torch.nn.init.normal_(net.time_proj.weight, std=0.1)
    other = net.decode(encoded, net.embed((label + 1) % 3), t)[0]
    later = net.decode(encoded, net.embed(label), torch.tensor([900, 900]))[0]
    base = net.decode(encoded, net.embed(label), t)[0]
    assert (other - base).abs().max() > 1e-4 and (later - base).abs().max() > 1e-4


@pytest.mark.parametrize("dims", [2, 3])
def test_protodiff_trains_on_the_shared_backbone(dims):
    options = SHARED if dims == 2 else {"backbone_options": {"n_filters": 4}, "time_embed_dim": 16}
    method = create_method("protodiff", NetSpec("protodiff_unet", 1, 3, dims, options), {"warmup": 0})
    labeled, unlabeled = _batch(dims)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):
        opt.zero_grad()
        parts = method.training_step(labeled, unlabeled, Progress(step, 10))
        assert set(parts) == PARTS and all(torch.isfinite(v).all() for v in parts.values())
        parts["loss"].backward()
        # The latent reaches the loss: the zero-initialised injection learns at once, and from the
        # second step on (injection weights no longer zero) the label embedding learns too.
        assert method.student.fuse.weight.grad.abs().sum() > 0
        opt.step()
        method.on_step_end(Progress(step + 1, 10))
    assert method.student.label_embedding.weight.grad.abs().sum() > 0
    probs = method.predict(labeled["image"])
    assert probs.shape == (2, 3, *labeled["image"].shape[2:])
    torch.testing.assert_close(probs.sum(1), torch.ones_like(probs[:, 0]))


@pytest.mark.parametrize("mode,independent", [("joint", False), ("separate", True)])
def test_separate_forward_keeps_unlabeled_images_out_of_the_labeled_batch_statistics(mode, independent):
    # The shared U-Net has BatchNorm: in a joint pass the labeled logits depend on the unlabeled
    # images of the batch; in separate passes they do not (same seeds, so the same t, noise, view).
    labeled, _ = _batch(2)
    losses = []
    for unlabeled in (torch.rand(2, 1, 32, 32), 3.0 + 5.0 * torch.rand(2, 1, 32, 32)):
        torch.manual_seed(0)
        method = create_method("protodiff", NetSpec("protodiff_unet", 1, 3, 2, SHARED),
                               {"warmup": 0, "student_forward": mode})
        torch.manual_seed(1)
        losses.append(method.training_step(labeled, {"image": unlabeled}, Progress(0, 10))["loss_sup"])
    assert torch.allclose(losses[0], losses[1]) == independent


@pytest.mark.parametrize("prototype_loss,forward,batches", [
    ("both", "separate", [2, 3]),   # labeled features update the prototypes
    ("none", "separate", [3]),      # nothing reads the labeled outputs: no chain for them
    ("none", "joint", [5]),         # one BatchNorm batch: the labeled images shape the unlabeled statistics
])
def test_teacher_samples_labeled_images_only_when_something_reads_them(monkeypatch, prototype_loss, forward,
                                                                       batches):
    method = _method(prototype_loss=prototype_loss, student_forward=forward)
    labeled, unlabeled = _batch(2, n_l=2, n_u=3)
    sample, seen = method.sample, []

    def spy_sample(net, image, steps, generator=None):
        if net is method.teacher:
            seen.append(len(image))
        return sample(net, image, steps, generator)

    monkeypatch.setattr(method, "sample", spy_sample)
    parts = method.training_step(labeled, unlabeled, Progress(0, 10))
    assert seen == batches
    assert torch.isfinite(parts["loss"])
