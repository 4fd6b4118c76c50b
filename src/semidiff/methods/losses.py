"""Losses shared by every method, written once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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


def ce_loss(logits: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cross-entropy, averaged over the voxels weighted by ``mask`` (all voxels without one).

    Args:
        logits: (B, C, *spatial).
        target: (B, 1, *spatial) or (B, *spatial) integer class map.
        mask: optional (B, 1, *spatial) per-voxel weights (e.g. a pseudo-label confidence mask).
    """
    ce_map = F.cross_entropy(logits.float(), _class_map(target, logits), reduction="none")  # fp32 under autocast
    if mask is None:
        return ce_map.mean()
    w = mask[:, 0].float()
    return (ce_map * w).sum() / w.sum().clamp_min(1.0)


def seg_loss(logits: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """``0.5 * CE + 0.5 * Dice(softmax)``, the supervised loss of methods.md.

    Args:
        logits: (B, C, *spatial).
        target: (B, 1, *spatial) or (B, *spatial) integer class map.
        mask: optional (B, 1, *spatial) per-voxel weights (e.g. a pseudo-label confidence mask).
    """
    target = _class_map(target, logits)
    logits = logits.float()  # losses in fp32 even under autocast
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).float()
    dice = soft_dice_loss(torch.softmax(logits, dim=1), onehot, None if mask is None else mask.float())
    return 0.5 * ce_loss(logits, target, mask) + 0.5 * dice
