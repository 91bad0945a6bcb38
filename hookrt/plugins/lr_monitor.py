"""A plugin that logs each optimizer's learning rate, and optionally its momentum."""

from __future__ import annotations

from typing import Any

from hookrt._errors import MisconfigurationError
from hookrt._events import BatchPayload, EpochPayload, Payload
from hookrt._plugin import Plugin, on
from hookrt._rank import rank_zero_warn
from hookrt.plugins.logger import log_through_trainer

__all__ = ["LearningRateMonitor"]

_INTERVALS = (None, "step", "epoch")


class LearningRateMonitor(Plugin):
    """Log the learning rate of every parameter group of every optimizer.

    Names follow the optimizer class: ``lr-Adam`` for a one-group optimizer,
    ``lr-Adam/pg1``, ``lr-Adam/pg2`` (counted from 1) for the groups of one
    with several, and ``lr-Adam-1`` for the second optimizer of the same
    class. A scheduler configuration with a ``name`` replaces ``lr-Adam``.
    Momentum (``momentum``, or the first of Adam's ``betas``) gets the
    suffix ``-momentum``: ``lr-Adam-momentum``.

    Values go to the loggers through ``trainer.log_metrics`` at the current
    global step. On the step interval they are read at the start of a batch,
    so each value is the one that the coming optimizer step uses, every
    ``trainer.log_every_n_steps`` optimizer steps.

    Args:
        logging_interval: ``"step"`` logs every optimizer on the step interval,
            and ``"epoch"`` logs every optimizer at the start of each epoch. None
            logs an optimizer whose scheduler steps per epoch at the start of each
            epoch, and every other optimizer on the step interval.
        log_momentum: also log each parameter group's momentum.

    Raises:
        MisconfigurationError: ``logging_interval`` is not None, ``"step"`` or ``"epoch"``.
    """

    critical = False

    def __init__(self, logging_interval: str | None = None, log_momentum: bool = False) -> None:
        if logging_interval not in _INTERVALS:
            raise MisconfigurationError(
                f"LearningRateMonitor(logging_interval={logging_interval!r}) is invalid: use 'step', 'epoch', "
                "or None to follow each scheduler's own interval."
            )
        self.logging_interval = logging_interval
        self.log_momentum = bool(log_momentum)
        #: The values most recently handed to the loggers, by metric name.
        self.last_values: dict[str, float] = {}
        #: The first global step of the next step interval, where the next value is logged.
        self._next_step = 0

    @on("on_train_start")
    def _check_loggers(self, payload: Payload) -> None:
        self._next_step = 0
        if not getattr(payload.trainer, "loggers", None):
            rank_zero_warn(
                "LearningRateMonitor has no logger to write to because the trainer has no loggers. "
                "Pass a logger to the Trainer, or remove the LearningRateMonitor."
            )

    @on("on_epoch_start")
    def _log_epoch_interval(self, payload: EpochPayload) -> None:
        trainer = payload.trainer
        if self.logging_interval == "step":
            return
        self._log(trainer, interval="epoch")

    @on("on_batch_start")
    def _log_step_interval(self, payload: BatchPayload) -> None:
        if self.logging_interval == "epoch":
            return
        trainer = payload.trainer
        # A batch can advance global_step by more than one (one step per optimizer), so the test is whether
        # a new interval was reached, rather than step % every == 0, which such a batch could jump over.
        if trainer.global_step < self._next_step:
            return
        step = int(trainer.global_step)
        every = max(int(getattr(trainer, "log_every_n_steps", 1)), 1)
        self._next_step = (step // every + 1) * every
        self._log(trainer, interval="step")

    def _log(self, trainer: Any, interval: str) -> None:
        metrics: dict[str, float] = {}
        schedulers = _scheduler_configs_by_optimizer(trainer)
        name_counts: dict[str, int] = {}
        for optimizer in getattr(trainer, "optimizers", ()) or ():
            config = schedulers.get(id(optimizer))
            base = self._base_name(optimizer, config, name_counts)
            if not self._due(config, interval):
                continue
            metrics.update(self._group_values(optimizer, base))
        if metrics:
            self.last_values.update(metrics)
            log_through_trainer(trainer, metrics, int(trainer.global_step))

    def _due(self, config: Any, interval: str) -> bool:
        if self.logging_interval is not None:
            return self.logging_interval == interval
        scheduler_interval = getattr(config, "interval", "epoch") if config is not None else "step"
        return (scheduler_interval == "epoch") == (interval == "epoch")

    @staticmethod
    def _base_name(optimizer: Any, config: Any, name_counts: dict[str, int]) -> str:
        name = getattr(config, "name", None) if config is not None else None
        base = name if isinstance(name, str) and name else f"lr-{type(optimizer).__name__}"
        count = name_counts.get(base, 0)
        name_counts[base] = count + 1
        return base if count == 0 else f"{base}-{count}"

    def _group_values(self, optimizer: Any, base: str) -> dict[str, float]:
        values: dict[str, float] = {}
        groups = optimizer.param_groups
        for index, group in enumerate(groups, start=1):
            suffix = f"/pg{index}" if len(groups) > 1 else ""
            values[f"{base}{suffix}"] = float(group["lr"])
            if self.log_momentum:
                momentum = _momentum(group)
                if momentum is None:
                    rank_zero_warn(
                        f"LearningRateMonitor(log_momentum=True) found no momentum for optimizer "
                        f"{type(optimizer).__name__}: its parameter groups have neither 'momentum' nor 'betas'. "
                        "Its momentum is not logged; pass log_momentum=False to silence this warning."
                    )
                    continue
                values[f"{base}-momentum{suffix}"] = momentum
        return values


def _momentum(group: dict[str, Any]) -> float | None:
    if "momentum" in group:
        return float(group["momentum"])
    betas = group.get("betas")
    if isinstance(betas, (tuple, list)) and betas:
        return float(betas[0])
    return None


def _scheduler_configs_by_optimizer(trainer: Any) -> dict[int, Any]:
    """Map ``id(optimizer)`` to the first scheduler configuration that steps it."""
    configs: dict[int, Any] = {}
    for config in getattr(trainer, "lr_scheduler_configs", ()) or ():
        optimizer = getattr(getattr(config, "scheduler", None), "optimizer", None)
        if optimizer is not None:
            configs.setdefault(id(optimizer), config)
    return configs
