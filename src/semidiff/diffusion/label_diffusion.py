"""Label diffusion: the forward process on label maps and deterministic DDIM sampling.

One module serves both diffusion methods of the project (docs/methods.md):

* **DS of Diff-CL** diffuses labels in label space: ``y0 = 2 * onehot - 1`` (times ``scale``),
  linear betas, and samples with DDIM where each step's x0 estimate is ``2 * softmax - 1``.
* **ProtoDiff** diffuses a learned label *latent* ``z0`` (``D`` channels, maybe a lower
  resolution) with a cosine schedule; at each step the predicted class map is re-embedded in the
  latent (``x0_transform``) and the output is the mean softmax over steps (``average="mean"``).

The noise schedule and the DDIM update come from MONAI's schedulers
(``monai.networks.schedulers``); this module only wires them to label maps. Two things about
MONAI's ``DDIMScheduler`` (1.6) shape the code below:

1. ``set_timesteps(S)`` picks ``round(linspace(T - 1 - steps_offset, 0, S)) + steps_offset`` but
   ``step(t)`` always jumps to ``t - T // S``. With the default ``steps_offset=0`` the two
   disagree (T=1000, S=3: the grid is 999, 500, 0 while step jumps 999 -> 666 and 500 -> 167),
   so the denoiser would be told a timestep that is not the noise level of its input. Choosing
   ``steps_offset = T - 1 - (T // S) * (S - 1)`` makes the grid ``T-1, T-1-k, ...`` with stride
   exactly ``k = T // S``, so every step lands on the next grid point: exact DDIM, starting at
   ``T - 1`` (pure noise, matching ``y_T ~ N(0, I)``). When ``S`` divides ``T`` the last step
   lands on ``alpha_bar = 1`` (clean); otherwise it lands on ``t = T mod S - 1`` and the lowest
   timestep the denoiser sees is ``k + T mod S - 1`` instead of ``k - 1`` (T=1000: S=3 lands on
   t=0, S=7 on t=5, S=48 on t=39; S > T/2 not dividing T covers only ``t >= T - S``). The
   returned probabilities come from the x0 logits, so this matters little for an x0 predictor;
   pick ``S`` dividing ``T`` when the chain must end exactly clean.
2. ``step`` indexes its ``alphas_cumprod`` without moving it to the sample's device, and
   ``add_noise`` permanently casts it to the sample's dtype. Both are handled here: the sampling
   scheduler's tables are moved to the device once per call and the chain runs in float32
   (in float16 ``alpha_bar_0 = 0.9999`` rounds to 1 and the ``sample`` parameterisation divides by
   ``sqrt(1 - alpha_bar_t) = 0``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler, NoiseSchedules
from torch import Tensor
from torch.profiler import record_function

from semidiff import profiling
from semidiff.errors import ConfigError

__all__ = ["AVERAGES", "LabelDiffusion", "list_schedules"]

#: How ``ddim_sample`` turns the per-step logits into the output probabilities.
AVERAGES = ("last", "mean")

DenoiseFn = Callable[[Tensor, Tensor], Tensor]


def list_schedules() -> tuple[str, ...]:
    """Names of the noise schedules MONAI knows (``NoiseSchedules``), custom ones included.

    MONAI 1.6 registers ``linear_beta``, ``scaled_linear_beta``, ``sigmoid_beta`` and ``cosine``
    (Nichol & Dhariwal 2021, ``s = 0.008``, betas clipped at 0.999); schedules registered later
    with ``NoiseSchedules.add_def`` are accepted too.
    """
    return tuple(NoiseSchedules.names)


def _positive_int(name: str, value: object, minimum: int) -> int:
    # bool is an int subclass; True as a step count is a config mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return value


def _draw_on(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Device to draw random numbers on: the generator's own, so a CPU generator can seed a GPU run."""
    return generator.device if generator is not None else device


