"""`DataParallel`: splits each training batch across the GPUs of one machine with ``torch.nn.DataParallel``.

``torch.nn.DataParallel`` runs one thread per GPU in one process; PyTorch
recommends DistributedDataParallel instead, which is faster even on one
machine. This plugin exists for modules written for the Lightning 0.5 era,
where ``distributed_backend="dp"`` was common.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hookrt._errors import HookrtWarning
from hookrt._events import Event, ForwardPayload, StagePayload, WrapPoint
from hookrt._plugin import Plugin, around, on

__all__ = ["DataParallel", "StepRouter"]

logger = logging.getLogger(__name__)

#: After `DevicePlacement` (order -500), which puts the module on the first GPU.
SETUP_ORDER = -450


class StepRouter(nn.Module):
    """A module whose ``forward`` is the wrapped LightningModule's ``training_step``.

    ``torch.nn.DataParallel`` and ``DistributedDataParallel`` act only when their
    ``forward`` is called. Wrapping this router instead of the LightningModule
    sends ``training_step`` through them, while ``module(x)`` inside it still
    calls the user's own ``forward``. Its parameters are the module's.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.training_step(*args, **kwargs)  # type: ignore[operator]


def _mean_over_replicas(output: Any, replicas: int) -> Any:
    """Average the per-GPU values that ``DataParallel`` gathered into vectors of length <= ``replicas``."""
    if isinstance(output, torch.Tensor):
        if output.dim() == 1 and 1 <= output.shape[0] <= replicas and output.is_floating_point():
            return output.mean()
        return output
    if isinstance(output, Mapping):
        return {key: _mean_over_replicas(value, replicas) for key, value in output.items()}
    return output


class DataParallel(Plugin):
    """Run ``training_step`` under ``torch.nn.DataParallel`` on two or more GPUs.

    Each training batch is split along its first dimension, one chunk per GPU;
    the chunks' losses (and other one-value outputs) come back averaged. The
    evaluation steps run on the first GPU without splitting. With fewer than
    two GPUs the plugin warns and training runs unwrapped.

    Args:
        device_ids: the GPUs to use; None means every visible GPU. The module
            is moved to the first.
        output_device: where the outputs are gathered; the first GPU by default.
    """

    def __init__(self, device_ids: Sequence[int] | None = None, output_device: int | None = None) -> None:
        self.device_ids = list(device_ids) if device_ids is not None else None
        self.output_device = output_device
        #: The ``torch.nn.DataParallel`` wrapper during a run on two or more GPUs, else None.
        self.parallel: nn.DataParallel[StepRouter] | None = None

    @on(Event.SETUP, order=SETUP_ORDER)
    def wrap_module(self, payload: StagePayload) -> None:
        """Wrap the module for training, or warn that there are too few GPUs."""
        if payload.stage != "fit":
            return
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        device_ids = self.device_ids if self.device_ids is not None else list(range(available))
        if available < 2 or len(device_ids) < 2:
            warnings.warn(
                f"DataParallel found {available} CUDA device(s) and was given device_ids={self.device_ids}; it needs "
                "two or more GPUs, so training runs unwrapped on one device. Remove the plugin, or run on a "
                "machine with several GPUs.",
                HookrtWarning,
                stacklevel=2,
            )
            self.parallel = None
            return
        module = payload.module
        module.to(torch.device("cuda", device_ids[0]))
        self.parallel = nn.DataParallel(StepRouter(module), device_ids=device_ids, output_device=self.output_device)
        logger.info("DataParallel splits training batches across GPUs %s", device_ids)

    @around(WrapPoint.FORWARD)
    def route_training_step(self, payload: ForwardPayload, proceed: Callable[[], Any]) -> Any:
        """Send ``training_step`` through the DataParallel wrapper and average what the GPUs returned."""
        parallel = self.parallel
        if parallel is None or payload.stage != "train" or payload.call != payload.module.training_step:
            return proceed()
        payload.call = parallel
        with warnings.catch_warnings():
            # DataParallel warns each time it gathers one-value losses into a vector, which is expected here.
            warnings.filterwarnings("ignore", message="Was asked to gather along dimension 0", category=UserWarning)
            output = proceed()
        return _mean_over_replicas(output, len(parallel.device_ids))

    @on(Event.TEARDOWN)
    def unwrap(self, payload: StagePayload) -> None:
        """Drop the wrapper at the end of the run; the module stays on the first GPU."""
        self.parallel = None

    def __repr__(self) -> str:
        return f"DataParallel(device_ids={self.device_ids})"
