"""ProtoDiff on the shared segmentation backbone: the label latent enters the network every other
method uses (the SSL4MIS U-Net in 2D, the V-Net in 3D), so a ProtoDiff row compares methods, not
networks (issue 23: ProtoDiff's own segmenter, trained on labels alone, was 5 points below the
shared U-Net).

The backbone's encoder runs once per image. Its skip at ``1 / feature_stride`` (level
``log2(feature_stride)``) takes the noisy label latent: ``skip + conv(concat(skip, z_t)) +
W emb(t)``, a residual whose convolution and time projection start at zero, so the untrained
network is exactly the backbone. The backbone's decoder then merges that skip on its way up; its
last feature map is ``h``, the latent of the class prototypes, and its classifier gives the logits.
Same interface as :class:`~semidiff.nets.protodiff_net.ProtoDiffNet` (``encode`` once, ``decode``
per DDIM step, ``embed``), so the method uses either.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from semidiff.errors import ConfigError
from semidiff.nets.blocks import SegmentationNet, crop_to, pad_to_multiple
from semidiff.nets.hfm import skip_channels
from semidiff.nets.protodiff_net import EncodedImage, LabelLatent
from semidiff.nets.registry import create_net, register_net

__all__ = ["ProtoDiffUNet", "protodiff_unet"]

#: The shared backbone per number of spatial axes (the networks of every other method's configs).
DEFAULT_BACKBONE = {2: "unet2d", 3: "vnet"}


class ProtoDiffUNet(LabelLatent, nn.Module):
    """A registry segmentation network with the label latent injected at one skip level.

    Args:
        in_channels: Image channels.
        num_classes: Classes ``C`` (rows of the label embedding, the backbone's outputs).
        spatial_dims: 2 or 3.
        backbone: Registry name of the backbone; None: ``unet2d`` in 2D, ``vnet`` in 3D.
        backbone_options: The backbone's options (as ``model.net_options`` of the other methods).
        feature_stride: Down-sampling of the skip that takes the latent (2, 4, 8 or 16; DDP: 4).
        embed_dim: Channels ``D_z`` of the label latent; None: that skip's channels.
        label_scale: Scale ``s`` of ``z0 = s * (2 * sigmoid(E[y]) - 1)``.
        time_embed_dim: Width of the timestep embedding (sinusoidal, then a 2-layer MLP).

    Raises:
        ConfigError: An option is out of range, or the backbone is not a segmentation network of
            ``spatial_dims`` axes.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, spatial_dims: int = 2, backbone: str | None = None,
                 backbone_options: dict[str, Any] | None = None, feature_stride: int = 4,
                 embed_dim: int | None = None, label_scale: float = 0.01, time_embed_dim: int = 128) -> None:
        super().__init__()
        name = "network 'protodiff_unet'"
        if spatial_dims not in DEFAULT_BACKBONE:
            raise ConfigError(f"{name}: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if feature_stride not in (2, 4, 8, 16):
            raise ConfigError(f"{name}: feature_stride must be 2, 4, 8 or 16, got {feature_stride!r}")
        if not label_scale > 0 or time_embed_dim < 2 or time_embed_dim % 2:
            raise ConfigError(f"{name}: label_scale must be positive and time_embed_dim even and >= 2")
        backbone = backbone or DEFAULT_BACKBONE[spatial_dims]
        self.backbone = create_net(backbone, in_channels, num_classes, **(backbone_options or {}))
        if not isinstance(self.backbone, SegmentationNet) or self.backbone.spatial_dims != spatial_dims:
            raise ConfigError(f"{name}: backbone {backbone!r} is not a {spatial_dims}D segmentation network")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.feature_stride = feature_stride
        self.level = int(math.log2(feature_stride))
        self.size_divisor = self.backbone.size_divisor
        self.label_scale = float(label_scale)
        skip = skip_channels(self.backbone)[self.level]
        self.embed_dim = int(embed_dim) if embed_dim is not None else skip
        if self.embed_dim < 1:
            raise ConfigError(f"{name}: embed_dim must be positive, got {embed_dim!r}")
        #: Channels of the hidden map ``h`` (the prototypes' latent space): the decoder's last map.
        self.feature_channels = self.backbone.feature_channels

        self.label_embedding = nn.Embedding(num_classes, self.embed_dim)
        self.time_embed_dim = time_embed_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(time_embed_dim, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.fuse = conv(skip + self.embed_dim, skip, kernel_size=3, padding=1)
        self.time_proj = nn.Linear(time_embed_dim, skip)
        for layer in (self.fuse, self.time_proj):  # start as the plain backbone
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ---- grids ---------------------------------------------------------------------------------
    def to_hidden_grid(self, values: Tensor) -> Tensor:
        """The hidden map ``h`` is at image resolution: values stay as they are (as float)."""
        return values.float()

    # ---- forward -------------------------------------------------------------------------------
    def encode(self, image: Tensor) -> EncodedImage:
        """The backbone's encoder, once per image batch (``features`` is the injection skip)."""
        if image.ndim != self.spatial_dims + 2 or image.shape[1] != self.in_channels:
            raise ValueError(f"ProtoDiffUNet expects images (B, {self.in_channels}, *spatial) with "
                             f"{self.spatial_dims} spatial axes, got {tuple(image.shape)}")
        skips = self.backbone.encode(pad_to_multiple(image, self.size_divisor))
        return EncodedImage(features=skips[self.level], skips=skips, spatial=tuple(image.shape[2:]))

    def decode(self, encoded: EncodedImage, z_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """One denoising pass: ``(logits, h)`` at image resolution from the skips and ``z_t``."""
        skip = encoded.features
        if z_t.shape[0] != skip.shape[0] or z_t.shape[2:] != skip.shape[2:] or z_t.shape[1] != self.embed_dim:
            raise ValueError(f"z_t must be (B, {self.embed_dim}, *{tuple(skip.shape[2:])}), got {tuple(z_t.shape)}")
        emb = self.time_embedding(t)
        bias = self.time_proj(emb).reshape(*emb.shape[:1], -1, *([1] * self.spatial_dims))
        skips = list(encoded.skips)
        skips[self.level] = skip + self.fuse(torch.cat([skip, z_t.to(skip.dtype)], dim=1)) + bias
        h = self.backbone.decode(self.backbone.transform_skips(skips))
        logits = self.backbone.classifier(h)
        return crop_to(logits, encoded.spatial), crop_to(h, encoded.spatial)


@register_net("protodiff_unet")
def protodiff_unet(
    in_channels: int,
    out_channels: int,
    *,
    spatial_dims: int = 2,
    backbone: str | None = None,
    backbone_options: dict[str, Any] | None = None,
    feature_stride: int = 4,
    embed_dim: int | None = None,
    label_scale: float = 0.01,
    time_embed_dim: int = 128,
) -> ProtoDiffUNet:
    """Build ProtoDiff's segmenter on the shared backbone (:class:`ProtoDiffUNet`); built by the
    ``protodiff`` method, which sets ``spatial_dims`` and ``label_scale``."""
    return ProtoDiffUNet(in_channels, out_channels, spatial_dims, backbone, backbone_options, feature_stride,
                         embed_dim, label_scale, time_embed_dim)
