"""Puts this folder on sys.path, so that test modules can import the helper modules beside them."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
