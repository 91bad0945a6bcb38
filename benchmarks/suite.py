"""The benchmark suite behind ``python -m benchmarks``: every measurement, each in fresh subprocesses.

Each part runs in its own interpreter with ``OMP_NUM_THREADS=1`` and
``MKL_NUM_THREADS=1`` set before torch is imported, and the workers call
``torch.set_num_threads(1)``:

- `benchmarks.stack`: per-step time of every contender on the tiny MLP and
  on the digits CNN, in interleaved rounds within one process per workload;
- `benchmarks.memory`: the peak resident memory of each contender, one
  process per contender;
- `benchmarks.import_time`: import times in fresh interpreters;
- `benchmarks.checkpoint_stall`: how long a synchronous and an asynchronous
  checkpoint save block training.

The results go to ``benchmarks/results/``: ``results.md`` (tables, goals,
machine and commit), ``results.json`` (the raw samples) and ``ratios.png``
(a bar chart of the per-step ratios, when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import _report
from benchmarks._timing import REPOSITORY_ROOT, cpu_model, git_commit, load_average, logical_cpus

RESULTS_FOLDER = REPOSITORY_ROOT / "benchmarks" / "results"
PINNED_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PARTS = ("mlp", "digits", "memory", "import", "checkpoint")
#: The per-step contenders, one process per framework, each with its own plain loop as the baseline of its
#: ratios: a framework's imports change the speed of the others' loops by a few percent.
MLP_GROUPS = {
    "hookrt": ("plain", "plain-closure", "hookrt", "hookrt-full", "hookrt-full-tty"),
    "lightning": ("plain", "lightning", "lightning-full"),
    "ignite": ("plain", "ignite", "ignite-full"),
}
#: Fewer contenders for the digits CNN, where the per-step share of the framework is smaller.
DIGITS_GROUPS = {
    "hookrt": ("plain", "plain-closure", "hookrt", "hookrt-full"),
    "lightning": ("plain", "lightning-full"),
    "ignite": ("plain", "ignite-full"),
}
MEMORY_CONTENDERS = ("plain", "hookrt", "hookrt-full", "lightning", "lightning-full", "ignite", "ignite-full")
QUICK_MEMORY_CONTENDERS = ("plain", "hookrt-full", "lightning-full", "ignite-full")
#: The import names that each peer's contenders need, any one of them.
PEER_PACKAGES = {"lightning": ("lightning", "pytorch_lightning"), "ignite": ("ignite",)}


@dataclass(frozen=True)
class Settings:
    """How much each part measures: the full run, or the ``--quick`` one for CI."""

    quick: bool
    rounds: int
    mlp_steps: int
    digits_steps: int
    memory_steps: int
    memory_contenders: tuple[str, ...]
    import_rounds: int
    import_cases: tuple[str, ...]
    checkpoint_parameters: float
    checkpoint_rounds: int

    @classmethod
    def choose(cls, quick: bool, rounds: int | None) -> Settings:
        if quick:
            return cls(True, max(rounds or 5, 5), 300, 100, 300, QUICK_MEMORY_CONTENDERS, 3,
                       ("torch", "hookrt", "hookrt_api"), 10e6, 3)
        return cls(False, max(rounds or 7, 5), 2000, 500, 2000, MEMORY_CONTENDERS, 7,
                   ("torch", "hookrt", "hookrt_api", "hookrt_trainer"), 50e6, 5)


def machine_description() -> dict[str, Any]:
    """Describe the machine, the versions and the commit, read before anything is measured."""
    versions = {}
    for distribution in ("torch", "pytorch-lightning", "lightning", "pytorch-ignite", "tensorboardX", "tqdm",
                         "blinker", "matplotlib"):
        try:
            versions[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "cpu": cpu_model(),
        "logical_cpus": logical_cpus(),
        "load_average_at_start": load_average(),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "platform": platform.platform(),
        "versions": versions,
        "commit": git_commit(),
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def is_installed(contender: str) -> bool:
    """Return whether the packages of a contender key such as ``"lightning-full"`` can be imported."""
    names = PEER_PACKAGES.get(contender.split("-")[0])
    return names is None or any(importlib.util.find_spec(name) is not None for name in names)


def run_worker(module: str, arguments: list[str], output: Path) -> dict[str, Any]:
    """Run ``python -m module arguments --json output`` with pinned threads and return what it wrote.

    Raises:
        RuntimeError: the worker failed; the message ends with its last lines of output.
    """
    environment = dict(os.environ, **PINNED_THREADS)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY_ROOT), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", module, *arguments, "--json", str(output)]
    completed = subprocess.run(command, cwd=REPOSITORY_ROOT, env=environment, capture_output=True, text=True,
                               timeout=3600)
    if completed.returncode != 0:
        tail = "\n".join((completed.stdout + completed.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command[1:])} exited with status {completed.returncode}:\n{tail}")
    return json.loads(output.read_text())  # type: ignore[no-any-return]


#: One worker run: the name of its result, the module that ``python -m`` runs, and its arguments.
Job = tuple[str, str, list[str]]


def plan_jobs(settings: Settings, parts: tuple[str, ...], memory_missing: list[str]) -> list[Job]:
    """Return the worker runs of the requested parts: (result name, module, arguments)."""
    rounds = str(settings.rounds)
    jobs: list[Job] = []
    for workload, steps, groups in (("mlp", settings.mlp_steps, MLP_GROUPS),
                                    ("digits", settings.digits_steps, DIGITS_GROUPS)):
        if workload in parts:
            for group, contenders in groups.items():
                jobs.append((f"{workload}/{group}", "benchmarks.stack",
                             ["--workload", workload, "--steps", str(steps), "--rounds", rounds,
                              "--contenders", ",".join(contenders)]))
    if "memory" in parts:
        for contender in settings.memory_contenders:
            if contender not in memory_missing:
                jobs.append((f"memory/{contender}", "benchmarks.memory",
                             ["--contender", contender, "--steps", str(settings.memory_steps)]))
    if "import" in parts:
        jobs.append(("import", "benchmarks.import_time", ["--rounds", str(settings.import_rounds),
                                                          "--cases", ",".join(settings.import_cases)]))
    if "checkpoint" in parts:
        jobs.append(("checkpoint", "benchmarks.checkpoint_stall",
                     ["--parameters", str(settings.checkpoint_parameters),
                      "--rounds", str(settings.checkpoint_rounds)]))
    return jobs


def run_parts(settings: Settings, parts: tuple[str, ...], scratch: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Run the requested parts in turn; return their results and, per failed part, its error."""
    memory_missing = [contender for contender in settings.memory_contenders if not is_installed(contender)]
    jobs = plan_jobs(settings, parts, memory_missing)
    results: dict[str, Any] = {}
    failures: dict[str, str] = {}
    if "memory" in parts:
        results["memory"] = {contender: {"installed": False} for contender in memory_missing}
    for index, (name, module, arguments) in enumerate(jobs):
        started = time.monotonic()
        print(f"[{index + 1}/{len(jobs)}] {name} ...", end="", flush=True, file=sys.stderr)
        try:
            result = run_worker(module, arguments, scratch / f"{name.replace('/', '-')}.json")
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            failures[name] = str(exc)
            print(f" failed after {time.monotonic() - started:.0f} s", file=sys.stderr)
            continue
        print(f" {time.monotonic() - started:.0f} s", file=sys.stderr)
        part, _, member = name.partition("/")
        if part == "memory":
            results["memory"][member] = result
        elif member:
            results.setdefault(part, {})[member] = result
        else:
            results[part] = result
    for workload in ("mlp", "digits"):
        if workload in results:
            results[workload] = merge_groups(results[workload])
    if "memory" in results:
        memory = results["memory"]
        results["memory"] = {key: memory[key] for key in settings.memory_contenders if key in memory}
    return results, failures


