"""A dataset's fingerprint: what ``semidiff plan`` measures before it chooses a configuration.

Like nnU-Net's fingerprint extraction, every case is read once (labeled, unlabeled), with the
reader's on-load normalisation off so that the raw intensities are measured:

- 2D or 3D, channel names, class names;
- shapes (median per axis) and voxel spacings (median, anisotropy);
- intensity statistics per channel from a seeded sample of voxels of every case (percentiles,
  mean, standard deviation, whether the values are 8-bit integers);
- the number of labeled, unlabeled and test cases, and which labeled cases lack which class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semidiff.data.nnunet import NnUNetReader

__all__ = ["ChannelStats", "Fingerprint", "fingerprint_dataset"]

#: Voxels sampled per case and channel for the intensity statistics (bounded memory on large data).
SAMPLES_PER_CASE = 10_000


@dataclass(frozen=True)
class ChannelStats:
    """Intensity statistics of one input channel over the sampled voxels of every case."""

    name: str
    minimum: float
    maximum: float
    mean: float
    std: float
    p00_5: float
    p99_5: float
    eight_bit: bool  # every value an integer in 0..255 (8-bit PNG/JPEG, uint8 volumes)

    @property
    def core_share(self) -> float:
        """Share of the [min, max] range that the central 99% of the voxels span (1: no outliers)."""
        span = self.maximum - self.minimum
        return (self.p99_5 - self.p00_5) / span if span > 0 else 1.0


@dataclass
class Fingerprint:
    """What :func:`fingerprint_dataset` measured (see the module docstring)."""

    root: str
    spatial_dims: int
    channel_names: list[str]
    class_names: list[str]
    file_ending: str
    labeled_ids: list[str]
    unlabeled: int
    test: int
    shapes: list[tuple[int, ...]]
    spacings: list[tuple[float, ...]]
    channels: list[ChannelStats]
    #: class id -> labeled case ids whose label map lacks it
    missing: dict[int, list[str]] = field(default_factory=dict)
    #: bytes all cases take as float32 in memory (the training cache)
    cache_bytes: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)

    @property
    def labeled(self) -> int:
        return len(self.labeled_ids)

    @property
    def median_shape(self) -> tuple[int, ...]:
        return tuple(round(float(v)) for v in np.median(np.array(self.shapes), axis=0))

    @property
    def median_spacing(self) -> tuple[float, ...] | None:
        if not self.spacings:
            return None
        return tuple(float(v) for v in np.median(np.array(self.spacings), axis=0))

    @property
    def anisotropy(self) -> float:
        """Largest over smallest axis of the median spacing (1 when isotropic or unknown)."""
        sp = self.median_spacing
        return max(sp) / min(sp) if sp and min(sp) > 0 else 1.0

    def summary(self) -> list[str]:
        """Lines for the printed plan."""
        shapes = np.array(self.shapes)
        sp = self.median_spacing
        lines = [
            f"dataset: {self.root}",
            (f"  {self.spatial_dims}D, {self.in_channels} channel(s) {self.channel_names}, "
             f"{self.num_classes} classes {self.class_names}, files {self.file_ending}"),
            f"  cases: {self.labeled} labeled, {self.unlabeled} unlabeled, {self.test} test",
            (f"  shape: median {'x'.join(map(str, self.median_shape))} "
             f"(min {'x'.join(map(str, shapes.min(0)))}, max {'x'.join(map(str, shapes.max(0)))})"),
            f"  spacing: {'median ' + 'x'.join(f'{v:g}' for v in sp) if sp else 'none stored'}"
            + (f", anisotropy {self.anisotropy:.1f}" if sp else ""),
        ]
        for c in self.channels:
            lines.append(f"  intensity {c.name}: {c.minimum:g}..{c.maximum:g}, 0.5-99.5% {c.p00_5:g}..{c.p99_5:g}, "
                         f"mean {c.mean:.4g}, std {c.std:.4g}" + (", 8-bit" if c.eight_bit else ""))
        return lines


def fingerprint_dataset(root: str | Path, colour_to_grey: bool = False, seed: int = 0) -> Fingerprint:
    """Read every case of an nnU-Net-layout dataset once and measure it.

    Args:
        root: the dataset folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``, optional
            ``imagesUnlabeled/`` and ``imagesTs/``).
        colour_to_grey: the reader option, for a one-channel dataset of colour images.
        seed: seed of the voxel sample.

    Raises:
        DataError: naming the file, anything the reader refuses (see ``semidiff data inspect``).
    """
    reader = NnUNetReader(root, normalize="none", val_fraction=0.0, colour_to_grey=colour_to_grey)
    labeled = reader.cases("train") + (reader.cases("val") if "val" in reader.splits() else [])  # a folds file's val too
    unlabeled = reader.unlabeled_cases("train")
    test = reader.cases("test") if "test" in reader.splits() else []
    rng = np.random.default_rng(seed)
    shapes: list[tuple[int, ...]] = []
    spacings: list[tuple[float, ...]] = []
    samples: list[np.ndarray] = []
    missing: dict[int, list[str]] = {c: [] for c in range(reader.num_classes)}
    cache = 0
    for ref in labeled + unlabeled:
        case = reader.load(ref)
        image = case.image.reshape(case.image.shape[0], -1)
        shapes.append(case.spatial_shape)
        cache += image.size * 4
        if case.spacing:
            spacings.append(tuple(float(s) for s in case.spacing))
        take = rng.choice(image.shape[1], size=min(SAMPLES_PER_CASE, image.shape[1]), replace=False)
        samples.append(image[:, take])
        if case.label is not None:
            present = np.bincount(case.label.ravel().astype(np.int64), minlength=reader.num_classes)
            for c in range(reader.num_classes):
                if present[c] == 0:
                    missing[c].append(case.case_id)
    values = np.concatenate(samples, axis=1).astype(np.float64)
    stats = []
    for c, name in enumerate(reader.channel_names):
        v = values[c]
        p_lo, p_hi = np.percentile(v, [0.5, 99.5])
        stats.append(ChannelStats(name, float(v.min()), float(v.max()), float(v.mean()), float(v.std()),
                                  float(p_lo), float(p_hi),
                                  bool(v.min() >= 0 and v.max() <= 255 and np.array_equal(v, np.round(v)))))
    return Fingerprint(
        root=str(Path(root).resolve()), spatial_dims=reader.spatial_dims, channel_names=list(reader.channel_names),
        class_names=list(reader.class_names), file_ending=reader.file_ending,
        labeled_ids=[r.case_id for r in labeled], unlabeled=len(unlabeled), test=len(test),
        shapes=shapes, spacings=spacings, channels=stats,
        missing={c: ids for c, ids in missing.items() if ids}, cache_bytes=cache)
