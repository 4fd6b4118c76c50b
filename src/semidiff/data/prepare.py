"""Deterministic preparation of the public benchmarks from their raw downloads.

- LA 2018 (``<case>/lgemri.nrrd`` + ``<case>/laendo.nrrd``) -> the UA-MT h5 layout that the ``la``
  reader reads: ``2018LA_Seg_Training Set/<case>/mri_norm2.h5`` with ``image`` (float32, x/y/z,
  z-scored over the whole scan) and ``label`` (uint8, 0/1), cropped in x and y around the atrium.
  UA-MT widens that crop by a *random* 10-20 voxels; here the margin is a fixed option, so two
  runs write the same bytes.
- ACDC (``patientXXX/patientXXX_frameYY.nii.gz`` + ``_gt``) -> the SSL4MIS layout that the ``acdc``
  reader reads: ``data/<id>.h5`` volumes (S, H, W), ``data/slices/<id>_slice_<k>.h5`` for the
  training patients, ``train_slices.list``, ``val.list``, ``test.list``; images min-max scaled
  per volume.

Every run writes ``manifest.sha256`` (``sha256sum -c`` format) listing the files it wrote. HDF5
stores creation times unless told not to; every dataset is written with ``track_times=False`` so
that the output is byte-identical from run to run.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from semidiff.errors import DataError

__all__ = ["LA_FOLDER", "MANIFEST_NAME", "prepare_acdc", "prepare_la", "write_manifest"]

LA_FOLDER = "2018LA_Seg_Training Set"
MANIFEST_NAME = "manifest.sha256"
_ACDC_FRAME_RE = re.compile(r"^(patient\d+)_frame(\d+)\.nii(\.gz)?$")


def _read_itk(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Array in SimpleITK order (z, y, x) and spacing in the same order."""
    import SimpleITK as sitk

    if not path.is_file():
        raise DataError(path, "file is missing")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DataError(path, f"cannot read image ({str(exc).strip().splitlines()[0]})") from None
    return sitk.GetArrayFromImage(img), tuple(float(s) for s in img.GetSpacing())[::-1]


