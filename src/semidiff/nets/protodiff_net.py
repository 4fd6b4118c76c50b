"""The ProtoDiff segmenter: an image encoder, a learned label latent and a time-conditioned decoder.

Reconstructed after DDP (Ji et al., ICCV 2023), which diffuses labels in a learned embedding space
(docs/methods.md, section 2; docs/methods/protodiff.md). One class serves 2D and 3D
(``spatial_dims``); the building blocks are MONAI's:

* **Image encoder** (MONAI ``BasicUNet`` blocks: ``TwoConv``, ``Down``, ``UpCat``): five levels
  (strides 1 to 16), then the U-Net up path back to the feature level, giving ``F`` with ``D``
  channels at ``1 / feature_stride`` of the (padded) input (default 1/4).
* **Label latent**: a learned class embedding table ``E`` (``C x D_z``); a label map, resized with
  nearest to the feature grid, becomes ``z0 = s * (2 * sigmoid(E[y]) - 1)``.
* **Time-conditioned decoder** (MONAI ``DiffusionUNetResnetBlock`` residual blocks, sinusoidal
  timestep embedding + MLP): ``conv(concat(F, z_t))``, ``latent_blocks`` residual blocks at the
  feature grid, then (``decoder_skips=True``, default) up-sampling stages that merge the encoder's
  finer maps, each a time-conditioned block, up to full resolution. Its last hidden map ``h`` is
  the latent space of the class prototypes; a 1x1 convolution turns it into class logits. With
  ``decoder_skips=False`` (DDP as published) the decoder stays at the feature grid and the logits
  are up-sampled by interpolation; ``h`` is then at the feature grid.

The encoder output is computed once per image and reused by every DDIM step (:meth:`encode`,
then :meth:`decode` per step), which is what makes multi-step sampling affordable on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from monai.networks.nets.diffusion_model_unet import (
    DiffusionUNetResnetBlock,
    get_timestep_embedding,
)
from torch import Tensor, nn

from semidiff.errors import ConfigError
from semidiff.nets.blocks import NORMALIZATIONS, crop_to, pad_to_multiple
from semidiff.nets.registry import register_net

__all__ = ["EncodedImage", "LabelLatent", "ProtoDiffNet", "protodiff_net"]

_N_LEVELS = 5
_ACT = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})  # as MONAI's BasicUNet


@dataclass
class EncodedImage:
    """What :meth:`ProtoDiffNet.encode` computes once per image batch.

    Attributes:
        features: ``F``, (B, D, *feature_grid) at ``1 / feature_stride`` of the padded input.
        skips: Encoder maps of the levels finer than the feature level, finest first (used by
            the decoder's up-sampling stages; empty with ``decoder_skips=False``).
        spatial: The input's spatial size before padding (outputs are cropped back to it).
    """

    features: Tensor
    skips: list[Tensor]
    spatial: tuple[int, ...]


def _monai_norm(normalization: str, widths: Sequence[int]) -> str | tuple | None:
    """Our normalisation names -> MONAI's ``norm`` argument (one group count for all widths)."""
    if normalization == "batchnorm":
        return "batch"
    if normalization == "instancenorm":
        return ("instance", {"affine": True})
    if normalization == "groupnorm":
        groups = max(g for g in range(1, 17) if all(w % g == 0 for w in widths))
        return ("group", {"num_groups": groups})
    if normalization == "none":
        return None
    raise ConfigError(
        f"network 'protodiff_net': unknown normalization {normalization!r}; choose one of {', '.join(NORMALIZATIONS)}"
    )


def _groups(*channels: int, preferred: int = 8) -> int:
    """Largest group count not above ``preferred`` that divides every channel count (GroupNorm)."""
    return max(g for g in range(1, preferred + 1) if all(c % g == 0 for c in channels))


class LabelLatent:
    """What ProtoDiff's networks share: the padded and latent grids, the label latent, the timestep
    embedding and ``forward``. A network sets ``spatial_dims``, ``num_classes``, ``size_divisor``,
    ``feature_stride``, ``label_scale``, ``label_embedding``, ``time_embed_dim`` and ``time_mlp``,
    and implements ``encode`` and ``decode``."""

    # ---- grids ---------------------------------------------------------------------------------
    def padded_shape(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """The spatial size the input is zero-padded to (a multiple of ``size_divisor`` on every axis)."""
        d = self.size_divisor
        return tuple(-(-int(s) // d) * d for s in spatial)

    def latent_shape(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Spatial size of ``F`` and of the label latent for an input of size ``spatial``."""
        return tuple(s // self.feature_stride for s in self.padded_shape(spatial))

    def to_latent_grid(self, values: Tensor) -> Tensor:
        """Resize a (B, k, *spatial) map to the feature grid: pad like the image, then nearest.

        Labels, confidences and masks go through this, so they stay aligned with ``F``.
        """
        padded = pad_to_multiple(values.float(), self.size_divisor)
        if self.feature_stride == 1:
            return padded
        # nearest-exact samples the centre of each stride-sized block rather than its corner.
        return F.interpolate(padded, size=self.latent_shape(values.shape[2:]), mode="nearest-exact")

    # ---- label latent --------------------------------------------------------------------------
    def embed(self, label: Tensor) -> Tensor:
        """Label map -> label latent ``z0 = s * (2 * sigmoid(E[y]) - 1)`` on the feature grid.

        Args:
            label: (B, 1, *spatial) integer class map at image resolution.

        Returns:
            (B, embed_dim, *latent_shape) float tensor with values in ``(-s, s)``.

        Raises:
            ValueError: A label value is outside ``[0, num_classes)``.
        """
        if label.ndim != self.spatial_dims + 2 or label.shape[1] != 1:
            raise ValueError(f"label must be (B, 1, *spatial) with {self.spatial_dims} spatial axes, got {tuple(label.shape)}")
        small = self.to_latent_grid(label).round().long()[:, 0]
        if small.numel() and (int(small.min()) < 0 or int(small.max()) >= self.num_classes):
            raise ValueError(f"label values must be in [0, {self.num_classes}), got [{int(small.min())}, {int(small.max())}]")
        z = torch.sigmoid(self.label_embedding(small)).movedim(-1, 1)
        return self.label_scale * (2.0 * z - 1.0)

    # ---- forward -------------------------------------------------------------------------------
    def time_embedding(self, t: Tensor) -> Tensor:
        """(B,) integer timesteps -> (B, time_embed_dim) embedding (sinusoidal, then MLP)."""
        return self.time_mlp(get_timestep_embedding(t, self.time_embed_dim).to(self.time_mlp[0].weight.dtype))

    def forward(self, image: Tensor, z_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``decode(encode(image), z_t, t)``: logits (B, C, *spatial) and the hidden map ``h``."""
        return self.decode(self.encode(image), z_t, t)


class ProtoDiffNet(LabelLatent, nn.Module):
    """Image encoder + label embedding + time-conditioned decoder, 2D or 3D.

    Args:
        in_channels: Image channels.
        num_classes: Classes ``C``, background included (rows of the embedding table).
        spatial_dims: 2 or 3.
        features: Widths of the encoder's five levels, finest first.
        feature_stride: Down-sampling of the feature grid (1, 2, 4, 8 or 16; DDP uses 4).
        embed_dim: Channels ``D_z`` of the label latent; None gives ``D``, the width of ``F``.
        label_scale: Scale ``s`` of ``z0 = s * (2 * sigmoid(E[y]) - 1)`` (DDP: 0.01).
        decoder_features: Widths of the decoder from the feature level to the finest level it
            reaches (``log2(feature_stride) + 1`` values with skips, 1 without); None mirrors
            ``features``. The last one is the prototype latent's width.
        latent_blocks: Time-conditioned residual blocks at the feature grid.
        decoder_skips: Up-sample through the encoder's finer maps to full resolution (True) or
            stay at the feature grid and interpolate the logits (DDP).
        time_embed_dim: Width of the timestep embedding (sinusoidal, then a 2-layer MLP).
        normalization: Encoder normalisation: ``"batchnorm"``, ``"instancenorm"``,
            ``"groupnorm"`` or ``"none"`` (the decoder's MONAI blocks use GroupNorm).
        dropout: Dropout inside the encoder blocks.

    Raises:
        ConfigError: An option is out of range; the message names it.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        spatial_dims: int = 2,
        features: Sequence[int] = (16, 32, 64, 128, 256),
        feature_stride: int = 4,
        embed_dim: int | None = None,
        label_scale: float = 0.01,
        decoder_features: Sequence[int] | None = None,
        latent_blocks: int = 2,
        decoder_skips: bool = True,
        time_embed_dim: int = 128,
        normalization: str = "batchnorm",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        name = "network 'protodiff_net'"
        if spatial_dims not in (2, 3):
            raise ConfigError(f"{name}: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        ft = tuple(int(f) for f in features)
        if len(ft) != _N_LEVELS or min(ft) < 1:
            raise ConfigError(f"{name}: features needs {_N_LEVELS} positive values, got {tuple(features)!r}")
        if feature_stride not in (1, 2, 4, 8, 16):
            raise ConfigError(f"{name}: feature_stride must be 1, 2, 4, 8 or 16, got {feature_stride!r}")
        if not (isinstance(label_scale, (int, float)) and label_scale > 0):
            raise ConfigError(f"{name}: label_scale must be a positive number, got {label_scale!r}")
        if latent_blocks < 1 or time_embed_dim < 2 or time_embed_dim % 2:
            raise ConfigError(f"{name}: latent_blocks must be >= 1 and time_embed_dim even and >= 2")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"{name}: dropout must be in [0, 1), got {dropout!r}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = num_classes
        self.num_classes = num_classes
        self.feature_stride = feature_stride
        self.feature_level = int(math.log2(feature_stride))
        self.size_divisor = 2 ** (_N_LEVELS - 1)
        self.label_scale = float(label_scale)
        self.decoder_skips = decoder_skips
        self.image_feature_channels = ft[self.feature_level]
        self.embed_dim = int(embed_dim) if embed_dim is not None else self.image_feature_channels
        if self.embed_dim < 1:
            raise ConfigError(f"{name}: embed_dim must be positive, got {embed_dim!r}")

        # Decoder levels: the feature level, then (with skips) every finer level down to 0.
        levels = list(range(self.feature_level, -1, -1)) if decoder_skips else [self.feature_level]
        if decoder_features is None:
            dec = tuple(ft[level] for level in levels)
        else:
            dec = tuple(int(f) for f in decoder_features)
            if len(dec) != len(levels) or min(dec) < 1:
                raise ConfigError(
                    f"{name}: decoder_features needs {len(levels)} positive values for feature_stride "
                    f"{feature_stride} (decoder_skips={decoder_skips}), got {tuple(decoder_features)!r}"
                )
        self.decoder_levels = levels
        #: Channels of the hidden map ``h`` (the prototypes' latent space).
        self.feature_channels = dec[-1]

        # ---- image encoder (MONAI BasicUNet blocks) ----
        norm = _monai_norm(normalization, ft)
        self.enc_blocks = nn.ModuleList(
            [TwoConv(spatial_dims, in_channels, ft[0], _ACT, norm, True, dropout)]
            + [Down(spatial_dims, ft[k - 1], ft[k], _ACT, norm, True, dropout) for k in range(1, _N_LEVELS)]
        )
        # Up path from the bottleneck back to the feature level: up_blocks[i] lands on level 3 - i.
        self.up_blocks = nn.ModuleList(
            UpCat(spatial_dims, ft[k + 1], ft[k], ft[k], _ACT, norm, True, dropout, upsample="deconv")
            for k in range(_N_LEVELS - 2, self.feature_level - 1, -1)
        )

        # ---- label latent ----
        self.label_embedding = nn.Embedding(num_classes, self.embed_dim)

        # ---- time-conditioned decoder ----
        self.time_embed_dim = time_embed_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(time_embed_dim, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        self.fuse = Convolution(
            spatial_dims, self.image_feature_channels + self.embed_dim, dec[0], kernel_size=3, conv_only=True
        )
        self.latent_blocks = nn.ModuleList(
            DiffusionUNetResnetBlock(spatial_dims, dec[0], time_embed_dim, dec[0], norm_num_groups=_groups(dec[0]))
            for _ in range(latent_blocks)
        )
        # Each up-sampling stage: 1x1 conv to the next width (cheaper to up-sample and to merge,
        # as in the SSL4MIS U-Net), up-sample, concatenate the encoder map, one residual block.
        self.up_projs = nn.ModuleList()
        self.up_stages = nn.ModuleList()
        for i, level in enumerate(levels[1:], start=1):
            self.up_projs.append(Convolution(spatial_dims, dec[i - 1], dec[i], kernel_size=1, conv_only=True))
            cin = dec[i] + ft[level]
            self.up_stages.append(
                DiffusionUNetResnetBlock(spatial_dims, cin, time_embed_dim, dec[i], norm_num_groups=_groups(cin, dec[i]))
            )
        # The hidden map is the output of a residual block (pre-norm); a norm + SiLU before the
        # classifier, as in MONAI's diffusion U-Net output head.
        self.out_norm = nn.GroupNorm(_groups(dec[-1]), dec[-1])
        self.classifier = Convolution(spatial_dims, dec[-1], num_classes, kernel_size=1, conv_only=True)

    # ---- grids ---------------------------------------------------------------------------------
    def to_hidden_grid(self, values: Tensor) -> Tensor:
        """Resize a (B, k, *spatial) map to the grid of the hidden map ``h`` (identity with skips)."""
        return values.float() if self.decoder_skips else self.to_latent_grid(values)

    # ---- forward -------------------------------------------------------------------------------
    def encode(self, image: Tensor) -> EncodedImage:
        """Run the image encoder once (the result serves every denoising step).

        Args:
            image: (B, in_channels, *spatial); any size (zero-padded to a multiple of 16).
        """
        if image.ndim != self.spatial_dims + 2 or image.shape[1] != self.in_channels:
            raise ValueError(
                f"ProtoDiffNet expects images (B, {self.in_channels}, {', '.join(['*'] * self.spatial_dims)}), "
                f"got {tuple(image.shape)}"
            )
        spatial = tuple(image.shape[2:])
        x = pad_to_multiple(image, self.size_divisor)
        levels: list[Tensor] = []
        for block in self.enc_blocks:
            x = block(x)
            levels.append(x)
        for i, up in enumerate(self.up_blocks):
            x = up(x, levels[_N_LEVELS - 2 - i])
        skips = levels[: self.feature_level] if self.decoder_skips else []
        return EncodedImage(features=x, skips=skips, spatial=spatial)

    def decode(self, encoded: EncodedImage, z_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """One denoising pass: class logits and the hidden map from ``F`` and the noisy latent.

        Args:
            encoded: Output of :meth:`encode`.
            z_t: (B, embed_dim, *latent_shape) noisy label latent.
            t: (B,) integer timesteps.

        Returns:
            ``(logits, h)``: logits (B, C, *spatial) at image resolution, ``h`` (B,
            feature_channels, *hidden grid) (image resolution with skips, else the feature grid).
        """
        f = encoded.features
        if z_t.shape[0] != f.shape[0] or z_t.shape[2:] != f.shape[2:] or z_t.shape[1] != self.embed_dim:
            raise ValueError(
                f"z_t must be (B, {self.embed_dim}, *{tuple(f.shape[2:])}) to match the features, got {tuple(z_t.shape)}"
            )
        emb = self.time_embedding(t)
        h = self.fuse(torch.cat([f, z_t.to(f.dtype)], dim=1))
        for block in self.latent_blocks:
            h = block(h, emb)
        for proj, stage, skip in zip(self.up_projs, self.up_stages, reversed(encoded.skips)):
            h = F.interpolate(proj(h), size=skip.shape[2:], mode="bilinear" if self.spatial_dims == 2 else "trilinear",
                              align_corners=False)
            h = stage(torch.cat([h, skip], dim=1), emb)
        logits = self.classifier(F.silu(self.out_norm(h)))
        if self.decoder_skips:
            return crop_to(logits, encoded.spatial), crop_to(h, encoded.spatial)
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        padded = self.padded_shape(encoded.spatial)
        logits = F.interpolate(logits, size=padded, mode=mode, align_corners=False)
        return crop_to(logits, encoded.spatial), h



@register_net("protodiff_net")
def protodiff_net(
    in_channels: int,
    out_channels: int,
    *,
    spatial_dims: int = 2,
    features: Sequence[int] = (16, 32, 64, 128, 256),
    feature_stride: int = 4,
    embed_dim: int | None = None,
    label_scale: float = 0.01,
    decoder_features: Sequence[int] | None = None,
    latent_blocks: int = 2,
    decoder_skips: bool = True,
    time_embed_dim: int = 128,
    normalization: str = "batchnorm",
    dropout: float = 0.0,
) -> ProtoDiffNet:
    """Build the ProtoDiff segmenter (see :class:`ProtoDiffNet` for the options).

    Its forward pass is ``net(image, z_t, t) -> (logits, h)``, not ``net(image)``: it is built by
    the ``protodiff`` method, which sets ``spatial_dims`` (from the patch size) and
    ``label_scale`` (a method option) itself.
    """
    return ProtoDiffNet(in_channels, out_channels, spatial_dims, features, feature_stride, embed_dim, label_scale,
                        decoder_features, latent_blocks, decoder_skips, time_embed_dim, normalization, dropout)
