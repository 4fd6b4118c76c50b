"""The registry of segmentation networks (name -> factory), and building one by name.

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
from semidiff.registry import Registry

__all__ = ["NETS", "NetFactory", "create_net", "list_nets", "register_net"]

NetFactory = Callable[..., nn.Module]

#: Every network factory, by the name configs give in ``model.net``; filled by :func:`register_net`.
# No config key in errors: model.net, diffcl's ds_net and protodiff_unet's backbone all name networks.
NETS: Registry[NetFactory] = Registry("network")

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
    return NETS.register(name)


def list_nets() -> list[str]:
    """Return the names of all registered networks, sorted."""
    return NETS.names()


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
    fn = NETS.lookup(name)
    for arg, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"network {name!r}: {arg} must be a positive integer, got {value!r}")
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
