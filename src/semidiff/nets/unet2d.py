"""The 2D U-Net of the SSL4MIS code base (ACDC semi-supervised literature).

Each block is conv3x3 + BN + LeakyReLU, dropout, conv3x3 + BN + LeakyReLU; the encoder down-samples
by max-pooling, and dropout grows with depth (0.05 -> 0.5). The decoder up-samples bilinearly and
maps channels with a 1x1 convolution (or uses a transposed convolution), concatenates the skip and
applies a dropout-free block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from semidiff.errors import ConfigError
from semidiff.nets.blocks import (
    SegmentationNet,
    check_sequence,
    dropout_layer,
    init_weights,
)
from semidiff.nets.registry import register_net

__all__ = ["UNet2D", "unet2d"]

_N_LEVELS = 5


class ConvBlock2d(nn.Sequential):
    """conv3x3 + BN + LeakyReLU, dropout, conv3x3 + BN + LeakyReLU.

    Args:
        in_ch: Input channels.
        out_ch: Output channels.
        p: Dropout probability between the two convolutions (0 disables it).
    """

    def __init__(self, in_ch: int, out_ch: int, p: float) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.LeakyReLU(),
            dropout_layer(p),
            nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.LeakyReLU(),
        )


class UpBlock2d(nn.Module):
    """Up-sample the coarse map to the skip's width and resolution, concatenate, convolve.

    Args:
        coarse_ch: Channels of the coarser decoder map.
        skip_ch: Channels of the skip (also the channels after up-sampling).
        out_ch: Output channels.
        bilinear: Bilinear up-sampling after a 1x1 conv (else a transposed convolution).
    """

    def __init__(self, coarse_ch: int, skip_ch: int, out_ch: int, bilinear: bool) -> None:
        super().__init__()
        if bilinear:
            self.up: nn.Module = nn.Sequential(
                nn.Conv2d(coarse_ch, skip_ch, kernel_size=1),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            )
        else:
            self.up = nn.ConvTranspose2d(coarse_ch, skip_ch, kernel_size=2, stride=2)
        self.conv = ConvBlock2d(2 * skip_ch, out_ch, 0.0)

    def forward(self, coarse: Tensor, skip: Tensor) -> Tensor:
        """Return ``conv(cat(skip, up(coarse)))``."""
        return self.conv(torch.cat([skip, self.up(coarse)], dim=1))


class UNet2D(SegmentationNet):
    """Five-level 2D U-Net (SSL4MIS style) with concatenated skips.

    Args:
        in_channels: Image channels.
        out_channels: Output channels (classes, background included).
        features: Channels of the five levels, finest first.
        dropout: Dropout per encoder level (a scalar applies to all); all zeros disables dropout.
        bilinear: Bilinear up-sampling + 1x1 conv (True) or transposed convolutions.

    Raises:
        ConfigError: If ``features`` or ``dropout`` does not have five values.
    """

    spatial_dims = 2

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: float | Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
        bilinear: bool = True,
    ) -> None:
        super().__init__()
        ft = tuple(int(f) for f in check_sequence("features", "unet2d", features, _N_LEVELS))
        if min(ft) < 1:
            raise ConfigError(f"network 'unet2d': features must be positive, got {ft!r}")
        drop = check_sequence("dropout", "unet2d", dropout, _N_LEVELS)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.feature_channels = ft[0]

        self.enc_blocks = nn.ModuleList(
            ConvBlock2d(in_channels if k == 0 else ft[k - 1], ft[k], drop[k]) for k in range(_N_LEVELS)
        )
        self.pool = nn.MaxPool2d(2)
        # Decoder from the bottleneck back to level 0: up[i] merges level 4-i into level 3-i.
        self.up_blocks = nn.ModuleList(
            UpBlock2d(ft[k + 1], ft[k], ft[k], bilinear) for k in reversed(range(_N_LEVELS - 1))
        )
        self.classifier = nn.Conv2d(ft[0], out_channels, kernel_size=1)
        init_weights(self)

    def encode(self, x: Tensor) -> list[Tensor]:
        """Five feature maps, full resolution first, bottleneck last."""
        skips: list[Tensor] = []
        for k, block in enumerate(self.enc_blocks):
            x = block(x if k == 0 else self.pool(x))
            skips.append(x)
        return skips

    def decode(self, skips: list[Tensor]) -> Tensor:
        """Walk back up, merging each skip; returns the full-resolution decoder features."""
        x = skips[-1]
        for i, up in enumerate(self.up_blocks):
            x = up(x, skips[_N_LEVELS - 2 - i])
        return x


@register_net("unet2d")
def unet2d(
    in_channels: int,
    out_channels: int,
    *,
    features: Sequence[int] = (16, 32, 64, 128, 256),
    dropout: float | Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
    bilinear: bool = True,
) -> UNet2D:
    """Build the SSL4MIS-style 2D U-Net (about 1.8 M parameters with the defaults).

    Args:
        in_channels: Image channels.
        out_channels: Output channels (classes, background included).
        features: Channels of the five levels, finest first.
        dropout: Dropout per encoder level, or one value for all; 0 disables dropout.
        bilinear: Bilinear up-sampling + 1x1 conv (True) or transposed convolutions.

    Returns:
        The network.
    """
    return UNet2D(in_channels, out_channels, features, dropout, bilinear)
