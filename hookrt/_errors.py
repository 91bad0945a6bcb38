"""Exceptions and warnings raised by hookrt.

The hierarchy is small on purpose: callers tell apart a bad plugin
(`PluginError`), a bad configuration (`MisconfigurationError`) and a bad
checkpoint (`CheckpointError`); everything else is a plain `HookrtError`.
`CancelBatch` and `CancelEpoch` are control flow, not errors.
"""

from __future__ import annotations

__all__ = [
    "CancelBatch",
    "CancelEpoch",
    "CheckpointError",
    "HookrtError",
    "HookrtWarning",
    "MisconfigurationError",
    "PluginError",
]


class HookrtError(Exception):
    """Base class of every error that hookrt raises on purpose."""


class PluginError(HookrtError):
    """A plugin or handler that cannot be registered or run as written.

    Attributes:
        plugin: the name of the plugin at fault, or None for an ad hoc handler.
        event: the event or wrapper point involved, or None.
    """

    def __init__(self, message: str, *, plugin: str | None = None, event: str | None = None) -> None:
        super().__init__(message)
        self.plugin = plugin
        self.event = event


class MisconfigurationError(HookrtError, ValueError):
    """A Trainer flag, module hook result or data loader that cannot work."""


class CheckpointError(HookrtError):
    """A checkpoint that cannot be written or read back."""


class HookrtWarning(UserWarning):
    """Category of the warnings hookrt gives about fixable misuse."""


class CancelBatch(Exception):  # noqa: N818 - named for what it does, like StopIteration
    """Raised by a handler or the module to skip the rest of the current batch.

    The batch does not reach `on_batch_end`; the epoch goes on with the next batch.
    """


class CancelEpoch(Exception):  # noqa: N818
    """Raised by a handler or the module to end the current epoch early.

    `on_epoch_end` still fires and the next epoch starts as usual.
    """
