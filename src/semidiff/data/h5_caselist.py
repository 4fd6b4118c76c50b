"""Reader for datasets stored as one HDF5 file per case plus plain-text split lists.

This is the layout of the UA-MT left-atrium data (``2018LA_Seg_Training Set/<id>/mri_norm2.h5``
with ``train.list``/``test.list``), and with another ``path_pattern`` and ``lists`` also of the
MC-Net NIH Pancreas data and the SSL4MIS BraTS 2019 data. The validation helpers at the top are
shared with the ACDC reader, so that every HDF5 case is checked the same way.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from semidiff.data.image_io import check_voxel_count
from semidiff.data.readers import register_reader
from semidiff.data.record import Case, CaseRef
from semidiff.errors import ConfigError, DataError

__all__ = [
    "BRATS_LAYOUT",
    "LA_LAYOUT",
    "PANCREAS_LAYOUT",
    "H5CaseListReader",
    "read_h5_case",
    "read_id_list",
]

# Keyword presets for the literature's 3D h5 layouts (pass as ``H5CaseListReader(root, **preset)``).
# LA: UA-MT z-scored each whole NRRD scan, then cropped around the atrium (data/prepare.py does the same;
# benchmarks/results/predict_preprocessing.md measures it on a stored case).
LA_LAYOUT: dict = {
    "num_classes": 2,
    "path_pattern": "2018LA_Seg_Training Set/{id}/mri_norm2.h5",
    "lists": {"train": "train.list", "val": "val.list", "test": "test.list"},
    "stored_normalize": "zscore",
}
PANCREAS_LAYOUT: dict = {
    "num_classes": 2,
    "path_pattern": "Pancreas_h5/{id}_norm.h5",
    "lists": {"train": "train.list", "test": "test.list"},
}
BRATS_LAYOUT: dict = {
    "num_classes": 2,
    "path_pattern": "data/{id}.h5",
    "lists": {"train": "train.txt", "val": "val.txt", "test": "test.txt"},
}

# How many offending label values an error message lists before it says "...".
_MAX_LISTED_VALUES = 10


def read_id_list(path: str | Path) -> list[str]:
    """Read a split list: one case id per line.

    Blank lines and surrounding whitespace are ignored, and a trailing ``.h5`` is dropped
    because some published lists carry it and others do not.

    Args:
        path: the list file.

    Returns:
        The ids in file order.

    Raises:
        DataError: the file is missing or unreadable, or holds no ids.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "split list file is missing")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"split list file cannot be read: {exc}") from exc
    ids = []
    for line in text.splitlines():
        case_id = line.strip()
        if not case_id:
            continue
        case_id = case_id.removesuffix(".h5")
        ids.append(case_id)
    if not ids:
        raise DataError(path, "split list file holds no case ids")
    return ids


def _read_dataset(f: h5py.File, key: str, path: Path) -> np.ndarray:
    """Read one dataset of an open file, with a clear error when it is absent."""
    if key not in f:
        raise DataError(path, f"missing key {key!r} (the file has keys {sorted(f.keys())})")
    obj = f[key]
    if not isinstance(obj, h5py.Dataset):
        raise DataError(path, f"key {key!r} is a group, not an array")
    check_voxel_count(path, obj.shape, what=key)  # before allocating
    return np.asarray(obj[()])


def _check_label(label: np.ndarray, num_classes: int, path: Path) -> np.ndarray:
    """Check a label map's values and return it in a compact integer dtype."""
    kind = label.dtype.kind
    if kind == "b":
        label = label.astype(np.uint8)
    elif kind == "f":
        finite = np.isfinite(label)
        if not finite.all():
            raise DataError(path, f"label has {label.size - int(finite.sum())} non-finite voxels")
        if not np.array_equal(label, np.rint(label)):
            raise DataError(path, "label is not integer-valued (found fractional values)")
    elif kind not in "iu":
        raise DataError(path, f"label has non-numeric dtype {label.dtype}")

    lo, hi = label.min(), label.max()
    if lo < 0 or hi > num_classes - 1:
        bad = np.unique(label[(label < 0) | (label > num_classes - 1)])
        shown = ", ".join(str(int(v)) for v in bad[:_MAX_LISTED_VALUES])
        more = ", ..." if bad.size > _MAX_LISTED_VALUES else ""
        raise DataError(
            path,
            f"label values outside [0, {num_classes - 1}] for {num_classes} classes: {shown}{more}",
        )
    # uint8 keeps large 3D label maps small; int64 only when the classes need it.
    dtype = np.uint8 if hi < 256 else np.int64
    return label.astype(dtype, copy=False)


