"""Typed configs: YAML + dotted overrides, errors that name the key, the saved resolved config."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from semidiff.config import config_from_dict, load_config
from semidiff.engine.train import check_method_options
from semidiff.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_overrides_parse_types_and_apply(tmp_path):
    cfg = load_config(REPO / "configs/acdc/supervised_reduced.yaml",
                      ["train.max_steps=2000", "data.labeled=3", "data.patch_size=[64,64]", "train.precision=32"])
    assert cfg.train.max_steps == 2000
    assert cfg.data.labeled == 3
    assert cfg.data.patch_size == [64, 64]
    assert cfg.train.precision == "32"
    assert cfg.spatial_dims == 2


@pytest.mark.parametrize("override,key", [
    ("train.max_stepz=5", "train.max_stepz"),
    ("train.max_steps=abc", "train.max_steps"),
    ("train.max_steps=-3", "train.max_steps"),
    ("data.labeled_unit=slices", "data.labeled_unit"),
    ("nonsense.key=1", "nonsense"),
])
def test_bad_keys_and_types_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/acdc/supervised_reduced.yaml", [override])
    assert key in str(err.value)


def test_bad_method_option_names_the_option_and_the_file():
    path = REPO / "configs/acdc/supervised_reduced.yaml"
    cfg = load_config(path, ["method.options.ema=0.9"])  # the method's own schema is not read here
    with pytest.raises(ConfigError) as err:
        check_method_options(cfg, str(path))
    assert "method.options.ema: unknown key" in str(err.value) and str(path) in str(err.value)


def test_unknown_method_lists_known_ones():
    with pytest.raises(ConfigError, match="nowhere.yaml: .*known: .*supervised"):
        check_method_options(load_config(None, ["method.name=nope"]), "nowhere.yaml")


def test_train_with_a_bad_method_option_fails_before_the_run_folder(tmp_path, capsys):
    """`semidiff train` checks the method's options up front: one line naming the option and the
    file, exit code 2, nothing written."""
    from semidiff.cli import main

    runs = tmp_path / "runs"
    code = main(["train", str(REPO / "configs/acdc/mean_teacher_reduced.yaml"), f"experiment.output_dir={runs}",
                 "method.options.ema_decay=0.99", "method.options.emma=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "mean_teacher_reduced.yaml: invalid options for method 'mean_teacher'" in err
    assert "method.options.emma: unknown key" in err
    assert not runs.exists()


def test_load_config_imports_neither_torch_nor_the_methods():
    """Reading a YAML file is cheap: no torch, no MONAI, no method module (a fresh interpreter)."""
    probe = ("import sys; from semidiff.config import load_config; "
             f"cfg = load_config({str(REPO / 'configs/acdc/diffcl_reduced.yaml')!r}); "
             "assert cfg.method.name == 'diffcl'; "
             "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('semidiff.methods', 'monai'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == "[]"


def test_env_expansion_and_missing_file(tmp_path, monkeypatch):
    p = tmp_path / "c.yaml"
    p.write_text("data: {root: ${MY_ROOT_VAR}/x}\n")
    monkeypatch.setenv("MY_ROOT_VAR", "/data")
    assert load_config(p).data.root == "/data/x"
    monkeypatch.delenv("MY_ROOT_VAR")
    with pytest.raises(ConfigError, match="MY_ROOT_VAR"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_every_shipped_config_validates():
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert files
    for f in files:
        if f.parent.name == "bench":
            from semidiff.bench.spec import grid_cells, load_bench

            spec, base = load_bench(f)
            for cell in grid_cells(spec, base, Path("/nonexistent")):  # each cell's overrides validate too
                load_config(cell.config, list(cell.overrides))
            continue
        cfg = load_config(f)
        check_method_options(cfg, str(f))
        # The form saved in run folders and checkpoints loads back to the identical config.
        assert config_from_dict(yaml.safe_load(cfg.to_yaml()), str(f)) == cfg


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_config_inherits_its_base_deep_merged_child_wins(tmp_path):
    _write(tmp_path / "_base.yaml", "data: {reader: acdc, patch_size: [64, 64], labeled: 7}\n"
                                    "train: {max_steps: 1000, lr: 0.01}\n"
                                    "method: {name: mean_teacher, options: {consistency: 0.1, noise_std: 0.1}}\n")
    child = _write(tmp_path / "sub" / "child.yaml",
                   "base: ../_base.yaml\n"
                   "data: {patch_size: [32, 32, 8]}\n"  # a list replaces the base's whole: no concatenation
                   "train: {lr: 0.05}\n"
                   "method: {options: {consistency: 1.0}}\n")
    cfg = load_config(child)
    assert cfg.data.reader == "acdc" and cfg.data.labeled == 7  # from the base
    assert cfg.data.patch_size == [32, 32, 8]
    assert (cfg.train.max_steps, cfg.train.lr) == (1000, 0.05)
    assert cfg.method.name == "mean_teacher"
    assert cfg.method.options == {"consistency": 1.0, "noise_std": 0.1}  # mappings merge key by key
    # Overrides still win over both.
    assert load_config(child, ["train.lr=0.2"]).train.lr == 0.2


def test_config_bases_in_a_list_merge_in_order_and_nest(tmp_path):
    _write(tmp_path / "_root.yaml", "experiment: {seed: 3}\ntrain: {max_steps: 10}\n")
    _write(tmp_path / "_a.yaml", "base: _root.yaml\ntrain: {max_steps: 20, lr: 0.5}\n")
    _write(tmp_path / "_b.yaml", "train: {max_steps: 30}\n")
    cfg = load_config(_write(tmp_path / "c.yaml", "base: [_a.yaml, _b.yaml]\nexperiment: {name: c}\n"))
    assert (cfg.train.max_steps, cfg.train.lr, cfg.experiment.seed, cfg.experiment.name) == (30, 0.5, 3, "c")
    cfg = load_config(_write(tmp_path / "d.yaml", "base: [_b.yaml, _a.yaml]\n"))
    assert cfg.train.max_steps == 20  # the later base wins


def test_config_base_cycle_and_missing_base_name_the_file(tmp_path):
    a = _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: [c.yaml]\n")
    _write(tmp_path / "c.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: base a\.yaml makes a cycle: .*a\.yaml -> .*b\.yaml -> "
                                          r".*c\.yaml -> .*a\.yaml"):
        load_config(a)
    with pytest.raises(ConfigError, match="self.yaml: base self.yaml makes a cycle"):
        load_config(_write(tmp_path / "self.yaml", "base: self.yaml\n"))
    with pytest.raises(ConfigError, match=r"child\.yaml: base _gone\.yaml not found"):
        load_config(_write(tmp_path / "child.yaml", "base: _gone.yaml\ntrain: {lr: 0.1}\n"))
    with pytest.raises(ConfigError, match=r"odd\.yaml: base: expected a file name"):
        load_config(_write(tmp_path / "odd.yaml", "base: {x: 1}\n"))
