"""The one record every reader yields, whatever the on-disk format."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Label value of pixels that were not annotated (EndoScapes' 255, MOSXAV's test "others"): no loss,
#: no metric and no pseudo-label target is computed on them (methods/losses.py, evaluation/metrics.py).
IGNORE_INDEX = 255


@dataclass(frozen=True)
class CaseRef:
    """Where a case lives, before it is loaded.

    Attributes:
        case_id: identifier from the dataset's list (e.g. ``patient003_frame01_slice_1``).
        path: file the case is read from.
        group: the unit that must never cross splits and that "N labeled patients" counts
            (ACDC patient, video, or the case itself).
    """

    case_id: str
    path: str
    group: str


@dataclass
class Case:
    """A loaded case.

    Attributes:
        case_id: identifier from the dataset's list.
        image: float32 array, channel first: ``(C, H, W)`` or ``(C, D, H, W)``.
        label: integer class map without channel axis (``(H, W)`` or ``(D, H, W)``), or None.
        spacing: voxel size per spatial axis in mm, or None when the format stores none.
        group: see :class:`CaseRef`.
        source: the file it was read from.
        meta: format-specific extras (e.g. geometry for writing predictions back).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...] | None = None
    group: str = ""
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[1:])


def check_label_values(
    label: np.ndarray,
    allowed: set[int],
    path: str,
    ignore_index: int | None = None,
) -> np.ndarray:
    """Check that a label map holds only allowed class ids; return it as a compact integer array.

    Args:
        label: integer (or integer-valued float / bool) label map.
        allowed: the class ids the dataset declares.
        path: file named in the error.
        ignore_index: a further allowed value marking unannotated pixels.

    Raises:
        DataError: non-integer values, or values outside ``allowed`` (listed in the message).
    """
    from semidiff.errors import DataError

    if label.dtype.kind == "b":
        label = label.astype(np.uint8)
    elif label.dtype.kind == "f":
        if not np.isfinite(label).all() or not np.array_equal(label, np.rint(label)):
            raise DataError(path, "label is not integer-valued (found fractional or non-finite values)")
    elif label.dtype.kind not in "iu":
        raise DataError(path, f"label has non-numeric dtype {label.dtype}")
    values = np.unique(label)
    ok = set(allowed) | ({ignore_index} if ignore_index is not None else set())
    bad = [int(v) for v in values if int(v) not in ok]
    if bad:
        shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise DataError(path, f"label values {shown} are not among the declared classes {sorted(allowed)}")
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    # uint8 keeps large label maps small; int64 only when the values need it.
    return label.astype(np.uint8 if lo >= 0 and hi < 256 else np.int64, copy=False)
