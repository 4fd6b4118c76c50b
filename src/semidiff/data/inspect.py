"""Check a whole dataset before training on it: load every case, summarise, list problems."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semidiff.errors import DataError, SemidiffError

__all__ = ["InspectReport", "SplitSummary", "detect_reader", "inspect_dataset"]


def detect_reader(root: str | Path) -> str:
    """Guess which reader a dataset folder needs from the files it holds.

    Returns:
        A name for :func:`semidiff.data.create_reader`.

    Raises:
        DataError: nothing recognisable in the folder.
    """
    root = Path(root)
    checks = (
        ("acdc", (root / "train_slices.list").is_file()),
        ("nnunet", (root / "dataset.json").is_file() and (root / "imagesTr").is_dir()),
        ("synthetic", (root / "dataset.json").is_file() and (root / "cases").is_dir()),
        ("endoscapes", (root / "semseg").is_dir() or any(root.glob("*_seg_vids.txt"))),
        ("mosxav", (root / "trainval" / "JPEGImages").is_dir() or (root / "test" / "Annotations_Semantic").is_dir()),
        ("la", (root / "2018LA_Seg_Training Set").is_dir()),
        ("pancreas", (root / "Pancreas_h5").is_dir()),
        ("brats", (root / "data").is_dir() and (root / "train.txt").is_file()),
        ("h5caselist", any(root.glob("*.list")) or any(root.glob("*.txt"))),
    )
    for name, hit in checks:
        if hit:
            return name
    raise DataError(root, "cannot tell the dataset format (none of: train_slices.list, dataset.json with "
                          "imagesTr/ or cases/, semseg/, trainval/JPEGImages, 2018LA_Seg_Training Set, "
                          "Pancreas_h5, data/ with train.txt, *.list); pass --reader")


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
        ignore_index: the value the reader marks not-annotated pixels with, None if it marked none.
        ignore_pixels: pixels carrying ``ignore_index``, over the split.
        ignore_cases: cases with at least one such pixel.
        labeled: cases that loaded with a label.
    """

    listed: int = 0
    loaded: int = 0
    shape_min: tuple[int, ...] | None = None
    shape_max: tuple[int, ...] | None = None
    label_values: set[int] = field(default_factory=set)
    spacings: set[tuple[float, ...] | None] = field(default_factory=set)
    groups: int = 0
    ignore_index: int | None = None
    ignore_pixels: int = 0
    ignore_cases: int = 0
    labeled: int = 0

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
        notes: what the reader found and what it lacks (its ``describe()``), one line each.
    """

    name: str
    root: str
    num_classes: int
    spatial_dims: int
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found and at least one case loaded."""
        return not self.problems and any(s.loaded for s in self.splits.values())

    def format(self) -> str:
        """Human-readable report for the command line."""
        lines = [
            (f"dataset {self.name} at {self.root}: {self.num_classes} classes, "
             f"{self.spatial_dims}D training items")
        ]
        lines += [f"  {note}" for note in self.notes]
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
            if s.ignore_index is not None:
                lines.append(f"    not annotated (label {s.ignore_index}, left out of losses and metrics): "
                             f"{s.ignore_pixels} pixels in {s.ignore_cases} of {s.labeled} labeled cases")
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

    if hasattr(reader, "describe"):
        try:
            report.notes = list(reader.describe())
        except SemidiffError as exc:
            report.problems.append(_describe(exc, report.root))
    seen_groups: dict[str, str] = {}  # group -> first split it appeared in
    jobs: list[tuple[str, str]] = [(s, s) for s in names]
    if hasattr(reader, "unlabeled_cases") and "train" in names:
        # Unlabeled images count as part of "train" for the leak check.
        jobs.append(("train (unlabeled)", "train"))
    for split, leak_key in jobs:
        summary = SplitSummary()
        report.splits[split] = summary
        try:
            refs = reader.unlabeled_cases("train") if split == "train (unlabeled)" else reader.cases(split)
        except SemidiffError as exc:
            report.problems.append(_describe(exc, report.root))
            continue
        if split == "train" and not refs:
            report.problems.append(f"{report.root}: empty labeled set: split 'train' has no labeled cases")
        summary.listed = len(refs)
        groups: set[str] = set()
        for ref in refs:
            if ref.group not in groups:
                groups.add(ref.group)
                first = seen_groups.setdefault(ref.group, leak_key)
                if first != leak_key:
                    report.problems.append(
                        f"{ref.path}: group {ref.group!r} is in split {leak_key!r} and also in "
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
                summary.labeled += 1
                summary.label_values |= _label_values(case.label)
                ignore = case.meta.get("ignore_index")
                if ignore is not None:
                    summary.ignore_index = int(ignore)
                    n = int(np.count_nonzero(case.label == ignore))
                    summary.ignore_pixels += n
                    summary.ignore_cases += int(n > 0)
        summary.groups = len(groups)
    return report


def _describe(exc: Exception, root: str) -> str:
    """A problem line for a split-level error, starting with the file concerned."""
    if isinstance(exc, DataError):
        return f"{exc.path}: {exc.problem}"
    return f"{Path(root)}: {exc}"
