"""Errors that the command line turns into one clear message instead of a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
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


def exit_code(action: Callable[[], int]) -> int:
    """Run a command and give its exit code: what it returns; 2 for a user error, printed as one
    line; 130 when interrupted. ``semidiff`` and each bench cell report errors the same way."""
    try:
        return action()
    except SemidiffError as exc:
        print(f"semidiff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("semidiff: interrupted; continue with `semidiff train RUN_FOLDER`", file=sys.stderr)
        return 130
