"""Tests of the segmentation networks and their registry (tiny inputs, CPU, a few seconds)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from semidiff import nets
from semidiff.errors import ConfigError
from semidiff.nets import create_net, list_nets, register_net
from semidiff.nets.blocks import (
    BulkRandomDropout,
    SegmentationNet,
    bulk_random_dropout,
    crop_to,
    pad_to_multiple,
)

# Small widths keep the tests fast; the structure (levels, blocks) is the full one.
SMALL: dict[str, dict[str, Any]] = {
    "vnet": {"n_filters": 4},
    "unet2d": {"features": (4, 8, 8, 16, 16)},
    "unet3d": {"features": (4, 8, 8, 16, 16)},
}
DROPOUT_ON: dict[str, dict[str, Any]] = {
    "vnet": {"has_dropout": True},
    "unet2d": {},  # dropout is on by default, as in SSL4MIS
    "unet3d": {"dropout": 0.3},
}
ODD_SHAPES: dict[str, tuple[int, ...]] = {
    "vnet": (20, 18, 12),
    "unet2d": (30, 42),
    "unet3d": (17, 20, 9),
}
ODD_SHAPE_BY_DIMS = {2: (30, 42), 3: (20, 18, 12)}  # a network not named above


def segmentation_nets() -> list[str]:
    """The registered plain segmenters (image -> logits, ``SegmentationNet``); ProtoDiff's networks
    also take a label latent and have their own tests."""
    return [n for n in list_nets() if isinstance(create_net(n, 1, 2, **SMALL.get(n, {})), SegmentationNet)]


def _odd_shape(name: str, net: nn.Module) -> tuple[int, ...]:
    return ODD_SHAPES.get(name) or ODD_SHAPE_BY_DIMS[net.spatial_dims]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_every_expected_net_is_registered() -> None:
    assert {"vnet", "unet2d", "unet3d"} <= set(list_nets())
    assert set(segmentation_nets()) >= {"vnet", "unet2d", "unet3d"}
    assert list_nets() == sorted(list_nets())


@pytest.mark.parametrize("name", segmentation_nets())
def test_shapes_features_and_attributes(name: str) -> None:
    net = create_net(name, 1, 3, **SMALL.get(name, {}))
    spatial = _odd_shape(name, net)
    assert net.spatial_dims == len(spatial)
    x = torch.randn(2, 1, *spatial)
    logits = net(x)
    assert logits.shape == (2, 3, *spatial)
    logits2, feats = net(x, return_features=True)
    assert logits2.shape == logits.shape
    assert feats.shape == (2, net.feature_channels, *spatial)
    assert torch.isfinite(logits).all() and torch.isfinite(feats).all()


@pytest.mark.parametrize("name", segmentation_nets())
def test_features_are_the_classifier_input(name: str) -> None:
    net = create_net(name, 1, 2, **SMALL.get(name, {})).eval()
    x = torch.randn(1, 1, *(16,) * net.spatial_dims)
    with torch.no_grad():
        logits, feats = net(x, return_features=True)
        torch.testing.assert_close(net.classifier(feats), logits)


@pytest.mark.parametrize("name", segmentation_nets())
def test_gradients_reach_every_parameter(name: str) -> None:
    net = create_net(name, 2, 2, **SMALL.get(name, {}))
    x = torch.randn(2, 2, *(16,) * net.spatial_dims)
    logits, feats = net(x, return_features=True)
    (logits.square().mean() + feats.mean()).backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), pname
        # Biases right before a BatchNorm have an (almost) zero gradient by construction.
        if p.ndim > 1:
            assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


@pytest.mark.parametrize("name", sorted(DROPOUT_ON))  # how to turn dropout on is per network
def test_dropout_is_stochastic_in_train_and_off_in_eval(name: str) -> None:
    net = create_net(name, 1, 2, **SMALL[name], **DROPOUT_ON[name])
    x = torch.randn(2, 1, *(16,) * net.spatial_dims)
    net.train()
    with torch.no_grad():
        assert not torch.allclose(net(x), net(x))
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5])
def test_bulk_random_dropout_keeps_the_rate_and_the_mean_and_follows_the_seed(p: float) -> None:
    # 16-bit uniforms, four per 64-bit draw (the CPU dropout of the nets: BulkRandomDropout).
    x = torch.ones(8, 16, 64, 64).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.manual_seed(0)
    out = bulk_random_dropout(x, p)
    kept = out != 0
    rate = round(p * 65536) / 65536
    n = x.numel()
    assert abs(1 - kept.float().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5  # the Bernoulli rate
    assert torch.equal(out[kept], torch.full_like(out[kept], 1 / (1 - rate)))  # scaled to keep the mean
    assert out.is_contiguous(memory_format=torch.channels_last)
    # Kept-or-dropped is not shared by the four elements that one 64-bit draw decides.
    flat = kept.permute(0, 2, 3, 1).reshape(-1, 4).float()
    pair = (flat[:, 0] * flat[:, 1]).mean().item()
    assert abs(pair - (1 - p) ** 2) < 5 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / len(flat)) ** 0.5
    out.sum().backward()
    torch.testing.assert_close(x.grad, out.detach())  # d out / d x is the mask times the scale
    torch.manual_seed(0)
    assert torch.equal(bulk_random_dropout(x, p), out)  # torch's generator: seeded, repeatable
    assert not torch.equal(bulk_random_dropout(x, p), out)


def test_the_unet_dropout_is_bulk_random_on_cpu_and_plain_in_eval() -> None:
    net = create_net("unet2d", 1, 2, features=(4, 8, 8, 16, 16))
    layers = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    assert layers and all(isinstance(m, BulkRandomDropout) for m in layers)
    x = torch.randn(2, 4, 16, 16)
    layers[0].eval()
    assert torch.equal(layers[0](x), x)


def test_dropout_can_be_turned_off() -> None:
    vnet = create_net("vnet", 1, 2, n_filters=4)
    unet = create_net("unet2d", 1, 2, features=(4, 8, 8, 16, 16), dropout=0.0)
    for net, x in ((vnet, torch.randn(2, 1, 16, 16, 16)), (unet, torch.randn(2, 1, 16, 16))):
        assert not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in net.modules())
        net.train()
        with torch.no_grad():
            torch.testing.assert_close(net(x), net(x))


def test_vnet_default_size_and_reduced_la_patch() -> None:
    net = create_net("vnet", 1, 2)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"V-Net 16 parameters (1 -> 2 channels): {n_params}")
    assert abs(n_params - 9.44e6) / 9.44e6 < 0.10
    assert net.feature_channels == 16
    net.eval()
    with torch.no_grad():
        logits, feats = net(torch.randn(1, 1, 56, 56, 40), return_features=True)
    assert logits.shape == (1, 2, 56, 56, 40)
    assert feats.shape == (1, 16, 56, 56, 40)


def test_vnet_structure_matches_literature() -> None:
    net = create_net("vnet", 1, 2)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d) and m.kernel_size == (3, 3, 3)]
    # 1+2+3+3+3 encoder layers and 3+3+2+1 decoder layers.
    assert len(convs) == 21
    downs = [m for m in net.modules() if isinstance(m, nn.Conv3d) and m.stride == (2, 2, 2)]
    ups = [m for m in net.modules() if isinstance(m, nn.ConvTranspose3d)]
    assert [m.out_channels for m in downs] == [32, 64, 128, 256]
    assert [m.out_channels for m in ups] == [128, 64, 32, 16]


@pytest.mark.parametrize("norm", ["instancenorm", "groupnorm", "none"])
def test_vnet_normalizations(norm: str) -> None:
    net = create_net("vnet", 1, 2, n_filters=4, normalization=norm)
    # 32 so the bottleneck keeps more than one voxel (instance norm needs that in training).
    assert net(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)


def test_unet2d_transposed_conv_variant() -> None:
    net = create_net("unet2d", 1, 2, features=(4, 8, 8, 16, 16), bilinear=False)
    assert any(isinstance(m, nn.ConvTranspose2d) for m in net.modules())
    assert net(torch.randn(1, 1, 20, 24)).shape == (1, 2, 20, 24)


def test_transform_skips_hook_is_used() -> None:
    class ZeroBottleneck(nets.UNet2D):
        calls = 0

        def transform_skips(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
            type(self).calls += 1
            assert len(skips) == 5
            assert skips[0].shape[-2:] == (32, 32) and skips[-1].shape[-2:] == (2, 2)
            return [*skips[:-1], torch.zeros_like(skips[-1])]

    torch.manual_seed(0)
    base = nets.UNet2D(1, 2, features=(4, 8, 8, 16, 16), dropout=0.0).eval()
    torch.manual_seed(0)
    hooked = ZeroBottleneck(1, 2, features=(4, 8, 8, 16, 16), dropout=0.0).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(base(x), hooked(x))
    assert ZeroBottleneck.calls == 1


def test_unknown_name_is_a_config_error_listing_known_nets() -> None:
    with pytest.raises(ConfigError, match="'vnett'") as info:
        create_net("vnett", 1, 2)
    assert "vnet" in str(info.value).split("known")[1]


def test_unknown_option_is_a_config_error_naming_option_and_net() -> None:
    with pytest.raises(ConfigError, match="'n_filterz'") as info:
        create_net("vnet", 1, 2, n_filterz=8)
    assert "'vnet'" in str(info.value)


@pytest.mark.parametrize(
    ("name", "kwargs", "bad"),
    [
        ("vnet", {"normalization": "layernorm"}, "layernorm"),
        ("unet2d", {"features": (4, 8)}, "features"),
        ("unet3d", {"normalization": "foo"}, "foo"),
    ],
)
def test_bad_option_values_are_config_errors(name: str, kwargs: dict[str, Any], bad: str) -> None:
    with pytest.raises(ConfigError, match=bad):
        create_net(name, 1, 2, **kwargs)


def test_bad_channel_counts_and_inputs() -> None:
    with pytest.raises(ConfigError, match="in_channels"):
        create_net("vnet", 0, 2)
    net = create_net("unet2d", 1, 2, features=(4, 8, 8, 16, 16))
    with pytest.raises(ValueError, match="expects input"):
        net(torch.randn(1, 2, 16, 16))
    with pytest.raises(ValueError, match="expects input"):
        net(torch.randn(1, 1, 16, 16, 16))


def test_register_net_adds_a_factory_and_rejects_clashes() -> None:
    from semidiff.nets import registry

    @register_net("_tiny_test_net")
    def tiny(in_channels: int, out_channels: int, *, width: int = 2) -> nn.Module:
        return nn.Conv2d(in_channels, out_channels, width)

    try:
        assert "_tiny_test_net" in list_nets()
        assert create_net("_tiny_test_net", 1, 2, width=3).kernel_size == (3, 3)
        with pytest.raises(ConfigError, match="'depth'"):
            create_net("_tiny_test_net", 1, 2, depth=3)
        with pytest.raises(ValueError, match="already registered"):
            register_net("_tiny_test_net")(lambda i, o: nn.Identity())
    finally:
        registry.NETS.unregister("_tiny_test_net")


def test_pad_and_crop_round_trip() -> None:
    x = torch.randn(1, 2, 5, 17, 32)
    padded = pad_to_multiple(x, 16)
    assert padded.shape == (1, 2, 16, 32, 32)
    assert torch.equal(crop_to(padded, x.shape[2:]), x)
    assert pad_to_multiple(padded, 16) is padded
