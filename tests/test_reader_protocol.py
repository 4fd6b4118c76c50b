"""Every registered dataset reader implements the written contract, ``DatasetReader``.

Two levels, both over the reader registry: what the factory builds defines the protocol's methods
with the protocol's parameters (for every registered name, no data needed), and a reader built on a
tiny sample of its format is an instance of the protocol whose methods give what the data
pipeline expects (every name that has a sample below).
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import h5py
import numpy as np
import pytest

from semidiff.data import Case, CaseRef, make_synthetic_dataset
from semidiff.data.readers import (
    READERS,
    DatasetReader,
    ReaderWithUnlabeled,
    create_reader,
)
from semidiff.errors import ConfigError

PROTOCOL_METHODS = ("splits", "cases", "load")


def built_class(factory) -> type:
    """The class a reader factory builds: the factory itself, or a function's return annotation."""
    if isinstance(factory, type):
        return factory
    returned = typing.get_type_hints(factory).get("return")
    assert isinstance(returned, type), f"reader factory {factory!r} needs a return annotation naming its class"
    return returned


@pytest.mark.parametrize("name", READERS.names())
def test_what_every_factory_builds_defines_the_protocol_methods(name):
    cls = built_class(READERS[name])
    for method in (*PROTOCOL_METHODS, *(("unlabeled_cases",) if hasattr(cls, "unlabeled_cases") else ())):
        expected = list(inspect.signature(getattr(DatasetReader if method != "unlabeled_cases"
                                                  else ReaderWithUnlabeled, method)).parameters)
        got = list(inspect.signature(getattr(cls, method)).parameters)
        assert got[: len(expected)] == expected, f"{name}: {cls.__name__}.{method}{tuple(got)}"
    assert isinstance(getattr(cls, "name", None), str) or "name" in inspect.signature(cls).parameters
    declare = getattr(READERS[name], "declared_preprocessing", None)
    if declare is not None:
        keys = set(declare({}))
        assert {"on_load", "stored", "volume_axes"} <= keys <= {"on_load", "stored", "volume_axes", "colour_to_grey"}, name


# ---- tiny samples of each format --------------------------------------------------------------
def _h5(path: Path, shape: tuple[int, ...], num_classes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["image"] = rng.random(shape, dtype=np.float32)
        f["label"] = rng.integers(0, num_classes, shape).astype(np.uint8)


def _h5_layout(root: Path, **layout) -> Path:
    """Two cases per split list at the layout's own paths (any h5caselist preset)."""
    path_pattern = layout.get("path_pattern", "2018LA_Seg_Training Set/{id}/mri_norm2.h5")
    lists = layout.get("lists", {"train": "train.list", "val": "val.list", "test": "test.list"})
    for s, (split, list_file) in enumerate(lists.items()):
        ids = [f"{split}{i}" for i in range(2)]
        (root / list_file).parent.mkdir(parents=True, exist_ok=True)
        (root / list_file).write_text("\n".join(ids) + "\n")
        for i, cid in enumerate(ids):
            _h5(root / path_pattern.format(id=cid), (6, 7, 5), layout.get("num_classes", 2), 10 * s + i)
    return root


def _acdc(root: Path) -> Path:
    for i in range(2):
        _h5(root / "data" / "slices" / f"patient00{i}_frame01_slice_1.h5", (12, 10), 4, i)
    (root / "train_slices.list").write_text("patient000_frame01_slice_1\npatient001_frame01_slice_1\n")
    _h5(root / "data" / "patient050_frame01.h5", (3, 12, 10), 4, 9)
    (root / "val.list").write_text("patient050_frame01\n")
    return root


def _preset(name: str):
    def make(root: Path) -> Path:
        factory = READERS[name]
        # The preset's own layout: what it fills in when given nothing (read back from a reader).
        probe = factory(root)
        return _h5_layout(root, path_pattern=probe.path_pattern, lists=probe.lists, num_classes=probe.num_classes)

    return make


def _formats():
    from test_data_formats import _endoscapes, _mosxav, _nnunet2d

    return {"endoscapes": _endoscapes, "mosxav": _mosxav, "nnunet": lambda root: _nnunet2d(root) and root}


SAMPLES = {
    "acdc": _acdc,
    "h5caselist": lambda root: _h5_layout(root),
    "synthetic": lambda root: make_synthetic_dataset(root, spatial_dims=2, num_cases=4, size=(16, 16), val_cases=1),
    "la": _preset("la"),
    "pancreas": _preset("pancreas"),
    "brats": _preset("brats"),
}


def _sample(name: str, root: Path) -> Path:
    make = SAMPLES.get(name) or _formats().get(name)
    if make is None:
        pytest.skip(f"no sample dataset for reader {name!r} here (its methods are checked statically)")
    root.mkdir(parents=True, exist_ok=True)
    out = make(root)
    return out if isinstance(out, Path) else root


@pytest.mark.parametrize("name", READERS.names())
def test_every_registered_reader_satisfies_the_protocol(name, tmp_path):
    reader = create_reader(name, _sample(name, tmp_path / name))
    assert isinstance(reader, DatasetReader)
    assert isinstance(reader.name, str) and reader.name
    assert Path(reader.root) == tmp_path / name
    assert isinstance(reader.num_classes, int) and reader.num_classes >= 2
    assert reader.spatial_dims in (2, 3)
    splits = reader.splits()
    assert "train" in splits and splits == reader.splits()  # a fixed order
    refs = reader.cases("train")
    assert refs and all(isinstance(r, CaseRef) for r in refs)
    assert refs == reader.cases("train")
    case = reader.load(refs[0])
    assert isinstance(case, Case) and case.case_id == refs[0].case_id
    assert case.image.dtype == np.float32 and case.image.ndim == reader.spatial_dims + 1
    assert case.label is not None and case.label.shape == case.image.shape[1:]
    if isinstance(reader, ReaderWithUnlabeled):
        assert all(isinstance(r, CaseRef) for r in reader.unlabeled_cases("train"))
    with pytest.raises(ConfigError):
        reader.cases("no_such_split")


def test_unknown_reader_lists_the_registry():
    with pytest.raises(ConfigError, match="unknown dataset reader 'nnunetv3'") as info:
        create_reader("nnunetv3", ".")
    assert all(name in str(info.value) for name in READERS.names())
