"""Gradient norms and HFM gate statistics during the first steps of a training, by parameter group.

    python benchmarks/grad_norms.py configs/acdc/diffcl_reduced.yaml method.options.peer=none \
        method.options.use_contrast=false [--steps 600] [--every 50]

Runs the real method, data path, optimiser and learning-rate schedule of the config (random
labeled/unlabeled batches from a seeded generator) and prints, every ``--every`` steps, the mean
loss, the gradient norm of each parameter group (the module path up to ``--depth`` names) and, for
every HFM block, the mean and spread of its gate's multiplier on the last batch. Written to find
why CS with HFM fits its labels more slowly than the same U-Net without it (issue 23).
"""

from __future__ import annotations

import argparse
import collections

import torch

from semidiff.config import load_config
from semidiff.engine.data import SemidiffData, collate_two_streams
from semidiff.engine.module import SemidiffModule, lr_factor
from semidiff.evaluation.evaluate import autocast_for
from semidiff.methods import Progress
from semidiff.nets.hfm import HFMBlock


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--depth", type=int, default=4, help="names of the module path that make a group")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(cfg.experiment.seed)
    module = SemidiffModule(cfg.model_dump(mode="json"))
    module.setup("fit")
    data = SemidiffData(cfg, uses_unlabeled=module.method.uses_unlabeled)
    opts = module.configure_optimizers()
    opt, sched = opts["optimizer"], opts["lr_scheduler"]["scheduler"]
    items = data.train_items
    n_lab, n_all = items.num_labeled, len(items)
    lab_b, unl_b = cfg.train.labeled_batch, cfg.train.unlabeled_batch if data.uses_unlabeled else 0
    gen = torch.Generator().manual_seed(cfg.experiment.seed)
    device = torch.device("cpu")

    gates: dict[str, list[float]] = {}

    def gate_hook(name):
        def hook(conv, inputs, output):
            a = torch.sigmoid(output.float()).detach()  # the block multiplies its input by 1 + a
            gates[name] = [1 + a.mean().item(), a.std().item()]
        return hook

    for name, m in module.method.named_modules():
        if isinstance(m, HFMBlock) and m.gate_mode == "multiply":  # the residual gate has no multiplier
            m.gate.register_forward_hook(gate_hook(name))

    def group(name: str) -> str:
        # A net wrapped for HFM keeps its own modules under "base": drop it so groups line up with the plain net's.
        return ".".join([p for p in name.split(".") if p != "base"][: args.depth])

    losses, norms = [], collections.defaultdict(list)
    print(f"{cfg.method.name} {' '.join(args.overrides)}: lr {cfg.train.lr} x {lr_factor(cfg, 0):.3f} at step 0")
    for k in range(args.steps):
        lab = torch.randint(0, n_lab, (lab_b,), generator=gen).tolist()
        unl = torch.randint(n_lab, max(n_all, n_lab + 1), (unl_b,), generator=gen).tolist()
        idx = [(i, k * 100 + j) for j, i in enumerate(lab)] + [(i, k * 100 + 50 + j) for j, i in enumerate(unl)]
        batch = collate_two_streams([items[j] for j in idx])
        with autocast_for(cfg, device):
            parts = module.method.training_step(batch["labeled"], batch["unlabeled"], Progress(k, cfg.train.max_steps))
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        sq = collections.defaultdict(float)
        for name, p in module.method.named_parameters():
            if p.grad is not None:
                sq[group(name)] += p.grad.float().pow(2).sum().item()
        for g, v in sq.items():
            norms[g].append(v ** 0.5)
        opt.step()
        sched.step()
        module.method.on_step_end(Progress(k + 1, cfg.train.max_steps))
        losses.append(parts["loss"].item())
        if (k + 1) % args.every == 0:
            top = sorted(norms, key=lambda g: -sum(norms[g]))[:8]
            text = ", ".join(f"{g} {sum(norms[g]) / len(norms[g]):.3g} (max {max(norms[g]):.3g})" for g in top)
            gate = " ".join(f"{n}: x{m:.2f}±{s:.2f}" for n, (m, s) in gates.items())
            print(f"step {k + 1}: loss {sum(losses) / len(losses):.4f} | grad {text} | {gate}", flush=True)
            losses, norms = [], collections.defaultdict(list)


if __name__ == "__main__":
    main()
