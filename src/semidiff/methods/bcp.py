"""BCP, bidirectional copy-paste (Bai et al., CVPR 2023), both stages in one run.

Stage 0, supervised pre-training (``step < pretrain_steps``): two labeled images are mixed by a
block mask ``M`` (1 inside a block of 2/3 of each axis at a random position), ``x = mix(x_a, x_b, M)``,
and the mixed ground truth supervises the student: ``seg(., y_a | M) + seg(., y_b | 1 - M)``.

Stage 1, self-training: at its first step the teacher is reset to the student, then every step
the teacher pseudo-labels the unlabeled images (argmax; by default only the largest connected
component per class is kept, BCP's ``nms=1``) and the student sees both directions of copy-paste:

- ``x_in  = mix(x_l_a, x_u_a, M)``: a labeled block pasted into an unlabeled image;
- ``x_out = mix(x_u_b, x_l_b, M)``: an unlabeled block pasted into a labeled image.

Each image is supervised region by region (``seg(P, Y | W)`` is :func:`seg_loss` restricted to the
region ``W``): ``loss_sup`` collects the ground-truth regions (weight 1) and ``loss_unsup`` the
pseudo-labeled ones, so ``loss = loss_sup + u_weight * loss_unsup`` (``u_weight`` 0.5), which is
BCP's ``mix_loss``. The teacher follows the student by EMA (0.99) during stage 1.

Pairing (``pairing``), one mask drawn per step and shared by the batch, as in BCP:

- ``halves`` (BCP): item ``i`` of the first ``n = ceil(B/2)`` items is mixed with item ``i`` of the
  last ``n`` (for an even batch: the first half with the second half, as BCP splits its batches; a
  batch of one is paired with itself). In stage 1, ``n = min(ceil(B_l/2), ceil(B_u/2))``. The
  student sees ``n`` images' worth of labeled pixels per step, half of what a supervised step of
  the same batch sees.
- ``all``: every labeled image enters both directions (stage 1: pasted into unlabeled image
  ``i mod B_u`` and receiving a block of unlabeled image ``(i + 1) mod B_u``; stage 0: mixed with
  the next labeled image), so the student sees ``B_l`` images' worth of labeled pixels per step,
  as supervised does, at twice the student batch. It is not in BCP; it separates what BCP's
  copy-paste does from how many labeled pixels it trains on.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.profiler import record_function

from semidiff import profiling
from semidiff.data.transforms import block_mask, mix
from semidiff.methods.base import MethodOptions, NetSpec, Progress, register_method
from semidiff.methods.common import (
    StepsOrFraction,
    TeacherOptions,
    TeacherStudentMethod,
    copy_weights,
    ema_update,
    largest_component,
    make_ema_copy,
    pseudo_label,
    require_unlabeled,
    softmax_probs,
    steps_from,
)
from semidiff.methods.losses import seg_loss

__all__ = ["BCP", "BCPOptions", "pair_halves", "region_losses"]


def pair_halves(x: Tensor, n: int | None = None) -> tuple[Tensor, Tensor]:
    """The first ``n`` and the last ``n`` items of a batch (``n`` defaults to ``ceil(B / 2)``)."""
    if n is None:
        n = (len(x) + 1) // 2
    return x[:n], x[len(x) - n:]


def region_losses(logits: Tensor, label_in: Tensor, label_out: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``seg`` of a copy-pasted image against one label inside the block and another outside.

    Args:
        logits: (B, C, *spatial).
        label_in: (B, 1, *spatial) labels supervising the voxels where ``mask`` is 1.
        label_out: (B, 1, *spatial) labels supervising the voxels where ``mask`` is 0.
        mask: Block mask broadcastable to (B, 1, *spatial).

    Returns:
        ``(loss inside the block, loss outside it)``.
    """
    m = mask.float().expand(len(logits), 1, *logits.shape[2:])
    return seg_loss(logits, label_in, m), seg_loss(logits, label_out, 1.0 - m)


class BCPOptions(TeacherOptions):
    """``method.options`` of ``bcp``.

    Attributes:
        pretrain_steps: Length of the supervised copy-paste stage: an integer number of steps, or
            a float in [0, 1] as a fraction of ``train.max_steps``. 0.2 by default: BCP trains
            10k + 30k iterations on ACDC (25%) and 2k + 15k on LA (12%).
        block_ratio: Block side as a fraction of each axis (2/3 in BCP).
        block_position: ``"random"`` (BCP) or ``"center"``.
        u_weight: Weight of the pseudo-labeled regions (0.5 in BCP).
        largest_component: Keep only the largest connected component per class of the teacher's
            pseudo-labels (BCP's ``nms=1``).
        pairing: ``halves`` (BCP: half the labeled pixels of a supervised step) or ``all`` (every
            labeled image in both directions: equal labeled pixels per step); see the module.
        self_train_from: The student self-training starts from: ``last`` (the end of pre-training)
            or ``best`` (the pre-training validation with the best mean Dice, as BCP's code, which
            loads its best pre-trained model; on the validation split here, never the test split).
            ``best`` needs validations during pre-training (``train.val_every`` below the
            pre-training length) and keeps a copy of the student in the checkpoints.
    """

    pretrain_steps: StepsOrFraction = 0.2
    block_ratio: float = Field(default=2.0 / 3.0, gt=0.0, le=1.0)
    block_position: Literal["random", "center"] = "random"
    u_weight: float = Field(default=0.5, ge=0.0)
    largest_component: bool = True
    pairing: Literal["halves", "all"] = "halves"
    self_train_from: Literal["last", "best"] = "last"

    def pretrain_length(self, max_steps: int) -> int:
        """The stage-0 length in steps."""
        return steps_from(self.pretrain_steps, max_steps)


