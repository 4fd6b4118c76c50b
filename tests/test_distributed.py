"""Two-process DDP on CPU (gloo): disjoint shards, consistent EMA teachers, metrics over the whole
validation set, and a final checkpoint that loads in a single process.

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
    """Run by the test (rank 0) and re-run by Lightning for rank 1."""
    import json, sys
    from pathlib import Path
    import torch
    from semidiff.config import config_from_dict
    from semidiff.engine import data as engine_data
    from semidiff.engine.module import SemidiffModule
    from semidiff.engine.train import train

    out = Path(sys.argv[2])
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

    def dump(self):
        rank = self.global_rank
        torch.save({k: v.detach().clone() for k, v in self.method.state_dict().items()}, out / f"state{rank}.pt")
        (out / f"seen{rank}.json").write_text(json.dumps(
            {"items": seen, "num_labeled": self.trainer.datamodule.train_items.num_labeled,
             "validated": validated, "gathered": gathered}))

    SemidiffModule.on_train_end = dump
    cfg = config_from_dict(json.loads(Path(sys.argv[1]).read_text()))
    train(cfg, log=lambda *_: None)
''')


def _config(out, root, devices: int, steps: int, val_every: int) -> dict:
    return {
        "experiment": {"name": f"ddp{devices}", "output_dir": str(out), "seed": 5},
        "data": {"reader": "synthetic", "root": str(root), "labeled": 6, "patch_size": [32, 32], "augment": False},
        "model": {"net": "unet2d", "num_classes": 3, "net_options": {"features": [4, 8, 8, 16, 16]}},
        "method": {"name": "mean_teacher"},
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


def _launch(tmp_path, root, devices: int, steps: int, val_every: int):
    cfg = tmp_path / f"cfg{devices}.json"
    cfg.write_text(json.dumps(_config(tmp_path / "runs", root, devices, steps, val_every)))
    script = tmp_path / "run_ddp.py"
    script.write_text(SCRIPT)
    record = tmp_path / f"record{devices}"
    record.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), str(cfg), str(record)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return record, tmp_path / "runs" / f"ddp{devices}", time.perf_counter() - start


def test_two_process_ddp_mean_teacher(tmp_path, ddp_data):
    record, run_dir, _ = _launch(tmp_path, ddp_data, devices=2, steps=STEPS, val_every=STEPS)
    seen = [json.loads((record / f"seen{r}.json").read_text()) for r in (0, 1)]
    n_lab = seen[0]["num_labeled"]
    for stream, pick in (("labeled", lambda i: i < n_lab), ("unlabeled", lambda i: i >= n_lab)):
        items = [[i for i in s["items"] if pick(i)] for s in seen]
        assert len(items[0]) == len(items[1]) == STEPS
        assert not set(items[0]) & set(items[1]), f"{stream}: the two ranks drew the same item"
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
    module = load_module(str(run_dir / "checkpoints" / "final.ckpt"))
    assert module.checkpoint_step == STEPS
    probs = module.method.predict(torch.rand(1, 1, 32, 32))
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 32, 32))
    summary = json.loads((run_dir / "eval_val_last" / "summary.json").read_text())
    assert summary["protocol"]["cases"] == 2  # final evaluation: rank 0, the whole set
    assert np.isfinite(summary["mean"]["dice"])
