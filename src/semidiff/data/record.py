"""The one record every reader yields, whatever the on-disk format."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
