"""Controlled label noise for the noise-robustness benchmark (methods.md section 2, issue 5).

Four generators corrupt integer label maps in a controlled, reproducible way:

- :func:`flip_classes`: every pixel is chosen independently with probability ``rate`` and a
  chosen pixel gets a class drawn uniformly among the *other* ``num_classes - 1`` classes, so the
  measured flip rate is ``rate`` up to sampling error and no chosen pixel keeps its class.
- :func:`erode_classes`: every pixel of a foreground class whose Euclidean distance to the nearest
  pixel of another class (background included) is at most ``k`` becomes background, i.e. each
  foreground object shrinks by ``k`` pixels (a disc of radius ``R`` becomes one of radius
  ``R - k``). The image border is not a boundary: objects touching it are not eroded from it.
- :func:`dilate_classes`: every background pixel within Euclidean distance ``k`` of a foreground
  pixel takes the class of the nearest foreground pixel (a disc of radius ``R`` becomes one of
  radius ``R + k``). Foreground pixels never change, so touching classes do not eat each other.
- :func:`drop_components`: each connected component (scipy's default connectivity: faces only) of
  each foreground class becomes background with probability ``rate``.

:func:`apply_noise` dispatches on a spec with ``kind``, ``rate`` and ``k`` (the ``noise`` config
section, :class:`semidiff.config.NoiseConfig`).

Shapes and types: a label map is a torch tensor or a numpy array of integers. The last
``spatial_dims`` axes are spatial and every leading axis (batch, channel) is looped over, so
``(H, W)``, ``(B, 1, H, W)``, ``(D, H, W)`` and ``(B, 1, D, H, W)`` all work; ``spatial_dims=None``
means that every axis is spatial (one map with no batch or channel axis). The output has the
input's type, shape, dtype and (for tensors) device; the input is never modified. Distances are
in voxels of the array's own grid (no spacing).

Randomness: every generator draws only from the ``torch.Generator`` it is given (or one seeded
from an int), never from torch's, numpy's or Python's global RNG, so the same seed gives the same
pixels and calling the noise does not shift the random stream of the training code around it.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from semidiff.data.record import IGNORE_INDEX

if TYPE_CHECKING:
    from semidiff.config import NoiseConfig

__all__ = [
    "KINDS",
    "LabeledMaskNoise",
    "NoiseSpecLike",
    "apply_noise",
    "case_seed",
    "describe_noise",
    "dilate_classes",
    "drop_components",
    "erode_classes",
    "flip_classes",
    "make_generator",
    "select_noisy_cases",
]

#: The noise kinds, as named in the config's ``noise.kind``.
KINDS = ("flip", "erode", "dilate", "drop")

LabelMap = TypeVar("LabelMap", Tensor, np.ndarray)


class NoiseSpecLike(Protocol):
    """What :func:`apply_noise` reads from a spec (the ``noise`` config section has it)."""

    kind: str
    rate: float
    k: int


def make_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU ``torch.Generator``: the one given, or a new one seeded with ``seed`` (0 for None)."""
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator()
    gen.manual_seed(int(seed or 0) % (2**63))
    return gen


def case_seed(seed: int, case_id: str) -> int:
    """A stable per-case seed from a run's noise seed and a case id (CRC32, not Python's ``hash``,
    which changes between interpreter runs)."""
    return (int(seed) * 1_000_003 + zlib.crc32(case_id.encode("utf-8"))) % (2**63)


