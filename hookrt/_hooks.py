"""The table that maps the LightningModule's hooks onto bus events.

Each row names a module hook, the event it listens to and how the payload
becomes the hook's arguments. The trainer subscribes only the hooks that the
user's class overrides, under the owner name ``"module"`` and an order that
runs them before plugins on the same event, in the row order of this table.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

from hookrt._bus import Bus, Handle
from hookrt._errors import CancelEpoch
from hookrt._events import Event

__all__ = ["MODULE_HOOKS", "MODULE_ORDER", "HookRow", "subscribe_module_hooks"]

#: Order of module hooks on the bus: before every plugin at the default order 0.
MODULE_ORDER = -1000


class HookRow(NamedTuple):
    """One module hook: its name, its event and the adapter that calls it with the payload."""

    hook: str
    event: Event
    call: Callable[[Callable[..., Any], Any], Any]


def _no_args(hook: Callable[..., Any], payload: Any) -> Any:
    return hook()


def _stage(hook: Callable[..., Any], payload: Any) -> Any:
    return hook(payload.stage)


def _checkpoint(hook: Callable[..., Any], payload: Any) -> Any:
    return hook(payload.checkpoint)


def _loss(hook: Callable[..., Any], payload: Any) -> Any:
    return hook(payload.loss)


def _optimizer(hook: Callable[..., Any], payload: Any) -> Any:
    return hook(payload.optimizer)


def _optimizer_with_index(hook: Callable[..., Any], payload: Any) -> Any:
    return hook(payload.optimizer, payload.optimizer_idx)


def _batch_only(hook: Callable[..., Any], payload: Any) -> Any:
    _check_cancel_sentinel(hook(payload.batch), "on_batch_start")


def _train_batch_start(hook: Callable[..., Any], payload: Any) -> Any:
    _check_cancel_sentinel(hook(payload.batch, payload.batch_idx), "on_train_batch_start")


def _train_batch_end(hook: Callable[..., Any], payload: Any) -> Any:
    return hook(payload.outputs, payload.batch, payload.batch_idx)


def _eval_batch_start(hook: Callable[..., Any], payload: Any) -> Any:
    return hook(payload.batch, payload.batch_idx, payload.dataloader_idx)


def _eval_batch_end(hook: Callable[..., Any], payload: Any) -> Any:
    return hook(payload.outputs, payload.batch, payload.batch_idx, payload.dataloader_idx)


def _check_cancel_sentinel(result: Any, hook_name: str) -> None:
    if isinstance(result, int) and not isinstance(result, bool) and result == -1:
        warnings.warn(
            f"Returning -1 from {hook_name} to skip the rest of the epoch is deprecated. "
            "Raise hookrt.CancelEpoch instead.",
            DeprecationWarning,
            stacklevel=4,
        )
        raise CancelEpoch


MODULE_HOOKS: tuple[HookRow, ...] = (
    HookRow("setup", Event.SETUP, _stage),
    HookRow("on_fit_start", Event.FIT_START, _no_args),
    HookRow("on_train_start", Event.TRAIN_START, _no_args),
    HookRow("on_epoch_start", Event.EPOCH_START, _no_args),
    HookRow("on_train_epoch_start", Event.EPOCH_START, _no_args),
    HookRow("on_batch_start", Event.BATCH_START, _batch_only),
    HookRow("on_train_batch_start", Event.BATCH_START, _train_batch_start),
    HookRow("on_before_backward", Event.BEFORE_BACKWARD, _loss),
    HookRow("on_after_backward", Event.AFTER_BACKWARD, _no_args),
    HookRow("on_before_optimizer_step", Event.BEFORE_OPTIMIZER_STEP, _optimizer),
    HookRow("on_before_zero_grad", Event.OPTIMIZER_STEP, _optimizer),
    HookRow("on_batch_end", Event.BATCH_END, _no_args),
    HookRow("on_train_batch_end", Event.BATCH_END, _train_batch_end),
    HookRow("on_validation_start", Event.VALIDATION_START, _no_args),
    HookRow("on_validation_epoch_start", Event.VALIDATION_START, _no_args),
    HookRow("on_validation_batch_start", Event.VALIDATION_BATCH_START, _eval_batch_start),
    HookRow("on_validation_batch_end", Event.VALIDATION_BATCH_END, _eval_batch_end),
    HookRow("on_validation_epoch_end", Event.VALIDATION_END, _no_args),
    HookRow("on_validation_end", Event.VALIDATION_END, _no_args),
    HookRow("on_epoch_end", Event.EPOCH_END, _no_args),
    HookRow("on_train_epoch_end", Event.EPOCH_END, _no_args),
    HookRow("on_train_end", Event.TRAIN_END, _no_args),
    HookRow("on_test_start", Event.TEST_START, _no_args),
    HookRow("on_test_epoch_start", Event.TEST_START, _no_args),
    HookRow("on_test_batch_start", Event.TEST_BATCH_START, _eval_batch_start),
    HookRow("on_test_batch_end", Event.TEST_BATCH_END, _eval_batch_end),
    HookRow("on_test_epoch_end", Event.TEST_END, _no_args),
    HookRow("on_test_end", Event.TEST_END, _no_args),
    HookRow("on_predict_start", Event.PREDICT_START, _no_args),
    HookRow("on_predict_epoch_start", Event.PREDICT_START, _no_args),
    HookRow("on_predict_batch_end", Event.PREDICT_BATCH_END, _eval_batch_end),
    HookRow("on_predict_epoch_end", Event.PREDICT_END, _no_args),
    HookRow("on_predict_end", Event.PREDICT_END, _no_args),
    HookRow("on_fit_end", Event.FIT_END, _no_args),
    HookRow("on_save_checkpoint", Event.SAVE_CHECKPOINT, _checkpoint),
    HookRow("on_load_checkpoint", Event.LOAD_CHECKPOINT, _checkpoint),
    HookRow("teardown", Event.TEARDOWN, _stage),
)


def _overrides(module: Any, base: type, hook: str) -> bool:
    implementation = getattr(type(module), hook, None)
    return implementation is not None and implementation is not getattr(base, hook, None)


def _adapter(row: HookRow, module: Any) -> Callable[[Any], Any]:
    hook = getattr(module, row.hook)
    call = row.call
    if row.hook == "on_before_optimizer_step" and _positional_count(hook) >= 2:
        call = _optimizer_with_index  # the 1.x signature (optimizer, optimizer_idx)

    def run_hook(payload: Any) -> Any:
        return call(hook, payload)

    run_hook.__qualname__ = f"{type(module).__name__}.{row.hook}"
    return run_hook


def _positional_count(fn: Callable[..., Any]) -> int:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 0
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for parameter in parameters if parameter.kind in kinds)


def subscribe_module_hooks(bus: Bus, module: Any, base: type, owner: str = "module") -> list[Handle]:
    """Subscribe every hook of ``module`` that its class overrides from ``base``.

    Returns the handles, so the caller can remove them when the run ends.
    """
    handles = []
    for row in MODULE_HOOKS:
        if _overrides(module, base, row.hook):
            handles.append(bus.subscribe(row.event, _adapter(row, module), name=owner, order=MODULE_ORDER))
    return handles

