"""The event catalog: event names, wrapper points and their payload types.

Where each event fires during ``Trainer.fit``::

    setup(stage)
    on_fit_start
      on_sanity_check_start                       when num_sanity_val_steps > 0
        on_validation_start
          on_validation_batch_start / on_validation_batch_end   per batch
        on_validation_end
      on_sanity_check_end
      on_train_start
        on_epoch_start                            per epoch
          on_batch_start                          per batch
            [around batch_step]
              per optimizer and truncated-BPTT split, inside the closure:
                [around forward] training_step
                before_backward
                after_backward
              when the accumulation window closes:
                before_optimizer_step             gradients final and unscaled
                [around optimizer_step] module.optimizer_step(..., closure)
                optimizer_step                    once per applied step
          on_batch_end
          on_log                                  every log_every_n_steps
          validation, as above, when val_check_interval says so
        on_epoch_end
      on_train_end
    on_fit_end
    teardown(stage)

``validate`` emits ``setup``, the validation events and ``teardown``;
``test`` emits ``on_test_start``, ``on_test_batch_start``,
``on_test_batch_end`` and ``on_test_end`` in the same places; ``predict``
emits ``on_predict_start``, ``on_predict_batch_end`` and ``on_predict_end``.
``on_save_checkpoint`` and ``on_load_checkpoint`` fire whenever a checkpoint
is written or restored, and ``on_exception`` when an exception ends a run.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = [
    "PAYLOAD_TYPES",
    "WRAP_PAYLOAD_TYPES",
    "BatchEndPayload",
    "BatchPayload",
    "CheckpointPayload",
    "EpochPayload",
    "EvalBatchEndPayload",
    "EvalBatchPayload",
    "EvalPayload",
    "Event",
    "ExceptionPayload",
    "ForwardPayload",
    "LogPayload",
    "LossPayload",
    "OptimizerPayload",
    "OptimizerStepPayload",
    "Payload",
    "StagePayload",
    "WrapPoint",
    "payload_fields",
]


class Event(str, enum.Enum):
    """Every event the loop emits. Each value is the string handlers subscribe to."""

    SETUP = "setup"
    TEARDOWN = "teardown"
    FIT_START = "on_fit_start"
    FIT_END = "on_fit_end"
    SANITY_CHECK_START = "on_sanity_check_start"
    SANITY_CHECK_END = "on_sanity_check_end"
    TRAIN_START = "on_train_start"
    TRAIN_END = "on_train_end"
    EPOCH_START = "on_epoch_start"
    EPOCH_END = "on_epoch_end"
    BATCH_START = "on_batch_start"
    BATCH_END = "on_batch_end"
    BEFORE_BACKWARD = "before_backward"
    AFTER_BACKWARD = "after_backward"
    BEFORE_OPTIMIZER_STEP = "before_optimizer_step"
    OPTIMIZER_STEP = "optimizer_step"
    VALIDATION_START = "on_validation_start"
    VALIDATION_END = "on_validation_end"
    VALIDATION_BATCH_START = "on_validation_batch_start"
    VALIDATION_BATCH_END = "on_validation_batch_end"
    TEST_START = "on_test_start"
    TEST_END = "on_test_end"
    TEST_BATCH_START = "on_test_batch_start"
    TEST_BATCH_END = "on_test_batch_end"
    PREDICT_START = "on_predict_start"
    PREDICT_END = "on_predict_end"
    PREDICT_BATCH_END = "on_predict_batch_end"
    SAVE_CHECKPOINT = "on_save_checkpoint"
    LOAD_CHECKPOINT = "on_load_checkpoint"
    LOG = "on_log"
    EXCEPTION = "on_exception"

    def __str__(self) -> str:
        return self.value

    @property
    def payload_type(self) -> type[Payload]:
        """The payload class that handlers of this event receive."""
        return PAYLOAD_TYPES[self]

    @property
    def fields(self) -> tuple[str, ...]:
        """The payload's own fields, after ``trainer`` and ``module`` (empty for a plain `Payload`)."""
        return payload_fields(PAYLOAD_TYPES[self])


class WrapPoint(str, enum.Enum):
    """The places where ``@hookrt.around`` wrappers run, outermost first.

    These are a namespace of their own: ``around("optimizer_step")`` wraps the
    act of stepping, while ``on("optimizer_step")`` hears that a step was applied.
    """

    BATCH_STEP = "batch_step"
    FORWARD = "forward"
    OPTIMIZER_STEP = "optimizer_step"

    def __str__(self) -> str:
        return self.value


