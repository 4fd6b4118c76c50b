"""UA-MT, uncertainty-aware Mean Teacher (Yu et al., MICCAI 2019).

Mean Teacher whose consistency keeps only the voxels where the teacher is certain: the teacher
makes ``T`` (8) stochastic passes (its dropout is active because it runs in train mode, and each
pass gets its own input noise, as in the UA-MT code), the predictive entropy of their mean softmax
is the uncertainty, and a voxel counts when it is below ``(0.75 + 0.25 r_th(t)) ln C``, with
``r_th`` a sigmoid ramp over the whole run (UA-MT). The consistency target is a separate noisy
teacher pass, as in UA-MT.

The masked loss is ``sum(mask * mse) / (C * sum(mask) + 1e-16)``, the mean squared error over kept
voxels and classes. For two classes (LA) this is UA-MT's formula exactly; UA-MT and the SSL4MIS 2D
code write a literal ``2`` (and ``ln 2``) whatever the number of classes, which for ACDC's four
classes weighs the loss twice and uses a stricter threshold than ours. V-Net has no dropout by
default: set ``model.net_options: {has_dropout: true}`` for UA-MT on LA (the UA-MT setting).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor
from torch.profiler import record_function

from semidiff import profiling
from semidiff.data.transforms import input_noise
from semidiff.methods.base import Progress, register_method
from semidiff.methods.common import (
    sigmoid_rampup,
    softmax_mse,
    softmax_probs,
)
from semidiff.methods.mean_teacher import MeanTeacher, MeanTeacherOptions

__all__ = ["UAMT", "UAMTOptions", "predictive_entropy", "uncertainty_mask"]


def predictive_entropy(probs: Tensor, eps: float = 1e-6) -> Tensor:
    """``-sum_c p_c log(p_c + eps)`` over the class axis of (B, C, *spatial) probabilities.

    Returns:
        (B, 1, *spatial) entropies in nats (``eps`` as in UA-MT, to keep ``log`` finite).
    """
    return -(probs * torch.log(probs + eps)).sum(dim=1, keepdim=True)


def uncertainty_mask(teacher_probs_stack: Tensor, threshold: float) -> Tensor:
    """The UA-MT mask: voxels whose Monte-Carlo predictive entropy is below ``threshold``.

    Args:
        teacher_probs_stack: (T, B, C, *spatial) softmax outputs of ``T`` stochastic passes.
        threshold: Entropy threshold in nats (UA-MT: ``(0.75 + 0.25 r(t)) ln C``).

    Returns:
        (B, 1, *spatial) float mask, 1 where the entropy of the mean prediction is ``< threshold``.
    """
    return (predictive_entropy(teacher_probs_stack.mean(dim=0)) < threshold).float()


class UAMTOptions(MeanTeacherOptions):
    """``method.options`` of ``ua_mt``: Mean Teacher's plus the uncertainty mask.

    Attributes:
        mc_passes: Stochastic teacher passes ``T`` (8 in UA-MT).
        threshold_start: The threshold starts at ``threshold_start * ln C`` and ramps to ``ln C``
            (0.75 in UA-MT).
        threshold_rampup_fraction: Length of the threshold's ramp as a fraction of
            ``train.max_steps`` (1.0: UA-MT ramps it over all iterations).
        mc_batch: Noisy teacher passes per forward (the target pass counts as one); None: all
            ``mc_passes + 1`` in one forward. 3 (the default) was the fastest of 1, 3 and 9 on a
            2-core CPU (benchmarks/results/step_times.md); the reference code stacks 2. With
            several per forward, BatchNorm's batch statistics cover the stacked passes of the
            same images instead of one pass each.
    """

    mc_passes: int = Field(default=8, ge=1)
    threshold_start: float = Field(default=0.75, ge=0.0, le=1.0)
    threshold_rampup_fraction: float = Field(default=1.0, ge=0.0, le=1.0)
    mc_batch: int | None = Field(default=3, ge=1)


@register_method("ua_mt")
class UAMT(MeanTeacher):
    """UA-MT: Mean Teacher with the consistency masked by the teacher's uncertainty."""

    table_rank = 20

    Options = UAMTOptions
    options: UAMTOptions

    def uncertainty_threshold(self, progress: Progress) -> float:
        """``(threshold_start + (1 - threshold_start) r_th(step)) * ln C``."""
        o = self.options
        r = sigmoid_rampup(progress.step, round(o.threshold_rampup_fraction * progress.max_steps))
        return (o.threshold_start + (1.0 - o.threshold_start) * r) * math.log(self.net_spec.num_classes)

    def consistency_loss(self, student_logits: Tensor, x_u: Tensor, progress: Progress
                         ) -> tuple[Tensor, dict[str, Tensor]]:
        o = self.options
        with torch.no_grad(), record_function(profiling.TEACHER):
            # The target pass, then the T stochastic passes (noise drawn in that order), batched.
            views = torch.cat([x_u + input_noise(x_u, o.noise_std, o.noise_clip) for _ in range(o.mc_passes + 1)])
            chunk = len(x_u) * (o.mc_batch or o.mc_passes + 1)
            probs = torch.cat([softmax_probs(self.teacher, v) for v in views.split(chunk)])
            target, stack = probs[: len(x_u)], probs[len(x_u):].unflatten(0, (o.mc_passes, len(x_u)))
            mask = uncertainty_mask(stack, self.uncertainty_threshold(progress))
            target = self.corrupt_soft_pseudo(target)  # noise benchmark: the target, not the mask
        mse = softmax_mse(student_logits, target)
        loss = (mask * mse).sum() / (mse.shape[1] * mask.sum() + 1e-16)
        return loss, {"mask_ratio": mask.mean()}
