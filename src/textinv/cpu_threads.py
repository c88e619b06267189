"""How many threads torch uses on a CPU (issue 28).

torch starts one thread per core. On a machine where other jobs already keep the cores busy, those threads wait on
each other at every operation: on this project's busy 2-core machine a tiny-pipeline step took 1.9 s with two threads
and 0.05 s with one (docs/speed.md). So training and generation on a CPU use the cores that are free: the usable cores
(the process's CPU affinity) minus the 1-minute load average, at least one.

The first of these decides: ``--cpu_threads N``; ``OMP_NUM_THREADS`` (the user's own choice, which torch read at
start-up); the thread count of the run being resumed (a CPU run is bit-identical only at the same count); the free
cores. The choice is one log line and is recorded in run.json. Imports nothing heavy: torch only to apply it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # why this many, for the log line and run.json

    def text(self) -> str:
        return f"CPU threads: {self.threads} ({self.reason}); --cpu_threads N to choose"

    def record(self) -> dict[str, Any]:
        return {"threads": self.threads, "reason": self.reason}


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def choose_cpu_threads(
    requested: Optional[int],
    resumed: Optional[int] = None,
    environ: Mapping[str, str] = os.environ,
    cores: Optional[int] = None,
    load: Optional[float] = None,
    processes: int = 1,
) -> ThreadChoice:
    """The thread count for a CPU (see the module docstring); ``resumed``: the count run.json of a resumed run holds;
    ``processes``: the training processes on this machine, which share the free cores."""
    if requested is not None:
        return ThreadChoice(requested, "--cpu_threads")
    given = environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) >= 1:
        return ThreadChoice(int(given), "OMP_NUM_THREADS")
    if resumed is not None and resumed >= 1:
        return ThreadChoice(resumed, "as the run being resumed, for a bit-identical resume")
    cores = cores if cores is not None else usable_cores()
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = max(1, min(cores, cores - round(load)))
    share = f", shared by {processes} processes" if processes > 1 else ""
    return ThreadChoice(
        max(1, free // processes), f"{free} of {cores} cores free, 1-minute load average {load:.1f}{share}"
    )


def apply_cpu_threads(choice: ThreadChoice) -> int:
    """Set torch's thread count; returns the one it had (to put back)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(choice.threads)
    return before


@contextlib.contextmanager
def thread_count_kept() -> Iterator[None]:
    """torch's thread count as it was, back at the end (a training run in a notebook leaves the caller's alone)."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