class LabelDiffusion:
    """Forward process and deterministic DDIM sampling for label maps, 2D or 3D.

    Label maps are encoded as ``y0 = scale * (2 * onehot - 1)`` (values in ``{-scale, +scale}``)
    and noised as ``y_t = sqrt(abar_t) * y0 + sqrt(1 - abar_t) * eps``. The denoiser predicts the
    clean label as ``C`` logits (MONAI's ``prediction_type="sample"``).

    Example (Diff-CL's DS)::

        diff = LabelDiffusion(num_classes=2)
        t = diff.sample_timesteps(batch, device)
        y_t, _ = diff.q_sample(diff.encode(label), t)
        loss = seg_loss(ds_net(x, y_t, t), label)
        probs = diff.ddim_sample(lambda y, t: ds_net(x, y, t), (B, 2, H, W, D), steps=10)

    Args:
        num_classes: Number of classes ``C``, background included (>= 2).
        num_train_timesteps: Number of diffusion steps ``T`` used in training.
        schedule: Name of a MONAI noise schedule (see :func:`list_schedules`): ``"linear_beta"``
            (Diff-CL), ``"scaled_linear_beta"``, ``"sigmoid_beta"`` or ``"cosine"`` (ProtoDiff).
        beta_start: First beta of the beta schedules; ignored by ``"cosine"``.
        beta_end: Last beta of the beta schedules; ignored by ``"cosine"``.
        scale: Scale ``s`` of the encoded labels (``y0`` in ``{-s, +s}``); 1 in label space.

    Raises:
        ConfigError: An argument is out of range or the schedule is unknown; the message names
            the parameter.
    """

    def __init__(
        self,
        num_classes: int,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        scale: float = 1.0,
    ) -> None:
        self.num_classes = _positive_int("num_classes", num_classes, 2)
        self.num_train_timesteps = _positive_int("num_train_timesteps", num_train_timesteps, 2)
        if schedule not in NoiseSchedules.names:
            raise ConfigError(f"schedule: unknown value {schedule!r} (choose one of {', '.join(list_schedules())})")
        self.schedule = schedule
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0):
            raise ConfigError(f"scale: must be a positive number, got {scale!r}")
        self.scale = float(scale)

        # Pass beta_start/beta_end only to schedules that take them: "cosine" has no such
        # arguments and MONAI would raise a TypeError.
        params = inspect.signature(NoiseSchedules[schedule]).parameters
        self._schedule_args: dict[str, float] = {}
        if "beta_start" in params or "beta_end" in params:
            if not 0.0 < beta_start < beta_end < 1.0:
                raise ConfigError(
                    f"beta_start, beta_end: need 0 < beta_start < beta_end < 1, got {beta_start!r}, {beta_end!r}"
                )
            self._schedule_args = {"beta_start": float(beta_start), "beta_end": float(beta_end)}
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)

        # The forward-process scheduler (add_noise only). add_noise moves its table to the
        # samples' device, so a float32 CPU copy is kept for reporting.
        self.scheduler = self._make_scheduler(steps_offset=0)
        self._alphas_cumprod = self.scheduler.alphas_cumprod.detach().to("cpu", torch.float32).clone()
        self._samplers: dict[int, DDIMScheduler] = {}

    # ---- schedule ------------------------------------------------------------------------------
    def _make_scheduler(self, steps_offset: int) -> DDIMScheduler:
        # clip_sample=False: MONAI clamps x0 to [-1, 1] by default, which would cut labels encoded
        # with scale > 1 and latents of any range; our x0 estimates are bounded already.
        return DDIMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            schedule=self.schedule,
            clip_sample=False,
            set_alpha_to_one=True,
            steps_offset=steps_offset,
            prediction_type="sample",
            **self._schedule_args,
        )

    @property
    def alphas_cumprod(self) -> Tensor:
        """``abar_t`` for ``t = 0 .. T-1`` (float32, CPU), as MONAI's scheduler computed it."""
        return self._alphas_cumprod.clone()

    def _check_steps(self, steps: object) -> int:
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.num_train_timesteps:
            raise ConfigError(f"steps: must be an integer between 1 and {self.num_train_timesteps}, got {steps!r}")
        return steps

    def _sampler(self, steps: int) -> DDIMScheduler:
        """A DDIM scheduler whose timestep grid matches the stride of its ``step`` (module docstring)."""
        if steps not in self._samplers:
            stride = self.num_train_timesteps // steps
            sched = self._make_scheduler(steps_offset=self.num_train_timesteps - 1 - stride * (steps - 1))
            sched.set_timesteps(steps)
            self._samplers[steps] = sched
        return self._samplers[steps]

    def sampling_timesteps(self, steps: int) -> Tensor:
        """The timesteps ``ddim_sample`` evaluates the denoiser at, in order (long, CPU).

        ``T-1, T-1-k, ..., T-1-k(S-1)`` with ``k = T // S``, e.g. 999, 899, ..., 99 for ``T=1000,
        S=10`` and 999, 499 for ``S=2``: MONAI's ``step`` jumps by exactly ``k``, so each step
        lands on the next of these timesteps and the last on ``T-1-kS`` (``-1``, i.e. clean, when
        ``S`` divides ``T``).

        Args:
            steps: Number of DDIM steps ``S`` (1 to ``T``).
        """
        return self._sampler(self._check_steps(steps)).timesteps.detach().to("cpu").clone()

    # ---- encoding ------------------------------------------------------------------------------
    def encode(self, label: Tensor) -> Tensor:
        """Label map to the diffused variable ``y0 = scale * (2 * onehot - 1)``.

        Args:
            label: Integer class map, ``(B, 1, *spatial)`` or ``(B, *spatial)``. A tensor of 4 or
                more dimensions whose axis 1 has size 1 is read as having the channel axis (so a
                channel-less 3D map with a first spatial size of 1 is ambiguous: add the channel).
                Float maps holding whole numbers are accepted.

        Returns:
            ``(B, C, *spatial)`` float32 tensor with ``+scale`` in channel ``c`` exactly where
            ``label == c`` and ``-scale`` elsewhere.

        Raises:
            ValueError: A label value is outside ``[0, num_classes)``.
        """
        if label.ndim >= 4 and label.shape[1] == 1:
            label = label[:, 0]
        label = label.long()
        if label.numel() and (int(label.min()) < 0 or int(label.max()) >= self.num_classes):
            raise ValueError(
                f"label values must be in [0, {self.num_classes}), got [{int(label.min())}, {int(label.max())}]"
            )
        onehot = F.one_hot(label, self.num_classes).movedim(-1, 1).to(torch.float32)
        return self.scale * (2.0 * onehot - 1.0)

    def encode_probs(self, probs: Tensor) -> Tensor:
        """Class probabilities to the label space: ``scale * (2 * probs - 1)``.

        This is the x0 estimate of each DDIM step ("the logits become ``2 * softmax - 1``"); on a
        one-hot map it equals :meth:`encode`.

        Args:
            probs: ``(B, C, *spatial)`` probabilities (or any soft one-hot).

        Returns:
            Tensor of the same shape and dtype, values in ``[-scale, scale]``.
        """
        if probs.ndim < 3 or probs.shape[1] != self.num_classes:
            raise ValueError(f"probs must be (B, {self.num_classes}, *spatial), got {tuple(probs.shape)}")
        return self.scale * (2.0 * probs - 1.0)

    # ---- forward process -----------------------------------------------------------------------
    def sample_timesteps(
        self,
        batch: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        final_share: float = 0.0,
    ) -> Tensor:
        """Training timesteps, uniform over ``{0, ..., T-1}``, or ``T - 1`` for a share of them.

        At ``t = T - 1`` the noisy label is almost pure noise, so the network must predict from the
        image alone: the regime DDIM sampling starts in. Under uniform ``t`` a denoiser can meet
        most of its loss by copying the still-visible label, and its samples are then no better
        than its rarely trained image-only guess (``benchmarks/label_reliance.py`` measures this).

        Args:
            batch: Number of timesteps (one per sample).
            device: Device of the result (default CPU).
            generator: Optional RNG; drawn on its own device, then moved, so a CPU generator works
                for a GPU batch.
            final_share: Probability that a sample's timestep is ``T - 1`` instead of uniform
                (0: uniform, the papers' setting).

        Returns:
            ``(batch,)`` long tensor.
        """
        device = torch.device(device if device is not None else "cpu")
        draw_on = _draw_on(generator, device)
        t = torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=draw_on)
        if final_share > 0:
            final = torch.rand(batch, generator=generator, device=draw_on) < final_share
            t = torch.where(final, self.num_train_timesteps - 1, t)
        return t.to(device)

    def q_sample(self, y0: Tensor, t: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise clean labels to timestep ``t``: ``sqrt(abar_t) y0 + sqrt(1 - abar_t) eps``.

        Uses MONAI's ``add_noise``. Computed in float32 (see the module docstring) and returned
        in ``y0``'s dtype.

        Args:
            y0: ``(B, ch, *spatial)`` clean variable (:meth:`encode` output, or a label latent).
            t: ``(B,)`` integer timesteps in ``[0, T)``.
            noise: Optional ``eps`` of ``y0``'s shape; standard normal when omitted.

        Returns:
            ``(y_t, noise)``.
        """
        if t.ndim != 1 or t.shape[0] != y0.shape[0]:
            raise ValueError(f"t must have shape ({y0.shape[0]},), got {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            raise ValueError(f"t must be in [0, {self.num_train_timesteps}), got [{int(t.min())}, {int(t.max())}]")
        if noise is None:
            noise = torch.randn_like(y0)
        elif noise.shape != y0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from y0 shape {tuple(y0.shape)}")
        y_t = self.scheduler.add_noise(y0.float(), noise.float(), t.long())
        return y_t.to(y0.dtype), noise

    # ---- reverse process -----------------------------------------------------------------------
    @torch.no_grad()
    @record_function(profiling.DDIM)
    def ddim_sample(
        self,
        denoise_fn: DenoiseFn,
        shape: tuple[int, ...],
        steps: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        return_all: bool = False,
        x0_transform: Callable[[Tensor], Tensor] | None = None,
        average: Literal["last", "mean"] = "last",
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Deterministic DDIM (eta 0) from ``y_T ~ N(0, I)``, returning class probabilities.

        At each of the ``steps`` timesteps (:meth:`sampling_timesteps`) the denoiser gives clean
        label logits; their x0 estimate ``encode_probs(softmax(logits))`` (or
        ``x0_transform(logits)``) goes to MONAI's ``DDIMScheduler.step`` (``prediction_type=
        "sample"``), which moves ``y`` to the next timestep. With a perfect x0 predictor the chain
        ends on ``encode(label)`` whatever the number of steps.

        **Latent use (ProtoDiff).** The sampled variable need not be the ``C``-channel label map:
        ``shape`` is the shape of the variable (e.g. a ``D``-channel label latent at 1/4
        resolution) and ``x0_transform`` maps the denoiser's logits (``C`` channels, any
        resolution, e.g. full) to that variable's x0 estimate, e.g. by re-embedding the predicted
        class map. The output probabilities are still the softmax of the logits.

        Args:
            denoise_fn: ``denoise_fn(y_t, t) -> logits``: ``y_t`` of ``shape`` (float32), ``t`` a
                ``(B,)`` long tensor on ``device``; logits ``(B, C, *spatial)``.
            shape: Shape of the sampled variable, ``(B, C, *spatial)`` or ``(B, D, *latent)``.
            steps: Number of DDIM steps ``S``, 1 to ``T`` (Diff-CL: 10 at test, 2-5 for
                pseudo-labels; ProtoDiff: 3).
            device: Device of the chain (default CPU).
            generator: Optional RNG for ``y_T``; the same seed gives the same output. Drawn on
                the generator's device, then moved.
            return_all: Also return the list of the ``S + 1`` states of the chain: ``y_T``, then
                ``y`` after each step (the last is the DDIM result).
            x0_transform: Optional ``logits -> x0 estimate`` of ``shape``; default
                ``encode_probs(softmax(logits))``.
            average: ``"last"``: softmax of the last step's logits; ``"mean"``: mean of the
                softmax over the steps (ProtoDiff).

        Returns:
            Probabilities ``(B, C, *spatial)`` (float32), or ``(probs, states)`` with
            ``return_all``.

        Raises:
            ConfigError: ``steps`` or ``average`` is invalid.
            ValueError: ``shape`` or the x0 estimate's shape is inconsistent.
        """
        steps = self._check_steps(steps)
        if average not in AVERAGES:
            raise ConfigError(f"average: unknown value {average!r} (choose one of {', '.join(AVERAGES)})")
        shape = tuple(int(s) for s in shape)
        if len(shape) < 3 or min(shape) < 1:
            raise ValueError(f"shape must be (B, channels, *spatial) with positive sizes, got {shape}")
        device = torch.device(device if device is not None else "cpu")

        sched = self._sampler(steps)
        # MONAI's step indexes these tables as they are: put them on the chain's device (float32).
        sched.alphas_cumprod = sched.alphas_cumprod.to(device=device, dtype=torch.float32)
        sched.final_alpha_cumprod = sched.final_alpha_cumprod.to(device=device, dtype=torch.float32)

        y = torch.randn(shape, generator=generator, device=_draw_on(generator, device), dtype=torch.float32)
        y = y.to(device)
        states = [y] if return_all else []
        probs_sum: Tensor | None = None
        probs: Tensor | None = None
        for t in sched.timesteps.tolist():
            t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
            logits = denoise_fn(y, t_batch).float()  # fp32 even when the net runs under autocast
            probs = torch.softmax(logits, dim=1)
            if average == "mean":
                probs_sum = probs if probs_sum is None else probs_sum + probs
            x0 = self.encode_probs(probs) if x0_transform is None else x0_transform(logits).float()
            if x0.shape != y.shape:
                raise ValueError(f"x0 estimate has shape {tuple(x0.shape)} but the sampled variable is {shape}")
            # Python int timestep: MONAI indexes alphas_cumprod with it and compares it with 0.
            y, _ = sched.step(x0, t, y)
            if return_all:
                states.append(y)
        assert probs is not None  # steps >= 1
        out = probs if average == "last" else probs_sum / steps  # type: ignore[operator]
        return (out, states) if return_all else out
