"""Whole-image inference: sliding window (3D), slice by slice (2D model on a volume), whole 2D image.

Every function takes a ``predict_fn(x) -> probabilities`` that maps a batch ``(N, C, *patch)`` to
softmax probabilities ``(N, num_classes, *patch)``; the caller applies the softmax, chooses the
device of the model and any autocast. Gradients are never needed here, so the functions run under
``torch.no_grad()``.

Sliding window and the classic loop
-----------------------------------
The field's reference code (UA-MT, SASSNet, MC-Net, SSL4MIS ``test_single_case``) predicts with
:func:`reference_sliding_window`: pad every axis to at least the patch, put windows at
``min(stride * i, size - patch)`` for ``i in range(ceil((size - patch) / stride) + 1)``, average the
summed softmax by the count of windows covering each voxel, crop the padding.
:func:`sliding_window_predict` does the same with MONAI's ``sliding_window_inference`` (batched
windows, GPU-friendly). MONAI 1.6 places its windows with the same rule (count
``ceil((size - patch) / interval) + 1``, start ``min(i * interval, size - patch)``), pads the same way
(``diff // 2`` before, the rest after, zeros) and with ``mode="constant"`` averages the same way.
The one trap is the interval: MONAI derives it as ``int(patch * (1 - overlap))``, and with the obvious
``overlap = 1 - stride / patch`` floating point makes ``patch * (1 - overlap)`` land just below the
stride for many pairs (5757 of the 32896 pairs with ``1 <= stride <= patch <= 256``, among them
Pancreas' 96/16 -> 15, and small ones like 6/2 -> 1 and 9/3 -> 2), so MONAI would scan with
``stride - 1`` and give a different average. :func:`monai_overlap` therefore picks the overlap so
that the truncation lands on the stride exactly; with it the two paths give the same windows for
every size and every ``1 <= stride <= patch`` (checked in ``tests/test_inference.py``), and the
probabilities agree to float rounding. A stride larger than the patch (gaps between windows, which
the classic loop allows) has no MONAI equivalent (overlap must be >= 0) and is refused.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from semidiff.errors import ConfigError

__all__ = [
    "InferenceMode",
    "PredictFn",
    "keep_largest_component",
    "monai_overlap",
    "predict_case",
    "reference_sliding_window",
    "slicewise_predict",
    "sliding_window_predict",
    "whole_image_predict",
    "window_starts",
]

#: ``(N, C, *spatial) -> (N, num_classes, *spatial)`` softmax probabilities.
PredictFn = Callable[[torch.Tensor], torch.Tensor]


class InferenceMode(str, Enum):
    """How :func:`predict_case` feeds an image to the model.

    Attributes:
        SLIDING_WINDOW: 3D model on a 3D volume, windows of the training patch size.
        SLICEWISE: 2D model on a 3D volume ``(C, S, H, W)``, slice by slice along the first axis.
        WHOLE: 2D model on a 2D image, resized to the training size and back.
    """

    SLIDING_WINDOW = "sliding_window"
    SLICEWISE = "slicewise"
    WHOLE = "whole"


def _per_axis(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    vals = (int(value),) * ndim if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
    if len(vals) != ndim:
        raise ConfigError(f"{name}: {vals} has {len(vals)} values for {ndim} spatial axes")
    if any(v <= 0 for v in vals):
        raise ConfigError(f"{name}: every value must be positive, got {vals}")
    return vals


def monai_overlap(patch_size: Sequence[int], stride: Sequence[int]) -> tuple[float, ...]:
    """Per-axis ``overlap`` for which MONAI's window interval equals ``stride`` exactly.

    MONAI computes the interval as ``int(patch * (1 - overlap))``. The textbook value
    ``1 - stride / patch`` is used when that truncates to the stride; otherwise (floating point put
    the product just below the stride) the overlap aiming at ``stride + 0.5`` is used, which truncates
    to the stride whatever the rounding.

    Args:
        patch_size: window size per axis.
        stride: window step per axis, ``1 <= stride <= patch``.

    Returns:
        The overlap per axis, each in ``[0, 1)``.

    Raises:
        ConfigError: a stride outside ``1 .. patch``.
    """
    out = []
    for p, s in zip(patch_size, stride):
        if not 1 <= s <= p:
            raise ConfigError(
                f"stride: {s} must be between 1 and the patch size {p} (MONAI cannot leave gaps)"
            )
        overlap = 1.0 - s / p
        if int(p * (1.0 - overlap)) != s:
            overlap = (p - s - 0.5) / p
        out.append(overlap)
    return tuple(out)


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Window starts of the classic loop on one axis of an already padded size (``size >= patch``)."""
    n = math.ceil((size - patch) / stride) + 1
    return [min(stride * i, size - patch) for i in range(n)]


def _check_probs(out: torch.Tensor, num_classes: int) -> None:
    if out.shape[1] != num_classes:
        raise ValueError(f"predict_fn returned {out.shape[1]} channels, expected num_classes={num_classes}")