def _write_h5(path: Path, arrays: dict[str, np.ndarray], attrs: dict | None = None) -> Path:
    """Write datasets without timestamps (byte-identical reruns), gzip-compressed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value, compression="gzip", compression_opts=4, track_times=False)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(out: Path, files: list[Path]) -> Path:
    """Write ``manifest.sha256`` (sorted ``<sha256>  <relative path>`` lines) for ``files``."""
    lines = sorted(f"{_sha256(f)}  {f.relative_to(out).as_posix()}" for f in files)
    manifest = out / MANIFEST_NAME
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def _read_ids(path: str | Path | None) -> list[str]:
    if path is None:
        return []
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "id list file is missing")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_list(path: Path, ids: list[str]) -> Path:
    path.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    return path


# -- LA 2018 -----------------------------------------------------------------------------------------
def la_crop_box(label_xyz: np.ndarray, margin: int, min_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """x/y crop ``(x0, x1, y0, y1)`` (end exclusive) around the foreground, widened by ``margin``
    and, where the box is smaller than ``min_size`` (the training patch), evenly to that size."""
    box = []
    for axis, size in zip((0, 1), min_size):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(label_xyz.any(axis=other))
        lo, hi = int(present[0]), int(present[-1]) + 1
        pad = max(size - (hi - lo + 2 * margin), 0)
        lo = max(lo - margin - pad // 2, 0)
        hi = min(hi + margin + pad - pad // 2, label_xyz.shape[axis])
        box += [lo, hi]
    return tuple(box)  # type: ignore[return-value]


def prepare_la(
    raw: str | Path,
    out: str | Path,
    margin: int = 15,
    min_size: tuple[int, int] = (112, 112),
    test_list: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, list[str]]:
    """Convert the raw LA 2018 training set to the UA-MT h5 layout.

    Args:
        raw: folder holding ``<case>/lgemri.nrrd`` and ``<case>/laendo.nrrd`` (searched recursively,
            so the challenge's ``Training Set/`` parent works too).
        out: output folder (the ``la`` reader's root).
        margin: voxels kept around the atrium in x and y [default 15, the middle of UA-MT's random
            10-20].
        min_size: the crop is widened to at least this x/y size (UA-MT's 112x112 patch).
        test_list: optional file of case ids for ``test.list``; the others go to ``train.list``.
            Without it every case goes to ``train.list``.
        log: progress printer.

    Returns:
        ``{"train": ids, "test": ids}``.

    Raises:
        DataError: no cases, a missing or unreadable file, image/label shape mismatch, label
            values other than 0/255 (or 0/1), an empty label, an unknown id in ``test_list``.
    """
    raw, out = Path(raw), Path(out)
    images = sorted(raw.rglob("lgemri.nrrd"))
    if not images:
        raise DataError(raw, "no <case>/lgemri.nrrd files found")
    ids = [p.parent.name for p in images]
    if len(set(ids)) != len(ids):
        raise DataError(raw, "two cases share a folder name; give the folder of one set only")
    test_ids = _read_ids(test_list)
    unknown = sorted(set(test_ids) - set(ids))
    if unknown:
        raise DataError(test_list, f"case ids not in {raw}: {unknown[:5]}")
    written: list[Path] = []
    for n, image_path in enumerate(images, 1):
        case = image_path.parent.name
        label_path = image_path.parent / "laendo.nrrd"
        image_zyx, spacing_zyx = _read_itk(image_path)
        label_zyx, _ = _read_itk(label_path)
        if image_zyx.shape != label_zyx.shape:
            raise DataError(label_path, f"label shape {label_zyx.shape} differs from image shape {image_zyx.shape}")
        values = set(np.unique(label_zyx).tolist())
        if not values <= {0, 255} and not values <= {0, 1}:
            raise DataError(label_path, f"label values {sorted(values)[:6]} are not 0/255 (or 0/1)")
        # UA-MT's arrays are (x, y, z), as pynrrd reads them.
        image = np.ascontiguousarray(image_zyx.transpose(2, 1, 0)).astype(np.float64)
        label = np.ascontiguousarray(label_zyx.transpose(2, 1, 0) > 0).astype(np.uint8)
        if not label.any():
            raise DataError(label_path, "label is empty: no atrium to crop around")
        std = image.std()
        image = ((image - image.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
        x0, x1, y0, y1 = la_crop_box(label, margin, min_size)
        written.append(_write_h5(
            out / LA_FOLDER / case / "mri_norm2.h5",
            {"image": image[x0:x1, y0:y1], "label": label[x0:x1, y0:y1]},
            {"spacing": np.asarray(spacing_zyx[::-1], dtype=np.float64),
             "crop_xy": np.asarray([x0, x1, y0, y1], dtype=np.int64)},
        ))
        log(f"  [{n}/{len(images)}] {case}: {image.shape} -> {image[x0:x1, y0:y1].shape}")
    splits = {"train": [i for i in ids if i not in test_ids], "test": [i for i in ids if i in test_ids]}
    written.append(_write_list(out / "train.list", splits["train"]))
    if splits["test"]:
        written.append(_write_list(out / "test.list", splits["test"]))
    write_manifest(out, written)
    return splits


# -- ACDC --------------------------------------------------------------------------------------------
def prepare_acdc(
    raw: str | Path,
    out: str | Path,
    val_list: str | Path | None = None,
    test_list: str | Path | None = None,
    num_classes: int = 4,
    log: Callable[[str], None] = print,
) -> dict[str, list[str]]:
    """Convert raw ACDC NIfTI volumes to the SSL4MIS slices/volumes layout.

    Args:
        raw: folder with ``patientXXX/patientXXX_frameYY.nii.gz`` and ``..._gt.nii.gz`` (searched
            recursively, so the download's ``training/`` and ``testing/`` parents work).
        out: output folder (the ``acdc`` reader's root).
        val_list: optional file of patient ids (``patient081``) or volume ids for ``val.list``.
        test_list: likewise for ``test.list``; every other patient is a training patient.
        num_classes: label values must lie in ``[0, num_classes - 1]``.
        log: progress printer.

    Returns:
        ``{"train": slice ids, "val": volume ids, "test": volume ids}``.

    Raises:
        DataError: no frames, a missing ``_gt`` file, a shape mismatch, bad label values, a
            patient in both lists, or an unknown patient in a list.
    """
    raw, out = Path(raw), Path(out)
    frames = []
    for p in raw.rglob("patient*_frame*.nii*"):
        m = _ACDC_FRAME_RE.match(p.name)
        if m:
            frames.append((m.group(1), int(m.group(2)), p))
    if not frames:
        raise DataError(raw, "no patientXXX_frameYY.nii.gz files found")
    frames.sort(key=lambda t: (t[0], t[1]))
    patients = sorted({f[0] for f in frames})
    chosen = {"val": {i.split("_")[0] for i in _read_ids(val_list)},
              "test": {i.split("_")[0] for i in _read_ids(test_list)}}
    for split, source in (("val", val_list), ("test", test_list)):
        unknown = sorted(chosen[split] - set(patients))
        if unknown:
            raise DataError(source, f"patients not in {raw}: {unknown[:5]}")
    both = sorted(chosen["val"] & chosen["test"])
    if both:
        raise DataError(test_list, f"patients in both the val and the test list: {both[:5]}")

    written: list[Path] = []
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for n, (patient, frame, image_path) in enumerate(frames, 1):
        volume_id = f"{patient}_frame{frame:02d}"
        suffix = ".nii.gz" if image_path.name.endswith(".nii.gz") else ".nii"
        label_path = image_path.with_name(image_path.name[: -len(suffix)] + "_gt" + suffix)
        image, _ = _read_itk(image_path)
        label, _ = _read_itk(label_path)
        if image.shape != label.shape:
            raise DataError(label_path, f"label shape {label.shape} differs from image shape {image.shape}")
        if label.min() < 0 or label.max() > num_classes - 1:
            raise DataError(label_path, f"label values outside [0, {num_classes - 1}]: "
                                        f"{sorted(set(np.unique(label).tolist()))[:8]}")
        image = image.astype(np.float64)
        lo, hi = image.min(), image.max()
        image = ((image - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32)
        label = label.astype(np.uint8)
        written.append(_write_h5(out / "data" / f"{volume_id}.h5", {"image": image, "label": label}))
        split = "val" if patient in chosen["val"] else "test" if patient in chosen["test"] else "train"
        if split == "train":
            for k in range(image.shape[0]):
                slice_id = f"{volume_id}_slice_{k}"
                written.append(_write_h5(out / "data" / "slices" / f"{slice_id}.h5",
                                         {"image": image[k], "label": label[k]}))
                splits["train"].append(slice_id)
        else:
            splits[split].append(volume_id)
        log(f"  [{n}/{len(frames)}] {volume_id}: {image.shape} ({split})")
    for split, name in (("train", "train_slices.list"), ("val", "val.list"), ("test", "test.list")):
        if splits[split]:
            written.append(_write_list(out / name, splits[split]))
    write_manifest(out, written)
    return splits
