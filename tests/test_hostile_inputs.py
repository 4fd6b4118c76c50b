"""Hostile inputs through ``data inspect``, ``train`` and ``predict``, table-driven.

Every row writes one hostile file (or config value) into an otherwise valid ACDC-layout or
LA-layout (``h5caselist``) dataset, or uses it as a ``predict`` input, runs the command in-process
through ``semidiff.cli.main`` and checks:

* the exit code: 2 for ``train`` and ``predict`` (a user error); ``data inspect`` reports the
  problems it found in its table and exits 1 (its documented "problems found" code), or 2 when it
  cannot run at all;
* that the message names the offending file (or config key) and the problem;
* that nothing partial is left: no run folder, no prediction file.

Paths with spaces and non-ASCII characters must simply work.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from semidiff.cli import main
from semidiff.data.synthetic import synthetic_case

TINY_2D = {"features": [4, 8, 8, 16, 16]}
TINY_3D = {"features": [4, 4, 8, 8, 8]}
LA_PATTERN = "2018LA_Seg_Training Set/{id}/mri_norm2.h5"


# ---- valid datasets --------------------------------------------------------------------------
def _write_case(path: Path, image: np.ndarray, label: np.ndarray | None, **dataset_kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image, **dataset_kwargs)
        if label is not None:
            f.create_dataset("label", data=label, **dataset_kwargs)
    return path


def _case(shape, num_classes, seed):
    image, label = synthetic_case(np.random.default_rng(seed), tuple(shape), num_classes)
    return image, label


def make_acdc(root: Path) -> dict:
    """ACDC layout: 4 training slices of 2 patients, 1 validation volume; 4 classes."""
    ids = [f"patient00{p}_frame01_slice_{s}" for p in (1, 2) for s in (1, 2)]
    for i, case_id in enumerate(ids):
        _write_case(root / "data" / "slices" / f"{case_id}.h5", *_case((32, 32), 4, i))
    (root / "train_slices.list").write_text("\n".join(ids) + "\n")
    vol = [_case((32, 32), 4, 10 + s) for s in range(3)]
    _write_case(root / "data" / "patient009_frame01.h5", np.stack([v[0] for v in vol]), np.stack([v[1] for v in vol]))
    (root / "val.list").write_text("patient009_frame01\n")
    return {"reader": "acdc", "num_classes": 4, "first": root / "data" / "slices" / f"{ids[0]}.h5",
            "val": root / "data" / "patient009_frame01.h5", "shape": (32, 32), "labeled": 2,
            "labeled_unit": "patients", "patch": [32, 32], "net": "unet2d", "net_options": TINY_2D}


def make_la(root: Path) -> dict:
    """UA-MT LA layout (the h5caselist reader's default): 3 training and 1 test volume; 2 classes."""
    ids = ["caseA", "caseB", "caseC", "caseT"]
    for i, case_id in enumerate(ids):
        _write_case(root / LA_PATTERN.format(id=case_id), *_case((16, 16, 16), 2, i))
    (root / "train.list").write_text("\n".join(ids[:3]) + "\n")
    (root / "test.list").write_text("caseT\n")
    return {"reader": "h5caselist", "num_classes": 2, "first": root / LA_PATTERN.format(id="caseA"),
            "val": None, "shape": (16, 16, 16), "labeled": 3, "labeled_unit": "cases",
            "patch": [16, 16, 16], "net": "unet3d", "net_options": TINY_3D}


LAYOUTS = {"acdc": make_acdc, "la": make_la}


def train_config(tmp: Path, root: Path, info: dict, name: str = "run") -> dict:
    return {
        "experiment": {"name": name, "output_dir": str(tmp / "rüns out"), "seed": 0},
        "data": {"reader": info["reader"], "root": str(root), "labeled": info["labeled"],
                 "labeled_unit": info["labeled_unit"], "patch_size": info["patch"],
                 "reader_options": {"num_classes": info["num_classes"]}, "val_split": "val",
                 "test_split": None},
        "model": {"net": info["net"], "num_classes": info["num_classes"], "net_options": info["net_options"]},
        "method": {"name": "supervised"},
        "train": {"max_steps": 2, "labeled_batch": 2, "val_every": 1, "accelerator": "cpu",
                  "progress_bar": False, "num_threads": 1},
        "eval": {"overlay_cases": 0},
    }


# ---- hostile files -----------------------------------------------------------------------------
def _valid(path: Path, info: dict, seed=0) -> Path:
    return _write_case(path, *_case(info["shape"], info["num_classes"], seed))


def truncated_h5(path, info):
    _valid(path, info)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def corrupt_bytes(path, info):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def nan_voxels(path, info):
    image, label = _case(info["shape"], info["num_classes"], 0)
    image.flat[5] = np.nan
    _write_case(path, image, label)


def inf_voxels(path, info):
    image, label = _case(info["shape"], info["num_classes"], 0)
    image.flat[7] = -np.inf
    _write_case(path, image, label)


def complex_image(path, info):
    image, label = _case(info["shape"], info["num_classes"], 0)
    _write_case(path, image.astype(np.complex64), label)


def fractional_label(path, info):
    image, label = _case(info["shape"], info["num_classes"], 0)
    lab = label.astype(np.float32)
    lab.flat[3] = 0.5
    _write_case(path, image, lab)


def flat_2d_case(path, info):
    _write_case(path, *_case((32, 32), info["num_classes"], 0))


def label_out_of_range(path, info):
    image, label = _case(info["shape"], info["num_classes"], 0)
    label.flat[11] = 9
    _write_case(path, image, label)


def zero_size(path, info):
    shape = (0,) + tuple(info["shape"][1:])
    _write_case(path, np.zeros(shape, np.float32), np.zeros(shape, np.uint8))


def absurd_size(path, info):
    """A header claiming ~3e13 voxels in a few kilobytes (chunked, compressed, never written)."""
    shape = (30000,) * len(info["shape"]) if len(info["shape"]) == 3 else (3_000_000, 3_000_000)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        chunks = (16,) * len(shape)
        f.create_dataset("image", shape=shape, dtype="f4", chunks=chunks, compression="gzip")
        f.create_dataset("label", shape=shape, dtype="u1", chunks=chunks, compression="gzip")


@dataclass
class Hostile:
    """One row of the table: how to make it and what the message must say."""

    name: str
    make: Callable[[Path, dict], None]
    problem: str  # substring of the expected message (lower case)
    val_volume: bool = False  # ACDC: replaces the validation volume instead of a training slice
    layouts: tuple = ("acdc", "la")


HOSTILE_FILES = [
    Hostile("truncated h5", truncated_h5, "not a readable hdf5 file"),
    Hostile("corrupt bytes", corrupt_bytes, "not a readable hdf5 file"),
    Hostile("NaN voxels", nan_voxels, "non-finite"),
    Hostile("Inf voxels", inf_voxels, "non-finite"),
    Hostile("complex image dtype", complex_image, "non-numeric dtype complex64"),
    Hostile("fractional label dtype", fractional_label, "not integer-valued"),
    Hostile("2D where 3D expected (LA)", flat_2d_case, "image has 2 axes", layouts=("la",)),
    Hostile("2D where 3D expected (ACDC volume)", flat_2d_case, "image has 2 axes", val_volume=True,
            layouts=("acdc",)),
    Hostile("labels out of range", label_out_of_range, "label values outside"),
    Hostile("zero-size image", zero_size, "empty"),
    Hostile("absurd size", absurd_size, "refusing to read"),
]
ROWS = [(h, layout) for h in HOSTILE_FILES for layout in h.layouts]
IDS = [f"{h.name} [{layout}]" for h, layout in ROWS]


def _dataset_with(tmp: Path, hostile: Hostile, layout: str) -> tuple[Path, dict, Path]:
    root = tmp / "dâta set 数据"
    info = LAYOUTS[layout](root)
    target = info["val"] if hostile.val_volume else info["first"]
    target.unlink()
    hostile.make(target, info)
    return root, info, target


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("hostile,layout", ROWS, ids=IDS)
def test_hostile_file_in_data_inspect(tmp_path, capsys, hostile, layout):
    root, info, bad = _dataset_with(tmp_path, hostile, layout)
    code, text = _run(capsys, ["data", "inspect", str(root), "--reader", info["reader"],
                               "--num-classes", str(info["num_classes"])])
    assert code == 1, text
    line = next((ln for ln in text.splitlines() if str(bad) in ln), "")
    assert hostile.problem in line.lower(), text


@pytest.mark.parametrize("hostile,layout", ROWS, ids=IDS)
def test_hostile_file_in_train(tmp_path, capsys, hostile, layout):
    root, info, bad = _dataset_with(tmp_path, hostile, layout)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(train_config(tmp_path, root, info), allow_unicode=True))
    code, text = _run(capsys, ["train", str(cfg)])
    assert code == 2, text
    assert str(bad) in text and hostile.problem in text.lower(), text
    assert not (tmp_path / "rüns out" / "run").exists(), "a failed run must not leave a run folder"


