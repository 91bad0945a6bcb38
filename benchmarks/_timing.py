"""Helpers shared by the benchmarks: interleaved rounds, summary statistics and the machine description."""

from __future__ import annotations

import cProfile
import io
import os
import platform
import pstats
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


def run_interleaved(runs: Mapping[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """Call every run once per round, rotating the order each round, and return the results per run.

    A slow moment on the machine then hits each contender in turn instead of
    always the same one.
    """
    names = list(runs)
    samples: dict[str, list[T]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(runs[name]())
    return samples


@dataclass(frozen=True)
class Summary:
    """The median and the range of one measurement over the rounds."""

    median: float
    minimum: float
    maximum: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(statistics.median(values), min(values), max(values))

    def scaled(self, factor: float) -> Summary:
        return Summary(self.median * factor, self.minimum * factor, self.maximum * factor)


def cpu_model() -> str:
    """Return the first ``model name`` in /proc/cpuinfo, else what ``platform`` reports, else "unknown"."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    """Return the checked-out commit, marked ``(modified)`` when the tree has changes, or "unknown"."""
    try:
        commit = _git("rev-parse", "HEAD")
        changes = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit} (modified)" if changes else commit


def _git(*args: str) -> str:
    completed = subprocess.run(
        ["git", *args], cwd=REPOSITORY_ROOT, capture_output=True, text=True, check=True, timeout=30
    )
    return completed.stdout.strip()


def logical_cpus() -> int:
    """Return the number of CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right_aligned: Sequence[bool]) -> str:
    """Format a Markdown table whose columns are padded to line up in plain text too."""
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        padded = [cell.rjust(width) if right else cell.ljust(width)
                  for cell, width, right in zip(cells, widths, right_aligned, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (width + 1) + ":") if right else ("-" * (width + 2))
                          for width, right in zip(widths, right_aligned, strict=True)) + "|"
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


class RegionClock:
    """Wall-clock and thread CPU-time readings at the start and end of a timed region.

    The CPU time leaves out the time the thread waited for a core, so it
    varies less than the wall clock when other processes load the machine.
    """

    def __init__(self) -> None:
        self.wall = (0.0, 0.0)
        self.cpu = (0.0, 0.0)

    def start(self, *args: Any) -> None:
        self.cpu = (time.thread_time(), 0.0)
        self.wall = (time.perf_counter(), 0.0)

    def end(self, *args: Any) -> None:
        self.wall = (self.wall[0], time.perf_counter())
        self.cpu = (self.cpu[0], time.thread_time())

    @property
    def seconds(self) -> float:
        return self.wall[1] - self.wall[0]

    @property
    def cpu_seconds(self) -> float:
        return self.cpu[1] - self.cpu[0]


def load_average() -> str:
    """Return the 1-minute load average, or "unknown" where the system does not report one."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "unknown"


def profile_call(call: Callable[[], object], limit: int, restrictions: Sequence[str | None]) -> str:
    """Run ``call`` under cProfile and return the top ``limit`` functions by own time, once per restriction.

    A restriction is a regular expression on ``file:line(function)``, or None for
    every function. cProfile adds a fixed cost to every Python call, so it
    overstates the share of small functions.
    """
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        call()
    finally:
        profiler.disable()
    output = io.StringIO()
    stats = pstats.Stats(profiler, stream=output).sort_stats("tottime")
    for restriction in restrictions:
        if restriction is None:
            stats.print_stats(limit)
        else:
            stats.print_stats(restriction, limit)
    return output.getvalue()
