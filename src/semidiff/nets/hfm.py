"""HFM, the high-frequency Mamba module of Diff-CL, and a wrapper that puts it on a net's skips.

Only the module's name and purpose are public ("a high-frequency Mamba module in the spectral
domain gives CS global boundary and detail information"); the design below is the reconstruction
of docs/methods.md, section 1:

1. High-pass: ``F = fftn(X)`` over the spatial axes; the centred low-frequency box
   ``|f_d| <= r`` on every axis (``f`` in cycles per sample, in ``[-0.5, 0.5)``, so ``r`` is the
   box's half-width relative to the spectrum's width) is zeroed; ``X_h = real(ifftn(F * mask))``.
2. ``X_h`` is flattened to tokens ``(B, N, channels)``, layer-normalised, passed through a
   bidirectional Mamba (a forward scan plus a scan of the reversed sequence, summed), a linear
   layer, and reshaped back.
3. Gate (``gate`` option): ``multiply`` (the reading of the spec): ``A = sigmoid(conv1x1(.))``,
   output ``X * (1 + A)``, a residual attention gate that re-weights the skip's own features by a
   factor in (1, 2); ``residual``: output ``X + conv1x1(.)`` with the 1x1 convolution
   zero-initialised, so the block starts as the identity and the skip reaches the decoder exactly as
   in the plain net until the Mamba branch has learned something useful (issue 23: the ``multiply``
   gate cost CS 15 points of Dice on ACDC at 5000 steps).

The Mamba layer sits behind :class:`MambaMixer`, whose back end is ``mambapy`` (pure PyTorch, any
device) or the CUDA kernels of ``mamba_ssm``. Both run the same parameters (mambapy's
``MambaBlock`` holds them, with mamba_ssm's parameter names), so a checkpoint trained with one
back end runs with the other.

:class:`SkipTransformNet` applies blocks to chosen skip levels of any
:class:`~semidiff.nets.blocks.SegmentationNet` through its ``transform_skips`` hook.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Mapping
from typing import Literal, get_args

import torch
from mambapy.mamba import MambaBlock, MambaConfig
from torch import Tensor, nn
from torch.profiler import record_function

from semidiff import profiling
from semidiff.errors import ConfigError
from semidiff.nets.blocks import SegmentationNet, in_mode

__all__ = [
    "HFM_GATES",
    "MAMBA_BACKENDS",
    "HFMBlock",
    "MambaMixer",
    "SkipTransformNet",
    "add_hfm",
    "high_pass",
    "low_frequency_mask",
    "mamba_ssm_available",
]

#: Accepted values of the ``backend`` option.
MAMBA_BACKENDS = ("auto", "mambapy", "mamba_ssm")

MambaBackend = Literal["auto", "mambapy", "mamba_ssm"]

HFMGate = Literal["multiply", "residual"]

#: Accepted values of the ``gate`` option (see the module docstring).
HFM_GATES: tuple[str, ...] = get_args(HFMGate)


# ---- high-pass filter ----------------------------------------------------------------------------
def low_frequency_mask(spatial: tuple[int, ...], radius: float, device: torch.device | str | None = None) -> Tensor:
    """1 outside and 0 inside the centred low-frequency box, in ``fftn``'s (unshifted) layout.

    Args:
        spatial: Spatial size of the transformed tensor.
        radius: Relative half-width ``r`` of the box, in ``[0, 0.5]``: frequencies with
            ``|f_d| <= r`` (cycles per sample) on every axis ``d`` are removed. ``r = 0`` removes
            only the zero frequency (the mean); ``r = 0.5`` removes everything.
        device: Device of the mask.

    Returns:
        A float mask of shape ``spatial``.
    """
    if not 0.0 <= radius <= 0.5:
        raise ConfigError(f"hfm radius: must be in [0, 0.5], got {radius!r}")
    inside = torch.ones(spatial, dtype=torch.bool, device=device)
    for axis, size in enumerate(spatial):
        # fftfreq gives each index's frequency in fftn's layout, so no fftshift is needed.
        near = torch.fft.fftfreq(size, device=device).abs() <= radius + 1e-9
        view = [1] * len(spatial)
        view[axis] = size
        inside = inside & near.view(view)
    return (~inside).float()


def high_pass(x: Tensor, radius: float) -> Tensor:
    """``real(ifftn(fftn(x) * mask))`` over the spatial axes of ``(B, C, *spatial)``.

    The transform runs in float32 with autocast disabled (half-precision FFTs are limited to
    power-of-two sizes and lose the small high-frequency terms); the result is cast back.
    """
    dims = tuple(range(2, x.ndim))
    with torch.autocast(x.device.type, enabled=False):
        spectrum = torch.fft.fftn(x.float(), dim=dims)
        mask = low_frequency_mask(tuple(x.shape[2:]), radius, x.device)
        out = torch.fft.ifftn(spectrum * mask, dim=dims).real
    return out.to(x.dtype)


# ---- the Mamba back ends -------------------------------------------------------------------------
@functools.cache
def _selective_scan_fn():
    """mamba_ssm's fused CUDA selective scan, or None when mamba_ssm is not importable."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError):  # not installed, or a CUDA extension built for another torch
        return None
    return selective_scan_fn