@torch.no_grad()
def sliding_window_predict(
    predict_fn: PredictFn,
    image: torch.Tensor,
    patch_size: int | Sequence[int],
    stride: int | Sequence[int],
    num_classes: int,
    sw_batch_size: int = 4,
) -> torch.Tensor:
    """Averaged softmax probabilities over overlapping windows, with MONAI's sliding window.

    Reproduces :func:`reference_sliding_window` (the classic UA-MT loop) window for window; see the
    module docstring for why the overlap is not simply ``1 - stride / patch``.

    Args:
        predict_fn: ``(N, C, *patch) -> (N, num_classes, *patch)`` probabilities.
        image: ``(B, C, *spatial)``, usually ``(1, C, D, H, W)``; the output lives on its device.
        patch_size: window size per axis (or one int for all).
        stride: window step per axis, ``1 <= stride <= patch``.
        num_classes: channels ``predict_fn`` returns.
        sw_batch_size: windows per ``predict_fn`` call.

    Returns:
        ``(B, num_classes, *spatial)`` float probabilities. Axes smaller than the patch are
        zero-padded (half before, the rest after) for prediction and cropped back.

    Raises:
        ConfigError: patch or stride do not fit the image's axes or each other.
        ValueError: ``predict_fn`` returned the wrong number of channels.
    """
    from monai.inferers import sliding_window_inference  # heavy import, only when used

    ndim = image.ndim - 2
    patch = _per_axis(patch_size, ndim, "patch_size")
    step = _per_axis(stride, ndim, "stride")
    out = sliding_window_inference(
        inputs=image,
        roi_size=patch,
        sw_batch_size=sw_batch_size,
        predictor=predict_fn,
        overlap=monai_overlap(patch, step),
        mode="constant",
        padding_mode="constant",
        cval=0.0,
    )
    out = torch.as_tensor(out)  # MetaTensor -> plain tensor when MONAI wraps it
    if hasattr(out, "as_tensor"):
        out = out.as_tensor()
    _check_probs(out, num_classes)
    return out


