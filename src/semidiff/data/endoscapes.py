"""Reader for EndoScapes2023 (laparoscopic cholecystectomy frames, 7 classes with background).

Layout of the official release::

    <root>/train/<video>_<frame>.jpg        all 1 fps frames of the 120 training videos (+ COCO jsons)
    <root>/val/, test/                       likewise for the 41 / 40 other videos
    <root>/train_seg/<video>_<frame>.jpg     frames of the 30 Seg50 training videos
    <root>/train_seg/annotation_coco.json    instance masks of the annotated Seg50 frames
    <root>/val_seg/, test_seg/               likewise (10 + 10 videos)
    <root>/semseg/<video>_<frame>.png        semantic masks, class id in every channel
    <root>/{train,val,test}_vids.txt         video ids (written as floats, e.g. ``1.0e+00``)
    <root>/{train,val,test}_seg_vids.txt     Seg50 video ids
    <root>/12_5/train_{0,1,2}/, 25/train_{0,1,2}/   official partial-label folds (frames + jsons)

Labeled items are the frames with a mask (``semseg/``, or the COCO instance annotations with
``mask_source="coco"``); unlabeled items are the other frames of the training videos. The group of
every item is its video, so frames of one video never cross splits.

The Seg50 subset alone (``train_seg/``, ``val_seg/``, ``semseg/``, ``*_seg_vids.txt``; no ``train/``,
no COCO files) is read as it is: every training frame then has a mask, and a semi-supervised run makes
the frames of the videos after the first ``data.labeled`` ones unlabeled (their masks are dropped
before any method sees them, engine/data.py). :meth:`EndoscapesReader.describe` says what was found.

Mask value 255 marks pixels that were not annotated: it is kept as
:data:`~semidiff.data.record.IGNORE_INDEX` (no loss, no metric there). Any other value outside the
classes is an error naming the mask file, unless ``treat_as_ignore`` declares it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from semidiff.data.image_io import (
    frame_reader_preprocessing,
    normalize,
    read_image,
    read_label_png,
)
from semidiff.data.readers import register_reader
from semidiff.data.record import IGNORE_INDEX, Case, CaseRef, check_label_values
from semidiff.errors import ConfigError, DataError

__all__ = ["ENDOSCAPES_CLASSES", "EndoscapesReader", "read_video_list"]

ENDOSCAPES_CLASSES = (
    "background",
    "cystic_plate",
    "hepatocystic_triangle",
    "cystic_artery",
    "cystic_duct",
    "gallbladder",
    "tool",
)
_SPLITS = ("train", "val", "test")
_FRAME_RE = re.compile(r"^(\d+)_(\d+)$")
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_UNLABELED_SOURCES = ("same_videos", "other_videos", "all")


def read_video_list(path: Path) -> list[str]:
    """Video ids of an EndoScapes ``*_vids.txt`` file, as plain integers in text.

    The official files write ids as floats in scientific notation (``1.000000000000000000e+00``).

    Raises:
        DataError: missing file, or a line that is not a number.
    """
    if not path.is_file():
        raise DataError(path, "video list file is missing")
    ids = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            ids.append(str(int(float(line.strip()))))
        except ValueError:
            raise DataError(path, f"line {n} is not a video id: {line.strip()!r}") from None
    return ids


def _frame_key(frame_id: str) -> tuple[int, int]:
    """Numeric (video, frame) sort key of ``<video>_<frame>``."""
    m = _FRAME_RE.match(frame_id)
    return (int(m.group(1)), int(m.group(2))) if m else (1 << 30, 0)


def _video_of(frame_id: str) -> str:
    return frame_id.split("_", 1)[0]


@register_reader("endoscapes")
class EndoscapesReader:
    """EndoScapes2023 frames as labeled/unlabeled 2D cases.

    Splits ``train``, ``val`` and ``test`` give the labeled frames of their videos;
    :meth:`unlabeled_cases` gives the unlabeled frames that go with ``train``.

    Attributes:
        name: ``"endoscapes"``.
        spatial_dims: 2.
        num_classes: 7 (background and six structures).
        class_names: :data:`ENDOSCAPES_CLASSES`.
        palette: None (masks hold class ids as grey values; predictions are written the same way).
    """

    name: str = "endoscapes"
    spatial_dims: int = 2
    palette: list[int] | None = None

    def __init__(
        self,
        root: str | Path,
        num_classes: int = 7,
        labeled_videos: str = "seg",
        unlabeled_source: str = "same_videos",
        mask_source: str = "semseg",
        channels: int = 3,
        normalize: str = "minmax",
        treat_as_ignore: list[int] | tuple[int, ...] = (),
    ) -> None:
        """Create a reader; checks the root folder and the options.

        Args:
            root: the EndoScapes2023 folder.
            num_classes: classes including background.
            labeled_videos: which training videos give labeled frames: ``"seg"`` [default] the
                Seg50 list ``train_seg_vids.txt``, or an official partial-label fold folder such
                as ``"12_5/train_0"`` or ``"25/train_2"`` (its videos, limited to those with masks).
            unlabeled_source: where unlabeled frames come from: ``"same_videos"`` [default] the
                unmasked frames of the labeled videos, ``"other_videos"`` the frames of the other
                training videos (``train_vids.txt``), or ``"all"`` both.
            mask_source: ``"semseg"`` [default] the semantic PNGs, or ``"coco"`` the instance
                masks of ``<split>_seg/annotation_coco.json`` (needs pycocotools), painted
                largest first so that small structures stay visible where instances overlap.
            channels: 3 [default] RGB, or 1 grey.
            normalize: intensity scaling per frame and channel, ``"minmax"`` [default], ``"zscore"``
                or ``"none"`` (use the same value as ``data.normalize`` for ``semidiff predict``).
            treat_as_ignore: mask values outside the classes to read as not annotated (255) instead
                of refusing the file, e.g. ``[7]`` for the one Seg50 validation mask that holds 7.

        Raises:
            DataError: the root folder is missing.
            ConfigError: a bad option.
        """
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(self.root, "dataset root folder is missing")
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        if unlabeled_source not in _UNLABELED_SOURCES:
            raise ConfigError(f"unlabeled_source must be one of {list(_UNLABELED_SOURCES)}, got {unlabeled_source!r}")
        if mask_source not in ("semseg", "coco"):
            raise ConfigError(f"mask_source must be 'semseg' or 'coco', got {mask_source!r}")
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {channels}")
        if labeled_videos != "seg" and not (self.root / labeled_videos).is_dir():
            raise ConfigError(f"labeled_videos={labeled_videos!r}: no fold folder {self.root / labeled_videos} "
                              "(use 'seg' or an official fold such as '12_5/train_0' or '25/train_1')")
        extra = sorted({int(v) for v in treat_as_ignore})
        bad = [v for v in extra if 0 <= v < num_classes or v == IGNORE_INDEX or not 0 <= v <= 255]
        if bad:
            raise ConfigError(f"treat_as_ignore: {bad} must be 8-bit values other than the class ids "
                              f"0..{num_classes - 1} and {IGNORE_INDEX} (already ignored)")
        self.treat_as_ignore = extra
        self.num_classes = int(num_classes)
        self.class_names = list(ENDOSCAPES_CLASSES[:num_classes])
        self.labeled_videos = labeled_videos
        self.unlabeled_source = unlabeled_source
        self.mask_source = mask_source
        self.channels = int(channels)
        self.normalize = normalize
        self._frames: dict[str, dict[str, Path]] = {}  # split -> frame id -> image file
        self._labels: dict[str, tuple[str, object]] = {}  # frame id -> ("semseg", png) | ("coco", (coco, img id))
        self._coco: dict[str, object] = {}

    def __repr__(self) -> str:
        return f"EndoscapesReader(root={str(self.root)!r}, labeled_videos={self.labeled_videos!r})"

    @classmethod
    def declared_preprocessing(cls, options: dict) -> dict:
        """Raw files, normalised on load with the ``normalize`` option; nothing stored normalised."""
        return frame_reader_preprocessing(cls, options)

    # -- video lists and frame index -------------------------------------------------------
    def splits(self) -> list[str]:
        """Splits whose video list (``<split>_seg_vids.txt`` or ``<split>_vids.txt``) exists."""
        found = [s for s in _SPLITS if (self.root / f"{s}_seg_vids.txt").is_file()
                 or (self.root / f"{s}_vids.txt").is_file()]
        self._check_disjoint(found)
        return found

    def _check_disjoint(self, splits: list[str]) -> None:
        """Frames of one video must never cross splits: the video lists must not overlap."""
        owner: dict[str, str] = {}
        for s in splits:
            for f in (f"{s}_vids.txt", f"{s}_seg_vids.txt"):
                if not (self.root / f).is_file():
                    continue
                for v in read_video_list(self.root / f):
                    other = owner.setdefault(v, s)
                    if other != s:
                        raise DataError(self.root / f, f"video {v} is listed in split {s!r} and in split {other!r}")

    def _all_videos(self, split: str) -> list[str]:
        """All videos of a split (``<split>_vids.txt``), or its Seg50 videos when that is absent."""
        path = self.root / f"{split}_vids.txt"
        return read_video_list(path) if path.is_file() else self._seg_videos(split)

    def _seg_videos(self, split: str) -> list[str]:
        return read_video_list(self.root / f"{split}_seg_vids.txt")

    def _fold_videos(self) -> list[str]:
        """Videos of an official partial-label fold: its frames, else its COCO json's images."""
        fold = self.root / self.labeled_videos
        names = [p.stem for p in fold.iterdir() if p.suffix.lower() in _IMAGE_EXTS]
        if not names and (fold / "annotation_coco.json").is_file():
            info = json.loads((fold / "annotation_coco.json").read_text())
            names = [Path(im["file_name"]).stem for im in info.get("images", [])]
        videos = sorted({_video_of(n) for n in names if _FRAME_RE.match(n)}, key=int)
        if not videos:
            raise DataError(fold, "partial-label fold holds no frames named <video>_<frame>")
        return videos

    def _labeled_video_set(self, split: str) -> list[str]:
        if split == "train" and self.labeled_videos != "seg":
            return self._fold_videos()
        path = self.root / f"{split}_seg_vids.txt"
        return read_video_list(path) if path.is_file() else self._all_videos(split)

    def _frame_index(self, split: str) -> dict[str, Path]:
        """Frame id -> image file over ``<split>/`` and ``<split>_seg/`` (cached)."""
        if split not in self._frames:
            index: dict[str, Path] = {}
            for folder in (self.root / split, self.root / f"{split}_seg"):
                if folder.is_dir():
                    for p in folder.iterdir():
                        if p.suffix.lower() in _IMAGE_EXTS and _FRAME_RE.match(p.stem):
                            index.setdefault(p.stem, p)
            self._frames[split] = index
        return self._frames[split]

    # -- labeled frames ----------------------------------------------------------------------
    def _masked_frames(self, split: str) -> dict[str, tuple[str, object]]:
        """Frame id -> label source for the frames of ``split`` that carry a mask."""
        if self.mask_source == "semseg":
            folder = self.root / "semseg"
            if not folder.is_dir():
                raise DataError(folder, "semantic mask folder is missing")
            return {p.stem: ("semseg", p) for p in folder.glob("*.png") if _FRAME_RE.match(p.stem)}
        coco = self._coco_of(split)
        out = {}
        where = self.root / f"{split}_seg" / "annotation_coco.json"
        for img_id, im in coco.imgs.items():
            out[Path(im["file_name"]).stem] = ("coco", (coco, img_id, where))
        return out

    def _coco_of(self, split: str):
        """The pycocotools index of ``<split>_seg/annotation_coco.json`` (loaded once)."""
        if split not in self._coco:
            try:
                from pycocotools.coco import COCO
            except ImportError:
                raise ConfigError("mask_source='coco' needs pycocotools: pip install 'semidiff[endoscapes]' "
                                  "(or pip install pycocotools)") from None
            path = self.root / f"{split}_seg" / "annotation_coco.json"
            if not path.is_file():
                raise DataError(path, "COCO annotation file is missing")
            import contextlib
            import io

            try:
                with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress lines
                    self._coco[split] = COCO(str(path))
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(path, f"not a readable COCO annotation file ({type(exc).__name__}: {exc})") from None
        return self._coco[split]

    def cases(self, split: str) -> list[CaseRef]:
        """The labeled frames of a split's (labeled) videos, in the video list's order, then by frame.

        List order makes "the first N videos" (``data.labeled_unit: videos``) those of the list file.

        Raises:
            ConfigError: unknown split.
            DataError: missing video list or mask folder.
        """
        if split not in _SPLITS:
            raise ConfigError(f"unknown EndoScapes split {split!r}; known splits: {list(_SPLITS)}")
        rank = {v: i for i, v in enumerate(dict.fromkeys(self._labeled_video_set(split)))}
        masked = self._masked_frames(split)
        frames = self._frame_index(split)
        refs = []
        for fid in sorted((f for f in masked if _video_of(f) in rank),
                          key=lambda f: (rank[_video_of(f)], _frame_key(f))):
            self._labels[fid] = masked[fid]
            # A mask without its frame keeps the expected path, so load() names it.
            path = frames.get(fid, self.root / f"{split}_seg" / f"{fid}.jpg")
            refs.append(CaseRef(case_id=fid, path=str(path), group=_video_of(fid)))
        if not refs and split == "train" and self.labeled_videos != "seg":
            raise DataError(self.root / self.labeled_videos,
                            f"none of the fold's {len(rank)} videos has {self.mask_source} masks "
                            "(only the Seg50 videos of train_seg_vids.txt do): empty labeled set")
        return refs

    def unlabeled_cases(self, split: str = "train") -> list[CaseRef]:
        """Frames without a mask that go with ``split``, chosen by ``unlabeled_source``.

        Raises:
            DataError: ``other_videos``/``all`` without ``<split>_vids.txt``.
        """
        labeled_videos = set(self._labeled_video_set(split))
        if self.unlabeled_source == "same_videos":
            videos = labeled_videos
        else:
            path = self.root / f"{split}_vids.txt"
            if not path.is_file():
                raise DataError(path, f"unlabeled_source={self.unlabeled_source!r} needs the list of all {split} videos")
            others = set(read_video_list(path)) - labeled_videos
            videos = others if self.unlabeled_source == "other_videos" else others | labeled_videos
        masked = self._masked_frames(split)
        frames = self._frame_index(split)
        return [
            CaseRef(case_id=fid, path=str(frames[fid]), group=_video_of(fid))
            for fid in sorted(frames, key=_frame_key)
            if _video_of(fid) in videos and fid not in masked
        ]

    def describe(self) -> list[str]:
        """What this folder holds and lacks, one line each (``data inspect`` and ``train`` print them).

        Cheap: lists files, reads no image.
        """
        lines = []
        for split in self.splits():
            refs = self.cases(split)
            videos = self._labeled_video_set(split)
            lines.append(f"{split}: {len(videos)} videos listed, {len(refs)} frames with {self.mask_source} masks "
                         f"in {len({r.group for r in refs})} of them")
        if "train" in self.splits():
            lines.append(f"train: {len(self.unlabeled_cases('train'))} frames without a mask "
                         f"(unlabeled_source={self.unlabeled_source})")
        absent = [name for name in ("train/", "val/", "test/", "train_vids.txt", "train_seg/annotation_coco.json",
                                    "12_5/", "25/", "test_seg_vids.txt") if not (self.root / name.rstrip("/")).exists()]
        if absent:
            lines.append("not present: " + ", ".join(absent) + " (without train/ the unlabeled frames are those of "
                         "training videos left unlabeled by data.labeled; without the COCO files only "
                         "mask_source=semseg works)")
        return lines

    # -- loading -------------------------------------------------------------------------------
    def _label_source(self, fid: str) -> tuple[str, object] | None:
        """Where the mask of a frame is, or None for an unlabeled frame.

        Works for refs made by another instance too (e.g. a worker process).
        """
        if fid not in self._labels:
            if self.mask_source == "semseg":
                png = self.root / "semseg" / f"{fid}.png"
                if png.is_file():
                    self._labels[fid] = ("semseg", png)
            else:
                for split in _SPLITS:
                    if (self.root / f"{split}_seg" / "annotation_coco.json").is_file():
                        found = self._masked_frames(split).get(fid)
                        if found is not None:
                            self._labels[fid] = found
                            break
        return self._labels.get(fid)

    def _mask(self, fid: str, shape: tuple[int, int]) -> tuple[np.ndarray, str]:
        kind, src = self._labels[fid]
        if kind == "semseg":
            label, _ = read_label_png(src)
            return label, str(src)
        coco, img_id, json_path = src
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[img_id])), key=lambda a: -float(a.get("area", 0)))
        label = np.zeros(shape, dtype=np.int64)
        where = f"{json_path} (image id {img_id}, {fid})"
        for ann in anns:
            try:
                mask = coco.annToMask(ann).astype(bool)
            except Exception as exc:  # noqa: BLE001  pycocotools raises many types on bad polygons
                raise DataError(where, f"annotation {ann.get('id')} cannot be rasterised: {exc}") from None
            if mask.shape != shape:
                raise DataError(where, f"mask shape {mask.shape} differs from the frame's {shape}")
            label[mask] = int(ann["category_id"])
        return label, where

    def load(self, ref: CaseRef) -> Case:
        """Load a frame (channel first, scaled by ``normalize``) and its mask if it has one.

        Raises:
            DataError: naming the frame or mask file (missing, unreadable, size mismatch, bad ids).
        """
        # channels 1 is this reader's documented conversion of colour frames to grey
        img = read_image(ref.path, channels=self.channels, colour_to_grey=True)
        image = normalize(img.array, self.normalize)
        label = None
        meta = {"kind": "frame", "video": ref.group}
        if self._label_source(ref.case_id) is not None:
            raw, source = self._mask(ref.case_id, tuple(image.shape[1:]))
            if raw.shape != image.shape[1:]:
                raise DataError(source, f"mask shape {tuple(raw.shape)} differs from frame {ref.path} "
                                        f"shape {tuple(image.shape[1:])}")
            if self.treat_as_ignore:
                raw = np.where(np.isin(raw, self.treat_as_ignore), IGNORE_INDEX, raw)
            try:
                label = check_label_values(raw, set(range(self.num_classes)), source, ignore_index=IGNORE_INDEX)
            except DataError as exc:
                raise DataError(exc.path, f"{exc.problem} ({IGNORE_INDEX} = not annotated; declare another value "
                                          "as not annotated with reader_options.treat_as_ignore)") from None
            meta["label_file"] = source
            meta["ignore_index"] = IGNORE_INDEX  # evaluation leaves these pixels out
        return Case(case_id=ref.case_id, image=image, label=label, spacing=None, group=ref.group,
                    source=ref.path, meta=meta)
