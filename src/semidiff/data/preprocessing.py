"""From a file on disk to the model's input, defined once for training, evaluation, prediction and export.

A :class:`Preprocessing` says everything that turns a file into what the network was trained on:

- **axis order** of 3D arrays (``volume_axes``): SimpleITK's ``zyx`` or UA-MT's ``xyz``; NIfTI, NRRD
  and MHA files are read into that order, h5 arrays are taken as stored.
- **channels**: ``channels`` input channels; a 2D colour file gives RGB when 3; nnU-Net data has one
  file per channel (``<case>_0000`` ...) except RGB natural images (one file). A colour file for a
  one-channel model is refused unless ``colour_to_grey`` (the reader converted colour to grey).
- **intensity**, in two stages, each per image and channel with statistics over the whole file:

  - ``stored``: the normalisation the dataset's stored files already carry, applied when they were
    made (LA: z-score of the whole NRRD scan, then the crop around the atrium; ACDC: min-max per
    volume). Readers of those files apply nothing; ``semidiff predict`` applies it to a raw scan.
  - ``on_load``: the normalisation the reader applies to every file it loads (nnU-Net, EndoScapes,
    MOSXAV); ``semidiff predict`` applies it to every input.

- **resampling** (``resample_factor``): applied by the one prediction path
  (:func:`semidiff.evaluation.evaluate.predict_image`) and by the training data, recorded here so
  that the record is complete.

It is derived from the run's config and the reader's own declaration
(``READERS[name].declared_preprocessing``) by :func:`preprocessing_from_config`, written into every
checkpoint and exported model, and read back by ``semidiff predict``. Checkpoints written before it
was recorded get it derived from their config the way training did (``origin`` says so).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from semidiff.data.image_io import (
    H5_SUFFIXES,
    LoadedImage,
    check_rgb_range,
    normalize,
    read_image,
    suffix_of,
)
from semidiff.data.readers import READERS
from semidiff.errors import ConfigError, DataError

__all__ = [
    "INTENSITY_CHOICES",
    "NORMALIZATIONS",
    "STATISTICS",
    "Preprocessing",
    "fill_colour_rule",
    "preprocessing_from_config",
    "read_model_input",
]

NORMALIZATIONS = ("none", "minmax", "zscore", "rgb_to_0_1")
#: The statistics rule of every normalisation here (and of :func:`semidiff.data.image_io.normalize`).
STATISTICS = "per image and channel, over the whole file (before any crop)"
#: ``semidiff predict --intensity``: ``raw`` a scan as acquired, ``stored`` a file that already carries
#: the dataset's stored normalisation, ``auto`` h5 files are stored ones and every other format is raw.
INTENSITY_CHOICES = ("auto", "raw", "stored")
DERIVED = "derived from the run's config (checkpoint or export written before preprocessing was recorded)"
_DESCRIBE = {"none": "none", "minmax": "min-max to [0, 1]", "zscore": "z-score", "rgb_to_0_1": "divided by 255"}


@dataclass(frozen=True)
class Preprocessing:
    """The transform from a file on disk to the model's input (see the module docstring).

    Attributes:
        spatial_dims: spatial axes of the model's input (2 or 3).
        channels: input channels of the model.
        volume_axes: array axis order of 3D images, ``"zyx"`` or ``"xyz"``.
        on_load: normalisation the reader applies to every file it loads.
        stored: normalisation the dataset's stored files already carry.
        resample_factor: per-axis resampling before the model (the prediction is resampled back).
        colour_to_grey: a colour 2D file is converted to grey for a one-channel model (the reader
            did so in training); otherwise it is refused.
        origin: ``"recorded"`` or :data:`DERIVED`.
    """

    spatial_dims: int
    channels: int = 1
    volume_axes: str = "zyx"
    on_load: str = "none"
    stored: str = "none"
    resample_factor: float = 1.0
    colour_to_grey: bool = False
    origin: str = "recorded"

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint or an exported file records (``origin`` is not recorded: it is recorded)."""
        out = asdict(self)
        out.pop("origin")
        return {"version": 1, **out, "statistics": STATISTICS}

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "recorded") -> Preprocessing:
        fields = {k: data[k] for k in ("spatial_dims", "channels", "volume_axes", "on_load", "stored",
                                       "resample_factor", "colour_to_grey") if k in data}
        return cls(**fields, origin=origin)

    def same_transform(self, other: Preprocessing) -> bool:
        """Whether ``other`` turns files into the same model input (``origin`` aside)."""
        return replace(self, origin="") == replace(other, origin="")

    def intensity(self, array: np.ndarray, raw: bool) -> np.ndarray:
        """Intensity normalisation of a channel-first image: ``stored`` first for a raw scan, then ``on_load``."""
        if raw and self.stored != "none":
            array = normalize(array, self.stored)
        return normalize(array, self.on_load)

    def describe(self, raw: bool | None = None) -> str:
        """One line for logs and reports: for a raw scan (``raw=True``), a stored file (``False``), or the record."""
        if raw is None:
            intensity = f"stored files carry {_DESCRIBE[self.stored]}; on load {_DESCRIBE[self.on_load]}"
        else:
            steps = []
            if raw and self.stored != "none":
                steps.append(f"{_DESCRIBE[self.stored]} (as the dataset's stored files were made)")
            if self.on_load != "none":
                steps.append(f"{_DESCRIBE[self.on_load]} (as the reader applies on load)")
            intensity = ", then ".join(steps) or "none"
            if not raw and self.stored != "none":
                intensity += f" (the input already carries the stored {_DESCRIBE[self.stored]})"
        parts = [f"intensity: {intensity}", f"statistics {STATISTICS}"]
        if self.spatial_dims == 3:
            parts.append(f"axes {self.volume_axes}")
        parts.append(f"{self.channels} channel(s)" + (", colour converted to grey" if self.colour_to_grey else ""))
        if self.resample_factor != 1.0:
            parts.append(f"resampled by {self.resample_factor:g}")
        if self.origin != "recorded":
            parts.append(self.origin)
        return "; ".join(parts)


