"""Check a whole dataset before training on it: load every case, summarise, list problems."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semidiff.errors import DataError, SemidiffError

__all__ = ["inspect_dataset", "InspectReport", "SplitSummary"]


@dataclass
class SplitSummary:
    """What the cases of one split look like.

    Attributes:
        listed: cases in the split's list.
        loaded: cases that loaded and validated.
        shape_min: smallest image shape per axis (channel first), None if none loaded.
        shape_max: largest image shape per axis.
        label_values: label values seen over the split.
        spacings: distinct voxel spacings (None when the format stores none).
        groups: distinct groups (patients, or the cases themselves).
    """

    listed: int = 0
    loaded: int = 0
    shape_min: tuple[int, ...] | None = None
    shape_max: tuple[int, ...] | None = None
    label_values: set[int] = field(default_factory=set)
    spacings: set[tuple[float, ...] | None] = field(default_factory=set)
    groups: int = 0

    def add_shape(self, shape: tuple[int, ...]) -> None:
        """Widen the shape range by one image shape (shapes of another rank are skipped)."""
        if self.shape_min is None:
            self.shape_min = self.shape_max = shape
        elif len(shape) == len(self.shape_min):
            self.shape_min = tuple(min(a, b) for a, b in zip(self.shape_min, shape))
            self.shape_max = tuple(max(a, b) for a, b in zip(self.shape_max, shape))


@dataclass
class InspectReport:
    """Result of :func:`inspect_dataset`.

    Attributes:
        name: the reader's name.
        root: the dataset folder, when the reader has one.
        num_classes: the reader's class count.
        spatial_dims: the reader's training dimensionality.
        splits: split name -> summary.
        problems: one line per problem, each starting with the file it concerns.
    """

    name: str
    root: str
    num_classes: int
    spatial_dims: int
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found and at least one case loaded."""
        return not self.problems and any(s.loaded for s in self.splits.values())

    def format(self) -> str:
        """Human-readable report for the command line."""
        lines = [
            f"dataset {self.name} at {self.root}: {self.num_classes} classes, "
            f"{self.spatial_dims}D training items"
        ]
        if not self.splits:
            lines.append("  no split lists found")
        for split, s in self.splits.items():
            spacing = ", ".join(
                "none stored" if sp is None else "x".join(f"{v:g}" for v in sp)
                for sp in sorted(s.spacings, key=str)
            )
            lines.append(
                f"  {split}: {s.loaded}/{s.listed} cases loaded, {s.groups} groups, "
                f"image shapes {s.shape_min} .. {s.shape_max}, "
                f"label values {sorted(s.label_values)}, spacing {spacing or '-'}"
            )
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  {p}" for p in self.problems]
        else:
            lines.append("no problems found" if self.ok else "no case could be loaded")
        return "\n".join(lines)


def _label_values(label: np.ndarray) -> set[int]:
    """Distinct values of a label map (bincount is much faster than unique for uint8)."""
    if label.dtype == np.uint8:
        return {int(v) for v in np.flatnonzero(np.bincount(label.ravel(), minlength=1))}
    return {int(v) for v in np.unique(label)}


def inspect_dataset(reader, splits: list[str] | None = None) -> InspectReport:
    """Load every case of every split and report what was found; never raises on bad data.

    Besides the reader's own validation it reports groups (patients) that appear in more
    than one split, which would leak training data into validation.

    Args:
        reader: any reader (``splits``, ``cases``, ``load``).
        splits: the splits to check; default all that exist.

    Returns:
        The report; ``report.ok`` is False when anything was wrong.
    """
    report = InspectReport(
        name=getattr(reader, "name", type(reader).__name__),
        root=str(getattr(reader, "root", "")),
        num_classes=int(getattr(reader, "num_classes", 0)),
        spatial_dims=int(getattr(reader, "spatial_dims", 0)),
    )
    try:
        names = list(splits) if splits is not None else reader.splits()
    except SemidiffError as exc:
        report.problems.append(_describe(exc, report.root))
        return report

    seen_groups: dict[str, str] = {}  # group -> first split it appeared in
    for split in names:
        summary = SplitSummary()
        report.splits[split] = summary
        try:
            refs = reader.cases(split)
        except SemidiffError as exc:
            report.problems.append(_describe(exc, report.root))
            continue
        summary.listed = len(refs)
        groups: set[str] = set()
        for ref in refs:
            if ref.group not in groups:
                groups.add(ref.group)
                first = seen_groups.setdefault(ref.group, split)
                if first != split:
                    report.problems.append(
                        f"{ref.path}: group {ref.group!r} is in split {split!r} and also in "
                        f"split {first!r} (data leak)"
                    )
            try:
                case = reader.load(ref)
            except DataError as exc:
                report.problems.append(f"{exc.path}: {exc.problem}")
                continue
            except Exception as exc:  # noqa: BLE001  a report must survive any bad file
                report.problems.append(f"{ref.path}: unexpected error {type(exc).__name__}: {exc}")
                continue
            summary.loaded += 1
            summary.add_shape(tuple(int(s) for s in case.image.shape))
            summary.spacings.add(case.spacing)
            if case.label is not None:
                summary.label_values |= _label_values(case.label)
        summary.groups = len(groups)
    return report


def _describe(exc: Exception, root: str) -> str:
    """A problem line for a split-level error, starting with the file concerned."""
    if isinstance(exc, DataError):
        return f"{exc.path}: {exc.problem}"
    return f"{Path(root)}: {exc}"
