"""How good are a trained run's pseudo-labels on its own unlabeled training cases?

A semi-supervised method learns from the unlabeled images only through the targets it makes for
them. ACDC's "unlabeled" training cases are annotated (the split hides their labels from
training), so the targets can be scored: this script runs a run's pseudo-label model over the
unlabeled cases of the run's own split and reports, per class and pooled over slices,

- the Dice of the pseudo-labels against the hidden truth;
- the share of pixels at or above the confidence threshold (the pixels the unlabeled loss uses);
- the accuracy of the confident pixels and of the rest, and how many of all wrong pixels are
  confident (errors the student is taught) rather than left out (errors it is never told about);
- where the left-out pixels are: the share within two pixels of an edge between classes of the
  truth, beside the share of all pixels that are.

Pseudo-label model: ProtoDiff's teacher with its ``pseudo_label_steps`` DDIM steps (as in
training); any other method's ``predict`` (for supervised, the labels-alone reference). The
networks run in eval mode (BatchNorm running statistics), on the unaugmented slices resized to the
training patch, so this is a diagnostic of the checkpoint, not of one training step.

Usage (from the repository root, SEMIDIFF_REALDATA set):
    python benchmarks/pseudo_label_quality.py RUN [RUN ...] [--every 2] [--threshold 0.95] [--steps 1 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from semidiff.data.transforms import resize_to
from semidiff.engine.data import build_reader, build_splits
from semidiff.engine.module import load_module
from semidiff.evaluation.metrics import pooled_class_dice


def pseudo_probs(method, name: str, x: torch.Tensor, batch: int = 32, steps: int | None = None) -> torch.Tensor:
    """Class probabilities of the model a method takes its pseudo-labels from.

    ``steps``: ProtoDiff's DDIM steps; None uses the run's (``teacher_steps``, as training does).
    """
    if name == "protodiff":
        generator = torch.Generator().manual_seed(0)
        teacher_steps = steps or method.options.teacher_steps
        run = lambda xb: method.sample(method.teacher, xb, teacher_steps, generator)[0]
    else:
        run = method.predict
    return torch.cat([run(xb) for xb in x.split(batch)]).float()


def quality(probs: torch.Tensor, truth: torch.Tensor, threshold: float, num_classes: int) -> dict[str, float]:
    """The figures of the module docstring; Dice pooled over all pixels, mean over foreground classes."""
    conf, pred = probs.max(dim=1)
    confident = conf >= threshold
    right = pred == truth
    dice = pooled_class_dice(pred, truth, range(1, num_classes))
    wrong = ~right
    edge = near_edge(truth)
    return {
        "dice": sum(dice) / len(dice),
        **{f"dice_{c}": d for c, d in enumerate(dice, start=1)},
        "confident_share": float(confident.float().mean()),
        "confident_accuracy": float(right[confident].float().mean()) if confident.any() else float("nan"),
        "other_accuracy": float(right[~confident].float().mean()) if (~confident).any() else float("nan"),
        "wrong_share": float(wrong.float().mean()),
        "wrong_confident_share": float((wrong & confident).sum() / wrong.sum()) if wrong.any() else float("nan"),
        # foreground truth pixels that the unlabeled loss sees as confident: how much of the structures it covers
        "foreground_covered": float(confident[truth > 0].float().mean()) if (truth > 0).any() else float("nan"),
        # where the left-out pixels are: within `BOUNDARY_PX` pixels of an edge between two classes of the truth
        "left_out_near_edge": float(edge[~confident].float().mean()) if (~confident).any() else float("nan"),
        "near_edge_share": float(edge.float().mean()),
    }


#: Pixels this close (Chebyshev distance) to a class edge of the truth count as "near an edge".
BOUNDARY_PX = 2


def near_edge(truth: torch.Tensor, radius: int = BOUNDARY_PX) -> torch.Tensor:
    """(N, H, W) bool: pixels with another class within ``radius`` pixels in the truth."""
    t = truth[:, None].float()
    size = 2 * radius + 1
    high = torch.nn.functional.max_pool2d(t, size, stride=1, padding=radius)
    low = -torch.nn.functional.max_pool2d(-t, size, stride=1, padding=radius)
    return (high != low)[:, 0]


def unlabeled_slices(cfg, every: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every ``every``-th slice (or 2D case) of the run's unlabeled training cases, at the patch size, with their truth."""
    reader = build_reader(cfg)
    refs = build_splits(cfg, reader).unlabeled
    images, labels = [], []
    for i, ref in enumerate(refs):
        case = reader.load(ref)
        if case.label is None:
            continue  # no hidden truth to score against
        if case.image.ndim == 3:  # a 2D case (ACDC's training slices): (C, H, W); every k-th case
            pairs = [(case.image, case.label)] if i % every == 0 else []
        else:  # a volume (C, D, H, W): every k-th slice
            pairs = [(case.image[:, z], case.label[z]) for z in range(0, case.image.shape[1], every)]
        for image, label in pairs:
            images.append(resize_to(torch.from_numpy(image), cfg.data.patch_size, is_label=False))
            labels.append(resize_to(torch.from_numpy(label.astype("int64")), cfg.data.patch_size, is_label=True))
    if not images:
        raise ValueError("no unlabeled case with a label to score against")
    return torch.stack(images).float(), torch.stack(labels), len(refs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders (RUN/checkpoints/last.ckpt) or checkpoint files")
    ap.add_argument("--every", type=int, default=2, help="use every k-th slice of each volume (every k-th case of 2D cases)")
    ap.add_argument("--threshold", type=float, nargs="+", default=None,
                    help="confidence thresholds, one row each (default: the run's "
                         "method.options.confidence_threshold, else 0.95)")
    ap.add_argument("--steps", type=int, nargs="+", default=[None],
                    help="ProtoDiff: the teacher's DDIM steps, one block of rows each (default: the run's "
                         "pseudo_label_steps, else sampling_steps); ignored for other methods")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| run | method | labeled | DDIM steps | unlabeled slices | pseudo-label Dice | per class | confident share "
          "| accuracy confident / other | wrong pixels that are confident | foreground covered "
          "| left-out pixels near an edge (all pixels) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        path = Path(run)
        ckpt = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
        if not ckpt.is_file():
            raise SystemExit(f"{run}: no checkpoint at {ckpt}")
        module = load_module(str(ckpt))
        method, cfg = module.method.eval(), module.cfg
        if len(cfg.data.patch_size) != 2:
            raise SystemExit(f"{ckpt}: this diagnostic runs on 2D (slice-wise) configs only")
        name = path.name if path.is_dir() else str(ckpt)
        thresholds = args.threshold or [getattr(method.options, "confidence_threshold", 0.95)]
        try:
            x, y, n_cases = unlabeled_slices(cfg, args.every)
        except ValueError as exc:
            print(f"| {name} | {cfg.method.name} | {cfg.data.labeled:g} | - | {exc} |")
            continue
        is_diffusion = cfg.method.name == "protodiff"
        for steps in [s or method.options.teacher_steps for s in args.steps] if is_diffusion else [None]:
            with torch.no_grad():
                probs = pseudo_probs(method, cfg.method.name, x, steps=steps)
            for threshold in thresholds:
                report(name, cfg, steps, len(x), n_cases, threshold, quality(probs, y, threshold, cfg.model.num_classes))


def report(name: str, cfg, steps: int | None, n_slices: int, n_cases: int, threshold: float, q: dict) -> None:
    """One table row."""
    per_class = ", ".join(f"{q[f'dice_{c}']:.3f}" for c in range(1, cfg.model.num_classes))
    print(f"| {name} | {cfg.method.name} | {cfg.data.labeled:g} | {steps or '-'} "
          f"| {n_slices} ({n_cases} cases) | {q['dice']:.3f} | {per_class} | {q['confident_share']:.3f} "
          f"(>= {threshold}) | {q['confident_accuracy']:.4f} / {q['other_accuracy']:.3f} "
          f"| {q['wrong_confident_share']:.2f} of {q['wrong_share']:.4f} | {q['foreground_covered']:.3f} "
          f"| {q['left_out_near_edge']:.2f} ({q['near_edge_share']:.2f}) |",
          flush=True)


if __name__ == "__main__":
    main()
