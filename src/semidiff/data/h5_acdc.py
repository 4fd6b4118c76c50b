"""Reader for ACDC in the SSL4MIS layout: 2D training slices, 3D validation/test volumes.

Layout::

    <root>/train_slices.list     slice ids, e.g. patient099_frame01_slice_15
    <root>/val.list, test.list   volume ids, e.g. patient028_frame01
    <root>/data/slices/<id>.h5   image (H, W) float32, label (H, W) uint8
    <root>/data/<id>.h5          image (S, H, W) float32, label (S, H, W) uint8
"""

from __future__ import annotations

from pathlib import Path

from semidiff.data.h5_caselist import read_h5_case, read_id_list
from semidiff.data.readers import register_reader
from semidiff.data.record import Case, CaseRef
from semidiff.errors import ConfigError, DataError

__all__ = ["ACDCReader"]

# split -> (list file, is the split made of 2D slices?)
_SPLITS: dict[str, tuple[str, bool]] = {
    "train": ("train_slices.list", True),
    "val": ("val.list", False),
    "test": ("test.list", False),
}


def _patient(case_id: str) -> str:
    """``patient003_frame01_slice_4`` -> ``patient003``: the unit that must not cross splits."""
    return case_id.split("_", 1)[0]


@register_reader("acdc")
class ACDCReader:
    """ACDC as preprocessed by SSL4MIS.

    Training items are 2D slices (``spatial_dims`` is 2); ``val``/``test`` cases are whole
    volumes, image ``(1, S, H, W)`` and label ``(S, H, W)``, which evaluation predicts slice by
    slice. ``Case.meta["kind"]`` is ``"slice"`` or ``"volume"``.

    Attributes:
        name: ``"acdc"``.
        spatial_dims: 2.
        num_classes: 4 by default (background, RV, myocardium, LV).
        root: dataset folder.
    """

    name: str = "acdc"
    spatial_dims: int = 2

    def __init__(self, root: str | Path, num_classes: int = 4) -> None:
        """Create a reader; checks only that the root folder exists.

        Args:
            root: the ACDC folder (holding ``train_slices.list`` and ``data/``).
            num_classes: classes including background.

        Raises:
            DataError: the root folder is missing.
            ConfigError: num_classes < 2.
        """
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(self.root, "dataset root folder is missing")
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2 (background + 1), got {num_classes}")
        self.num_classes = int(num_classes)

    def __repr__(self) -> str:
        return f"ACDCReader(root={str(self.root)!r})"

    @staticmethod
    def declared_preprocessing(options: dict) -> dict:
        """SSL4MIS min-max scaled each volume (slices share its scale); arrays in SimpleITK's order."""
        return {"on_load": "none", "stored": "minmax", "volume_axes": "zyx"}

    def splits(self) -> list[str]:
        """Split names whose list file exists (of ``train``, ``val``, ``test``)."""
        return [s for s, (f, _) in _SPLITS.items() if (self.root / f).is_file()]

    def cases(self, split: str) -> list[CaseRef]:
        """The cases of a split in list-file order; slices for ``train``, volumes otherwise.

        Raises:
            ConfigError: the split name is not one of ``train``, ``val``, ``test``.
            DataError: the split's list file is missing or empty.
        """
        if split not in _SPLITS:
            raise ConfigError(f"unknown ACDC split {split!r}; known splits: {list(_SPLITS)}")
        list_file, is_slices = _SPLITS[split]
        folder = self.root / "data" / "slices" if is_slices else self.root / "data"
        return [
            CaseRef(case_id=i, path=str(folder / f"{i}.h5"), group=_patient(i))
            for i in read_id_list(self.root / list_file)
        ]

    def load(self, ref: CaseRef) -> Case:
        """Load and validate one slice or volume.

        Whether ``ref`` is a 2D slice or a 3D volume is decided by its folder
        (``data/slices/`` holds the slices).

        Raises:
            DataError: naming the file and the problem.
        """
        is_slice = Path(ref.path).parent.name == "slices"
        return read_h5_case(
            ref.path,
            case_id=ref.case_id,
            group=ref.group,
            num_classes=self.num_classes,
            spatial_dims=2 if is_slice else 3,
            allow_channel_axis=False,
            meta={"kind": "slice" if is_slice else "volume"},
        )
