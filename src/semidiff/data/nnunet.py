"""Reader for the user's own data in the nnU-Net layout, plus a folder (or list) of unlabeled images.

Layout::

    <root>/dataset.json                 channel_names (or modality), labels, file_ending
    <root>/imagesTr/<case>_0000.nii.gz  one file per input channel: _0000, _0001, ...
                                        (2D RGB/RGBA PNG/JPEG/TIFF: one file holds R, G, B)
    <root>/labelsTr/<case>.nii.gz       integer label map with the values of dataset.json
    <root>/imagesUnlabeled/<case>_0000.nii.gz   unlabeled cases (folder name configurable)
    <root>/imagesTs/, labelsTs/         optional test cases (a test split when labelsTs exists)
    <root>/splits_final.json            optional nnU-Net folds [{"train": [...], "val": [...]}, ...]

2D (PNG/TIF/BMP) and 3D (NIfTI/NRRD/MHA) files are read through :func:`read_image`: SimpleITK keeps
spacing, origin and direction, which :attr:`Case.meta` carries for writing predictions back.
3D arrays are in SimpleITK's (z, y, x) order (``data.volume_axes: zyx``).

Channels follow nnU-Net: every channel in its own file, except 2D natural images, where one
RGB (or RGBA) file holds the three channels that ``channel_names`` declares. A colour image is
never reduced to grey unless dataset.json declares one channel and ``colour_to_grey`` is set; it
is an error naming the file and what to declare.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import numpy as np

from semidiff.data.image_io import (
    ITK_SUFFIXES,
    PIL_SUFFIXES,
    LoadedImage,
    check_rgb_range,
    normalize,
    read_image,
    read_label_png,
    suffix_of,
)
from semidiff.data.readers import register_reader
from semidiff.data.record import Case, CaseRef, check_label_values
from semidiff.errors import ConfigError, DataError

__all__ = ["NnUNetReader", "channel_file", "read_case_channels", "read_dataset_json"]

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _strip_ending(name: str, ending: str) -> str | None:
    return name[: -len(ending)] if name.lower().endswith(ending.lower()) else None


def channel_file(first: str | Path, channel: int) -> Path:
    """The file of input ``channel`` of a case, given its ``_0000`` file."""
    first = Path(first)
    return first.with_name(first.name.replace("_0000", f"_{channel:04d}", 1))


def read_dataset_json(path: Path) -> dict:
    """Parse an nnU-Net ``dataset.json`` (v2 or v1 style) into what the reader needs.

    Returns:
        ``{"channels": [names], "labels": {value: name}, "file_ending": str | None}``.

    Raises:
        DataError: missing or unreadable file, no channels, no labels, or region-based labels.
    """
    if not path.is_file():
        raise DataError(path, "dataset.json is missing")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"not a readable JSON file ({exc})") from None
    channels = info.get("channel_names", info.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise DataError(path, "needs 'channel_names' (or 'modality'): {\"0\": \"name\", ...}")
    try:
        channel_names = [str(channels[k]) for k in sorted(channels, key=int)]
    except ValueError:
        raise DataError(path, f"channel keys must be 0, 1, ...; got {sorted(channels)}") from None
    raw = info.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise DataError(path, "needs 'labels': {\"background\": 0, \"name\": 1, ...}")
    labels: dict[int, str] = {}
    for key, value in raw.items():
        if isinstance(value, list):
            raise DataError(path, f"region-based label {key!r} (a list of values) is not supported")
        try:
            # v2: {"name": value}; v1: {"value": "name"}.
            value_id, name = (int(value), str(key)) if not str(key).lstrip("-").isdigit() else (int(key), str(value))
        except (TypeError, ValueError):
            raise DataError(path, f"label {key!r}: {value!r} is not an integer class id") from None
        labels[value_id] = name
    if min(labels) < 0:
        raise DataError(path, f"negative label value {min(labels)}")
    ending = info.get("file_ending")
    return {"channels": channel_names, "labels": labels, "file_ending": ending}


#: What to do about a colour file in a dataset that declares one channel (the reader's error hint).
GREY_HINT = ('dataset.json declares 1 channel: declare "channel_names": {"0": "R", "1": "G", "2": "B"} to '
             'train on colour, or convert it to grey with data.reader_options.colour_to_grey: true '
             '(semidiff plan/train DATASET: --colour-to-grey)')


def read_case_channels(first: str | Path, num_channels: int, volume_axes: str = "zyx",
                       colour_to_grey: bool = False) -> LoadedImage:
    """Read one case's channels into one multi-channel image, as nnU-Net lays them out.

    One file that holds all ``num_channels`` channels (an RGB PNG when three are declared) is the
    case; otherwise each channel is its own file, ``_0000 .. _000{C-1}``. The geometry (for writing
    predictions back) is the first file's.

    Args:
        first: the case's ``_0000`` file.
        num_channels: the channels dataset.json (or the model) declares.
        volume_axes: axis order of 3D arrays.
        colour_to_grey: with one channel declared, convert a colour file to grey instead of refusing it.

    Raises:
        DataError: a colour file where one channel is declared (unless ``colour_to_grey``), a missing
            channel file, or channels whose counts, shapes or spacings differ.
    """
    first = Path(first)
    if num_channels == 1:
        return read_image(first, volume_axes, channels=1, colour_to_grey=colour_to_grey, hint=GREY_HINT)
    head = read_image(first, volume_axes)
    if head.array.shape[0] == num_channels:
        return head  # RGB natural images: one file, three channels
    if head.array.shape[0] != 1:
        raise DataError(first, f"image holds {head.array.shape[0]} channels but dataset.json declares "
                               f"{num_channels}; declare {head.array.shape[0]} (one file) or give one file per channel")
    parts = [head]
    for c in range(1, num_channels):
        path = channel_file(first, c)
        if not path.is_file():
            why = " (an RGB image in one file is read as its three channels; this one is grey)" if c == 1 else ""
            raise DataError(path, f"channel {c} of case {first.name} is missing{why}")
        part = read_image(path, volume_axes, channels=1 if suffix_of(path) in PIL_SUFFIXES else None,
                          hint=f"a file of one channel of a {num_channels}-channel case must be grey")
        if part.array.shape[1:] != parts[0].array.shape[1:]:
            raise DataError(path, f"channel shape {part.array.shape[1:]} differs from {first.name}'s "
                                  f"{parts[0].array.shape[1:]}")
        if part.spacing and parts[0].spacing and not np.allclose(part.spacing, parts[0].spacing, rtol=1e-3):
            raise DataError(path, f"channel spacing {part.spacing} differs from {first.name}'s {parts[0].spacing}")
        parts.append(part)
    out = parts[0]
    if num_channels > 1:
        out = LoadedImage(np.concatenate([p.array for p in parts]), first, out.kind, out.reference, out.spacing)
    return out


@register_reader("nnunet")
class NnUNetReader:
    """The nnU-Net folder layout, with unlabeled images from a folder or a list.

    Splits: ``train`` and ``val`` (a fold of ``splits_final.json``, or a seeded hold-out of
    ``val_fraction`` of the labeled cases), ``test`` when ``labelsTs/`` exists.
    :meth:`unlabeled_cases` gives the unlabeled images that go with ``train``.

    Attributes:
        name: ``"nnunet"``.
        spatial_dims: 2 for PNG/TIF data, 3 for NIfTI/NRRD/MHA (unless set).
        num_classes: largest label value of dataset.json + 1.
        class_names: names by class id.
        channel_names: input channel names (``in_channels`` = their number).
        label_values: the values dataset.json declares.
        file_ending: e.g. ``.nii.gz``.
    """

    name: str = "nnunet"

    def __init__(
        self,
        root: str | Path,
        unlabeled_dir: str | None = "imagesUnlabeled",
        unlabeled_list: str | None = None,
        splits_file: str = "splits_final.json",
        fold: int = 0,
        val_fraction: float = 0.2,
        seed: int = 0,
        normalize: str = "zscore",
        spatial_dims: int | None = None,
        num_classes: int | None = None,
        colour_to_grey: bool = False,
    ) -> None:
        """Read dataset.json and check the options.

        Args:
            root: the dataset folder.
            unlabeled_dir: folder of unlabeled images (same naming as imagesTr) [default
                ``imagesUnlabeled``; skipped when absent]; None for none.
            unlabeled_list: text file (relative to root) with one ``<case>_0000`` image path a line
                (relative to root or absolute), added to the unlabeled cases.
            splits_file: nnU-Net folds file relative to root; used when present.
            fold: which fold of ``splits_file``.
            val_fraction: without a folds file, this fraction of the labeled cases (at least
                one) is held out as ``val`` with ``seed`` [default 0.2]; 0 gives no ``val`` split.
            seed: seed of that hold-out.
            normalize: per case and channel, ``"zscore"`` [default, nnU-Net's for non-CT],
                ``"minmax"``, ``"rgb_to_0_1"`` (8-bit colour divided by 255, nnU-Net's for natural
                images) or ``"none"``.
            spatial_dims: 2 or 3; default from ``file_ending`` (2D for PNG/TIF, else 3D).
            num_classes: override (must cover every label value of dataset.json).
            colour_to_grey: a dataset that declares one channel: convert colour images to grey
                (luma) instead of refusing them [default False].

        Raises:
            DataError: missing root, dataset.json or imagesTr.
            ConfigError: bad options.
        """
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(self.root, "dataset root folder is missing")
        info = read_dataset_json(self.root / "dataset.json")
        if not (self.root / "imagesTr").is_dir():
            raise DataError(self.root / "imagesTr", "imagesTr folder is missing")
        self.channel_names: list[str] = info["channels"]
        self.label_values = set(info["labels"])
        needed = max(self.label_values) + 1
        if num_classes is not None and num_classes < needed:
            raise ConfigError(f"num_classes={num_classes} does not cover label value {needed - 1} of dataset.json")
        self.num_classes = int(num_classes or needed)
        self.class_names = [info["labels"].get(c, f"class{c}") for c in range(self.num_classes)]
        self.file_ending = info["file_ending"] or self._guess_ending()
        if spatial_dims is None:
            spatial_dims = 2 if self.file_ending.lower() in PIL_SUFFIXES else 3
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if self.file_ending.lower() not in ITK_SUFFIXES + PIL_SUFFIXES:
            raise DataError(self.root / "dataset.json", f"unsupported file_ending {self.file_ending!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.spatial_dims = int(spatial_dims)
        self.unlabeled_dir = unlabeled_dir
        self.unlabeled_list = unlabeled_list
        self.splits_file = splits_file
        self.fold = int(fold)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.normalize = normalize
        self.colour_to_grey = bool(colour_to_grey)
        if self.colour_to_grey and self.in_channels != 1:
            raise ConfigError(f"colour_to_grey applies to a dataset that declares one channel; dataset.json "
                              f"declares {self.in_channels} ({', '.join(self.channel_names)})")
        self._label_dirs: dict[str, Path] = {}
        self._unsuffixed: list[Path] = []  # image files without the _0000 channel suffix

    def __repr__(self) -> str:
        return f"NnUNetReader(root={str(self.root)!r}, {self.spatial_dims}D, {len(self.channel_names)} channels)"

    @classmethod
    def declared_preprocessing(cls, options: dict) -> dict:
        """Raw files, normalised on load with the ``normalize`` option; nothing stored normalised."""
        default = inspect.signature(cls.__init__).parameters["normalize"].default
        return {"on_load": options.get("normalize", default), "stored": "none", "volume_axes": "zyx",  # SimpleITK's
                "colour_to_grey": bool(options.get("colour_to_grey", False))}

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)

    def _guess_ending(self) -> str:
        for p in sorted((self.root / "imagesTr").iterdir()):
            name = p.name.lower()
            for ending in ITK_SUFFIXES + PIL_SUFFIXES:
                if name.endswith(ending) and _CHANNEL_RE.match(p.name[: -len(ending)]):
                    return ".nii.gz" if name.endswith(".nii.gz") else ending
        raise DataError(self.root / "dataset.json", "no file_ending and no <case>_0000.<ext> file in imagesTr")

    # -- case discovery ---------------------------------------------------------------------------
    def _case_files(self, folder: Path) -> dict[str, Path]:
        """Case id -> its ``_0000`` file, for every case with any channel file in ``folder``."""
        cases: dict[str, Path] = {}
        if not folder.is_dir():
            return cases
        for p in folder.iterdir():
            stem = _strip_ending(p.name, self.file_ending)
            m = _CHANNEL_RE.match(stem) if stem else None
            if m:
                cases.setdefault(m.group("case"), folder / f"{m.group('case')}_0000{self.file_ending}")
            elif stem:
                self._unsuffixed.append(p)
        return cases

    def _labeled(self, images: str, labels: str) -> list[CaseRef]:
        """Cases of an images/labels folder pair; a label without an image keeps the expected
        image path, and an image without a label is kept too, so that load() reports either."""
        image_cases = self._case_files(self.root / images)
        label_cases = {}
        if (self.root / labels).is_dir():
            for p in (self.root / labels).iterdir():
                stem = _strip_ending(p.name, self.file_ending)
                if stem:
                    label_cases[stem] = p
        ids = sorted(set(image_cases) | set(label_cases))
        refs = []
        for case in ids:
            path = image_cases.get(case, self.root / images / f"{case}_0000{self.file_ending}")
            self._label_dirs[case] = self.root / labels
            refs.append(CaseRef(case_id=case, path=str(path), group=case))
        return refs

    def _train_val(self) -> tuple[list[CaseRef], list[CaseRef]]:
        refs = self._labeled("imagesTr", "labelsTr")
        if not refs:
            hint = ""
            if self._unsuffixed:
                hint = f" ({self._unsuffixed[0].name} and others lack the _0000 channel suffix)"
            raise DataError(self.root / "imagesTr",
                            f"no <case>_0000{self.file_ending} files: empty labeled set{hint}")
        folds_path = self.root / self.splits_file
        if folds_path.is_file():
            try:
                folds = json.loads(folds_path.read_text())
                chosen = folds[self.fold]
                val_ids = set(chosen["val"])
                train_ids = set(chosen["train"])
            except (json.JSONDecodeError, IndexError, KeyError, TypeError) as exc:
                raise DataError(folds_path, f"fold {self.fold} not readable as {{'train': [...], 'val': [...]}} ({exc})") from None
            unknown = (val_ids | train_ids) - {r.case_id for r in refs}
            if unknown:
                raise DataError(folds_path, f"cases not in imagesTr/labelsTr: {sorted(unknown)[:10]}")
            return [r for r in refs if r.case_id in train_ids], [r for r in refs if r.case_id in val_ids]
        if self.val_fraction == 0 or len(refs) < 2:
            return refs, []
        n_val = max(1, round(self.val_fraction * len(refs)))
        held = set(np.random.default_rng(self.seed).permutation(len(refs))[:n_val].tolist())
        return [r for i, r in enumerate(refs) if i not in held], [r for i, r in enumerate(refs) if i in held]

    def splits(self) -> list[str]:
        """``train``, ``val`` (when something is held out) and ``test`` (when labelsTs exists)."""
        out = ["train"]
        if self.val_fraction > 0 or (self.root / self.splits_file).is_file():
            out.append("val")
        if (self.root / "labelsTs").is_dir():
            out.append("test")
        return out

    def cases(self, split: str) -> list[CaseRef]:
        """Labeled cases of a split, by case id.

        Raises:
            ConfigError: unknown split.
            DataError: empty imagesTr, or a bad folds file.
        """
        if split == "train":
            return self._train_val()[0]
        if split == "val":
            return self._train_val()[1]
        if split == "test":
            return self._labeled("imagesTs", "labelsTs")
        raise ConfigError(f"unknown split {split!r}; the nnU-Net reader has train, val, test")

    def unlabeled_cases(self, split: str = "train") -> list[CaseRef]:
        """Unlabeled cases for training: ``unlabeled_dir`` and ``unlabeled_list`` (``train`` only).

        Raises:
            DataError: the list file is missing, or names a file that is not a ``_0000`` image.
        """
        if split != "train":
            return []
        refs: list[CaseRef] = []
        if self.unlabeled_dir:
            for case, path in sorted(self._case_files(self.root / self.unlabeled_dir).items()):
                refs.append(CaseRef(case_id=f"unlabeled_{case}", path=str(path), group=f"unlabeled_{case}"))
        if self.unlabeled_list:
            listing = self.root / self.unlabeled_list
            if not listing.is_file():
                raise DataError(listing, "unlabeled list file is missing")
            for line in listing.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                path = Path(line.strip())
                path = path if path.is_absolute() else self.root / path
                stem = _strip_ending(path.name, self.file_ending)
                m = _CHANNEL_RE.match(stem) if stem else None
                if not m or m.group("channel") != "0000":
                    raise DataError(listing, f"{line.strip()!r} is not a <case>_0000{self.file_ending} image path")
                case = m.group("case")
                refs.append(CaseRef(case_id=f"unlabeled_{case}", path=str(path), group=f"unlabeled_{case}"))
        return refs

    # -- loading -------------------------------------------------------------------------------------
    def _read_label(self, path: Path) -> tuple[np.ndarray, tuple[float, ...] | None]:
        """Integer label array in the image's axis order, and its spacing (array order)."""
        if self.file_ending.lower() in PIL_SUFFIXES:
            return read_label_png(path)[0], None
        import SimpleITK as sitk

        try:
            img = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise DataError(path, f"cannot read label ({str(exc).strip().splitlines()[0]})") from None
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise DataError(path, "label has more than one component per voxel")
        return sitk.GetArrayFromImage(img), tuple(float(s) for s in img.GetSpacing())[::-1]

    def load(self, ref: CaseRef) -> Case:
        """Load all channels of a case, and its label when it has one; check them against each other.

        Raises:
            DataError: naming the file: missing image/channel/label, unreadable file, shape or
                spacing mismatch between channels or between image and label, label values
                outside dataset.json.
        """
        first = Path(ref.path)
        if not first.is_file():
            raise DataError(first, f"image of case {ref.case_id!r} is missing (a label without its image?)")
        img = read_case_channels(first, self.in_channels, colour_to_grey=self.colour_to_grey)
        image = img.array
        if self.normalize == "rgb_to_0_1":
            check_rgb_range(image, first)
        if self.spatial_dims == 2 and image.ndim == 4 and image.shape[1] == 1:
            image = image[:, 0]  # a single-slice NIfTI used as a 2D image
        if image.ndim - 1 != self.spatial_dims:
            raise DataError(first, f"image has {image.ndim - 1} spatial axes {image.shape[1:]}, "
                                   f"the dataset is {self.spatial_dims}D")
        spacing = img.spacing[-self.spatial_dims:] if img.spacing else None
        label = None
        label_dir = self._label_dirs.get(ref.case_id)
        if label_dir is None and not ref.case_id.startswith("unlabeled_"):
            label_dir = self.root / "labelsTr"
        if label_dir is not None:
            label_path = label_dir / f"{ref.case_id}{self.file_ending}"
            if not label_path.is_file():
                raise DataError(label_path, f"label of image {first.name} is missing")
            raw, label_spacing = self._read_label(label_path)
            if self.spatial_dims == 2 and raw.ndim == 3 and raw.shape[0] == 1:
                raw = raw[0]
            if raw.shape != image.shape[1:]:
                raise DataError(label_path, f"label shape {tuple(raw.shape)} differs from image {first.name} "
                                            f"shape {tuple(image.shape[1:])}")
            if spacing and label_spacing:
                ls = label_spacing[-self.spatial_dims:]
                if not np.allclose(ls, spacing, rtol=1e-3, atol=1e-5):
                    raise DataError(label_path, f"label spacing {tuple(round(s, 5) for s in ls)} differs from "
                                                f"image {first.name} spacing {tuple(round(s, 5) for s in spacing)}")
            label = check_label_values(raw, self.label_values, str(label_path))
        # A case that loaded without a _0001 file holds all its channels in one file (RGB).
        files = 1 if self.in_channels == 1 or not channel_file(first, 1).is_file() else self.in_channels
        meta: dict = {"kind": "volume" if self.spatial_dims == 3 else "image",
                      "image_files": [str(channel_file(first, c)) for c in range(files)]}
        if img.reference is not None:
            ref_img = img.reference
            meta["geometry"] = {"spacing": tuple(ref_img.GetSpacing()), "origin": tuple(ref_img.GetOrigin()),
                                "direction": tuple(ref_img.GetDirection())}
        return Case(case_id=ref.case_id, image=normalize(image, self.normalize), label=label, spacing=spacing,
                    group=ref.group, source=str(first), meta=meta)
