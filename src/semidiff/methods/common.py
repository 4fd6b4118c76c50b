"""Pieces shared by the semi-supervised baselines, written once.

Ramp-ups, the EMA teacher, hard pseudo-labels, softmax consistency and BCP's largest-component
clean-up. The batch augmentations (input noise, copy-paste mixing, strong views) live in
:mod:`semidiff.data.transforms`; ``block_mask``, ``input_noise`` and ``mix`` stay importable from
here. Everything works on tensors of any spatial rank (2D and 3D alike) and
draws randomness from torch's global RNG only, which the engine seeds from (seed, step): a resumed
run replays the exact same noise, masks and block positions.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import AfterValidator, Field, field_validator
from scipy import ndimage
from torch import Tensor, nn
from torch.profiler import record_function

from semidiff import profiling
from semidiff.data.transforms import (  # re-exported: shared augmentations
    block_mask,
    cutmix,
    input_noise,
    intensity_jitter,
    mix,
    random_blur,
)
from semidiff.errors import ConfigError
from semidiff.methods.base import Method, MethodOptions, NetSpec, Progress
from semidiff.nets import create_net

__all__ = [
    "RampOptions",
    "StrongViewOptions",
    "TeacherOptions",
    "TeacherStudentMethod",
    "batch_passes",
    "block_mask",
    "build_net",
    "copy_weights",
    "ema_update",
    "input_noise",
    "largest_component",
    "make_ema_copy",
    "mix",
    "pseudo_label",
    "require_unlabeled",
    "sigmoid_rampup",
    "softmax_mse",
    "softmax_probs",
]


# ---- schedules ----------------------------------------------------------------------------------
def sigmoid_rampup(step: float, ramp_steps: float) -> float:
    """The sigmoid ramp-up of methods.md: ``r(t) = exp(-5 (1 - min(t, T_r) / T_r)^2)``.

    Args:
        step: Current step ``t`` (negative values count as 0).
        ramp_steps: Ramp length ``T_r``; 0 (no ramp) gives 1.0 at every step.

    Returns:
        A weight in ``(0, 1]``: ``exp(-5)`` at step 0, 1.0 from ``ramp_steps`` on.
    """
    if ramp_steps <= 0:
        return 1.0
    phase = 1.0 - min(max(float(step), 0.0), float(ramp_steps)) / float(ramp_steps)
    return float(math.exp(-5.0 * phase * phase))


def _check_steps_or_fraction(v: float) -> int | float:
    if isinstance(v, float) and not 0.0 <= v <= 1.0:
        raise ValueError("a float is a fraction of train.max_steps in [0, 1]; give steps as an integer")
    if isinstance(v, int) and v < 0:
        raise ValueError("must be >= 0")
    return v


#: An option given as a number of steps (int) or as a fraction of ``train.max_steps`` (float).
StepsOrFraction = Annotated[int | float, AfterValidator(_check_steps_or_fraction)]


def steps_from(value: float, max_steps: int) -> int:
    """A :data:`StepsOrFraction` value in steps."""
    return round(value * max_steps) if isinstance(value, float) else value


class RampOptions(MethodOptions):
    """Options of a loss weight ramped up by :func:`sigmoid_rampup`.

    Attributes:
        rampup_fraction: Ramp length as a fraction of ``train.max_steps`` (used when
            ``rampup_steps`` is None). 0.4 follows methods.md ("about 40% of training"); the
            SSL4MIS/UA-MT code ramps over the whole run (``iter // 150`` against 200 or 40
            "epochs"), i.e. ``rampup_fraction: 1.0``.
        rampup_steps: Ramp length in steps; overrides ``rampup_fraction`` when set.
    """

    rampup_fraction: float = Field(default=0.4, ge=0.0, le=1.0)
    rampup_steps: int | None = Field(default=None, ge=0)

    def ramp(self, progress: Progress) -> float:
        """``r(step)`` for this option set's ramp length."""
        if self.rampup_steps is not None:
            length = self.rampup_steps
        else:
            length = round(self.rampup_fraction * progress.max_steps)
        return sigmoid_rampup(progress.step, length)


