"""The batch augmentations methods share live in semidiff.data.transforms, numerics unchanged.

The expected values were computed on main at 13aad33, before the functions moved out of
``methods/protodiff.py`` and ``methods/common.py``; a change of RNG draws or arithmetic shows here.
"""

from __future__ import annotations

import pytest
import torch

from semidiff.data import transforms

# Seeded outputs on a (2, 1, 3, 4) image batch, rounded to 6 decimals (main at 13aad33).
X = [-1.12584, -1.15236, -0.250579, -0.433879, 0.84871, 0.692009, -0.316013, -2.115219, 0.468096, -0.157712,
     1.44366, 0.266049, 0.166455, 0.874382, -0.143474, -0.111609, 0.931827, 1.259009, 2.004981, 0.053737,
     0.618057, -0.412802, -0.841065, -2.316042]
JITTER = [-1.245273, -1.274526, -0.279814, -0.482004, 0.93276, 0.75991, -0.351991, -2.336611, 0.512922,
          -0.177378, 1.589021, 0.290054, 0.219208, 0.864642, -0.063362, -0.03431, 0.917016, 1.215316, 1.895436,
          0.11644, 0.630944, -0.308915, -0.699373, -2.044145]
BLUR = [-0.117708, -0.176462, -0.231868, -0.244585, 0.031617, -0.012999, -0.127089, -0.220688, 0.121941, 0.1284,
        0.055303, -0.052436, 0.299722, 0.406797, 0.279905, 0.065789, 0.392548, 0.472314, 0.255719, -0.052448,
        0.237649, 0.1756, -0.086751, -0.30451]
MASK = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
CUTMIX = [-1.12584, -1.15236, -0.250579, -0.433879, 0.84871, 0.692009, 2.004981, 0.053737, 0.468096, -0.157712,
          1.44366, 0.266049, 0.166455, 0.874382, -0.143474, -0.111609, 0.931827, 1.259009, -0.316013, -2.115219,
          0.618057, -0.412802, -0.841065, -2.316042]
NOISE = [-0.094142, 0.126325, -0.018377, 0.015051, 0.01075, -0.027803, -0.2, 0.062446, -0.071166, 0.043494,
         0.161982, 0.029887, -0.081197, 0.045443, 0.183285, -0.133677, 0.2, -0.117356, -0.03916, 0.143362, 0.2,
         -0.069608, -0.127684, -0.145798]


def _batch() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 1, 3, 4)


def _close(t: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(t.flatten(), torch.tensor(expected), atol=2e-6, rtol=0)


def test_moved_augmentations_give_the_recorded_values_for_a_fixed_seed():
    x = _batch()
    _close(x, X)
    torch.manual_seed(1)
    _close(transforms.intensity_jitter(x, 0.2, 0.1), JITTER)
    torch.manual_seed(2)
    _close(transforms.random_blur(x, 1.0, (0.5, 1.5)), BLUR)
    torch.manual_seed(3)
    mask = transforms.block_mask((3, 4), 0.5)
    _close(mask, MASK)
    _close(transforms.cutmix(x, mask), CUTMIX)
    torch.manual_seed(4)
    _close(transforms.input_noise(x, 0.1, 0.2), NOISE)


@pytest.mark.parametrize(("module", "names"), [
    ("semidiff.methods.protodiff", ("intensity_jitter", "random_blur", "cutmix", "block_mask")),
    ("semidiff.methods.diffcl", ("cutmix",)),
    ("semidiff.methods.common", ("block_mask", "mix", "input_noise", "intensity_jitter", "random_blur", "cutmix")),
])
def test_methods_use_the_one_shared_copy(module, names):
    """Old import paths still work and reach the shared function, not a second copy."""
    imported = __import__(module, fromlist=list(names))
    for name in names:
        assert getattr(imported, name) is getattr(transforms, name), f"{module}.{name} is a copy"


def test_blur_under_bf16_autocast_of_a_channels_last_rgb_batch_is_the_fp32_blur():
    # Training runs the strong view inside bf16 autocast with channels-last images; the blur runs in
    # fp32 on a contiguous copy (MONAI's grouped convolution of channels-last RGB in bf16 took
    # minutes per frame on the CPU) and returns the input's dtype.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 16)
    torch.manual_seed(5)
    reference = transforms.random_blur(x, 1.0, (0.5, 1.5))
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        blurred = transforms.random_blur(x.contiguous(memory_format=torch.channels_last), 1.0, (0.5, 1.5))
    assert blurred.dtype == torch.float32
    torch.testing.assert_close(blurred, reference, atol=1e-6, rtol=0)