def merge_groups(groups: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Join the per-framework results of one workload, giving each run the times of its own process's plain loop.

    Each run gets ``plain_loop_seconds`` and ``plain_loop_cpu_seconds`` from the
    plain run of the same round in the same process, and ``process``, the
    group that it ran in. The plain rows come from the first group.
    """
    first = next(iter(groups.values()))
    merged = {key: value for key, value in first.items() if key not in ("results", "contenders", "missing")}
    merged.update(results={}, contenders={}, missing=[])
    for group, part in groups.items():
        plain = part["results"].get("plain", [])
        for key, info in part["contenders"].items():
            merged["contenders"].setdefault(key, info)
        for key, runs in part["results"].items():
            if key in merged["results"]:
                continue
            for run, base in zip(runs, plain, strict=True):
                run.update(plain_loop_seconds=base["loop_seconds"], plain_loop_cpu_seconds=base["loop_cpu_seconds"],
                           process=group)
            merged["results"][key] = runs
        merged["missing"] += [key for key in part["missing"] if key not in merged["missing"]]
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="few steps, 5 rounds, a 10M-parameter checkpoint, and no goal verdicts (for CI)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds of the per-step timings (default 7, or 5 with --quick; at least 5)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run: {', '.join(PARTS)}")
    parser.add_argument("--out", type=Path, default=RESULTS_FOLDER,
                        help="folder for results.md, results.json and ratios.png")
    args = parser.parse_args(argv)
    parts = tuple(part for part in args.only.split(",") if part)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    settings = Settings.choose(args.quick, args.rounds)
    machine = machine_description()
    with tempfile.TemporaryDirectory(prefix="hookrt-benchmarks-") as scratch:
        results, failures = run_parts(settings, parts, Path(scratch))
    machine["load_average_at_end"] = load_average()

    args.out.mkdir(parents=True, exist_ok=True)
    document = _report.render(machine, settings.__dict__, results, failures)
    (args.out / "results.md").write_text(document)
    (args.out / "results.json").write_text(json.dumps(
        {"machine": machine, "settings": settings.__dict__, "results": results, "failures": failures}, indent=1))
    chart_note = _report.write_chart(results, args.out / "ratios.png")
    print(document)
    print(chart_note)
    return 1 if failures else 0
