"""Labeled/unlabeled selection, hold-out, the two-stream batch sampler and transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from semidiff.data import (
    CaseRef,
    TwoStreamBatchSampler,
    holdout,
    resample_to_shape,
    resample_volume,
    resize_to,
    select_labeled,
    train_transforms,
)
from semidiff.errors import ConfigError


def slice_refs(slices_per_patient: list[int]) -> list[CaseRef]:
    """ACDC-like list: patient k contributes the given number of slices, in list order."""
    refs = []
    for p, n in enumerate(slices_per_patient):
        refs += [CaseRef(f"patient{p:03d}_slice_{s}", f"/x/{p}_{s}.h5", f"patient{p:03d}") for s in range(n)]
    return refs


def case_refs(n: int) -> list[CaseRef]:
    return [CaseRef(f"c{i}", f"/x/c{i}.h5", f"c{i}") for i in range(n)]


# --------------------------------------------------------------------------- splits


def test_select_labeled_cases_and_patients():
    refs = case_refs(10)
    lab, unl = select_labeled(refs, 4)
    assert [r.case_id for r in lab] == ["c0", "c1", "c2", "c3"]
    assert [r.case_id for r in unl] == [f"c{i}" for i in range(4, 10)]

    refs = slice_refs([3, 2, 4, 1])
    lab, unl = select_labeled(refs, 2, unit="patients")
    assert len(lab) == 5 and {r.group for r in lab} == {"patient000", "patient001"}
    assert lab + unl == refs

    lab, _ = select_labeled(refs, 0.5, unit="fraction")  # round(0.5 * 4) = 2 patients
    assert len(lab) == 5
    lab, _ = select_labeled(refs, 1.0, unit="fraction")
    assert lab == refs


def test_select_labeled_random_rule_is_seeded_and_keeps_order():
    refs = slice_refs([2] * 20)
    a, ua = select_labeled(refs, 5, unit="patients", rule="random", seed=1)
    b, _ = select_labeled(refs, 5, unit="patients", rule="random", seed=1)
    c, _ = select_labeled(refs, 5, unit="patients", rule="random", seed=2)
    assert a == b and a != c
    assert len({r.group for r in a}) == 5 and len(a) == 10
    assert a == [r for r in refs if r in a]  # list order kept
    assert not set(a) & set(ua) and len(a) + len(ua) == len(refs)
    assert a != select_labeled(refs, 5, unit="patients")[0]


@pytest.mark.parametrize(
    "args, match",
    [
        ((0,), "empty labeled set"),
        ((0.01, "fraction"), "empty labeled set"),
        ((11,), "only 10 are available"),
        ((4, "patients"), "only 3 are available"),
        ((2, "slices"), "unknown labeled unit"),
        ((1.5, "fraction"), r"\(0, 1\]"),
        ((2.5,), "whole number"),
    ],
)
def test_select_labeled_errors(args, match):
    refs = case_refs(10) if len(args) == 1 or args[1] != "patients" else slice_refs([1, 2, 3])
    with pytest.raises(ConfigError, match=match):
        select_labeled(refs, *args)
    with pytest.raises(ConfigError, match="unknown labeled rule"):
        select_labeled(refs, 1, rule="last")


def test_holdout_by_group_and_deterministic():
    refs = slice_refs([2, 3, 1, 4, 2, 2, 3, 1, 2, 2])
    train, held = holdout(refs, 3, seed=5)
    assert holdout(refs, 3, seed=5) == (train, held)
    assert len({r.group for r in held}) == 3
    assert not {r.group for r in train} & {r.group for r in held}
    assert sorted(train + held, key=refs.index) == refs
    assert held == [r for r in refs if r in held]
    _, held_frac = holdout(refs, 0.2, seed=5)
    assert len({r.group for r in held_frac}) == 2
    with pytest.raises(ConfigError, match="nothing to train on"):
        holdout(refs, 10)
    with pytest.raises(ConfigError, match="no group"):
        holdout(refs, 0)


# --------------------------------------------------------------------------- sampler


def test_sampler_batches_have_fixed_counts_labeled_first():
    lab, unl = list(range(5)), list(range(100, 137))
    sampler = TwoStreamBatchSampler(lab, unl, 2, 3, num_batches=40, seed=0)
    batches = list(sampler)
    assert len(sampler) == 40 and len(batches) == 40
    for b in batches:
        assert len(b) == 5
        assert all(i in lab for i in b[:2]) and all(i in unl for i in b[2:])
    # Each stream cycles on its own: the first 5 labeled draws are a permutation of the stream.
    flat_lab = [i for b in batches for i in b[:2]]
    assert sorted(flat_lab[:5]) == lab and sorted(flat_lab[5:10]) == lab
    flat_unl = [i for b in batches for i in b[2:]]
    assert sorted(flat_unl[:37]) == unl


def test_sampler_deterministic_epochs_and_ranks():
    lab, unl = list(range(8)), list(range(8, 30))
    a = list(TwoStreamBatchSampler(lab, unl, 2, 2, 10, seed=3))
    assert a == list(TwoStreamBatchSampler(lab, unl, 2, 2, 10, seed=3))
    assert a != list(TwoStreamBatchSampler(lab, unl, 2, 2, 10, seed=4))
    s = TwoStreamBatchSampler(lab, unl, 2, 2, 10, seed=3)
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != a and e1 == list(s)

    ranks = [TwoStreamBatchSampler(lab, unl, 1, 2, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    out = [list(r) for r in ranks]
    lab_seen = [[i for b in o for i in b[:1]] for o in out]
    unl_seen = [[i for b in o for i in b[1:]] for o in out]
    # Within one pass over each stream (4 of 8 labeled, 8 of 22 unlabeled per rank) the
    # shards are disjoint and together cover distinct items.
    assert not set(lab_seen[0]) & set(lab_seen[1])
    assert not set(unl_seen[0]) & set(unl_seen[1])
    assert len(set(lab_seen[0])) == 4


def test_sampler_supervised_and_errors():
    s = TwoStreamBatchSampler([1, 2, 3], [], 2, 0, num_batches=3)
    assert [len(b) for b in s] == [2, 2, 2]
    with pytest.raises(ConfigError, match="labeled_batch"):
        TwoStreamBatchSampler([1], [2], 0, 1, 3)
    with pytest.raises(ConfigError, match="labeled stream is empty"):
        TwoStreamBatchSampler([], [2], 1, 1, 3)
    with pytest.raises(ConfigError, match="unlabeled stream"):
        TwoStreamBatchSampler([1], [], 1, 1, 3)


def test_sampler_in_dataloader():
    class Ids(Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return torch.tensor(i)

    sampler = TwoStreamBatchSampler(range(4), range(4, 20), 2, 2, num_batches=5)
    batches = list(DataLoader(Ids(), batch_sampler=sampler))
    assert len(batches) == 5 and all(b.shape == (4,) for b in batches)
    assert all(int(b[0]) < 4 and int(b[3]) >= 4 for b in batches)


# --------------------------------------------------------------------------- transforms


def test_train_transforms_2d_shapes_dtypes_labels():
    rng = np.random.default_rng(0)
    image = rng.random((1, 70, 53), dtype=np.float32)
    label = rng.integers(0, 4, (1, 70, 53)).astype(np.uint8)
    tf = train_transforms(2, (32, 32))
    tf.set_random_state(7)
    outs = [tf({"image": image, "label": label}) for _ in range(6)]
    for out in outs:
        assert type(out["image"]) is torch.Tensor and out["image"].dtype == torch.float32
        assert out["image"].shape == (1, 32, 32)
        assert out["label"].dtype == torch.int64 and out["label"].shape == (1, 32, 32)
        assert set(out["label"].unique().tolist()) <= {0, 1, 2, 3}
    # Unlabeled item: no label key in, none out.
    unl = tf({"image": image})
    assert set(unl) == {"image"} and unl["image"].shape == (1, 32, 32)
    # Seeded: same outputs for the same state.
    tf2 = train_transforms(2, (32, 32))
    tf2.set_random_state(7)
    again = tf2({"image": image, "label": label})
    assert torch.equal(again["image"], outs[0]["image"]) and torch.equal(again["label"], outs[0]["label"])
    # Without augmentation it is a plain resize, equal to resize_to.
    plain = train_transforms(2, (32, 32), augment=False)({"image": image, "label": label})
    assert torch.allclose(plain["image"], resize_to(torch.from_numpy(image), (32, 32), is_label=False))
    assert torch.equal(plain["label"], resize_to(torch.from_numpy(label), (32, 32), is_label=True).long())


def test_train_transforms_3d_pad_crop():
    rng = np.random.default_rng(1)
    image = rng.standard_normal((1, 30, 20, 12)).astype(np.float32)  # smaller than the patch on 2 axes
    label = rng.integers(0, 2, (1, 30, 20, 12)).astype(np.uint8)
    tf = train_transforms(3, (24, 24, 16))
    tf.set_random_state(0)
    for _ in range(4):
        out = tf({"image": image, "label": label})
        assert out["image"].shape == (1, 24, 24, 16) and out["image"].dtype == torch.float32
        assert out["label"].shape == (1, 24, 24, 16) and out["label"].dtype == torch.int64
        assert set(out["label"].unique().tolist()) <= {0, 1}
    # Non-square in-plane patch: rot90 is skipped, so the shape is stable.
    out = train_transforms(3, (16, 12, 8))({"image": image})
    assert out["image"].shape == (1, 16, 12, 8)
    with pytest.raises(ConfigError):
        train_transforms(3, (16, 16))


def test_resize_and_resample_helpers():
    label = torch.zeros((40, 30), dtype=torch.uint8)
    label[10:30, 5:25] = 2
    small = resize_to(label, (20, 15), is_label=True)
    assert small.shape == (20, 15) and small.dtype == torch.uint8
    assert set(small.unique().tolist()) == {0, 2}
    probs = resize_to(torch.rand(2, 3, 40, 30), (64, 48), is_label=False)
    assert probs.shape == (2, 3, 64, 48)

    vol = np.zeros((20, 16, 12), dtype=np.uint8)
    vol[4:16, 4:12, 2:10] = 1
    half = resample_volume(vol, 0.5, is_label=True)
    assert isinstance(half, np.ndarray) and half.shape == (10, 8, 6) and half.dtype == np.uint8
    back = resample_to_shape(half, vol.shape, is_label=True)
    assert back.shape == vol.shape and (back == vol).mean() > 0.95
    img = np.random.default_rng(0).standard_normal((1, 20, 16, 12)).astype(np.float32)
    img_half = resample_volume(img, 0.5, is_label=False)
    assert img_half.shape == (1, 10, 8, 6) and img_half.dtype == np.float32
    t = resample_volume(torch.from_numpy(img), (0.5, 1.0, 2.0), is_label=False)
    assert isinstance(t, torch.Tensor) and t.shape == (1, 10, 16, 24)
