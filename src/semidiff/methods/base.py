"""The Method contract and its registry.

A method owns its networks and losses; it never reads files. The engine hands it one batch of
labeled items and (for semi-supervised methods) one batch of unlabeled items per step, and asks it
for class probabilities at evaluation time. Adding a method = one file here with a class decorated
by :func:`register_method`, one ``Options`` model for its config section, and a config under
``configs/``; the conformance suite (``tests/test_method_conformance.py``) checks every registered
method (docs/contributing.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from semidiff.config import format_validation_error
from semidiff.errors import ConfigError
from semidiff.noise import apply_noise, make_generator
from semidiff.registry import Registry

if TYPE_CHECKING:
    from semidiff.config import NoiseConfig


class MethodOptions(BaseModel):
    """Base of every method's typed ``method.options`` section (unknown keys rejected)."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Progress:
    """Where training stands, for ramp-ups and schedules."""

    step: int
    max_steps: int

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / max(1, self.max_steps))


@dataclass(frozen=True)
class NetSpec:
    """What a method needs to build its networks (from the ``model`` config section)."""

    name: str
    in_channels: int
    num_classes: int
    spatial_dims: int
    options: dict[str, Any]


class Method(nn.Module):
    """Base class of all training methods.

    Subclasses set ``Options`` and implement :meth:`training_step` and :meth:`predict`.
    """

    Options: ClassVar[type[MethodOptions]] = MethodOptions
    name: ClassVar[str] = ""
    #: whether the method consumes unlabeled items (the sampler then draws them). Such a method
    #: must pass every pseudo-label through :meth:`corrupt_pseudo` or :meth:`corrupt_soft_pseudo`.
    uses_unlabeled: ClassVar[bool] = False
    #: the networks ``model.net`` may name when the method builds its own (None: any registered
    #: segmentation network, built with :func:`semidiff.methods.common.build_net`).
    supported_nets: ClassVar[tuple[str, ...] | None] = None
    #: names of the outputs ``predict(image, output=NAME)`` can give (``semidiff eval --output``).
    #: A method with one output keeps ``("default",)`` and a plain ``predict(image)``.
    outputs: ClassVar[tuple[str, ...]] = ("default",)
    #: ``method.options`` that only change prediction, so ``semidiff eval`` may override them on a
    #: trained checkpoint (e.g. DDIM steps); every other option shaped the weights or the training.
    eval_options: ClassVar[tuple[str, ...]] = ()
    #: When :meth:`export_net` gives a network, for the message of ``semidiff export``: ``"always"``,
    #: a condition on the options (``"eval_model a or b"``), or None (never).
    exportable_when: ClassVar[str | None] = None
    #: Where the method's rows sit when a report orders a folder of runs: the labels-only reference
    #: first, the baselines in the order of methods.md, then the papers' methods, then new ones.
    table_rank: ClassVar[int] = 100

    def __init__(self, net: NetSpec, options: MethodOptions) -> None:
        super().__init__()
        self.net_spec = net
        self.options = options
        self.set_pseudo_noise(None)

    def training_step(
        self, labeled: dict[str, Tensor], unlabeled: dict[str, Tensor] | None, progress: Progress
    ) -> dict[str, Tensor]:
        """Return ``{"loss": total, <part>: value, ...}``; every entry is logged by name.

        Args:
            labeled: ``image`` (B, C, *spatial) float and ``label`` (B, 1, *spatial) int64.
            unlabeled: ``image`` only, or None when the method uses no unlabeled data.
            progress: the current step, for ramp-ups.
        """
        raise NotImplementedError

    def on_step_end(self, progress: Progress) -> None:
        """Called after the optimiser step (EMA teachers, memory banks)."""

    def on_validation(self, progress: Progress, mean_dice: float) -> None:
        """Called after each validation with the mean Dice over the validation cases (every
        process gets the same value); e.g. BCP keeps its best pre-trained student."""

    @torch.no_grad()
    def predict(self, image: Tensor) -> Tensor:
        """Class probabilities (B, num_classes, *spatial) for images (B, C, *spatial).

        A method with several :attr:`outputs` takes ``predict(image, output=None)`` instead.
        """
        raise NotImplementedError

    def override_eval_options(self, options: dict[str, Any]) -> None:
        """Apply prediction-time option changes to a trained method (``semidiff eval``).

        Raises:
            ConfigError: an option is not in :attr:`eval_options`, or a value is invalid.
        """
        current = self.options.model_dump()
        changed = sorted(k for k, v in options.items() if current.get(k, object()) != v)
        fixed = [k for k in changed if k not in self.eval_options]
        if fixed:
            allowed = ", ".join(self.eval_options) or "none"
            raise ConfigError(f"method.options.{fixed[0]} of {self.name!r} cannot change at evaluation: it shaped the "
                              f"trained weights or the training (options evaluation may change: {allowed})")
        if changed:
            try:
                self.options = type(self.options).model_validate({**current, **options})
            except ValidationError as exc:
                raise ConfigError(format_validation_error(exc, f"evaluation options of {self.name!r}",
                                                          prefix="method.options.")) from None

    def prediction_options(self, output: str) -> dict[str, Any]:
        """The prediction-time options that shaped ``output`` (written to ``protocol.json``)."""
        return {k: getattr(self.options, k) for k in self.eval_options}

    @property
    def default_output(self) -> str:
        """The name of what ``predict(image)`` returns (reported in the protocol header)."""
        return self.outputs[0]

    def predictor(self, output: str | None = None) -> Callable[[Tensor], Tensor]:
        """``image -> probabilities`` for the named output (None: the default one).

        Raises:
            ConfigError: ``output`` is not one of :attr:`outputs`.
        """
        if output is None or (self.outputs == ("default",) and output == "default"):
            return self.predict  # single-output methods keep their plain predict(image)
        if output not in self.outputs:
            raise ConfigError(f"method {self.name!r} has no output {output!r}; its outputs: {', '.join(self.outputs)}")
        return functools.partial(self.predict, output=output)

    def export_net(self) -> nn.Module | None:
        """The one network whose softmax :meth:`predict` returns, for ``semidiff export``.

        None (the default) when the prediction is not a single network's output (an ensemble,
        a diffusion sampler): such methods cannot be exported to TorchScript/ONNX.
        """
        return None

    def export_refusal(self) -> str:
        """Why :meth:`export_net` is None, for the error of ``semidiff export``."""
        return "its prediction combines several networks or sampling steps"

    # ---- noise-robustness benchmark (``noise.target: pseudo``) --------------------------------
    def set_pseudo_noise(self, spec: NoiseConfig | None) -> None:
        """Turn pseudo-label corruption on (a ``noise`` section with ``target: pseudo``) or off.

        The engine calls it once after building the method. Not part of the state dict: the
        setting comes from the config, which every checkpoint carries.
        """
        self._pseudo_noise = spec if spec is not None and spec.target == "pseudo" else None
        self.start_pseudo_noise_step(0)

    def start_pseudo_noise_step(self, step: int) -> None:
        """Key the pseudo-label noise of the coming training step (the engine calls it every step).

        The draws of :meth:`corrupt_pseudo` depend only on (``noise.seed``, this step, the call's
        order within the step): a resumed run corrupts exactly as an uninterrupted one, and no draw
        is taken from the global RNG that the method's own randomness uses.
        """
        self._pseudo_noise_step = int(step)
        self._pseudo_noise_calls = 0

    def _pseudo_noise_generator(self) -> torch.Generator:
        self._pseudo_noise_calls += 1
        mixed = (self._pseudo_noise.seed * 1_000_003 + self._pseudo_noise_step) * 1009 + self._pseudo_noise_calls
        return make_generator(mixed % (2**63))

    def corrupt_pseudo(self, labels: Tensor) -> Tensor:
        """Hard pseudo-labels as the noise benchmark corrupts them (identity when it is off).

        Call it on every hard pseudo-label map right where it is made, before it enters a loss.

        Args:
            labels: Integer class maps, (B, 1, *spatial) or (B, *spatial).

        Returns:
            The corrupted maps (same shape, dtype, device), or ``labels`` itself when off.
        """
        if self._pseudo_noise is None:
            return labels
        return apply_noise(self._pseudo_noise, labels, self.net_spec.num_classes, self.net_spec.spatial_dims,
                           self._pseudo_noise_generator())

    def corrupt_soft_pseudo(self, probs: Tensor) -> Tensor:
        """Soft targets (teacher probabilities) under the noise benchmark (identity when it is off).

        The argmax of ``probs`` is corrupted by :meth:`corrupt_pseudo`; at the pixels whose class it
        changed, the probabilities become the one-hot of the corrupted class, elsewhere they are
        kept. So a flip rate p wrongs a share p of the target pixels, as for hard pseudo-labels.

        Args:
            probs: (B, C, *spatial) class probabilities.
        """
        if self._pseudo_noise is None:
            return probs
        hard = probs.argmax(dim=1, keepdim=True)
        noisy = self.corrupt_pseudo(hard)
        onehot = torch.nn.functional.one_hot(noisy[:, 0], probs.shape[1]).movedim(-1, 1).to(probs.dtype)
        return torch.where(noisy != hard, onehot, probs)


