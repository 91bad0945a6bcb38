"""hookrt: a PyTorch training runtime whose loop is an event bus.

The loop runs a closure-based batch step and emits typed events on a
per-trainer bus; plugins subscribe to those events or wrap the batch step.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
from hookrt._events import (
    BatchEndPayload,
    BatchPayload,
    CheckpointPayload,
    EpochPayload,
    EvalBatchEndPayload,
    EvalBatchPayload,
    EvalPayload,
    Event,
    ExceptionPayload,
    ForwardPayload,
    LogPayload,
    LossPayload,
    OptimizerPayload,
    OptimizerStepPayload,
    Payload,
    StagePayload,
    WrapPoint,
)
from hookrt._plugin import Plugin, around, on

if TYPE_CHECKING:
    from hookrt._module import LightningModule, data_loader
    from hookrt._seed import seed_everything
    from hookrt._trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "BatchEndPayload",
    "BatchPayload",
    "Bus",
    "BusRow",
    "BusTable",
    "Callback",
    "CancelBatch",
    "CancelEpoch",
    "CheckpointError",
    "CheckpointPayload",
    "EpochPayload",
    "EvalBatchEndPayload",
    "EvalBatchPayload",
    "EvalPayload",
    "Event",
    "ExceptionPayload",
    "ForwardPayload",
    "Handle",
    "HookrtError",
    "HookrtWarning",
    "LightningModule",
    "LogPayload",
    "LossPayload",
    "MisconfigurationError",
    "OptimizerPayload",
    "OptimizerStepPayload",
    "Payload",
    "Plugin",
    "PluginError",
    "StagePayload",
    "Trainer",
    "WrapPoint",
    "__version__",
    "around",
    "data_loader",
    "on",
    "seed_everything",
]

# The names that need torch load on first access, so `import hookrt` stays cheap and
# loads nothing that torch itself pulls in (tqdm, through torch.hub).
_LAZY = {
    "LightningModule": "hookrt._module",
    "Trainer": "hookrt._trainer",
    "data_loader": "hookrt._module",
    "seed_everything": "hookrt._seed",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hookrt' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
