"""Segmentation networks and their registry.

Importing this package registers every network, so ``create_net("vnet", 1, 2)`` works after
``import semidiff.nets``.
"""

from __future__ import annotations

from semidiff.nets import protodiff_net as _protodiff_net  # noqa: F401  (registers "protodiff_net")
from semidiff.nets import protodiff_unet as _protodiff_unet  # noqa: F401  (registers "protodiff_unet")

# Imported for their registration side effect.
from semidiff.nets import unet2d as _unet2d  # noqa: F401  (registers "unet2d")
from semidiff.nets import unet3d as _unet3d  # noqa: F401  (registers "unet3d")
from semidiff.nets import vnet as _vnet  # noqa: F401  (registers "vnet")
from semidiff.nets.blocks import SegmentationNet
from semidiff.nets.denoiser import TimeConditionedDenoiser, create_denoiser
from semidiff.nets.hfm import HFMBlock, SkipTransformNet, add_hfm
from semidiff.nets.registry import create_net, list_nets, register_net
from semidiff.nets.unet2d import UNet2D
from semidiff.nets.unet3d import UNet3D
from semidiff.nets.vnet import VNet

__all__ = [
    "HFMBlock",
    "SegmentationNet",
    "SkipTransformNet",
    "TimeConditionedDenoiser",
    "UNet2D",
    "UNet3D",
    "VNet",
    "add_hfm",
    "create_denoiser",
    "create_net",
    "list_nets",
    "register_net",
]