def all_reduce_sum(*tensors: Tensor) -> None:
    """Sum tensors in place over all DDP processes (a no-op in a single process).

    For state a method accumulates from its own batch (prototype sums and counts, memory-bank
    statistics): call it on the per-step statistics before applying them in ``on_step_end``, so
    every rank applies the same update from the whole global batch and the state stays identical
    across ranks. Parameters need nothing: DDP keeps them in sync.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_gather_padded(rows: Tensor) -> Tensor:
    """The rows of every DDP process, concatenated in rank order (``rows`` itself in one process).

    For per-step entries whose count differs between ranks (memory-bank pushes): each rank pads
    its ``(N_rank, ...)`` tensor with zeros to the largest count, all-gathers, and drops the
    padding using the gathered counts. Every rank gets the same tensor, so applying it (a FIFO
    write) keeps the state identical everywhere and holds the entries of all ranks. Every rank
    must call it at the same point (it is a collective), with the same dtype and trailing shape.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return rows
    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], dtype=torch.long, device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    largest = max(sizes)
    if largest == 0:  # the same on every rank: no second collective needed
        return rows
    padded = rows.new_zeros((largest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)])


#: Every method, by the name configs give in ``method.name``; filled by :func:`register_method`.
METHODS: Registry[type[Method]] = Registry("method", config_key="method.name")


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator adding a method to :data:`METHODS` under ``name`` (and setting ``cls.name``).

    Raises:
        TypeError: the class is not a :class:`Method`, or its ``Options`` is not a
            :class:`MethodOptions`.
        ValueError: ``name`` is taken by another class.
    """

    def wrap(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register_method({name!r}) decorates a Method subclass, got {cls!r}")
        if not issubclass(cls.Options, MethodOptions):
            raise TypeError(f"method {name!r}: Options must derive from MethodOptions")
        METHODS.add(name, cls)
        cls.name = name
        return cls

    return wrap


def list_methods() -> list[str]:
    """The registered method names, sorted."""
    return METHODS.names()


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``.

    Raises:
        ConfigError: unknown name (the message lists the known ones).
    """
    return METHODS.lookup(name)


def method_options(name: str, options: dict[str, Any]) -> MethodOptions:
    """Validate ``method.options`` against the method's own schema."""
    cls = method_class(name)
    try:
        return cls.Options.model_validate(options)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            key = "method.options." + ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            parts.append(f"{key}: {msg}")
        raise ConfigError(f"invalid options for method {name!r}: " + "; ".join(parts)) from None


def create_method(name: str, net: NetSpec, options: dict[str, Any]) -> Method:
    """Build the method registered as ``name`` with validated ``options``."""
    cls = method_class(name)
    return cls(net, method_options(name, options))
