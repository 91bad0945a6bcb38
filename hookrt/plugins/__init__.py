"""The built-in plugins, one module each, imported on first use."""

from __future__ import annotations
