"""The noise-robustness benchmark mode: label-noise generators, the ``noise`` config section,
labeled-mask corruption in the data pipeline, the pseudo-label hook of every baseline, and the sweep."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from semidiff.config import config_from_dict, load_config
from semidiff.data.synthetic import make_synthetic_dataset
from semidiff.engine.data import CaseList, SemidiffData
from semidiff.engine.module import build_method
from semidiff.errors import ConfigError
from semidiff.methods import Progress
from semidiff.noise import (
    apply_noise,
    describe_noise,
    dilate_classes,
    drop_components,
    erode_classes,
    flip_classes,
    select_noisy_cases,
)

REPO = Path(__file__).resolve().parents[1]
SMALL_UNET = {"features": [4, 8, 8, 16, 16]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ball(shape: tuple[int, ...], radius: float, label: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A centred disc/ball of ``label`` and the distance of every pixel to the centre."""
    grids = np.meshgrid(*[np.arange(s) - s // 2 for s in shape], indexing="ij")
    dist = np.sqrt(sum(g.astype(float) ** 2 for g in grids))
    return np.where(dist <= radius, label, 0).astype(np.int64), dist


def _equivalent_radius(mask: np.ndarray) -> float:
    return math.sqrt(mask.sum() / math.pi)


# ---- generators ---------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [0.1, 0.3, 1.0])
def test_flip_rate_matches_and_flipped_pixels_change_class(rate):
    labels = torch.randint(0, 4, (4, 1, 64, 64), generator=torch.Generator().manual_seed(1))
    noisy = flip_classes(labels, rate, num_classes=4, generator=7)
    assert noisy.shape == labels.shape and noisy.dtype == labels.dtype
    measured = (noisy != labels).float().mean().item()
    n = labels.numel()
    # Bernoulli sampling: 5 standard deviations of the measured rate.
    assert abs(measured - rate) <= 5 * math.sqrt(rate * (1 - rate) / n) + 1e-9
    assert noisy.min() >= 0 and noisy.max() < 4


def test_flip_targets_are_uniform_over_the_other_classes():
    labels = torch.zeros(200, 200, dtype=torch.long)
    noisy = flip_classes(labels, 1.0, num_classes=4, generator=3)
    counts = torch.bincount(noisy.flatten(), minlength=4).float() / labels.numel()
    assert counts[0] == 0  # never the original class
    assert torch.allclose(counts[1:], torch.full((3,), 1 / 3), atol=0.01)


@pytest.mark.parametrize("k", [2, 4])
def test_erode_and_dilate_change_a_disc_radius_by_k(k):
    radius = 20
    disc, dist = _ball((64, 64), radius)
    eroded = erode_classes(disc, k)
    dilated = dilate_classes(disc, k)
    # Boundary distance: the farthest kept / added pixel from the centre moves by k (lattice: +-1).
    assert radius - k - 1 <= dist[eroded > 0].max() <= radius - k + 1
    assert radius + k - 1 <= dist[dilated > 0].max() <= radius + k + 1
    # Area: the closed form pi (R -+ k)^2, as an equivalent radius within half a pixel.
    assert abs(_equivalent_radius(eroded > 0) - (radius - k)) < 0.5
    assert abs(_equivalent_radius(dilated > 0) - (radius + k)) < 0.5
    # Only boundary pixels change, and only to/from background.
    assert set(np.unique(eroded[disc != eroded])) <= {0}
    assert ((dilated != disc) <= (disc == 0)).all()


def test_erode_dilate_in_3d_batched_and_multiclass():
    ball, _ = _ball((32, 32, 32), 10, label=2)
    batch = torch.from_numpy(np.stack([ball, ball]))[:, None]  # (B, 1, D, H, W)
    eroded = erode_classes(batch, 3, spatial_dims=3)
    dilated = dilate_classes(batch, 3, spatial_dims=3)
    assert eroded.shape == batch.shape and isinstance(eroded, torch.Tensor)
    vol = (4 / 3) * math.pi
    assert abs(((eroded[0, 0] > 0).sum().item() / vol) ** (1 / 3) - 7) < 0.5
    assert abs(((dilated[1, 0] > 0).sum().item() / vol) ** (1 / 3) - 13) < 0.5
    assert set(torch.unique(dilated).tolist()) == {0, 2}
    # Two touching classes: dilation grows into background only, never into the other class.
    two = np.zeros((40, 40), np.int64)
    two[10:30, 5:20], two[10:30, 20:35] = 1, 2
    grown = dilate_classes(two, 3)
    assert (grown[two > 0] == two[two > 0]).all()
    assert (grown[10:30, 2:5] == 1).all() and (grown[10:30, 35:38] == 2).all()


def test_drop_components_all_none_and_some():
    labels = np.zeros((2, 48, 48), np.int64)
    for i, (y, x) in enumerate([(5, 5), (5, 30), (30, 5), (30, 30)]):
        labels[:, y:y + 8, x:x + 8] = 1 + i % 2
    assert (drop_components(labels, 1.0, spatial_dims=2, generator=0) == 0).all()
    assert (drop_components(labels, 0.0, spatial_dims=2, generator=0) == labels).all()
    half = drop_components(labels, 0.5, spatial_dims=2, generator=0)
    # Whole components go or stay: every 8x8 square is either untouched or all background.
    for y, x in [(5, 5), (5, 30), (30, 5), (30, 30)]:
        block = half[:, y:y + 8, x:x + 8]
        orig = labels[:, y:y + 8, x:x + 8]
        for b in range(2):
            assert (block[b] == orig[b]).all() or (block[b] == 0).all()


def test_same_seed_same_noise_other_seed_other_noise():
    labels = torch.randint(0, 3, (2, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    for kind, kw in [("flip", {"rate": 0.3, "k": 0}), ("drop", {"rate": 0.5, "k": 0})]:
        spec = type("Spec", (), {"kind": kind, **kw})()
        a = apply_noise(spec, labels, 3, spatial_dims=2, generator=11)
        b = apply_noise(spec, labels, 3, spatial_dims=2, generator=torch.Generator().manual_seed(11))
        c = apply_noise(spec, labels, 3, spatial_dims=2, generator=12)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
    # The global RNG is not touched.
    torch.manual_seed(5)
    flip_classes(labels, 0.5, 3, generator=1)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))


# ---- config -------------------------------------------------------------------------------------
def test_noise_section_defaults_off_saved_and_old_configs_load():
    cfg = load_config(REPO / "configs/acdc/supervised_reduced.yaml")  # has no noise section
    assert cfg.noise.target == "none" and describe_noise(cfg.noise) == "none"
    saved = yaml.safe_load(cfg.to_yaml())
    assert saved["noise"]["target"] == "none"
    cfg = load_config(REPO / "configs/acdc/supervised_reduced.yaml",
                      ["noise.target=labeled", "noise.kind=erode", "noise.k=2", "noise.labeled_share=0.5"])
    assert describe_noise(cfg.noise).startswith("labeled masks (50% of labeled cases): erode k=2")


@pytest.mark.parametrize("override,key", [
    ("noise.rate=1.5", "noise.rate"),
    ("noise.rate=-0.1", "noise.rate"),
    ("noise.k=-1", "noise.k"),
    ("noise.kind=blur", "noise.kind"),
    ("noise.target=everything", "noise.target"),
    ("noise.labeled_share=2", "noise.labeled_share"),
    ("noise.sead=1", "noise.sead"),
])
def test_bad_noise_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value)


def test_parameter_the_kind_ignores_is_rejected():
    with pytest.raises(ConfigError, match="noise.rate"):
        load_config(None, ["noise.kind=erode", "noise.rate=0.2"])
    with pytest.raises(ConfigError, match="noise.k"):
        load_config(None, ["noise.kind=flip", "noise.k=2"])


# ---- labeled-mask corruption --------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_noise")
    return make_synthetic_dataset(root, spatial_dims=2, num_cases=9, size=(32, 32), val_cases=3, seed=0)


def _cfg(root: Path, out: Path, method: str = "supervised", **noise) -> dict:
    return {
        "experiment": {"name": "noise", "output_dir": str(out), "seed": 0},
        "data": {"reader": "synthetic", "root": str(root), "labeled": 4, "patch_size": [32, 32], "augment": False},
        "model": {"net": "unet2d", "num_classes": 4, "net_options": dict(SMALL_UNET)},
        "method": {"name": method},
        "train": {"max_steps": 2, "labeled_batch": 2, "unlabeled_batch": 2, "accelerator": "cpu",
                  "progress_bar": False},
        "noise": noise,
    }


def test_labeled_noise_corrupts_exactly_the_share_and_never_validation(tmp_path, synth):
    cfg = config_from_dict(_cfg(synth, tmp_path, target="labeled", kind="flip", rate=0.5, labeled_share=0.5, seed=3))
    data = SemidiffData(cfg, uses_unlabeled=False)
    labeled = data.splits.labeled
    assert len(labeled) == 4
    changed = []
    for i, ref in enumerate(labeled):
        clean = data.reader.load(ref).label
        noisy = data.train_items._case(i).label
        if not np.array_equal(clean, noisy):
            changed.append(ref.case_id)
            assert abs(np.mean(clean != noisy) - 0.5) < 0.1
        # What the method receives (no augmentation, same size) is the corrupted mask.
        item = data.train_items[(i, 0)]
        assert np.array_equal(np.asarray(item["label"][0]), noisy)
    assert changed == data.splits.noisy_labeled and len(changed) == 2
    assert data.splits.summary()["noisy_labeled"] == changed
    # The same cases and pixels in a second build (a resumed run, another worker).
    again = SemidiffData(cfg, uses_unlabeled=False)
    for i in range(4):
        assert np.array_equal(again.train_items._case(i).label, data.train_items._case(i).label)
    # Validation cases keep their labels.
    val = CaseList(data.reader, data.splits.val)
    for i, ref in enumerate(data.splits.val):
        assert np.array_equal(val[i].label, data.reader.load(ref).label)
    # Noise off: nothing corrupted, nothing recorded.
    off = SemidiffData(config_from_dict(_cfg(synth, tmp_path)), uses_unlabeled=False)
    assert off.train_items.label_noise is None and "noisy_labeled" not in off.splits.summary()


def test_select_noisy_cases_counts():
    ids = [f"c{i}" for i in range(10)]
    assert len(select_noisy_cases(ids, 0.25, 0)) == 3  # 2.5 rounds up
    assert select_noisy_cases(ids, 0.0, 0) == [] and select_noisy_cases(ids, 1.0, 0) == ids
    assert select_noisy_cases(ids, 0.5, 1) == select_noisy_cases(ids, 0.5, 1)


# ---- pseudo-label corruption --------------------------------------------------------------------
def _batch(n_l=2, n_u=2, num_classes=4):
    g = torch.Generator().manual_seed(0)
    return ({"image": torch.randn(n_l, 1, 32, 32, generator=g),
             "label": torch.randint(0, num_classes, (n_l, 1, 32, 32), generator=g)},
            {"image": torch.randn(n_u, 1, 32, 32, generator=g)})


def _spy(method):
    """Record the inputs and outputs of the method's hard-label hook."""
    calls = []
    original = method.corrupt_pseudo

    def spy(labels):
        out = original(labels)
        calls.append((labels.clone(), out.clone()))
        return out

    method.corrupt_pseudo = spy
    return calls


def test_cps_sees_corrupted_pseudo_labels(tmp_path, synth):
    noisy_cfg = config_from_dict(_cfg(synth, tmp_path, "cps", target="pseudo", kind="flip", rate=1.0))
    clean_cfg = config_from_dict(_cfg(synth, tmp_path, "cps"))
    noisy, clean = build_method(noisy_cfg), build_method(clean_cfg)
    clean.load_state_dict(noisy.state_dict())
    calls = _spy(noisy)
    labeled, unlabeled = _batch()
    torch.manual_seed(0)
    parts_noisy = noisy.training_step(labeled, unlabeled, Progress(5, 10))
    torch.manual_seed(0)
    parts_clean = clean.training_step(labeled, unlabeled, Progress(5, 10))
    assert len(calls) == 2  # A's pseudo-labels for B and B's for A
    for before, after in calls:
        assert before.shape == after.shape == (2, 1, 32, 32)
        assert (before != after).all()  # flip rate 1: every pseudo-label is wrong
    assert torch.equal(parts_noisy["loss_sup"], parts_clean["loss_sup"])
    assert not torch.allclose(parts_noisy["loss_cps"], parts_clean["loss_cps"])


# Every method's call of the hook: test_method_conformance.py::test_pseudo_labels_go_through_the_noise_hook


def test_soft_targets_become_one_hot_where_the_class_changed(tmp_path, synth):
    method = build_method(config_from_dict(_cfg(synth, tmp_path, "mean_teacher", target="pseudo", kind="flip",
                                                rate=0.5)))
    probs = torch.softmax(torch.randn(2, 4, 16, 16), dim=1)
    method.start_pseudo_noise_step(7)
    out = method.corrupt_soft_pseudo(probs)
    changed = out.argmax(1) != probs.argmax(1)
    assert 0.4 < changed.float().mean() < 0.6
    one_hot = torch.nn.functional.one_hot(out.argmax(1), 4).movedim(-1, 1).float()
    assert torch.equal(out.permute(0, 2, 3, 1)[changed], one_hot.permute(0, 2, 3, 1)[changed])
    assert torch.equal(out.permute(0, 2, 3, 1)[~changed], probs.permute(0, 2, 3, 1)[~changed])
    # Same step, same call order: the same corruption (exact resume); the next call and another
    # step differ, whatever the global RNG does.
    torch.manual_seed(99)
    method.start_pseudo_noise_step(7)
    assert torch.equal(method.corrupt_soft_pseudo(probs), out)
    assert not torch.equal(method.corrupt_soft_pseudo(probs), out)
    method.start_pseudo_noise_step(8)
    assert not torch.equal(method.corrupt_soft_pseudo(probs), out)
    # Off: the very same tensor back.
    method.set_pseudo_noise(None)
    assert method.corrupt_soft_pseudo(probs) is probs
