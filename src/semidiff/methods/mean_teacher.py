"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017), as in the SSL4MIS / UA-MT code.

Loss: ``seg(student(x_l), y_l) + w(t) * mean((softmax(student(x_u)) - softmax(teacher(x_u + n)))^2)``
with ``n = clamp(N(0, 0.1^2), -0.2, 0.2)`` and ``w(t) = consistency * r(t)``. The teacher is the
EMA of the student (decay 0.99). As in SSL4MIS and UA-MT only the teacher's input is noised
(``student_noise: true`` also noises the student's, as in the original paper), labeled and
unlabeled images go through the student in one batch (BatchNorm sees both; ``student_forward:
separate`` gives each stream its own pass, as the diffusion methods' configs do), and the
consistency covers the unlabeled images only.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor
from torch.profiler import record_function

from semidiff import profiling
from semidiff.data.transforms import input_noise
from semidiff.methods.base import Progress, register_method
from semidiff.methods.common import (
    RampOptions,
    TeacherOptions,
    TeacherStudentMethod,
    batch_passes,
    require_unlabeled,
    softmax_mse,
    softmax_probs,
)
from semidiff.methods.losses import seg_loss

__all__ = ["MeanTeacher", "MeanTeacherOptions"]


class MeanTeacherOptions(TeacherOptions, RampOptions):
    """``method.options`` of ``mean_teacher`` (also the base of ``ua_mt``'s).

    Attributes:
        consistency: Maximum consistency weight (0.1 in SSL4MIS and UA-MT).
        noise_std: Standard deviation of the Gaussian input noise (0.1).
        noise_clip: The noise is clipped to ``[-noise_clip, noise_clip]`` (0.2).
        student_noise: Also add (independent) noise to the student's unlabeled input.
        student_forward: ``"joint"``: one student pass over labeled + unlabeled images, so the
            labeled images are normalised by BatchNorm statistics of both (SSL4MIS); ``"separate"``:
            one pass per stream (:func:`~semidiff.methods.common.batch_passes`), the setting of
            ProtoDiff's and Diff-CL's configs, so a table can compare the methods on equal terms.
    """

    consistency: float = Field(default=0.1, ge=0.0)
    noise_std: float = Field(default=0.1, ge=0.0)
    noise_clip: float = Field(default=0.2, ge=0.0)
    student_noise: bool = False
    student_forward: Literal["joint", "separate"] = "joint"


@register_method("mean_teacher")
class MeanTeacher(TeacherStudentMethod):
    """Mean Teacher: softmax-MSE consistency between the student and its EMA teacher."""

    table_rank = 10

    Options = MeanTeacherOptions
    options: MeanTeacherOptions

    def training_step(self, labeled, unlabeled, progress: Progress) -> dict[str, Tensor]:
        o = self.options
        x_l, y_l = labeled["image"], labeled["label"]
        x_u = require_unlabeled(unlabeled, self.name)
        student_u = x_u + input_noise(x_u, o.noise_std, o.noise_clip) if o.student_noise else x_u
        (logits,) = batch_passes(lambda x: (self.student(x),), len(x_l), torch.cat([x_l, student_u]),
                                 separate=o.student_forward == "separate")
        logits_l, logits_u = logits[: len(x_l)], logits[len(x_l):]
        loss_sup = seg_loss(logits_l, y_l)
        loss_cons, extra = self.consistency_loss(logits_u, x_u, progress)
        weight = o.consistency * o.ramp(progress)
        loss = loss_sup + weight * loss_cons
        parts = {"loss": loss, "loss_sup": loss_sup.detach(), "loss_cons": loss_cons.detach(),
                 "cons_weight": torch.tensor(weight, device=loss.device)}
        return parts | extra

    def consistency_loss(self, student_logits: Tensor, x_u: Tensor, progress: Progress
                         ) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean softmax MSE against the teacher on a noisy view; subclasses mask it.

        Returns:
            The loss and extra named parts to log (none here).
        """
        o = self.options
        with torch.no_grad(), record_function(profiling.TEACHER):
            target = softmax_probs(self.teacher, x_u + input_noise(x_u, o.noise_std, o.noise_clip))
            target = self.corrupt_soft_pseudo(target)  # noise benchmark (identity unless noise.target: pseudo)
        return softmax_mse(student_logits, target).mean(), {}
