"""One registry style for everything chosen by name in a config: methods, dataset readers, networks.

A :class:`Registry` maps names to objects (method classes, reader factories, network factories).
Entries are added by decorating the object where it is defined, so the registry is the only list
of names: the command line, the configs, the exporter and the tests read it instead of repeating
names. It imports neither torch nor any registered module.

Example::

    THINGS: Registry[type[Thing]] = Registry("thing", config_key="thing.name")

    @THINGS.register("mine")
    class Mine(Thing): ...

    THINGS.lookup("mine")    # Mine
    THINGS.lookup("mien")    # ConfigError: thing.name: unknown thing 'mien'; known: mine
    THINGS.names()           # ["mine"]
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Generic, TypeVar

from semidiff.errors import ConfigError

__all__ = ["Registry", "import_submodules"]

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Name -> object, filled by a decorator, read by name with an error that lists the names.

    It is a read-only :class:`~collections.abc.Mapping` (``name in registry``, ``registry[name]``
    raising ``KeyError``, ``registry.get(name)`` giving None, iteration in registration order);
    :meth:`lookup` is the user-facing access whose error names the known entries.

    Args:
        kind: What an entry is, for messages (``"method"``, ``"dataset reader"``, ``"network"``).
        config_key: The config key that names an entry (``"method.name"``); prefixes errors so
            the user knows which line to change. None: no prefix.
    """

    def __init__(self, kind: str, config_key: str | None = None) -> None:
        self.kind = kind
        self.config_key = config_key
        self._entries: dict[str, T] = {}

    # ---- writing -------------------------------------------------------------------------------
    def register(self, name: str) -> Callable[[T], T]:
        """A decorator that adds the decorated object under ``name`` and returns it unchanged.

        Raises:
            ValueError: ``name`` is taken by a different object (a programming error). The same
                object registered again (a module reload: same module and qualified name) replaces
                the entry.
        """

        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        """Add ``obj`` under ``name`` (what :meth:`register` does; for objects built in code)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        existing = self._entries.get(name)
        if existing is not None and _qualname(existing) != _qualname(obj):
            raise ValueError(f"{self.kind} name {name!r} is already registered by {_qualname(existing)}")
        self._entries[name] = obj

    def unregister(self, name: str) -> None:
        """Remove ``name`` if present (tests that register a temporary entry clean up with it)."""
        self._entries.pop(name, None)

    # ---- reading -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def lookup(self, name: str) -> T:
        """The entry registered as ``name``.

        Raises:
            ConfigError: ``name`` is unknown; the message lists every known name.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable value from a config
            where = f"{self.config_key}: " if self.config_key else ""
            known = ", ".join(self.names()) or "(none registered)"
            raise ConfigError(f"{where}unknown {self.kind} {name!r}; known: {known}") from None

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


def import_submodules(package: str, path: Iterable[str]) -> None:
    """Import every module of a package (sorted by name), so each registers what it defines.

    A package's ``__init__`` calls it with its ``__name__`` and ``__path__``: a new method, reader or
    network is then one new file, with no import line to add anywhere.
    """
    for module in sorted(info.name for info in pkgutil.iter_modules(list(path))):
        importlib.import_module(f"{package}.{module}")


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
