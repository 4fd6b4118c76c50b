"""Reader for MOSXAV (multi-object segmentation in X-ray angiography videos).

Layout of the release::

    <root>/trainval/JPEGImages/v<NN>/<5-digit>.jpg           every frame of a sequence
    <root>/trainval/Annotations_Semantic/v<NN>/<5-digit>.png palette PNG, index = class id
                                                              (every 5th frame is annotated)
    <root>/trainval/ImageSets/train.txt, val.txt              sequence names, one a line
    <root>/test/JPEGImages/..., test/Annotations_Semantic/... every frame annotated;
                                                              ``test/ImageSets/test.txt`` optional

Classes 0-4: background, vessel, contrast catheter, catheter, balloon. The test masks add a
class 5 ("others") that the training set never has; by default it becomes an ignore value that
evaluation leaves out. Annotated frames are labeled, all other frames unlabeled, and a split is a
set of sequences, never of frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from semidiff.data.image_io import (
    frame_reader_preprocessing,
    normalize,
    read_image,
    read_label_png,
)
from semidiff.data.readers import register_reader
from semidiff.data.record import Case, CaseRef, check_label_values
from semidiff.errors import ConfigError, DataError

__all__ = ["MOSXAV_CLASSES", "MOSXAV_DEFAULT_PALETTE", "MosxavReader"]

MOSXAV_CLASSES = ("background", "vessel", "contrast_catheter", "catheter", "balloon")
# Fallback palette (the PASCAL VOC/DAVIS one) for writing predictions when no mask can be read;
# otherwise the palette of the dataset's own masks is used.
MOSXAV_DEFAULT_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128, 128, 0, 128]
_SPLIT_PART = {"train": "trainval", "val": "trainval", "test": "test"}


@register_reader("mosxav")
class MosxavReader:
    """MOSXAV frames as labeled (annotated) and unlabeled 2D cases, split by sequence.

    Attributes:
        name: ``"mosxav"``.
        spatial_dims: 2.
        num_classes: 5 by default.
        class_names: :data:`MOSXAV_CLASSES`.
        ignore_index: label value of pixels evaluation ignores (the test set's class 5), or None.
        palette: flat ``[r, g, b, ...]`` palette of the masks, for writing predictions.
    """

    name: str = "mosxav"
    spatial_dims: int = 2
    default_palette: list[int] = MOSXAV_DEFAULT_PALETTE

    def __init__(
        self,
        root: str | Path,
        num_classes: int = 5,
        test_ignore_class: int | None = 5,
        ignore_index: int = 255,
        channels: int = 1,
        normalize: str = "minmax",
    ) -> None:
        """Create a reader; checks the root folder and the options.

        Args:
            root: the MOSXAV folder (holding ``trainval/`` and ``test/``).
            num_classes: classes including background.
            test_ignore_class: test-set class turned into ``ignore_index`` [default 5, "others"];
                None keeps it as a class (then ``num_classes`` must include it).
            ignore_index: the value ignored pixels get in the label map.
            channels: 1 [default] grey (the frames are grey X-ray), or 3 RGB.
            normalize: intensity scaling per frame, ``"minmax"`` [default], ``"zscore"`` or ``"none"``.

        Raises:
            DataError: the root folder is missing.
            ConfigError: a bad option.
        """
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(self.root, "dataset root folder is missing")
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {channels}")
        if 0 <= ignore_index < num_classes:
            raise ConfigError(f"ignore_index {ignore_index} collides with a class id (num_classes={num_classes})")
        self.num_classes = int(num_classes)
        self.class_names = list(MOSXAV_CLASSES[:num_classes]) + [
            f"class{c}" for c in range(len(MOSXAV_CLASSES), num_classes)
        ]
        self.test_ignore_class = test_ignore_class
        self.ignore_index = int(ignore_index) if test_ignore_class is not None else None
        self.channels = int(channels)
        self.normalize = normalize
        self._palette: list[int] | None = None

    def __repr__(self) -> str:
        return f"MosxavReader(root={str(self.root)!r})"

    @classmethod
    def declared_preprocessing(cls, options: dict) -> dict:
        """Raw files, normalised on load with the ``normalize`` option; nothing stored normalised."""
        return frame_reader_preprocessing(cls, options)

    @property
    def palette(self) -> list[int]:
        """The masks' palette (from the first annotation found), else :data:`MOSXAV_DEFAULT_PALETTE`."""
        if self._palette is None:
            for part in ("trainval", "test"):
                first = next(iter(sorted((self.root / part / "Annotations_Semantic").glob("*/*.png"))), None)
                if first is not None:
                    try:
                        _, pal = read_label_png(first)
                    except DataError:
                        continue
                    if pal:
                        self._palette = pal
                        break
            if self._palette is None:
                self._palette = list(MOSXAV_DEFAULT_PALETTE)
        return self._palette

    def splits(self) -> list[str]:
        """``train``/``val`` when their ImageSets list exists, ``test`` when ``test/JPEGImages`` does."""
        out = [s for s in ("train", "val") if (self.root / "trainval" / "ImageSets" / f"{s}.txt").is_file()]
        if (self.root / "test" / "JPEGImages").is_dir():
            out.append("test")
        return out

    def _sequences(self, split: str) -> list[str]:
        """Sequence names of a split: its ImageSets list, or every test sequence folder."""
        part = _SPLIT_PART[split]
        listing = self.root / part / "ImageSets" / f"{split}.txt"
        if listing.is_file():
            names = []
            for line in listing.read_text(encoding="utf-8").splitlines():
                entry = line.strip()
                if entry:
                    # Entries may name frames (``v01/00005``); the split unit is their sequence.
                    names.append(entry.split("/")[0])
            names = list(dict.fromkeys(names))
            if not names:
                raise DataError(listing, "sequence list holds no names")
            return names
        if split == "test" and (self.root / part / "JPEGImages").is_dir():
            return sorted(p.name for p in (self.root / part / "JPEGImages").iterdir() if p.is_dir())
        raise DataError(listing, "sequence list file is missing")

    def _refs(self, split: str, labeled: bool) -> list[CaseRef]:
        if split not in _SPLIT_PART:
            raise ConfigError(f"unknown MOSXAV split {split!r}; known splits: {list(_SPLIT_PART)}")
        part = _SPLIT_PART[split]
        refs = []
        for seq in self._sequences(split):
            frame_dir = self.root / part / "JPEGImages" / seq
            ann_dir = self.root / part / "Annotations_Semantic" / seq
            if not frame_dir.is_dir():
                raise DataError(frame_dir, f"frame folder of sequence {seq!r} (split {split!r}) is missing")
            frames = {p.stem: p for p in frame_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
            annotated = {p.stem for p in ann_dir.glob("*.png")} if ann_dir.is_dir() else set()
            if labeled:
                # An annotation without its frame keeps the expected frame path, so load() names it.
                for stem in sorted(annotated):
                    path = frames.get(stem, frame_dir / f"{stem}.jpg")
                    refs.append(CaseRef(case_id=f"{part}_{seq}_{stem}", path=str(path), group=f"{part}/{seq}"))
            else:
                for stem in sorted(set(frames) - annotated):
                    refs.append(CaseRef(case_id=f"{part}_{seq}_{stem}", path=str(frames[stem]), group=f"{part}/{seq}"))
        return refs

    def cases(self, split: str) -> list[CaseRef]:
        """The annotated frames of a split's sequences, in sequence then frame order.

        Raises:
            ConfigError: unknown split.
            DataError: missing sequence list or frame folder.
        """
        return self._refs(split, labeled=True)

    def unlabeled_cases(self, split: str = "train") -> list[CaseRef]:
        """The frames without annotation of a split's sequences."""
        return self._refs(split, labeled=False)

    def _mask_path(self, ref: CaseRef) -> Path:
        frame = Path(ref.path)
        part, seq = ref.group.split("/", 1)
        return self.root / part / "Annotations_Semantic" / seq / f"{frame.stem}.png"

    def load(self, ref: CaseRef) -> Case:
        """Load a frame and, when it is annotated, its mask (test class 5 -> ``ignore_index``).

        Raises:
            DataError: naming the frame or mask file.
        """
        # channels 1 is this reader's documented conversion of colour frames to grey
        img = read_image(ref.path, channels=self.channels, colour_to_grey=True)
        image = normalize(img.array, self.normalize)
        mask_path = self._mask_path(ref)
        label = None
        meta: dict = {"kind": "frame", "sequence": ref.group}
        if mask_path.is_file():
            raw, pal = read_label_png(mask_path)
            if pal and self._palette is None:
                self._palette = pal
            if raw.shape != image.shape[1:]:
                raise DataError(mask_path, f"mask shape {tuple(raw.shape)} differs from frame {ref.path} "
                                           f"shape {tuple(image.shape[1:])}")
            is_test = ref.group.startswith("test/")
            ignore = None
            if is_test and self.test_ignore_class is not None:
                raw = np.where(raw == self.test_ignore_class, self.ignore_index, raw)
                ignore = self.ignore_index
            label = check_label_values(raw, set(range(self.num_classes)), str(mask_path), ignore_index=ignore)
            if ignore is not None:
                meta["ignore_index"] = ignore
            meta["label_file"] = str(mask_path)
        return Case(case_id=ref.case_id, image=image, label=label, spacing=None, group=ref.group,
                    source=ref.path, meta=meta)
