"""Typed configuration: YAML files validated by pydantic, with dotted command-line overrides.

A run is fully described by one :class:`Config`. ``load_config("configs/acdc/supervised.yaml",
["train.max_steps=2000", "data.labeled=7"])`` reads the YAML, applies the overrides (values parsed
as YAML, so ``7`` is an int and ``[1,2]`` a list), and validates everything: unknown keys and
wrong types are rejected with a :class:`~semidiff.errors.ConfigError` naming the key. A file may
inherit another (``base: _reduced.yaml``) and hold only what differs: :func:`read_config_tree`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from semidiff.errors import ConfigError


class _Section(BaseModel):
    # Unknown keys are errors: a typo must never silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ExperimentConfig(_Section):
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0


class DataConfig(_Section):
    """Where the data is, how it is split and how training items are made."""

    reader: str = "synthetic"
    root: str = "demo_output/synthetic2d"
    reader_options: dict[str, Any] = Field(default_factory=dict)
    train_split: str = "train"
    val_split: str | None = "val"
    test_split: str | None = "test"
    holdout_val: float | None = Field(
        default=None,
        description="Hold out this many groups (int) or this fraction of the training list for "
        "validation, for datasets without a validation split (LA, Pancreas).",
    )
    labeled: float = Field(default=1.0, gt=0, description="N labeled cases/patients/videos, or a fraction.")
    labeled_unit: Literal["cases", "patients", "videos", "fraction"] = Field(
        default="cases",
        description="patients and videos both count whole groups (the reader's CaseRef.group), in list order; "
        "videos names them for frame datasets (EndoScapes, MOSXAV)")
    labeled_rule: Literal["first", "random"] = "first"
    patch_size: list[int] = Field(default_factory=lambda: [96, 96])
    resample_factor: float = Field(default=1.0, gt=0, le=1.0)
    normalize: Literal["none", "minmax", "zscore"] = Field(
        default="none",
        description="The normalisation the dataset's stored files carry (ACDC h5 min-max per volume, LA h5 "
        "z-score of the whole scan before cropping), which `semidiff predict` applies to raw scans; readers "
        "that normalise on load (nnunet, endoscapes, mosxav: reader_options.normalize) need 'none' or the "
        "same value. See semidiff.data.preprocessing.",
    )
    volume_axes: Literal["zyx", "xyz"] = Field(
        default="zyx",
        description="Axis order of 3D arrays the model was trained on: SimpleITK's (z,y,x) as in "
        "ACDC's SSL4MIS h5, or (x,y,z) as in LA's UA-MT h5. Used to read NIfTI/NRRD at predict time.",
    )
    augment: bool = True
    num_workers: int = Field(default=0, ge=0)
    cache: bool = True

    @field_validator("patch_size")
    @classmethod
    def _positive_patch(cls, v: list[int]) -> list[int]:
        if not v or any(s <= 0 for s in v):
            raise ValueError(f"every patch size must be positive, got {v}")
        return v


class ModelConfig(_Section):
    net: str = "unet2d"
    net_options: dict[str, Any] = Field(default_factory=dict)
    in_channels: int = Field(default=1, ge=1)
    num_classes: int = Field(default=4, ge=2)
    class_names: list[str] | None = None


class MethodConfig(_Section):
    name: str = "supervised"
    options: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(_Section):
    max_steps: int = Field(default=1000, gt=0)
    labeled_batch: int = Field(default=8, ge=1)
    unlabeled_batch: int = Field(default=0, ge=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    lr_schedule: Literal["poly", "cosine", "constant"] = "poly"
    poly_power: float = Field(default=0.9, gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    grad_clip: float | None = Field(default=None, gt=0)
    val_every: int = Field(default=200, gt=0)
    log_every: int = Field(default=10, gt=0)
    precision: Literal["auto", "32", "bf16-mixed", "16-mixed"] = Field(
        default="32",
        description="auto: bf16-mixed on a CUDA GPU with bf16 and on CPUs with native bf16 (avx512_bf16, AMX), "
        "else 32 (semidiff/hardware.py); the reduced configs use it",
    )
    memory_format: Literal["auto", "contiguous", "channels_last"] = Field(
        default="auto", description="auto: channels-last for 2D networks in mixed precision, where it is faster")
    compile: bool = Field(default=False, description="torch.compile each network (slower on CPU: see step_times.md)")
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int | str = 1
    num_nodes: int = Field(default=1, ge=1)
    deterministic: bool = False
    num_threads: int | None = Field(
        default=None, ge=1,
        description="torch CPU threads (None: the cores divided among the trainings running on this machine)")
    progress_bar: bool = True
    nonfinite: Literal["stop", "skip"] = Field(
        default="stop",
        description="a step whose loss (or a loss part) is NaN/Inf: stop the run naming the step and part, "
        "or skip it (no optimizer step, no EMA/bank/prototype update; counted as train/skipped_steps)",
    )
    max_skips: int = Field(default=100, ge=0, description="nonfinite: skip: stop once more steps than this were skipped")

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, v: Any) -> Any:
        # `train.precision=32` on the command line parses as an int; Lightning's names are text.
        return str(v) if isinstance(v, int) else v


class EvalConfig(_Section):
    mode: Literal["auto", "sliding_window", "slicewise", "whole"] = "auto"
    stride: list[int] | None = None
    sw_batch_size: int = Field(default=4, ge=1)
    empty_rule: Literal["strict", "literature"] = "strict"
    units: Literal["voxels", "mm"] = "voxels"
    largest_component: bool = False
    overlay_cases: int = Field(default=3, ge=0)


class NoiseConfig(_Section):
    """Noise-robustness benchmark mode (methods.md section 2): controlled label noise, off by default.

    ``target: labeled`` corrupts the masks of a seeded ``labeled_share`` of the labeled cases once,
    when they are loaded (validation and test labels never); ``target: pseudo`` corrupts every
    method's hard pseudo-labels where they are made (:meth:`semidiff.methods.base.Method.corrupt_pseudo`).
    Kinds (:mod:`semidiff.noise`): ``flip`` (each pixel to another class with probability ``rate``),
    ``erode`` / ``dilate`` (each foreground object shrinks / grows by ``k`` pixels), ``drop``
    (each connected component becomes background with probability ``rate``).
    """

    target: Literal["none", "labeled", "pseudo"] = "none"
    kind: Literal["flip", "erode", "dilate", "drop"] = "flip"
    rate: float = Field(default=0.0, ge=0.0, le=1.0, description="flip: per pixel; drop: per component")
    k: int = Field(default=0, ge=0, le=64, description="erode/dilate depth in pixels of the label grid")
    labeled_share: float = Field(default=1.0, ge=0.0, le=1.0,
                                 description="target labeled: share of the labeled cases corrupted")
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _used_parameter_only(self) -> NoiseConfig:
        # A value the chosen kind ignores is almost always a mistake (e.g. kind=erode, rate=0.2).
        if self.kind in ("erode", "dilate") and self.rate != 0.0:
            raise ValueError(f"noise.rate: kind {self.kind} uses noise.k, not noise.rate (leave rate at 0)")
        if self.kind in ("flip", "drop") and self.k != 0:
            raise ValueError(f"noise.k: kind {self.kind} uses noise.rate, not noise.k (leave k at 0)")
        return self


class Config(_Section):
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.eval.stride is not None and len(self.eval.stride) != len(self.data.patch_size):
            raise ValueError(
                f"eval.stride {self.eval.stride} and data.patch_size {self.data.patch_size} "
                "must have the same length"
            )
        if self.model.class_names is not None and len(self.model.class_names) != self.model.num_classes:
            raise ValueError(
                f"model.class_names has {len(self.model.class_names)} names for "
                f"{self.model.num_classes} classes"
            )
        return self

    @property
    def spatial_dims(self) -> int:
        return len(self.data.patch_size)

    def run_dir(self) -> Path:
        return Path(self.experiment.output_dir) / self.experiment.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}`` so configs can point at data without editing."""

    def sub(m: re.Match[str]) -> str:
        value = os.environ.get(m.group(1))
        if value:
            return value
        if m.group(2) is not None:
            return m.group(2)
        raise ConfigError(f"environment variable {m.group(1)} is not set (used as ${{{m.group(1)}}} in a config)")

    return _ENV.sub(sub, text)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {'.'.join(keys[: i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to a raw config tree (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.subkey=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from None
        _set_dotted(tree, key, value)
    return tree


def format_validation_error(exc: ValidationError, source: str, prefix: str = "") -> str:
    """One line per problem, each naming its dotted key (``prefix`` + the key inside the model)."""
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = prefix + ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {err['msg']}{shown}")
    return "\n".join(lines)


def config_from_dict(tree: dict[str, Any], source: str = "config") -> Config:
    """Validate a raw tree against the shared schema.

    ``method.name`` and ``method.options`` are typed by the method itself, so they are checked
    where a training is set up (:func:`semidiff.engine.train.check_method_options`), not here:
    loading a config imports neither torch nor any method.
    """
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def merge_trees(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` laid over ``base``: mappings merge key by key, at every depth; any other value of
    the child (a number, a string, a list, null) replaces the base's whole, so a list is never
    concatenated and a mapping can only add or change keys, not drop them."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def read_config_tree(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw tree of a YAML config file, with its bases merged in and ``${VAR}`` expanded.

    A file may name ``base: FILE`` or ``base: [FILE, ...]`` (paths relative to the file's folder):
    the bases are read the same way (so they may have bases of their own), merged in order (a later
    base wins over an earlier one) and the file's own keys laid over them (:func:`merge_trees`).
    A base that is missing or that includes itself, directly or not, is a :class:`ConfigError`
    naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(expand_env(path.read_text()))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    bases = tree.pop("base", None)
    if bases is None:
        return tree
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: base: expected a file name or a list of file names, got {bases!r}")
    chain = (*_chain, path.resolve())
    merged: dict[str, Any] = {}
    for name in bases:
        base_path = path.parent / name
        if base_path.resolve() in chain:
            cycle = " -> ".join(str(p) for p in (*chain[chain.index(base_path.resolve()):], base_path.resolve()))
            raise ConfigError(f"{path}: base {name} makes a cycle: {cycle}")
        if not base_path.is_file():
            raise ConfigError(f"{path}: base {name} not found ({base_path})")
        merged = merge_trees(merged, read_config_tree(base_path, chain))
    return merge_trees(merged, tree)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None), its bases merged in
    (:func:`read_config_tree`), and apply dotted overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        tree = read_config_tree(path)
    apply_overrides(tree, [expand_env(o) for o in overrides or []])
    return config_from_dict(tree, source)
