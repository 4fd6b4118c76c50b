"""Atomic checkpoint writes: a kill during a save never leaves a corrupt ``last.ckpt``.

Every checkpoint the engine writes (``last``, ``best``, ``final``) goes through Lightning's
``CheckpointIO`` plugin. :class:`AtomicCheckpointIO` serialises to a hidden temporary file in the
checkpoint's own folder (same file system, so the rename is atomic), flushes it to disk, and only
then renames it over the target with :func:`os.replace`. A reader therefore sees either the old
complete file or the new complete file, never a half-written one. The temporary name does not end
in ``.ckpt``, so an orphan left by SIGKILL is never mistaken for a checkpoint; the next save or
:func:`remove_stale_temporaries` removes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["TEMP_PREFIX", "AtomicCheckpointIO", "BestAndLastCheckpoint", "atomic_torch_save",
           "remove_stale_temporaries"]

#: Prefix of the temporary files (hidden, and never ending in ``.ckpt``).
TEMP_PREFIX = ".tmp-"


def _temporary_path(path: Path) -> Path:
    # The pid keeps two writers (e.g. a stale process and a resumed one) from sharing a file.
    return path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}.part")


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (the directory entry); best effort where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` through a temporary file and ``os.replace``.

    Args:
        obj: anything :func:`torch.save` accepts.
        path: the final file.

    Returns:
        ``path`` as a Path.

    Raises:
        OSError: the write or the rename failed; the temporary file is removed and ``path``
            is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave the partial file behind.
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files left in ``folder`` by a writer that was killed mid-save."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX) and p.name.endswith(".part")]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` whose saves are atomic (temporary file + ``os.replace``).

    Plug it in with ``L.Trainer(plugins=[AtomicCheckpointIO()])``; ``ModelCheckpoint`` and
    ``trainer.save_checkpoint`` then both write through it. Loading is Lightning's own.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        atomic_torch_save(checkpoint, path)


class BestAndLastCheckpoint(ModelCheckpoint):
    """``best.ckpt`` when the monitored validation score improves, ``last.ckpt`` after every validation.

    Lightning's ``ModelCheckpoint`` (2.6) writes ``last`` only at a validation that also wrote a
    top-k checkpoint, so once validation stopped improving ``last.ckpt`` stayed where the best was:
    an EndoScapes run of 2500 steps kept a ``last`` of step 1500, and a kill would have lost the
    1000 steps since (the promise is: at most the work since the last validation). Here ``last`` is
    written after every validation as well, on every rank alike (the save is collective).

    A SIGTERM (a scheduler's, a bench's, ``kill``) writes ``last`` too: Lightning finishes the step
    in progress, then stops every rank alike with ``SIGTERMException``, and that step is saved, so a
    stop loses nothing. Other exceptions save nothing (a failed step's state may be half updated).
    """

    _last_step_written = -1

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_step_written = trainer.global_step

    def _write_last_unless_written(self, trainer) -> None:
        """``last`` for the current step of a fit, unless it holds that step already."""
        if (self.save_last and self._last_step_written != trainer.global_step and not trainer.sanity_checking
                and trainer.state.fn == TrainerFn.FITTING and not trainer.fast_dev_run):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        self._write_last_unless_written(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._write_last_unless_written(trainer)
