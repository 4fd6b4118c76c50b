"""Dataset readers, synthetic data, labeled/unlabeled splits, batch sampling and transforms.

Every reader yields :class:`CaseRef` lists per split and loads validated :class:`Case` records;
:func:`create_reader` builds one by name.
"""

from __future__ import annotations

from pathlib import Path

from semidiff.data.endoscapes import EndoscapesReader
from semidiff.data.h5_acdc import ACDCReader
from semidiff.data.h5_caselist import (
    BRATS_LAYOUT,
    LA_LAYOUT,
    PANCREAS_LAYOUT,
    H5CaseListReader,
    read_h5_case,
    read_id_list,
)
from semidiff.data.inspect import (
    InspectReport,
    SplitSummary,
    detect_reader,
    inspect_dataset,
)
from semidiff.data.mosxav import MosxavReader
from semidiff.data.nnunet import NnUNetReader
from semidiff.data.record import Case, CaseRef
from semidiff.data.sampler import TwoStreamBatchSampler
from semidiff.data.splits import groups_in_order, holdout, select_labeled
from semidiff.data.synthetic import make_synthetic_dataset, open_synthetic
from semidiff.data.transforms import (
    case_to_item,
    resample_to_shape,
    resample_volume,
    resize_to,
    train_transforms,
)
from semidiff.errors import ConfigError

__all__ = [
    "BRATS_LAYOUT",
    "LA_LAYOUT",
    "PANCREAS_LAYOUT",
    "READERS",
    "ACDCReader",
    "Case",
    "CaseRef",
    "EndoscapesReader",
    "H5CaseListReader",
    "InspectReport",
    "MosxavReader",
    "NnUNetReader",
    "SplitSummary",
    "TwoStreamBatchSampler",
    "case_to_item",
    "create_reader",
    "detect_reader",
    "groups_in_order",
    "holdout",
    "inspect_dataset",
    "make_synthetic_dataset",
    "open_synthetic",
    "read_h5_case",
    "read_id_list",
    "resample_to_shape",
    "resample_volume",
    "resize_to",
    "select_labeled",
    "train_transforms",
]

# Reader names accepted by create_reader (and hence by configs).
def _preset(layout: dict, name: str):
    """An h5caselist reader with a literature layout's defaults (any of them can be overridden)."""

    def make(root, **kwargs):
        return H5CaseListReader(root, **{**layout, "name": name, **kwargs})

    make.__name__ = f"{name}_reader"
    make.declared_preprocessing = lambda options: H5CaseListReader.declared_preprocessing({**layout, **options})
    return make


READERS = {
    "acdc": ACDCReader,
    "h5caselist": H5CaseListReader,
    "synthetic": open_synthetic,
    "la": _preset(LA_LAYOUT, "la"),
    "pancreas": _preset(PANCREAS_LAYOUT, "pancreas"),
    "brats": _preset(BRATS_LAYOUT, "brats"),
    "endoscapes": EndoscapesReader,
    "mosxav": MosxavReader,
    "nnunet": NnUNetReader,
}


def create_reader(name: str, root: str | Path, **kwargs):
    """Build a reader by name.

    Args:
        name: ``"acdc"``, ``"h5caselist"``, ``"synthetic"`` (an h5caselist reader whose
            layout, dimensionality and classes come from the folder's ``dataset.json``),
            ``"la"``/``"pancreas"``/``"brats"`` (h5caselist with that layout's preset),
            ``"endoscapes"``, ``"mosxav"`` or ``"nnunet"`` (the user's own data).
        root: dataset folder.
        **kwargs: passed to the reader (e.g. ``num_classes``, ``path_pattern``, ``lists``).

    Returns:
        The reader.

    Raises:
        ConfigError: unknown name or keyword argument.
        DataError: the dataset folder (or, for synthetic, its dataset.json) is missing.
    """
    if name not in READERS:
        raise ConfigError(f"unknown dataset reader {name!r}; known readers: {sorted(READERS)}")
    try:
        return READERS[name](root, **kwargs)
    except TypeError as exc:
        # Misspelled config keys land here; say which reader rejected them.
        raise ConfigError(f"bad options for the {name!r} reader {sorted(kwargs)}: {exc}") from exc
