"""Where a training step's time goes: shares of data, forward, backward, optimiser, the method's
end-of-step updates, and named parts inside the forward (DDIM sampling, HFM, contrastive terms,
teacher passes), through the real data path, method and optimiser.

    python benchmarks/step_profile.py configs/acdc/diffcl_reduced.yaml [key=value ...] [--steps 6]

The named parts are ``torch.profiler.record_function`` labels that the methods and networks set
(``semidiff.profiling.PARTS``); their time is CPU wall time of the forward only (their backward
is inside "backward"). Prints one Markdown row per config: s/step, then each phase's share.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from semidiff.config import load_config
from semidiff.engine.data import SemidiffData, collate_two_streams
from semidiff.engine.module import SemidiffModule
from semidiff.evaluation.evaluate import autocast_for
from semidiff.hardware import resolve_precision
from semidiff.methods import Progress
from semidiff.profiling import PARTS

PHASES = ("data", "forward", "backward", "optimizer", "on_step_end")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--step", type=int, default=None,
                    help="training step the timed steps pretend to be at (default: 60%% of max_steps, "
                         "after warm-ups and pre-training stages)")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(cfg.experiment.seed)
    module = SemidiffModule(cfg.model_dump(mode="json"))
    module.setup("fit")  # precision / memory format / compile as training resolves them on this machine
    data = SemidiffData(cfg, uses_unlabeled=module.method.uses_unlabeled)
    opt = module.configure_optimizers()["optimizer"]
    items = data.train_items
    n_lab, n_all = items.num_labeled, len(items)
    lab_b, unl_b = cfg.train.labeled_batch, cfg.train.unlabeled_batch if data.uses_unlabeled else 0
    at = args.step if args.step is not None else int(0.6 * cfg.train.max_steps)
    device = torch.device("cpu")

    def one_step(k: int) -> None:
        with record_function("data"):
            idx = [(i * 7 % n_lab, k * 100 + i) for i in range(lab_b)]
            idx += [(n_lab + (k * 13 + i) % max(1, n_all - n_lab), k * 100 + 50 + i) for i in range(unl_b)]
            batch = module.on_after_batch_transfer(collate_two_streams([items[j] for j in idx]), 0)
        progress = Progress(at + k, cfg.train.max_steps)
        with record_function("forward"), autocast_for(cfg, device):
            parts = module.method.training_step(batch["labeled"], batch["unlabeled"], progress)
        with record_function("backward"):
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
        with record_function("optimizer"):
            opt.step()
        with record_function("on_step_end"):
            module.method.on_step_end(Progress(at + k + 1, cfg.train.max_steps))

    for k in range(args.warmup):  # also fills the case cache the timed steps read
        one_step(k)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for k in range(args.warmup, args.warmup + args.steps):
            one_step(k)
        wall = (time.perf_counter() - t0) / args.steps
    totals = {e.key: e.cpu_time_total / 1e6 / args.steps for e in prof.key_averages() if e.key in PHASES + PARTS}
    step = sum(totals.get(p, 0.0) for p in PHASES)
    cells = [f"{p} {100 * totals[p] / step:.0f}%" for p in PHASES + PARTS if totals.get(p)]
    precision = resolve_precision(cfg.train.precision, "cpu")
    print(f"| {args.config} {' '.join(args.overrides)} | {cfg.method.name} | {precision} | "
          f"{torch.get_num_threads()} | {wall:.3f} | {', '.join(cells)} |")


if __name__ == "__main__":
    main()
