"""Tests of the label diffusion module (forward process, DDIM sampling on MONAI's schedulers)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from semidiff.diffusion import LabelDiffusion, list_schedules
from semidiff.errors import ConfigError

T = 50  # a short chain keeps steps == T cheap


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _labels(shape: tuple[int, ...], num_classes: int, seed: int = 0) -> Tensor:
    return torch.randint(0, num_classes, shape, generator=torch.Generator().manual_seed(seed))


def _perfect(label: Tensor, num_classes: int, calls: list[int] | None = None):
    """A denoiser that returns large logits of the true label whatever its input."""
    logits = 30.0 * F.one_hot(label, num_classes).movedim(-1, 1).float()

    def fn(y: Tensor, t: Tensor) -> Tensor:
        if calls is not None:
            assert torch.all(t == t[0])
            calls.append(int(t[0]))
        return logits

    return fn


def _input_dependent(num_classes: int, channels: int, seed: int = 0):
    """A denoiser whose logits depend on y_t (a fixed 1x1 channel mix) and on t."""
    weight = torch.randn(num_classes, channels, generator=torch.Generator().manual_seed(seed))

    def fn(y: Tensor, t: Tensor) -> Tensor:
        tt = t.float().view(-1, *([1] * (y.ndim - 1))) / T
        return torch.einsum("cd,bd...->bc...", weight, y) * (1.0 + tt) + 3.0 * tt

    return fn


# ---- schedule and forward process -------------------------------------------------------------
def test_schedule_names_include_cosine() -> None:
    assert {"linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"} <= set(list_schedules())


def test_linear_schedule_matches_closed_form() -> None:
    diff = LabelDiffusion(3, num_train_timesteps=T, beta_start=1e-4, beta_end=0.02)
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    expected = torch.cumprod(1.0 - betas, dim=0).float()
    torch.testing.assert_close(diff.alphas_cumprod, expected, rtol=1e-5, atol=1e-6)


def test_cosine_schedule_matches_nichol_dhariwal() -> None:
    diff = LabelDiffusion(2, num_train_timesteps=T, schedule="cosine")
    abar = diff.alphas_cumprod
    s = 8e-3

    def f(t: float) -> float:
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    # abar_t = f(t + 1) / f(0) (t indexes from 0); the very last beta is clipped at 0.999.
    expected = torch.tensor([f(t + 1) / f(0) for t in range(T - 1)], dtype=torch.float32)
    torch.testing.assert_close(abar[:-1], expected, rtol=1e-4, atol=1e-6)
    assert torch.all(abar[1:] < abar[:-1]) and abar[-1] < 1e-3


@pytest.mark.parametrize("spatial", [(4, 5), (3, 4, 5)])
@pytest.mark.parametrize("schedule", ["linear_beta", "cosine"])
def test_q_sample_equals_closed_form(spatial: tuple[int, ...], schedule: str) -> None:
    diff = LabelDiffusion(3, num_train_timesteps=T, schedule=schedule)
    y0 = diff.encode(_labels((3, *spatial), 3))
    t = torch.tensor([0, 17, T - 1])
    noise = torch.randn(y0.shape, generator=torch.Generator().manual_seed(1))
    y_t, eps = diff.q_sample(y0, t, noise)
    assert eps is noise
    abar = diff.alphas_cumprod[t].view(-1, *([1] * (y0.ndim - 1)))
    torch.testing.assert_close(y_t, abar.sqrt() * y0 + (1 - abar).sqrt() * noise)
    # Also against the scheduler's own table, and with drawn noise.
    torch.testing.assert_close(diff.scheduler.alphas_cumprod.cpu(), diff.alphas_cumprod)
    y_t2, eps2 = diff.q_sample(y0, t)
    torch.testing.assert_close(y_t2, abar.sqrt() * y0 + (1 - abar).sqrt() * eps2)
    assert not torch.equal(eps2, noise)


def test_q_sample_half_precision_keeps_the_table_float32() -> None:
    diff = LabelDiffusion(2, num_train_timesteps=T)
    y0 = diff.encode(_labels((2, 4, 4), 2))
    t = torch.tensor([0, T - 1])
    noise = torch.randn(y0.shape)
    y_half, _ = diff.q_sample(y0.half(), t, noise.half())
    y_full, _ = diff.q_sample(y0, t, noise)
    assert y_half.dtype == torch.float16
    torch.testing.assert_close(y_half.float(), y_full, atol=2e-3, rtol=2e-3)
    assert diff.alphas_cumprod.dtype == torch.float32
    assert diff.scheduler.alphas_cumprod.dtype == torch.float32


def test_q_sample_rejects_bad_timesteps() -> None:
    diff = LabelDiffusion(2, num_train_timesteps=T)
    y0 = diff.encode(_labels((2, 4, 4), 2))
    with pytest.raises(ValueError, match="t must be in"):
        diff.q_sample(y0, torch.tensor([0, T]))
    with pytest.raises(ValueError, match="t must have shape"):
        diff.q_sample(y0, torch.tensor([1]))


def test_sample_timesteps_uniform_range_and_seeded() -> None:
    diff = LabelDiffusion(2, num_train_timesteps=T)
    t1 = diff.sample_timesteps(2000, "cpu", torch.Generator().manual_seed(3))
    t2 = diff.sample_timesteps(2000, "cpu", torch.Generator().manual_seed(3))
    assert t1.shape == (2000,) and t1.dtype == torch.long
    assert torch.equal(t1, t2)
    assert int(t1.min()) == 0 and int(t1.max()) == T - 1
    # Roughly uniform: every bin of 10 timesteps holds about a fifth of the draws.
    counts = torch.bincount(t1 // 10, minlength=5).float() / 2000
    assert torch.all((counts - 0.2).abs() < 0.05)


def test_sample_timesteps_final_share_draws_pure_noise_for_that_share() -> None:
    diff = LabelDiffusion(2, num_train_timesteps=T)
    assert (diff.sample_timesteps(50, "cpu", final_share=1.0) == T - 1).all()
    t = diff.sample_timesteps(4000, "cpu", torch.Generator().manual_seed(1), final_share=0.5)
    assert torch.equal(t, diff.sample_timesteps(4000, "cpu", torch.Generator().manual_seed(1), final_share=0.5))
    # Half at T-1, plus the uniform half's own 1/T share of it (binomial std about 0.008).
    assert abs(float((t == T - 1).float().mean()) - (0.5 + 0.5 / T)) < 0.04
    rest = t[t != T - 1]
    assert int(rest.min()) == 0 and int(rest.max()) == T - 2  # the other half stays uniform
    # Share 0 is exactly the uniform draw: same RNG use, same timesteps.
    assert torch.equal(diff.sample_timesteps(64, "cpu", torch.Generator().manual_seed(2), final_share=0.0),
                       diff.sample_timesteps(64, "cpu", torch.Generator().manual_seed(2)))


# ---- encoding ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 1, 4, 5), (2, 4, 5), (2, 1, 3, 4, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("scale", [1.0, 0.01])
def test_encode_values_and_channels(shape: tuple[int, ...], scale: float) -> None:
    diff = LabelDiffusion(4, scale=scale)
    label = _labels(shape, 4)
    y0 = diff.encode(label)
    flat = label[:, 0] if len(shape) >= 4 and shape[1] == 1 else label
    assert y0.shape == (flat.shape[0], 4, *flat.shape[1:])
    assert y0.dtype == torch.float32
    s32 = torch.tensor(scale, dtype=torch.float32)  # compare in the tensor's precision
    assert torch.all(y0.abs() == s32)
    for c in range(4):
        assert torch.equal(y0[:, c] == s32, flat == c)
    # A one-hot map through encode_probs gives the same tensor.
    onehot = F.one_hot(flat, 4).movedim(-1, 1).float()
    torch.testing.assert_close(diff.encode_probs(onehot), y0)


def test_encode_rejects_out_of_range_labels() -> None:
    diff = LabelDiffusion(3)
    with pytest.raises(ValueError, match="label values"):
        diff.encode(torch.tensor([[[0, 3]]]))


def test_encode_probs() -> None:
    diff = LabelDiffusion(3, scale=2.0)
    probs = torch.softmax(torch.randn(2, 3, 4, 4), dim=1)
    torch.testing.assert_close(diff.encode_probs(probs), 2.0 * (2 * probs - 1))
    with pytest.raises(ValueError, match="probs must be"):
        diff.encode_probs(torch.rand(2, 4, 4, 4))


# ---- DDIM sampling ----------------------------------------------------------------------------
def test_ddim_is_deterministic_per_seed() -> None:
    diff = LabelDiffusion(3, num_train_timesteps=T)
    fn = _input_dependent(3, 3)
    shape = (2, 3, 6, 6)

    def run(seed: int) -> Tensor:
        return diff.ddim_sample(fn, shape, steps=4, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("steps", [T, 10, 5, 3, 1])
def test_perfect_predictor_lands_on_the_label(steps: int) -> None:
    diff = LabelDiffusion(3, num_train_timesteps=T)
    label = _labels((2, 5, 6), 3)
    y0 = diff.encode(label)
    calls: list[int] = []
    probs, states = diff.ddim_sample(
        _perfect(label, 3, calls), y0.shape, steps, generator=torch.Generator().manual_seed(0), return_all=True
    )
    assert torch.equal(probs.argmax(1), label)

    # The denoiser is told the grid T-1, T-1-k, ... with k = T // steps (MONAI's step stride).
    grid = diff.sampling_timesteps(steps).tolist()
    k = T // steps
    assert calls == grid == [T - 1 - k * i for i in range(steps)]

    # With an exact x0, DDIM keeps eps fixed: every state after a step lies exactly at the next
    # grid timestep, y = sqrt(abar) y0 + sqrt(1 - abar) eps (so MONAI's step lands on the grid).
    abar = diff.alphas_cumprod.double()
    eps = (states[0].double() - abar[T - 1].sqrt() * y0) / (1 - abar[T - 1]).sqrt()
    landing = grid[1:] + [grid[-1] - k]
    assert len(states) == steps + 1
    for state, t in zip(states[1:], landing):
        a = abar[t] if t >= 0 else torch.tensor(1.0, dtype=torch.float64)
        torch.testing.assert_close(state.double(), a.sqrt() * y0 + (1 - a).sqrt() * eps, atol=1e-4, rtol=1e-4)
    # The final y is encode(label): exactly when steps divides T, else at t = T mod steps - 1.
    atol = 1e-4 if T % steps == 0 else 0.2
    torch.testing.assert_close(states[-1], y0, atol=atol, rtol=0)


def test_perfect_predictor_cosine_3d() -> None:
    diff = LabelDiffusion(2, num_train_timesteps=T, schedule="cosine")
    label = _labels((1, 3, 4, 5), 2)
    probs, states = diff.ddim_sample(_perfect(label, 2), (1, 2, 3, 4, 5), steps=5, return_all=True)
    assert torch.equal(probs.argmax(1), label)
    torch.testing.assert_close(states[-1], diff.encode(label), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(2, 3, 6, 5), (1, 3, 4, 3, 5)])
def test_ddim_shapes_and_probabilities(shape: tuple[int, ...]) -> None:
    diff = LabelDiffusion(3, num_train_timesteps=T)
    probs, states = diff.ddim_sample(_input_dependent(3, 3), shape, steps=4, return_all=True)
    assert probs.shape == shape and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(shape[0], *shape[2:]))
    assert len(states) == 5 and all(s.shape == shape for s in states)


def test_average_mean_is_the_mean_of_step_softmaxes() -> None:
    diff = LabelDiffusion(3, num_train_timesteps=T)
    inner = _input_dependent(3, 3)
    seen: list[Tensor] = []

    def fn(y: Tensor, t: Tensor) -> Tensor:
        logits = inner(y, t)
        seen.append(torch.softmax(logits, dim=1))
        return logits

    shape = (2, 3, 4, 4)
    mean = diff.ddim_sample(fn, shape, steps=3, generator=torch.Generator().manual_seed(5), average="mean")
    assert len(seen) == 3
    torch.testing.assert_close(mean, torch.stack(seen).mean(0))
    assert not torch.allclose(seen[0], seen[-1])  # the test has teeth: the steps differ
    last = diff.ddim_sample(fn, shape, steps=3, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(last, seen[-1])


def test_latent_sampling_with_x0_transform() -> None:
    # ProtoDiff: a D-channel latent at half resolution, logits at full resolution.
    num_classes, dim, scale = 3, 5, 0.01
    diff = LabelDiffusion(num_classes, num_train_timesteps=T, schedule="cosine", scale=scale)
    table = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(2))
    mix = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(3))

    def denoise(z: Tensor, t: Tensor) -> Tensor:
        up = F.interpolate(z, scale_factor=2, mode="nearest")
        return torch.einsum("cd,bd...->bc...", mix, up) / scale

    def x0_transform(logits: Tensor) -> Tensor:
        cls = F.interpolate(logits, scale_factor=0.5, mode="nearest").argmax(1)
        return scale * (2 * torch.sigmoid(table[cls]) - 1).movedim(-1, 1)

    probs, states = diff.ddim_sample(
        denoise, (2, dim, 4, 4), steps=3, x0_transform=x0_transform, return_all=True, average="mean"
    )
    assert probs.shape == (2, num_classes, 8, 8)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 8, 8))
    assert all(s.shape == (2, dim, 4, 4) for s in states)
    with pytest.raises(ValueError, match="x0 estimate has shape"):
        diff.ddim_sample(denoise, (2, dim, 4, 4), steps=2, x0_transform=lambda logits: logits)


# ---- argument validation ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 2.5}, "num_classes"),
        ({"num_classes": 2, "num_train_timesteps": 0}, "num_train_timesteps"),
        ({"num_classes": 2, "schedule": "linear"}, "schedule"),
        ({"num_classes": 2, "beta_start": 0.02, "beta_end": 1e-4}, "beta_start"),
        ({"num_classes": 2, "scale": 0.0}, "scale"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        LabelDiffusion(**kwargs)


def test_cosine_ignores_beta_arguments() -> None:
    diff = LabelDiffusion(2, num_train_timesteps=T, schedule="cosine", beta_start=0.5, beta_end=0.1)
    assert diff.alphas_cumprod.shape == (T,)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"steps": 0}, "steps"), ({"steps": T + 1}, "steps"), ({"steps": True}, "steps"),
     ({"steps": 2, "average": "median"}, "average")],
)
def test_bad_sampling_arguments(kwargs: dict, name: str) -> None:
    diff = LabelDiffusion(2, num_train_timesteps=T)
    with pytest.raises(ConfigError, match=name):
        diff.ddim_sample(_input_dependent(2, 2), (1, 2, 4, 4), **kwargs)
    if name == "steps":
        with pytest.raises(ConfigError, match="steps"):
            diff.sampling_timesteps(kwargs["steps"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_with_a_cpu_generator() -> None:
    diff = LabelDiffusion(3, num_train_timesteps=T)
    label = _labels((2, 6, 6), 3)
    fn = _input_dependent(3, 3)

    def fn_cuda(y: Tensor, t: Tensor) -> Tensor:
        assert y.is_cuda and t.is_cuda
        return fn(y.cpu(), t.cpu()).cuda()

    cpu = diff.ddim_sample(fn, (2, 3, 6, 6), 5, generator=torch.Generator().manual_seed(0))
    gpu = diff.ddim_sample(fn_cuda, (2, 3, 6, 6), 5, device="cuda", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)
    y_t, _ = diff.q_sample(diff.encode(label).cuda(), torch.tensor([0, T - 1], device="cuda"))
    assert y_t.is_cuda
    # Sampling again on the CPU after the tables moved to the GPU still works.
    again = diff.ddim_sample(fn, (2, 3, 6, 6), 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, cpu)
