"""Typed configs: YAML + dotted overrides, errors that name the key, the saved resolved config."""

from pathlib import Path

import pytest
import yaml

from semidiff.config import config_from_dict, load_config
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
    ("method.options.ema=0.9", "method.options.ema"),
])
def test_bad_keys_and_types_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/acdc/supervised_reduced.yaml", [override])
    assert key in str(err.value)


def test_unknown_method_lists_known_ones():
    with pytest.raises(ConfigError, match="known: .*supervised"):
        load_config(None, ["method.name=nope"])


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
            from semidiff.bench import grid_cells, load_bench

            spec, base = load_bench(f)
            for cell in grid_cells(spec, base, Path("/nonexistent")):  # each cell's overrides validate too
                load_config(cell.config, list(cell.overrides))
            continue
        cfg = load_config(f)
        # The form saved in run folders and checkpoints loads back to the identical config.
        assert config_from_dict(yaml.safe_load(cfg.to_yaml()), str(f)) == cfg
