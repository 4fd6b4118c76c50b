"""Errors that the command line turns into one clear message instead of a traceback."""

from __future__ import annotations

from pathlib import Path


class SemidiffError(Exception):
    """Base class of every error meant for the user (printed without a traceback by the CLI)."""


class DataError(SemidiffError):
    """A problem with one input file or dataset folder; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(SemidiffError):
    """A problem with a config file or a command-line override; the message names the key."""
