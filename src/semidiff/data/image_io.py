"""Reading a user's image file for prediction and writing the prediction back with its geometry.

One function per format family: SimpleITK for NIfTI/NRRD/MHA (spacing, origin and direction
kept), Pillow for 2D PNG/JPEG/TIFF, h5py for the benchmark h5 files.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from semidiff.errors import DataError

ITK_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
H5_SUFFIXES = (".h5", ".hdf5")
SUPPORTED = ITK_SUFFIXES + PIL_SUFFIXES + H5_SUFFIXES


#: Most voxels (all channels) an image may have; a larger header is refused before any voxel is
#: read, so a corrupt or hostile header cannot exhaust memory. ``SEMIDIFF_MAX_VOXELS`` overrides it.
MAX_VOXELS = 2**30


def check_voxel_count(path: str | Path, shape: tuple[int, ...], what: str = "image") -> None:
    """Refuse an image whose header claims more than :data:`MAX_VOXELS` voxels, before reading it.

    Raises:
        DataError: naming the file, the claimed shape and the limit.
    """
    limit = int(os.environ.get("SEMIDIFF_MAX_VOXELS", MAX_VOXELS))
    count = math.prod(int(s) for s in shape)
    if count > limit:
        raise DataError(path, f"{what} header claims shape {tuple(int(s) for s in shape)} ({count:.3g} voxels); "
                              f"refusing to read more than {limit:.3g} (raise SEMIDIFF_MAX_VOXELS if it is real)")


def check_nifti_voxels(path: Path) -> None:
    """Validate a NIfTI file's header and raw voxels with nibabel before SimpleITK reads it.

    SimpleITK's NIfTI reader silently turns NaN voxels into 0 and accepts some truncated
    ``.nii.gz`` files; nibabel reads the stored values as they are.

    Raises:
        DataError: unreadable header, absurd or zero size, truncated or corrupt voxel data,
            non-finite voxels or a non-numeric voxel type.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))  # header only
    except Exception as exc:  # noqa: BLE001  nibabel raises several types for a bad header
        raise DataError(path, f"cannot read image (not a valid NIfTI header: {type(exc).__name__}: {exc})") from None
    shape = tuple(int(s) for s in img.shape)
    check_voxel_count(path, shape)
    if not shape or 0 in shape:
        raise DataError(path, f"image is empty (header shape {shape})")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001  EOFError, zlib.error, OSError, ValueError
        raise DataError(path, f"cannot read image (truncated or corrupt voxel data: {type(exc).__name__}: {exc})") from None
    if data.dtype.kind not in "fiub":
        raise DataError(path, f"image has non-numeric dtype {data.dtype}")
    if data.dtype.kind == "f":
        bad = int((~np.isfinite(data)).sum())
        if bad:
            raise DataError(path, f"image has {bad} non-finite (NaN/Inf) voxels")


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


