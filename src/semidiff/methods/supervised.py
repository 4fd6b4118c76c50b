"""Supervised training on the labeled items only: the lower (few labels) and upper (all labels) bound."""

from __future__ import annotations

import torch
from torch import Tensor

from semidiff.methods.base import (
    Method,
    MethodOptions,
    NetSpec,
    Progress,
    register_method,
)
from semidiff.methods.losses import seg_loss
from semidiff.nets import create_net


@register_method("supervised")
class Supervised(Method):
    table_rank = 0
    uses_unlabeled = False

    def __init__(self, net: NetSpec, options: MethodOptions) -> None:
        super().__init__(net, options)
        self.student = create_net(net.name, net.in_channels, net.num_classes, **net.options)

    def training_step(self, labeled, unlabeled, progress: Progress) -> dict[str, Tensor]:
        loss = seg_loss(self.student(labeled["image"]), labeled["label"])
        return {"loss": loss, "loss_sup": loss.detach()}

    @torch.no_grad()
    def predict(self, image: Tensor) -> Tensor:
        return torch.softmax(self.student(image).float(), dim=1)

    exportable_when = "always"

    def export_net(self):
        """The only network."""
        return self.student