class StrongViewOptions(MethodOptions):
    """Options of the strong view of unlabeled images (weak-to-strong consistency, as FixMatch).

    The teacher labels the weak view (the data pipeline's augmentation); the student learns those
    labels on the strong one. ProtoDiff always does this; Diff-CL with ``cs_view: strong``.

    Attributes:
        jitter_contrast: Contrast factor drawn from ``1 +- jitter_contrast``.
        jitter_brightness: Shift drawn from ``+- jitter_brightness`` image stds.
        blur_prob: Probability of a Gaussian blur per image.
        blur_sigma: Blur sigma range in voxels.
        cutmix_prob: Probability of CutMix in a step.
        cutmix_ratio: CutMix block side as a fraction of each axis.
    """

    jitter_contrast: float = Field(default=0.2, ge=0.0, lt=1.0)
    jitter_brightness: float = Field(default=0.1, ge=0.0)
    blur_prob: float = Field(default=0.5, ge=0.0, le=1.0)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    cutmix_prob: float = Field(default=0.5, ge=0.0, le=1.0)
    cutmix_ratio: float = Field(default=0.5, gt=0.0, le=1.0)

    @field_validator("blur_sigma")
    @classmethod
    def _check_sigma(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1]:
            raise ValueError("needs 0 < low <= high")
        return v

    def strong_view(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Intensity jitter and blur of ``images``, then CutMix; returns the mask for the maps.

        Returns:
            ``(strong images, mask)``; apply :func:`cutmix` with ``mask`` (resized to their grid)
            to every map that must follow the geometry. ``mask`` is None when CutMix is skipped.
        """
        x = random_blur(intensity_jitter(images, self.jitter_contrast, self.jitter_brightness),
                        self.blur_prob, self.blur_sigma)
        mask = None
        if self.cutmix_prob > 0 and float(torch.rand(())) < self.cutmix_prob:
            mask = block_mask(images.shape[2:], self.cutmix_ratio, images.device)
        return cutmix(x, mask), mask


# ---- networks and the EMA teacher ---------------------------------------------------------------
def build_net(spec: NetSpec) -> nn.Module:
    """The network described by ``spec`` (the ``model`` config section)."""
    return create_net(spec.name, spec.in_channels, spec.num_classes, **spec.options)


def make_ema_copy(net: nn.Module) -> nn.Module:
    """A deep copy of ``net`` whose parameters do not require gradients (an EMA teacher).

    The engine's optimiser only takes parameters that require grad, so the copy is never stepped.
    """
    teacher = copy.deepcopy(net)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
@record_function(profiling.EMA)
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, step: int) -> float:
    """Move the teacher towards the student: ``theta_t <- alpha theta_t + (1 - alpha) theta_s``.

    ``alpha = min(1 - 1 / (step + 1), decay)``: the warm-up of Tarvainen & Valpola's reference code
    keeps the teacher close to the (fast-changing) early student, so at ``step = 0`` the teacher
    becomes a copy of the student and from ``step = 1 / (1 - decay) - 1`` on ``alpha = decay``.
    Buffers (BatchNorm running statistics, counters) are copied from the student, so whatever the
    teacher's own train-mode forward passes did to its running statistics is discarded.

    Args:
        teacher: The EMA copy (same architecture as ``student``).
        student: The network trained by gradient.
        decay: The EMA decay (0.99 in the baselines).
        step: Optimiser steps taken so far. The engine passes its global step after the
            optimiser step (1 after the first step), as the reference code does.

    Returns:
        The ``alpha`` that was used.
    """
    alpha = min(1.0 - 1.0 / (step + 1), decay)
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        t.copy_(s)
    return alpha


@torch.no_grad()
def copy_weights(target: nn.Module, source: nn.Module) -> None:
    """Overwrite ``target``'s parameters and buffers with ``source``'s (same architecture)."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.copy_(s)
    for t, s in zip(target.buffers(), source.buffers(), strict=True):
        t.copy_(s)


def batch_passes(run, n_first: int, *inputs: Tensor, separate: bool,
                 rest_context: contextlib.AbstractContextManager | None = None) -> tuple[Tensor, ...]:
    """``run(*inputs)`` over a batch of labeled + unlabeled items: one pass, or (``separate``) one over
    the first ``n_first`` items and one over the rest (inside ``rest_context`` when given), the
    outputs concatenated.

    Why: BatchNorm normalises by the statistics of the batch it sees. With one pass, the labeled
    images are normalised together with unlabeled ones (often a strong view, or another acquisition
    regime), so the labeled loss depends on the unlabeled batch; two passes keep each stream's own
    statistics (measured in docs/methods/protodiff.md, "student_forward").
    """
    if not separate or n_first in (0, len(inputs[0])):
        return run(*inputs)
    first = run(*(x[:n_first] for x in inputs))
    with rest_context or contextlib.nullcontext():
        rest = run(*(x[n_first:] for x in inputs))
    return tuple(torch.cat(pair) for pair in zip(first, rest))


def softmax_probs(net: nn.Module, image: Tensor) -> Tensor:
    """``softmax(net(image))`` over the class axis, in fp32 (also under autocast)."""
    return torch.softmax(net(image).float(), dim=1)


class TeacherOptions(MethodOptions):
    """Options of a method with an EMA teacher.

    Attributes:
        ema_decay: The EMA decay (0.99 in Mean Teacher, UA-MT and BCP).
        eval_model: The network :meth:`Method.predict` uses. ``"student"`` by default: the
            SSL4MIS Mean Teacher / UA-MT scripts and the BCP code all test the student.
    """

    ema_decay: float = Field(default=0.99, ge=0.0, le=1.0)
    eval_model: Literal["student", "teacher"] = "student"


class TeacherStudentMethod(Method):
    """A student trained by gradient plus an EMA teacher (Mean Teacher, UA-MT, BCP).

    The teacher runs in whatever mode the method is in: in train mode during training (dropout
    active, BatchNorm on batch statistics), as the teachers of the SSL4MIS, UA-MT and BCP code do.
    """

    uses_unlabeled = True
    options: TeacherOptions

    def __init__(self, net: NetSpec, options: MethodOptions) -> None:
        super().__init__(net, options)
        self.student = build_net(net)
        self.teacher = make_ema_copy(self.student)

    def on_step_end(self, progress: Progress) -> None:
        ema_update(self.teacher, self.student, self.options.ema_decay, progress.step)

    @torch.no_grad()
    def predict(self, image: Tensor) -> Tensor:
        """Softmax of the student (or of the teacher with ``eval_model: teacher``)."""
        net = self.teacher if self.options.eval_model == "teacher" else self.student
        return softmax_probs(net, image)

    exportable_when = "always"

    def export_net(self) -> nn.Module:
        """The network :meth:`predict` uses (student by default)."""
        return self.teacher if self.options.eval_model == "teacher" else self.student


# ---- unlabeled-data helpers ---------------------------------------------------------------------
def require_unlabeled(unlabeled: dict[str, Tensor] | None, method: str) -> Tensor:
    """The unlabeled images, or a clear error when the batch has none.

    Raises:
        ConfigError: If ``unlabeled`` is None (``train.unlabeled_batch`` is 0).
    """
    if unlabeled is None or unlabeled.get("image") is None:
        raise ConfigError(f"method {method!r} needs unlabeled images: set train.unlabeled_batch > 0")
    return unlabeled["image"]


def softmax_mse(student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
    """Per-voxel squared error between the student's softmax and the teacher's probabilities.

    Args:
        student_logits: (B, C, *spatial) logits.
        teacher_probs: (B, C, *spatial) probabilities (no gradient is taken through them).

    Returns:
        (B, C, *spatial) squared differences; reduce as the method needs (Mean Teacher: mean).
    """
    return (torch.softmax(student_logits.float(), dim=1) - teacher_probs.detach().float()) ** 2


def pseudo_label(probs: Tensor, threshold: float | None = None) -> tuple[Tensor, Tensor]:
    """Hard pseudo-labels and a confidence mask from class probabilities.

    Args:
        probs: (B, C, *spatial) probabilities.
        threshold: Keep voxels whose maximum probability is ``>= threshold``; None keeps all.

    Returns:
        ``(labels, mask)``: (B, 1, *spatial) int64 argmax and (B, 1, *spatial) float 0/1 mask.
    """
    conf, labels = probs.detach().max(dim=1, keepdim=True)
    if threshold is None:
        mask = torch.ones_like(conf, dtype=torch.float32)
    else:
        mask = (conf >= threshold).float()
    return labels.long(), mask


def largest_component(labels: Tensor, num_classes: int) -> Tensor:
    """Keep, per item and foreground class, only the largest connected component.

    The post-processing BCP applies to its teacher's pseudo-labels (``nms=1``): removed voxels
    become background (class 0). Connectivity is scipy's default (faces only).

    Args:
        labels: (B, 1, *spatial) integer class map.
        num_classes: Number of classes, background (0) included.

    Returns:
        The cleaned map, same shape, dtype and device.
    """
    arr = labels.detach().cpu().numpy()
    out = np.zeros_like(arr)
    for b in range(arr.shape[0]):
        item = arr[b, 0]
        for c in range(1, num_classes):
            comps, n = ndimage.label(item == c)
            if n == 0:
                continue
            sizes = np.bincount(comps.ravel())[1:]
            out[b, 0][comps == int(np.argmax(sizes)) + 1] = c
    return torch.from_numpy(out).to(labels.device)
