"""Intra-op CPU threads shared among the trainings running at once on one machine.

Oversubscribed threads made two side-by-side trainings on 2 cores 5x slower per step (1.9 s
against 0.38 s for one alone with 1 thread): each training takes its share of the cores instead.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import lightning as L
import torch

from semidiff.hardware import available_cores

__all__ = ["ThreadShare"]


def load_average() -> float | None:
    """The machine's 1-minute load average (runnable threads), or None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ThreadShare(L.Callback):
    """Gives each training on this machine an equal share of the cores, re-checked as others start or end.

    Every training registers its process id in a folder shared by the trainings of this machine
    (``$TMPDIR/semidiff-trainings``); at the start and every ``every`` steps it counts the live
    ones and sets its intra-op threads to ``cores // count`` (at least 1, at most the threads the
    process had when it registered: torch's default, ``OMP_NUM_THREADS`` or the caller's setting,
    restored when it unregisters). So two trainings started together each run on half the cores
    instead of fighting over all of them. With ``train.num_threads`` set, that count is kept and
    only a warning says when the machine is oversubscribed.

    Programs other than semidiff trainings are not in the registry. When the load average shows
    more busy threads than the cores and this machine's trainings account for, a warning says so
    (once); the thread count does not follow the load, so a run's numerics do not depend on what
    else happened to run (exact resume).

    Args:
        fixed: ``train.num_threads`` (None: share the cores).
        every: steps between checks.
        folder: the registry folder (tests pass their own).
        log: where the changes are reported.
        loader_workers: ``data.num_workers``: processes of each training that also keep a core busy.
    """

    def __init__(self, fixed: int | None = None, every: int = 20, folder: str | Path | None = None, log=print,
                 loader_workers: int = 0):
        self.fixed = fixed
        self.loader_workers = loader_workers
        self.every = max(1, int(every))
        self.folder = Path(folder) if folder else Path(tempfile.gettempdir()) / "semidiff-trainings"
        # Not ``self.log``: Lightning overwrites every callback's ``log`` with the module's metric logger.
        self.report = log
        self.entry: Path | None = None
        self.threads: int | None = None
        self.cap = torch.get_num_threads()
        self._warned = False
        self._warned_load = False

    def register(self) -> None:
        self.cap = torch.get_num_threads()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.entry = self.folder / str(os.getpid())
        self.entry.touch()

    def unregister(self) -> None:
        if self.entry is not None:
            self.entry.unlink(missing_ok=True)
            self.entry = None
            torch.set_num_threads(self.cap)
            self.threads = None

    def live_trainings(self) -> int:
        """Trainings registered and still running (entries of dead processes are removed)."""
        count = 0
        for entry in self.folder.glob("*"):
            if entry.name.isdigit() and _alive(int(entry.name)):
                count += 1
            else:
                entry.unlink(missing_ok=True)
        return max(1, count)

    def update(self) -> int:
        """Set this process's threads for the trainings running now; returns the count set."""
        cores, running = available_cores(), self.live_trainings()
        if self.fixed is not None:
            threads = self.fixed
            if threads * running > cores and not self._warned:
                self._warned = True
                warnings.warn(f"train.num_threads={threads} with {running} trainings running on {cores} cores: "
                              "more threads than cores are busy, which slows every training down several times; "
                              "leave train.num_threads unset to share the cores", stacklevel=2)
        else:
            threads = max(1, min(self.cap, cores // running))
        self._check_load(cores, running * (threads + self.loader_workers))
        if threads != self.threads:
            torch.set_num_threads(threads)
            if self.threads is not None or running > 1:
                self.report(f"{running} training(s) on {cores} cores: {threads} thread(s) for this one")
            self.threads = threads
        return threads

    def _check_load(self, cores: int, ours: int) -> None:
        """Warn once when the load average exceeds the cores by more than this machine's trainings explain.

        A margin of one thread: the load average is an average over the last minute, and a training
        that has just started, or the loader's worker, adds a fraction of one.
        """
        load = load_average()
        if self._warned_load or load is None or load <= max(cores, ours) + 1.0:
            return
        self._warned_load = True
        warnings.warn(f"the machine's load average is {load:.1f} on {cores} cores, more than the {ours} thread(s) "
                      "of the semidiff trainings running here: another program is using the CPU, so every "
                      "training runs slower (several times, when threads outnumber cores); the thread count "
                      "is left as it is so that results stay reproducible", stacklevel=2)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self.update()
