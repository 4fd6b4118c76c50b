"""Class prototypes and the prototype contrastive losses of ProtoDiff (docs/methods.md, section 2).

Prototypes are L2-normalised class directions in a network's hidden feature space, moved by EMA
towards the class means of the labeled (and optionally confident unlabeled) pixels; the losses pull
each pixel's feature towards its class prototype (InfoNCE) and match the student's
prototype-similarity distribution to the teacher's (KL). Pure tensor functions, no state: the
method keeps the prototypes in its buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["class_feature_sums", "prototype_infonce", "prototype_kl", "update_prototypes"]


def _flatten_pixels(features: Tensor) -> Tensor:
    """(B, D, *spatial) -> (B * prod(spatial), D)."""
    return features.movedim(1, -1).reshape(-1, features.shape[1])


def class_feature_sums(
    features: Tensor, labels: Tensor, weights: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """Weighted per-class sums of L2-normalised pixel features.

    Args:
        features: (B, D, *spatial) features (normalised here along D).
        labels: (B, 1, *spatial) integer classes on the same grid.
        weights: (B, 1, *spatial) non-negative pixel weights (0 excludes a pixel).
        num_classes: ``C``.

    Returns:
        ``(sums, totals)``: (C, D) weighted sums of the unit features and (C,) total weights.
    """
    f = _flatten_pixels(F.normalize(features.detach().float(), dim=1))
    y = labels.reshape(-1).long()
    w = weights.reshape(-1).float()
    sums = torch.zeros(num_classes, f.shape[1], device=f.device).index_add_(0, y, f * w[:, None])
    totals = torch.zeros(num_classes, device=f.device).index_add_(0, y, w)
    return sums, totals


def update_prototypes(
    prototypes: Tensor, ready: Tensor, sums: Tensor, totals: Tensor, momentum: float
) -> tuple[Tensor, Tensor]:
    """EMA update of L2-normalised class prototypes from per-class feature sums.

    For each class with pixels (``totals > 0``): ``m = normalize(sums / totals)`` (the normalised
    mean direction), then ``p <- normalize(momentum * p + (1 - momentum) * m)``; a class seen for
    the first time starts at ``p = m``. Classes without pixels keep their prototype.

    Args:
        prototypes: (C, D) current prototypes (unit rows where ``ready``).
        ready: (C,) bool, which prototypes have been initialised.
        sums, totals: Output of :func:`class_feature_sums`.
        momentum: EMA momentum (0.99 by default; 0.999 is slower).

    Returns:
        ``(prototypes, ready)``, new tensors.
    """
    present = totals > 0
    mean = F.normalize(sums / totals.clamp_min(1e-12)[:, None], dim=1)
    moved = F.normalize(momentum * prototypes + (1.0 - momentum) * mean, dim=1)
    new = torch.where(ready[:, None], moved, mean)
    return torch.where(present[:, None], new, prototypes), ready | present


def prototype_infonce(
    features: Tensor,
    labels: Tensor,
    weights: Tensor,
    prototypes: Tensor,
    ready: Tensor,
    temperature: float,
    pixels_per_class: int | None,
) -> Tensor:
    """Class-balanced, weighted pixel-to-prototype InfoNCE.

    For a pixel ``i`` of class ``c`` with unit feature ``f_i``:
    ``l_i = -log( exp(f_i . p_c / tau) / sum_k exp(f_i . p_k / tau) )`` over the initialised
    prototypes. At most ``pixels_per_class`` pixels per class are sampled uniformly (global RNG);
    the loss is the weighted mean over each class's pixels, then the plain mean over the classes
    present, so a small class counts as much as the background.

    Args:
        features: (B, D, *spatial) pixel features (normalised here).
        labels: (B, 1, *spatial) integer classes.
        weights: (B, 1, *spatial) pixel weights (1 for ground truth, the confidence for
            pseudo-labels, 0 to exclude).
        prototypes: (C, D) unit prototypes.
        ready: (C,) bool; uninitialised prototypes are neither positives nor negatives.
        temperature: ``tau`` (0.1).
        pixels_per_class: Sampling cap per class (None: all pixels).

    Returns:
        Scalar loss (0 with a graph to ``features`` when no pixel of an initialised class exists).
    """
    f = _flatten_pixels(features)
    y = labels.reshape(-1).long()
    w = weights.reshape(-1).float()
    keep = ready[y] & (w > 0)
    per_class: list[Tensor] = []
    for c in torch.nonzero(ready).flatten().tolist():
        idx = torch.nonzero(keep & (y == c)).flatten()
        if idx.numel() == 0:
            continue
        if pixels_per_class is not None and idx.numel() > pixels_per_class:
            idx = idx[torch.randperm(idx.numel(), device=idx.device)[:pixels_per_class]]
        sims = F.normalize(f[idx].float(), dim=1) @ prototypes.t() / temperature
        sims = sims.masked_fill(~ready[None, :], float("-inf"))
        nll = F.cross_entropy(sims, y[idx], reduction="none")
        per_class.append((nll * w[idx]).sum() / w[idx].sum())
    if not per_class:
        return features.sum() * 0.0
    return torch.stack(per_class).mean()


def prototype_kl(
    student_features: Tensor, teacher_features: Tensor, prototypes: Tensor, ready: Tensor, temperature: float
) -> Tensor:
    """Mean over pixels of ``KL(q_teacher || q_student)``, ``q = softmax(normalize(h) . P / tau)``.

    Only initialised prototypes enter the distributions; with fewer than two the KL is 0.

    Args:
        student_features: (B, D, *spatial) student hidden map (strong view).
        teacher_features: (B, D, *spatial) teacher hidden map (weak view, same geometry).
        prototypes: (C, D) unit prototypes.
        ready: (C,) bool.
        temperature: ``tau``.
    """
    if int(ready.sum()) < 2:
        return student_features.sum() * 0.0
    p = prototypes[ready]
    s = F.normalize(_flatten_pixels(student_features).float(), dim=1) @ p.t() / temperature
    t = F.normalize(_flatten_pixels(teacher_features.detach()).float(), dim=1) @ p.t() / temperature
    return F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="batchmean", log_target=True)