class Payload:
    """Base payload: the trainer and the module, present on every event."""

    __slots__ = ("trainer", "module")

    def __init__(self, trainer: Any, module: Any) -> None:
        self.trainer = trainer
        self.module = module

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in payload_fields(type(self)))
        return f"{type(self).__name__}({shown})"


def payload_fields(payload_type: type[Payload]) -> tuple[str, ...]:
    """Return the fields of ``payload_type`` other than ``trainer`` and ``module``, base classes first."""
    return tuple(
        name
        for klass in reversed(payload_type.__mro__)
        if issubclass(klass, Payload) and klass is not Payload
        for name in klass.__dict__.get("__slots__", ())
    )


class StagePayload(Payload):
    """``setup`` and ``teardown``: which entry point runs (fit, validate, test, predict)."""

    __slots__ = ("stage",)

    def __init__(self, trainer: Any, module: Any, *, stage: str) -> None:
        self.trainer = trainer
        self.module = module
        self.stage = stage


class EpochPayload(Payload):
    """``on_epoch_start`` and ``on_epoch_end``: the epoch index, counted from 0."""

    __slots__ = ("epoch",)

    def __init__(self, trainer: Any, module: Any, *, epoch: int) -> None:
        self.trainer = trainer
        self.module = module
        self.epoch = epoch


class BatchPayload(Payload):
    """``on_batch_start``: the batch as the loader yielded it and its index in the epoch."""

    __slots__ = ("batch", "batch_idx")

    def __init__(self, trainer: Any, module: Any, *, batch: Any, batch_idx: int) -> None:
        self.trainer = trainer
        self.module = module
        self.batch = batch
        self.batch_idx = batch_idx


class BatchEndPayload(Payload):
    """``on_batch_end``: the batch, its index and what ``training_step`` returned."""

    __slots__ = ("batch", "batch_idx", "outputs")

    def __init__(self, trainer: Any, module: Any, *, batch: Any, batch_idx: int, outputs: Any) -> None:
        self.trainer = trainer
        self.module = module
        self.batch = batch
        self.batch_idx = batch_idx
        self.outputs = outputs


class LossPayload(Payload):
    """``before_backward`` and ``after_backward``: the loss being differentiated."""

    __slots__ = ("loss", "optimizer_idx")

    def __init__(self, trainer: Any, module: Any, *, loss: Any, optimizer_idx: int = 0) -> None:
        self.trainer = trainer
        self.module = module
        self.loss = loss
        self.optimizer_idx = optimizer_idx


class OptimizerPayload(Payload):
    """``before_optimizer_step`` and the ``optimizer_step`` wrapper point."""

    __slots__ = ("optimizer", "optimizer_idx")

    def __init__(self, trainer: Any, module: Any, *, optimizer: Any, optimizer_idx: int) -> None:
        self.trainer = trainer
        self.module = module
        self.optimizer = optimizer
        self.optimizer_idx = optimizer_idx


class OptimizerStepPayload(Payload):
    """``optimizer_step``: a step was applied, or skipped by the gradient scaler."""

    __slots__ = ("optimizer", "optimizer_idx", "skipped")

    def __init__(self, trainer: Any, module: Any, *, optimizer: Any, optimizer_idx: int, skipped: bool) -> None:
        self.trainer = trainer
        self.module = module
        self.optimizer = optimizer
        self.optimizer_idx = optimizer_idx
        self.skipped = skipped


class EvalPayload(Payload):
    """Start and end of a validation, test or predict run."""

    __slots__ = ("sanity_checking",)

    def __init__(self, trainer: Any, module: Any, *, sanity_checking: bool = False) -> None:
        self.trainer = trainer
        self.module = module
        self.sanity_checking = sanity_checking


class EvalBatchPayload(Payload):
    """Start of a validation or test batch."""

    __slots__ = ("batch", "batch_idx", "dataloader_idx", "sanity_checking")

    def __init__(
        self,
        trainer: Any,
        module: Any,
        *,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
        sanity_checking: bool = False,
    ) -> None:
        self.trainer = trainer
        self.module = module
        self.batch = batch
        self.batch_idx = batch_idx
        self.dataloader_idx = dataloader_idx
        self.sanity_checking = sanity_checking


