"""Building blocks shared by the segmentation networks.

:class:`SegmentationNet` fixes the forward pass of every encoder-decoder here:

    pad -> encode (list of skips, coarsest last) -> transform_skips -> decode -> classifier -> crop

so a subclass can change one stage (e.g. a high-frequency module on chosen skip levels) by
overriding one method, and every network accepts any input size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semidiff.errors import ConfigError

__all__ = [
    "NORMALIZATIONS",
    "BulkRandomDropout",
    "SegmentationNet",
    "bulk_random_dropout",
    "check_sequence",
    "crop_to",
    "dropout_layer",
    "in_mode",
    "init_weights",
    "make_norm",
    "pad_to_multiple",
]

NORMALIZATIONS = ("batchnorm", "instancenorm", "groupnorm", "none")


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad the spatial axes of ``x`` up to the next multiple of ``multiple``.

    The padding is split as evenly as possible between both sides of each axis, so the content
    stays centred (the border effect of the padding is shared by both edges).

    Args:
        x: Tensor of shape ``(B, C, *spatial)``.
        multiple: Every padded spatial size will be divisible by this.

    Returns:
        ``x`` itself when no padding is needed, otherwise the padded tensor.
    """
    pads: list[int] = []
    # F.pad takes (left, right) pairs starting from the last axis.
    for size in reversed(x.shape[2:]):
        total = (-size) % multiple
        pads.extend((total // 2, total - total // 2))
    if not any(pads):
        return x
    return F.pad(x, pads)


def crop_to(x: Tensor, spatial: Sequence[int]) -> Tensor:
    """Undo :func:`pad_to_multiple`: take the centred window of size ``spatial``.

    Args:
        x: Tensor of shape ``(B, C, *padded_spatial)``.
        spatial: The spatial size before padding.

    Returns:
        A view of ``x`` with spatial shape ``spatial``.
    """
    if tuple(x.shape[2:]) == tuple(spatial):
        return x
    slices: list[slice] = [slice(None), slice(None)]
    for padded, size in zip(x.shape[2:], spatial):
        left = (padded - size) // 2
        slices.append(slice(left, left + size))
    return x[tuple(slices)]


def _group_count(channels: int, preferred: int = 16) -> int:
    """Largest divisor of ``channels`` not above ``preferred`` (GroupNorm needs a divisor)."""
    for groups in range(min(preferred, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def make_norm(normalization: str, channels: int, spatial_dims: int) -> nn.Module:
    """Create a normalisation layer by name.

    Args:
        normalization: One of ``"batchnorm"``, ``"instancenorm"``, ``"groupnorm"``, ``"none"``.
        channels: Number of channels to normalise.
        spatial_dims: 2 or 3.

    Returns:
        The layer (``nn.Identity`` for ``"none"``).

    Raises:
        ConfigError: If ``normalization`` is not a known name.
    """
    if normalization == "batchnorm":
        return nn.BatchNorm3d(channels) if spatial_dims == 3 else nn.BatchNorm2d(channels)
    if normalization == "instancenorm":
        # Affine-free, as in the V-Net of the UA-MT family.
        return nn.InstanceNorm3d(channels) if spatial_dims == 3 else nn.InstanceNorm2d(channels)
    if normalization == "groupnorm":
        return nn.GroupNorm(_group_count(channels), channels)
    if normalization == "none":
        return nn.Identity()
    raise ConfigError(
        f"unknown normalization {normalization!r}; choose one of {', '.join(NORMALIZATIONS)}"
    )


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convolution weights, zero biases, unit/zero norm affine parameters.

    This is the initialisation of the MC-Net / UA-MT code lineage, applied to every submodule.

    Args:
        module: Network to initialise in place.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SegmentationNet(nn.Module):
    """Base class of the encoder-decoder segmentation networks.

    Subclasses set ``spatial_dims``, ``in_channels``, ``out_channels``, ``feature_channels`` and
    ``classifier`` (the final 1x1 convolution) and implement :meth:`encode` and :meth:`decode`.

    Attributes:
        spatial_dims: 2 or 3.
        in_channels: Expected number of input channels.
        out_channels: Number of output logits channels.
        feature_channels: Channels of the feature map returned with ``return_features=True``.
        size_divisor: Total down-sampling factor; inputs are padded to a multiple of it.
    """

    spatial_dims: int
    in_channels: int
    out_channels: int
    feature_channels: int
    size_divisor: int = 16
    classifier: nn.Module

    def encode(self, x: Tensor) -> list[Tensor]:
        """Run the encoder.

        Args:
            x: Padded input ``(B, in_channels, *spatial)``.

        Returns:
            One feature map per resolution level, finest first; the last entry is the bottleneck.
        """
        raise NotImplementedError

    def transform_skips(self, skips: list[Tensor]) -> list[Tensor]:
        """Hook between encoder and decoder; returns the skips unchanged by default.

        Override it to transform chosen levels (e.g. a high-frequency module on the coarse skips).
        The returned list must keep the number of entries and each entry's shape.

        Args:
            skips: Output of :meth:`encode`, finest first, bottleneck last.

        Returns:
            The (possibly transformed) skips.
        """
        return skips

    def decode(self, skips: list[Tensor]) -> Tensor:
        """Run the decoder.

        Args:
            skips: Output of :meth:`transform_skips`.

        Returns:
            The last decoder feature map ``(B, feature_channels, *padded_spatial)``, i.e. exactly
            the input of :attr:`classifier`.
        """
        raise NotImplementedError

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Segment ``x``; any spatial size is accepted (padded internally, cropped back).

        Args:
            x: Images ``(B, in_channels, *spatial)`` with ``len(spatial) == spatial_dims``.
            return_features: Also return the last decoder feature map.

        Returns:
            Logits ``(B, out_channels, *spatial)``, or ``(logits, features)`` with features
            ``(B, feature_channels, *spatial)`` when ``return_features`` is true.

        Raises:
            ValueError: If ``x`` has the wrong number of dimensions or channels.
        """
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            expected = "(B, {}, {})".format(
                self.in_channels, ", ".join(["*"] * self.spatial_dims)
            )
            raise ValueError(
                f"{type(self).__name__} expects input of shape {expected}, got {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        skips = self.transform_skips(self.encode(pad_to_multiple(x, self.size_divisor)))
        features = self.decode(skips)
        logits = crop_to(self.classifier(features), spatial)
        if return_features:
            return logits, crop_to(features, spatial)
        return logits


def check_sequence(
    name: str, net: str, values: float | Sequence[float], length: int
) -> tuple[float, ...]:
    """Broadcast a scalar option to ``length`` values or check a sequence's length.

    Args:
        name: Option name, for the error message.
        net: Network name, for the error message.
        values: A scalar or a sequence.
        length: Required length.

    Returns:
        A tuple of ``length`` values.

    Raises:
        ConfigError: If a sequence of another length is given.
    """
    if isinstance(values, (int, float)):
        return (values,) * length
    out = tuple(values)
    if len(out) != length:
        raise ConfigError(f"network {net!r}: {name} needs {length} values, got {len(out)}: {out!r}")
    return out


def dropout_layer(p: float, spatial_dims: int | None = None) -> nn.Module:
    """A plain dropout layer (active in train mode, so Monte-Carlo dropout works) or Identity.

    Args:
        p: Drop probability; 0 gives ``nn.Identity``.
        spatial_dims: ``None`` for element-wise ``nn.Dropout``; 2 or 3 for channel dropout.

    Returns:
        The layer.

    Raises:
        ConfigError: If ``p`` is outside ``[0, 1)``.
    """
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"dropout probability must be in [0, 1), got {p!r}")
    if p == 0.0:
        return nn.Identity()
    if spatial_dims == 3:
        return nn.Dropout3d(p)
    if spatial_dims == 2:
        return nn.Dropout2d(p)
    return BulkRandomDropout(p)


class BulkRandomDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask reads four elements' random numbers from each 64-bit draw.

    Why: torch's CPU dropout draws one number per element from its scalar generator, about 7 ns
    each, so the encoder dropout of the shared U-Net (2 M elements per forward of 4 images at
    128x128) cost as much as a tenth of a ProtoDiff step (py-spy, session 29). Filling int64 words
    in bulk costs a tenth of that. Each element reads one 16-bit uniform and is kept when it is at
    or above ``round(p * 2**16)``; the kept ones are scaled by ``1 / (1 - p')`` with ``p'`` that
    rounded rate, so the output stays unbiased and the rate differs from ``p`` by at most 2**-17.
    The words come from torch's global generator, so ``torch.manual_seed`` repeats the mask. Off
    the CPU (CUDA's generator is fast) and in eval mode it is ``nn.Dropout``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or x.device.type != "cpu":
            return super().forward(x)
        return bulk_random_dropout(x, self.p)


def bulk_random_dropout(x: Tensor, p: float) -> Tensor:
    """Element-wise dropout of ``x`` at rate ``p`` (rounded to 2**-16), mask from bulk 64-bit draws."""
    cut = round(p * 65536)
    if cut == 0:
        return x
    words = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64, device=x.device)
    uniforms = words.view(torch.int16)[: x.numel()]
    layouts = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)
    x = x if any(x.is_contiguous(memory_format=f) for f in layouts) else x.contiguous()
    # The mask laid out as x (channels-last too): a mask in another layout made the product 5x slower.
    keep = torch.as_strided(uniforms, x.shape, x.stride()) >= cut - 32768
    return torch.where(keep, x * (65536 / (65536 - cut)), 0)


@contextlib.contextmanager
def in_mode(net: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Run ``net`` in train (``training``) or eval mode inside the block, then restore its mode."""
    was_training = net.training
    net.train(training)
    try:
        yield net
    finally:
        net.train(was_training)


@contextlib.contextmanager
def batchnorm_not_recording(net: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``net``'s BatchNorm layers still normalise by each batch's own statistics
    (in train mode) but leave their running statistics, the ones used at test time, untouched."""
    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False  # train mode then passes no running buffers to batch_norm
    try:
        yield net
    finally:
        for m in layers:
            m.track_running_stats = True