# ---- conversions --------------------------------------------------------------------------------
def _to_numpy(labels: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(labels, Tensor):
        return labels.detach().cpu().numpy()
    return np.asarray(labels)


def _like(result: np.ndarray, labels: LabelMap) -> LabelMap:
    """``result`` converted back to the type, dtype and device of ``labels``."""
    if isinstance(labels, Tensor):
        return torch.from_numpy(np.ascontiguousarray(result)).to(device=labels.device, dtype=labels.dtype)
    return result.astype(labels.dtype, copy=False)


def _maps(arr: np.ndarray, spatial_dims: int | None) -> np.ndarray:
    """``arr`` viewed as ``(N, *spatial)``: one map per combination of leading (batch, channel) axes."""
    dims = arr.ndim if spatial_dims is None else int(spatial_dims)
    if dims < 1 or dims > arr.ndim:
        raise ValueError(f"spatial_dims={spatial_dims} does not fit a label map of shape {arr.shape}")
    return arr.reshape((-1, *arr.shape[arr.ndim - dims:]))


def _check_rate(rate: float, what: str) -> float:
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {rate}")
    return rate


def _check_k(k: int) -> int:
    if int(k) != k or k < 0:
        raise ValueError(f"k must be a whole number of pixels >= 0, got {k}")
    return int(k)


# ---- generators ---------------------------------------------------------------------------------
def flip_classes(labels: LabelMap, rate: float, num_classes: int,
                 generator: torch.Generator | int | None = None) -> LabelMap:
    """Random class flips: each pixel is chosen with probability ``rate`` and a chosen pixel gets a
    class drawn uniformly from the ``num_classes - 1`` classes other than its own.

    Args:
        labels: Integer label map (any shape; pointwise, so no spatial axes are needed), values in
            ``[0, num_classes)``.
        rate: Probability that a pixel is flipped, in [0, 1].
        num_classes: Number of classes, background included (>= 2).
        generator: A ``torch.Generator`` or a seed.

    Returns:
        The corrupted map (same type, shape, dtype, device).
    """
    rate = _check_rate(rate, "flip rate")
    if num_classes < 2:
        raise ValueError(f"flipping needs at least 2 classes, got {num_classes}")
    gen = make_generator(generator)
    arr = _to_numpy(labels)
    if rate == 0.0 or arr.size == 0:
        return _like(arr.copy(), labels)
    if arr.min() < 0 or arr.max() >= num_classes:
        # An ignore value (e.g. 255) would wrap onto a real class: keep masks separate instead.
        raise ValueError(f"flip needs labels in [0, {num_classes}), got values {arr.min()}..{arr.max()}")
    base = torch.from_numpy(arr.astype(np.int64))
    chosen = torch.rand(base.shape, generator=gen) < rate
    # An offset in 1..C-1 (mod C) reaches every other class exactly once: uniform, never the same.
    offset = torch.randint(1, num_classes, base.shape, generator=gen)
    out = torch.where(chosen, (base + offset) % num_classes, base)
    return _like(out.numpy(), labels)


def erode_classes(labels: LabelMap, k: int, spatial_dims: int | None = None) -> LabelMap:
    """Shrink every foreground object by ``k`` pixels (Euclidean), the freed pixels becoming 0.

    A pixel of foreground class ``c`` is removed when its Euclidean distance to the nearest pixel
    that is not ``c`` is ``<= k`` (the boundary pixels are at distance 1). Deterministic.

    Args:
        labels: Integer label map; class 0 is background.
        k: Erosion depth in pixels (0: unchanged).
        spatial_dims: Number of trailing spatial axes (None: all axes).
    """
    k = _check_k(k)
    arr = _to_numpy(labels)
    maps = _maps(arr, spatial_dims)
    out = maps.copy()
    if k > 0:
        for i, item in enumerate(maps):
            for c in np.unique(item):
                if c == 0:
                    continue
                inside = item == c
                if inside.all():  # no boundary anywhere: the distance transform is undefined
                    continue
                depth = ndimage.distance_transform_edt(inside)
                out[i][inside & (depth <= k)] = 0
    return _like(out.reshape(arr.shape), labels)


def dilate_classes(labels: LabelMap, k: int, spatial_dims: int | None = None) -> LabelMap:
    """Grow every foreground object by ``k`` pixels (Euclidean) into the background.

    A background pixel within Euclidean distance ``k`` of a foreground pixel takes the class of the
    nearest one (ties as scipy's distance transform resolves them). Foreground never changes.

    Args:
        labels: Integer label map; class 0 is background.
        k: Dilation in pixels (0: unchanged).
        spatial_dims: Number of trailing spatial axes (None: all axes).
    """
    k = _check_k(k)
    arr = _to_numpy(labels)
    maps = _maps(arr, spatial_dims)
    out = maps.copy()
    if k > 0:
        for i, item in enumerate(maps):
            background = item == 0
            if background.all() or not background.any():
                continue
            # One transform for all classes: distance from each background pixel to the nearest
            # foreground pixel, and where that pixel is (its class is the one that grows there).
            dist, nearest = ndimage.distance_transform_edt(background, return_indices=True)
            grow = background & (dist <= k)
            out[i][grow] = item[tuple(ax[grow] for ax in nearest)]
    return _like(out.reshape(arr.shape), labels)


def drop_components(labels: LabelMap, rate: float, spatial_dims: int | None = None,
                    generator: torch.Generator | int | None = None) -> LabelMap:
    """Set each connected component of each foreground class to background with probability ``rate``.

    Components are found per class with ``scipy.ndimage.label`` (face connectivity); one uniform
    draw per component, in the order map, class, component label.

    Args:
        labels: Integer label map; class 0 is background.
        rate: Probability that a component is dropped, in [0, 1].
        spatial_dims: Number of trailing spatial axes (None: all axes).
        generator: A ``torch.Generator`` or a seed.
    """
    rate = _check_rate(rate, "drop rate")
    gen = make_generator(generator)
    arr = _to_numpy(labels)
    maps = _maps(arr, spatial_dims)
    out = maps.copy()
    if rate > 0.0:
        for i, item in enumerate(maps):
            for c in np.unique(item):
                if c == 0:
                    continue
                components, count = ndimage.label(item == c)
                if count == 0:
                    continue
                dropped = (torch.rand(count, generator=gen) < rate).numpy()
                # Index 0 of the lookup is "not this class": never dropped.
                out[i][np.concatenate([[False], dropped])[components]] = 0
    return _like(out.reshape(arr.shape), labels)


def apply_noise(spec: NoiseSpecLike, labels: LabelMap, num_classes: int, spatial_dims: int | None = None,
                generator: torch.Generator | int | None = None) -> LabelMap:
    """Corrupt ``labels`` as ``spec`` says (``kind``: flip | erode | dilate | drop; ``rate``; ``k``).

    Args:
        spec: The ``noise`` config section or anything with ``kind``, ``rate`` and ``k``.
        labels: Integer label map(s); see the module docstring for shapes.
        num_classes: Number of classes, background included (used by ``flip``).
        spatial_dims: Number of trailing spatial axes (None: all axes).
        generator: A ``torch.Generator`` or a seed (``erode`` and ``dilate`` draw nothing).

    Returns:
        The corrupted map, same type, shape, dtype and device.
    """
    if spec.kind == "flip":
        return flip_classes(labels, spec.rate, num_classes, generator)
    if spec.kind == "erode":
        return erode_classes(labels, spec.k, spatial_dims)
    if spec.kind == "dilate":
        return dilate_classes(labels, spec.k, spatial_dims)
    if spec.kind == "drop":
        return drop_components(labels, spec.rate, spatial_dims, generator)
    raise ValueError(f"unknown noise kind {spec.kind!r}; known: {', '.join(KINDS)}")


def describe_noise(spec: Any) -> str:
    """One line for protocol headers, e.g. ``"pseudo-labels: flip rate 0.2 (noise seed 0)"``."""
    if spec is None or getattr(spec, "target", "none") == "none":
        return "none"
    level = f"k={spec.k} px" if spec.kind in ("erode", "dilate") else f"rate {spec.rate:g}"
    if spec.target == "labeled":
        where = f"labeled masks ({spec.labeled_share:.0%} of labeled cases)"
    else:
        where = "pseudo-labels"
    return f"{where}: {spec.kind} {level} (noise seed {spec.seed})"


# ---- labeled-mask corruption --------------------------------------------------------------------
def select_noisy_cases(case_ids: Sequence[str], share: float, seed: int) -> list[str]:
    """The labeled cases whose masks are corrupted: ``round(share * N)`` of them (halves round up),
    chosen by a seeded random permutation, returned in their original order."""
    share = _check_rate(share, "labeled_share")
    count = int(np.floor(share * len(case_ids) + 0.5))
    order = torch.randperm(len(case_ids), generator=make_generator(seed)).tolist()
    keep = set(order[:count])
    return [cid for i, cid in enumerate(case_ids) if i in keep]


class LabeledMaskNoise:
    """Corrupts the masks of a fixed, seeded share of the labeled cases (``noise.target: labeled``).

    Which cases are corrupted depends only on the labeled case ids, ``labeled_share`` and the noise
    seed; the pixels of one case only on the noise seed and the case id (:func:`case_seed`). So the
    same pixels are corrupted in every epoch, in every data-loader worker and after a resume.

    Args:
        spec: The ``noise`` section (``kind``, ``rate``, ``k``, ``labeled_share``, ``seed``).
        labeled_ids: Ids of the labeled cases.
        num_classes: Number of classes, background included.
    """

    def __init__(self, spec: NoiseConfig, labeled_ids: Sequence[str], num_classes: int) -> None:
        self.spec = spec
        self.num_classes = num_classes
        self.noisy_ids = select_noisy_cases(list(labeled_ids), spec.labeled_share, spec.seed)
        self._noisy = set(self.noisy_ids)

    def __call__(self, case_id: str, label: np.ndarray) -> np.ndarray:
        """The case's label map, corrupted if the case is one of ``noisy_ids`` (a new array)."""
        if case_id not in self._noisy:
            return label
        # Not-annotated pixels (255) are no class to corrupt: noise acts on the rest, they stay ignored.
        ignored = label == IGNORE_INDEX
        noisy = apply_noise(self.spec, np.where(ignored, 0, label).astype(label.dtype), self.num_classes,
                            spatial_dims=None, generator=case_seed(self.spec.seed, case_id))
        return np.where(ignored, label, noisy).astype(label.dtype) if ignored.any() else noisy
