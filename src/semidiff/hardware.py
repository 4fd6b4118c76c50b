"""What the hardware does fast: precision, memory format and CPU threads, chosen per machine.

``train.precision: auto`` and ``train.memory_format: auto`` resolve here, at the start of every
training, evaluation and prediction, from what this machine is (the config keeps ``auto``, so a
run's config is the same on every machine; the resolved values are written to ``timing.json`` and
the protocol header). Measured on this project's 2-core CPU machines (benchmarks/results/step_times.md):
bf16 autocast is 1.4-1.75x faster than fp32 on CPUs with native bf16 instructions (``avx512_bf16``
or AMX) and 2x slower on CPUs without them; channels-last 2D convolutions add 1.2x in bf16 and
nothing in fp32.

The engine's ``ThreadShare`` (engine/threads.py) divides the cores among the trainings running
at once on one machine.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import torch

__all__ = [
    "available_cores",
    "cpu_has_native_bf16",
    "resolve_memory_format",
    "resolve_precision",
]

#: /proc/cpuinfo flags of CPUs whose bf16 matrix work is native (AVX-512 BF16, AMX tiles).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has native bf16 instructions (False where /proc/cpuinfo cannot be read)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def _uses_cuda(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """Lightning's precision name for ``train.precision``; ``auto`` picks what is fast here.

    ``auto``: ``bf16-mixed`` on a CUDA GPU that supports bf16 (else ``16-mixed``); on a CPU,
    ``bf16-mixed`` when it has native bf16 instructions, else ``32``. Any other value is returned
    as it is.
    """
    if precision != "auto":
        return precision
    if _uses_cuda(accelerator):
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator == "mps":
        return "32"
    return "bf16-mixed" if cpu_has_native_bf16() else "32"


def resolve_memory_format(memory_format: str, spatial_dims: int, precision: str) -> torch.memory_format | None:
    """The memory format networks and batches are put in, or None to leave them contiguous.

    ``auto``: channels-last for 2D networks in mixed precision (where it was measured faster);
    contiguous otherwise. On a CPU in fp32 channels-last was measured up to 1.3x faster for
    one-network methods (step_times.md, session 37), but its fp32 results then change with the
    thread count (a run alone against two side by side), so ``auto`` leaves fp32 contiguous;
    ``channels_last`` takes it. 3D channels-last was not measured faster on CPU.
    """
    if memory_format == "contiguous":
        return None
    if memory_format == "channels_last":
        return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    return torch.channels_last if spatial_dims == 2 and precision != "32" else None


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