def _declaration(reader: str, options: dict[str, Any]) -> dict[str, Any]:
    """The reader's own statement of what its files carry and what it applies on load."""
    factory = READERS.get(reader)
    declare = getattr(factory, "declared_preprocessing", None)
    if declare is None:  # a reader without a declaration: h5-like, the config says everything
        return {"on_load": "none", "stored": None, "volume_axes": None}
    return declare(dict(options))


def preprocessing_from_config(cfg, strict: bool = False, origin: str = "recorded") -> Preprocessing:
    """The preprocessing a run's config implies, the way training applies it.

    Readers of raw formats (nnU-Net, EndoScapes, MOSXAV) normalise on load with their ``normalize``
    option; readers of stored benchmark files (h5) apply nothing and say which normalisation their
    files carry, or leave it to ``data.normalize`` (the generic ``h5caselist`` reader).

    Args:
        cfg: the run's :class:`~semidiff.config.Config`.
        strict: raise when ``data.normalize`` or ``data.volume_axes`` contradicts the reader
            (training does; an old checkpoint keeps what its reader did).
        origin: recorded in the result.

    Raises:
        ConfigError: with ``strict``, a contradiction, naming the key.
    """
    data = cfg.data
    decl = _declaration(data.reader, data.reader_options)
    on_load, stored = decl.get("on_load", "none"), decl.get("stored")
    for key, value in (("normalize", on_load), ("stored_normalize", stored)):
        if value is not None and value not in NORMALIZATIONS:
            raise ConfigError(f"data.reader_options.{key}: {value!r} is not one of {list(NORMALIZATIONS)}")
    if on_load != "none":
        # The reader normalises what it loads; its files carry nothing of their own.
        if strict and data.normalize not in ("none", on_load):
            raise ConfigError(
                f"data.normalize: {data.normalize!r} contradicts the {data.reader!r} reader, which applies "
                f"{on_load!r} to every file it loads (reader_options.normalize); set data.normalize to "
                f"{on_load!r} or 'none'")
        stored = "none"
    elif stored is None:
        stored = data.normalize
    elif strict and data.normalize not in ("none", stored):
        carries = f"files are stored {stored!r}-normalised" if stored != "none" else "files carry no normalisation"
        raise ConfigError(
            f"data.normalize: {data.normalize!r} contradicts the {data.reader!r} reader, whose {carries} "
            f"(reader_options); set data.normalize to {stored!r}")
    axes = decl.get("volume_axes") or data.volume_axes
    if strict and cfg.spatial_dims == 3 and axes != data.volume_axes:
        raise ConfigError(f"data.volume_axes: the {data.reader!r} reader gives ({', '.join(axes)}) arrays, "
                          f"not ({', '.join(data.volume_axes)}); set data.volume_axes to {axes!r}")
    return Preprocessing(spatial_dims=cfg.spatial_dims, channels=cfg.model.in_channels, volume_axes=axes,
                         on_load=on_load, stored=stored, resample_factor=data.resample_factor,
                         colour_to_grey=bool(decl.get("colour_to_grey", False)), origin=origin)


