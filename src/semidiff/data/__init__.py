"""Dataset readers, synthetic data, labeled/unlabeled splits, batch sampling and transforms.

Every reader implements :class:`DatasetReader`: :class:`CaseRef` lists per split and validated
:class:`Case` records; :func:`create_reader` builds one by name from :data:`READERS`, which every
reader module fills with :func:`register_reader` (importing this package imports them all).
"""

from __future__ import annotations

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
from semidiff.data.readers import (
    READERS,
    DatasetReader,
    ReaderWithUnlabeled,
    create_reader,
    list_readers,
    register_reader,
)
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
from semidiff.registry import import_submodules

__all__ = [
    "BRATS_LAYOUT",
    "LA_LAYOUT",
    "PANCREAS_LAYOUT",
    "READERS",
    "ACDCReader",
    "Case",
    "CaseRef",
    "DatasetReader",
    "EndoscapesReader",
    "H5CaseListReader",
    "InspectReport",
    "MosxavReader",
    "NnUNetReader",
    "ReaderWithUnlabeled",
    "SplitSummary",
    "TwoStreamBatchSampler",
    "case_to_item",
    "create_reader",
    "detect_reader",
    "groups_in_order",
    "holdout",
    "inspect_dataset",
    "list_readers",
    "make_synthetic_dataset",
    "open_synthetic",
    "read_h5_case",
    "read_id_list",
    "register_reader",
    "resample_to_shape",
    "resample_volume",
    "resize_to",
    "select_labeled",
    "train_transforms",
]

# Every module here registers the readers it defines: a new reader is one new file in this package.
import_submodules(__name__, __path__)
