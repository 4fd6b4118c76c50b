"""The bench config and its grid: which training runs a bench is made of, and where each one goes.

A bench config names training configs (one per method row) and the axes of the grid: labeled
counts, seeds and, optionally, label-noise levels. Every cell is a normal training run in
``BENCH/runs/<cell>``; :mod:`semidiff.bench.runner` trains them, :mod:`semidiff.report` reads them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
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

from semidiff.config import apply_overrides, format_validation_error, read_config_tree
from semidiff.errors import ConfigError


# ---- the bench config ---------------------------------------------------------------------------
class BenchMethod(BaseModel):
    """One row family of the table: a training config (and overrides) under a display name."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.+-]+$")
    config: str
    overrides: list[str] = []
    #: Labeled counts for this row only (e.g. the fully supervised upper bound); default: the bench's.
    labeled: list[float] | None = Field(default=None, min_length=1)
    #: Seeds for this row only (e.g. more seeds for the rows a comparison rests on); default: the bench's.
    seeds: list[int] | None = Field(default=None, min_length=1)


class BenchSpec(BaseModel):
    """The ``bench`` section of a bench YAML file.

    Attributes:
        name: Folder name of the bench under ``output_dir``.
        methods: The rows; each is a training config path, relative to the bench file's folder.
        labeled: Labeled counts (in each config's ``data.labeled_unit``).
        seeds: ``experiment.seed`` values; mean and std in the table are over these.
        noise: Optional label-noise levels, each a mapping of ``noise`` config keys (e.g.
            ``{target: pseudo, kind: flip, rate: 0.1}``); ``{}`` is the clean level. Empty list
            means no noise axis.
        overrides: Dotted overrides applied to every cell (the shared budget).
        workers: Cells run at the same time (separate processes).
        isolation: ``subprocess`` (default: a crashing cell cannot take the grid down, each cell gets a
            fresh interpreter) or ``in_process`` (no interpreter start-up per cell; one worker only).
        gpus: CUDA device ids handed out round-robin to the workers (``CUDA_VISIBLE_DEVICES``).
        qualitative_cases: Validation cases shown in the qualitative panel.
        records: Optional folder, relative to the bench file, that keeps a record of every finished
            cell: what the report reads, without checkpoints or TensorBoard events (see
            :func:`~semidiff.bench.records.save_record`). A cell recorded there with the configuration it would train now
            is not trained again, so a grid whose records are committed can be continued on
            another machine from a fresh checkout, and its report rebuilt there.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    output_dir: str = "benches"
    methods: list[BenchMethod] = Field(min_length=1)
    labeled: list[float] = Field(min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)
    noise: list[dict[str, Any]] = []
    overrides: list[str] = []
    workers: int = Field(default=1, ge=1)
    gpus: list[int] = []
    isolation: Literal["subprocess", "in_process"] = "subprocess"
    qualitative_cases: int = Field(default=3, ge=0)
    records: str | None = None

    @model_validator(mode="after")
    def _in_process_is_serial(self) -> BenchSpec:
        if self.isolation == "in_process" and self.workers > 1:
            raise ValueError("isolation 'in_process' runs one cell at a time; use workers: 1 or 'subprocess'")
        return self

    @field_validator("methods")
    @classmethod
    def _unique_names(cls, v: list[BenchMethod]) -> list[BenchMethod]:
        names = [m.name for m in v]
        if len(set(names)) != len(names):
            raise ValueError(f"method names must be unique, got {names}")
        return v


def load_bench(path: str | Path, overrides: list[str] | None = None) -> tuple[BenchSpec, Path]:
    """Read and validate a bench YAML file; returns the spec and the folder paths are relative to."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: bench config not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(tree, dict) or "bench" not in tree:
        raise ConfigError(f"{path}: a bench config needs a top-level 'bench' section")
    for item in overrides or []:
        if not item.startswith("bench."):
            raise ConfigError(f"bench override {item!r}: expected bench.KEY=VALUE")
    apply_overrides(tree, list(overrides or []))
    try:
        spec = BenchSpec.model_validate(tree["bench"])
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path), prefix="bench.")) from None
    base = path.resolve().parent
    for m in spec.methods:
        if not (base / m.config).is_file():
            raise ConfigError(f"{path}: method {m.name!r}: training config {base / m.config} not found")
    return spec, base


# ---- the grid -----------------------------------------------------------------------------------
def noise_label(level: dict[str, Any]) -> str:
    """Short, file-name-safe label of a noise level: ``clean``, ``pseudo-flip-0.1``, ``labeled-erode-k2``."""
    if not level or level.get("target", "none") == "none":
        return "clean"
    kind = level.get("kind", "flip")
    amount = f"k{level['k']}" if kind in ("erode", "dilate") else f"{level.get('rate', 0)}"
    return f"{level.get('target')}-{kind}-{amount}"


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    method: str
    config: Path
    labeled: float
    seed: int
    noise: str
    overrides: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        base = f"{self.method}_l{self.labeled:g}_s{self.seed}"
        return base if self.noise == "clean" else f"{base}_{self.noise}"

    @property
    def train_overrides(self) -> list[str]:
        """The overrides ``semidiff train`` gets for this cell."""
        return [*self.overrides, "train.progress_bar=false"]


def grid_cells(spec: BenchSpec, base: Path, bench_dir: Path) -> list[Cell]:
    """Every cell of the grid, in run order (labeled count, then seed, then noise, then method)."""
    levels = spec.noise or [{}]
    cells = []
    counts = sorted(set(spec.labeled).union(*(m.labeled or [] for m in spec.methods)))
    seeds = list(dict.fromkeys([*spec.seeds, *(s for m in spec.methods for s in m.seeds or [])]))
    for labeled, seed, level, m in itertools.product(counts, seeds, levels, spec.methods):
        if labeled not in (m.labeled or spec.labeled) or seed not in (m.seeds or spec.seeds):
            continue
        if level.get("target") == "pseudo" and not _makes_pseudo_labels(base / m.config):
            continue  # pseudo-label noise cannot change it: its clean run stands for every level
        nlabel = noise_label(level)
        noise_over = [f"noise.{k}={v}" for k, v in level.items()]
        cell = Cell(m.name, base / m.config, labeled, seed, nlabel)
        own = [
            f"experiment.output_dir={bench_dir / 'runs'}",
            f"experiment.name={cell.name}",
            f"experiment.seed={seed}",
            f"data.labeled={labeled:g}",
        ]
        # Later overrides win: shared budget, then the method's own, then the cell's coordinates.
        cells.append(Cell(m.name, cell.config, labeled, seed, nlabel,
                          tuple(spec.overrides) + tuple(m.overrides) + tuple(noise_over) + tuple(own)))
    return cells


def _makes_pseudo_labels(config: Path) -> bool:
    """Whether the training config's method learns from unlabeled data (supervised does not)."""
    return config_uses_unlabeled(read_config_tree(config))  # its bases included


def config_uses_unlabeled(tree: dict) -> bool:
    from semidiff.methods import method_class

    return method_class((tree.get("method") or {}).get("name", "supervised")).uses_unlabeled


def cell_done(run_dir: Path) -> bool:
    """A cell is finished once training ended and its end-of-training evaluation was written."""
    return (run_dir / "timing.json").is_file() and (run_dir / "eval_val_last" / "summary.json").is_file()

