"""The time-conditioned denoiser of Diff-CL's diffusion segmenter (DS).

``DS(image, y_t, t)`` takes the image and the noisy label map concatenated on channels and
predicts the clean label as ``C`` logits (the x0 / "sample" parameterisation). The timestep enters
every block: a sinusoidal embedding (MONAI's ``get_timestep_embedding``, Ho et al.) goes through a
two-layer MLP, and each encoder and decoder block adds its own linear projection of it to its
output (a per-channel bias broadcast over space, as DDPM's residual blocks do).

The backbone is one of the project's segmentation networks, built by name from the registry with
``in_channels = image channels + C`` (so the V-Net-16 family in 3D and the SSL4MIS U-Net in 2D, the
networks of CS). Its blocks, padding, classifier and ``transform_skips`` hook are used as they
are; only the walk through the blocks is re-done here, one short adapter per family, so that the
embedding can be added after every block.

The denoiser is deliberately *not* in the network registry: the registry's contract is
``net(image) -> logits``, which every method may call, and a denoiser needs ``(image, y_t, t)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import Tensor, nn

from semidiff.errors import ConfigError
from semidiff.nets.blocks import SegmentationNet, crop_to, in_mode, pad_to_multiple
from semidiff.nets.registry import create_net
from semidiff.nets.unet2d import UNet2D
from semidiff.nets.unet3d import UNet3D
from semidiff.nets.vnet import VNet

__all__ = ["TimeConditionedDenoiser", "create_denoiser", "denoiser_backbones"]

Inject = Callable[[Tensor], Tensor]


# ---- per-family walks through the blocks, calling ``inject`` after each block ---------------------
def _unet2d_encode(net: UNet2D, x: Tensor, inject: Inject) -> list[Tensor]:
    skips: list[Tensor] = []
    for k, block in enumerate(net.enc_blocks):
        x = inject(block(x if k == 0 else net.pool(x)))
        skips.append(x)
    return skips


def _unet2d_decode(net: UNet2D, skips: list[Tensor], inject: Inject) -> Tensor:
    x = skips[-1]
    for i, up in enumerate(net.up_blocks):
        x = inject(up(x, skips[len(skips) - 2 - i]))
    return x


def _vnet_encode(net: VNet, x: Tensor, inject: Inject) -> list[Tensor]:
    skips: list[Tensor] = []
    for level, stage in enumerate(net.enc_stages):
        if level > 0:
            x = net.downs[level - 1](x)
        x = inject(stage(x))
        skips.append(x)
    skips[-1] = net.bottleneck_dropout(skips[-1])
    return skips


def _vnet_decode(net: VNet, skips: list[Tensor], inject: Inject) -> Tensor:
    x = skips[-1]
    for i, (up, stage) in enumerate(zip(net.ups, net.dec_stages)):
        x = inject(stage(up(x) + skips[3 - i]))
    return net.feature_dropout(x)


def _unet3d_encode(net: UNet3D, x: Tensor, inject: Inject) -> list[Tensor]:
    n = net.net
    skips = [inject(n.conv_0(x))]
    for down in (n.down_1, n.down_2, n.down_3, n.down_4):
        skips.append(inject(down(skips[-1])))
    return skips


def _unet3d_decode(net: UNet3D, skips: list[Tensor], inject: Inject) -> Tensor:
    n = net.net
    x0, x1, x2, x3, x4 = skips
    u = inject(n.upcat_4(x4, x3))
    u = inject(n.upcat_3(u, x2))
    u = inject(n.upcat_2(u, x1))
    return inject(n.upcat_1(u, x0))


_WALKS: dict[type, tuple[Callable, Callable]] = {
    UNet2D: (_unet2d_encode, _unet2d_decode),
    VNet: (_vnet_encode, _vnet_decode),
    UNet3D: (_unet3d_encode, _unet3d_decode),
}
_FAMILY_NAMES = {UNet2D: "unet2d", VNet: "vnet", UNet3D: "unet3d"}


def denoiser_backbones() -> list[str]:
    """Registry names of the networks a denoiser can be built on."""
    return sorted(_FAMILY_NAMES.values())


class TimeConditionedDenoiser(nn.Module):
    """``(image, y_t, t) -> clean-label logits`` on a segmentation backbone.

    Args:
        backbone: A U-Net 2D, V-Net or U-Net 3D built with ``image_channels + num_classes`` input
            channels and ``num_classes`` outputs.
        image_channels: Channels of the image.
        num_classes: Number of classes ``C`` (channels of ``y_t`` and of the logits).
        time_dim: Width of the sinusoidal embedding; the MLP's hidden width is ``4 * time_dim``.

    Raises:
        ConfigError: The backbone's family has no adapter or its channel counts do not match.
    """

    def __init__(self, backbone: SegmentationNet, image_channels: int, num_classes: int, time_dim: int = 64) -> None:
        super().__init__()
        walk = _WALKS.get(type(backbone))
        if walk is None:
            raise ConfigError(f"no denoiser adapter for {type(backbone).__name__}; "
                              f"denoiser backbones: {', '.join(denoiser_backbones())}")
        if backbone.in_channels != image_channels + num_classes or backbone.out_channels != num_classes:
            raise ConfigError(
                f"denoiser backbone must take {image_channels} + {num_classes} channels and give {num_classes}, "
                f"got {backbone.in_channels} -> {backbone.out_channels}"
            )
        if time_dim < 2 or time_dim % 2:
            raise ConfigError(f"denoiser time_dim: must be an even integer >= 2, got {time_dim!r}")
        self.backbone = backbone
        self.image_channels = image_channels
        self.num_classes = num_classes
        self.spatial_dims = backbone.spatial_dims
        self.time_dim = time_dim
        self._encode, self._decode = walk
        hidden = 4 * time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.time_proj = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, ch)) for ch in self._block_channels()
        )

    @torch.no_grad()
    def _block_channels(self) -> list[int]:
        """Output channels of every block, in call order (one eval-mode probe forward)."""
        net = self.backbone
        seen: list[int] = []

        def record(h: Tensor) -> Tensor:
            seen.append(int(h.shape[1]))
            return h

        with in_mode(net, training=False):
            probe = torch.zeros(1, net.in_channels, *([net.size_divisor] * net.spatial_dims))
            self._decode(net, net.transform_skips(self._encode(net, probe, record)), record)
        return seen

    def forward(self, image: Tensor, y_t: Tensor, t: Tensor) -> Tensor:
        """Clean-label logits.

        Args:
            image: ``(B, image_channels, *spatial)``.
            y_t: ``(B, num_classes, *spatial)`` noisy label (float).
            t: ``(B,)`` integer timesteps.

        Returns:
            ``(B, num_classes, *spatial)`` logits.
        """
        if image.shape[0] != y_t.shape[0] or image.shape[2:] != y_t.shape[2:]:
            raise ValueError(f"image {tuple(image.shape)} and y_t {tuple(y_t.shape)} differ in batch or spatial size")
        if y_t.shape[1] != self.num_classes or image.shape[1] != self.image_channels:
            raise ValueError(f"denoiser expects image with {self.image_channels} and y_t with {self.num_classes} "
                             f"channels, got {image.shape[1]} and {y_t.shape[1]}")
        if t.ndim != 1 or t.shape[0] != image.shape[0]:
            raise ValueError(f"t must have shape ({image.shape[0]},), got {tuple(t.shape)}")
        net = self.backbone
        spatial = tuple(image.shape[2:])
        x = pad_to_multiple(torch.cat([image, y_t.to(image.dtype)], dim=1), net.size_divisor)
        temb = self.time_mlp(get_timestep_embedding(t, self.time_dim).to(x.dtype))
        biases = iter(self.time_proj)
        unit = (1,) * self.spatial_dims

        def add_time(h: Tensor) -> Tensor:
            return h + next(biases)(temb).view(h.shape[0], -1, *unit)

        skips = net.transform_skips(self._encode(net, x, add_time))
        features = self._decode(net, skips, add_time)
        return crop_to(net.classifier(features), spatial)


def create_denoiser(
    backbone: str, image_channels: int, num_classes: int, *, time_dim: int = 64, **backbone_options: Any
) -> TimeConditionedDenoiser:
    """Build a denoiser on a registered backbone.

    Args:
        backbone: ``"unet2d"``, ``"vnet"`` or ``"unet3d"``.
        image_channels: Channels of the image.
        num_classes: Number of classes ``C``.
        time_dim: Width of the sinusoidal timestep embedding.
        **backbone_options: Options of the backbone (as in ``model.net_options``).

    Raises:
        ConfigError: Unknown backbone or option.
    """
    if backbone not in denoiser_backbones():
        raise ConfigError(f"denoiser backbone {backbone!r} is not supported; choose one of {', '.join(denoiser_backbones())}")
    net = create_net(backbone, image_channels + num_classes, num_classes, **backbone_options)
    return TimeConditionedDenoiser(net, image_channels, num_classes, time_dim)
