"""Choosing the labeled subset of a training list, and holding out a validation part.

The literature's rule is "the first N" of the training list: the first N cases (LA, Pancreas,
BraTS) or all slices of the first N patients (ACDC: 1/3/7/14 patients = 32/68/136/256 slices).
Both work on :class:`~semidiff.data.record.CaseRef` lists and never split a group.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from semidiff.data.record import CaseRef
from semidiff.errors import ConfigError

__all__ = ["groups_in_order", "holdout", "select_labeled"]

_UNITS = ("cases", "patients", "videos", "fraction")
_RULES = ("first", "random")


def groups_in_order(refs: Sequence[CaseRef]) -> list[str]:
    """Distinct groups of ``refs`` in order of first appearance."""
    return list(dict.fromkeys(r.group for r in refs))


def _count(value: float, available: int, what: str, fraction: bool) -> int:
    """Turn a count or a fraction into a number of items, with the errors users need."""
    if isinstance(value, bool):
        raise ConfigError(f"labeled must be a number, got {value!r}")
    if fraction:
        if not 0.0 < float(value) <= 1.0:
            raise ConfigError(f"a labeled fraction must be in (0, 1], got {value!r}")
        n = round(float(value) * available)
    else:
        if float(value) != int(value):
            raise ConfigError(f"the number of labeled {what} must be a whole number, got {value!r}")
        n = int(value)
    if n < 1:
        raise ConfigError(
            f"empty labeled set: {value!r} gives {n} labeled {what} (of {available} available)"
        )
    if n > available:
        raise ConfigError(f"{n} labeled {what} asked for, but only {available} are available")
    return n


def _choose(items: Sequence[str], n: int, rule: str, seed: int) -> set[str]:
    """The first ``n`` items, or ``n`` items drawn with a seeded generator."""
    if rule == "first":
        return set(items[:n])
    picked = np.random.default_rng(seed).choice(len(items), size=n, replace=False)
    return {items[i] for i in picked}


def select_labeled(
    refs: list[CaseRef],
    labeled: float,
    unit: str = "cases",
    rule: str = "first",
    seed: int = 0,
) -> tuple[list[CaseRef], list[CaseRef]]:
    """Split a training list into labeled and unlabeled cases.

    Args:
        refs: the training list, in list order.
        labeled: how many: a number of cases (``unit="cases"``), a number of groups
            (``unit="patients"`` or ``"videos"``, the same rule named for the data), or a fraction of
            the groups in (0, 1] (``unit="fraction"``, rounded to the nearest whole number of groups).
        unit: ``"cases"``, ``"patients"``, ``"videos"`` or ``"fraction"``.
        rule: ``"first"`` (the literature's: the first N in list order) or ``"random"``
            (N drawn with ``seed``).
        seed: seed of the ``"random"`` rule.

    Returns:
        ``(labeled, unlabeled)``, both keeping the order of ``refs``. With ``"patients"``, ``"videos"``
        and ``"fraction"`` every ref of a chosen group is labeled.

    Raises:
        ConfigError: unknown unit or rule, an empty labeled set, or more than are available.
    """
    if unit not in _UNITS:
        raise ConfigError(f"unknown labeled unit {unit!r}; choose one of {list(_UNITS)}")
    if rule not in _RULES:
        raise ConfigError(f"unknown labeled rule {rule!r}; choose one of {list(_RULES)}")
    if not refs:
        raise ConfigError("empty labeled set: the training list has no cases")

    if unit == "cases":
        n = _count(labeled, len(refs), "cases", fraction=False)
        keys = [str(i) for i in range(len(refs))]
        chosen = _choose(keys, n, rule, seed)
        mask = [k in chosen for k in keys]
    else:
        groups = groups_in_order(refs)
        what = unit if unit in ("patients", "videos") else "groups"
        n = _count(labeled, len(groups), what, fraction=unit == "fraction")
        chosen = _choose(groups, n, rule, seed)
        mask = [r.group in chosen for r in refs]
    lab = [r for r, m in zip(refs, mask) if m]
    unl = [r for r, m in zip(refs, mask) if not m]
    return lab, unl


def holdout(
    refs: list[CaseRef], n_or_fraction: float, seed: int = 0
) -> tuple[list[CaseRef], list[CaseRef]]:
    """Hold out whole groups of a training list, e.g. as validation for LA or Pancreas.

    Args:
        refs: the list to split, in list order.
        n_or_fraction: an int is a number of groups; a float in (0, 1) a fraction of the
            groups (rounded, at least one).
        seed: the held-out groups are drawn with ``numpy.random.default_rng(seed)``.

    Returns:
        ``(train, held_out)``, both keeping the order of ``refs``; deterministic for a seed.

    Raises:
        ConfigError: nothing would be held out, or nothing would be left to train on.
    """
    groups = groups_in_order(refs)
    if isinstance(n_or_fraction, bool):
        raise ConfigError(f"holdout must be a number, got {n_or_fraction!r}")
    if isinstance(n_or_fraction, float):
        if not 0.0 < n_or_fraction < 1.0:
            raise ConfigError(f"a holdout fraction must be in (0, 1), got {n_or_fraction!r}")
        n = max(1, round(n_or_fraction * len(groups)))
    else:
        n = int(n_or_fraction)
    if n < 1:
        raise ConfigError(f"holdout of {n_or_fraction!r} holds out no group")
    if n >= len(groups):
        raise ConfigError(
            f"holdout of {n} groups leaves nothing to train on ({len(groups)} groups available)"
        )
    held = _choose(groups, n, "random", seed)
    train = [r for r in refs if r.group not in held]
    held_out = [r for r in refs if r.group in held]
    return train, held_out
