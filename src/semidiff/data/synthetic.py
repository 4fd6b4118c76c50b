"""A small synthetic segmentation dataset, written in the H5 case-list layout.

It exists so that training, evaluation and the command line can be exercised end to end in
seconds without the real data. Each case holds a blob-like "organ", a ring-like structure
(myocardium-like wall around a cavity), a thin branching vessel-like tree and, for more than
four classes, small extra blobs. Class intensities overlap and the image carries texture,
blur, a smooth multiplicative bias field and Gaussian noise, so that shape and context matter:
learnable by a small U-Net in a few hundred steps, but not by thresholding.

Layout written by :func:`make_synthetic_dataset`::

    <root>/cases/<id>.h5    image float32 (H, W) or (D, H, W), label uint8 of the same shape
    <root>/train.list       the first num_cases - val_cases ids
    <root>/val.list         the last val_cases ids
    <root>/dataset.json     name, spatial_dims, num_classes, labels, path_pattern, ...
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

from semidiff.data.h5_caselist import H5CaseListReader
from semidiff.data.readers import register_reader
from semidiff.errors import ConfigError, DataError

__all__ = [
    "SYNTHETIC_PATH_PATTERN",
    "Appearance",
    "make_synthetic_dataset",
    "open_synthetic",
    "synthetic_case",
]

SYNTHETIC_PATH_PATTERN = "cases/{id}.h5"

# Foreground structures in class order; classes beyond these are small extra blobs.
_STRUCTURES = ("organ", "ring", "vessel")
# Mean intensity (before bias field and z-scoring) per structure; chosen to overlap once
# texture, bias and noise are added.
_MEANS = {"background": 1.0, "cavity": 1.3, "organ": 1.8, "ring": 0.55, "vessel": 2.3}
# Reference edge length at which the vessel radii below are in voxels.
_REF_SIZE = {2: 96, 3: 48}
_VESSEL_RADII = {2: (1.5, 1.0, 1.0, 1.0), 3: (1.5, 1.0, 1.0, 1.0)}


@dataclass(frozen=True)
class Appearance:
    """How one synthetic case looks: the imaging model's strengths and the structures' sizes.

    The defaults are the generator's own; :func:`synthetic_case` with ``Appearance()`` makes the
    same case from the same generator state as without one. The demo dataset
    (:mod:`semidiff.data.demo_data`) draws these per case to make a clean labeled regime and a
    varied unlabeled / validation regime.

    Attributes:
        contrast: factor on every structure's mean intensity difference to the background.
        texture: std of the smooth texture added before blurring.
        blur: Gaussian blur sigma in voxels at the reference size (partial volume).
        bias: std of the log of the smooth multiplicative bias field.
        noise: std of the additive Gaussian noise (before z-scoring).
        size: factor on the organ's and the ring's radii.
    """

    contrast: float = 1.0
    texture: float = 0.2
    blur: float = 0.7
    bias: float = 0.25
    noise: float = 0.25
    size: float = 1.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not np.isfinite(value) or value < 0 or (name in ("contrast", "size") and value == 0):
                raise ConfigError(f"synthetic appearance: {name} must be finite and "
                                  f"{'positive' if name in ('contrast', 'size') else 'non-negative'}, got {value}")


def _class_names(num_classes: int) -> list[str]:
    """Names of classes 0..num_classes-1."""
    names = ["background", *_STRUCTURES[: num_classes - 1]]
    names += [f"nodule{k}" for k in range(1, num_classes - len(names) + 1)]
    return names


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Smooth random field of unit std: coarse Gaussian noise, upsampled and lightly blurred.

    Linear upsampling of a coarse grid plus a short blur is much faster than blurring
    full-size noise with a wide kernel (or cubic-spline zooming in 3D).
    """
    coarse = rng.standard_normal((cells,) * len(shape))
    field = ndimage.zoom(coarse, [s / cells for s in shape], order=1, mode="nearest", grid_mode=True)
    field = field[tuple(slice(0, s) for s in shape)]
    field = ndimage.gaussian_filter(field, [0.35 * s / cells for s in shape], truncate=2.0)
    return (field - field.mean()) / (field.std() + 1e-8)


