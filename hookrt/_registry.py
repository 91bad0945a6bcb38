"""Plugins by name: the built-in ones and the packs installed under the ``hookrt.plugins`` entry point group."""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import logging
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any, NamedTuple

from hookrt._errors import PluginError
from hookrt._plugin import Plugin

__all__ = ["ENTRY_POINT_GROUP", "PluginEntry", "available_plugins", "plugin_entries", "resolve_plugin"]

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


class PluginEntry(NamedTuple):
    """One registered plugin name: where it comes from and how to load it."""

    #: The name given to ``Trainer(plugins=[...])`` and ``--plugin``.
    name: str
    #: ``"built-in"``, or the name of the distribution that declares the entry point.
    source: str
    #: The import path of the plugin class or factory, as ``"module:attribute"``.
    target: str
    #: Imports and returns the Plugin subclass or factory; may raise whatever the pack's import raises.
    load: Callable[[], Any]


def _distribution_name(entry_point: metadata.EntryPoint) -> str:
    distribution = getattr(entry_point, "dist", None)
    name = getattr(distribution, "name", None)
    return str(name) if name else "an unknown distribution"


def plugin_entries() -> list[PluginEntry]:
    """List every registered plugin name without importing any plugin: built-ins first, then installed packs.

    A name appears more than once when a pack reuses the name of a built-in or
    of another pack. `resolve_plugin` uses the first entry of each name.
    """
    entries = [
        PluginEntry(name, "built-in", target, functools.partial(_load_target, target))
        for name, target in BUILTIN_PLUGINS.items()
    ]
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        entries.append(
            PluginEntry(entry_point.name, _distribution_name(entry_point), entry_point.value, entry_point.load)
        )
    return entries


def _loaded(value: Any) -> Any:
    return value


def available_plugins() -> dict[str, Callable[[], Any]]:
    """Return every usable plugin name with a loader: built-ins first, then installed packs.

    Built-ins are imported only when their loader is called. Each pack is
    imported here, so that a pack that fails to load is logged as a warning,
    with its name, its distribution and the error, and left out instead of
    failing later. A pack that reuses a name registered before it is left out too.
    """
    found: dict[str, Callable[[], Any]] = {}
    for entry in plugin_entries():
        if entry.name in found:
            logger.debug("Plugin '%s' (%s) is shadowed by an earlier plugin of that name.", entry.name, entry.source)
            continue
        if entry.source == "built-in":
            found[entry.name] = entry.load
            continue
        try:
            target = entry.load()
        except Exception as exc:  # a pack's import may raise anything; one broken pack must not hide the rest
            logger.warning(
                "Plugin pack '%s' (%s) failed to load and is skipped: %s: %s. Reinstall or fix the pack.",
                entry.name, entry.source, type(exc).__name__, exc, exc_info=logger.isEnabledFor(logging.DEBUG),
            )
            continue
        found[entry.name] = functools.partial(_loaded, target)
    return found


def resolve_plugin(spec: str, options: Mapping[str, Any] | None = None) -> Plugin:
    """Build the plugin registered under ``spec``, passing ``options`` as keyword arguments.

    Only the pack that provides ``spec`` is imported.

    Raises:
        PluginError: the name is unknown (the message suggests the closest), the
            pack fails to load, an option is not a parameter of the plugin, or
            what the pack provides is not a Plugin.
    """
    entries = plugin_entries()
    entry = next((entry for entry in entries if entry.name == spec), None)
    if entry is None:
        names = list(dict.fromkeys(entry.name for entry in entries))
        close = difflib.get_close_matches(spec, names, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise PluginError(
            f"No plugin named '{spec}' is installed.{hint} Run `hookrt plugins` to list the installed ones, "
            f"or install the pack that provides it.",
            plugin=spec,
        )
    try:
        factory = entry.load()
    except Exception as exc:
        raise PluginError(
            f"Plugin '{spec}' ({entry.source}) failed to load: {type(exc).__name__}: {exc}. "
            "Reinstall or fix the pack that provides it.",
            plugin=spec,
        ) from exc
    if callable(factory):
        _check_options(spec, factory, dict(options or {}))
    plugin = factory(**dict(options or {})) if callable(factory) else factory
    if not isinstance(plugin, Plugin):
        raise PluginError(
            f"Plugin pack '{spec}' provided a {type(plugin).__name__}, not a hookrt.Plugin. Its entry point must "
            "name a Plugin subclass or a factory returning a Plugin.",
            plugin=spec,
        )
    return plugin


def keyword_mismatch(fn: Callable[..., Any], keywords: dict[str, Any], noun: str) -> tuple[str, list[str]] | None:
    """Explain why ``fn`` cannot be called with ``keywords``, or return None when it can.

    Returns the reason (naming the first unknown keyword, with the closest
    parameter, as a ``noun`` such as "option") and the parameter names.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # no signature to check against (a builtin or C factory); the call itself will tell
    try:
        signature.bind(**keywords)
    except TypeError as exc:
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        parameters = [name for name, parameter in signature.parameters.items() if parameter.kind not in variadic]
        unknown = [name for name in keywords if name not in signature.parameters]
        if not unknown:
            return f"{exc}.", parameters
        close = difflib.get_close_matches(unknown[0], parameters, n=1, cutoff=0.5)
        return f"unknown {noun} '{unknown[0]}'." + (f" Did you mean '{close[0]}'?" if close else ""), parameters
    return None


def _check_options(spec: str, factory: Callable[..., Any], options: dict[str, Any]) -> None:
    """Raise a PluginError naming the first option that ``factory`` does not take, with the closest parameter."""
    mismatch = keyword_mismatch(factory, options, "option")
    if mismatch is not None:
        reason, parameters = mismatch
        raise PluginError(
            f"Invalid options for plugin '{spec}': {reason} Its parameters are: {', '.join(parameters) or 'none'}.",
            plugin=spec,
        )