def mamba_ssm_available() -> bool:
    """Whether ``mamba_ssm``'s CUDA selective scan can be imported."""
    return _selective_scan_fn() is not None


class MambaMixer(nn.Module):
    """One Mamba mixer (no residual, no norm) over ``(B, L, d_model)`` sequences.

    The parameters live in a ``mambapy`` ``MambaBlock`` (``in_proj``, ``conv1d``, ``x_proj``,
    ``dt_proj``, ``A_log``, ``D``, ``out_proj``: the names of ``mamba_ssm``'s ``Mamba``). The
    selective scan runs either in mambapy's parallel scan (pure PyTorch) or in mamba_ssm's fused
    CUDA kernel, through mambapy's own ``use_cuda`` path.

    Args:
        d_model: Channels of the tokens.
        backend: ``"mambapy"``; ``"mamba_ssm"`` (CUDA tensors only; an error otherwise);
            ``"auto"``: mamba_ssm when it is importable and the input is on CUDA, else mambapy.
        d_state: SSM state size ``N`` (16 in Mamba).
        expand: Inner width factor ``E`` (2 in Mamba).
        d_conv: Width of the causal depthwise convolution (4 in Mamba).

    Raises:
        ConfigError: Unknown backend, or ``"mamba_ssm"`` requested but not importable.
    """

    def __init__(
        self, d_model: int, backend: MambaBackend = "auto", d_state: int = 16, expand: int = 2, d_conv: int = 4
    ) -> None:
        super().__init__()
        if backend not in MAMBA_BACKENDS:
            raise ConfigError(f"hfm backend: unknown value {backend!r}; choose one of {', '.join(MAMBA_BACKENDS)}")
        if backend == "mamba_ssm" and not mamba_ssm_available():
            raise ConfigError("hfm backend 'mamba_ssm' needs the mamba_ssm package (pip install 'semidiff[cuda]') "
                              "and a CUDA build; use backend 'auto' or 'mambapy'")
        self.backend = backend
        # n_layers is unused by MambaBlock; pscan=True is mambapy's parallel scan.
        self._py_config = MambaConfig(d_model=d_model, n_layers=1, d_state=d_state, expand_factor=expand,
                                      d_conv=d_conv, pscan=True, use_cuda=False)
        self._cuda_config = copy.copy(self._py_config)
        self._cuda_config.use_cuda = True
        self.block = MambaBlock(self._py_config)

    def resolved_backend(self, x: Tensor) -> str:
        """The back end a forward pass on ``x`` uses."""
        if self.backend == "mambapy":
            return "mambapy"
        if self.backend == "mamba_ssm":
            if not x.is_cuda:
                raise ConfigError("hfm backend 'mamba_ssm' runs on CUDA tensors only; use 'auto' or 'mambapy' on CPU")
            return "mamba_ssm"
        return "mamba_ssm" if x.is_cuda and mamba_ssm_available() else "mambapy"

    def forward(self, x: Tensor) -> Tensor:
        """``(B, L, d_model) -> (B, L, d_model)``, causal along ``L``."""
        if self.resolved_backend(x) == "mambapy":
            return self.block(x)
        # mambapy's MambaBlock switches to the fused kernel when its config says use_cuda; the
        # config is swapped for this call only, so the module's state (and state dict) is unchanged.
        self.block.selective_scan_cuda = _selective_scan_fn()
        self.block.config = self._cuda_config
        try:
            return self.block(x.float()).to(x.dtype)  # the CUDA kernel takes no (b)float16
        finally:
            self.block.config = self._py_config


