"""Peak resident memory of one `benchmarks.stack` contender, run once in this fresh process.

``python -m benchmarks`` starts one process per contender, so each peak
belongs to one contender alone::

    OMP_NUM_THREADS=1 python -m benchmarks.memory --contender hookrt-full --json out.json

Three readings are taken: the resident set size (RSS, from /proc/self/statm)
once torch is imported, the RSS once the contender's framework package is
imported too, and the peak RSS of the process after one epoch
(``getrusage(RUSAGE_SELF).ru_maxrss``). The peak includes everything the
process ever held: the interpreter, torch, the framework, the modules that
it imports lazily during the run (tensorboardX, tqdm), the data and the run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import sys
from pathlib import Path

_MIB = 1024 * 1024


def current_rss_mib() -> float:
    """Return this process's resident set size in MiB, from /proc/self/statm (Linux only)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / _MIB


def peak_rss_mib() -> float:
    """Return the process's peak resident set size in MiB; ru_maxrss is in KiB on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MIB if sys.platform == "darwin" else peak / 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contender", required=True)
    parser.add_argument("--workload", default="mlp", choices=("mlp", "digits"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    after_torch = current_rss_mib()
    from benchmarks import stack

    contender = stack.CONTENDERS_BY_KEY[args.contender]
    if contender.package == "lightning":
        stack.lightning_package()
    elif contender.package is not None:
        importlib.import_module(contender.package)
    after_imports = current_rss_mib()

    work = stack.workload(args.workload)
    state = stack.initial_state(work)
    loader = work.build_loader(args.steps)
    with stack.quiet_frameworks():
        stack.checked_run(contender, work, loader, state, args.steps, [])
    report = {
        "contender": args.contender,
        "workload": args.workload,
        "steps": args.steps,
        "rss_after_torch_mib": after_torch,
        "rss_after_imports_mib": after_imports,
        "peak_rss_mib": peak_rss_mib(),
        "modules_loaded": len(sys.modules),
    }
    args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
