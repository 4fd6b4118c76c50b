"""From config to batches: reader -> labeled/unlabeled split -> cached items -> transforms -> two-stream batches.

A method never sees files; it receives ``{"labeled": {"image", "label"}, "unlabeled": {"image"} | None}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from semidiff.config import Config
from semidiff.data import (
    TwoStreamBatchSampler,
    create_reader,
    holdout,
    select_labeled,
    train_transforms,
)
from semidiff.data.readers import DatasetReader
from semidiff.data.record import Case, CaseRef
from semidiff.data.transforms import resample_volume
from semidiff.errors import ConfigError
from semidiff.noise import LabeledMaskNoise


@dataclass
class Splits:
    """The case lists a run uses, fixed before training and saved in the run folder."""

    labeled: list[CaseRef]
    unlabeled: list[CaseRef]
    val: list[CaseRef]
    #: labeled cases whose masks the noise benchmark corrupts (``noise.target: labeled``)
    noisy_labeled: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {
            "labeled": [r.case_id for r in self.labeled],
            "unlabeled_count": len(self.unlabeled),
            "val": [r.case_id for r in self.val],
            # Groups (patients, videos) per side: a video-level split shows here that none is on two sides.
            "labeled_groups": list(dict.fromkeys(r.group for r in self.labeled)),
            "unlabeled_groups": list(dict.fromkeys(r.group for r in self.unlabeled)),
            "val_groups": list(dict.fromkeys(r.group for r in self.val)),
        }
        if self.noisy_labeled:
            out["noisy_labeled"] = list(self.noisy_labeled)
        return out


def build_reader(cfg: Config) -> DatasetReader:
    return create_reader(cfg.data.reader, cfg.data.root, **cfg.data.reader_options)


def build_splits(cfg: Config, reader: DatasetReader) -> Splits:
    """Apply the labeled-subset rule and the validation choice of the config."""
    train_refs = reader.cases(cfg.data.train_split)
    if cfg.data.holdout_val is not None:
        n = cfg.data.holdout_val
        train_refs, val_refs = holdout(train_refs, int(n) if n >= 1 else n, seed=cfg.experiment.seed)
    elif cfg.data.val_split and cfg.data.val_split in reader.splits():
        val_refs = reader.cases(cfg.data.val_split)
    else:
        val_refs = []
    labeled_n: float | int = cfg.data.labeled
    if cfg.data.labeled_unit != "fraction":
        if labeled_n != int(labeled_n):
            raise ConfigError(f"data.labeled: {labeled_n} must be a whole number of {cfg.data.labeled_unit}")
        labeled_n = int(labeled_n)
    try:
        labeled, unlabeled = select_labeled(
            train_refs, labeled_n, unit=cfg.data.labeled_unit, rule=cfg.data.labeled_rule, seed=cfg.experiment.seed
        )
    except ConfigError as exc:
        raise ConfigError(f"data.labeled: {exc}") from None  # name the key the user must change
    if hasattr(reader, "unlabeled_cases"):  # the optional part of the contract: ReaderWithUnlabeled
        # Frame and own-data readers also have images without any label (unannotated frames, an
        # unlabeled folder); those of held-out groups stay out so no video crosses splits.
        val_groups = {r.group for r in val_refs}
        unlabeled = unlabeled + [r for r in reader.unlabeled_cases(cfg.data.train_split) if r.group not in val_groups]
    return Splits(labeled=labeled, unlabeled=unlabeled, val=val_refs)


def load_resampled(reader: DatasetReader, ref: CaseRef, factor: float) -> Case:
    """Load a case, resampled by ``factor`` per spatial axis when the budget asks for it."""
    case = reader.load(ref)
    if factor != 1.0:
        dims = case.image.ndim - 1
        case.image = resample_volume(case.image, factor, is_label=False, spatial_dims=dims)
        if case.label is not None:
            case.label = resample_volume(case.label, factor, is_label=True, spatial_dims=dims)
    return case


class TrainItems(Dataset):
    """Labeled items first (indices < ``num_labeled``), unlabeled after; loaded once and cached."""

    def __init__(self, reader: DatasetReader, labeled: list[CaseRef], unlabeled: list[CaseRef], transform, factor: float, cache: bool,
                 label_noise: LabeledMaskNoise | None = None):
        self.reader = reader
        self.refs = list(labeled) + list(unlabeled)
        self.num_labeled = len(labeled)
        self.transform = transform
        self.factor = factor
        self.cache = cache
        self._cases: dict[int, Case] = {}
        self.label_noise = label_noise  # noise benchmark: corrupts chosen labeled masks, same pixels every load

    def __len__(self) -> int:
        return len(self.refs)

    def _case(self, index: int) -> Case:
        if index in self._cases:
            return self._cases[index]
        case = load_resampled(self.reader, self.refs[index], self.factor)
        if index >= self.num_labeled and case.label is not None:
            # An unlabeled item of an annotated dataset (the frames of the videos left unlabeled):
            # its mask is dropped here, before caching, so no method can ever receive it.
            case = replace(case, label=None)
        if self.label_noise is not None and index < self.num_labeled:
            case = replace(case, label=self.label_noise(case.case_id, case.label))
        if self.cache:
            self._cases[index] = case
        return case

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        # The sampler passes (index, seed): augmentation is a function of the item's place in the
        # run, not of how many items were drawn before it (exact resume, any number of workers).
        index, seed = key if isinstance(key, tuple) else (key, None)
        case = self._case(index)
        item: dict[str, object] = {"image": case.image}
        if index < self.num_labeled:
            item["label"] = case.label[None]
        if seed is not None:
            self.transform.set_random_state(seed=seed)
        return self.transform(item)


def collate_two_streams(items: list[dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor] | None]:
    labeled = [it for it in items if "label" in it]
    unlabeled = [it for it in items if "label" not in it]
    out: dict[str, dict[str, torch.Tensor] | None] = {
        "labeled": {
            "image": torch.stack([torch.as_tensor(it["image"]).float() for it in labeled]),
            "label": torch.stack([torch.as_tensor(it["label"]).long() for it in labeled]),
        },
        "unlabeled": None,
    }
    if unlabeled:
        out["unlabeled"] = {"image": torch.stack([torch.as_tensor(it["image"]).float() for it in unlabeled])}
    return out


class CaseList(Dataset):
    """Whole validation cases, one per item (evaluation is per case, not per patch)."""

    def __init__(self, reader: DatasetReader, refs: list[CaseRef]):
        self.reader = reader
        self.refs = refs

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> Case:
        return self.reader.load(self.refs[index])


class RunBatchSampler(TwoStreamBatchSampler):
    """The run's two-stream sampler, whose iterations follow Lightning's epochs of the batch sequence.

    Lightning measures an epoch by ``len()`` (``num_batches`` = ``train.max_steps``), so epoch
    ``e`` is batches ``e * num_batches`` to ``(e + 1) * num_batches - 1`` of the run's global
    sequence. Without skipped steps the run ends inside the first epoch. Steps skipped for a
    non-finite loss (``train.nonfinite: skip``) consume batches without counting as steps, so the
    run can outlast it; Lightning then starts a new epoch and iterates the dataloader again. It
    calls ``set_epoch`` only on a dataloader's ``sampler`` and ``batch_sampler.sampler``, never on
    a batch sampler itself, so each iteration moves the position on here instead: it yields from
    ``start_batch`` (a resumed run's batches consumed, possibly mid-epoch) to the end of that
    epoch, and the next iteration starts at the following epoch.
    """

    def __iter__(self):
        first = self.start_batch
        end = (first // self.num_batches + 1) * self.num_batches  # where Lightning's epoch ends
        self.start_batch = end
        for k in range(first, end):
            idx = self.batch(k)
            yield [(i, self.item_seed(k, j)) for j, i in enumerate(idx)] if self.with_seeds else idx


class SemidiffData(L.LightningDataModule):
    """Lightning data module; the whole run is one 'epoch' of ``train.max_steps`` batches."""

    def __init__(self, cfg: Config, uses_unlabeled: bool):
        super().__init__()
        self.cfg = cfg
        self.reader = build_reader(cfg)
        self.splits = build_splits(cfg, self.reader)
        self.uses_unlabeled = uses_unlabeled and cfg.train.unlabeled_batch > 0
        if self.uses_unlabeled and not self.splits.unlabeled:
            raise ConfigError(
                f"method.name={cfg.method.name} needs unlabeled data but data.labeled={cfg.data.labeled} "
                f"{cfg.data.labeled_unit} leaves none"
            )
        self.train_items = TrainItems(
            self.reader,
            self.splits.labeled,
            self.splits.unlabeled if self.uses_unlabeled else [],
            train_transforms(cfg.spatial_dims, cfg.data.patch_size, augment=cfg.data.augment),
            cfg.data.resample_factor,
            cfg.data.cache,
            label_noise=self._labeled_noise(cfg),
        )

    def _labeled_noise(self, cfg: Config) -> LabeledMaskNoise | None:
        """The labeled-mask corruption of ``noise.target: labeled`` (None otherwise); records its cases."""
        if cfg.noise.target != "labeled":
            return None
        noise = LabeledMaskNoise(cfg.noise, [r.case_id for r in self.splits.labeled], cfg.model.num_classes)
        self.splits.noisy_labeled = noise.noisy_ids
        return noise

    def train_dataloader(self) -> DataLoader:
        n_lab = self.train_items.num_labeled
        # The whole run is one pass of the sampler (more only after skipped steps); a resumed run
        # starts at the batches it consumed: its step count plus its skipped steps.
        module = self.trainer.lightning_module if self.trainer else None
        start = (self.trainer.global_step + getattr(module, "skipped_steps", 0)) if self.trainer else 0
        sampler = RunBatchSampler(
            list(range(n_lab)),
            list(range(n_lab, len(self.train_items))),
            self.cfg.train.labeled_batch,
            self.cfg.train.unlabeled_batch if self.uses_unlabeled else 0,
            # len() must stay max_steps on resume: Lightning measures the (single) epoch by it and
            # counts the restored batches in; max_steps stops the run before the sampler runs out.
            num_batches=self.cfg.train.max_steps,
            seed=self.cfg.experiment.seed,
            rank=self.trainer.global_rank if self.trainer else 0,
            world_size=self.trainer.world_size if self.trainer else 1,
            start_batch=start,
            with_seeds=True,
        )
        return DataLoader(
            self.train_items,
            batch_sampler=sampler,
            collate_fn=collate_two_streams,
            num_workers=self.cfg.data.num_workers,
            persistent_workers=self.cfg.data.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.splits.val:
            return []
        refs = self.splits.val
        world = self.trainer.world_size if self.trainer else 1
        if world > 1 and len(refs) >= world:
            # Each rank validates its share; the module gathers the per-case metrics, so they are
            # computed once over the whole set (use_distributed_sampler is off).
            refs = refs[self.trainer.global_rank :: world]
        return DataLoader(CaseList(self.reader, refs), batch_size=None, collate_fn=lambda c: c)
