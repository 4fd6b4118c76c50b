"""``semidiff export``: TorchScript and ONNX files reproduce PyTorch within 1e-4, carry their
config, refuse methods without a single-network output, and ``semidiff predict`` runs from them
with the same labels as from the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from semidiff.cli import main
from semidiff.config import config_from_dict
from semidiff.data.synthetic import make_synthetic_dataset
from semidiff.engine.module import load_module
from semidiff.engine.train import train
from semidiff.export import export_checkpoint, load_exported

TINY_UNET = {"features": [4, 8, 8, 16, 16]}


def _train(tmp: Path, root: Path, name: str, method: str, options: dict | None = None, patch=(32, 32)) -> Path:
    semi = method != "supervised"
    cfg = config_from_dict({
        "experiment": {"name": name, "output_dir": str(tmp / "runs"), "seed": 0},
        "data": {"reader": "synthetic", "root": str(root), "labeled": 2, "patch_size": list(patch)},
        "model": {"net": "unet2d", "num_classes": 3, "net_options": TINY_UNET},
        "method": {"name": method, "options": options or {}},
        "train": {"max_steps": 3, "labeled_batch": 2, "unlabeled_batch": 2 if semi else 0, "val_every": 3,
                  "accelerator": "cpu", "progress_bar": False, "num_threads": 1},
        "eval": {"overlay_cases": 0},
    })
    train(cfg, log=lambda *_: None)
    return cfg.run_dir() / "checkpoints" / "final.ckpt"


@pytest.fixture(scope="module")
def data2d(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("exp2d"), spatial_dims=2, num_cases=6,
                                  size=(40, 36), num_classes=3, val_cases=1, seed=0)


@pytest.fixture(scope="module")
def mt_checkpoint(tmp_path_factory, data2d):
    return _train(tmp_path_factory.mktemp("mt"), data2d, "mt", "mean_teacher")


def test_both_formats_match_pytorch_and_carry_the_config(tmp_path, mt_checkpoint):
    pytest.importorskip("onnxruntime")
    lines = []
    results = export_checkpoint(mt_checkpoint, "both", tmp_path / "model", log=lines.append)
    assert [r.format for r in results] == ["torchscript", "onnx"]
    assert [r.path.name for r in results] == ["model.pt", "model.onnx"]
    assert all(r.max_abs_diff <= 1e-4 for r in results) and len(lines) == 2 and "vs PyTorch" in lines[0]
    module = load_module(str(mt_checkpoint))
    x = torch.randn(5, 1, 32, 32, generator=torch.Generator().manual_seed(9))  # a batch size never traced
    with torch.no_grad():
        ref = module.method.predict(x)
    for r in results:
        model = load_exported(r.path)
        got = model.predict(x)
        assert got.shape == ref.shape
        assert float((got - ref).abs().max()) <= 1e-4, r.format
        assert model.cfg.model_dump() | {"train": None} == module.cfg.model_dump() | {"train": None}
        assert model.metadata["method"] == "mean_teacher" and model.metadata["input"]["spatial_size"] == [32, 32]
    # Wrong spatial size is refused with a clear message instead of a shape error deep in a graph.
    from semidiff.errors import SemidiffError

    with pytest.raises(SemidiffError, match="spatial size"):
        load_exported(results[0].path).predict(torch.randn(1, 1, 48, 48))


def test_predict_from_exported_file_equals_predict_from_checkpoint(tmp_path, mt_checkpoint, data2d, capsys):
    pytest.importorskip("onnxruntime")
    import h5py

    case = max((data2d / "cases").glob("*.h5"))
    image = np.asarray(h5py.File(case)["image"])
    src = tmp_path / "in.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("image", data=image)
    assert main(["export", str(mt_checkpoint), "--out", str(tmp_path / "m")]) == 0
    assert "max |probability difference|" in capsys.readouterr().out
    outputs = {}
    for name, model in (("ckpt", mt_checkpoint), ("pt", tmp_path / "m.pt"), ("onnx", tmp_path / "m.onnx")):
        out = tmp_path / f"pred_{name}.h5"
        assert main(["predict", str(model), str(src), str(out)]) == 0, capsys.readouterr().err
        outputs[name] = np.asarray(h5py.File(out)["label"])
    assert outputs["ckpt"].shape == image.shape
    np.testing.assert_array_equal(outputs["pt"], outputs["ckpt"])
    np.testing.assert_array_equal(outputs["onnx"], outputs["ckpt"])


def test_default_output_is_in_the_run_folder_and_single_format(mt_checkpoint):
    run_dir = mt_checkpoint.parent.parent
    assert main(["export", str(run_dir), "--format", "torchscript"]) == 0
    # A run folder resolves to its best checkpoint.
    exported = run_dir / "export" / "best.pt"
    assert exported.is_file() and not (run_dir / "export" / "best.onnx").exists()
    meta = load_exported(exported).metadata
    assert meta["checkpoint"].endswith("best.ckpt")
    assert json.loads(json.dumps(meta["config"]))["model"]["num_classes"] == 3


def test_methods_without_a_single_network_are_refused(tmp_path, data2d, capsys):
    ckpt = _train(tmp_path, data2d, "cps_mean", "cps", {"eval_model": "mean"})
    assert main(["export", str(ckpt), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "cps_mean" in err or "final.ckpt" in err
    assert "no single-network output" in err
    assert "Exportable: " in err and "cps with eval_model a or b" in err  # listed from the registry
    assert not list(tmp_path.glob("x*"))
    # cps with its default (network A) exports.
    ckpt_a = _train(tmp_path, data2d, "cps_a", "cps")
    assert main(["export", str(ckpt_a), "--format", "torchscript", "--out", str(tmp_path / "a.pt")]) == 0
    module = load_module(str(ckpt_a))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert float((load_exported(tmp_path / "a.pt").predict(x) - module.method.predict(x)).abs().max()) <= 1e-4


def test_corrupt_exported_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"\x00" * 100)
    assert main(["predict", str(bad), str(tmp_path / "a.png"), str(tmp_path / "b.png")]) == 2
    assert "broken.pt: not a readable TorchScript file" in capsys.readouterr().err


# ---- Diff-CL: CS with HFM (mambapy) blocks ---------------------------------------------------------
TINY_DIFFCL = {"timesteps": 20, "pl_steps": 1, "test_steps": 1, "hfm_levels": [2, 3], "hfm_dim": 8, "hfm_d_state": 4,
               "proj_hidden": 16, "proj_dim": 8, "bank_size": 16, "bank_push": 4, "contrast_voxels": 128,
               "ds_time_dim": 8}


@pytest.fixture(scope="module")
def diffcl_checkpoint(tmp_path_factory, data2d):
    return _train(tmp_path_factory.mktemp("dcl"), data2d, "diffcl", "diffcl", TINY_DIFFCL)


@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (1, 2, 5, 4, 7)])
@pytest.mark.parametrize("radius", [0.0, 0.1, 0.25, 0.5])
def test_separable_high_pass_equals_the_fft_high_pass(shape, radius):
    from semidiff.export import _separable_high_pass
    from semidiff.nets.hfm import high_pass

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_separable_high_pass(x, radius), high_pass(x, radius), rtol=0, atol=2e-6)


def test_diffcl_cs_with_hfm_exports_to_both_formats(tmp_path, diffcl_checkpoint):
    pytest.importorskip("onnxruntime")
    import mambapy.mamba
    import mambapy.pscan

    from semidiff.nets import hfm

    module = load_module(str(diffcl_checkpoint))
    blocks = [m for m in module.method.cs.modules() if isinstance(m, hfm.HFMBlock)]
    assert len(blocks) == 2 and module.method.options.test_output == "cs"
    results = export_checkpoint(diffcl_checkpoint, "both", tmp_path / "cs", log=lambda *_: None)
    assert [r.format for r in results] == ["torchscript", "onnx"]
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = module.method.predict(x)  # test_output cs: CS's softmax, through the FFT and the parallel scan
    for r in results:
        got = load_exported(r.path).predict(x)
        assert float((got - ref).abs().max()) <= 1e-4, r.format
    # The export swapped HFM's pieces for exportable ones only while it ran.
    assert hfm.high_pass.__module__ == "semidiff.nets.hfm"
    assert mambapy.mamba.pscan is mambapy.pscan.pscan  # the autograd Function again


def test_diffcl_with_a_sampled_output_is_refused(tmp_path, diffcl_checkpoint, capsys):
    ckpt = torch.load(diffcl_checkpoint, weights_only=False)
    ckpt["hyper_parameters"]["config"]["method"]["options"]["test_output"] = "ds"
    ds_checkpoint = tmp_path / "ds.ckpt"
    torch.save(ckpt, ds_checkpoint)
    assert load_module(str(ds_checkpoint)).method.export_net() is None
    assert main(["export", str(ds_checkpoint), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "test_output is 'ds'" in err and "DDIM sampling" in err and "test_output: cs" in err
    assert not list(tmp_path.glob("x*"))
