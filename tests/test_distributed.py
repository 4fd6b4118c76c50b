"""Two-process DDP on CPU (gloo): disjoint shards, consistent EMA teachers, a Diff-CL memory bank and
ProtoDiff prototypes that are identical on both ranks and built from both ranks' data, metrics over
the whole validation set, and a final checkpoint that loads in a single process.

The run is a real ``strategy=ddp`` launch: the test starts one Python process, Lightning starts the
second one by re-running the same script with ``LOCAL_RANK=1``. Small hooks in that script record
what each rank saw and its final weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from semidiff.data.sampler import TwoStreamBatchSampler
from semidiff.data.synthetic import make_synthetic_dataset
from semidiff.engine.module import load_module

STEPS = 3
SCRIPT = textwrap.dedent('''
    """Run by the test (rank 0) and re-run by Lightning for rank 1: one training per config, in turn
    (one launch for all of them: starting the two Python processes is most of the cost)."""
    import json, sys
    from pathlib import Path
    import torch
    from semidiff.config import config_from_dict
    from semidiff.engine import data as engine_data
    from semidiff.engine.module import SemidiffModule
    from semidiff.engine.train import train

    current = {}  # the run in progress: its record folder, the batch being trained, where to inject NaN
    seen = []
    original_getitem = engine_data.TrainItems.__getitem__

    def recording_getitem(self, key):
        seen.append(int(key[0]) if isinstance(key, tuple) else int(key))
        return original_getitem(self, key)

    engine_data.TrainItems.__getitem__ = recording_getitem
    validated = []
    original_val_step = SemidiffModule.validation_step

    def recording_val_step(self, case, batch_idx):
        validated.append(case.case_id)
        return original_val_step(self, case, batch_idx)

    SemidiffModule.validation_step = recording_val_step
    original_epoch_end = SemidiffModule.on_validation_epoch_end
    gathered = []

    def recording_epoch_end(self):
        original_epoch_end(self)
        gathered.append(sorted(r["case_id"] for r in self._val_records))

    SemidiffModule.on_validation_epoch_end = recording_epoch_end
    # Diff-CL: the memory candidates this rank found at each step (before the cross-rank gather).
    from semidiff.methods.diffcl import DiffCL
    pushed = []
    original_diffcl_step_end = DiffCL.on_step_end

    def recording_diffcl_step_end(self, progress):
        if self._pending_push is not None:
            pushed.append([t.detach().clone() for t in self._pending_push])
        original_diffcl_step_end(self, progress)

    DiffCL.on_step_end = recording_diffcl_step_end
    # ProtoDiff: this rank's prototype statistics before and after the cross-rank sum.
    from semidiff.methods.protodiff import ProtoDiff
    prototype_sums = []
    original_apply = ProtoDiff.apply_prototype_update

    def recording_apply(self, sums, totals):
        local = (sums.clone(), totals.clone())
        original_apply(self, sums, totals)
        prototype_sums.append({"local": local, "reduced": (sums.clone(), totals.clone())})

    ProtoDiff.apply_prototype_update = recording_apply
    # nonfinite: skip under DDP: a NaN loss on one rank only, at one batch.
    from semidiff.methods.mean_teacher import MeanTeacher
    original_module_step = SemidiffModule.training_step
    original_mt_step = MeanTeacher.training_step

    def tracking_module_step(self, batch, batch_idx):
        current["batch"] = self.batch_number
        return original_module_step(self, batch, batch_idx)

    def nan_on_one_rank(self, labeled, unlabeled, progress):
        parts = original_mt_step(self, labeled, unlabeled, progress)
        if current["nan_at"] == [torch.distributed.get_rank(), current["batch"]]:
            parts["loss_sup"] = torch.tensor(float("nan"))
        return parts

    SemidiffModule.training_step = tracking_module_step
    MeanTeacher.training_step = nan_on_one_rank

    def dump(self):
        rank, out = self.global_rank, current["out"]
        torch.save({k: v.detach().clone() for k, v in self.method.state_dict().items()}, out / f"state{rank}.pt")
        torch.save({"pushed": pushed, "prototype_sums": prototype_sums}, out / f"updates{rank}.pt")
        (out / f"seen{rank}.json").write_text(json.dumps(
            {"items": seen, "num_labeled": self.trainer.datamodule.train_items.num_labeled,
             "validated": validated, "gathered": gathered, "skipped_steps": self.skipped_steps,
             "global_step": self.global_step}))

    SemidiffModule.on_train_end = dump
    for cfg_path, record, nan_at in json.loads(Path(sys.argv[1]).read_text()):
        current["out"], current["nan_at"] = Path(record), nan_at
        for recorded in (seen, validated, gathered, pushed, prototype_sums):
            recorded.clear()
        train(config_from_dict(json.loads(Path(cfg_path).read_text())), log=lambda *_: None)
''')


TINY_UNET = {"features": [4, 8, 8, 16, 16]}
# Diff-CL kept tiny: a short diffusion chain, one DDIM step for pseudo-labels, one HFM block on a
# coarse level with a narrow Mamba, and a bank large enough to keep every entry of the run.
TINY_DIFFCL = {"timesteps": 20, "pl_steps": 1, "test_steps": 1, "hfm_levels": [3], "hfm_dim": 8, "hfm_d_state": 4,
               "proj_hidden": 16, "proj_dim": 8, "bank_size": 64, "bank_push": 4, "contrast_voxels": 128,
               "ds_time_dim": 8}


def _config(out, root, devices: int, steps: int, val_every: int, method: str = "mean_teacher",
            options: dict | None = None, net: str = "unet2d", net_options: dict | None = None) -> dict:
    return {
        "experiment": {"name": f"ddp{devices}", "output_dir": str(out), "seed": 5},
        "data": {"reader": "synthetic", "root": str(root), "labeled": 6, "patch_size": [32, 32], "augment": False},
        "model": {"net": net, "num_classes": 3, "net_options": net_options or TINY_UNET},
        "method": {"name": method, "options": options or {}},
        "train": {"max_steps": steps, "labeled_batch": 1, "unlabeled_batch": 1, "optimizer": "adamw", "lr": 1e-3,
                  "val_every": val_every, "log_every": 1, "accelerator": "cpu", "devices": devices,
                  "progress_bar": False, "num_threads": 1},
        "eval": {"overlay_cases": 0},
    }


def test_sampler_shards_are_disjoint_within_each_pass():
    labeled, unlabeled = list(range(7)), list(range(7, 20))
    world = 3
    samplers = [TwoStreamBatchSampler(labeled, unlabeled, 2, 3, num_batches=12, seed=4, rank=r, world_size=world)
                for r in range(world)]
    for stream, size, per_batch, offset in (("labeled", 7, 2, 0), ("unlabeled", 13, 3, 2)):
        shard = size // world  # items of a stream each rank takes from one permutation (at least)
        draws = [[b[offset:offset + per_batch] for b in s] for s in samplers]
        flat = [[i for batch in d for i in batch][:shard] for d in draws]  # the first pass of each rank
        for a in range(world):
            for b in range(a + 1, world):
                assert not set(flat[a]) & set(flat[b]), f"{stream}: ranks {a} and {b} overlap"
        assert all(len(set(f)) == shard for f in flat)


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):
    # 14 cases: 12 training (6 labeled, 6 unlabeled: 3 of each per rank) and 2 validation.
    return make_synthetic_dataset(tmp_path_factory.mktemp("ddp"), spatial_dims=2, num_cases=14, size=(32, 32),
                                  num_classes=3, val_cases=2, seed=0)


# The three DDP runs, launched once for the module. Diff-CL and ProtoDiff validate only after
# training: DDP broadcasts rank 0's buffers in a validation forward, which would make their banks
# and prototypes equal whatever the method did.
RUNS = {
    "mean_teacher": {"val_every": STEPS},
    "diffcl": {"val_every": 100, "method": "diffcl", "options": TINY_DIFFCL},
    "protodiff": {"val_every": 100, "method": "protodiff", "options": {"warmup": 1}, "net": "protodiff_net",
                  "net_options": {"features": [4, 8, 8, 16, 16], "time_embed_dim": 16}},
    "skip": {"val_every": 100, "nonfinite": "skip"},  # rank 1's loss is NaN at batch NAN_BATCH
}
NAN_BATCH = 1


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, ddp_data):
    """Launch a 2-process DDP run of every entry of RUNS; returns name -> (record folder, run folder)."""
    tmp = tmp_path_factory.mktemp("ddp_runs")
    plan, runs = [], {}
    for name, spec in RUNS.items():
        spec = dict(spec)
        nonfinite = spec.pop("nonfinite", "stop")
        cfg = _config(tmp / "runs", ddp_data, devices=2, steps=STEPS, **spec)
        cfg["experiment"]["name"] = f"ddp_{name}"
        cfg["train"]["nonfinite"] = nonfinite
        path, record = tmp / f"{name}.json", tmp / f"record_{name}"
        path.write_text(json.dumps(cfg))
        record.mkdir()
        plan.append([str(path), str(record), [1, NAN_BATCH] if nonfinite == "skip" else None])
        runs[name] = (record, tmp / "runs" / f"ddp_{name}")
    start = time.perf_counter()
    proc = _launch(tmp, plan, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"2-process DDP, {len(RUNS)} runs of {STEPS} steps in one launch: {time.perf_counter() - start:.1f} s")
    return runs


def _launch(tmp, plan: list, timeout: float) -> subprocess.CompletedProcess:
    """Run SCRIPT on ``plan`` as rank 0; Lightning starts rank 1."""
    (tmp / "plan.json").write_text(json.dumps(plan))
    script = tmp / "run_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    return subprocess.run([sys.executable, str(script), str(tmp / "plan.json")], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_two_process_ddp_stop_mode_stops_every_rank(tmp_path, ddp_data):
    """nonfinite: stop with a NaN loss on rank 1 alone: rank 0 stops at the same step, naming the
    other process, instead of waiting forever in the next collective (the timeout catches a hang)."""
    cfg = _config(tmp_path / "runs", ddp_data, devices=2, steps=STEPS, val_every=100)
    (tmp_path / "stop.json").write_text(json.dumps(cfg))
    (tmp_path / "record").mkdir()
    proc = _launch(tmp_path, [[str(tmp_path / "stop.json"), str(tmp_path / "record"), [1, NAN_BATCH]]], timeout=300)
    assert proc.returncode != 0
    assert f"non-finite loss at step {NAN_BATCH}: on another process" in proc.stderr  # rank 0
    assert f"non-finite loss at step {NAN_BATCH}: loss_sup = nan" in proc.stderr  # rank 1


def _assert_disjoint_shards(record) -> None:
    seen = [json.loads((record / f"seen{r}.json").read_text()) for r in (0, 1)]
    n_lab = seen[0]["num_labeled"]
    for stream, pick in (("labeled", lambda i: i < n_lab), ("unlabeled", lambda i: i >= n_lab)):
        items = [[i for i in s["items"] if pick(i)] for s in seen]
        assert len(items[0]) == len(items[1]) == STEPS
        assert not set(items[0]) & set(items[1]), f"{stream}: the two ranks drew the same item"


def _assert_loads_in_one_process(run_dir, method: str):
    module = load_module(str(run_dir / "checkpoints" / "final.ckpt"))
    assert module.cfg.method.name == method and module.checkpoint_step == STEPS
    probs = module.method.predict(torch.rand(1, 1, 32, 32))
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 32, 32))
    return module


def test_two_process_ddp_mean_teacher(ddp_runs):
    record, run_dir = ddp_runs["mean_teacher"]
    _assert_disjoint_shards(record)
    seen = [json.loads((record / f"seen{r}.json").read_text()) for r in (0, 1)]
    # Validation: each rank validated one of the 2 cases; both summarised the whole set.
    assert sorted(seen[0]["validated"] + seen[1]["validated"]) == ["case_012", "case_013"]
    assert seen[0]["gathered"] == seen[1]["gathered"] == [["case_012", "case_013"]]
    # EMA teachers (and students) are identical on both ranks without any extra communication.
    s0, s1 = (torch.load(record / f"state{r}.pt") for r in (0, 1))
    params = [k for k in s0 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert any(k.startswith("teacher.") for k in params)
    for key in params:
        assert torch.equal(s0[key], s1[key]), f"{key} differs between ranks"
    # The final checkpoint loads and predicts in a single process.
    _assert_loads_in_one_process(run_dir, "mean_teacher")
    summary = json.loads((run_dir / "eval_val_last" / "summary.json").read_text())
    assert summary["protocol"]["cases"] == 2  # final evaluation: rank 0, the whole set
    assert np.isfinite(summary["mean"]["dice"])


def _assert_same_on_both_ranks(record) -> dict:
    """Parameters and buffers of the two ranks, bit for bit (BatchNorm statistics aside)."""
    s0, s1 = (torch.load(record / f"state{r}.pt") for r in (0, 1))
    keys = [k for k in s0 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for key in keys:
        assert torch.equal(s0[key], s1[key]), f"{key} differs between ranks"
    return s0


def test_two_process_ddp_diffcl_bank_holds_both_ranks_entries(ddp_runs):
    record, run_dir = ddp_runs["diffcl"]
    _assert_disjoint_shards(record)
    state = _assert_same_on_both_ranks(record)  # networks and the memory bank
    assert any(k.startswith("cs.skip_modules.3.") for k in state)  # the HFM block trained
    features, count = state["bank.features"], state["bank.count"]
    pushed = [torch.load(record / f"updates{r}.pt")["pushed"] for r in (0, 1)]
    assert len(pushed[0]) == len(pushed[1]) == STEPS
    for rank in (0, 1):
        assert sum(len(classes) for _, classes in pushed[rank]) > 0, f"rank {rank} pushed nothing"
    # Every candidate of every rank and step is in the bank (64 slots per class keep them all),
    # and nothing else is.
    expected = torch.zeros_like(count)
    for rank in (0, 1):
        for rows, classes in pushed[rank]:
            expected += torch.bincount(classes, minlength=len(count))
            for row, cls in zip(rows, classes.tolist()):
                stored = features[cls, : int(count[cls])]
                assert (stored == row).all(1).any(), f"an entry of rank {rank} (class {cls}) is missing"
    assert torch.equal(count, expected)
    _assert_loads_in_one_process(run_dir, "diffcl")


def test_two_process_ddp_protodiff_prototypes_use_both_ranks(ddp_runs):
    record, run_dir = ddp_runs["protodiff"]
    _assert_disjoint_shards(record)
    state = _assert_same_on_both_ranks(record)
    assert bool(state["prototype_ready"].any())
    sums = [torch.load(record / f"updates{r}.pt")["prototype_sums"] for r in (0, 1)]
    assert len(sums[0]) == len(sums[1]) == STEPS - 1  # none during the one warm-up step
    for step0, step1 in zip(*sums):
        # Each update is applied from the sum of both ranks' statistics, the same on both ranks.
        for part in (0, 1):
            total = step0["local"][part] + step1["local"][part]
            torch.testing.assert_close(step0["reduced"][part], total)
            torch.testing.assert_close(step1["reduced"][part], total)
        assert not torch.equal(step0["local"][0], step1["local"][0])  # the ranks saw different data
    _assert_loads_in_one_process(run_dir, "protodiff")


def test_two_process_ddp_skip_mode_skips_on_every_rank(ddp_runs):
    """A NaN loss on rank 1 alone: both ranks skip that step (the decision is all-reduced), stay
    identical, and still make STEPS optimiser steps from STEPS + 1 batches."""
    record, run_dir = ddp_runs["skip"]
    seen = [json.loads((record / f"seen{r}.json").read_text()) for r in (0, 1)]
    assert [s["skipped_steps"] for s in seen] == [1, 1]
    assert [s["global_step"] for s in seen] == [STEPS, STEPS]
    # Each rank drew STEPS + 1 batches (one labeled and one unlabeled item each).
    assert [len(s["items"]) for s in seen] == [2 * (STEPS + 1)] * 2
    _assert_same_on_both_ranks(record)
    final = torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=False)
    assert final["semidiff_engine"]["skipped_steps"] == 1 and final["global_step"] == STEPS
