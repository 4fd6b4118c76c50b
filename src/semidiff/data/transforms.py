"""Training augmentation and the resizing helpers shared by training and evaluation.

Items are dictionaries with ``"image"`` ``(C, *spatial)`` and, for labeled items, ``"label"``
``(1, *spatial)``; unlabeled items simply have no ``"label"`` key. Training resizes 2D slices
with :func:`resize_to`'s exact interpolation (image bilinear, label nearest), so that
evaluation, which resizes each slice with :func:`resize_to`, sees what training saw.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import (
    CastToTyped,
    Compose,
    EnsureTyped,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    Resize,
    Resized,
    SpatialPadd,
)
from monai.utils import convert_to_tensor

from semidiff.data.record import Case
from semidiff.errors import ConfigError

__all__ = [
    "case_to_item",
    "resample_to_shape",
    "resample_volume",
    "resize_to",
    "train_transforms",
]

KEYS = ("image", "label")
# Interpolation of images per number of spatial axes (labels always use nearest).
_IMAGE_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}
# Range of the small random in-plane rotation of 2D slices (radians, +-).
_MAX_ROTATION = float(np.deg2rad(20))


def case_to_item(case: Case) -> dict:
    """Turn a loaded :class:`Case` into a transform input: label gains its channel axis.

    Args:
        case: a loaded case.

    Returns:
        ``{"image": (C, *spatial)}`` plus ``"label": (1, *spatial)`` when the case has one.
    """
    item = {"image": case.image}
    if case.label is not None:
        item["label"] = case.label[None]
    return item


def train_transforms(
    spatial_dims: int,
    size: Sequence[int],
    augment: bool = True,
    rot90: bool = True,
    flip: bool = True,
    intensity: bool = True,
    rotate: bool = True,
) -> Compose:
    """Training pipeline for labeled and unlabeled items.

    2D: random rot90 and flips, a random small rotation (up to 20 degrees), then resize to
    ``size`` (image bilinear, label nearest). 3D: pad to at least ``size``, random crop of
    ``size`` (kept even with ``augment=False``: it is how patches are sampled), random flips
    on every axis and rot90 in the plane of the first two axes (only when those two sizes are
    equal, so the output shape never changes). Intensity: small random scale and shift and
    Gaussian noise, image only.

    Args:
        spatial_dims: 2 or 3.
        size: output spatial size.
        augment: False turns every random augmentation off (2D then only resizes).
        rot90: random multiples of 90 degrees.
        flip: random flips.
        intensity: random intensity scale/shift and noise.
        rotate: 2D only, the random small rotation.

    Returns:
        A MONAI ``Compose`` whose output is ``{"image": float32 (C, *size),
        "label": int64 (1, *size)}`` as plain tensors. Seed it with
        ``monai.utils.set_determinism`` or ``.set_random_state(seed)``.

    Raises:
        ConfigError: spatial_dims is not 2 or 3, or size has the wrong length.
    """
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    size = tuple(int(s) for s in size)
    if len(size) != spatial_dims or min(size) < 1:
        raise ConfigError(f"size must have {spatial_dims} positive entries, got {size}")
    keys = list(KEYS)
    modes = (_IMAGE_MODE[spatial_dims], "nearest")
    common = {"keys": keys, "allow_missing_keys": True}
    # Float tensors from the start: interpolation of uint8 labels is not supported everywhere.
    t: list = [EnsureTyped(**common, data_type="tensor", dtype=torch.float32, track_meta=False)]

    if spatial_dims == 2:
        if augment and rot90:
            t.append(RandRotate90d(**common, prob=0.5, max_k=3, spatial_axes=(0, 1)))
        if augment and flip:
            t += [RandFlipd(**common, prob=0.5, spatial_axis=a) for a in (0, 1)]
        if augment and rotate:
            t.append(
                RandRotated(
                    **common,
                    range_x=_MAX_ROTATION,
                    prob=0.5,
                    keep_size=True,
                    mode=modes,
                    padding_mode="zeros",
                )
            )
        t.append(Resized(**common, spatial_size=size, mode=modes))
    else:
        t.append(SpatialPadd(**common, spatial_size=size, mode="constant"))
        t.append(RandSpatialCropd(**common, roi_size=size, random_size=False))
        if augment and flip:
            t += [RandFlipd(**common, prob=0.5, spatial_axis=a) for a in (0, 1, 2)]
        if augment and rot90 and size[0] == size[1]:
            t.append(RandRotate90d(**common, prob=0.5, max_k=3, spatial_axes=(0, 1)))

    if augment and intensity:
        t += [
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
            RandGaussianNoised(keys="image", prob=0.5, mean=0.0, std=0.05),
        ]
    # Drop MONAI metadata (plain tensors collate faster) and fix the output dtypes.
    t.append(EnsureTyped(**common, data_type="tensor", track_meta=False))
    t.append(CastToTyped(**common, dtype=(torch.float32, torch.int64)))
    return Compose(t)


def _resize(x: np.ndarray | torch.Tensor, shape: Sequence[int], is_label: bool):
    """Resize the last ``len(shape)`` axes of ``x``; leading axes (any number) are kept.

    Returns the same kind (numpy or torch) and dtype as the input.
    """
    shape = tuple(int(s) for s in shape)
    k = len(shape)
    if k not in _IMAGE_MODE or x.ndim < k:
        raise ConfigError(f"cannot resize an array of shape {tuple(x.shape)} to {shape}")
    was_numpy = isinstance(x, np.ndarray)
    t = torch.as_tensor(x)
    dtype, lead = t.dtype, tuple(t.shape[: t.ndim - k])
    if tuple(t.shape[t.ndim - k :]) == shape:
        return x
    # Resize works on (C, *spatial): fold all leading axes into the channel axis.
    flat = t.reshape((-1, *t.shape[t.ndim - k :])).to(torch.float32)
    mode = "nearest" if is_label else _IMAGE_MODE[k]
    out = convert_to_tensor(Resize(spatial_size=shape, mode=mode)(flat), track_meta=False)
    out = out.reshape(lead + shape)
    if not is_label and not dtype.is_floating_point:
        out = out.round()  # integer image, interpolated linearly
    out = out.to(dtype)
    return out.numpy() if was_numpy else out


def resize_to(image_or_label: torch.Tensor, size: Sequence[int], is_label: bool) -> torch.Tensor:
    """Resize a 2D slice (or a stack of them) as training does: image bilinear, label nearest.

    Args:
        image_or_label: tensor whose last ``len(size)`` axes are spatial, e.g. ``(H, W)``,
            ``(C, H, W)`` or ``(N, C, H, W)``.
        size: target spatial size.
        is_label: nearest-neighbour interpolation (dtype kept) instead of bilinear.

    Returns:
        A tensor with the same leading axes and dtype, spatial size ``size``.
    """
    return _resize(torch.as_tensor(image_or_label), size, is_label)


def resample_volume(
    array: np.ndarray | torch.Tensor,
    factor: float | Sequence[float],
    is_label: bool,
    spatial_dims: int = 3,
):
    """Resample a volume by a factor per axis (e.g. 0.5 for the reduced LA budget).

    Args:
        array: numpy array or tensor whose last ``spatial_dims`` axes are spatial (leading
            axes such as channels are kept).
        factor: one factor for every spatial axis, or one per axis.
        is_label: nearest-neighbour (dtype kept) instead of trilinear.
        spatial_dims: number of trailing spatial axes.

    Returns:
        Same kind and dtype as ``array``, spatial shape ``round(shape * factor)`` (at least 1).
        Undo it with :func:`resample_to_shape`.
    """
    factors = [float(factor)] * spatial_dims if np.isscalar(factor) else [float(f) for f in factor]
    if len(factors) != spatial_dims or min(factors) <= 0:
        raise ConfigError(f"need {spatial_dims} positive resampling factors, got {factor!r}")
    spatial = array.shape[array.ndim - spatial_dims :]
    shape = [max(1, round(s * f)) for s, f in zip(spatial, factors)]
    return _resize(array, shape, is_label)


def resample_to_shape(array: np.ndarray | torch.Tensor, shape: Sequence[int], is_label: bool):
    """Resample a volume to a given spatial shape (the inverse of :func:`resample_volume`).

    Args:
        array: numpy array or tensor whose last ``len(shape)`` axes are spatial.
        shape: target spatial shape, e.g. the original volume's.
        is_label: nearest-neighbour (dtype kept) instead of (tri)linear.

    Returns:
        Same kind and dtype as ``array``.
    """
    return _resize(array, shape, is_label)
