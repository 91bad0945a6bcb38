"""`DevicePlacement`: puts the module and every batch on one device; and the device flags' parsing.

`requested_devices` turns the Trainer's ``accelerator`` and ``devices`` flags
into a device type and a list of device indices, and `plugins_from_flags`
builds the placement, precision and parallelism plugins that those flags and
``strategy`` and ``precision`` ask for.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hookrt._distributed import local_rank
from hookrt._errors import MisconfigurationError
from hookrt._events import BatchPayload, EvalBatchPayload, Event, ForwardPayload, StagePayload, WrapPoint
from hookrt._plugin import Plugin, around, on

__all__ = ["DevicePlacement", "move_to_device", "plugins_from_flags", "requested_devices", "select_device"]

logger = logging.getLogger(__name__)

#: After the module's own ``setup`` hook (order -1000), which may still build layers,
#: and before the strategy plugins, which wrap the module where it was placed.
PLACEMENT_ORDER = -500
#: Before the module's batch hooks (order -1000), so they see the batch on the device.
BATCH_ORDER = -5000

#: cuBLAS needs a fixed workspace to give the same results on every run (CUDA 10.2 and later).
CUBLAS_WORKSPACE = ":4096:8"


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Return ``batch`` with every tensor moved to ``device``.

    Tensors inside lists, tuples, named tuples, dicts (any Mapping that can be
    rebuilt from its items) and dataclass instances are moved into a new
    container of the same type. Every other object is returned as it is. A
    copy from pinned memory to a CUDA device does not block the host.
    """
    if isinstance(batch, torch.Tensor):
        non_blocking = device.type == "cuda" and batch.device.type == "cpu" and batch.is_pinned()
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        items = [(key, move_to_device(value, device)) for key, value in batch.items()]
        try:
            return type(batch)(items)  # type: ignore[call-arg]
        except TypeError:
            return dict(items)  # a Mapping whose constructor takes other arguments, e.g. defaultdict
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(value, device) for value in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        moved = copy.copy(batch)
        for field in dataclasses.fields(batch):
            # object.__setattr__ also works on frozen dataclasses, on the copy only.
            object.__setattr__(moved, field.name, move_to_device(getattr(batch, field.name), device))
        return moved
    return batch


def _device_kind(accelerator: str) -> str:
    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    if accelerator == "auto":
        if cuda:
            return "cuda"
        return "mps" if mps else "cpu"
    if accelerator == "gpu":
        if cuda or mps:
            return "cuda" if cuda else "mps"
        raise MisconfigurationError(
            "Trainer(accelerator='gpu') found no GPU: CUDA and MPS are not available. Use accelerator='cpu' or "
            "'auto', or run on a machine with a GPU and a torch build for it."
        )
    if accelerator == "cuda" and not cuda:
        raise MisconfigurationError(
            "Trainer(accelerator='cuda') found no CUDA device (torch.cuda.is_available() is False). Use "
            "accelerator='cpu' or 'auto', or install a CUDA build of torch on a machine with an NVIDIA GPU."
        )
    if accelerator == "mps" and not mps:
        raise MisconfigurationError(
            "Trainer(accelerator='mps') found no MPS device (torch.backends.mps.is_available() is False). Use "
            "accelerator='cpu' or 'auto'."
        )
    if accelerator not in ("cpu", "cuda", "mps"):
        raise MisconfigurationError(
            f"accelerator={accelerator!r} is not valid: use 'auto', 'cpu', 'cuda', 'gpu' or 'mps'."
        )
    return accelerator


def _parse_devices(devices: Any, kind: str, available: int) -> list[int]:
    """Return the device indices that ``devices`` requests; ``available`` is the number the machine has."""
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto":
            return list(range(available)) if kind == "cuda" else [0]
        if "," in text:
            devices = [int(part) for part in text.split(",") if part.strip()]
        elif text.lstrip("-").isdigit():
            devices = int(text)
    if isinstance(devices, int) and not isinstance(devices, bool):
        if devices == -1:
            return list(range(available)) if kind == "cuda" else [0]
        if devices >= 1:
            return list(range(devices))
    elif isinstance(devices, Sequence) and devices and all(isinstance(i, int) and i >= 0 for i in devices):
        if len(set(devices)) != len(devices):
            raise MisconfigurationError(f"Trainer(devices={devices!r}) lists a device twice; list each once.")
        return list(devices)
    raise MisconfigurationError(
        f"Trainer(devices={devices!r}) is not valid: give 'auto', a count >= 1, -1 for every GPU, or a list of "
        "device indices such as [0, 1] or '0,1'."
    )


