"""The default plugin stack, built when a Trainer is constructed.

This is the one place where core code imports ``hookrt.plugins``, and it does
so lazily, so ``import hookrt`` stays free of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hookrt._errors import PluginError
from hookrt._plugin import Plugin

if TYPE_CHECKING:
    from hookrt._trainer import Trainer

__all__ = ["build_plugin_stack", "plugin_items"]


def plugin_items(value: Any, flag: str) -> list[Any]:
    """Return the Trainer's ``plugins`` or ``callbacks`` argument as a list.

    A single plugin or plugin name counts as a list of one, and None as an empty list.

    Raises:
        PluginError: the value is neither of these nor an iterable of them.
    """
    if value is None:
        return []
    if isinstance(value, (Plugin, str)):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
        return list(value)
    raise PluginError(
        f"Trainer({flag}={value!r}) is invalid: {flag} must be a list of hookrt.Plugin objects or names of "
        "installed plugins.",
        plugin=type(value).__name__,
    )


def _user_plugins(items: Sequence[Any], source: str) -> list[Plugin]:
    from hookrt._registry import resolve_plugin

    plugins: list[Plugin] = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            plugins.append(resolve_plugin(item))
        elif isinstance(item, Plugin):
            plugins.append(item)
        elif isinstance(item, type) and issubclass(item, Plugin):
            raise PluginError(
                f"{source} item {index} is the class {item.__name__}, not an instance. Pass {item.__name__}() "
                "instead.",
                plugin=item.__name__,
            )
        else:
            raise PluginError(
                f"{source} item {index} is a {type(item).__name__}, not a hookrt.Plugin or a plugin name. "
                "Subclass hookrt.Plugin (or hookrt.Callback for Lightning-style callbacks), or give the name of "
                "an installed plugin.",
                plugin=type(item).__name__,
            )
    return plugins


def _loggers(flag: Any) -> list[Plugin] | None:
    """Return the loggers that the ``logger`` flag names, or None for the default one."""
    if flag is True:
        return None
    if flag is False or flag is None:
        return []
    items = list(flag) if isinstance(flag, (list, tuple)) else [flag]
    return _user_plugins(items, "logger")


def build_plugin_stack(trainer: Trainer, items: Sequence[Any]) -> list[Plugin]:
    """Return the user's plugins plus the defaults that the flags enable and the user did not replace.

    The defaults are: a TensorBoard logger (``logger``), a ModelCheckpoint saving
    every epoch (``enable_checkpointing``), a progress bar
    (``enable_progress_bar``), a model summary (``enable_model_summary``), the
    signal handler (``enable_signal_handler``), gradient clipping when ``gradient_clip_val`` is set, and the
    device, precision and strategy plugins that ``accelerator``, ``devices``,
    ``precision`` and ``strategy`` call for.
    """
    from hookrt.plugins.checkpoint import ModelCheckpoint
    from hookrt.plugins.clipping import GradientClipping
    from hookrt.plugins.logger import Logger
    from hookrt.plugins.progress import ProgressBar
    from hookrt.plugins.signals import SignalHandler
    from hookrt.plugins.summary import ModelSummary

    config = trainer.config
    user = _user_plugins(items, "plugins/callbacks")
    loggers = _loggers(config.logger)

    def provided(kind: type, role: str | None = None) -> bool:
        return any(
            isinstance(plugin, kind) or (role is not None and plugin.replaces_default == role) for plugin in user
        )

    stack: list[Plugin] = []
    if loggers is None:
        if not provided(Logger, "logger"):
            from hookrt.plugins.tensorboard import TensorBoardLogger

            stack.append(TensorBoardLogger())
    else:
        stack.extend(loggers)
    if config.enable_model_summary and not provided(ModelSummary, "model_summary"):
        stack.append(ModelSummary())
    if config.enable_progress_bar and not provided(ProgressBar, "progress_bar"):
        stack.append(ProgressBar())
    if config.gradient_clip_val and not provided(GradientClipping):
        stack.append(GradientClipping(config.gradient_clip_val, config.gradient_clip_algorithm))
    if config.enable_signal_handler and not provided(SignalHandler):
        stack.append(SignalHandler())
    stack.extend(user)
    from hookrt.plugins.device import plugins_from_flags

    stack.extend(plugins_from_flags(config, user))
    if config.enable_checkpointing and not provided(ModelCheckpoint, "checkpoint"):
        stack.append(ModelCheckpoint())
    return stack
