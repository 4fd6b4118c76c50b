"""How much a trained label-diffusion segmenter relies on its noisy-label input instead of the image.

Both diffusion methods train a network to predict the clean label from the image and the label
noised to a uniform timestep ``t``: Diff-CL's DS from ``concat(image, y_t)``, ProtoDiff's decoder
from the image features fused with the noisy label *latent* ``z_t``. For small ``t`` the noisy
input still shows the label, so the loss can be met by copying it; only large ``t`` trains the
network to segment from the image. This script gives the network the *true* validation label
noised to several ``t`` and prints its one-step Dice at each, next to the method's image-only
prediction on the same slices (Diff-CL: CS; ProtoDiff: its DDIM sampling from pure noise). A
network that is near-perfect at small ``t`` but weak at ``t = T - 1`` (pure noise, image only) has
learned to copy labels rather than to segment, and its DDIM samples cannot be better than its
image-only guess.

Dice here is pooled over all evaluated 2D slices per class (not per volume), mean over the
foreground classes, at the training patch size; it is a diagnostic, not the evaluation protocol.

Usage (from the repository root, SEMIDIFF_REALDATA set):
    python benchmarks/label_reliance.py RUN/checkpoints/last.ckpt [--cases 20] [--every 2]
"""

from __future__ import annotations

import argparse

import torch

from semidiff.data.transforms import resize_to
from semidiff.engine.data import build_reader, build_splits
from semidiff.engine.module import load_module
from semidiff.evaluation.metrics import pooled_class_dice


def pooled_dice(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> float:
    """Mean over foreground classes of the Dice pooled over every pixel of the batch."""
    scores = pooled_class_dice(pred, label, range(1, num_classes))
    return sum(scores) / len(scores)


def diffcl_rows(method, x, y, timesteps, generator):
    """Diff-CL: CS (image only), then DS one step from the true label noised to each ``t``."""
    yield "CS", "none", torch.cat([method.cs(b).argmax(1) for b in x.split(32)])
    y0 = method.diffusion.encode(y[:, None])
    for t in timesteps:
        tt = torch.full((len(x),), t, dtype=torch.long)
        y_t, _ = method.diffusion.q_sample(y0, tt, torch.randn(y0.shape, generator=generator))
        yield "DS, one step", t, torch.cat([method.ds(xb, yb, tb).argmax(1)
                                            for xb, yb, tb in zip(x.split(32), y_t.split(32), tt.split(32))])


def protodiff_rows(method, x, y, timesteps, generator):
    """ProtoDiff: its DDIM prediction (image only), then the decoder one step from the true label's
    latent noised to each ``t`` (the network ``predict`` uses: teacher or student)."""
    steps = method.options.sampling_steps
    yield f"ProtoDiff, DDIM S={steps}", "none", torch.cat([method.predict(b).argmax(1) for b in x.split(32)])
    net = method.teacher if method.options.eval_model == "teacher" else method.student
    for t in timesteps:
        preds = []
        for xb, yb in zip(x.split(32), y.split(32)):
            z0 = net.embed(yb[:, None])
            tt = torch.full((len(xb),), t, dtype=torch.long)
            z_t, _ = method.diffusion.q_sample(z0, tt, torch.randn(z0.shape, generator=generator))
            preds.append(net(xb, z_t, tt)[0].argmax(1))
        yield "decoder, one step", t, torch.cat(preds)


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
    if cfg.method.name == "diffcl" and getattr(method, "ds", None) is not None:
        rows = diffcl_rows
    elif cfg.method.name == "protodiff":
        rows = protodiff_rows
    else:
        raise SystemExit(f"{args.checkpoint}: not a Diff-CL run with a DS, nor a ProtoDiff run "
                         f"(method {cfg.method.name!r})")
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
    print(f"{args.checkpoint}: {len(x)} validation slices from {len(refs)} cases, Dice pooled over slices "
          "(diagnostic, not the evaluation protocol)")
    print("| model | input label | Dice |\n|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model, t, pred in rows(method, x, y, args.timesteps, generator):
            if t == "none":
                text = "none"
            else:  # weight of the label in the noisy input
                text = f"true label noised to t={t} (sqrt(abar) {float(method.diffusion.alphas_cumprod[t]) ** 0.5:.3f})"
            print(f"| {model} | {text} | {pooled_dice(pred, y, cfg.model.num_classes):.3f} |")


if __name__ == "__main__":
    main()
