"""Reading a user's image file for prediction and writing the prediction back with its geometry.

One function per format family: SimpleITK for NIfTI/NRRD/MHA (spacing, origin and direction
kept), Pillow for 2D PNG/JPEG/TIFF, h5py for the benchmark h5 files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from semidiff.errors import DataError

ITK_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
H5_SUFFIXES = (".h5", ".hdf5")
SUPPORTED = ITK_SUFFIXES + PIL_SUFFIXES + H5_SUFFIXES


def suffix_of(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


@dataclass
class LoadedImage:
    """Image ``(C, *spatial)`` float32 in the model's axis order, plus what is needed to write back."""

    array: np.ndarray
    path: Path
    kind: str  # "itk", "pil" or "h5"
    reference: Any = None  # SimpleITK image whose geometry the prediction copies
    spacing: tuple[float, ...] | None = None


def read_image(path: str | Path, volume_axes: str = "zyx") -> LoadedImage:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    suffix = suffix_of(path)
    try:
        if suffix in ITK_SUFFIXES:
            import SimpleITK as sitk

            img = sitk.ReadImage(str(path))
            arr = sitk.GetArrayFromImage(img).astype(np.float32)  # (z, y, x[, channels])
            if img.GetNumberOfComponentsPerPixel() > 1:
                arr = np.moveaxis(arr, -1, 0)
            else:
                arr = arr[None]
            spacing = tuple(float(s) for s in img.GetSpacing())[::-1]  # to array order (z, y, x)
            if arr.ndim == 4 and volume_axes == "xyz":
                arr = np.ascontiguousarray(arr.transpose(0, 3, 2, 1))
                spacing = spacing[::-1]
            out = LoadedImage(arr, path, "itk", reference=img, spacing=spacing)
        elif suffix in PIL_SUFFIXES:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im.convert("L") if im.mode not in ("L", "I", "I;16", "F") else im, dtype=np.float32)
            out = LoadedImage(arr[None], path, "pil")
        elif suffix in H5_SUFFIXES:
            import h5py

            with h5py.File(path, "r") as f:
                if "image" not in f:
                    raise DataError(path, f"no 'image' dataset (found: {', '.join(f.keys()) or 'nothing'})")
                arr = np.asarray(f["image"], dtype=np.float32)[None]
            out = LoadedImage(arr, path, "h5")
        else:
            raise DataError(path, f"unsupported file type {suffix!r}; supported: {', '.join(SUPPORTED)}")
    except DataError:
        raise
    except (OSError, RuntimeError, ValueError) as exc:
        raise DataError(path, f"cannot read image ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})") from None
    if out.array.size == 0:
        raise DataError(path, "image is empty (zero size)")
    bad = int((~np.isfinite(out.array)).sum())
    if bad:
        raise DataError(path, f"image has {bad} non-finite (NaN/Inf) voxels")
    return out


def normalize(array: np.ndarray, mode: str) -> np.ndarray:
    """The intensity normalisation the benchmark h5 files were made with, per image."""
    if mode == "minmax":
        lo, hi = float(array.min()), float(array.max())
        return ((array - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32)
    if mode == "zscore":
        return ((array - array.mean()) / (array.std() or 1.0)).astype(np.float32)
    return array.astype(np.float32)


def write_prediction(label: np.ndarray, source: LoadedImage, out_path: str | Path, volume_axes: str = "zyx") -> Path:
    """Write a label map next to its source's geometry (ITK) or as an 8-bit PNG / h5."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    label = label.astype(np.uint8)
    if source.kind == "itk":
        import SimpleITK as sitk

        arr = label.transpose(2, 1, 0) if (label.ndim == 3 and volume_axes == "xyz") else label
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
        ref = source.reference
        if ref.GetDimension() == img.GetDimension():
            img.SetSpacing(ref.GetSpacing())
            img.SetOrigin(ref.GetOrigin())
            img.SetDirection(ref.GetDirection())
        sitk.WriteImage(img, str(out_path), useCompression=True)
    elif suffix_of(out_path) in H5_SUFFIXES:
        import h5py

        with h5py.File(out_path, "w") as f:
            f.create_dataset("label", data=label, compression="gzip")
    else:
        from PIL import Image

        Image.fromarray(label if label.ndim == 2 else label[0]).save(out_path)
    return out_path
