"""The 16-filter V-Net of the semi-supervised LA / Pancreas literature (UA-MT, MC-Net, BCP, ...).

Compared with the original V-Net (Milletari et al., 2016) this variant has no residual additions
inside a stage: each stage is 1-3 plain conv3x3x3 + norm + ReLU layers. Down-sampling is a
stride-2 convolution of kernel 2, up-sampling a transposed convolution of kernel 2, and the
decoder adds (rather than concatenates) the encoder feature of the same level.
"""

from __future__ import annotations

from torch import Tensor, nn

from semidiff.errors import ConfigError
from semidiff.nets.blocks import (
    NORMALIZATIONS,
    SegmentationNet,
    dropout_layer,
    init_weights,
    make_norm,
)
from semidiff.nets.registry import register_net

__all__ = ["VNet", "vnet"]

# Layers per stage, encoder (levels 1..5) then decoder (levels 4..1), as in the literature.
_ENCODER_STAGES = (1, 2, 3, 3, 3)
_DECODER_STAGES = (3, 3, 2, 1)


def _conv_stage(n_layers: int, in_ch: int, out_ch: int, normalization: str) -> nn.Sequential:
    """``n_layers`` x (conv3x3x3 + norm + ReLU); the first layer changes the channel count."""
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers += [
            nn.Conv3d(in_ch if i == 0 else out_ch, out_ch, kernel_size=3, padding=1),
            make_norm(normalization, out_ch, 3),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def _down(in_ch: int, out_ch: int, normalization: str) -> nn.Sequential:
    """Stride-2 convolution of kernel 2 + norm + ReLU: halves every spatial size."""
    return nn.Sequential(
        nn.Conv3d(in_ch, out_ch, kernel_size=2, stride=2),
        make_norm(normalization, out_ch, 3),
        nn.ReLU(inplace=True),
    )


def _up(in_ch: int, out_ch: int, normalization: str) -> nn.Sequential:
    """Transposed convolution of kernel 2, stride 2 + norm + ReLU: doubles every spatial size."""
    return nn.Sequential(
        nn.ConvTranspose3d(in_ch, out_ch, kernel_size=2, stride=2),
        make_norm(normalization, out_ch, 3),
        nn.ReLU(inplace=True),
    )


class VNet(SegmentationNet):
    """3D V-Net with five levels and additive skip connections.

    With ``has_dropout`` a ``Dropout3d(p)`` is applied to the bottleneck and to the last decoder
    features (the classifier input), as in UA-MT; it stays active in train mode, which is what
    Monte-Carlo dropout needs.

    Args:
        in_channels: Image channels.
        out_channels: Output channels (classes, background included).
        n_filters: Channels at the first level; level ``k`` has ``n_filters * 2**k``.
        normalization: ``"batchnorm"``, ``"instancenorm"``, ``"groupnorm"`` or ``"none"``.
        has_dropout: Enable the two dropout layers.
        dropout_rate: Their drop probability (0.5 in the literature).

    Raises:
        ConfigError: On an unknown normalisation or a non-positive ``n_filters``.
    """

    spatial_dims = 3

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        n_filters: int = 16,
        normalization: str = "batchnorm",
        has_dropout: bool = False,
        dropout_rate: float = 0.5,
    ) -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"network 'vnet': unknown normalization {normalization!r}; "
                f"choose one of {', '.join(NORMALIZATIONS)}"
            )
        if n_filters < 1:
            raise ConfigError(f"network 'vnet': n_filters must be positive, got {n_filters!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.feature_channels = n_filters
        self.has_dropout = has_dropout
        widths = [n_filters * 2**k for k in range(5)]

        self.enc_stages = nn.ModuleList()
        self.downs = nn.ModuleList()
        for level, n_layers in enumerate(_ENCODER_STAGES):
            in_ch = in_channels if level == 0 else widths[level]
            self.enc_stages.append(_conv_stage(n_layers, in_ch, widths[level], normalization))
            if level < 4:
                self.downs.append(_down(widths[level], widths[level + 1], normalization))

        self.ups = nn.ModuleList()
        self.dec_stages = nn.ModuleList()
        for i, n_layers in enumerate(_DECODER_STAGES):
            level = 3 - i  # decoder goes from level 4 (index 3) back to level 1 (index 0)
            self.ups.append(_up(widths[level + 1], widths[level], normalization))
            self.dec_stages.append(_conv_stage(n_layers, widths[level], widths[level], normalization))

        p = dropout_rate if has_dropout else 0.0
        self.bottleneck_dropout = dropout_layer(p, spatial_dims=3)
        self.feature_dropout = dropout_layer(p, spatial_dims=3)
        self.classifier = nn.Conv3d(n_filters, out_channels, kernel_size=1)
        init_weights(self)

    def encode(self, x: Tensor) -> list[Tensor]:
        """Five feature maps, full resolution first; the bottleneck (last) gets dropout."""
        skips: list[Tensor] = []
        for level, stage in enumerate(self.enc_stages):
            if level > 0:
                x = self.downs[level - 1](x)
            x = stage(x)
            skips.append(x)
        skips[-1] = self.bottleneck_dropout(skips[-1])
        return skips

    def decode(self, skips: list[Tensor]) -> Tensor:
        """Up-sample, add the same-level skip, convolve; dropout on the final features."""
        x = skips[-1]
        for i, (up, stage) in enumerate(zip(self.ups, self.dec_stages)):
            x = stage(up(x) + skips[3 - i])
        return self.feature_dropout(x)


@register_net("vnet")
def vnet(
    in_channels: int,
    out_channels: int,
    *,
    n_filters: int = 16,
    normalization: str = "batchnorm",
    has_dropout: bool = False,
    dropout_rate: float = 0.5,
) -> VNet:
    """Build the literature's V-Net (about 9.4 M parameters with the defaults, 1 -> 2 channels).

    Args:
        in_channels: Image channels.
        out_channels: Output channels (classes, background included).
        n_filters: Channels at the first level.
        normalization: ``"batchnorm"``, ``"instancenorm"``, ``"groupnorm"`` or ``"none"``.
        has_dropout: Dropout on the bottleneck and on the last decoder features.
        dropout_rate: Their drop probability.

    Returns:
        The network.
    """
    return VNet(in_channels, out_channels, n_filters, normalization, has_dropout, dropout_rate)