def read_image(path: str | Path, volume_axes: str = "zyx", channels: int | None = None,
               colour_to_grey: bool = False, hint: str = "") -> LoadedImage:
    """Read an image file as ``(C, *spatial)`` float32 with what is needed to write a prediction back.

    Args:
        path: NIfTI/NRRD/MHA (SimpleITK), PNG/JPEG/TIFF (Pillow) or h5 (``image`` key).
        volume_axes: array axis order of 3D images, ``"zyx"`` (SimpleITK's) or ``"xyz"``.
        channels: for 2D Pillow images, the channels wanted (:func:`fit_channels`); None keeps
            the file's own (grey 1, RGB 3, RGBA 4; an opaque alpha is dropped).
        colour_to_grey: with ``channels=1``, convert a colour image to grey (luma) instead of
            refusing it.
        hint: what to do about a channel mismatch, appended to the error.

    Raises:
        DataError: missing, unreadable or unsupported file, empty or non-finite image.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    suffix = suffix_of(path)
    try:
        if suffix in ITK_SUFFIXES:
            import SimpleITK as sitk

            if suffix in (".nii", ".nii.gz"):
                check_nifti_voxels(path)
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()  # header only: check the size before allocating
            check_voxel_count(path, (*reader.GetSize(), reader.GetNumberOfComponents()))
            img = reader.Execute()
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

            try:
                im_file = Image.open(path)  # reads the header only
            except Image.DecompressionBombError as exc:
                raise DataError(path, f"refusing to read: {exc}") from None
            with im_file as im:
                check_voxel_count(path, im.size)
                arr = pil_channels(im)
                if channels is not None and arr.shape[0] != channels:
                    arr = fit_channels(arr, im, channels, path, colour_to_grey, hint)
            out = LoadedImage(arr, path, "pil")
        elif suffix in H5_SUFFIXES:
            import h5py

            with h5py.File(path, "r") as f:
                if "image" not in f:
                    raise DataError(path, f"no 'image' dataset (found: {', '.join(f.keys()) or 'nothing'})")
                data = f["image"]
                check_voxel_count(path, data.shape)
                if data.dtype.kind not in "fiub":
                    raise DataError(path, f"image has non-numeric dtype {data.dtype}")
                arr = np.asarray(data, dtype=np.float32)[None]
                spacing = f.attrs.get("spacing")  # array order, as `semidiff data prepare` writes it
                spacing = tuple(float(v) for v in np.ravel(spacing)) if spacing is not None else None
                if spacing is not None and len(spacing) != arr.ndim - 1:
                    spacing = None
            out = LoadedImage(arr, path, "h5", spacing=spacing)
        else:
            raise DataError(path, f"unsupported file type {suffix!r}; supported: {', '.join(SUPPORTED)}")
    except DataError:
        raise
    except (OSError, RuntimeError, ValueError, EOFError, SyntaxError) as exc:  # PIL: EOF/SyntaxError
        raise DataError(path, f"cannot read image ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})") from None
    if out.array.size == 0:
        raise DataError(path, "image is empty (zero size)")
    bad = int((~np.isfinite(out.array)).sum())
    if bad:
        raise DataError(path, f"image has {bad} non-finite (NaN/Inf) voxels")
    return out


#: Pillow modes read as one grey channel as they are (no conversion, 16-bit and float kept).
_GREY_MODES = ("1", "L", "I", "F")


def pil_channels(im) -> np.ndarray:
    """A Pillow image as ``(C, H, W)`` float32 with its own channels: grey 1, grey+alpha 2, RGB 3,
    RGBA 4 (palette and other colour modes through RGB/RGBA). An alpha channel that is opaque
    everywhere carries nothing and is dropped."""
    mode = im.mode
    if mode in _GREY_MODES or mode.startswith("I;16"):
        return np.asarray(im, dtype=np.float32)[None]
    if mode not in ("LA", "RGB", "RGBA"):
        has_alpha = mode in ("PA", "La") or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
    arr = np.moveaxis(np.asarray(im, dtype=np.float32), -1, 0)
    if arr.shape[0] in (2, 4) and bool((arr[-1] == 255).all()):
        arr = arr[:-1]
    return arr


def fit_channels(arr: np.ndarray, im, channels: int, path: str | Path, colour_to_grey: bool = False,
                 hint: str = "") -> np.ndarray:
    """Give a 2D image ``channels`` channels without losing what it shows unless told to.

    - a grey image as RGB (``channels=3``): the grey value in each channel (nothing is lost);
    - a colour image whose channels are all equal, as grey: one of them (nothing is lost);
    - a colour image as grey: Pillow's luma (ITU-R 601-2) only with ``colour_to_grey``, else an
      error: colour is never dropped silently.

    Raises:
        DataError: naming the file, a colour image for one channel without ``colour_to_grey``, or
            channel counts that do not convert (e.g. a varying alpha channel).
    """
    have = arr.shape[0]
    end = f"; {hint}" if hint else ""
    if channels == 3 and have == 1:
        return np.repeat(arr, 3, axis=0)
    if channels == 1 and have == 3:
        if all(np.array_equal(arr[0], arr[c]) for c in (1, 2)):
            return arr[:1]
        if colour_to_grey:
            return np.asarray(im.convert("L"), dtype=np.float32)[None]
        raise DataError(path, f"colour (RGB) image, but one grey channel is expected{end}")
    what = {2: "grey + alpha", 3: "RGB", 4: "RGBA with a varying alpha"}.get(have, f"{have} channels")
    raise DataError(path, f"image has {have} channel(s) ({what}), {channels} expected{end}")


def check_rgb_range(array: np.ndarray, path: str | Path) -> None:
    """``rgb_to_0_1`` divides by 255: refuse an image whose values are outside 0..255 (16-bit, float).

    Raises:
        DataError: naming the file and the range found.
    """
    lo, hi = float(array.min()), float(array.max())
    if lo < 0 or hi > 255:
        raise DataError(path, f"normalisation rgb_to_0_1 needs 8-bit values 0..255, the image holds {lo:g}..{hi:g}; "
                              "use normalize zscore or minmax")


def normalize(array: np.ndarray, mode: str) -> np.ndarray:
    """The intensity normalisation the benchmark h5 files were made with, per image and channel.

    ``array`` is channel first; ``minmax`` and ``zscore`` scale each channel on its own (multi-modal
    MRI channels have unrelated ranges); ``rgb_to_0_1`` divides every channel by 255 (8-bit colour). Readers of raw formats call this too, so that training and
    ``semidiff predict`` see identically scaled inputs.
    """
    if mode == "rgb_to_0_1":  # nnU-Net's for natural images: one scale for all channels keeps the colour balance
        return (array / np.float32(255.0)).astype(np.float32)
    if mode not in ("minmax", "zscore"):
        return array.astype(np.float32)
    out = np.empty(array.shape, dtype=np.float32)
    for c in range(array.shape[0]):
        ch = array[c].astype(np.float64)
        if mode == "minmax":
            lo, hi = float(ch.min()), float(ch.max())
            out[c] = (ch - lo) / (hi - lo if hi > lo else 1.0)
        else:
            out[c] = (ch - ch.mean()) / (ch.std() or 1.0)
    return out


def read_label_png(path: str | Path) -> tuple[np.ndarray, list[int] | None]:
    """Read a 2D label map stored as PNG: class id per pixel, plus its palette if it has one.

    Palette ("P") PNGs give their indices (the value is the class id) and their palette as a
    flat ``[r, g, b, ...]`` list; grey PNGs give their values; RGB PNGs whose three channels are
    equal (EndoScapes ``semseg``) give the first channel.

    Raises:
        DataError: unreadable file, or a colour PNG whose channels differ (a colour-coded mask
            this function cannot map to class ids).
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "label file is missing")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P":
                return np.asarray(im, dtype=np.uint8).copy(), list(im.getpalette() or [])
            arr = np.asarray(im)
    except (OSError, ValueError) as exc:
        raise DataError(path, f"cannot read label image ({type(exc).__name__}: {exc})") from None
    if arr.ndim == 3:
        if arr.shape[-1] == 4:
            arr = arr[..., :3]
        if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, arr.shape[-1])):
            raise DataError(path, "colour label PNG whose channels differ; expected class ids "
                                  "(grey, palette, or equal RGB channels)")
        arr = arr[..., 0]
    return np.asarray(arr), None