@register_method("bcp")
class BCP(TeacherStudentMethod):
    """Bidirectional copy-paste between labeled and unlabeled images, with an EMA teacher."""

    table_rank = 40

    Options = BCPOptions
    options: BCPOptions

    def __init__(self, net: NetSpec, options: MethodOptions) -> None:
        super().__init__(net, options)
        # Saved in checkpoints, so a resumed run knows whether the teacher was already reset.
        self.register_buffer("teacher_synced", torch.zeros((), dtype=torch.bool))
        self.best_pretrained: nn.Module | None = None  # self_train_from: best (checkpointed)
        if self.options.self_train_from == "best":
            self.best_pretrained = make_ema_copy(self.student)
            self.register_buffer("best_pretrained_dice", torch.full((), -1.0))

    def training_step(self, labeled, unlabeled, progress: Progress) -> dict[str, Tensor]:
        x_l, y_l = labeled["image"], labeled["label"]
        x_u = require_unlabeled(unlabeled, self.name)
        mask = block_mask(x_l.shape[2:], self.options.block_ratio, x_l.device,
                          centered=self.options.block_position == "center")
        if progress.step < self.options.pretrain_length(progress.max_steps):
            loss_sup = self._pretrain_loss(x_l, y_l, mask)
            loss_unsup, stage = torch.zeros((), device=loss_sup.device), 0.0
        else:
            loss_sup, loss_unsup = self._self_train_losses(x_l, y_l, x_u, mask)
            stage = 1.0
        loss = loss_sup + self.options.u_weight * loss_unsup
        return {"loss": loss, "loss_sup": loss_sup.detach(), "loss_unsup": loss_unsup.detach(),
                "stage": torch.tensor(stage, device=loss.device)}

    def _pretrain_loss(self, x_l: Tensor, y_l: Tensor, mask: Tensor) -> Tensor:
        if self.options.pairing == "all":  # each labeled image once inside a block, once around one
            (x_a, x_b), (y_a, y_b) = (x_l, x_l.roll(-1, 0)), (y_l, y_l.roll(-1, 0))
        else:
            (x_a, x_b), (y_a, y_b) = pair_halves(x_l), pair_halves(y_l)
        loss_in, loss_out = region_losses(self.student(mix(x_a, x_b, mask)), y_a, y_b, mask)
        return loss_in + loss_out

    def _self_train_losses(self, x_l: Tensor, y_l: Tensor, x_u: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if not bool(self.teacher_synced):
            if self.best_pretrained is not None and float(self.best_pretrained_dice) >= 0:
                copy_weights(self.student, self.best_pretrained)  # the optimiser state stays as it is
            copy_weights(self.teacher, self.student)
            self.teacher_synced.fill_(True)
        if self.options.pairing == "all":
            (xl_a, yl_a), (xl_b, yl_b) = (x_l, y_l), (x_l, y_l)
            index = torch.arange(len(x_l), device=x_l.device)
            a, b = index % len(x_u), (index + 1) % len(x_u)
            xu_a, xu_b = x_u[a], x_u[b]
            plab = self._pseudo_labels(x_u)  # each unlabeled image once, though it is used twice
            pl_a, pl_b = plab[a], plab[b]
        else:
            n = min((len(x_l) + 1) // 2, (len(x_u) + 1) // 2)
            (xl_a, xl_b), (yl_a, yl_b) = pair_halves(x_l, n), pair_halves(y_l, n)
            xu_a, xu_b = pair_halves(x_u, n)
            plab = self._pseudo_labels(torch.cat([xu_a, xu_b]))
            pl_a, pl_b = plab[:n], plab[n:]
        n = len(xl_a)
        logits = self.student(torch.cat([mix(xl_a, xu_a, mask), mix(xu_b, xl_b, mask)]))
        # Labeled block in unlabeled background: ground truth inside, pseudo-labels outside.
        gt_in, pseudo_out = region_losses(logits[:n], yl_a, pl_a, mask)
        # Unlabeled block in labeled background: pseudo-labels inside, ground truth outside.
        pseudo_in, gt_out = region_losses(logits[n:], pl_b, yl_b, mask)
        return gt_in + gt_out, pseudo_out + pseudo_in

    @torch.no_grad()
    def _pseudo_labels(self, x_u: Tensor) -> Tensor:
        """The teacher's hard labels of ``x_u`` (largest component per class, if set)."""
        with record_function(profiling.TEACHER):
            plab, _ = pseudo_label(softmax_probs(self.teacher, x_u))
            if self.options.largest_component:
                plab = largest_component(plab, self.net_spec.num_classes)
            return self.corrupt_pseudo(plab)  # noise benchmark, on the labels the student sees

    @torch.no_grad()
    def on_validation(self, progress: Progress, mean_dice: float) -> None:
        """``self_train_from: best``: keep the student of the best pre-training validation."""
        if (self.best_pretrained is not None and progress.step <= self.options.pretrain_length(progress.max_steps)
                and mean_dice > float(self.best_pretrained_dice)):
            copy_weights(self.best_pretrained, self.student)
            self.best_pretrained_dice.fill_(mean_dice)

    def on_step_end(self, progress: Progress) -> None:
        # The teacher is only used (and followed) in the self-training stage.
        if bool(self.teacher_synced):
            ema_update(self.teacher, self.student, self.options.ema_decay, progress.step)