def fill_colour_rule(recorded: dict[str, Any], cfg) -> dict[str, Any]:
    """A record written before ``colour_to_grey`` existed gets what its reader did (MOSXAV's grey frames)."""
    if "colour_to_grey" in recorded:
        return recorded
    return {**recorded, "colour_to_grey": preprocessing_from_config(cfg).colour_to_grey}


def _looks_normalised(array: np.ndarray) -> bool:
    """Negative float intensities: a z-scored image, not an MR scan as acquired (a hint, never a decision)."""
    return bool(array.min() < 0) and not np.array_equal(array, np.round(array))


def read_model_input(path: str | Path, prep: Preprocessing, intensity: str = "auto") -> tuple[LoadedImage, np.ndarray, str]:
    """Read an image file and make the model's input from it, as training saw its data.

    Args:
        path: NIfTI/NRRD/MHA, PNG/JPEG/TIFF or h5 (``image``); with several channels, an nnU-Net
            ``<case>_0000`` file whose sibling channel files are read too.
        prep: the model's preprocessing.
        intensity: ``"raw"``, ``"stored"`` or ``"auto"`` (:data:`INTENSITY_CHOICES`).

    Returns:
        The loaded file (for writing the prediction back), the model input ``(C, *spatial)`` float32,
        and a line saying what was applied (with a warning when a "raw" input looks normalised already).

    Raises:
        DataError: unreadable file, wrong channel count, a 2D image for a 3D model.
    """
    if intensity not in INTENSITY_CHOICES:
        raise ConfigError(f"intensity: {intensity!r} is not one of {list(INTENSITY_CHOICES)}")
    path = Path(path)
    if prep.channels > 1 and "_0000" in path.name and suffix_of(path) not in H5_SUFFIXES:
        from semidiff.data.nnunet import read_case_channels

        img = read_case_channels(path, prep.channels, prep.volume_axes)
    else:
        hint = ("the model takes one grey channel and was trained on grey images; convert the image to grey "
                "if that is what you mean")
        img = read_image(path, prep.volume_axes, channels=prep.channels, colour_to_grey=prep.colour_to_grey,
                         hint=hint)
    array = img.array
    if img.kind == "h5" and prep.channels > 1 and array.shape[0] == 1 and array.shape[1] == prep.channels:
        array = array[0]  # an h5 image stored channel first (multi-modal BraTS)
        img.array = array
    if array.shape[0] != prep.channels:
        raise DataError(path, f"image has {array.shape[0]} channels, the model expects {prep.channels}")
    if prep.spatial_dims == 3 and array.ndim - 1 != 3:
        raise DataError(path, f"a 3D model needs a 3D image, got {array.ndim - 1}D of shape {array.shape[1:]}")
    if prep.on_load == "rgb_to_0_1":
        check_rgb_range(array, path)
    raw = intensity == "raw" or (intensity == "auto" and img.kind != "h5")
    note = prep.describe(raw)
    if raw and prep.stored == "zscore" and intensity == "auto" and _looks_normalised(array):
        note += (" -- warning: the file holds negative non-integer values, as a z-scored image does; if it was "
                 "written from the dataset's stored files, predict it with --intensity stored")
    return img, prep.intensity(array, raw), note