# ---- predict -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny 2D model (ACDC layout) and a tiny 3D model (LA layout), trained for 2 steps, in
    folders with spaces and non-ASCII characters (which must work)."""
    out = {}
    for layout in ("acdc", "la"):
        tmp = tmp_path_factory.mktemp(f"model {layout} ü")
        root = tmp / "dâta set 数据"
        info = LAYOUTS[layout](root)
        cfg = tmp / "cönfig file.yaml"
        cfg.write_text(yaml.safe_dump(train_config(tmp, root, info), allow_unicode=True))
        assert main(["train", str(cfg)]) == 0
        out[layout] = tmp / "rüns out" / "run"
    return out


def _nifti(path: Path, array: np.ndarray) -> Path:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def _patch_nifti_dims(path: Path, dims: tuple[int, ...]) -> None:
    """Rewrite dim[1..] of an uncompressed NIfTI-1 header (int16 at byte 42)."""
    data = bytearray(path.read_bytes())
    data[42:42 + 2 * len(dims)] = struct.pack(f"<{len(dims)}h", *dims)
    path.write_bytes(bytes(data))


def _png_with_size(path: Path, width: int, height: int) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def p_h5(maker):
    def make(path: Path, info: dict) -> Path:
        maker(path, info)
        return path
    return make


def _volume(info):
    return info.get("volume", info["shape"])


def p_nifti_truncated(path, info):
    _nifti(path, np.random.rand(*_volume(info)).astype(np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def p_nifti_corrupt(path, info):
    corrupt_bytes(path, info)
    return path


def p_nifti_nan(path, info):
    arr = np.random.rand(*_volume(info)).astype(np.float32)
    arr.flat[4] = np.nan
    return _nifti(path, arr)


def p_nifti_absurd(path, info):
    _nifti(path, np.random.rand(*_volume(info)).astype(np.float32))
    _patch_nifti_dims(path, (30000,) * len(_volume(info)))
    return path


def p_nifti_zero(path, info):
    _nifti(path, np.random.rand(*_volume(info)).astype(np.float32))
    _patch_nifti_dims(path, (0,) + tuple(_volume(info)[1:]))
    return path


def p_png_truncated(path, info):
    from PIL import Image

    Image.fromarray((np.random.rand(64, 64) * 255).astype(np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def p_png_absurd(path, info):
    _png_with_size(path, 200_000, 200_000)
    return path


def p_png(path, info):
    from PIL import Image

    Image.fromarray((np.random.rand(32, 32) * 255).astype(np.uint8)).save(path)
    return path


@dataclass
class HostileInput:
    name: str
    suffix: str
    make: Callable[[Path, dict], Path]
    problem: str
    layouts: tuple = field(default=("acdc", "la"))


PREDICT_INPUTS = [
    HostileInput("truncated h5", ".h5", p_h5(truncated_h5), "cannot read image"),
    HostileInput("corrupt h5", ".h5", p_h5(corrupt_bytes), "cannot read image"),
    HostileInput("NaN voxels h5", ".h5", p_h5(nan_voxels), "non-finite"),
    HostileInput("Inf voxels h5", ".h5", p_h5(inf_voxels), "non-finite"),
    HostileInput("complex dtype h5", ".h5", p_h5(complex_image), "non-numeric dtype complex64"),
    HostileInput("zero-size h5", ".h5", p_h5(zero_size), "empty"),
    HostileInput("absurd size h5", ".h5", p_h5(absurd_size), "refusing to read"),
    HostileInput("truncated NIfTI", ".nii.gz", p_nifti_truncated, "cannot read image"),
    HostileInput("corrupt NIfTI", ".nii.gz", p_nifti_corrupt, "cannot read image"),
    HostileInput("NaN voxels NIfTI", ".nii", p_nifti_nan, "non-finite"),
    HostileInput("absurd size NIfTI", ".nii", p_nifti_absurd, "refusing to read"),
    HostileInput("zero-size NIfTI", ".nii", p_nifti_zero, "empty"),
    HostileInput("truncated PNG", ".png", p_png_truncated, "cannot read image", layouts=("acdc",)),
    HostileInput("absurd size PNG", ".png", p_png_absurd, "refusing to read", layouts=("acdc",)),
    HostileInput("2D where 3D expected", ".png", p_png, "needs a 3d image", layouts=("la",)),
]
P_ROWS = [(h, layout) for h in PREDICT_INPUTS for layout in h.layouts]


@pytest.mark.parametrize("hostile,layout", P_ROWS, ids=[f"{h.name} [{lay}]" for h, lay in P_ROWS])
def test_hostile_input_in_predict(tmp_path, capsys, models, hostile, layout):
    # h5 inputs of the 2D model are single 2D images; NIfTI inputs are volumes (sliced).
    info = {"acdc": {"shape": (32, 32), "volume": (3, 32, 32), "num_classes": 4},
            "la": {"shape": (16, 16, 16), "num_classes": 2}}[layout]
    folder = tmp_path / "ïn puts"
    folder.mkdir()
    bad = hostile.make(folder / f"bad ímage{hostile.suffix}", info)
    out = tmp_path / "prédictions" / f"out{hostile.suffix}"
    code, text = _run(capsys, ["predict", str(models[layout]), str(bad), str(out)])
    assert code == 2, text
    assert str(bad) in text and hostile.problem in text.lower(), text
    assert not out.exists() and not (tmp_path / "prédictions").exists()


def test_a_bad_file_in_a_folder_leaves_no_prediction_behind(tmp_path, capsys, models):
    folder = tmp_path / "mixed ïnputs"
    folder.mkdir()
    _nifti(folder / "a good.nii.gz", np.random.rand(3, 32, 32).astype(np.float32))
    bad = p_nifti_nan(folder / "b bad.nii", {"shape": (3, 32, 32)})
    out = tmp_path / "outs"
    code, text = _run(capsys, ["predict", str(models["acdc"]), str(folder), str(out)])
    assert code == 2 and str(bad) in text
    assert not out.exists() or not any(out.iterdir()), "the good file's prediction must be removed too"


# ---- config values out of range ----------------------------------------------------------------
@pytest.mark.parametrize("override,key,problem", [
    ("train.max_steps=-5", "train.max_steps", "greater than 0"),
    ("train.labeled_batch=0", "train.labeled_batch", "greater than or equal to 1"),
    ("data.labeled=99", "data.labeled", "available"),
    ("data.patch_size=[0,32]", "data.patch_size", "positive"),
])
def test_out_of_range_config_values(tmp_path, capsys, override, key, problem):
    root = tmp_path / "data"
    info = make_acdc(root)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(train_config(tmp_path, root, info), allow_unicode=True))
    code, text = _run(capsys, ["train", str(cfg), override])
    assert code == 2, text
    assert key in text and problem in text, text
    assert not (tmp_path / "rüns out" / "run").exists()


def test_inspect_rejects_a_bad_class_count(tmp_path, capsys):
    root = tmp_path / "data"
    make_acdc(root)
    code, text = _run(capsys, ["data", "inspect", str(root), "--reader", "acdc", "--num-classes", "1"])
    assert code == 2 and "num_classes" in text


# ---- spaces and unicode must work --------------------------------------------------------------
@pytest.mark.parametrize("layout", ["acdc", "la"])
def test_unicode_and_spaces_work_everywhere(tmp_path, capsys, models, layout):
    run = models[layout]
    root = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"])
    info = {"acdc": {"reader": "acdc", "n": 4}, "la": {"reader": "h5caselist", "n": 2}}[layout]
    code, text = _run(capsys, ["data", "inspect", str(root), "--reader", info["reader"], "--num-classes", str(info["n"])])
    assert code == 0, text
    assert (run / "checkpoints" / "final.ckpt").is_file()
    src = tmp_path / "ïmage ünïcode 画像.nii.gz"
    _nifti(src, np.random.rand(*((3, 32, 32) if layout == "acdc" else (16, 16, 16))).astype(np.float32))
    out = tmp_path / "prédiction dir" / "óut 1.nii.gz"
    code, text = _run(capsys, ["predict", str(run), str(src), str(out)])
    assert code == 0, text
    assert out.is_file()