# ---- the HFM block -------------------------------------------------------------------------------
class HFMBlock(nn.Module):
    """High-frequency Mamba block on ``(B, channels, *spatial)`` feature maps, 2D or 3D.

    Args:
        channels: Channels of the feature map.
        spatial_dims: 2 or 3.
        radius: Relative half-width ``r`` of the removed low-frequency box (0.25 by default).
        backend: Mamba back end, see :class:`MambaMixer`.
        bidirectional: Scan the tokens in both directions and sum (default); False scans
            forward only (an ablation).
        share_directions: Use one Mamba for both directions (False: two, as in Vision Mamba).
        dim: Token width inside the Mamba; None keeps ``channels`` (the design of methods.md).
            A smaller width adds a linear map ``channels -> dim`` before the scan (the linear
            after it maps back), which cuts the scan's cost, linear in ``dim``, on a CPU.
        d_state: Mamba state size.
        expand: Mamba inner width factor.
        d_conv: Mamba convolution width.
        gate: How the Mamba branch acts on ``X``: ``residual`` (default: ``X + conv(.)``, the
            convolution zero-initialised, so the block starts as the identity) or ``multiply``
            (the spec's ``X * (1 + sigmoid(conv(.)))``, whose sigmoid saturates in training:
            docs/methods/diffcl.md).
    """

    def __init__(
        self,
        channels: int,
        spatial_dims: int,
        radius: float = 0.25,
        backend: MambaBackend = "auto",
        bidirectional: bool = True,
        share_directions: bool = False,
        dim: int | None = None,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        gate: HFMGate = "residual",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ConfigError(f"hfm spatial_dims: must be 2 or 3, got {spatial_dims!r}")
        low_frequency_mask((1,), radius)  # validates radius with a clear message
        if gate not in HFM_GATES:
            raise ConfigError(f"hfm gate: unknown value {gate!r}; choose one of {', '.join(HFM_GATES)}")
        self.channels = channels
        self.spatial_dims = spatial_dims
        self.radius = float(radius)
        self.bidirectional = bidirectional
        width = channels if dim is None else int(dim)
        if width < 1:
            raise ConfigError(f"hfm dim: must be a positive integer or null, got {dim!r}")
        self.norm = nn.LayerNorm(channels)
        self.reduce: nn.Module = nn.Identity() if width == channels else nn.Linear(channels, width)
        self.forward_scan = MambaMixer(width, backend, d_state, expand, d_conv)
        self.backward_scan: MambaMixer | None = None
        if bidirectional and not share_directions:
            self.backward_scan = MambaMixer(width, backend, d_state, expand, d_conv)
        self.proj = nn.Linear(width, channels)
        self.gate_mode = gate
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.gate = conv(channels, channels, kernel_size=1)
        if gate == "residual":
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    def scan(self, tokens: Tensor) -> Tensor:
        """The (bi)directional Mamba over ``(B, N, channels)`` tokens (no norm, no projection)."""
        out = self.forward_scan(tokens)
        if self.bidirectional:
            backward = self.backward_scan if self.backward_scan is not None else self.forward_scan
            out = out + backward(tokens.flip(1)).flip(1)
        return out

    @record_function(profiling.HFM)
    def forward(self, x: Tensor) -> Tensor:
        """``X * (1 + sigmoid(conv1x1(M)))`` or ``X + conv1x1(M)``, ``M = Mamba(high_pass(X))``; ``x``'s shape."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.channels:
            raise ValueError(f"HFMBlock({self.channels} channels, {self.spatial_dims}D) got input of shape {tuple(x.shape)}")
        b, c, *spatial = x.shape
        tokens = high_pass(x, self.radius).flatten(2).transpose(1, 2)  # (B, N, C)
        tokens = self.proj(self.scan(self.reduce(self.norm(tokens))))
        mixed = tokens.transpose(1, 2).reshape(b, c, *spatial)
        if self.gate_mode == "residual":
            return x + self.gate(mixed)
        return x * (1.0 + torch.sigmoid(self.gate(mixed)))


# ---- wrapper: transforms on chosen skip levels ---------------------------------------------------
@torch.no_grad()
def skip_channels(net: SegmentationNet) -> list[int]:
    """Channels of each entry of ``net.encode``'s output, found by encoding a tiny input.

    The probe runs in eval mode (BatchNorm on a 1-voxel bottleneck would fail in train mode) and
    leaves the running statistics untouched.
    """
    with in_mode(net, training=False):
        param = next(net.parameters())
        probe = torch.zeros(1, net.in_channels, *([net.size_divisor] * net.spatial_dims),
                            device=param.device, dtype=param.dtype)
        return [int(s.shape[1]) for s in net.encode(probe)]


class SkipTransformNet(SegmentationNet):
    """A :class:`SegmentationNet` whose chosen skip levels pass through extra modules.

    The base net's encoder, decoder, classifier and padding are used unchanged; only
    ``transform_skips`` is extended, so the base net's own hook still runs first.

    Args:
        base: The network to wrap.
        transforms: Skip level (0 = full resolution, the last = bottleneck) -> module; each
            module must keep its input's shape.

    Raises:
        ConfigError: A level does not exist in the base net.
    """

    def __init__(self, base: SegmentationNet, transforms: Mapping[int, nn.Module]) -> None:
        super().__init__()
        n_levels = len(skip_channels(base))
        bad = sorted(lv for lv in transforms if not 0 <= lv < n_levels)
        if bad:
            raise ConfigError(f"hfm levels {bad} do not exist: {type(base).__name__} has skip levels 0..{n_levels - 1}")
        self.base = base
        self.spatial_dims = base.spatial_dims
        self.in_channels = base.in_channels
        self.out_channels = base.out_channels
        self.feature_channels = base.feature_channels
        self.size_divisor = base.size_divisor
        self.skip_modules = nn.ModuleDict({str(lv): m for lv, m in sorted(transforms.items())})

    @property
    def classifier(self) -> nn.Module:  # type: ignore[override]
        """The base net's classifier (a property, so the state dict holds it once)."""
        return self.base.classifier

    @property
    def levels(self) -> list[int]:
        """The transformed skip levels, ascending."""
        return [int(k) for k in self.skip_modules]

    def encode(self, x: Tensor) -> list[Tensor]:
        return self.base.encode(x)

    def transform_skips(self, skips: list[Tensor]) -> list[Tensor]:
        skips = list(self.base.transform_skips(skips))
        for level, module in self.skip_modules.items():
            skips[int(level)] = module(skips[int(level)])
        return skips

    def decode(self, skips: list[Tensor]) -> Tensor:
        return self.base.decode(skips)


def add_hfm(
    net: SegmentationNet,
    levels: Iterable[int],
    radius: float = 0.25,
    backend: MambaBackend = "auto",
    bidirectional: bool = True,
    share_directions: bool = False,
    dim: int | None = None,
    d_state: int = 16,
    expand: int = 2,
    d_conv: int = 4,
    gate: HFMGate = "residual",
) -> SegmentationNet:
    """``net`` with an :class:`HFMBlock` on each skip level of ``levels``.

    Negative levels count from the end (-1 is the bottleneck). An empty ``levels`` returns
    ``net`` itself.

    Args:
        net: A :class:`SegmentationNet` (unet2d, unet3d, vnet, ...).
        levels: Skip levels to transform (0 = full resolution).
        radius, backend, bidirectional, share_directions, dim, d_state, expand, d_conv, gate: see
            :class:`HFMBlock`.

    Returns:
        A :class:`SkipTransformNet` around ``net`` (or ``net`` when ``levels`` is empty).

    Raises:
        ConfigError: ``net`` has no skip hook, a level is out of range or repeated.
    """
    if not isinstance(net, SegmentationNet):
        raise ConfigError(f"HFM needs a SegmentationNet with a transform_skips hook, got {type(net).__name__}")
    channels = skip_channels(net)
    wanted = [lv + len(channels) if lv < 0 else lv for lv in levels]
    if not wanted:
        return net
    if len(set(wanted)) != len(wanted):
        raise ConfigError(f"hfm levels: repeated level in {list(levels)}")
    bad = [lv for lv in wanted if not 0 <= lv < len(channels)]
    if bad:
        raise ConfigError(f"hfm levels {bad} do not exist: {type(net).__name__} has skip levels 0..{len(channels) - 1}")
    blocks = {
        lv: HFMBlock(channels[lv], net.spatial_dims, radius, backend, bidirectional, share_directions,
                     dim, d_state, expand, d_conv, gate)
        for lv in wanted
    }
    return SkipTransformNet(net, blocks)