class EvalBatchEndPayload(Payload):
    """End of a validation, test or predict batch, with the step's outputs."""

    __slots__ = ("batch", "batch_idx", "dataloader_idx", "outputs", "sanity_checking")

    def __init__(
        self,
        trainer: Any,
        module: Any,
        *,
        batch: Any,
        batch_idx: int,
        outputs: Any,
        dataloader_idx: int = 0,
        sanity_checking: bool = False,
    ) -> None:
        self.trainer = trainer
        self.module = module
        self.batch = batch
        self.batch_idx = batch_idx
        self.dataloader_idx = dataloader_idx
        self.outputs = outputs
        self.sanity_checking = sanity_checking


class CheckpointPayload(Payload):
    """``on_save_checkpoint`` (handlers may add keys) and ``on_load_checkpoint``."""

    __slots__ = ("checkpoint",)

    def __init__(self, trainer: Any, module: Any, *, checkpoint: dict[str, Any]) -> None:
        self.trainer = trainer
        self.module = module
        self.checkpoint = checkpoint


class LogPayload(Payload):
    """``on_log``: metric values (Python floats) to record at a global step."""

    __slots__ = ("metrics", "step")

    def __init__(self, trainer: Any, module: Any, *, metrics: dict[str, float], step: int) -> None:
        self.trainer = trainer
        self.module = module
        self.metrics = metrics
        self.step = step


class ExceptionPayload(Payload):
    """``on_exception``: the exception that is ending the run."""

    __slots__ = ("exception",)

    def __init__(self, trainer: Any, module: Any, *, exception: BaseException) -> None:
        self.trainer = trainer
        self.module = module
        self.exception = exception


class ForwardPayload(Payload):
    """The ``forward`` wrapper point: one call of a ``*_step`` method.

    ``call`` is the function the innermost wrapper invokes with ``args``; a
    wrapper may replace it (the DDP wrapper routes it through the DDP module).
    """

    __slots__ = ("stage", "call", "args")

    def __init__(self, trainer: Any, module: Any, *, stage: str, call: Any, args: tuple[Any, ...]) -> None:
        self.trainer = trainer
        self.module = module
        self.stage = stage
        self.call = call
        self.args = args


PAYLOAD_TYPES: dict[Event, type[Payload]] = {
    Event.SETUP: StagePayload,
    Event.TEARDOWN: StagePayload,
    Event.FIT_START: Payload,
    Event.FIT_END: Payload,
    Event.SANITY_CHECK_START: Payload,
    Event.SANITY_CHECK_END: Payload,
    Event.TRAIN_START: Payload,
    Event.TRAIN_END: Payload,
    Event.EPOCH_START: EpochPayload,
    Event.EPOCH_END: EpochPayload,
    Event.BATCH_START: BatchPayload,
    Event.BATCH_END: BatchEndPayload,
    Event.BEFORE_BACKWARD: LossPayload,
    Event.AFTER_BACKWARD: LossPayload,
    Event.BEFORE_OPTIMIZER_STEP: OptimizerPayload,
    Event.OPTIMIZER_STEP: OptimizerStepPayload,
    Event.VALIDATION_START: EvalPayload,
    Event.VALIDATION_END: EvalPayload,
    Event.VALIDATION_BATCH_START: EvalBatchPayload,
    Event.VALIDATION_BATCH_END: EvalBatchEndPayload,
    Event.TEST_START: EvalPayload,
    Event.TEST_END: EvalPayload,
    Event.TEST_BATCH_START: EvalBatchPayload,
    Event.TEST_BATCH_END: EvalBatchEndPayload,
    Event.PREDICT_START: EvalPayload,
    Event.PREDICT_END: EvalPayload,
    Event.PREDICT_BATCH_END: EvalBatchEndPayload,
    Event.SAVE_CHECKPOINT: CheckpointPayload,
    Event.LOAD_CHECKPOINT: CheckpointPayload,
    Event.LOG: LogPayload,
    Event.EXCEPTION: ExceptionPayload,
}

WRAP_PAYLOAD_TYPES: dict[WrapPoint, type[Payload]] = {
    WrapPoint.BATCH_STEP: BatchPayload,
    WrapPoint.FORWARD: ForwardPayload,
    WrapPoint.OPTIMIZER_STEP: OptimizerPayload,
}
