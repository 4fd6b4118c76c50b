"""Contrastive label propagation of Diff-CL: a per-class memory bank and its pixel InfoNCE.

A FIFO bank of projected features of correctly predicted labeled voxels, per class, kept in
buffers (so checkpointed); class-balanced voxel sampling of the anchors and of the bank's
candidates; the pixel-to-memory InfoNCE (docs/methods.md, section 1). Draws only from torch's
global RNG, which the engine seeds from (seed, step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semidiff.errors import ConfigError

__all__ = ["ClassMemoryBank", "memory_infonce", "sample_balanced", "sample_per_class"]


# ---- voxel sampling ----------------------------------------------------------------------------
def sample_per_class(classes: Tensor, quota: int, num_classes: int) -> Tensor:
    """Indices of at most ``quota`` random voxels of each class (torch's global RNG).

    Args:
        classes: ``(N,)`` integer classes (values outside ``[0, num_classes)`` are never drawn).
        quota: Maximum voxels per class.
        num_classes: Number of classes.

    Returns:
        ``(M,)`` long indices into ``classes``, grouped by class.
    """
    picked = []
    for c in range(num_classes):
        idx = (classes == c).nonzero().squeeze(1)
        if len(idx) > quota:
            idx = idx[torch.randperm(len(idx), device=idx.device)[:quota]]
        picked.append(idx)
    return torch.cat(picked) if picked else classes.new_zeros(0, dtype=torch.long)


def sample_balanced(classes: Tensor, cap: int, num_classes: int) -> Tensor:
    """Class-balanced sample of at most ``cap`` voxels: an equal quota per class present.

    A class with fewer voxels than its quota gives all of them (the total is then below ``cap``).
    """
    valid = classes[(classes >= 0) & (classes < num_classes)]  # -1 marks voxels left out
    present = int((torch.bincount(valid, minlength=num_classes) > 0).sum())
    if present == 0 or cap <= 0:
        return classes.new_zeros(0, dtype=torch.long)
    return sample_per_class(classes, max(1, cap // present), num_classes)


# ---- memory bank and contrastive loss ----------------------------------------------------------
class ClassMemoryBank(nn.Module):
    """A FIFO queue of ``size`` feature vectors per class, stored in buffers (so checkpointed).

    Args:
        num_classes: Number of classes.
        size: Entries per class ``K``.
        dim: Feature width.
    """

    def __init__(self, num_classes: int, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ConfigError(f"memory bank: size and dim must be positive, got {size!r}, {dim!r}")
        self.num_classes, self.size, self.dim = num_classes, size, dim
        self.register_buffer("features", torch.zeros(num_classes, size, dim))
        self.register_buffer("pointer", torch.zeros(num_classes, dtype=torch.long))  # next slot to write
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))  # filled slots

    @torch.no_grad()
    def push(self, features: Tensor, classes: Tensor) -> None:
        """Append ``features`` (N, dim) of ``classes`` (N,); the oldest entries make room.

        Stored detached, in float32. Within one call, later rows count as newer; when a class gets
        more than ``size`` rows only its last ``size`` are kept. All classes are written in one
        vectorised scatter.
        """
        if len(features) == 0:
            return
        classes = classes.long().to(self.features.device)
        features = features.detach().float().to(self.features.device)
        order = torch.argsort(classes, stable=True)  # group by class, keep arrival order
        cls = classes[order]
        n_per_class = torch.bincount(cls, minlength=self.num_classes)
        first = torch.cumsum(n_per_class, 0) - n_per_class
        rank = torch.arange(len(cls), device=cls.device) - first[cls]  # arrival rank within its class
        keep = rank >= n_per_class[cls] - self.size
        slot = (self.pointer[cls] + rank) % self.size
        self.features[cls[keep], slot[keep]] = features[order][keep]
        self.pointer.copy_((self.pointer + n_per_class) % self.size)
        self.count.copy_(torch.clamp(self.count + n_per_class, max=self.size))

    def valid(self) -> Tensor:
        """``(num_classes, size)`` bool: which slots hold an entry."""
        return torch.arange(self.size, device=self.count.device)[None, :] < self.count[:, None]

    def entries(self, c: int) -> Tensor:
        """Class ``c``'s entries, oldest first ``(count_c, dim)``."""
        n = int(self.count[c])
        if n < self.size:
            return self.features[c, :n]  # not yet wrapped: slots 0..n-1 in order
        return self.features[c].roll(-int(self.pointer[c]), dims=0)


def memory_infonce(anchors: Tensor, anchor_classes: Tensor, memory: Tensor, memory_valid: Tensor,
                   tau: float) -> Tensor:
    """Pixel-to-memory InfoNCE (Wang et al., ICCV 2021, "Exploring cross-image pixel contrast").

    For an anchor ``a`` of class ``c``, each valid memory entry ``p`` of class ``c`` is a positive
    and every valid entry of the other classes a negative (``N``); with cosine similarity ``s``::

        l(a) = mean_p -log( exp(s(a,p)/tau) / (exp(s(a,p)/tau) + sum_{n in N} exp(s(a,n)/tau)) )

    Anchors whose class has no entry, or with no negative at all, are skipped.

    Args:
        anchors: ``(n, D)`` L2-normalised features (gradient flows through them).
        anchor_classes: ``(n,)`` integer classes.
        memory: ``(C, K, D)`` L2-normalised entries.
        memory_valid: ``(C, K)`` bool, filled slots.
        tau: Temperature.

    Returns:
        The mean over the kept anchors (a zero that keeps the graph when none is kept).
    """
    num_classes, size, dim = memory.shape
    cls = anchor_classes.long()
    zero = anchors.sum() * 0.0
    counts = memory_valid.sum(1)
    # Anchors with a positive (an entry of their class) and a negative (an entry of another).
    keep = (counts[cls] > 0) & (counts.sum() - counts[cls] > 0) if len(anchors) else cls.bool()
    if not bool(keep.any()):
        return zero
    cls = cls[keep]
    sim = (anchors[keep].float() @ memory.reshape(-1, dim).float().t() / tau).view(-1, num_classes, size)
    # Empty slots get a logit whose exp is exactly 0 in float32 (finite, so no NaN gradient).
    sim = sim.masked_fill(~memory_valid[None], _EMPTY_LOGIT)
    # One logsumexp per class block; the negatives' is that over the other classes' blocks.
    class_lse = torch.logsumexp(sim, dim=2)  # (n, C)
    own = F.one_hot(cls, num_classes).bool()
    neg_lse = torch.logsumexp(class_lse.masked_fill(own, _EMPTY_LOGIT), dim=1, keepdim=True)
    positive = sim[torch.arange(len(cls), device=sim.device), cls]  # (n, K): the anchor's class block
    is_positive = memory_valid[cls]
    per_positive = torch.logaddexp(positive, neg_lse) - positive  # -log(exp(s_p) / (exp(s_p) + sum_n exp(s_n)))
    per_positive = torch.where(is_positive, per_positive, 0.0)
    return (per_positive.sum(1) / is_positive.sum(1)).mean()


#: Logit of an empty memory slot in :func:`memory_infonce` (similarities are at most 1 / tau).
_EMPTY_LOGIT = -1e4
