"""ProtoDiff: label diffusion in a learned latent, anchored by class prototypes (Xi et al., 2507.16429).

Only the abstract of the paper is public; this is the reconstruction of docs/methods.md, section 2
(the method as built, choice by choice, is in docs/methods/protodiff.md). Per training step:

1. **Teacher** (EMA of the student, decay 0.99), no gradient: latent DDIM (``pseudo_label_steps``
   steps, mean softmax over the steps) on the labeled images and the weak view of the unlabeled
   ones (the data pipeline's augmentation). Pseudo-labels = argmax, confidence = max probability.
   The hidden map ``h`` of its last step gives the prototype updates and the consistency targets.
2. **Strong view** of the unlabeled images (:mod:`semidiff.data.transforms`): intensity jitter,
   Gaussian blur, CutMix. CutMix's
   geometry (a block pasted from the previous item of the batch) is applied to the pseudo-labels,
   the confidences and the teacher's hidden map as well.
3. **Student** on ``concat(labeled, strong)`` with the diffusion target ``z_t`` noised from the
   label latent of the ground truth (labeled) or of the pseudo-label (unlabeled) at a random ``t``:
   ``L_sup = seg(logits_l, y)``, ``L_u = seg(logits_u, yhat | conf >= 0.95)``.
4. **Prototype contrastive consistency** on the student's normalised hidden map: class-balanced
   pixel-to-prototype InfoNCE (true classes, weight 1, on labeled pixels; pseudo-classes weighted
   by confidence on unlabeled pixels) plus ``KL(teacher || student)`` of the prototype-similarity
   distributions (teacher on the weak view, student on the strong one).
5. ``L = L_sup + lambda_u r(t) L_u + lambda_p r(t) L_proto``; during the warm-up only ``L_sup``.
6. After the optimiser step (:meth:`ProtoDiff.on_step_end`): EMA teacher, then the prototypes move
   towards the class means of the teacher's normalised labeled features (optionally also confident
   unlabeled ones, with a lower weight).

Prediction: latent DDIM with ``sampling_steps`` (3) steps from a seeded ``z_T``, mean softmax.
The latent DDIM is :meth:`LabelDiffusion.ddim_sample` with an ``x0_transform`` that re-embeds the
predicted class map; nothing here re-implements a sampler.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor
from torch.profiler import record_function

from semidiff import profiling
from semidiff.data.transforms import block_mask, cutmix, intensity_jitter, random_blur  # noqa: F401 (old import paths)
from semidiff.diffusion.label_diffusion import LabelDiffusion
from semidiff.errors import ConfigError
from semidiff.methods.base import (
    Method,
    MethodOptions,
    NetSpec,
    Progress,
    all_reduce_sum,
    register_method,
)
from semidiff.methods.common import (
    RampOptions,
    StepsOrFraction,
    StrongViewOptions,
    TeacherOptions,
    batch_passes,
    ema_update,
    make_ema_copy,
    require_unlabeled,
    steps_from,
)
from semidiff.methods.losses import seg_loss, without_ignored
from semidiff.methods.prototypes import (
    class_feature_sums,
    prototype_infonce,
    prototype_kl,
    update_prototypes,
)
from semidiff.nets import create_net
from semidiff.nets.protodiff_net import ProtoDiffNet

# The strong view's augmentations live in semidiff.data.transforms and the prototype helpers in
# semidiff.methods.prototypes; both stay importable from here under their old names.
__all__ = ["NET_NAME", "ProtoDiff", "ProtoDiffOptions"]

#: The networks this method builds (``model.net``); ``model.net_options`` go to its factory.
#: ``protodiff_net``: its own encoder and time-conditioned decoder (after DDP); ``protodiff_unet``:
#: the shared backbone of the other methods with the label latent at one skip.
NET_NAMES = ("protodiff_net", "protodiff_unet")
NET_NAME = NET_NAMES[0]
#: Network options the method sets itself (from the patch size and from its own options).
_RESERVED_NET_OPTIONS = ("spatial_dims", "label_scale")


# ---- options ------------------------------------------------------------------------------------
class ProtoDiffOptions(TeacherOptions, RampOptions, StrongViewOptions):
    """``method.options`` of ``protodiff``; every [default] of methods.md section 2 is one here.

    Attributes:
        num_train_timesteps: Diffusion steps ``T`` (1000).
        schedule: MONAI noise schedule of the forward process on ``z0`` (``"cosine"``).
        label_scale: Scale ``s`` of the label latent ``z0 = s (2 sigmoid(E[y]) - 1)`` (DDP: 0.01).
        sampling_steps: DDIM steps ``S`` of :meth:`ProtoDiff.predict` (3).
        pseudo_label_steps: DDIM steps of the teacher's pseudo-labels; None uses
            ``sampling_steps``.
        sample_seed: Seed of ``z_T`` in :meth:`ProtoDiff.predict`, so evaluation is repeatable.
        image_only_share: Share of the training latents noised to ``t = T - 1`` (pure noise: the
            decoder must segment from the image) instead of uniform ``t`` (0: the paper's uniform
            ``t``). With a ``label_scale`` large enough for the decoder to see the latent label,
            uniform ``t`` teaches it to copy the label (``benchmarks/label_reliance.py``).
        confidence_threshold: Unlabeled pixels below it are ignored in ``L_u`` (0.95).
        unsup_normalisation: ``"confident"`` averages ``L_u`` over the confident pixels only, so a
            few confident pixels carry the full weight ``lambda_u``; ``"all"`` scales it by the
            confident share of the unlabeled pixels (its cross-entropy is then the mean over all of
            them), so ``L_u`` fades when the teacher stops being confident (noisy pseudo-labels).
        lambda_u: Weight of ``L_u`` (1.0), ramped by ``r(t)``.
        lambda_p: Weight of ``L_proto`` (0.1), ramped by ``r(t)``.
        warmup: Supervised-only steps before the unlabeled terms and the prototypes start: an
            integer number of steps or a float fraction of ``train.max_steps`` (0.1).
        jitter_contrast, jitter_brightness, blur_prob, blur_sigma, cutmix_prob, cutmix_ratio: The
            strong view (:class:`~semidiff.methods.common.StrongViewOptions`).
        prototype_loss: ``"both"`` (InfoNCE + consistency), ``"infonce"``, ``"consistency"`` or
            ``"none"`` (no prototype term, no prototypes): the ablation switch.
        prototype_momentum: EMA momentum of the prototypes (0.99; the paper's range 0.99-0.999).
        prototype_unlabeled_weight: Weight of confident unlabeled pixels (teacher's pseudo-label,
            confidence above ``confidence_threshold``) in the prototype update; 0 uses labeled
            pixels only.
        temperature: ``tau`` of the InfoNCE and of the similarity distributions (0.1).
        consistency_weight: Weight of the KL term inside ``L_proto`` (InfoNCE has weight 1).
        pixels_per_class: Class-balanced sampling cap of the InfoNCE per class and step.
        student_forward: ``"joint"``: one student pass over labeled + strong views (and one
            teacher pass over labeled + weak views), so BatchNorm normalises both with one batch's
            statistics; ``"separate"``: one pass each, so labeled images keep their own
            statistics. Where labeled and unlabeled images differ in appearance (the demo task),
            the joint pass alone cost the student 20 points of Dice with no unlabeled loss at all
            (``docs/methods/protodiff.md``).
    """

    num_train_timesteps: int = Field(default=1000, ge=2)
    schedule: str = "cosine"
    label_scale: float = Field(default=0.01, gt=0.0)
    sampling_steps: int = Field(default=3, ge=1)
    pseudo_label_steps: int | None = Field(default=None, ge=1)
    sample_seed: int = 0
    image_only_share: float = Field(default=0.0, ge=0.0, le=1.0)
    confidence_threshold: float = Field(default=0.95, ge=0.0, le=1.0)
    unsup_normalisation: Literal["confident", "all"] = "confident"
    lambda_u: float = Field(default=1.0, ge=0.0)
    lambda_p: float = Field(default=0.1, ge=0.0)
    warmup: StepsOrFraction = 0.1
    prototype_loss: Literal["both", "infonce", "consistency", "none"] = "both"
    prototype_momentum: float = Field(default=0.99, ge=0.0, lt=1.0)
    prototype_unlabeled_weight: float = Field(default=0.0, ge=0.0)
    temperature: float = Field(default=0.1, gt=0.0)
    consistency_weight: float = Field(default=1.0, ge=0.0)
    pixels_per_class: int | None = Field(default=512, ge=1)
    student_forward: Literal["joint", "separate"] = "joint"

    @model_validator(mode="after")
    def _check_steps(self) -> ProtoDiffOptions:
        for name in ("sampling_steps", "pseudo_label_steps"):
            value = getattr(self, name)
            if value is not None and value > self.num_train_timesteps:
                raise ValueError(f"{name} ({value}) exceeds num_train_timesteps ({self.num_train_timesteps})")
        return self

    def warmup_length(self, max_steps: int) -> int:
        """The warm-up length in steps."""
        return steps_from(self.warmup, max_steps)

    @property
    def teacher_steps(self) -> int:
        """DDIM steps of the teacher's pseudo-labels: ``pseudo_label_steps``, else ``sampling_steps``."""
        return self.pseudo_label_steps or self.sampling_steps

    @property
    def uses_infonce(self) -> bool:
        return self.prototype_loss in ("both", "infonce")

    @property
    def uses_consistency(self) -> bool:
        return self.prototype_loss in ("both", "consistency")


# ---- the method ---------------------------------------------------------------------------------
@register_method("protodiff")
class ProtoDiff(Method):
    """Latent label diffusion + EMA teacher + prototype contrastive consistency (module docstring).

    Builds its own network: ``model.net`` is ``protodiff_net`` or ``protodiff_unet``
    (:data:`NET_NAMES`), and ``model.net_options`` are that network's options
    (:class:`~semidiff.nets.protodiff_net.ProtoDiffNet`,
    :class:`~semidiff.nets.protodiff_unet.ProtoDiffUNet`), except ``spatial_dims`` (from the
    patch size) and ``label_scale`` (the method option).

    Buffers (saved in checkpoints): ``prototypes`` (C, D) and ``prototype_ready`` (C,).
    """

    table_rank = 60

    Options = ProtoDiffOptions
    options: ProtoDiffOptions
    uses_unlabeled = True
    supported_nets = NET_NAMES
    #: ``predict`` outputs: DDIM with ``sampling_steps`` steps (the default), or with 1, 3, 5 steps.
    outputs: ClassVar[tuple[str, ...]] = ("ddim", "ddim_s1", "ddim_s3", "ddim_s5")
    eval_options: ClassVar[tuple[str, ...]] = ("sampling_steps", "sample_seed")

    def __init__(self, net: NetSpec, options: MethodOptions) -> None:
        super().__init__(net, options)
        o = self.options
        if net.name not in NET_NAMES:
            raise ConfigError(f"model.net: method 'protodiff' builds its own network; set it to one of "
                              f"{', '.join(NET_NAMES)} (got {net.name!r})")
        reserved = sorted(set(net.options) & set(_RESERVED_NET_OPTIONS))
        if reserved:
            raise ConfigError(f"model.net_options: {', '.join(reserved)} set by method 'protodiff' "
                              "(spatial_dims from data.patch_size, label_scale from method.options); remove it")
        self.student: ProtoDiffNet = create_net(  # type: ignore[assignment]
            net.name, net.in_channels, net.num_classes, spatial_dims=net.spatial_dims,
            label_scale=o.label_scale, **net.options,
        )
        self.teacher: ProtoDiffNet = make_ema_copy(self.student)  # type: ignore[assignment]
        self.diffusion = LabelDiffusion(net.num_classes, o.num_train_timesteps, schedule=o.schedule)
        dim = self.student.feature_channels
        self.register_buffer("prototypes", torch.zeros(net.num_classes, dim))
        self.register_buffer("prototype_ready", torch.zeros(net.num_classes, dtype=torch.bool))
        # Per-class sums from the last training step, applied after the optimiser step.
        self._pending: tuple[Tensor, Tensor] | None = None

    # ---- diffusion -----------------------------------------------------------------------------
    def noisy_latent(self, net: ProtoDiffNet, label: Tensor) -> tuple[Tensor, Tensor]:
        """``(z_t, t)``: the label latent of ``label`` noised at uniform random timesteps."""
        z0 = net.embed(label)
        t = self.diffusion.sample_timesteps(len(label), label.device, final_share=self.options.image_only_share)
        z_t, _ = self.diffusion.q_sample(z0, t)
        return z_t, t

    @torch.no_grad()
    def sample(
        self, net: ProtoDiffNet, image: Tensor, steps: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Latent DDIM: mean softmax over ``steps`` steps and the last step's hidden map.

        The image is encoded once; each step decodes ``F`` with the current ``z_t`` and the
        predicted class map (argmax of the logits) is re-embedded as the x0 estimate.

        Args:
            net: The student or the teacher.
            image: (B, C_in, *spatial).
            steps: DDIM steps ``S``.
            generator: RNG of ``z_T`` (None: torch's global RNG).

        Returns:
            ``(probs, hidden)``: (B, C, *spatial) probabilities and ``h`` of the last step.
        """
        encoded = net.encode(image)
        last: dict[str, Tensor] = {}

        def denoise(z_t: Tensor, t: Tensor) -> Tensor:
            logits, hidden = net.decode(encoded, z_t, t)
            last["hidden"] = hidden
            return logits

        def reembed(logits: Tensor) -> Tensor:
            return net.embed(logits.argmax(dim=1, keepdim=True))

        shape = (len(image), net.embed_dim, *net.latent_shape(image.shape[2:]))
        probs = self.diffusion.ddim_sample(denoise, shape, steps, device=image.device, generator=generator,
                                           x0_transform=reembed, average="mean")
        return probs, last["hidden"]  # type: ignore[return-value]

    def _steps_for(self, output: str | None) -> int:
        """DDIM steps of an output: ``sampling_steps`` for ``"ddim"`` (or None), N for ``"ddim_sN"``.

        Raises:
            ConfigError: ``output`` is not one of :attr:`outputs`.
        """
        if output is None or output == "ddim":
            return self.options.sampling_steps
        if output in self.outputs:
            return int(output.removeprefix("ddim_s"))
        raise ConfigError(f"protodiff: unknown output {output!r}; choose one of {', '.join(self.outputs)}")

    def prediction_options(self, output: str) -> dict[str, Any]:
        """``sampling_steps`` as used: an output ``ddim_sN`` samples with N steps, whatever the option says."""
        return {"sampling_steps": self._steps_for(output), "sample_seed": self.options.sample_seed}

    @torch.no_grad()
    def predict(self, image: Tensor, output: str | None = None) -> Tensor:
        """Class probabilities by latent DDIM, ``z_T`` seeded by ``sample_seed``.

        Args:
            image: (B, C_in, *spatial).
            output: ``"ddim"`` or None: ``sampling_steps`` steps; ``"ddim_s1"``, ``"ddim_s3"``,
                ``"ddim_s5"``: that many steps, so one checkpoint reports Dice against ``S``
                (``semidiff eval RUN --output ddim_s5``).

        Raises:
            ConfigError: ``output`` is not one of :attr:`outputs`.
        """
        steps = self._steps_for(output)
        net = self.teacher if self.options.eval_model == "teacher" else self.student
        generator = torch.Generator().manual_seed(self.options.sample_seed)
        probs, _ = self.sample(net, image, steps, generator)
        return probs

    # ---- strong view ---------------------------------------------------------------------------
    def strong_view(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Intensity jitter and blur of ``images``, then CutMix (:meth:`StrongViewOptions.strong_view`)."""
        return self.options.strong_view(images)

    # ---- training ------------------------------------------------------------------------------
    def training_step(self, labeled, unlabeled, progress: Progress) -> dict[str, Tensor]:
        o = self.options
        x_l, y_l = labeled["image"], labeled["label"].long()
        # Not-annotated pixels: background in the label latent, weight 0 in every loss and prototype.
        y_l_filled, valid_l = without_ignored(y_l)
        x_u = require_unlabeled(unlabeled, self.name)
        n_l = len(x_l)
        self._pending = None
        if progress.step < o.warmup_length(progress.max_steps):
            z_t, t = self.noisy_latent(self.student, y_l_filled)
            logits, _ = self.student(x_l, z_t, t)
            loss_sup = seg_loss(logits, y_l)
            zero = torch.zeros((), device=loss_sup.device)
            return {"loss": loss_sup, "loss_sup": loss_sup.detach(), "loss_unsup": zero, "loss_proto": zero,
                    "loss_nce": zero, "loss_cons": zero, "u_weight": zero, "p_weight": zero,
                    "conf_ratio": zero, "prototypes_ready": self.prototype_ready.sum().float()}

        net, grid = self.student, self.student.to_hidden_grid
        # 1. Teacher on labeled + weak unlabeled views. Its labeled outputs only feed the prototype
        # update; without prototypes (and in separate passes, where they cannot touch the unlabeled
        # batch statistics) its DDIM chain runs on the unlabeled views alone.
        teacher_sees_labeled = o.prototype_loss != "none" or o.student_forward == "joint"
        n_t = n_l if teacher_sees_labeled else 0
        with torch.no_grad(), record_function(profiling.TEACHER):
            probs_t, hidden_t = self._passes(lambda x: self.sample(self.teacher, x, o.teacher_steps), n_t,
                                             torch.cat([x_l, x_u]) if teacher_sees_labeled else x_u)
            conf_u, plab_u = probs_t[n_t:].max(dim=1, keepdim=True)
            plab_u = self.corrupt_pseudo(plab_u)  # noise benchmark (identity unless noise.target: pseudo)
        # 2. Strong view; CutMix geometry follows on pseudo-labels, confidences, teacher features.
        x_s, mask = self.strong_view(x_u)
        plab_s, conf_s = cutmix(plab_u, mask), cutmix(conf_u, mask)
        hidden_mask = None if mask is None else (grid(mask) > 0.5).float()
        hidden_t_s = cutmix(hidden_t[n_t:], hidden_mask)
        # 3. Student on labeled + strong views, diffusion targets from ground truth / pseudo-labels.
        z_t, t = self.noisy_latent(net, torch.cat([y_l_filled, plab_s]))
        logits, hidden_s = self._passes(net, n_l, torch.cat([x_l, x_s]), z_t, t)
        loss_sup = seg_loss(logits[:n_l], y_l)
        confident = (conf_s >= o.confidence_threshold).float()
        conf_ratio = confident.mean()
        loss_unsup = seg_loss(logits[n_l:], plab_s, confident)
        if o.unsup_normalisation == "all":
            loss_unsup = loss_unsup * conf_ratio
        # 4. Prototype terms on the hidden grid.
        zero = torch.zeros((), device=loss_sup.device)
        loss_nce, loss_cons = zero, zero
        ready = self.prototype_ready.clone()
        protos = self.prototypes.clone()
        with record_function(profiling.CONTRAST):
            if o.uses_infonce:
                labels_h = torch.cat([grid(y_l_filled), grid(plab_s)]).round().long()
                weights_h = torch.cat([(grid(valid_l) > 0.5).float(), grid(conf_s)])
                loss_nce = prototype_infonce(hidden_s, labels_h, weights_h, protos, ready, o.temperature,
                                             o.pixels_per_class)
            if o.uses_consistency:
                loss_cons = prototype_kl(hidden_s[n_l:], hidden_t_s, protos, ready, o.temperature)
            loss_proto = loss_nce + o.consistency_weight * loss_cons
            if o.prototype_loss != "none":
                self._pending = self._prototype_sums(hidden_t, y_l_filled, valid_l, plab_u, conf_u)
        # 5. Total.
        ramp = o.ramp(progress)
        u_weight, p_weight = o.lambda_u * ramp, o.lambda_p * ramp
        loss = loss_sup + u_weight * loss_unsup + p_weight * loss_proto
        return {"loss": loss, "loss_sup": loss_sup.detach(), "loss_unsup": loss_unsup.detach(),
                "loss_proto": loss_proto.detach(), "loss_nce": loss_nce.detach(), "loss_cons": loss_cons.detach(),
                "u_weight": torch.tensor(u_weight, device=loss.device),
                "p_weight": torch.tensor(p_weight, device=loss.device),
                "conf_ratio": conf_ratio.detach(), "prototypes_ready": ready.sum().float()}

    def _passes(self, run, n_l: int, *inputs: Tensor) -> tuple[Tensor, ...]:
        """``run`` over labeled + unlabeled items in one pass or two (``student_forward``)."""
        return batch_passes(run, n_l, *inputs, separate=self.options.student_forward == "separate")

    def _prototype_sums(self, hidden_t: Tensor, y_l: Tensor, valid_l: Tensor, plab_u: Tensor,
                        conf_u: Tensor) -> tuple[Tensor, Tensor]:
        """Per-class sums of the teacher's normalised features for the next prototype update.

        ``y_l`` has its not-annotated pixels filled; ``valid_l`` (1 where annotated) leaves them out.
        """
        o, grid, n_l = self.options, self.student.to_hidden_grid, len(y_l)
        labels = grid(y_l).round().long()
        weights = (grid(valid_l) > 0.5).float()
        if o.prototype_unlabeled_weight > 0:
            # Unlabeled pixels: the teacher's own (unmixed) pseudo-labels, confident ones only.
            conf = grid(conf_u)
            labels = torch.cat([labels, grid(plab_u).round().long()])
            weights = torch.cat([weights, o.prototype_unlabeled_weight * (conf >= o.confidence_threshold).float()])
        else:
            hidden_t = hidden_t[:n_l]
        return class_feature_sums(hidden_t, labels, weights, self.net_spec.num_classes)

    @torch.no_grad()
    def apply_prototype_update(self, sums: Tensor, totals: Tensor) -> None:
        """Move the prototypes towards the class means in ``sums / totals`` (:func:`update_prototypes`)."""
        # Every DDP process applies the update of the whole global batch, so prototypes stay identical.
        all_reduce_sum(sums, totals)
        protos, ready = update_prototypes(self.prototypes, self.prototype_ready, sums, totals,
                                          self.options.prototype_momentum)
        self.prototypes.copy_(protos)
        self.prototype_ready.copy_(ready)

    def on_step_end(self, progress: Progress) -> None:
        """EMA teacher, then the prototype update prepared by the last training step."""
        ema_update(self.teacher, self.student, self.options.ema_decay, progress.step)
        if self._pending is not None:
            self.apply_prototype_update(*self._pending)
            self._pending = None