@torch.no_grad()
def reference_sliding_window(
    predict_fn: PredictFn,
    image: torch.Tensor,
    patch_size: int | Sequence[int],
    stride: int | Sequence[int],
    num_classes: int,
) -> torch.Tensor:
    """The classic sliding-window loop of the field's reference code, one window at a time.

    The protocol, written out: (1) zero-pad each axis smaller than the patch to the patch size,
    ``pad // 2`` before and the rest after; (2) on each axis put windows at
    ``min(stride * i, size - patch)`` for ``i in range(ceil((size - patch) / stride) + 1)`` (the last
    window is pulled back to end at the border); (3) sum the softmax of every window and divide by
    the number of windows covering each voxel; (4) crop the padding. Slow but obvious; the tests
    check :func:`sliding_window_predict` against it.

    Args:
        predict_fn: ``(N, C, *patch) -> (N, num_classes, *patch)`` probabilities.
        image: ``(B, C, *spatial)``.
        patch_size: window size per axis (or one int).
        stride: window step per axis (or one int).
        num_classes: channels ``predict_fn`` returns.

    Returns:
        ``(B, num_classes, *spatial)`` averaged probabilities.
    """
    ndim = image.ndim - 2
    patch = _per_axis(patch_size, ndim, "patch_size")
    step = _per_axis(stride, ndim, "stride")
    size = image.shape[2:]
    before = [max(p - s, 0) // 2 for p, s in zip(patch, size)]
    after = [max(p - s, 0) - b for p, s, b in zip(patch, size, before)]
    pad = [v for b, a in zip(reversed(before), reversed(after)) for v in (b, a)]  # F.pad: last axis first
    padded = F.pad(image, pad, mode="constant", value=0.0) if any(pad) else image
    psize = padded.shape[2:]

    score = torch.zeros((image.shape[0], num_classes, *psize), dtype=torch.float32, device=image.device)
    count = torch.zeros(psize, dtype=torch.float32, device=image.device)
    starts = [window_starts(n, p, s) for n, p, s in zip(psize, patch, step)]
    for corner in itertools.product(*starts):
        win = tuple(slice(c, c + p) for c, p in zip(corner, patch))
        probs = predict_fn(padded[(slice(None), slice(None), *win)])
        _check_probs(probs, num_classes)
        score[(slice(None), slice(None), *win)] += probs.float()
        count[win] += 1.0
    score /= count
    crop = tuple(slice(b, b + n) for b, n in zip(before, size))
    return score[(slice(None), slice(None), *crop)]


def _resize(x: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    align = False if mode in ("bilinear", "bicubic", "trilinear") else None
    return F.interpolate(x, size=tuple(int(s) for s in size), mode=mode, align_corners=align)


@torch.no_grad()
def slicewise_predict(
    predict_fn: PredictFn,
    volume: torch.Tensor,
    train_size: Sequence[int],
    num_classes: int,
    batch_size: int = 16,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """A 2D model on a volume, slice by slice along the first spatial axis (ACDC).

    Each slice is resized to ``train_size`` (the size the model was trained at, never a default),
    predicted, and its probabilities resized back to ``(H, W)`` bilinearly; the caller takes the
    argmax. (SSL4MIS resizes the argmax with nearest neighbour instead; resizing probabilities gives
    smoother borders and the same labels where classes are unambiguous.)

    Args:
        predict_fn: ``(N, C, h, w) -> (N, num_classes, h, w)`` probabilities.
        volume: ``(C, S, H, W)``.
        train_size: ``(h, w)`` the model was trained at.
        num_classes: channels ``predict_fn`` returns.
        batch_size: slices per ``predict_fn`` call.
        interpolation: mode used to resize the image slices (``torch.nn.functional.interpolate``).

    Returns:
        ``(num_classes, S, H, W)`` probabilities on ``volume``'s device.
    """
    if volume.ndim != 4:
        raise ValueError(f"slicewise_predict expects (C, S, H, W), got shape {tuple(volume.shape)}")
    train_size = _per_axis(train_size, 2, "train_size")
    _, depth, h, w = volume.shape
    slices = volume.permute(1, 0, 2, 3)  # (S, C, H, W): slices become the batch
    out = torch.empty((num_classes, depth, h, w), dtype=torch.float32, device=volume.device)
    for i in range(0, depth, batch_size):
        x = _resize(slices[i : i + batch_size].float(), train_size, interpolation)
        probs = predict_fn(x)
        _check_probs(probs, num_classes)
        probs = _resize(probs.float(), (h, w), "bilinear")
        out[:, i : i + batch_size] = probs.to(out.device).permute(1, 0, 2, 3)
    return out


@torch.no_grad()
def whole_image_predict(
    predict_fn: PredictFn,
    image: torch.Tensor,
    train_size: Sequence[int],
    num_classes: int,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """A 2D model on one 2D image ``(C, H, W)``: resize to ``train_size``, predict, resize back.

    Returns:
        ``(num_classes, H, W)`` probabilities.
    """
    if image.ndim != 3:
        raise ValueError(f"whole_image_predict expects (C, H, W), got shape {tuple(image.shape)}")
    train_size = _per_axis(train_size, 2, "train_size")
    x = _resize(image[None].float(), train_size, interpolation)
    probs = predict_fn(x)
    _check_probs(probs, num_classes)
    return _resize(probs.float(), image.shape[1:], "bilinear")[0]


def predict_case(
    predict_fn: PredictFn,
    image: np.ndarray,
    mode: str | InferenceMode,
    num_classes: int,
    patch_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    train_size: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    sw_batch_size: int = 4,
) -> np.ndarray:
    """Class probabilities of one case, on the image's own grid.

    Args:
        predict_fn: ``(N, C, *patch) -> (N, num_classes, *patch)`` probabilities.
        image: ``(C, *spatial)`` float array, intensity-normalised like the training data.
        mode: ``"sliding_window"`` (needs ``patch_size``, ``stride``; 3D or any N-D image),
            ``"slicewise"`` (needs ``train_size``; ``(C, S, H, W)``) or ``"whole"`` (needs
            ``train_size``; ``(C, H, W)``).
        num_classes: channels ``predict_fn`` returns.
        patch_size: sliding-window size (the training patch).
        stride: sliding-window step per axis.
        train_size: 2D size the model was trained at.
        device: where the image tensor is put before ``predict_fn`` sees it.
        sw_batch_size: windows per call in sliding-window mode.

    Returns:
        ``(num_classes, *spatial)`` float32 numpy array.

    Raises:
        ConfigError: unknown mode, or a size the mode needs is missing.
        ValueError: the image's dimensions do not fit the mode.
    """
    try:
        mode = InferenceMode(mode)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in InferenceMode)
        raise ConfigError(f"inference mode: unknown value {mode!r} (choose one of {choices})") from None
    x = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32).to(device)
    if mode is InferenceMode.SLIDING_WINDOW:
        if patch_size is None or stride is None:
            raise ConfigError("sliding_window inference needs patch_size and stride")
        probs = sliding_window_predict(predict_fn, x[None], patch_size, stride, num_classes, sw_batch_size)[0]
    elif mode is InferenceMode.SLICEWISE:
        if train_size is None:
            raise ConfigError("slicewise inference needs train_size (the 2D training size)")
        probs = slicewise_predict(predict_fn, x, train_size, num_classes)
    else:
        if train_size is None:
            raise ConfigError("whole-image inference needs train_size (the 2D training size)")
        probs = whole_image_predict(predict_fn, x, train_size, num_classes)
    return probs.detach().float().cpu().numpy()


def keep_largest_component(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Keep only the largest connected component of every foreground class.

    Args:
        mask: label map (integer class ids, 0 = background) or a boolean mask.
        connectivity: neighbourhood of ``scipy.ndimage.generate_binary_structure`` (1 = faces).

    Returns:
        A copy of ``mask`` where every other component of each class is set to background. When two
        components tie for largest, the first in scan order is kept.
    """
    mask = np.asarray(mask)
    out = mask.copy()
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    classes = [True] if mask.dtype == bool else [c for c in np.unique(mask) if c != 0]
    for c in classes:
        labels, n = ndimage.label(mask == c, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        out[(labels != 0) & (labels != int(np.argmax(sizes)))] = 0
    return out
