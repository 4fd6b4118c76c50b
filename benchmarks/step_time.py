"""Seconds per training step and peak memory of a config, through the real data path and method.

    python benchmarks/step_time.py configs/acdc/supervised_reduced.yaml [key=value ...] [--steps 20]

Prints one Markdown row: config, method, net, batch, patch, precision, s/step (mean of the
timed steps after warm-up), peak RSS (CPU) or peak CUDA memory. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from semidiff.config import load_config
from semidiff.engine.data import SemidiffData, collate_two_streams
from semidiff.engine.module import SemidiffModule
from semidiff.evaluation.evaluate import autocast_for
from semidiff.hardware import resolve_precision
from semidiff.methods import Progress


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(cfg.experiment.seed)
    device = torch.device(args.device)
    module = SemidiffModule(cfg.model_dump(mode="json")).to(device)
    module.setup("fit")  # precision / memory format / compile as training resolves them on this machine
    data = SemidiffData(cfg, uses_unlabeled=module.method.uses_unlabeled)
    opt = module.configure_optimizers()["optimizer"]
    items = data.train_items
    n_lab = items.num_labeled
    lab_b, unl_b = cfg.train.labeled_batch, cfg.train.unlabeled_batch if data.uses_unlabeled else 0
    # Pre-load the cases touched, so the timing is the step, not the first file read.
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        idx = [(i % n_lab, step * 100 + i) for i in range(lab_b)]
        idx += [(n_lab + i % max(1, len(items) - n_lab), step * 100 + 50 + i) for i in range(unl_b)]
        batch = collate_two_streams([items[k] for k in idx])
        batch = {k: None if v is None else {n: t.to(device) for n, t in v.items()} for k, v in batch.items()}
        batch = module.on_after_batch_transfer(batch, 0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast_for(cfg, device):
            parts = module.method.training_step(batch["labeled"], batch["unlabeled"], Progress(step, cfg.train.max_steps))
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        opt.step()
        module.method.on_step_end(Progress(step + 1, cfg.train.max_steps))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    s = sum(times) / len(times)
    if device.type == "cuda":
        mem = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB CUDA"
    else:
        mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB RSS"
    print("| config | method | net | batch | patch | precision | s/step | peak memory | machine |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.config} {' '.join(args.overrides)} | {cfg.method.name} | {cfg.model.net} | {lab_b}+{unl_b} | "
          f"{cfg.data.patch_size} | {resolve_precision(cfg.train.precision, args.device)} | {s:.3f} | {mem} | "
          f"{platform.machine()}, {torch.get_num_threads()} threads, {device} |")


if __name__ == "__main__":
    main()
