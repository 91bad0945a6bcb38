"""hookrt: a PyTorch training runtime whose loop is an event bus.

The loop runs a closure-based batch step and emits typed events on a
per-trainer bus; plugins subscribe to those events or wrap the batch step.
"""

from __future__ import annotations

from hookrt._bus import Bus, BusRow, BusTable, Handle
from hookrt._callback import Callback
from hookrt._errors import (
    CancelBatch,
    CancelEpoch,
    CheckpointError,
    HookrtError,
    HookrtWarning,
    MisconfigurationError,
    PluginError,
)
from hookrt._events import Event, Payload, WrapPoint
from hookrt._module import LightningModule, data_loader
from hookrt._plugin import Plugin, around, on
from hookrt._seed import seed_everything
from hookrt._trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "Bus",
    "BusRow",
    "BusTable",
    "CancelBatch",
    "CancelEpoch",
    "Callback",
    "CheckpointError",
    "Event",
    "Handle",
    "HookrtError",
    "HookrtWarning",
    "LightningModule",
    "MisconfigurationError",
    "Payload",
    "Plugin",
    "PluginError",
    "Trainer",
    "WrapPoint",
    "__version__",
    "around",
    "data_loader",
    "on",
    "seed_everything",
]
