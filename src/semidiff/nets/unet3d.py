"""A 3D U-Net built from MONAI's :class:`monai.networks.nets.BasicUNet`.

MONAI's modules are reused as they are; only the forward pass is ours, so the skips pass through
:meth:`SegmentationNet.transform_skips` and the last decoder features can be returned.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import BasicUNet
from torch import Tensor, nn

from semidiff.errors import ConfigError
from semidiff.nets.blocks import NORMALIZATIONS, SegmentationNet, init_weights
from semidiff.nets.registry import register_net

__all__ = ["UNet3D", "unet3d"]

# Our normalisation names -> MONAI's norm argument (GroupNorm groups chosen per level below).
_MONAI_NORM: dict[str, str | tuple | None] = {
    "batchnorm": "batch",
    "instancenorm": ("instance", {"affine": True}),
    "none": None,
}


class UNet3D(SegmentationNet):
    """Five-level 3D U-Net (two conv3x3x3 + norm + dropout + LeakyReLU per block, max-pool down,
    transposed-convolution up, concatenated skips).

    Args:
        in_channels: Image channels.
        out_channels: Output channels (classes, background included).
        features: Five level widths, finest first; an optional sixth value is the width of the
            last decoder block (defaults to the first value).
        dropout: Dropout probability after every convolution (0 disables it).
        normalization: ``"batchnorm"``, ``"instancenorm"``, ``"groupnorm"`` or ``"none"``.

    Raises:
        ConfigError: On a wrong number of features or an unknown normalisation.
    """

    spatial_dims = 3

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: float = 0.0,
        normalization: str = "batchnorm",
    ) -> None:
        super().__init__()
        ft = tuple(int(f) for f in features)
        if len(ft) not in (5, 6) or min(ft) < 1:
            raise ConfigError(
                f"network 'unet3d': features needs 5 or 6 positive values, got {tuple(features)!r}"
            )
        if len(ft) == 5:
            ft = (*ft, ft[0])
        if normalization == "groupnorm":
            # One group count must divide every level's width.
            groups = max(g for g in range(1, 17) if all(f % g == 0 for f in ft))
            norm: str | tuple | None = ("group", {"num_groups": groups})
        elif normalization in _MONAI_NORM:
            norm = _MONAI_NORM[normalization]
        else:
            raise ConfigError(
                f"network 'unet3d': unknown normalization {normalization!r}; "
                f"choose one of {', '.join(NORMALIZATIONS)}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"network 'unet3d': dropout must be in [0, 1), got {dropout!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.feature_channels = ft[5]
        self.net = BasicUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            features=ft,
            norm=norm,
            dropout=float(dropout),
            upsample="deconv",
        )
        init_weights(self)

    @property
    def classifier(self) -> nn.Module:  # type: ignore[override]
        """MONAI's final 1x1 convolution (a property, so the state dict holds it only once)."""
        return self.net.final_conv

    def encode(self, x: Tensor) -> list[Tensor]:
        """Five feature maps, full resolution first, bottleneck last."""
        n = self.net
        x0 = n.conv_0(x)
        x1 = n.down_1(x0)
        x2 = n.down_2(x1)
        x3 = n.down_3(x2)
        return [x0, x1, x2, x3, n.down_4(x3)]

    def decode(self, skips: list[Tensor]) -> Tensor:
        """MONAI's up-and-concatenate blocks; returns the full-resolution decoder features."""
        n = self.net
        x0, x1, x2, x3, x4 = skips
        u = n.upcat_4(x4, x3)
        u = n.upcat_3(u, x2)
        u = n.upcat_2(u, x1)
        return n.upcat_1(u, x0)


@register_net("unet3d")
def unet3d(
    in_channels: int,
    out_channels: int,
    *,
    features: Sequence[int] = (16, 32, 64, 128, 256),
    dropout: float = 0.0,
    normalization: str = "batchnorm",
) -> UNet3D:
    """Build the 3D U-Net (MONAI BasicUNet modules).

    Args:
        in_channels: Image channels.
        out_channels: Output channels (classes, background included).
        features: Five level widths (optionally a sixth: the last decoder width).
        dropout: Dropout after every convolution; set it above 0 for Monte-Carlo dropout.
        normalization: ``"batchnorm"``, ``"instancenorm"``, ``"groupnorm"`` or ``"none"``.

    Returns:
        The network.
    """
    return UNet3D(in_channels, out_channels, features, dropout, normalization)
