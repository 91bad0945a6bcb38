"""The built-in plugins, one module each.

Names are imported on first access, so ``from hookrt.plugins import
ProgressBar`` loads only the progress bar's module.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "CSVLogger",
    "DataParallel",
    "DevicePlacement",
    "DistributedBatchSampler",
    "DistributedDataParallel",
    "EarlyStopping",
    "GradientClipping",
    "HookProfiler",
    "LearningRateMonitor",
    "Logger",
    "MemoryProbe",
    "MixedPrecision",
    "ModelCheckpoint",
    "ModelSummary",
    "ProgressBar",
    "SignalHandler",
    "TensorBoardLogger",
]

_MODULES = {
    "CSVLogger": "csv_logger",
    "DataParallel": "dp",
    "DevicePlacement": "device",
    "DistributedBatchSampler": "ddp",
    "DistributedDataParallel": "ddp",
    "EarlyStopping": "early_stopping",
    "GradientClipping": "clipping",
    "HookProfiler": "profiler",
    "LearningRateMonitor": "lr_monitor",
    "Logger": "logger",
    "MemoryProbe": "memory",
    "MixedPrecision": "precision",
    "ModelCheckpoint": "checkpoint",
    "ModelSummary": "summary",
    "ProgressBar": "progress",
    "SignalHandler": "signals",
    "TensorBoardLogger": "tensorboard",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'hookrt.plugins' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"hookrt.plugins.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