def requested_devices(accelerator: str = "auto", devices: Any = "auto") -> tuple[str, list[int]]:
    """Return the device type (``"cpu"``, ``"cuda"`` or ``"mps"``) and the device indices the flags ask for.

    On the CPU the indices only count processes. ``devices="auto"`` means every
    GPU for CUDA and one process otherwise.

    Raises:
        MisconfigurationError: the accelerator is not available, or ``devices``
            is invalid or names more GPUs than the machine has.
    """
    kind = _device_kind(accelerator)
    available = torch.cuda.device_count() if kind == "cuda" else 1
    indices = _parse_devices(devices, kind, available)
    if kind == "cuda" and max(indices) >= available:
        raise MisconfigurationError(
            f"Trainer(devices={devices!r}) asks for CUDA device {max(indices)}, but this machine has {available} "
            f"(indices 0 to {available - 1}). Ask for fewer devices."
        )
    if kind == "mps" and len(indices) > 1:
        raise MisconfigurationError(f"Trainer(devices={devices!r}): an MPS machine has one device; use devices=1.")
    return kind, indices


def select_device(accelerator: str = "auto", devices: Any = "auto", process_index: int = 0) -> torch.device:
    """Return the device of the ``process_index``-th local process, as the flags ask for.

    Raises:
        MisconfigurationError: as `requested_devices`, or there are fewer devices than local processes.
    """
    kind, indices = requested_devices(accelerator, devices)
    if kind == "cpu":
        return torch.device("cpu")
    if process_index >= len(indices):
        raise MisconfigurationError(
            f"Local process {process_index} has no device: Trainer(devices={devices!r}) gives {len(indices)}. Start "
            "as many processes per machine as devices (torchrun --nproc-per-node)."
        )
    return torch.device(kind, indices[process_index])


class DevicePlacement(Plugin):
    """Move the module to a device at ``setup`` and every batch to it before the batch hooks run.

    Batches are moved at ``on_batch_start``, ``on_validation_batch_start`` and
    ``on_test_batch_start`` (before the module's own hooks, so they see the
    moved batch), and prediction batches just before ``predict_step``. The
    module stays on the device after the run.

    Args:
        device: the device; None picks it at ``setup`` from ``accelerator`` and
            ``devices``, using ``LOCAL_RANK`` as the process index under a launcher.
        accelerator: as the Trainer flag; read only when ``device`` is None.
        devices: as the Trainer flag; read only when ``device`` is None.
    """

    def __init__(self, device: str | torch.device | None = None, *, accelerator: str = "auto",
                 devices: Any = "auto") -> None:
        self._requested = torch.device(device) if device is not None else None
        self.accelerator = accelerator
        self.devices = devices
        #: The device in use, known from ``setup`` on.
        self.device: torch.device | None = self._requested

    @on(Event.SETUP, order=PLACEMENT_ORDER)
    def place_module(self, payload: StagePayload) -> None:
        """Pick the device and move the module there."""
        device = self._requested or select_device(self.accelerator, self.devices, local_rank())
        if device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(device)
            config = getattr(payload.trainer, "config", None)
            if getattr(config, "deterministic", False):
                set_cublas_workspace()
        self.device = device
        payload.module.to(device)
        logger.debug("Placed %s on %s", type(payload.module).__name__, device)

    @on(Event.BATCH_START, order=BATCH_ORDER)
    @on(Event.VALIDATION_BATCH_START, order=BATCH_ORDER)
    @on(Event.TEST_BATCH_START, order=BATCH_ORDER)
    def move_batch(self, payload: BatchPayload | EvalBatchPayload) -> None:
        """Replace the payload's batch with its copy on the device."""
        if self.device is not None:
            payload.batch = move_to_device(payload.batch, self.device)

    @around(WrapPoint.FORWARD)
    def move_predict_batch(self, payload: ForwardPayload, proceed: Any) -> Any:
        """Move a prediction batch, which has no batch-start event, before ``predict_step`` runs."""
        if payload.stage == "predict" and self.device is not None and payload.args:
            payload.args = (move_to_device(payload.args[0], self.device), *payload.args[1:])
        return proceed()

    def __repr__(self) -> str:
        return f"DevicePlacement(device={self.device!s})"


