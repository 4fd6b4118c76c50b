"""The reader contract (:class:`DatasetReader`) and the registry of readers.

A reader turns one on-disk format into :class:`~semidiff.data.record.CaseRef` lists per split and
validated :class:`~semidiff.data.record.Case` records; it knows nothing of methods. The data
pipeline (``engine/data.py``), ``semidiff data inspect``, evaluation and prediction call only what
:class:`DatasetReader` states, plus the optional parts of :class:`ReaderWithUnlabeled` and
:class:`ReaderFactory` when a reader has them. ``tests/test_reader_protocol.py`` checks every
registered reader against it.

A reader is added by decorating its class (or factory function) with :func:`register_reader`
in a new module of this package; the name is what configs give in ``data.reader``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from semidiff.data.record import Case, CaseRef
from semidiff.errors import ConfigError
from semidiff.registry import Registry

__all__ = [
    "READERS",
    "DatasetReader",
    "ReaderFactory",
    "ReaderWithUnlabeled",
    "create_reader",
    "list_readers",
    "register_reader",
]


@runtime_checkable
class DatasetReader(Protocol):
    """What every reader implements.

    Attributes:
        name: The registry name (``"acdc"``, ``"nnunet"``, ...), written into reports.
        root: The dataset folder.
        num_classes: Classes including background; labels hold ``0 .. num_classes - 1`` (and
            :data:`~semidiff.data.record.IGNORE_INDEX` where a format has not-annotated pixels).
        spatial_dims: Spatial axes of a training item (2 or 3); a 2D reader may give 3D
            ``val``/``test`` volumes that evaluation predicts slice by slice.
    """

    name: str
    root: Path
    num_classes: int
    spatial_dims: int

    def splits(self) -> list[str]:
        """The split names present on disk (of ``train``, ``val``, ``test``, ...), in a fixed order."""
        ...

    def cases(self, split: str) -> list[CaseRef]:
        """The labeled cases of a split, in a fixed order (the labeled-subset rule depends on it).

        Raises:
            ConfigError: unknown split name.
            DataError: the split's list or folder is missing or unreadable (naming the file).
        """
        ...

    def load(self, ref: CaseRef) -> Case:
        """Read and validate one case: image ``(C, *spatial)`` float32, label without channel axis.

        Raises:
            DataError: the file is missing, unreadable or invalid (naming the file).
        """
        ...


@runtime_checkable
class ReaderWithUnlabeled(DatasetReader, Protocol):
    """A reader whose format also has images without any label (frames, an unlabeled folder).

    The data pipeline adds them to the unlabeled stream (``engine/data.py``); ``data inspect``
    checks them with the training split.
    """

    def unlabeled_cases(self, split: str = "train") -> list[CaseRef]:
        """The images of ``split`` that have no label at all, in a fixed order."""
        ...


@runtime_checkable
class ReaderFactory(Protocol):
    """What :data:`READERS` holds: a reader class or a function, ``factory(root, **options)``.

    A factory may also have ``declared_preprocessing(options) -> dict`` (what the files carry and
    what loading applies: keys ``on_load``, ``stored``, ``volume_axes``, and ``colour_to_grey`` for
    readers of colour frames), read by
    :mod:`semidiff.data.preprocessing` without building the reader; without it, the config's
    ``data.normalize`` says everything.
    """

    def __call__(self, root: str | Path, **options: Any) -> DatasetReader: ...


#: Every reader, by the name configs give in ``data.reader``; filled by :func:`register_reader`.
# No config key in errors: `semidiff data inspect --reader` names readers too.
READERS: Registry[ReaderFactory] = Registry("dataset reader")


def register_reader(name: str):
    """Decorator adding a reader class or factory function to :data:`READERS` under ``name``."""
    return READERS.register(name)


def list_readers() -> list[str]:
    """The registered reader names, sorted."""
    return READERS.names()


def create_reader(name: str, root: str | Path, **kwargs: Any) -> DatasetReader:
    """Build a reader by name.

    Args:
        name: A name from :func:`list_readers`: ``"acdc"``, ``"h5caselist"``, ``"synthetic"`` (an
            h5caselist reader whose layout, dimensionality and classes come from the folder's
            ``dataset.json``), ``"la"``/``"pancreas"``/``"brats"`` (h5caselist with that layout's
            preset), ``"endoscapes"``, ``"mosxav"``, ``"nnunet"`` (the user's own data), ...
        root: dataset folder.
        **kwargs: passed to the reader (e.g. ``num_classes``, ``path_pattern``, ``lists``).

    Returns:
        The reader.

    Raises:
        ConfigError: unknown name or keyword argument.
        DataError: the dataset folder (or, for synthetic, its dataset.json) is missing.
    """
    factory = READERS.lookup(name)
    try:
        return factory(root, **kwargs)
    except TypeError as exc:
        # Misspelled config keys land here; say which reader rejected them.
        raise ConfigError(f"bad options for the {name!r} reader {sorted(kwargs)}: {exc}") from exc
