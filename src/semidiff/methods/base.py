"""The Method contract and its registry.

A method owns its networks and losses; it never reads files. The engine hands it one batch of
labeled items and (for semi-supervised methods) one batch of unlabeled items per step, and asks it
for class probabilities at evaluation time. Adding a method = one file here with a class decorated
by :func:`register_method`, one ``Options`` model for its config section, one test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from semidiff.errors import ConfigError


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
    #: whether the method consumes unlabeled items (the sampler then draws them).
    uses_unlabeled: ClassVar[bool] = False

    def __init__(self, net: NetSpec, options: MethodOptions) -> None:
        super().__init__()
        self.net_spec = net
        self.options = options

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

    @torch.no_grad()
    def predict(self, image: Tensor) -> Tensor:
        """Class probabilities (B, num_classes, *spatial) for images (B, C, *spatial)."""
        raise NotImplementedError


_METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator adding a method to the registry under ``name``."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


def list_methods() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"method.name: unknown method {name!r}; known: {', '.join(list_methods())}") from None


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
    cls = method_class(name)
    return cls(net, method_options(name, options))
