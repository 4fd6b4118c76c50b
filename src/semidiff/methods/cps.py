"""Cross pseudo supervision (Chen et al., CVPR 2021), with the SSL4MIS medical defaults.

Two networks of the same kind, initialised differently (the second is built after the first, so
it draws other initial weights from the RNG), are each trained on the labeled images and on the
other one's hard pseudo-labels:

``L = seg(A(x_l), y) + seg(B(x_l), y) + w(t) * [CE(A(x), argmax B(x)) + CE(B(x), argmax A(x))]``

with ``w(t) = cps_weight * r(t)``. Pseudo-labels carry no gradient, so summing both networks'
losses under one optimiser gives each network exactly the gradient of its own loss. Defaults follow
the SSL4MIS CPS script used for the medical comparison tables: cross supervision on the unlabeled
images only, CE, weight 0.1 with a sigmoid ramp. The original paper also applies it to labeled
images (``include_labeled: true``) with a constant weight (``cps_weight: 1.5, rampup_fraction: 0``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from semidiff.methods.base import (
    Method,
    MethodOptions,
    NetSpec,
    Progress,
    register_method,
)
from semidiff.methods.common import (
    RampOptions,
    batch_passes,
    build_net,
    pseudo_label,
    require_unlabeled,
    softmax_probs,
)
from semidiff.methods.losses import seg_loss

__all__ = ["CPS", "CPSOptions"]


class CPSOptions(RampOptions):
    """``method.options`` of ``cps``.

    Attributes:
        cps_weight: Maximum weight of the cross pseudo supervision (SSL4MIS: 0.1).
        pseudo_loss: ``"ce"`` (CPS, SSL4MIS) or ``"seg"`` (0.5 CE + 0.5 Dice) on pseudo-labels.
        include_labeled: Also cross-supervise on the labeled images (the original paper).
        eval_model: ``"a"`` (the first network, as SSL4MIS reports), ``"b"``, or ``"mean"`` of
            both networks' softmax.
        net_forward: ``"joint"``: each network runs once over labeled + unlabeled images, so the
            labeled images are normalised by BatchNorm statistics of both (SSL4MIS); ``"separate"``:
            one pass per stream (:func:`~semidiff.methods.common.batch_passes`), the setting of
            ProtoDiff's and Diff-CL's configs.
    """

    cps_weight: float = Field(default=0.1, ge=0.0)
    pseudo_loss: Literal["ce", "seg"] = "ce"
    include_labeled: bool = False
    eval_model: Literal["a", "b", "mean"] = "a"
    net_forward: Literal["joint", "separate"] = "joint"


@register_method("cps")
class CPS(Method):
    """Two networks supervising each other with hard pseudo-labels."""

    table_rank = 30

    Options = CPSOptions
    options: CPSOptions
    uses_unlabeled = True

    def __init__(self, net: NetSpec, options: MethodOptions) -> None:
        super().__init__(net, options)
        self.net_a = build_net(net)
        self.net_b = build_net(net)  # built second: different random initial weights

    def _pseudo_loss(self, logits: Tensor, other_logits: Tensor) -> Tensor:
        target, _ = pseudo_label(torch.softmax(other_logits.detach().float(), dim=1))
        target = self.corrupt_pseudo(target)  # noise benchmark (identity unless noise.target: pseudo)
        if self.options.pseudo_loss == "seg":
            return seg_loss(logits, target)
        return F.cross_entropy(logits.float(), target[:, 0])

    def training_step(self, labeled, unlabeled, progress: Progress) -> dict[str, Tensor]:
        o = self.options
        x_l, y_l = labeled["image"], labeled["label"]
        x = torch.cat([x_l, require_unlabeled(unlabeled, self.name)])
        n_l = len(x_l)
        logits_a, logits_b = batch_passes(lambda v: (self.net_a(v), self.net_b(v)), n_l, x,
                                          separate=o.net_forward == "separate")
        loss_sup = seg_loss(logits_a[:n_l], y_l) + seg_loss(logits_b[:n_l], y_l)
        start = 0 if o.include_labeled else n_l
        loss_cps = (self._pseudo_loss(logits_a[start:], logits_b[start:])
                    + self._pseudo_loss(logits_b[start:], logits_a[start:]))
        weight = o.cps_weight * o.ramp(progress)
        loss = loss_sup + weight * loss_cps
        return {"loss": loss, "loss_sup": loss_sup.detach(), "loss_cps": loss_cps.detach(),
                "cps_weight": torch.tensor(weight, device=loss.device)}

    @torch.no_grad()
    def predict(self, image: Tensor) -> Tensor:
        """Softmax of network A (``eval_model``: of B, or the mean of both)."""
        if self.options.eval_model == "a":
            return softmax_probs(self.net_a, image)
        if self.options.eval_model == "b":
            return softmax_probs(self.net_b, image)
        return 0.5 * (softmax_probs(self.net_a, image) + softmax_probs(self.net_b, image))

    exportable_when = "eval_model a or b"

    def export_net(self):
        """Network A (or B) as ``eval_model`` says; None for the two-network mean."""
        return {"a": self.net_a, "b": self.net_b}.get(self.options.eval_model)
