"""``semidiff bench``: train every unfinished cell of a grid, resumably, rebuilding the report after each.

Every cell is an ordinary training run (:func:`semidiff.bench.cell.train_cell`), started in a
subprocess by default so that a crash in one cell cannot take the grid down. Finished cells are
skipped and an interrupted cell continues from its ``last`` checkpoint; after every cell the report
(:func:`semidiff.report.build.write_report`) is rebuilt from what is on disk.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

from semidiff.bench.cell import train_cell
from semidiff.bench.records import save_record, sync_records
from semidiff.bench.spec import BenchSpec, Cell, cell_done, grid_cells, load_bench
from semidiff.report.build import write_report
from semidiff.report.collect import read_json, seconds_per_step

#: The cell trainings this process is waiting on, and whether it was asked to stop: ``kill BENCH_PID``
#: (SIGTERM) must stop the training it started too. A cell left running after its bench died kept a
#: core busy, and a second bench started on the same grid trained the same run folder beside it.
_cell_processes: set[subprocess.Popen] = set()
_stopping = threading.Event()


def _stop_cell_process(proc: subprocess.Popen, grace: float = 120.0) -> None:
    """SIGTERM a cell's training (Lightning stops it between steps), SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_cell(cell: Cell, bench_dir: Path, env: dict[str, str] | None = None, in_process: bool = False) -> int:
    """Train (or continue) one cell; its output goes to ``BENCH/logs/<cell>.log``; returns the exit code.

    In a subprocess (the default), the training stops with this process: on an exception here
    (Ctrl-C) and on SIGTERM to the bench (:func:`run_bench` forwards it).
    """
    log_dir = bench_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    args = [str(cell.config), *cell.train_overrides]
    cmd = [sys.executable, "-m", "semidiff.bench.cell", *args]
    with open(log_dir / f"{cell.name}.log", "a") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        if not in_process:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            _cell_processes.add(proc)
            try:
                return proc.wait()
            finally:
                _cell_processes.discard(proc)
                _stop_cell_process(proc)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            return train_cell(args[0], args[1:])


@contextlib.contextmanager
def _cells_stop_on_sigterm(subprocesses: bool):
    """While a bench runs, SIGTERM stops its cell trainings and starts no new cell.

    Cells trained in this process (``isolation: in_process``) keep SIGTERM's default action, which
    ends the process and its training at once; signal handlers exist in the main thread only.
    """
    if not subprocesses or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, _frame) -> None:
        _stopping.set()
        for proc in list(_cell_processes):
            proc.terminate()

    _stopping.clear()
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def time_left(pending: list[Cell], seconds: dict[str, list[float]]) -> str:
    """What is left of a grid, in hours, from the mean time of the finished cells of each method.

    A method has one cost whatever its labeled count or noise level (the same steps and batch), but
    methods differ 10-fold, so a method with no finished cell yet is counted apart, not guessed.
    """
    timed = [c for c in pending if seconds.get(c.method)]
    hours = sum(float(np.mean(seconds[c.method])) for c in timed) / 3600
    text = f"{len(pending)} cell(s) left"
    if timed:
        text += f", about {hours:.1f} h for {len(timed)} of them"
    if untimed := len(pending) - len(timed):
        methods = ", ".join(dict.fromkeys(c.method for c in pending if not seconds.get(c.method)))
        text += f" ({untimed} of methods not timed yet: {methods})"
    return text


def finished_seconds(cells: list[Cell], runs: Path) -> dict[str, list[float]]:
    """Training seconds of each method's finished cells (``timing.json``; evaluation adds seconds to a
    minute), records included, so the first estimate of what is left does not wait for a method's
    first cell of this invocation."""
    seconds: dict[str, list[float]] = {}
    for cell in cells:
        timing = read_json(runs / cell.name / "timing.json") or {}
        if cell_done(runs / cell.name) and (wall := timing.get("wall_seconds")):
            # every step, also those of a resumed run's pieces that kept no time (timed_steps)
            per_step = seconds_per_step(timing)
            seconds.setdefault(cell.method, []).append(float(per_step * timing["steps"] if per_step else wall))
    return seconds


def prepare_bench(config: str | Path, overrides: list[str] | None = None,
                  log: Callable[[str], None] = print) -> tuple[BenchSpec, Path, list[Cell], Path | None]:
    """Make a bench's folder and saved ``bench.yaml``, restore its records; returns the spec, the
    folder, the grid's cells and the records folder (None without one)."""
    spec, base = load_bench(config, overrides)
    bench_dir = Path(spec.output_dir) / spec.name
    if not Path(spec.output_dir).is_absolute():
        bench_dir = Path.cwd() / bench_dir
    bench_dir.mkdir(parents=True, exist_ok=True)
    records = (base / spec.records).resolve() if spec.records else None
    (bench_dir / "bench.yaml").write_text(yaml.safe_dump(
        {"bench": {**spec.model_dump(mode="json"), "methods": [
            {**m.model_dump(mode="json"), "config": str(base / m.config)} for m in spec.methods],
            "records": str(records) if records else None}},
        sort_keys=False))
    cells = grid_cells(spec, base, bench_dir)
    if records and (restored := sync_records(cells, bench_dir / "runs", records, log)):
        log(f"{restored} finished cell(s) restored from the records in {records}")
    return spec, bench_dir, cells, records


