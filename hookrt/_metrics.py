"""Metric bookkeeping behind ``self.log``: step values, epoch means and the legacy dict returns.

Values stay tensors until a consumer asks for numbers, so logging costs no
device synchronisation on steps where nothing is written out.
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from hookrt._errors import HookrtWarning, MisconfigurationError

__all__ = ["MetricStore", "infer_batch_size"]

_REDUCTIONS = ("mean", "sum", "max", "min")


def _first_dims(batch: Any, found: list[int], depth: int = 0) -> None:
    if depth > 8 or len(found) > 16:
        return
    if isinstance(batch, torch.Tensor):
        if batch.dim() > 0:
            found.append(batch.shape[0])
    elif isinstance(batch, Mapping):
        for value in batch.values():
            _first_dims(value, found, depth + 1)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            _first_dims(value, found, depth + 1)
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for field in dataclasses.fields(batch):
            _first_dims(getattr(batch, field.name), found, depth + 1)


def infer_batch_size(batch: Any) -> tuple[int, bool]:
    """Return the batch size read from the first tensor's first dimension, and whether it was clear.

    It is unclear when the batch holds no tensor, or tensors whose first
    dimensions differ; the size is then the first one found, or 1.
    """
    found: list[int] = []
    _first_dims(batch, found)
    if not found:
        return 1, False
    return found[0], len(set(found)) == 1


class _Accumulator:
    """The running reduction of one metric over an epoch."""

    __slots__ = ("total", "weight", "reduce_fx", "on_step", "logger", "prog_bar")

    def __init__(self, reduce_fx: str, on_step: bool, logger: bool, prog_bar: bool) -> None:
        self.total: torch.Tensor | None = None
        self.weight = 0.0
        self.reduce_fx = reduce_fx
        self.on_step = on_step
        self.logger = logger
        self.prog_bar = prog_bar

    def add(self, value: torch.Tensor, weight: int) -> None:
        value = value.to(torch.float64)
        if self.total is None:
            self.total = value * weight if self.reduce_fx == "mean" else value.clone()
        elif self.reduce_fx == "mean":
            self.total = self.total + value * weight
        elif self.reduce_fx == "sum":
            self.total = self.total + value
        elif self.reduce_fx == "max":
            self.total = torch.maximum(self.total, value)
        else:
            self.total = torch.minimum(self.total, value)
        self.weight += weight

    def compute(self) -> torch.Tensor:
        assert self.total is not None  # an accumulator exists only after its first add
        if self.reduce_fx == "mean":
            return (self.total / self.weight).to(torch.float32)
        return self.total.to(torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "weight": self.weight,
            "reduce_fx": self.reduce_fx,
            "on_step": self.on_step,
            "logger": self.logger,
            "prog_bar": self.prog_bar,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> _Accumulator:
        accumulator = cls(state["reduce_fx"], state["on_step"], state["logger"], state["prog_bar"])
        accumulator.total = state["total"]
        accumulator.weight = float(state["weight"])
        return accumulator


class MetricStore:
    """Everything logged during a run, and what the trainer exposes of it.

    Attributes:
        stage: ``"train"``, ``"validate"``, ``"test"`` or ``"predict"``.
        batch: the batch being processed, for batch-size inference; None between batches.
        sanity_checking: values logged during sanity validation are discarded.
    """

    def __init__(self) -> None:
        self.stage = "train"
        self.batch: Any = None
        self.dataloader_suffix = ""
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self.logged_metrics: dict[str, torch.Tensor] = {}
        self.progress: dict[str, torch.Tensor] = {}
        self.pending_log: dict[str, torch.Tensor] = {}
        self._epoch: dict[str, dict[str, _Accumulator]] = {}
        self._batch_size: int | None = None
        self._warned_ambiguous = False

    # ------------------------------------------------------------------ logging

    def begin_batch(self, batch: Any) -> None:
        """Mark the start of a batch; its size is inferred on the first `log` that needs it."""
        self.batch = batch
        self._batch_size = None

    def end_batch(self) -> None:
        """Mark the end of a batch: later logs are epoch-level."""
        self.batch = None

    def log(
        self,
        name: str,
        value: Any,
        prog_bar: bool,
        logger: bool,
        on_step: bool | None,
        on_epoch: bool | None,
        reduce_fx: str,
        batch_size: int | None,
        sync_dist: bool,
    ) -> None:
        """Record one value; see ``LightningModule.log`` for the options."""
        # The common case, a reduced loss, is checked inline, because this runs at every step.
        tensor = value.detach() if type(value) is torch.Tensor and value.dim() == 0 else self._as_scalar(name, value)
        if reduce_fx not in _REDUCTIONS:
            raise MisconfigurationError(
                f"self.log('{name}', reduce_fx={reduce_fx!r}) is not supported. Use one of: {', '.join(_REDUCTIONS)}."
            )
        if sync_dist:
            tensor = _reduce_across_processes(tensor, reduce_fx)
        in_batch = self.batch is not None
        if on_step is None:
            on_step = in_batch and self.stage == "train"
        if on_epoch is None:
            on_epoch = not on_step
        if self.dataloader_suffix:
            name = name + self.dataloader_suffix
        if on_step and in_batch:
            key = f"{name}_step" if on_epoch else name
            self.callback_metrics[name] = tensor
            if logger:
                self.pending_log[key] = tensor
            if prog_bar:
                self.progress[key] = tensor
        if not on_epoch:
            return
        if not in_batch:
            self._set_epoch_value(name, tensor, on_step, logger, prog_bar)
            return
        accumulators = self._epoch.setdefault(self.stage, {})
        accumulator = accumulators.get(name)
        if accumulator is None:
            accumulator = accumulators[name] = _Accumulator(reduce_fx, on_step, logger, prog_bar)
        accumulator.add(tensor, batch_size if batch_size is not None else self._current_batch_size(name))

    def _as_scalar(self, name: str, value: Any) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                return value.detach()  # the common case: a reduced loss
            if value.numel() != 1:
                raise MisconfigurationError(
                    f"self.log('{name}', ...) got a tensor of shape {tuple(value.shape)}; it takes a number or a "
                    "one-element tensor. Reduce the value first, e.g. with .mean()."
                )
            return value.detach().reshape(())
        # numbers.Real also covers numpy's scalar types, such as numpy.float32 and numpy.int64.
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return torch.tensor(float(value))
        if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iuf":
            return torch.tensor(float(value.reshape(())))
        raise MisconfigurationError(
            f"self.log('{name}', ...) got a {type(value).__name__}; it takes a number or a one-element tensor."
        )

    def _current_batch_size(self, name: str) -> int:
        if self._batch_size is None:
            size, clear = infer_batch_size(self.batch)
            if not clear and not self._warned_ambiguous:
                self._warned_ambiguous = True
                warnings.warn(
                    f"Could not tell the batch size for the epoch mean of '{name}': the batch holds no tensor or "
                    f"tensors with different first dimensions; using {size}. Pass batch_size= to self.log.",
                    HookrtWarning,
                    stacklevel=5,
                )
            self._batch_size = size
        return self._batch_size

    def _set_epoch_value(self, name: str, tensor: torch.Tensor, on_step: bool, logger: bool, prog_bar: bool) -> None:
        key = f"{name}_epoch" if on_step else name
        self.callback_metrics[name] = tensor
        if logger:
            self.logged_metrics[key] = tensor
            self.pending_log[key] = tensor
        if prog_bar:
            self.progress[key] = tensor

    def log_legacy_output(self, output: Mapping[str, Any], *, skip: tuple[str, ...] = ()) -> None:
        """Take a 0.5-era dict: ``"log"`` goes to loggers, ``"progress_bar"`` to the bar.

        Every value, those two included, also becomes a callback metric, so a
        checkpoint or early-stopping plugin can monitor it; a top-level key wins
        over a nested one of the same name.
        """
        for key, value in output.items():
            if key in skip:
                continue
            if key == "log" and isinstance(value, Mapping):
                for name, item in value.items():
                    self.pending_log[name] = self._as_scalar(name, item)
                    if name not in output:
                        self.callback_metrics[name] = self.pending_log[name]
            elif key == "progress_bar" and isinstance(value, Mapping):
                for name, item in value.items():
                    self.progress[name] = self._as_scalar(name, item)
                    if name not in output:
                        self.callback_metrics[name] = self.progress[name]
            elif isinstance(value, torch.Tensor) and value.numel() == 1:
                self.callback_metrics[key] = value.detach().reshape(())
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self.callback_metrics[key] = torch.tensor(float(value))

    # ------------------------------------------------------------------ epochs and log points

    def end_epoch(self, stage: str, keep: bool = False) -> None:
        """Turn a stage's epoch accumulators into epoch values, then start that stage afresh.

        With ``keep``, the accumulators stay, for an epoch that may still continue after a resume.
        """
        accumulators = self._epoch.get(stage, {}) if keep else self._epoch.pop(stage, {})
        for name, accumulator in accumulators.items():
            self._set_epoch_value(name, accumulator.compute(), accumulator.on_step, accumulator.logger,
                                  accumulator.prog_bar)

    def take_pending(self) -> dict[str, float]:
        """Return the values waiting for loggers as floats, and clear them."""
        if not self.pending_log:
            return {}
        pending, self.pending_log = self.pending_log, {}
        self.logged_metrics.update(pending)
        return {key: float(value) for key, value in pending.items()}

    def discard_pending(self) -> None:
        """Drop values waiting for loggers (after sanity validation)."""
        self.pending_log = {}

    def state_dict(self) -> dict[str, Any]:
        """Return the epoch accumulators and the metric values, for checkpoints."""
        return {
            "epoch": {
                stage: {name: accumulator.state_dict() for name, accumulator in accumulators.items()}
                for stage, accumulators in self._epoch.items()
            },
            "callback_metrics": dict(self.callback_metrics),
            "logged_metrics": dict(self.logged_metrics),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self._epoch = {
            stage: {name: _Accumulator.from_state(item) for name, item in accumulators.items()}
            for stage, accumulators in state.get("epoch", {}).items()
        }
        self.callback_metrics = dict(state.get("callback_metrics", {}))
        self.logged_metrics = dict(state.get("logged_metrics", {}))


def _reduce_across_processes(tensor: torch.Tensor, reduce_fx: str) -> torch.Tensor:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    reduced = tensor.clone().to(torch.float32)
    if reduce_fx == "max":
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    elif reduce_fx == "min":
        dist.all_reduce(reduced, op=dist.ReduceOp.MIN)
    else:
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        if reduce_fx == "mean":
            reduced /= dist.get_world_size()
    return reduced
