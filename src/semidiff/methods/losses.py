"""Losses shared by every method, written once.

Ground-truth pixels labelled :data:`~semidiff.data.record.IGNORE_INDEX` (not annotated) weigh 0 in
every loss here, so methods pass labels to them unchanged. A method that feeds labels anywhere else
(a diffusion input, prototypes) takes the filled map and the weights from :func:`without_ignored`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from semidiff.data.record import IGNORE_INDEX


def soft_dice_loss(probs: Tensor, target_onehot: Tensor, mask: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Mean over classes of 1 - soft Dice, computed over the whole batch (the SSL4MIS convention).

    Args:
        probs: (B, C, *spatial) probabilities.
        target_onehot: (B, C, *spatial) one-hot (or soft) targets.
        mask: optional (B, 1, *spatial) weights; ignored voxels weigh 0.
    """
    if mask is not None:
        probs = probs * mask
        target_onehot = target_onehot * mask
    dims = [0] + list(range(2, probs.ndim))
    inter = (probs * target_onehot).sum(dims)
    denom = probs.pow(2).sum(dims) + target_onehot.pow(2).sum(dims)
    return (1.0 - (2.0 * inter + eps) / (denom + eps)).mean()


def _class_map(target: Tensor, logits: Tensor) -> Tensor:
    """``(B, *spatial)`` long class map from a ``(B, 1, *spatial)`` or ``(B, *spatial)`` target."""
    return (target[:, 0] if target.ndim == logits.ndim else target).long()


def without_ignored(target: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A class map with its ignored pixels set to background, and the weights that leave them out.

    Args:
        target: ``(B, 1, *spatial)`` integer class map, possibly holding :data:`IGNORE_INDEX`.
        mask: optional ``(B, 1, *spatial)`` weights to combine with.

    Returns:
        ``(clean target, weights)``: the target with 0 where it was ignored (one-hot and label
        embeddings accept it; every loss weighs those pixels 0) and ``(B, 1, *spatial)`` float
        weights, 0 on ignored pixels and ``mask`` (or 1) elsewhere.
    """
    valid = target != IGNORE_INDEX
    weights = valid.float() if mask is None else valid.float() * mask.float()
    return target.masked_fill(~valid, 0), weights


def ce_loss(logits: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cross-entropy, averaged over the voxels weighted by ``mask`` (all voxels without one).

    Ignored ground-truth voxels (:data:`IGNORE_INDEX`) weigh 0.

    Args:
        logits: (B, C, *spatial).
        target: (B, 1, *spatial) or (B, *spatial) integer class map.
        mask: optional (B, 1, *spatial) per-voxel weights (e.g. a pseudo-label confidence mask).
    """
    target = _class_map(target, logits)
    valid = target != IGNORE_INDEX
    ce_map = F.cross_entropy(logits.float(), target.masked_fill(~valid, 0), reduction="none")  # fp32 under autocast
    w = valid.float() if mask is None else mask[:, 0].float() * valid
    return (ce_map * w).sum() / w.sum().clamp_min(1.0)


def seg_loss(logits: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """``0.5 * CE + 0.5 * Dice(softmax)``, the supervised loss of methods.md.

    Ignored ground-truth voxels (:data:`IGNORE_INDEX`) count in neither term.

    Args:
        logits: (B, C, *spatial).
        target: (B, 1, *spatial) or (B, *spatial) integer class map.
        mask: optional (B, 1, *spatial) per-voxel weights (e.g. a pseudo-label confidence mask).
    """
    target = _class_map(target, logits)
    logits = logits.float()  # losses in fp32 even under autocast
    clean, weights = without_ignored(target[:, None], mask)
    onehot = F.one_hot(clean[:, 0], logits.shape[1]).movedim(-1, 1).float()
    dice = soft_dice_loss(torch.softmax(logits, dim=1), onehot, weights)
    return 0.5 * ce_loss(logits, target, mask) + 0.5 * dice
