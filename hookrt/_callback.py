"""`Callback`: runs a callback written for PyTorch Lightning 2.x on the bus, unchanged.

Each method a subclass overrides is subscribed to its event; the payload is
turned back into Lightning's ``(trainer, pl_module, ...)`` arguments.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from hookrt._events import Event
from hookrt._plugin import SPECS_ATTRIBUTE, HandlerSpec, Plugin

__all__ = ["CALLBACK_METHODS", "Callback"]


class CallbackMethod(NamedTuple):
    """One Lightning callback method, its event and the payload fields it takes after ``(trainer, pl_module)``."""

    method: str
    event: Event
    fields: tuple[str, ...]


CALLBACK_METHODS: tuple[CallbackMethod, ...] = (
    CallbackMethod("setup", Event.SETUP, ("stage",)),
    CallbackMethod("on_fit_start", Event.FIT_START, ()),
    CallbackMethod("on_sanity_check_start", Event.SANITY_CHECK_START, ()),
    CallbackMethod("on_sanity_check_end", Event.SANITY_CHECK_END, ()),
    CallbackMethod("on_train_start", Event.TRAIN_START, ()),
    CallbackMethod("on_train_epoch_start", Event.EPOCH_START, ()),
    CallbackMethod("on_epoch_start", Event.EPOCH_START, ()),
    CallbackMethod("on_batch_start", Event.BATCH_START, ()),
    CallbackMethod("on_train_batch_start", Event.BATCH_START, ("batch", "batch_idx")),
    CallbackMethod("on_before_backward", Event.BEFORE_BACKWARD, ("loss",)),
    CallbackMethod("on_after_backward", Event.AFTER_BACKWARD, ()),
    CallbackMethod("on_before_optimizer_step", Event.BEFORE_OPTIMIZER_STEP, ("optimizer",)),
    CallbackMethod("on_before_zero_grad", Event.OPTIMIZER_STEP, ("optimizer",)),
    CallbackMethod("on_train_batch_end", Event.BATCH_END, ("outputs", "batch", "batch_idx")),
    CallbackMethod("on_batch_end", Event.BATCH_END, ()),
    CallbackMethod("on_validation_start", Event.VALIDATION_START, ()),
    CallbackMethod("on_validation_epoch_start", Event.VALIDATION_START, ()),
    CallbackMethod("on_validation_batch_start", Event.VALIDATION_BATCH_START,
                   ("batch", "batch_idx", "dataloader_idx")),
    CallbackMethod("on_validation_batch_end", Event.VALIDATION_BATCH_END,
                   ("outputs", "batch", "batch_idx", "dataloader_idx")),
    CallbackMethod("on_validation_epoch_end", Event.VALIDATION_END, ()),
    CallbackMethod("on_validation_end", Event.VALIDATION_END, ()),
    CallbackMethod("on_train_epoch_end", Event.EPOCH_END, ()),
    CallbackMethod("on_epoch_end", Event.EPOCH_END, ()),
    CallbackMethod("on_train_end", Event.TRAIN_END, ()),
    CallbackMethod("on_test_start", Event.TEST_START, ()),
    CallbackMethod("on_test_epoch_start", Event.TEST_START, ()),
    CallbackMethod("on_test_batch_start", Event.TEST_BATCH_START, ("batch", "batch_idx", "dataloader_idx")),
    CallbackMethod("on_test_batch_end", Event.TEST_BATCH_END, ("outputs", "batch", "batch_idx", "dataloader_idx")),
    CallbackMethod("on_test_epoch_end", Event.TEST_END, ()),
    CallbackMethod("on_test_end", Event.TEST_END, ()),
    CallbackMethod("on_predict_start", Event.PREDICT_START, ()),
    CallbackMethod("on_predict_epoch_start", Event.PREDICT_START, ()),
    CallbackMethod("on_predict_batch_end", Event.PREDICT_BATCH_END,
                   ("outputs", "batch", "batch_idx", "dataloader_idx")),
    CallbackMethod("on_predict_epoch_end", Event.PREDICT_END, ()),
    CallbackMethod("on_predict_end", Event.PREDICT_END, ()),
    CallbackMethod("on_fit_end", Event.FIT_END, ()),
    CallbackMethod("on_save_checkpoint", Event.SAVE_CHECKPOINT, ("checkpoint",)),
    CallbackMethod("on_load_checkpoint", Event.LOAD_CHECKPOINT, ("checkpoint",)),
    CallbackMethod("on_exception", Event.EXCEPTION, ("exception",)),
    CallbackMethod("teardown", Event.TEARDOWN, ("stage",)),
)


def _adapter(method: Callable[..., Any], fields: tuple[str, ...], qualname: str) -> Callable[[Any], Any]:
    def call(payload: Any) -> Any:
        return method(payload.trainer, payload.module, *[getattr(payload, name) for name in fields])

    call.__qualname__ = qualname
    # The method's own name, so that `Plugin.idle_handlers` and `bus.wake` name it as the user wrote it.
    call.__name__ = method.__name__
    return call


class Callback(Plugin):
    """Base class for Lightning-style callbacks: methods take ``(trainer, pl_module, ...)``.

    Override any of Lightning 2.x's callback methods (``on_train_batch_end``,
    ``on_validation_epoch_end``, ``state_dict`` ...); only overridden methods are
    subscribed. ``state_key`` defaults to the class name, as in Lightning.
    """

    def handler_specs(self) -> Iterator[tuple[Callable[..., Any], HandlerSpec]]:
        """Yield an adapter for every Lightning callback method the subclass overrides, then decorated methods."""
        for row in CALLBACK_METHODS:
            implementation = getattr(type(self), row.method, None)
            if implementation is None or implementation is getattr(Callback, row.method, None):
                continue
            qualname = f"{type(self).__name__}.{row.method}"
            yield _adapter(getattr(self, row.method), row.fields, qualname), HandlerSpec("on", row.event.value, {})
        yield from super().handler_specs()

    def undecorated_handlers(self) -> list[str]:
        """Return messages about ``on_*`` methods that match no Lightning callback method (likely typos)."""
        known = {row.method for row in CALLBACK_METHODS}
        messages = []
        for klass in type(self).__mro__:
            if klass is Callback or not issubclass(klass, Callback):
                continue
            for attribute, value in vars(klass).items():
                if not attribute.startswith("on_") or attribute in known or not callable(value):
                    continue
                if getattr(value, SPECS_ATTRIBUTE, None):
                    continue
                close = difflib.get_close_matches(attribute, sorted(known), n=1)
                hint = f" Did you mean {close[0]}()?" if close else ""
                messages.append(
                    f"{klass.__name__}.{attribute}() is not a callback method, so it is never called.{hint}"
                )
        return messages


def _add_method_stubs() -> None:
    """Give `Callback` a no-op per method, so subclasses can call ``super()`` as in Lightning."""
    for row in CALLBACK_METHODS:

        def stub(self: Callback, trainer: Any, pl_module: Any, *args: Any) -> None:
            return None

        stub.__name__ = stub.__qualname__ = row.method
        stub.__doc__ = f"Called on ``{row.event.value}``; override it to act there."
        setattr(Callback, row.method, stub)


_add_method_stubs()
