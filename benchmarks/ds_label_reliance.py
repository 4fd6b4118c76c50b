"""How much a trained Diff-CL diffusion segmenter (DS) relies on its noisy-label input.

DS is trained to predict the clean label from ``concat(image, y_t)`` at uniform ``t``. For small
``t``, ``y_t`` still shows the label, so the loss can be met by copying it; only large ``t`` trains
DS to segment from the image. This script gives DS the *true* validation label noised to several
``t`` and prints DS's one-step Dice at each, next to CS's Dice on the same slices. A DS that is
near-perfect at ``t <= 500`` but weak at ``t = T - 1`` (pure noise, image only) has learned to copy
labels rather than to segment, and its DDIM samples cannot be better than its image-only guess.

Dice here is pooled over all evaluated 2D slices per class (not per volume), mean over the
foreground classes, at the training patch size; it is a diagnostic, not the evaluation protocol.

Usage (from the repository root, SEMIDIFF_REALDATA set):
    python benchmarks/ds_label_reliance.py RUN/checkpoints/last.ckpt [--cases 20] [--every 2]
"""

from __future__ import annotations

import argparse

import torch

from semidiff.data.transforms import resize_to
from semidiff.engine.data import build_reader, build_splits
from semidiff.engine.module import load_module


def pooled_dice(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> float:
    """Mean over foreground classes of the Dice pooled over every pixel of the batch."""
    scores = []
    for c in range(1, num_classes):
        p, g = pred == c, label == c
        denom = int(p.sum() + g.sum())
        scores.append(2.0 * int((p & g).sum()) / denom if denom else 1.0)
    return sum(scores) / len(scores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--cases", type=int, default=20, help="validation cases to use (first N)")
    ap.add_argument("--every", type=int, default=2, help="use every k-th slice of each volume")
    ap.add_argument("--timesteps", type=int, nargs="+", default=[999, 900, 700, 500, 300, 100, 10])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    module = load_module(args.checkpoint)
    method, cfg = module.method.eval(), module.cfg
    if cfg.method.name != "diffcl" or getattr(method, "ds", None) is None:
        raise SystemExit(f"{args.checkpoint}: not a Diff-CL run with a DS (method {cfg.method.name!r})")
    if len(cfg.data.patch_size) != 2:
        raise SystemExit(f"{args.checkpoint}: this diagnostic runs on 2D (slice-wise) configs only")
    reader = build_reader(cfg)
    refs = build_splits(cfg, reader).val[: args.cases]
    images, labels = [], []
    for ref in refs:
        case = reader.load(ref)  # (C, D, H, W) image, (D, H, W) label, normalised as in evaluation
        for z in range(0, case.image.shape[1], args.every):
            images.append(resize_to(torch.from_numpy(case.image[:, z]), cfg.data.patch_size, is_label=False))
            labels.append(resize_to(torch.from_numpy(case.label[z].astype("int64")), cfg.data.patch_size,
                                    is_label=True))
    x, y = torch.stack(images).float(), torch.stack(labels)
    k = cfg.model.num_classes
    print(f"{args.checkpoint}: {len(x)} validation slices from {len(refs)} cases, Dice pooled over slices "
          "(diagnostic, not the evaluation protocol)")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cs = torch.cat([method.cs(b).argmax(1) for b in x.split(32)])
        print(f"| model | input label | Dice |\n|---|---|---|\n| CS | none | {pooled_dice(cs, y, k):.3f} |")
        y0 = method.diffusion.encode(y[:, None])
        for t in args.timesteps:
            noise = torch.randn(y0.shape, generator=generator)
            tt = torch.full((len(x),), t, dtype=torch.long)
            y_t, _ = method.diffusion.q_sample(y0, tt, noise)
            pred = torch.cat([method.ds(xb, yb, tb).argmax(1)
                              for xb, yb, tb in zip(x.split(32), y_t.split(32), tt.split(32))])
            signal = float(method.diffusion.alphas_cumprod[t]) ** 0.5  # weight of the label in y_t
            print(f"| DS, one step | true label noised to t={t} (sqrt(abar) {signal:.3f}) | "
                  f"{pooled_dice(pred, y, k):.3f} |")


if __name__ == "__main__":
    main()
