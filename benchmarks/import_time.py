"""Import time of hookrt against torch alone, in fresh interpreters, with a ``-X importtime`` breakdown.

Run by ``python -m benchmarks``; alone::

    python -m benchmarks.import_time --rounds 7 --json out.json

Each round starts one fresh interpreter per case, in rotating order, and the
interpreter times its own import statements with `time.perf_counter`, so
interpreter start-up is left out. The cases:

- ``import torch``;
- ``import hookrt``, which alone does not import torch;
- ``import hookrt`` plus ``hookrt.Trainer`` and ``hookrt.LightningModule``,
  which a training script touches on its first lines and which import torch;
- the same plus ``hookrt.Trainer()``, which builds the default plugin stack
  and so imports the built-in plugins.

The breakdown runs ``python -X importtime`` on ``import torch`` followed by
the third case, and keeps the modules imported after torch: what hookrt
adds on top of it, by cumulative time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._timing import REPOSITORY_ROOT

CASES = {
    "torch": "import torch",
    "hookrt": "import hookrt",
    "hookrt_api": "import hookrt; hookrt.Trainer; hookrt.LightningModule",
    "hookrt_trainer": "import hookrt; hookrt.Trainer(); hookrt.LightningModule",
}
CASE_LABELS = {
    "torch": "`import torch`",
    "hookrt": "`import hookrt`",
    "hookrt_api": "`import hookrt` + `hookrt.Trainer`, `hookrt.LightningModule`",
    "hookrt_trainer": "the same + `hookrt.Trainer()` (default plugin stack)",
}
_TIMED = "import time as _t; _s = _t.perf_counter(); {statement}; print(_t.perf_counter() - _s)"
_LINE = re.compile(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)")


def run_python(arguments: list[str], cwd: str) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ, PYTHONPATH=str(REPOSITORY_ROOT))
    return subprocess.run([sys.executable, *arguments], cwd=cwd, env=environment, capture_output=True, text=True,
                          check=True, timeout=300)


def time_case(statement: str, cwd: str) -> float:
    completed = run_python(["-c", _TIMED.format(statement=statement)], cwd)
    return float(completed.stdout.strip().splitlines()[-1])


def import_breakdown(cwd: str, limit: int) -> dict[str, Any]:
    """Return the modules imported after torch by the hookrt case, with self and cumulative microseconds."""
    completed = run_python(["-X", "importtime", "-c", f"import torch; {CASES['hookrt_api']}"], cwd)
    entries = []
    for line in completed.stderr.splitlines():
        match = _LINE.match(line)
        if match:
            own, cumulative, indent, name = match.groups()
            entries.append((name, int(own), int(cumulative), len(indent)))
    torch_end = max(index for index, entry in enumerate(entries) if entry[0] == "torch" and entry[3] == 1)
    added = entries[torch_end + 1:]
    top_level = [entry for entry in added if entry[3] == 1]
    ranked = sorted(added, key=lambda entry: -entry[2])[:limit]
    return {
        "modules_added": len(added),
        "top_level_cumulative_us": sum(entry[2] for entry in top_level),
        "top": [{"module": name, "self_us": own, "cumulative_us": cumulative, "depth": depth}
                for name, own, cumulative, depth in ranked],
        "top_level": [{"module": name, "cumulative_us": cumulative} for name, _, cumulative, _ in top_level],
    }


def measure(rounds: int, limit: int, names: list[str]) -> dict[str, Any]:
    samples: dict[str, list[float]] = {name: [] for name in names}
    # An empty folder as the working directory, so Trainer() and imports find nothing of the repository's.
    with tempfile.TemporaryDirectory(prefix="hookrt-import-") as cwd:
        for name in names:
            time_case(CASES[name], cwd)  # warms the file-system cache
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(time_case(CASES[name], cwd))
        breakdown = import_breakdown(cwd, limit)
    return {
        "rounds": rounds,
        "samples_s": samples,
        "median_s": {name: statistics.median(values) for name, values in samples.items()},
        "breakdown": breakdown,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--top", type=int, default=12, help="modules to list in the breakdown")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases: " + ", ".join(CASES))
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    names = [name for name in args.cases.split(",") if name]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    args.json.write_text(json.dumps(measure(args.rounds, args.top, names), indent=1))


if __name__ == "__main__":
    main()