def _rotation(rng: np.random.Generator, dims: int) -> np.ndarray:
    """Random rotation matrix (dims x dims)."""
    if dims == 2:
        a = rng.uniform(0, np.pi)
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _vessel_tree(
    rng: np.random.Generator, shape: tuple[int, ...], radii: Sequence[float]
) -> np.ndarray:
    """Rasterise a random branching tree of curved, tapering segments into a boolean mask."""
    dims = len(shape)
    size = np.array(shape, dtype=float)
    lo_edge = min(shape)
    # (point, radius) pairs along all centrelines.
    points: list[list[np.ndarray]] = [[] for _ in radii]

    def grow(start: np.ndarray, direction: np.ndarray, depth: int) -> None:
        length = rng.uniform(0.15, 0.28) * lo_edge * (0.75**depth)
        pos, d = start.copy(), direction / np.linalg.norm(direction)
        step = 0.6  # below one voxel so the rasterised line has no gaps
        for _ in range(int(length / step)):
            # Smoothly bending path: small random turn at every step, and a pull towards
            # the centre near the border so that branches stay in the field of view.
            d = d + rng.normal(0.0, 0.06, dims)
            if np.any(pos < margin) or np.any(pos > size - 1 - margin):
                d = d + 0.1 * (centre - pos) / (np.linalg.norm(centre - pos) + 1e-8)
            d /= np.linalg.norm(d)
            pos = pos + step * d
            if np.any(pos < 1) or np.any(pos > size - 2):
                return
            points[depth].append(pos)
        if depth + 1 < len(radii):
            for sign in (-1.0, 1.0):
                # Child direction: parent's turned by 25..50 degrees in a random plane.
                ortho = rng.standard_normal(dims)
                ortho -= ortho.dot(d) * d
                ortho /= np.linalg.norm(ortho) + 1e-8
                angle = rng.uniform(np.deg2rad(25), np.deg2rad(50))
                grow(pos, np.cos(angle) * d + sign * np.sin(angle) * ortho, depth + 1)

    centre = (size - 1) / 2
    margin = 0.12 * lo_edge
    # Regrow the rare tree that leaves the image almost at once (at most a few tries).
    for _ in range(5):
        for pts in points:
            pts.clear()
        start = rng.uniform(0.3, 0.7, dims) * size
        grow(start, rng.standard_normal(dims), 0)
        if sum(len(p) for p in points) * 0.6 >= 0.6 * lo_edge:
            break

    mask = np.zeros(shape, dtype=bool)
    for pts, radius in zip(points, radii):
        if not pts:
            continue
        centres = np.rint(np.asarray(pts)).astype(np.int64)
        reach = int(np.ceil(radius))
        grid = np.stack(
            np.meshgrid(*[np.arange(-reach, reach + 1)] * dims, indexing="ij"), -1
        ).reshape(-1, dims)
        offsets = grid[np.linalg.norm(grid, axis=1) <= radius + 1e-6]
        idx = (centres[:, None, :] + offsets[None]).reshape(-1, dims)
        inside = np.all((idx >= 0) & (idx < np.array(shape)), axis=1)
        mask[tuple(idx[inside].T)] = True
    return mask


