"""Sliding window (MONAI vs the classic loop), slice-wise and whole-image paths, post-processing, figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from semidiff.errors import ConfigError
from semidiff.evaluation.figures import (
    DPI,
    PANEL_INCHES,
    overlay_figure_tensor,
    overlay_panel,
    pick_slice,
)
from semidiff.evaluation.inference import (
    keep_largest_component,
    monai_overlap,
    predict_case,
    reference_sliding_window,
    slicewise_predict,
    sliding_window_predict,
    whole_image_predict,
    window_starts,
)

NUM_CLASSES = 3


def _conv_softmax(dims: int, in_ch: int = 1, seed: int = 0):
    """A deterministic 'model': fixed random conv (zero padding, so windows see borders) + softmax."""
    torch.manual_seed(seed)
    conv = (torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d)(in_ch, NUM_CLASSES, 3, padding=1)
    conv.eval()

    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(conv(x) * 3.0, dim=1)

    return fn


# (batch, spatial size, patch, stride). Several pairs (6/2, 9/3, 5/1) are ones where MONAI's
# int(patch * (1 - (1 - stride/patch))) truncates to stride - 1; the last case is smaller than the
# patch on two axes (padded) and has a window that is pulled back to the border.
_SW_CASES = [
    (1, (20, 17, 11), (8, 9, 6), (3, 3, 2)),
    (2, (16, 16, 9), (6, 8, 5), (2, 4, 1)),
    (1, (5, 13, 7), (8, 8, 8), (4, 4, 4)),
    (1, (12, 12, 12), (12, 6, 5), (12, 5, 5)),
]


@pytest.mark.parametrize("batch, size, patch, stride", _SW_CASES)
def test_monai_matches_classic_loop(batch, size, patch, stride) -> None:
    fn = _conv_softmax(3)
    image = torch.randn(batch, 1, *size, generator=torch.Generator().manual_seed(1))
    ours = sliding_window_predict(fn, image, patch, stride, NUM_CLASSES, sw_batch_size=3)
    classic = reference_sliding_window(fn, image, patch, stride, NUM_CLASSES)
    assert ours.shape == classic.shape == (batch, NUM_CLASSES, *size)
    torch.testing.assert_close(ours, classic, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.sum(1), torch.ones(batch, *size), rtol=1e-5, atol=1e-5)


def test_naive_overlap_differs_from_classic_loop() -> None:
    """The trap monai_overlap avoids: overlap = 1 - stride/patch scans 9/3 with interval 2."""
    fn = _conv_softmax(3)
    image = torch.randn(1, 1, 20, 17, 11, generator=torch.Generator().manual_seed(1))
    patch, stride = (8, 9, 6), (3, 3, 2)
    naive = tuple(1 - s / p for p, s in zip(patch, stride))
    with torch.no_grad():
        out = sliding_window_inference(image, patch, 3, fn, overlap=naive, mode="constant")
    classic = reference_sliding_window(fn, image, patch, stride, NUM_CLASSES)
    assert not torch.allclose(torch.as_tensor(out), classic, atol=1e-5)
    assert int(96 * (1 - (1 - 16 / 96))) == 15  # Pancreas 96/16 would scan every 15 voxels
    assert int(96 * (1 - monai_overlap([96], [16])[0])) == 16


def test_monai_window_positions_equal_classic() -> None:
    """Record where MONAI puts its windows (coordinates encoded in the image) for many sizes."""
    for patch in range(1, 11):
        for stride in range(1, patch + 1):
            for size in sorted({patch, patch + 1, 2 * patch + 3, 23}):
                if size < patch:
                    continue
                seen: list[int] = []

                def fn(x: torch.Tensor) -> torch.Tensor:
                    seen.extend(int(v) for v in x[:, 0, 0, 0])  # noqa: B023 (called within this iteration)
                    return torch.ones(x.shape[0], 1, *x.shape[2:])

                coords = torch.arange(size, dtype=torch.float32).view(1, 1, 1, size).expand(1, 1, 2, size)
                sliding_window_predict(fn, coords.contiguous(), (2, patch), (2, stride), 1, sw_batch_size=4)
                assert sorted(seen) == window_starts(size, patch, stride), (size, patch, stride)


def test_stride_larger_than_patch_is_refused() -> None:
    with pytest.raises(ConfigError, match="stride"):
        monai_overlap([8], [9])
    with pytest.raises(ConfigError, match="patch_size"):
        sliding_window_predict(_conv_softmax(3), torch.zeros(1, 1, 8, 8, 8), (8, 8), (4, 4), NUM_CLASSES)


def test_smaller_than_patch_through_predict_case() -> None:
    fn = _conv_softmax(3)
    image = np.random.default_rng(0).standard_normal((1, 5, 6, 7)).astype(np.float32)
    probs = predict_case(fn, image, "sliding_window", NUM_CLASSES, patch_size=[8, 8, 8], stride=[4, 4, 4])
    assert probs.shape == (NUM_CLASSES, 5, 6, 7) and probs.dtype == np.float32
    classic = reference_sliding_window(fn, torch.from_numpy(image)[None], 8, 4, NUM_CLASSES)[0].numpy()
    np.testing.assert_allclose(probs, classic, rtol=1e-5, atol=1e-5)


def test_slicewise_shapes_and_sizes() -> None:
    fn2d = _conv_softmax(2)
    seen: list[tuple[int, ...]] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return fn2d(x)

    volume = torch.randn(1, 7, 37, 45)
    out = slicewise_predict(fn, volume, (32, 24), NUM_CLASSES, batch_size=4)
    assert out.shape == (NUM_CLASSES, 7, 37, 45)
    assert seen == [(4, 1, 32, 24), (3, 1, 32, 24)]  # every slice resized to the training size
    torch.testing.assert_close(out.sum(0), torch.ones(7, 37, 45), rtol=1e-5, atol=1e-5)
    # At the training size no resizing happens: slice-wise equals predicting each slice.
    same = slicewise_predict(fn2d, volume, (37, 45), NUM_CLASSES)
    torch.testing.assert_close(same[:, 3], fn2d(volume[:, 3][None])[0])


def test_whole_image_and_predict_case_modes() -> None:
    fn2d = _conv_softmax(2)
    image = np.random.default_rng(1).standard_normal((1, 50, 61)).astype(np.float32)
    out = predict_case(fn2d, image, "whole", NUM_CLASSES, train_size=[32, 32])
    assert out.shape == (NUM_CLASSES, 50, 61)
    np.testing.assert_allclose(out.sum(0), 1.0, rtol=1e-5)
    direct = whole_image_predict(fn2d, torch.from_numpy(image), (50, 61), NUM_CLASSES)
    torch.testing.assert_close(direct, fn2d(torch.from_numpy(image)[None])[0])
    vol = np.random.default_rng(2).standard_normal((1, 4, 30, 20)).astype(np.float32)
    assert predict_case(fn2d, vol, "slicewise", NUM_CLASSES, train_size=[16, 16]).shape == (NUM_CLASSES, 4, 30, 20)
    with pytest.raises(ConfigError, match="train_size"):
        predict_case(fn2d, vol, "slicewise", NUM_CLASSES)
    with pytest.raises(ConfigError, match="patch_size"):
        predict_case(fn2d, vol, "sliding_window", NUM_CLASSES)
    with pytest.raises(ConfigError, match="mode"):
        predict_case(fn2d, vol, "tiles", NUM_CLASSES)


def test_keep_largest_component() -> None:
    mask = np.zeros((20, 20), np.uint8)
    mask[1:4, 1:5] = 1  # 12 pixels: the largest of class 1
    mask[10:12, 10:12] = 1  # 4
    mask[18, 18] = 1  # 1
    mask[6:8, 15:18] = 2  # 6 pixels: the largest of class 2
    mask[15:17, 1:3] = 2  # 4
    mask[0, 19] = 2  # 1
    out = keep_largest_component(mask)
    expected = np.zeros_like(mask)
    expected[1:4, 1:5] = 1
    expected[6:8, 15:18] = 2
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == mask.dtype
    blob = np.zeros((6, 6, 6), bool)
    blob[0:2, 0:2, 0:2] = True
    blob[4:6, 4:6, 3:6] = True  # larger
    kept = keep_largest_component(blob)
    assert kept.dtype == bool and kept.sum() == 12 and kept[5, 5, 5] and not kept[0, 0, 0]
    # Diagonal neighbours are separate components with face connectivity, one with full connectivity.
    diag = np.eye(4, dtype=np.uint8)
    assert keep_largest_component(diag).sum() == 1
    assert keep_largest_component(diag, connectivity=2).sum() == 4


def test_pick_slice() -> None:
    vol = np.zeros((5, 8, 8), np.uint8)
    vol[1, :2, :2] = 1
    vol[3, :4, :4] = 2
    assert pick_slice(vol) == 3
    assert pick_slice(vol, axis=2) == 0
    assert pick_slice(np.zeros((6, 4, 4))) == 3  # no foreground: middle slice


def _rows(n: int) -> list[tuple]:
    rng = np.random.default_rng(3)
    rows = []
    for i in range(n):
        img = rng.standard_normal((40, 50))
        truth = np.zeros((40, 50), np.uint8)
        truth[5:20, 5:25] = 1
        truth[25:35, 30:45] = 2
        pred = np.roll(truth, 3, axis=1)
        rows.append((f"case{i}", img, truth if i != 1 else None, pred))
    return rows


def test_overlay_panel_png(tmp_path) -> None:
    from PIL import Image

    names = ["background", "LV", "RV"]
    sizes = {}
    for n in (1, 3):
        path = overlay_panel(_rows(n), tmp_path / f"sub/panel{n}.png", class_names=names, title="toy")
        assert path.is_file() and path.stat().st_size > 0
        with Image.open(path) as im:
            sizes[n] = im.size  # (width, height)
    # Three panels per row, one row per case: width fixed, height grows by one panel per row.
    assert sizes[1][0] == sizes[3][0] == round(3 * PANEL_INCHES * DPI)
    assert sizes[3][1] - sizes[1][1] == round(2 * PANEL_INCHES * DPI)
    arr = overlay_figure_tensor(_rows(3), class_names=names)
    assert arr.dtype == np.uint8 and arr.shape == (sizes[3][1], sizes[3][0], 3)
    assert arr.std() > 10  # not a blank canvas


def test_overlay_row_keeps_the_colours_of_an_rgb_frame() -> None:
    """An endoscopy frame is shown in colour (it was its red channel in grey); grey and 3D images show channel 0."""
    from semidiff.data.record import Case
    from semidiff.evaluation.evaluate import overlay_row
    from semidiff.evaluation.figures import overlay_rgb

    rng = np.random.default_rng(0)
    frame = np.stack([np.full((8, 12), v, np.float32) for v in (0.9, 0.5, 0.1)])  # orange-ish, 3 channels
    frame += rng.uniform(0, 0.01, frame.shape).astype(np.float32)
    label = np.zeros((8, 12), np.int64)
    _, image, _, _ = overlay_row(Case("f", frame, label), label)
    assert image.shape == (8, 12, 3) and image.dtype == np.uint8
    rgb = overlay_rgb(image, None).astype(int)
    assert rgb[..., 0].mean() > rgb[..., 1].mean() > rgb[..., 2].mean()  # not grey
    # A large frame is kept small (the panels are ~220 px wide), the masks at full size still overlay it
    big = np.repeat(np.repeat(frame, 80, axis=1), 80, axis=2)  # (3, 640, 960)
    big_label = np.zeros((640, 960), np.int64)
    big_label[:320] = 1
    _, small, _, _ = overlay_row(Case("b", big, big_label), big_label)
    assert small.shape == (320, 480, 3)
    shown = overlay_rgb(small, big_label)
    assert shown.shape == (640, 960, 3) and not np.array_equal(shown[:320], shown[320:])
    with pytest.raises(ValueError, match="differs from image shape"):
        overlay_rgb(small, np.zeros((640, 700), np.int64))  # another frame's mask
    grey = rng.standard_normal((1, 8, 12)).astype(np.float32)
    assert overlay_row(Case("g", grey, label), label)[1].shape == (8, 12)
    volume = rng.standard_normal((2, 4, 8, 12)).astype(np.float32)  # 2 channels, 4 slices
    vlabel = np.zeros((4, 8, 12), np.int64)
    vlabel[2, 2:5, 3:6] = 1
    _, image, truth, _ = overlay_row(Case("v", volume, vlabel), vlabel)
    assert image.shape == (8, 12) and np.array_equal(image, volume[0, 2]) and truth.sum() == 9
