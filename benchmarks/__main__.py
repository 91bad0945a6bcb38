"""``python -m benchmarks``: run the benchmark suite and write benchmarks/results/ (see `benchmarks.suite`)."""

from __future__ import annotations

import os
import sys

# Set before anything imports torch: the workers inherit them, and torch reads them when it loads.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

from benchmarks.suite import main  # noqa: E402 - the thread variables must be set first

sys.exit(main())