def synthetic_case(
    rng: np.random.Generator, size: Sequence[int], num_classes: int = 4, appearance: Appearance | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one synthetic image and its label map.

    Args:
        rng: source of randomness (the case is a pure function of its state).
        size: spatial shape, 2 or 3 axes.
        num_classes: classes including background, at least 2.
        appearance: imaging strengths and structure sizes; None is ``Appearance()``. It changes
            no random draw, only how the draws are scaled.

    Returns:
        ``(image, label)``: float32 z-scored image and uint8 label map, both of shape ``size``.
    """
    shape = tuple(int(s) for s in size)
    dims = len(shape)
    if dims not in (2, 3):
        raise ConfigError(f"synthetic size must have 2 or 3 axes, got {shape}")
    look = appearance or Appearance()
    edge = min(shape)
    coords = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    names = _class_names(num_classes)
    label = np.zeros(shape, dtype=np.uint8)
    background = _MEANS["background"]
    intensity = np.full(shape, background, dtype=np.float32)
    jitter = lambda: rng.normal(0.0, 0.1)

    def mean(value: float) -> float:
        # Contrast scales the difference to the background (the image is z-scored at the end);
        # at 1 the value is returned as is, so default cases stay bit-identical.
        return value if look.contrast == 1.0 else background + look.contrast * (value - background)

    def offset(centre: np.ndarray) -> np.ndarray:
        return coords - centre.reshape((dims,) + (1,) * dims)

    # Organ: a rotated ellipsoid with a smoothly perturbed boundary.
    organ_c = rng.uniform(0.3, 0.7, dims) * np.array(shape)
    organ_r = rng.uniform(0.12, 0.2, dims) * edge * look.size
    rot = _rotation(rng, dims)
    local = np.tensordot(rot, offset(organ_c), axes=1)
    q = np.sum((local / organ_r.reshape((dims,) + (1,) * dims)) ** 2, axis=0)
    organ = q + 0.3 * _smooth_field(rng, shape, 4) < 1.0
    label[organ] = 1
    intensity[organ] = mean(_MEANS["organ"] + jitter())

    placed = [(organ_c, float(organ_r.max()))]

    def free_centre(radius: float) -> np.ndarray:
        """A centre that keeps a structure of this radius inside and away from the others."""
        best, best_gap = None, -np.inf
        for _ in range(30):
            c = np.array([rng.uniform(radius + 2, s - radius - 2) for s in shape])
            gap = min(np.linalg.norm(c - pc) - pr - radius for pc, pr in placed)
            if gap > 2:
                return c
            if gap > best_gap:
                best, best_gap = c, gap
        return best

    if "ring" in names:
        # Ring: an elliptic wall of a few voxels around a slightly brighter cavity.
        r0 = rng.uniform(0.1, 0.15) * edge * look.size
        thick = max(2.0, rng.uniform(0.035, 0.06) * edge)
        ring_c = free_centre(r0 + thick)
        axes = rng.uniform(0.8, 1.2, dims).reshape((dims,) + (1,) * dims)
        dist = np.sqrt(np.sum((offset(ring_c) / axes) ** 2, axis=0))
        dist = dist + 0.6 * _smooth_field(rng, shape, 5)
        ring = np.abs(dist - r0) < thick / 2
        cavity = dist <= r0 - thick / 2
        intensity[cavity] = mean(_MEANS["cavity"] + jitter())
        label[ring] = names.index("ring")
        intensity[ring] = mean(_MEANS["ring"] + jitter())
        placed.append((ring_c, r0 + thick))

    for k, name in enumerate(names):
        if not name.startswith("nodule"):
            continue
        r = rng.uniform(0.05, 0.08) * edge
        c = free_centre(r)
        blob = np.sum(offset(c) ** 2, axis=0) < r**2
        label[blob] = k
        intensity[blob] = mean(1.2 + 0.35 * (k % 3) + jitter())
        placed.append((c, r))

    if "vessel" in names:
        # Painted last so that the thin structure is never hidden by the others.
        scale = edge / _REF_SIZE[dims]
        radii = [max(1.0, r * scale) for r in _VESSEL_RADII[dims]]
        vessel = _vessel_tree(rng, shape, radii)
        label[vessel] = names.index("vessel")
        intensity[vessel] = mean(_MEANS["vessel"] + jitter())

    # Imaging model: texture, blur (partial volume), smooth bias field, noise, z-score.
    image = intensity + look.texture * _smooth_field(rng, shape, 8)
    image = ndimage.gaussian_filter(image, sigma=look.blur * max(1.0, edge / _REF_SIZE[dims]))
    image = image * np.exp(look.bias * _smooth_field(rng, shape, 3))
    image = image + rng.normal(0.0, look.noise, shape)
    image = (image - image.mean()) / (image.std() + 1e-8)
    return image.astype(np.float32), label


def make_synthetic_dataset(
    root: str | Path,
    spatial_dims: int = 2,
    num_cases: int = 24,
    size: tuple[int, ...] | None = None,
    num_classes: int = 4,
    val_cases: int = 6,
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset in the H5 case-list layout, deterministically from ``seed``.

    Args:
        root: output folder (created; existing case files are overwritten).
        spatial_dims: 2 or 3.
        num_cases: total number of cases.
        size: spatial shape; default ``(96, 96)`` in 2D and ``(48, 48, 48)`` in 3D.
        num_classes: classes including background (1 organ, 2 ring, 3 vessel, then blobs).
        val_cases: the last ``val_cases`` ids go to ``val.list``, the others to ``train.list``.
        seed: case ``i`` is generated from ``numpy.random.default_rng([seed, i])``.

    Returns:
        ``root`` as a Path; read it with ``create_reader("synthetic", root)``.

    Raises:
        ConfigError: a bad argument.
    """
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if size is None:
        size = (96, 96) if spatial_dims == 2 else (48, 48, 48)
    size = tuple(int(s) for s in size)
    if len(size) != spatial_dims or min(size) < 16:
        raise ConfigError(f"size must have {spatial_dims} axes of at least 16, got {size}")
    if num_classes < 2 or num_classes > 255:
        raise ConfigError(f"num_classes must be in [2, 255], got {num_classes}")
    if not 0 <= val_cases < num_cases:
        raise ConfigError(
            f"need 0 <= val_cases < num_cases, got val_cases={val_cases}, num_cases={num_cases}"
        )

    root = Path(root)
    (root / "cases").mkdir(parents=True, exist_ok=True)
    ids = [f"case_{i:03d}" for i in range(num_cases)]
    for i, case_id in enumerate(ids):
        image, label = synthetic_case(np.random.default_rng([seed, i]), size, num_classes)
        with h5py.File(root / SYNTHETIC_PATH_PATTERN.format(id=case_id), "w") as f:
            f.create_dataset("image", data=image)
            f.create_dataset("label", data=label)

    n_train = num_cases - val_cases
    lists = {"train": "train.list"}
    (root / "train.list").write_text("\n".join(ids[:n_train]) + "\n")
    if val_cases:
        lists["val"] = "val.list"
        (root / "val.list").write_text("\n".join(ids[n_train:]) + "\n")
    elif (root / "val.list").exists():
        (root / "val.list").unlink()  # stale list from an earlier run with validation cases

    info = {
        "name": "synthetic",
        "spatial_dims": spatial_dims,
        "num_classes": num_classes,
        "labels": {name: k for k, name in enumerate(_class_names(num_classes))},
        "path_pattern": SYNTHETIC_PATH_PATTERN,
        "lists": lists,
        "size": list(size),
        "num_cases": num_cases,
        "val_cases": val_cases,
        "seed": seed,
    }
    (root / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return root


@register_reader("synthetic")
def open_synthetic(root: str | Path, **overrides) -> H5CaseListReader:
    """Reader for a folder written by :func:`make_synthetic_dataset`.

    ``spatial_dims``, ``num_classes``, ``path_pattern`` and ``lists`` come from
    ``dataset.json``; keyword arguments of :class:`H5CaseListReader` override them.

    Raises:
        DataError: the folder or its ``dataset.json`` is missing or unreadable.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset root folder is missing")
    info_path = root / "dataset.json"
    if not info_path.is_file():
        raise DataError(info_path, "missing: not a synthetic dataset folder (see make_synthetic_dataset)")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        kwargs = {
            "num_classes": int(info["num_classes"]),
            "spatial_dims": int(info["spatial_dims"]),
            "path_pattern": info.get("path_pattern", SYNTHETIC_PATH_PATTERN),
            "lists": info.get("lists", {"train": "train.list", "val": "val.list"}),
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(info_path, f"unreadable dataset description: {exc!r}") from exc
    kwargs.update(overrides)
    kwargs.setdefault("name", "synthetic")
    return H5CaseListReader(root, **kwargs)


def _synthetic_preprocessing(options: dict) -> dict:
    # synthetic_case z-scores every whole image before it is written.
    return H5CaseListReader.declared_preprocessing({"stored_normalize": "zscore", **options})


open_synthetic.declared_preprocessing = _synthetic_preprocessing
