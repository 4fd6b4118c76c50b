"""Training augmentation, the batch augmentations methods share, and the resizing helpers.

Items are dictionaries with ``"image"`` ``(C, *spatial)`` and, for labeled items, ``"label"``
``(1, *spatial)``; unlabeled items simply have no ``"label"`` key. Training resizes 2D slices
with :func:`resize_to`'s exact interpolation (image bilinear, label nearest), so that
evaluation, which resizes each slice with :func:`resize_to`, sees what training saw.

The batch augmentations (:func:`input_noise`, :func:`intensity_jitter`, :func:`random_blur`,
:func:`block_mask`, :func:`mix`, :func:`cutmix`) work on ``(B, C, *spatial)`` tensors inside a
method's training step, in 2D and 3D alike, and draw only from torch's global RNG, which the
engine seeds from (seed, step): a resumed run replays the same views. A FixMatch-style method takes
its weak and strong views from here, not from another method's file.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.networks.layers import GaussianFilter
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
from torch import Tensor

from semidiff.data.record import Case
from semidiff.errors import ConfigError

__all__ = [
    "block_mask",
    "case_to_item",
    "cutmix",
    "input_noise",
    "intensity_jitter",
    "mix",
    "random_blur",
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


# ---- batch augmentations shared by methods (B, C, *spatial) ---------------------------------------
def _per_item(x: Tensor) -> tuple[int, ...]:
    """Shape broadcasting one value per batch item over (B, C, *spatial)."""
    return (x.shape[0],) + (1,) * (x.ndim - 1)


def input_noise(x: Tensor, std: float, clip: float) -> Tensor:
    """``clamp(N(0, std^2), -clip, clip)`` noise shaped like ``x`` (UA-MT / SSL4MIS: 0.1, 0.2)."""
    if std <= 0:
        return torch.zeros_like(x)
    return torch.clamp(torch.randn_like(x) * std, -clip, clip)


def intensity_jitter(x: Tensor, contrast: float, brightness: float) -> Tensor:
    """Random contrast and brightness per image: ``(x - mean) * c + mean + b * std``.

    ``c ~ U(1 - contrast, 1 + contrast)`` and ``b ~ U(-brightness, brightness)``; the shift is in
    units of the image's own standard deviation, so it means the same on min-max scaled (ACDC) and
    z-scored (LA) images.
    """
    if contrast <= 0 and brightness <= 0:
        return x
    dims = tuple(range(1, x.ndim))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True)
    c = 1.0 + contrast * (2.0 * torch.rand(_per_item(x), device=x.device) - 1.0)
    b = brightness * (2.0 * torch.rand(_per_item(x), device=x.device) - 1.0)
    return (x - mean) * c + mean + b * std


def random_blur(x: Tensor, prob: float, sigma_range: tuple[float, float]) -> Tensor:
    """Gaussian blur (MONAI ``GaussianFilter``) of each image with probability ``prob``.

    ``sigma ~ U(sigma_range)`` in voxels, one per image, the same on every axis.
    """
    if prob <= 0:
        return x
    spatial_dims = x.ndim - 2
    chosen = torch.rand(len(x)) < prob
    sigmas = torch.empty(len(x)).uniform_(*sigma_range)
    # In fp32 on a contiguous copy, outside autocast: on the CPU, MONAI's per-channel (grouped)
    # convolution of a channels-last multi-channel image in bf16 takes minutes per image (seen on
    # 240x416 RGB EndoScapes frames), and the blur of an input image needs no reduced precision.
    with torch.autocast(x.device.type, enabled=False):
        xc = x.float().contiguous()
        out = [
            GaussianFilter(spatial_dims, float(s)).to(x.device)(xc[i : i + 1]) if bool(c) else xc[i : i + 1]
            for i, (c, s) in enumerate(zip(chosen, sigmas))
        ]
    return torch.cat(out).to(x.dtype)


def block_mask(
    spatial_shape: tuple[int, ...] | torch.Size,
    ratio: float = 2.0 / 3.0,
    device: torch.device | str | None = None,
    centered: bool = False,
) -> Tensor:
    """A 0/1 mask with one axis-aligned block of ones, for copy-paste mixing.

    The block's side along each axis is ``int(ratio * size)`` (BCP: 2/3). Its position is uniform
    over all positions that keep the block inside the image (BCP draws a random corner; its
    ``randint(0, size - side)`` excludes the last position, we include it), or centred with
    ``centered=True``. One mask is drawn per call and shared by the whole batch, as in BCP.

    Args:
        spatial_shape: The image's spatial size (2 or 3 values).
        ratio: Block side as a fraction of each axis, in (0, 1].
        device: Device of the mask.
        centered: Put the block in the centre instead of at a random position.

    Returns:
        (1, 1, *spatial_shape) float mask, 1 inside the block, 0 outside.

    Raises:
        ValueError: If ``ratio`` is outside (0, 1].
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"block ratio must be in (0, 1], got {ratio!r}")
    mask = torch.zeros((1, 1, *spatial_shape), device=device)
    index: list[slice] = [slice(None), slice(None)]
    for size in spatial_shape:
        side = max(1, int(size * ratio))
        if centered:
            start = (size - side) // 2
        else:
            start = int(torch.randint(0, size - side + 1, (1,)).item())
        index.append(slice(start, start + side))
    mask[tuple(index)] = 1.0
    return mask


def mix(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """``a * mask + b * (1 - mask)`` for a binary mask, dtype-preserving (images and labels).

    Args:
        a: Values inside the mask (e.g. the pasted block's source).
        b: Values outside the mask (the background image).
        mask: 0/1 mask broadcastable to ``a`` (e.g. from :func:`block_mask`).
    """
    return torch.where(mask > 0.5, a, b)


def cutmix(values: Tensor, mask: Tensor | None) -> Tensor:
    """CutMix within a batch: item ``i`` gets the block ``mask`` from item ``i - 1`` (cyclically).

    Apply the same call (same ``mask``) to images, pseudo-labels, confidences and feature maps so
    the geometry is identical for all of them.

    Args:
        values: (B, k, *spatial) images, labels or maps (any dtype).
        mask: (1, 1, *spatial) 0/1 block mask (:func:`block_mask`) on ``values``' grid, or None
            (no CutMix this step: ``values`` unchanged).
    """
    if mask is None:
        return values
    return mix(values.roll(1, dims=0), values, mask)
