"""How many threads torch uses on a CPU (issue 28).

torch starts one thread per core. On a machine where other jobs already keep the cores busy, those threads wait on
each other at every operation: on this project's busy 2-core machine a tiny-pipeline step took 1.9 s with two threads
and 0.05 s with one (docs/speed.md). So training and generation on a CPU use the cores that are free: the usable cores
(the process's CPU affinity) minus the cores other processes keep busy, at least one. Those are measured now, over a
quarter of a second (/proc/stat's busy time less this process's own), not read from the 1-minute load average: that
average lags a minute behind, so a run started right after another job ended took one thread on idle cores and
stepped at half speed (issue 29: 5.29 s/step against 2.76 s with two threads, SD1.5 architecture at 256 px). Where
/proc/stat is missing (macOS, Windows) the load average stands in.

The first of these decides: ``--cpu_threads N``; ``OMP_NUM_THREADS`` (the user's own choice, which torch read at
start-up); the thread count of the run being resumed (a CPU run is bit-identical only at the same count); the free
cores. The choice is one log line and is recorded in run.json. Imports nothing heavy: torch only to apply it.
"""

from __future__ import annotations

import contextlib
import os
import time
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


BUSY_SAMPLE_SECONDS = 0.25


def _cpu_jiffies() -> Optional[tuple[int, int]]:
    """(busy, total) clock ticks of all cores since boot, from /proc/stat's ``cpu`` line; None where it is missing."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return total - idle, total


def cores_busy_elsewhere(seconds: float = BUSY_SAMPLE_SECONDS) -> Optional[float]:
    """Cores other processes keep busy now: all cores' busy time over ``seconds``, less this process's own CPU time,
    in cores. None where /proc/stat is missing."""
    before, own_before, started = _cpu_jiffies(), time.process_time(), time.monotonic()
    if before is None:
        return None
    time.sleep(seconds)
    after, own_after, elapsed = _cpu_jiffies(), time.process_time(), time.monotonic() - started
    if after is None or after[1] <= before[1] or elapsed <= 0:
        return None
    all_cores = os.cpu_count() or 1
    busy_cores = (after[0] - before[0]) / (after[1] - before[1]) * all_cores
    return max(0.0, busy_cores - (own_after - own_before) / elapsed)


def choose_cpu_threads(
    requested: Optional[int],
    resumed: Optional[int] = None,
    environ: Mapping[str, str] = os.environ,
    cores: Optional[int] = None,
    load: Optional[float] = None,
    processes: int = 1,
) -> ThreadChoice:
    """The thread count for a CPU (see the module docstring); ``resumed``: the count run.json of a resumed run holds;
    ``load``: the cores busy with other processes (default: measured now); ``processes``: the training processes on
    this machine, which share the free cores."""
    if requested is not None:
        return ThreadChoice(requested, "--cpu_threads")
    given = environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) >= 1:
        return ThreadChoice(int(given), "OMP_NUM_THREADS")
    if resumed is not None and resumed >= 1:
        return ThreadChoice(resumed, "as the run being resumed, for a bit-identical resume")
    cores = cores if cores is not None else usable_cores()
    if load is None:
        load = cores_busy_elsewhere()
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        busy = f"1-minute load average {load:.1f}"
    else:
        busy = f"{load:.1f} busy with other processes"
    free = max(1, min(cores, cores - round(load)))
    share = f", shared by {processes} processes" if processes > 1 else ""
    return ThreadChoice(max(1, free // processes), f"{free} of {cores} cores free, {busy}{share}")


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
