"""Reading what ``configure_optimizers`` returned, and stepping schedulers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hookrt._errors import MisconfigurationError

__all__ = ["LRSchedulerConfig", "parse_optimizers", "step_schedulers"]

_SCHEDULER_KEYS = frozenset({"scheduler", "interval", "frequency", "monitor", "name", "strict"})


@dataclass
class LRSchedulerConfig:
    """A scheduler with the options that say when it steps."""

    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1
    monitor: str | None = None
    name: str | None = None
    strict: bool = True
    optimizer_idx: int = 0

    @property
    def is_plateau(self) -> bool:
        """Whether the scheduler's step takes a metric value (ReduceLROnPlateau)."""
        return isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _is_optimizer(value: Any) -> bool:
    return isinstance(value, torch.optim.Optimizer)


def _scheduler_config(value: Any, where: str) -> LRSchedulerConfig:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - _SCHEDULER_KEYS)
        if unknown:
            raise MisconfigurationError(
                f"configure_optimizers() returned an lr_scheduler dict with unknown key(s) {unknown} {where}. "
                f"Valid keys: {', '.join(sorted(_SCHEDULER_KEYS))}."
            )
        if "scheduler" not in value:
            raise MisconfigurationError(
                f"configure_optimizers() returned an lr_scheduler dict without a 'scheduler' entry {where}. "
                "Put the scheduler object under 'scheduler'."
            )
        config = LRSchedulerConfig(**{key: value[key] for key in value})
    else:
        config = LRSchedulerConfig(scheduler=value)
    if config.interval not in ("epoch", "step"):
        raise MisconfigurationError(
            f"lr_scheduler interval={config.interval!r} {where} is not valid. Use 'epoch' or 'step'."
        )
    if isinstance(config.frequency, bool) or not isinstance(config.frequency, int) or config.frequency < 1:
        raise MisconfigurationError(
            f"lr_scheduler frequency={config.frequency!r} {where} is not valid. Use a positive int."
        )
    if not hasattr(config.scheduler, "step") or not hasattr(config.scheduler, "optimizer"):
        raise MisconfigurationError(
            f"configure_optimizers() returned {type(config.scheduler).__name__} as a scheduler {where}, which "
            "has no step() or no optimizer. Return a torch.optim.lr_scheduler object."
        )
    if config.is_plateau and config.monitor is None:
        config.monitor = "val_loss"
    return config


def parse_optimizers(result: Any) -> tuple[list[torch.optim.Optimizer], list[LRSchedulerConfig]]:
    """Normalise every form ``configure_optimizers`` may return into optimizers and scheduler configs.

    Accepted: an optimizer; a list or tuple of optimizers; a pair ``(optimizers,
    schedulers)``; a dict with ``"optimizer"`` and optional ``"lr_scheduler"``;
    a list or tuple of such dicts.

    Raises:
        MisconfigurationError: anything else, a scheduler bound to an optimizer
            that was not returned, or an optimizer with no parameters.
    """
    optimizers: list[torch.optim.Optimizer] = []
    configs: list[LRSchedulerConfig] = []
    if _is_optimizer(result):
        optimizers = [result]
    elif isinstance(result, Mapping):
        optimizers, configs = _from_dicts([result])
    elif isinstance(result, Sequence) and not isinstance(result, str) and result:
        if all(_is_optimizer(item) for item in result):
            optimizers = list(result)
        elif all(isinstance(item, Mapping) for item in result):
            optimizers, configs = _from_dicts(result)
        elif len(result) == 2 and isinstance(result[0], Sequence) and all(_is_optimizer(o) for o in result[0]):
            optimizers = list(result[0])
            schedulers = result[1] if isinstance(result[1], Sequence) else [result[1]]
            configs = [_scheduler_config(item, "in the schedulers list") for item in schedulers]
        elif len(result) == 2 and _is_optimizer(result[0]):
            optimizers = [result[0]]
            configs = [_scheduler_config(result[1], "as the second item")]
    if not optimizers:
        raise MisconfigurationError(
            f"configure_optimizers() returned {_describe(result)}, which hookrt cannot use. Return an optimizer, "
            "a list of optimizers, a pair (optimizers, schedulers), or a dict "
            "{'optimizer': ..., 'lr_scheduler': ...}."
        )
    for index, optimizer in enumerate(optimizers):
        if not any(group["params"] for group in optimizer.param_groups):
            raise MisconfigurationError(
                f"Optimizer {index} ({type(optimizer).__name__}) from configure_optimizers() has no parameters. "
                "Pass the module's parameters, e.g. torch.optim.SGD(self.parameters(), lr=0.1)."
            )
    for config in configs:
        matches = [index for index, optimizer in enumerate(optimizers) if optimizer is config.scheduler.optimizer]
        if not matches:
            raise MisconfigurationError(
                f"Scheduler {type(config.scheduler).__name__} from configure_optimizers() belongs to an optimizer "
                "that configure_optimizers() did not return. Build the scheduler on one of the returned optimizers."
            )
        config.optimizer_idx = matches[0]
    return optimizers, configs


def _from_dicts(items: Sequence[Any]) -> tuple[list[torch.optim.Optimizer], list[LRSchedulerConfig]]:
    optimizers: list[torch.optim.Optimizer] = []
    configs: list[LRSchedulerConfig] = []
    for position, item in enumerate(items):
        unknown = sorted(set(item) - {"optimizer", "lr_scheduler", "frequency", "monitor"})
        if unknown or not _is_optimizer(item.get("optimizer")):
            problem = f"unknown key(s) {unknown}" if unknown else "no torch optimizer under 'optimizer'"
            raise MisconfigurationError(
                f"configure_optimizers() returned a dict (item {position}) with {problem}. Use "
                "{'optimizer': optimizer, 'lr_scheduler': scheduler or {'scheduler': ..., 'interval': ...}}."
            )
        optimizers.append(item["optimizer"])
        if item.get("lr_scheduler") is not None:
            config = _scheduler_config(item["lr_scheduler"], f"in item {position}")
            if config.monitor is None and item.get("monitor") is not None:
                config.monitor = item["monitor"]
            configs.append(config)
    return optimizers, configs


def _describe(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {', '.join(type(item).__name__ for item in value) or 'nothing'}"
    return f"a {type(value).__name__}"


def step_schedulers(
    configs: Sequence[LRSchedulerConfig], interval: str, count: int, metrics: Mapping[str, torch.Tensor],
    optimizer_idx: int | None = None,
) -> None:
    """Step every scheduler of ``interval`` whose frequency divides ``count``.

    Args:
        configs: the run's scheduler configs.
        interval: ``"step"`` or ``"epoch"``.
        count: steps of that optimizer, or epochs completed.
        metrics: ``trainer.callback_metrics``, for schedulers with a ``monitor``.
        optimizer_idx: for step schedulers, the optimizer that just stepped.

    Raises:
        MisconfigurationError: a monitored metric is missing and the config is strict.
    """
    for config in configs:
        if config.interval != interval or count % config.frequency:
            continue
        if optimizer_idx is not None and config.optimizer_idx != optimizer_idx:
            continue
        if config.is_plateau:
            monitor = config.monitor or "val_loss"
            if monitor not in metrics:
                if not config.strict:
                    continue
                available = ", ".join(sorted(metrics)) or "none"
                raise MisconfigurationError(
                    f"Scheduler {type(config.scheduler).__name__} monitors '{monitor}', which was not logged. "
                    f"Logged metrics: {available}. Log it with self.log('{monitor}', ...) or set 'monitor' to one "
                    "of those."
                )
            config.scheduler.step(metrics[monitor])
        else:
            config.scheduler.step()
