"""Segmentation networks and their registry.

Importing this package imports every module in it, so each registers its networks
(:func:`register_net`) and ``create_net("vnet", 1, 2)`` works after ``import semidiff.nets``.
"""

from __future__ import annotations

from semidiff.nets.blocks import SegmentationNet
from semidiff.nets.denoiser import TimeConditionedDenoiser, create_denoiser
from semidiff.nets.hfm import HFMBlock, SkipTransformNet, add_hfm
from semidiff.nets.registry import NETS, create_net, list_nets, register_net
from semidiff.nets.unet2d import UNet2D
from semidiff.nets.unet3d import UNet3D
from semidiff.nets.vnet import VNet
from semidiff.registry import import_submodules

__all__ = [
    "NETS",
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

# Every module here registers what it defines: a new network is one new file in this package.
import_submodules(__name__, __path__)