#: Output formats of predictions (JPEG is lossy: it would change class ids).
OUTPUT_SUFFIXES = ITK_SUFFIXES + (".png", ".tif", ".tiff", ".bmp") + H5_SUFFIXES


def output_kind(out_path: str | Path) -> str:
    """``"itk"``, ``"pil"`` or ``"h5"``: how a prediction is written to ``out_path``, by its suffix.

    Raises:
        DataError: a suffix no prediction can be written to (JPEG, unknown), naming the file.
    """
    out_path = Path(out_path)
    suffix = suffix_of(out_path)
    if suffix in (".jpg", ".jpeg"):
        raise DataError(out_path, "JPEG is lossy and would change class ids; write predictions as .png")
    if suffix not in OUTPUT_SUFFIXES:
        raise DataError(out_path, f"cannot write a prediction as {suffix or 'a file without suffix'!r}; "
                                  f"supported: {', '.join(OUTPUT_SUFFIXES)}")
    return "itk" if suffix in ITK_SUFFIXES else "h5" if suffix in H5_SUFFIXES else "pil"


def check_output(out_path: str | Path, spatial_shape: tuple[int, ...]) -> str:
    """Refuse, before predicting, an output format that cannot hold a prediction of this shape.

    Raises:
        DataError: a 3D prediction (more than one slice) for a 2D image format, or a bad suffix.
    """
    kind = output_kind(out_path)
    if kind == "pil" and len(spatial_shape) == 3 and spatial_shape[0] != 1:
        raise DataError(out_path, f"a 3D prediction of shape {tuple(spatial_shape)} cannot be written as "
                                  f"{suffix_of(Path(out_path))}; use .nii.gz, .nrrd, .mha or .h5")
    return kind