def report_from_config(config: str | Path, overrides: list[str] | None = None,
                       log: Callable[[str], None] = print) -> Path:
    """The report of a bench config's finished cells, its records included, without training any."""
    _, bench_dir, _, _ = prepare_bench(config, overrides, log)
    return write_report(bench_dir, log=log)


def select_cells(cells: list[Cell], patterns: list[str] | None) -> list[Cell]:
    """The cells whose names match ``patterns`` (shell globs, e.g. ``diffcl_*``), in the patterns' order.

    A grid that spans sessions (or machines) runs in pieces: the longest cells first, or one row, or
    one seed. None or empty: every cell, in grid order.

    Raises:
        ConfigError: a pattern matches no cell of the grid (a typo would otherwise run nothing).
    """
    if not patterns:
        return list(cells)
    chosen: dict[str, Cell] = {}
    for pattern in patterns:
        matched = [c for c in cells if fnmatch.fnmatchcase(c.name, pattern)]
        if not matched:
            from semidiff.errors import ConfigError

            names = ", ".join(c.name for c in cells[:6]) + (", ..." if len(cells) > 6 else "")
            raise ConfigError(f"bench --cells: {pattern!r} matches no cell of this grid (cells: {names})")
        chosen.update((c.name, c) for c in matched)  # a cell matched again keeps its first place
    return list(chosen.values())


def run_bench(config: str | Path, overrides: list[str] | None = None, log: Callable[[str], None] = print,
              cells_wanted: list[str] | None = None, list_only: bool = False) -> int:
    """Run every unfinished cell of a bench, rebuilding the report after each; returns the failures.

    ``cells_wanted``: globs of cell names to run, in that order (:func:`select_cells`); ``list_only``
    logs each selected cell as finished or to run, with the time left, and trains nothing.
    """
    spec, bench_dir, cells, records = prepare_bench(config, overrides, log)
    selected = select_cells(cells, cells_wanted)
    done = {c.name for c in cells if cell_done(bench_dir / "runs" / c.name)}
    todo = [c for c in selected if c.name not in done]
    if list_only:
        for c in selected:
            log(f"{c.name}: {'finished' if c.name in done else 'to run'}")
        log(f"{len(selected)} cell(s) selected of {len(cells)}; "
            f"{time_left(todo, finished_seconds(cells, bench_dir / 'runs'))}")
        return 0
    # For the estimate of what is left, logged at the start and after every cell.
    pending, seconds = list(todo), finished_seconds(cells, bench_dir / "runs")
    chosen = f" ({len(selected)} selected)" if len(selected) < len(cells) else ""
    log(f"bench {spec.name}: {len(cells)} cells{chosen}, {len(done)} already finished, "
        f"{len(todo)} to run with {spec.workers} worker(s); folder {bench_dir}; {time_left(pending, seconds)}")
    lock, failures = threading.Lock(), []
    started = time.time()

    def work(i_cell: tuple[int, Cell]) -> None:
        i, cell = i_cell
        if _stopping.is_set():
            return
        env = dict(os.environ)
        if spec.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(spec.gpus[i % len(spec.gpus)])
        t0 = time.time()
        rc = run_cell(cell, bench_dir, env, in_process=spec.isolation == "in_process")
        if _stopping.is_set() and not cell_done(bench_dir / "runs" / cell.name):
            log(f"[{time.strftime('%H:%M:%S')}] {cell.name}: stopped (SIGTERM); the same command continues it "
                "from its last checkpoint")
            return
        with lock:
            state = "done" if rc == 0 and cell_done(bench_dir / "runs" / cell.name) else f"FAILED (exit {rc})"
            pending.remove(cell)
            if state != "done":
                failures.append(cell.name)
            else:
                seconds.update(finished_seconds(cells, bench_dir / "runs"))
                if records:
                    save_record(bench_dir / "runs" / cell.name, records)
            log(f"[{time.strftime('%H:%M:%S')}] {cell.name}: {state} in {time.time() - t0:.0f} s "
                f"(log: {bench_dir / 'logs' / (cell.name + '.log')}); {time_left(pending, seconds)}")
            write_report(bench_dir, log=lambda _m: None)

    with _cells_stop_on_sigterm(spec.isolation != "in_process"), ThreadPoolExecutor(max_workers=spec.workers) as pool:
        list(pool.map(work, enumerate(todo)))
    if _stopping.is_set():  # the report is as the last finished cell left it
        raise SystemExit(128 + signal.SIGTERM)
    timing = {"wall_seconds_this_invocation": round(time.time() - started, 1), "cells": len(cells),
              "cells_run": len(todo), "failed": failures}
    (bench_dir / "bench_timing.json").write_text(json.dumps(timing, indent=1))
    write_report(bench_dir, log=log)
    if failures:
        log(f"{len(failures)} cell(s) failed: {', '.join(failures)}; rerun the same command to retry them")
    return len(failures)