def read_h5_case(
    path: str | Path,
    *,
    case_id: str,
    group: str,
    num_classes: int,
    spatial_dims: int,
    image_key: str = "image",
    label_key: str | None = "label",
    allow_channel_axis: bool = True,
    meta: dict | None = None,
) -> Case:
    """Load and validate one HDF5 case.

    The image may be stored without a channel axis (``spatial_dims`` axes, one is added) or
    channel first (``spatial_dims + 1`` axes). The label has ``spatial_dims`` axes.

    Args:
        path: the ``.h5`` file.
        case_id: id recorded in the returned case.
        group: group recorded in the returned case.
        num_classes: number of classes including background; labels must lie in
            ``[0, num_classes - 1]``.
        spatial_dims: number of spatial axes expected.
        image_key: dataset name of the image.
        label_key: dataset name of the label, or None for unlabeled data.
        allow_channel_axis: accept an image with ``spatial_dims + 1`` axes as channel first.
        meta: extra entries for :attr:`Case.meta`.

    Returns:
        The case, image float32 ``(C, *spatial)``, label uint8 (int64 for > 256 classes).

    Raises:
        DataError: naming the file and the problem (missing, not HDF5, missing key, wrong
            number of axes, empty, shape mismatch, non-finite voxels, bad label values).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file is missing")
    if not path.is_file():
        raise DataError(path, "is not a file")
    try:
        with h5py.File(path, "r") as f:
            image = _read_dataset(f, image_key, path)
            label = _read_dataset(f, label_key, path) if label_key is not None else None
            spacing = f.attrs.get("spacing")
    except OSError as exc:
        # h5py reports corrupt, truncated and non-HDF5 files as OSError.
        raise DataError(path, f"not a readable HDF5 file ({exc})") from exc

    if image.ndim == spatial_dims:
        image = image[None]
    elif not (allow_channel_axis and image.ndim == spatial_dims + 1):
        also = f" (or {spatial_dims + 1} with a channel axis first)" if allow_channel_axis else ""
        raise DataError(
            path,
            f"image has {image.ndim} axes {tuple(image.shape)}, expected {spatial_dims}{also}",
        )
    if image.size == 0:
        raise DataError(path, f"image is empty (shape {tuple(image.shape)})")
    if image.dtype.kind not in "fiub":
        raise DataError(path, f"image has non-numeric dtype {image.dtype}")
    image = image.astype(np.float32, copy=False)
    finite = np.isfinite(image)
    if not finite.all():
        raise DataError(path, f"image has {image.size - int(finite.sum())} non-finite (NaN/inf) voxels")

    if label is not None:
        if label.ndim == spatial_dims + 1 and label.shape[0] == 1:
            label = label[0]  # tolerate a singleton channel axis
        if label.shape != image.shape[1:]:
            raise DataError(
                path,
                f"image and label shapes differ: image spatial shape {tuple(image.shape[1:])}, "
                f"label shape {tuple(label.shape)}",
            )
        label = _check_label(label, num_classes, path)

    spacing_t = None
    if spacing is not None and np.size(spacing) == spatial_dims:
        spacing_t = tuple(float(s) for s in np.ravel(spacing))
    return Case(
        case_id=case_id,
        image=image,
        label=label,
        spacing=spacing_t,
        group=group,
        source=str(path),
        meta=dict(meta or {}),
    )


@register_reader("h5caselist")
class H5CaseListReader:
    """One HDF5 file per case, split lists as text files (UA-MT LA, Pancreas, BraTS layouts).

    Attributes:
        name: ``"h5caselist"`` (or the name given, e.g. ``"synthetic"``).
        spatial_dims: spatial axes of a case.
        num_classes: classes including background.
        root: dataset folder.
        path_pattern: file of a case relative to ``root``, with ``{id}`` for the case id.
        lists: split name -> list file relative to ``root``.
    """

    name: str = "h5caselist"

    def __init__(
        self,
        root: str | Path,
        num_classes: int = 2,
        path_pattern: str = "2018LA_Seg_Training Set/{id}/mri_norm2.h5",
        lists: dict[str, str] | None = None,
        image_key: str = "image",
        label_key: str | None = "label",
        spatial_dims: int = 3,
        name: str | None = None,
        stored_normalize: str | None = None,
    ) -> None:
        """Create a reader; checks only that the root folder exists.

        Args:
            root: dataset folder.
            num_classes: classes including background.
            path_pattern: case file relative to ``root``; ``{id}`` is replaced by the case id.
            lists: split name -> list file relative to ``root``; default
                ``{"train": "train.list", "val": "val.list", "test": "test.list"}``.
            image_key: HDF5 dataset name of the image.
            label_key: HDF5 dataset name of the label (None: unlabeled cases).
            spatial_dims: 2 or 3.
            name: overrides :attr:`name` (used by the synthetic dataset).
            stored_normalize: the normalisation the files already carry (``"zscore"``, ``"minmax"``,
                ``"none"``), which ``semidiff predict`` applies to raw scans; None leaves it to the
                config's ``data.normalize``. The reader itself applies nothing.

        Raises:
            DataError: the root folder is missing.
            ConfigError: a bad argument.
        """
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(self.root, "dataset root folder is missing")
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2 (background + 1), got {num_classes}")
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if "{id}" not in path_pattern:
            raise ConfigError(f"path_pattern must contain '{{id}}', got {path_pattern!r}")
        self.num_classes = int(num_classes)
        self.spatial_dims = int(spatial_dims)
        self.path_pattern = path_pattern
        self.lists = dict(lists) if lists is not None else {
            "train": "train.list",
            "val": "val.list",
            "test": "test.list",
        }
        if stored_normalize not in (None, "none", "minmax", "zscore"):
            raise ConfigError(f"stored_normalize must be none, minmax or zscore, got {stored_normalize!r}")
        self.stored_normalize = stored_normalize
        self.image_key = image_key
        self.label_key = label_key
        if name is not None:
            self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, root={str(self.root)!r})"

    @staticmethod
    def declared_preprocessing(options: dict) -> dict:
        """The files hold images normalised when they were made: nothing is applied on load."""
        return {"on_load": "none", "stored": options.get("stored_normalize"), "volume_axes": None}

    def splits(self) -> list[str]:
        """Split names whose list file exists, in the order of :attr:`lists`."""
        return [s for s, f in self.lists.items() if (self.root / f).is_file()]

    def cases(self, split: str) -> list[CaseRef]:
        """The cases of a split, in list-file order.

        Raises:
            ConfigError: the split name is not configured.
            DataError: the split's list file is missing or empty.
        """
        if split not in self.lists:
            raise ConfigError(f"unknown split {split!r}; configured splits: {sorted(self.lists)}")
        ids = read_id_list(self.root / self.lists[split])
        return [
            CaseRef(case_id=i, path=str(self.root / self.path_pattern.format(id=i)), group=i)
            for i in ids
        ]

    def load(self, ref: CaseRef) -> Case:
        """Load and validate one case (see :func:`read_h5_case`)."""
        return read_h5_case(
            ref.path,
            case_id=ref.case_id,
            group=ref.group,
            num_classes=self.num_classes,
            spatial_dims=self.spatial_dims,
            image_key=self.image_key,
            label_key=self.label_key,
        )


def _preset(layout: dict, name: str):
    """An h5caselist reader with a literature layout's defaults (any of them can be overridden)."""

    def make(root: str | Path, **kwargs) -> H5CaseListReader:
        return H5CaseListReader(root, **{**layout, "name": name, **kwargs})

    make.__name__ = make.__qualname__ = f"{name}_reader"  # one qualified name per preset in the registry
    make.declared_preprocessing = lambda options: H5CaseListReader.declared_preprocessing({**layout, **options})
    return make


register_reader("la")(_preset(LA_LAYOUT, "la"))
register_reader("pancreas")(_preset(PANCREAS_LAYOUT, "pancreas"))
register_reader("brats")(_preset(BRATS_LAYOUT, "brats"))