def output_geometry(source: LoadedImage, out_path: str | Path) -> str:
    """Where the geometry of a NIfTI/NRRD/MHA prediction comes from (printed by ``semidiff predict``)."""
    if output_kind(out_path) != "itk":
        return ""
    if source.kind == "itk":
        return "geometry (spacing, origin, direction) from the input"
    if source.spacing:
        return "spacing from the input's h5 'spacing'; origin 0 and identity direction (stated default)"
    return "no geometry in the input: spacing 1, origin 0, identity direction (stated default)"


def write_prediction(label: np.ndarray, source: LoadedImage, out_path: str | Path, volume_axes: str = "zyx",
                     palette: list[int] | None = None) -> Path:
    """Write a label map in the format of ``out_path``'s suffix (:func:`output_kind`).

    NIfTI/NRRD/MHA get the source's geometry when it has one (an ITK file of the same dimension),
    else the h5 ``spacing`` where stored, else spacing 1, origin 0 and identity direction; 3D arrays
    in ``volume_axes`` order are written back in SimpleITK's. PNG/TIFF/BMP hold 2D class ids, as a
    palette image with ``palette`` (flat ``[r, g, b, ...]``, as the dataset's own masks, MOSXAV);
    h5 holds ``label`` (and ``spacing`` when known).

    Raises:
        DataError: an output format that cannot hold this prediction (see :func:`check_output`).
    """
    out_path = Path(out_path)
    kind = check_output(out_path, label.shape)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    label = label.astype(np.uint8)
    # Written under a temporary name (same suffix, so the same writer) and renamed when complete:
    # an interrupted write never leaves a truncated prediction under the final name.
    tmp = out_path.with_name(f".tmp-{out_path.name}")
    xyz = label.ndim == 3 and volume_axes == "xyz"
    if kind == "itk":
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(label.transpose(2, 1, 0) if xyz else label))
        ref = source.reference
        if ref is not None and ref.GetDimension() == img.GetDimension():
            img.SetSpacing(ref.GetSpacing())
            img.SetOrigin(ref.GetOrigin())
            img.SetDirection(ref.GetDirection())
        elif source.spacing and len(source.spacing) == label.ndim:
            # Array-order spacing; SimpleITK's is (x, y, z), the reverse of its (z, y, x) arrays.
            img.SetSpacing(tuple(source.spacing) if xyz else tuple(source.spacing)[::-1])
        sitk.WriteImage(img, str(tmp), useCompression=True)
    elif kind == "h5":
        import h5py

        with h5py.File(tmp, "w") as f:
            f.create_dataset("label", data=label, compression="gzip")
            if source.spacing and len(source.spacing) == label.ndim:
                f.attrs["spacing"] = np.asarray(source.spacing, dtype=np.float64)
    else:
        from PIL import Image

        img = Image.fromarray(label if label.ndim == 2 else label[0])
        if palette and suffix_of(out_path) == ".png":
            # putpalette turns the grey image into a palette image without touching the ids.
            # Padded to 256 entries: Pillow remaps ids beyond a short palette when it saves.
            img.putpalette((list(palette) + [0] * 768)[:768])
        img.save(tmp, format=Image.registered_extensions()[suffix_of(out_path)])
    os.replace(tmp, out_path)
    return out_path


def frame_reader_preprocessing(reader_cls, options: dict) -> dict:
    """``declared_preprocessing`` of a reader of raw 2D frames (EndoScapes, MOSXAV): nothing stored
    normalised, the ``normalize`` option applied on load, colour made grey when ``channels`` is 1.
    Option defaults are read from the reader's own signature."""
    params = inspect.signature(reader_cls.__init__).parameters
    channels = options.get("channels", params["channels"].default)
    return {"on_load": options.get("normalize", params["normalize"].default), "stored": "none",
            "volume_axes": None, "colour_to_grey": int(channels) == 1}
