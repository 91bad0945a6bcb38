"""Plugins by name: the built-in ones and the packs installed under the ``hookrt.plugins`` entry point group."""

from __future__ import annotations

import difflib
import functools
import importlib
import logging
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

from hookrt._errors import PluginError
from hookrt._plugin import Plugin

__all__ = ["ENTRY_POINT_GROUP", "available_plugins", "resolve_plugin"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "hookrt.plugins"

#: Built-in plugins by name, as "module:attribute"; imported only when asked for.
BUILTIN_PLUGINS: dict[str, str] = {
    "model_checkpoint": "hookrt.plugins.checkpoint:ModelCheckpoint",
    "early_stopping": "hookrt.plugins.early_stopping:EarlyStopping",
    "tensorboard": "hookrt.plugins.tensorboard:TensorBoardLogger",
    "csv_logger": "hookrt.plugins.csv_logger:CSVLogger",
    "progress_bar": "hookrt.plugins.progress:ProgressBar",
    "lr_monitor": "hookrt.plugins.lr_monitor:LearningRateMonitor",
    "memory_probe": "hookrt.plugins.memory:MemoryProbe",
    "hook_profiler": "hookrt.plugins.profiler:HookProfiler",
    "model_summary": "hookrt.plugins.summary:ModelSummary",
    "gradient_clipping": "hookrt.plugins.clipping:GradientClipping",
    "signals": "hookrt.plugins.signals:SignalHandler",
}


def _load_target(target: str) -> Any:
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def available_plugins() -> dict[str, Callable[[], Any]]:
    """Return every plugin name with a loader: built-ins first, then installed packs.

    A pack whose entry point cannot be read is logged with its name and skipped.
    """
    found: dict[str, Callable[[], Any]] = {
        name: functools.partial(_load_target, target) for name, target in BUILTIN_PLUGINS.items()
    }
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry_point.name, entry_point.load)
    return found


def resolve_plugin(spec: str, options: Mapping[str, Any] | None = None) -> Plugin:
    """Build the plugin registered under ``spec``, passing ``options`` as keyword arguments.

    Raises:
        PluginError: the name is unknown (the message suggests the closest), the
            pack fails to load, or what it provides is not a Plugin.
    """
    plugins = available_plugins()
    if spec not in plugins:
        close = difflib.get_close_matches(spec, list(plugins), n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise PluginError(
            f"No plugin named '{spec}' is installed.{hint} Run `hookrt plugins` to list the installed ones, "
            f"or install the pack that provides it.",
            plugin=spec,
        )
    try:
        factory = plugins[spec]()
    except Exception as exc:
        raise PluginError(
            f"Plugin pack '{spec}' failed to load: {type(exc).__name__}: {exc}. Reinstall or fix the pack.",
            plugin=spec,
        ) from exc
    plugin = factory(**dict(options or {})) if callable(factory) else factory
    if not isinstance(plugin, Plugin):
        raise PluginError(
            f"Plugin pack '{spec}' provided a {type(plugin).__name__}, not a hookrt.Plugin. Its entry point must "
            "name a Plugin subclass or a factory returning a Plugin.",
            plugin=spec,
        )
    return plugin