def set_cublas_workspace() -> None:
    """Set ``CUBLAS_WORKSPACE_CONFIG`` unless the user set it, so cuBLAS results repeat between runs.

    It must happen before the first cuBLAS call of the process, which is why
    placement does it at ``setup``.
    """
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
        logger.info("deterministic=True: set CUBLAS_WORKSPACE_CONFIG=%s", CUBLAS_WORKSPACE)


def plugins_from_flags(config: Any, user_plugins: Sequence[Plugin]) -> list[Plugin]:
    """Return the placement, precision and strategy plugins the Trainer flags ask for.

    A kind of plugin the user passed already (a DevicePlacement, a
    MixedPrecision, a DataParallel or DistributedDataParallel) is not added
    again. ``strategy="auto"`` picks DistributedDataParallel for more than one
    device or node and a single device otherwise; ``"ddp"`` and
    ``"ddp_spawn"`` both start processes when no launcher did. A strategy given
    as a plugin instance is used as it is.

    Args:
        config: the Trainer's `TrainerConfig`.
        user_plugins: the plugins from ``plugins=`` and ``callbacks=``.

    Raises:
        MisconfigurationError: the flags conflict or ask for hardware that is missing.
    """
    from hookrt.plugins.ddp import DistributedDataParallel
    from hookrt.plugins.dp import DataParallel
    from hookrt.plugins.precision import MixedPrecision

    kind, indices = requested_devices(config.accelerator, config.devices)
    added: list[Plugin] = []
    strategy = config.strategy
    has_strategy = any(isinstance(p, (DistributedDataParallel, DataParallel)) for p in user_plugins)
    if isinstance(strategy, Plugin):
        if not any(p is strategy for p in user_plugins):
            added.append(strategy)
        has_strategy = True
    elif not isinstance(strategy, str):
        raise MisconfigurationError(
            f"Trainer(strategy={strategy!r}) is not valid: give a strategy name or a plugin instance such as "
            "hookrt.plugins.DistributedDataParallel()."
        )
    if not has_strategy:
        added.extend(_strategy_plugins(str(strategy), kind, indices, config.num_nodes))
    if kind != "cpu" and not any(isinstance(p, DevicePlacement) for p in user_plugins):
        added.append(DevicePlacement(accelerator=kind, devices=config.devices))
    if config.precision != "32-true" and not any(isinstance(p, MixedPrecision) for p in user_plugins):
        added.append(MixedPrecision(config.precision, device_type=kind))
    return added


def _strategy_plugins(strategy: str, kind: str, indices: list[int], num_nodes: int) -> list[Plugin]:
    from hookrt.plugins.ddp import DistributedDataParallel
    from hookrt.plugins.dp import DataParallel

    several = len(indices) > 1 or num_nodes > 1
    if strategy == "auto":
        strategy = "ddp" if several else "single_device"
    if strategy == "single_device":
        if several:
            raise MisconfigurationError(
                f"Trainer(strategy='single_device') conflicts with {len(indices)} device(s) on {num_nodes} node(s). "
                "Use devices=1 and num_nodes=1, or strategy='ddp'."
            )
        return []
    if strategy == "dp":
        if kind != "cuda" or num_nodes > 1:
            raise MisconfigurationError(
                "Trainer(strategy='dp') needs CUDA GPUs on one machine (accelerator='cuda', num_nodes=1). Use "
                "strategy='ddp' for CPU processes or several machines."
            )
        return [DataParallel(device_ids=indices)]
    return [DistributedDataParallel(num_processes=len(indices))]
