"""A name -> factory registry for segmentation networks.

A network is added by decorating one factory function; everything else (configs, methods, the
command line) reaches it through :func:`create_net` by name, so nothing else has to change.

Example::

    @register_net("mynet")
    def mynet(in_channels: int, out_channels: int, *, width: int = 16) -> nn.Module:
        return MyNet(in_channels, out_channels, width)

    net = create_net("mynet", 1, 2, width=32)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from semidiff.errors import ConfigError

__all__ = ["NetFactory", "create_net", "list_nets", "register_net"]

NetFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, NetFactory] = {}

# Positional arguments every factory takes; they are not options a user can set by keyword.
_CHANNEL_ARGS = ("in_channels", "out_channels")


def register_net(name: str) -> Callable[[NetFactory], NetFactory]:
    """Register a network factory under ``name``.

    Args:
        name: The name used in configs and in :func:`create_net`.

    Returns:
        A decorator that records the factory and returns it unchanged.

    Raises:
        ValueError: If ``name`` is already taken by a different factory (a programming error).
    """

    def decorator(fn: NetFactory) -> NetFactory:
        existing = _REGISTRY.get(name)
        # Same qualified name = the module was re-imported (e.g. reload); that is not a clash.
        if existing is not None and _qualname(existing) != _qualname(fn):
            raise ValueError(f"network name {name!r} is already registered by {_qualname(existing)}")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_nets() -> list[str]:
    """Return the names of all registered networks, sorted."""
    return sorted(_REGISTRY)


def create_net(name: str, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    """Build a registered network.

    Args:
        name: A name from :func:`list_nets`.
        in_channels: Number of image channels.
        out_channels: Number of output channels (classes, background included).
        **kwargs: Network-specific options, checked against the factory's signature.

    Returns:
        The network, in train mode.

    Raises:
        ConfigError: If the name is unknown, an option is not accepted by that network, or the
            channel counts are not positive integers.
    """
    if name not in _REGISTRY:
        known = ", ".join(list_nets()) or "(none registered)"
        raise ConfigError(f"unknown network {name!r}; known networks: {known}")
    for arg, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"network {name!r}: {arg} must be a positive integer, got {value!r}")
    fn = _REGISTRY[name]
    accepted = _accepted_options(fn)
    if accepted is not None:
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            bad = ", ".join(repr(k) for k in unknown)
            ok = ", ".join(sorted(accepted)) or "(none)"
            raise ConfigError(f"network {name!r} got unknown option(s) {bad}; it accepts: {ok}")
    return fn(in_channels, out_channels, **kwargs)


def _accepted_options(fn: NetFactory) -> set[str] | None:
    """Keyword options of a factory, or None when it takes ``**kwargs`` (cannot be checked)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {
        p.name
        for p in params
        if p.name not in _CHANNEL_ARGS
        and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }


def _qualname(fn: NetFactory) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
