"""Diff-CL (Guo et al., arXiv 2503.09408): a diffusion segmenter and a CNN teaching each other.

Two segmenters are trained together (docs/methods.md, section 1; docs/methods/diffcl.md):

- **DS**, a label-diffusion segmenter: ``DS(x, y_t, t)`` predicts the clean label from the image
  and the noisy one-hot label ``y_t`` (:class:`~semidiff.nets.denoiser.TimeConditionedDenoiser`);
  it samples label maps by deterministic DDIM (:class:`~semidiff.diffusion.LabelDiffusion`).
- **CS**, a convolutional segmenter (the V-Net / U-Net of ``model``) with HFM blocks on chosen
  skip levels (:func:`~semidiff.nets.hfm.add_hfm`) and a projection head for the contrastive loss.

Losses, with ``r(t)`` the sigmoid ramp-up:

``L = L_d_sup + mu1 r(t) L_d_pseudo + L_c_sup + mu2 r(t) (L_c_pseudo + eta L_contrast)``

- ``L_d_sup = seg(DS(x_l, q(Y_l, t), t), Y_l)``, ``L_c_sup = seg(CS(x_l), Y_l)``;
- DS -> CS: ``yhat_DS = argmax DDIM(DS | x_u)`` with ``pl_steps`` steps, no gradient;
  ``L_c_pseudo = seg(CS(x_u), yhat_DS)``;
- CS -> DS: ``yhat_CS = argmax CS(x_u)``, no gradient, noised at a random ``t``;
  ``L_d_pseudo = seg(DS(x_u, q(yhat_CS, t), t), yhat_CS)``;
- ``L_contrast``: InfoNCE of projected CS features of class-balanced sampled voxels (unlabeled
  with the DS pseudo-class, labeled with the true class) against a per-class FIFO memory bank of
  projected CS features of correctly predicted labeled voxels.

Ablations (``peer``, ``use_hfm``, ``use_contrast``): CS only (``peer: none``); CS+CS cross pseudo
supervision (``peer: cs``, a second CS in DS's place); DS+CS (``peer: ds``); + HFM; + contrastive;
full (the default). Test output: ``cs`` (default), ``ds`` (DDIM with ``test_steps``) or ``mean``.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.profiler import record_function

from semidiff import profiling
from semidiff.data.transforms import cutmix
from semidiff.diffusion import LabelDiffusion
from semidiff.errors import ConfigError
from semidiff.methods.base import (
    Method,
    MethodOptions,
    NetSpec,
    Progress,
    all_gather_padded,
    register_method,
)
from semidiff.methods.common import (
    RampOptions,
    StrongViewOptions,
    batch_passes,
    build_net,
    require_unlabeled,
    softmax_probs,
)
from semidiff.methods.contrast import (
    ClassMemoryBank,
    memory_infonce,
    sample_balanced,
    sample_per_class,
)
from semidiff.methods.losses import ce_loss, seg_loss, without_ignored
from semidiff.nets.blocks import batchnorm_not_recording, in_mode
from semidiff.nets.denoiser import TimeConditionedDenoiser, create_denoiser
from semidiff.nets.hfm import HFMGate, add_hfm

# The memory bank, its InfoNCE and the voxel sampling live in semidiff.methods.contrast; they stay
# importable from here under their old names.
__all__ = ["DiffCL", "DiffCLOptions"]


# ---- options -----------------------------------------------------------------------------------
class DiffCLOptions(RampOptions, StrongViewOptions):
    """``method.options`` of ``diffcl`` (every [default] of docs/methods.md section 1).

    Attributes:
        peer: Who cross-supervises CS: ``"ds"`` (Diff-CL), ``"cs"`` (a second CS, the CS+CS CPS
            ablation) or ``"none"`` (CS only).
        use_hfm: HFM blocks on CS's ``hfm_levels`` skips.
        use_contrast: The contrastive label propagation term.
        timesteps: Diffusion steps ``T`` (1000).
        schedule: MONAI noise schedule (``linear_beta``).
        beta_start: First beta (1e-4).
        beta_end: Last beta (0.02).
        pl_steps: DDIM steps ``S_pl`` for the DS pseudo-labels during training (2).
        test_steps: DDIM steps ``S`` of the ``ds`` / ``mean`` test outputs (10).
        ddim_average: DS output = softmax of the ``last`` DDIM step or the ``mean`` over steps.
        sample_seed: Seed of the initial noise of test-time DDIM (training draws from the engine's
            per-step seeded RNG).
        ds_image_only_share: Share of DS's training samples drawn at ``t = T - 1`` instead of
            uniformly, where ``y_t`` is almost pure noise and DS must segment from the image (0:
            uniform ``t``, the paper's setting). DDIM sampling starts there and DS copies its label
            input at lower ``t``, so DS's samples are only as good as its image-only guess
            (``benchmarks/label_reliance.py`` measures this).
        ds_net: DS backbone (``unet2d``, ``vnet``, ``unet3d``); None: the same family as
            ``model.net``.
        ds_net_options: Options of the DS backbone; None: ``model.net_options``.
        ds_time_dim: Width of DS's sinusoidal timestep embedding (MLP hidden width 4x).
        hfm_levels: CS skip levels with an HFM block (0 = full resolution, -1 = bottleneck).
        hfm_radius: Relative half-width ``r`` of the removed low-frequency box (0.25).
        hfm_backend: Mamba back end: ``auto`` (mamba_ssm on CUDA when importable, else mambapy),
            ``mambapy`` or ``mamba_ssm``.
        hfm_bidirectional: Forward plus reversed scan (True) or forward only.
        hfm_share_directions: One Mamba for both scan directions.
        hfm_dim: Token width inside the Mamba; None = the skip's channels.
        hfm_d_state, hfm_expand, hfm_d_conv: Mamba state size, expansion, conv width.
        hfm_gate: ``residual`` (default: ``X + conv(.)``, zero-initialised, so CS starts as the plain
            U-Net) or ``multiply`` (``X * (1 + sigmoid(conv(.)))``, the literal reading of the spec,
            which cost CS 14.8 points of Dice on ACDC; docs/methods/diffcl.md).
        proj_dim: Output width of the projection head (64).
        proj_hidden: Hidden width of the 2-layer projection MLP.
        bank_size: Memory entries per class ``K`` (256).
        bank_push: Correctly predicted labeled voxels added per class per step (at most), per DDP
            process (the bank receives the candidates of every process).
        tau: InfoNCE temperature (0.1).
        contrast_voxels: Sampled anchor voxels per set (unlabeled, labeled), class-balanced (4096).
        contrast_labeled: Also contrast labeled voxels with their true class.
        pseudo_mask: Which pseudo-labelled voxels each network learns from, in both directions:
            ``none`` (all, the paper's reading), ``confidence`` (the teaching network's
            probability at least ``pseudo_threshold``), ``agreement`` (DS and CS predict the
            same class) or ``both``. A weak peer then teaches only where it is sure or agrees.
        ds_pseudo_mask: ``pseudo_mask`` of the CS -> DS direction alone; None: ``pseudo_mask``.
            ``confidence`` lets the stronger CS teach DS where DS disagrees (with ``both``, DS
            learns only where it already predicts CS's class).
        pseudo_threshold: Confidence threshold of ``pseudo_mask: confidence | both``.
        pseudo_loss: Loss on pseudo-labels: ``seg`` (0.5 CE + 0.5 Dice, as on labels) or ``ce``
            (cross-entropy only, averaged over the masked voxels).
        ds_sample_mode: DS's mode while it samples the pseudo-labels for CS: ``train`` (dropout
            on, batch statistics) or ``eval`` (as at test time).
        contrast_anchors: Classes of the unlabeled anchors of the contrastive term: ``ds`` (DS's
            pseudo-class for every voxel) or ``agree`` (only voxels where DS and CS agree).
        cs_view: What CS learns its peer's pseudo-labels on: ``same`` (the unlabeled images both
            networks see, the paper's reading) or ``strong`` (a strong view of them: intensity
            jitter, blur, CutMix; the pseudo-labels, confidences and agreement come from the
            weak view, as in FixMatch). With the confidence/agreement guards and ``same``, CS
            learns only where it already predicts its peer's class, so ``loss_c_pseudo`` is ~20x
            smaller than ``loss_c_sup`` and the peer adds nothing (docs/methods/diffcl.md);
            ``strong`` costs one more forward of CS (no gradient) on the weak view.
        cs_weak_mode: CS's mode in that weak-view pass: ``train`` (dropout on, batch statistics)
            or ``eval`` (as at test time, like a teacher's labels).
        cs_forward: CS's training forward over labeled + unlabeled (or strong-view) images:
            ``joint`` (one pass, one set of BatchNorm statistics) or ``separate`` (one pass per
            stream, so the labeled images are not normalised with the strong view's statistics;
            ProtoDiff's ``student_forward``, docs/methods/diffcl.md).
        cs_bn_stats: Which of CS's training passes its BatchNorm running statistics (the ones
            used at test time) are recorded from: ``all`` (labeled, weak and strong passes) or
            ``labeled`` (the labeled pass only; the other passes are still normalised by their own
            batch statistics, so training is unchanged). On EndoScapes the statistics of the
            jittered, blurred, CutMixed colour views made CS label the gallbladder as tool at test
            time (docs/methods/diffcl.md). Needs ``cs_forward: separate``.
        jitter_contrast, jitter_brightness, blur_prob, blur_sigma, cutmix_prob, cutmix_ratio: The
            strong view of ``cs_view: strong`` (:class:`~semidiff.methods.common.StrongViewOptions`).
        mu1: Weight of ``L_d_pseudo`` (times the ramp).
        mu2: Weight of ``L_c_pseudo + eta L_contrast`` (times the ramp).
        eta: Weight of ``L_contrast`` inside CS's unlabeled loss (0.1).
        test_output: What :meth:`DiffCL.predict` returns by default: ``cs``, ``ds`` or ``mean``.
    """

    peer: Literal["ds", "cs", "none"] = "ds"
    use_hfm: bool = True
    use_contrast: bool = True

    timesteps: int = Field(default=1000, ge=2)
    schedule: str = "linear_beta"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    pl_steps: int = Field(default=2, ge=1)
    test_steps: int = Field(default=10, ge=1)
    ddim_average: Literal["last", "mean"] = "last"
    sample_seed: int = 0
    ds_image_only_share: float = Field(default=0.0, ge=0.0, le=1.0)

    ds_net: str | None = None
    ds_net_options: dict[str, Any] | None = None
    ds_time_dim: int = Field(default=64, ge=2)

    hfm_levels: list[int] = Field(default_factory=lambda: [2, 3])
    hfm_radius: float = Field(default=0.25, ge=0.0, le=0.5)
    hfm_backend: Literal["auto", "mambapy", "mamba_ssm"] = "auto"
    hfm_bidirectional: bool = True
    hfm_share_directions: bool = False
    hfm_dim: int | None = Field(default=None, ge=1)
    hfm_d_state: int = Field(default=16, ge=1)
    hfm_expand: int = Field(default=2, ge=1)
    hfm_d_conv: int = Field(default=4, ge=1)
    hfm_gate: HFMGate = "residual"

    proj_dim: int = Field(default=64, ge=1)
    proj_hidden: int = Field(default=64, ge=1)
    bank_size: int = Field(default=256, ge=1)
    bank_push: int = Field(default=64, ge=1)
    tau: float = Field(default=0.1, gt=0.0)
    contrast_voxels: int = Field(default=4096, ge=1)
    contrast_labeled: bool = True

    pseudo_mask: Literal["none", "confidence", "agreement", "both"] = "none"
    ds_pseudo_mask: Literal["none", "confidence", "agreement", "both"] | None = None
    pseudo_threshold: float = Field(default=0.9, ge=0.0, le=1.0)
    pseudo_loss: Literal["seg", "ce"] = "seg"
    ds_sample_mode: Literal["train", "eval"] = "train"
    contrast_anchors: Literal["ds", "agree"] = "ds"
    cs_view: Literal["same", "strong"] = "same"
    cs_weak_mode: Literal["train", "eval"] = "train"
    cs_forward: Literal["joint", "separate"] = "joint"
    cs_bn_stats: Literal["all", "labeled"] = "all"

    mu1: float = Field(default=1.0, ge=0.0)
    mu2: float = Field(default=1.0, ge=0.0)
    eta: float = Field(default=0.1, ge=0.0)

    test_output: Literal["cs", "ds", "mean"] = "cs"

    @model_validator(mode="after")
    def _consistent(self) -> DiffCLOptions:
        for name in ("pl_steps", "test_steps"):
            if getattr(self, name) > self.timesteps:
                raise ValueError(f"{name} ({getattr(self, name)}) cannot exceed timesteps ({self.timesteps})")
        if self.peer != "ds" and self.test_output == "ds":
            raise ValueError(f"test_output 'ds' needs peer 'ds' (peer is {self.peer!r})")
        if self.cs_bn_stats == "labeled" and self.cs_forward != "separate":
            raise ValueError("cs_bn_stats 'labeled' needs cs_forward 'separate' (one pass mixes the streams' statistics)")
        if self.peer == "none" and self.test_output == "mean":
            raise ValueError("test_output 'mean' needs a peer network (peer 'ds' or 'cs')")
        return self


# ---- the method --------------------------------------------------------------------------------
@register_method("diffcl")
class DiffCL(Method):
    """Diff-CL: DS and CS with cross pseudo supervision, HFM and contrastive label propagation."""

    table_rank = 50

    Options = DiffCLOptions
    options: DiffCLOptions
    uses_unlabeled = True
    outputs: ClassVar[tuple[str, ...]] = ("cs", "ds", "mean")
    eval_options: ClassVar[tuple[str, ...]] = ("test_steps", "test_output", "ddim_average", "sample_seed")

    def __init__(self, net: NetSpec, options: MethodOptions) -> None:
        super().__init__(net, options)
        o = self.options
        self.num_classes = net.num_classes
        self.cs = self._build_cs(net)
        self.cs_peer: nn.Module | None = self._build_cs(net) if o.peer == "cs" else None  # other init draw
        self.ds: TimeConditionedDenoiser | None = None
        if o.peer == "ds":
            self.ds = create_denoiser(
                o.ds_net or net.name, net.in_channels, net.num_classes, time_dim=o.ds_time_dim,
                **(net.options if o.ds_net_options is None else o.ds_net_options),
            )
        # Every forward process and DDIM call goes through LabelDiffusion (MONAI schedulers).
        self.diffusion = LabelDiffusion(net.num_classes, o.timesteps, o.schedule, o.beta_start, o.beta_end)
        self.proj_head: nn.Module | None = None
        self.bank: ClassMemoryBank | None = None
        if o.use_contrast:
            feat = self.cs.feature_channels
            self.proj_head = nn.Sequential(nn.Linear(feat, o.proj_hidden), nn.ReLU(inplace=True),
                                           nn.Linear(o.proj_hidden, o.proj_dim))
            self.bank = ClassMemoryBank(net.num_classes, o.bank_size, o.proj_dim)
        # (features, classes) of the last training step, written to the bank by on_step_end.
        self._pending_push: tuple[Tensor, Tensor] | None = None

    def _build_cs(self, net: NetSpec) -> nn.Module:
        o = self.options
        cs = build_net(net)
        if o.use_hfm:
            cs = add_hfm(cs, o.hfm_levels, radius=o.hfm_radius, backend=o.hfm_backend,
                         bidirectional=o.hfm_bidirectional, share_directions=o.hfm_share_directions,
                         dim=o.hfm_dim, d_state=o.hfm_d_state, expand=o.hfm_expand, d_conv=o.hfm_d_conv,
                         gate=o.hfm_gate)
        return cs

    # ---- pieces ----------------------------------------------------------------------------
    def sample_ds(self, image: Tensor, steps: int, generator: torch.Generator | None = None,
                  eval_mode: bool = False) -> Tensor:
        """DS class probabilities for ``image`` by deterministic DDIM with ``steps`` steps (no grad).

        ``eval_mode`` samples with DS in eval mode (no dropout, running BatchNorm statistics) and
        puts it back in the mode it was in.
        """
        if self.ds is None:
            raise ConfigError("method.options.peer: the 'ds' output needs the diffusion segmenter (peer: ds)")
        ds = self.ds
        shape = (image.shape[0], self.num_classes, *image.shape[2:])
        with in_mode(ds, training=ds.training and not eval_mode):
            return self.diffusion.ddim_sample(lambda y, t: ds(image, y, t), shape, steps, device=image.device,
                                              generator=generator, average=self.options.ddim_average)

    def pseudo_mask(self, confidence: Tensor, teacher_labels: Tensor, student_labels: Tensor,
                    kind: str | None = None) -> Tensor | None:
        """Voxel weights of a pseudo-label loss (``pseudo_mask``): None when every voxel counts.

        Args:
            confidence: ``(B, 1, *spatial)`` the teaching network's probability of its label.
            teacher_labels: ``(B, 1, *spatial)`` the pseudo-labels.
            student_labels: ``(B, 1, *spatial)`` the learning network's own hard labels.
            kind: The mask rule; None: ``pseudo_mask``.
        """
        o = self.options
        kind = o.pseudo_mask if kind is None else kind
        if kind == "none":
            return None
        mask = torch.ones_like(confidence)
        if kind in ("confidence", "both"):
            mask = mask * (confidence >= o.pseudo_threshold).float()
        if kind in ("agreement", "both"):
            mask = mask * (teacher_labels == student_labels).float()
        return mask

    def pseudo_loss(self, logits: Tensor, labels: Tensor, mask: Tensor | None) -> Tensor:
        """``pseudo_loss`` of ``logits`` against pseudo-labels, over the voxels of ``mask``."""
        if self.options.pseudo_loss == "ce":
            return ce_loss(logits, labels, mask)
        return seg_loss(logits, labels, mask)

    def project(self, features: Tensor, index: Tensor) -> Tensor:
        """L2-normalised projections of the voxels ``index`` of ``features`` (B, F, *spatial)."""
        assert self.proj_head is not None
        flat = features.movedim(1, -1).reshape(-1, features.shape[1])
        return F.normalize(self.proj_head(flat[index]).float(), dim=1)

    def _contrast(self, features: Tensor, logits: Tensor, y_l: Tensor, pseudo_u: Tensor | None,
                  n_l: int) -> tuple[dict[str, Tensor], tuple[Tensor, Tensor]]:
        """Contrastive terms and the (features, classes) to push to the bank after the step."""
        o, bank = self.options, self.bank
        assert bank is not None
        memory, valid = bank.features, bank.valid()
        parts: dict[str, Tensor] = {}
        if pseudo_u is not None:
            cls_u = pseudo_u.reshape(-1)
            idx = sample_balanced(cls_u, o.contrast_voxels, self.num_classes)
            parts["loss_contrast_u"] = memory_infonce(self.project(features[n_l:], idx), cls_u[idx], memory, valid, o.tau)
        if o.contrast_labeled or pseudo_u is None:
            cls_l = y_l.reshape(-1).long()
            idx = sample_balanced(cls_l, o.contrast_voxels, self.num_classes)
            parts["loss_contrast_l"] = memory_infonce(self.project(features[:n_l], idx), cls_l[idx], memory, valid, o.tau)
        parts["loss_contrast"] = sum(parts.values())  # type: ignore[assignment]
        # Memory candidates: labeled voxels CS predicts correctly, projected without gradient.
        with torch.no_grad():
            truth = y_l.reshape(-1).long()
            correct = logits[:n_l].detach().argmax(1).reshape(-1) == truth
            cand = torch.where(correct, truth, torch.full_like(truth, -1))  # -1 is never drawn
            idx = sample_per_class(cand, o.bank_push, self.num_classes)
            push = (self.project(features[:n_l].detach(), idx), truth[idx])
        return parts, push

    # ---- the contract ----------------------------------------------------------------------
    def training_step(self, labeled, unlabeled, progress: Progress) -> dict[str, Tensor]:
        o = self.options
        x_l, y_l = labeled["image"], labeled["label"]
        n_l = len(x_l)
        x_u = require_unlabeled(unlabeled, self.name) if o.peer != "none" else None
        x = x_l if x_u is None else torch.cat([x_l, x_u])
        ramp = o.ramp(progress)
        mu1, mu2 = o.mu1 * ramp, o.mu2 * ramp

        strong = x_u is not None and o.cs_view == "strong"
        mix_mask: Tensor | None = None
        if strong:
            assert x_u is not None
            # CS's weak-view guess: its label for the peer and the agreement. Train mode (default)
            # as the one-view path: dropout on, BatchNorm uses and records this batch; eval mode
            # labels as at test time.
            with torch.no_grad(), in_mode(self.cs, training=o.cs_weak_mode == "train"), self._unrecorded_bn():
                logits_cs_weak = self.cs(x_u)
            x_s, mix_mask = o.strong_view(x_u)
            logits_cs, features = self._cs_passes(torch.cat([x_l, x_s]), n_l)
        else:
            logits_cs, features = self._cs_passes(x, n_l)
            logits_cs_weak = logits_cs[n_l:].detach()
        parts: dict[str, Tensor] = {"loss_c_sup": seg_loss(logits_cs[:n_l], y_l)}
        loss = parts["loss_c_sup"]
        pseudo_u: Tensor | None = None  # the peer's hard labels of the unlabeled images (CS's view)
        if x_u is not None:
            # CS's own hard labels (and confidences) for its peer, no gradient through them.
            conf_cs, plab_cs = torch.softmax(logits_cs_weak.float(), dim=1).max(1, keepdim=True)
            plab_cs = self.corrupt_pseudo(plab_cs)
            if o.peer == "ds":
                assert self.ds is not None
                # DS -> CS: DDIM pseudo-labels with S_pl steps (sample_ds runs without gradient).
                probs_peer = self.sample_ds(x_u, o.pl_steps, eval_mode=o.ds_sample_mode == "eval")
                # DS on labeled (true label) and unlabeled (CS's label) images in one pass.
                # Not-annotated pixels enter the label input as background; seg_loss weighs them 0.
                target = torch.cat([without_ignored(y_l.long())[0], plab_cs])
                t = self.diffusion.sample_timesteps(len(x), x.device, final_share=o.ds_image_only_share)
                y_t, _ = self.diffusion.q_sample(self.diffusion.encode(target), t)
                logits_peer = self.ds(x, y_t, t)
                peer_sup, peer_pseudo = "loss_d_sup", "loss_d_pseudo"
            else:  # a second CS in DS's place (the CS+CS ablation); its losses mirror DS's
                assert self.cs_peer is not None
                logits_peer = self.cs_peer(x)
                probs_peer = torch.softmax(logits_peer[n_l:].detach().float(), dim=1)
                peer_sup, peer_pseudo = "loss_peer_sup", "loss_peer_pseudo"
            conf_peer, pseudo_u = probs_peer.max(1, keepdim=True)
            pseudo_u = self.corrupt_pseudo(pseudo_u)
            peer_labels = logits_peer[n_l:].detach().argmax(1, keepdim=True)  # the peer's own guess
            parts[peer_sup] = seg_loss(logits_peer[:n_l], y_l)
            parts[peer_pseudo] = self.pseudo_loss(logits_peer[n_l:], plab_cs,
                                                  self.pseudo_mask(conf_cs, plab_cs, peer_labels, o.ds_pseudo_mask))
            mask_c = self.pseudo_mask(conf_peer, pseudo_u, plab_cs)
            agree = pseudo_u == plab_cs
            if strong:  # the weak view's labels, mask and agreement follow CS's CutMix geometry
                pseudo_u, agree = cutmix(pseudo_u, mix_mask), cutmix(agree, mix_mask)
                mask_c = None if mask_c is None else cutmix(mask_c, mix_mask)
            parts["loss_c_pseudo"] = self.pseudo_loss(logits_cs[n_l:], pseudo_u, mask_c)
            if mask_c is not None:
                parts["pseudo_mask_ratio"] = mask_c.mean()
            loss = loss + parts[peer_sup] + mu1 * parts[peer_pseudo] + mu2 * parts["loss_c_pseudo"]
            if o.contrast_anchors == "agree":  # unlabeled anchors only where the two networks agree
                pseudo_u = torch.where(agree, pseudo_u, torch.full_like(pseudo_u, -1))

        self._pending_push = None
        if o.use_contrast:
            with record_function(profiling.CONTRAST):
                contrast, self._pending_push = self._contrast(features, logits_cs, y_l, pseudo_u, n_l)
            parts.update(contrast)
            loss = loss + mu2 * o.eta * parts["loss_contrast"]
            assert self.bank is not None
            # The fill this step contrasted against (its own candidates enter in on_step_end).
            parts["bank_fill"] = self.bank.count.float().mean() / self.bank.size

        out = {"loss": loss}
        out.update({k: v.detach() for k, v in parts.items()})
        out["mu"] = torch.tensor(mu2, device=loss.device)
        return out

    def _cs_passes(self, x: Tensor, n_l: int) -> tuple[Tensor, Tensor]:
        """CS's logits and features over labeled + unlabeled images, in one pass or two (``cs_forward``)."""
        logits, features = batch_passes(lambda images: self.cs(images, return_features=True), n_l, x,
                                        separate=self.options.cs_forward == "separate",
                                        rest_context=self._unrecorded_bn())
        return logits, features

    def _unrecorded_bn(self) -> contextlib.AbstractContextManager:
        """Where CS's unlabeled passes leave its BatchNorm running statistics alone (``cs_bn_stats``)."""
        return batchnorm_not_recording(self.cs) if self.options.cs_bn_stats == "labeled" else contextlib.nullcontext()

    def on_step_end(self, progress: Progress) -> None:
        """Write the last step's memory candidates to the bank, gathered from every DDP process.

        Deferred from :meth:`training_step` so that a step never contrasts against its own voxels
        and a skipped step (``train.nonfinite: skip``: no ``on_step_end``) leaves the bank as it
        was. The engine calls this right after the optimiser step, before any checkpoint is
        written, so no entry is lost from a checkpoint. Under DDP every rank writes the same
        gathered rows (rank order), so the banks stay identical and hold every rank's voxels.
        """
        if self._pending_push is None:
            return
        assert self.bank is not None
        features, classes = self._pending_push
        self._pending_push = None
        self.bank.push(all_gather_padded(features.contiguous()), all_gather_padded(classes.contiguous()))

    def prediction_options(self, output: str) -> dict[str, Any]:
        """The CS output (and the CS+CS mean) uses no DDIM option; the DS and mean outputs use all of them."""
        if output == "cs" or self.ds is None:
            return {"test_output": output}
        return {**super().prediction_options(output), "test_output": output}

    @property
    def default_output(self) -> str:
        """The output :meth:`predict` gives when none is named (``test_output``)."""
        return self.options.test_output

    @torch.no_grad()
    def predict(self, image: Tensor, output: str | None = None) -> Tensor:
        """Class probabilities from CS, from DS (DDIM, ``test_steps``) or their mean.

        Args:
            image: ``(B, C, *spatial)``.
            output: ``"cs"``, ``"ds"`` or ``"mean"``; None: ``test_output``. With ``peer: cs``,
                ``"mean"`` averages the two CS networks.

        Raises:
            ConfigError: The output needs a network this variant does not have.
        """
        o = self.options
        output = output or o.test_output
        if output not in self.outputs:
            raise ConfigError(f"diffcl: unknown output {output!r}; choose one of {', '.join(self.outputs)}")
        if output == "cs":
            return softmax_probs(self.cs, image)
        if output == "mean" and self.cs_peer is not None:
            return 0.5 * (softmax_probs(self.cs, image) + softmax_probs(self.cs_peer, image))
        if self.ds is None:
            need = "the diffusion segmenter (peer: ds)" if output == "ds" else "a peer network (peer: ds or cs)"
            raise ConfigError(f"diffcl: output {output!r} needs {need}; this run has method.options.peer: {o.peer}")
        # A fixed seed per call: the same image always gets the same DS prediction.
        ds_probs = self.sample_ds(image, o.test_steps, torch.Generator().manual_seed(o.sample_seed))
        if output == "ds":
            return ds_probs
        return 0.5 * (softmax_probs(self.cs, image) + ds_probs)

    exportable_when = "test_output cs (its CS)"

    def export_net(self) -> nn.Module | None:
        """CS when it alone gives the default prediction; None for the DS or mean outputs."""
        return self.cs if self.options.test_output == "cs" else None

    def export_refusal(self) -> str:
        """Why a run whose ``test_output`` is not ``cs`` cannot be exported."""
        o = self.options
        what = ("DDIM sampling of the diffusion segmenter" if o.test_output == "ds"
                else "the mean of CS and its peer network")
        return (f"method.options.test_output is {o.test_output!r}, which predicts by {what}; only CS is a single "
                "network (a run with test_output: cs exports it)")
