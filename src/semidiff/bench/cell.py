"""One bench cell's training, as ``semidiff train CONFIG OVERRIDES --resume`` would run it, through
:func:`semidiff.engine.train.train` directly.

``python -m semidiff.bench.cell CONFIG [key=value ...]`` is what the runner starts in a subprocess
(isolation ``subprocess``); isolation ``in_process`` calls :func:`train_cell` itself.
"""

from __future__ import annotations

import sys

from semidiff.errors import exit_code


def train_cell(config: str, overrides: list[str]) -> int:
    """Train or continue one cell; returns the exit code ``semidiff train`` would (0, 2 for a user
    error printed as one line, 130 when interrupted)."""
    from semidiff.config import load_config
    from semidiff.engine.train import check_method_options, train

    def run() -> int:
        cfg = load_config(config, overrides)
        check_method_options(cfg, config)
        # resume=True continues from last.ckpt when there is one and starts fresh otherwise.
        train(cfg, resume=True)
        return 0

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(train_cell(sys.argv[1], sys.argv[2:]))
