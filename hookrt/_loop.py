"""The fit loop and the evaluation loop: the order in which events are emitted.

Each method reads top-down as the events it emits. Features live in plugins
and wrappers; what stays here is when to validate, when to step, and when to
stop.
"""

from __future__ import annotations

import enum
import inspect
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from hookrt import _distributed as distributed
from hookrt._data import limited_length, set_loader_epoch
from hookrt._errors import CancelBatch, CancelEpoch, MisconfigurationError
from hookrt._events import Event, WrapPoint
from hookrt._step import BatchStep, call_payload

if TYPE_CHECKING:
    from hookrt._trainer import Trainer

__all__ = ["EvalLoop", "FitLoop", "Progress"]

# Plain strings for the per-batch emits: an Enum member lookup costs more than a module global.
_BATCH_START = Event.BATCH_START.value
_BATCH_END = Event.BATCH_END.value

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """The position of training, saved in checkpoints so that resume continues at the same place."""

    current_epoch: int = 0
    global_step: int = 0
    #: Batches finished in the current epoch.
    batches_done: int = 0
    #: The value of ``batches_done`` when this epoch last validated, or -1.
    val_done_at: int = -1
    #: Whether the current epoch has finished its batches, validation and schedulers.
    epoch_closed: bool = False
    optimizer_steps: list[int] = field(default_factory=list)
    #: The torch RNG state just before this epoch's loader iterator was created.
    epoch_rng: torch.Tensor | None = None

    def next_epoch(self) -> None:
        """Move to the start of the next epoch."""
        self.current_epoch += 1
        self.batches_done = 0
        self.val_done_at = -1
        self.epoch_closed = False
        self.epoch_rng = None


class EpochOutcome(enum.Enum):
    """The way an epoch's batch loop ended."""

    #: Every batch ran (or the loader ran out).
    COMPLETE = "complete"
    #: A handler raised CancelEpoch: the epoch counts as done.
    CANCELLED = "cancelled"
    #: A stop condition (should_stop, max_steps, max_time) held before the last batch.
    STOPPED = "stopped"


class FitLoop:
    """Runs the epochs of ``Trainer.fit``."""

    def __init__(self, trainer: Trainer, loader: Any) -> None:
        self.trainer = trainer
        self.loader = loader
        self.step = BatchStep(trainer)
        trainer._batch_step = self.step
        self.length = limited_length(loader, trainer.config.limit_train_batches, "limit_train_batches")
        self.accumulate = trainer.config.accumulate_grad_batches
        self.log_every_n_steps = trainer.config.log_every_n_steps
        self.started = time.monotonic()
        self._min_reached_logged = False
        #: Whether several processes train, so that each stop decision is agreed between them (`agree_stop`).
        self.several = distributed.world_size() > 1
        self._agreement = distributed.LateAgreement()
        if trainer._progress.epoch_closed:
            trainer._progress.next_epoch()  # restored from a checkpoint written at an epoch's end

    # ------------------------------------------------------------------ fit

    def run(self) -> None:
        """Emit ``on_train_start``, run epochs until a stop condition holds, emit ``on_train_end``."""
        trainer = self.trainer
        progress = trainer._progress
        torch.set_grad_enabled(True)  # the caller's grad mode comes back when fit returns
        trainer.bus.emit(Event.TRAIN_START)
        trainer._restore_rng_if_pending(resuming_mid_epoch=progress.batches_done > 0)
        while not self.done():
            self.run_epoch()
        trainer.bus.emit(Event.TRAIN_END)

    def done(self) -> bool:
        """Return whether a stop condition is met at an epoch boundary."""
        trainer = self.trainer
        config = trainer.config
        progress = trainer._progress
        self.settle_agreement()
        if config.max_epochs != -1 and progress.current_epoch >= config.max_epochs:
            return True
        if config.max_steps != -1 and progress.global_step >= config.max_steps:
            return True
        if self.agree_stop(self.out_of_time()):
            return True
        return trainer.should_stop and self.can_stop()

    def agree_stop(self, out_of_time: bool) -> bool:
        """Make every process take the same stop decision now; returns whether ``max_time`` ran out on any.

        Under DDP a stop can be requested on one rank only: by an
        EarlyStopping on a metric logged without ``sync_dist``, by a plugin
        that sets ``should_stop``, or by a clock that reaches ``max_time`` a
        batch earlier. The other ranks would then wait in the next collective
        until the timeout, so an all-reduce spreads the request to every rank.
        This blocking form runs at epoch boundaries; after each batch,
        `agree_stop_late` runs instead.
        """
        if not self.several:
            return out_of_time
        trainer = self.trainer
        out_of_time, trainer.should_stop, trainer._forced_stop = distributed.any_rank(self._stop_flags(out_of_time))
        return out_of_time

    def agree_stop_late(self, out_of_time: bool) -> bool:
        """Return whether every rank stops now, from the flags agreed after the previous batch; send this batch's.

        A stop requested on one rank during batch k therefore ends every rank
        after batch k + 1 (see `LateAgreement`). When the ranks stop, this
        sets ``should_stop`` and the forced flag to the agreed values.
        """
        agreed = self._agreement.exchange(self._stop_flags(out_of_time))
        if agreed is None:
            return False
        out_of_time, stop, forced = agreed
        if not (out_of_time or stop):
            return False
        self.trainer.should_stop = True
        self.trainer._forced_stop = forced
        return True

    def settle_agreement(self) -> None:
        """Wait for the late agreement in flight, if any; every rank calls this at the same points."""
        self._agreement.settle()

    def _stop_flags(self, out_of_time: bool) -> list[bool]:
        trainer = self.trainer
        return [out_of_time, trainer.should_stop, trainer._forced_stop]

    def can_stop(self) -> bool:
        """Whether ``min_epochs`` and ``min_steps`` allow a requested stop."""
        config = self.trainer.config
        progress = self.trainer._progress
        if self.trainer._forced_stop:
            return True
        if progress.current_epoch >= config.min_epochs and progress.global_step >= config.min_steps:
            return True
        if not self._min_reached_logged:
            self._min_reached_logged = True
            logger.info(
                "A stop was requested at epoch %d, step %d, but min_epochs=%d / min_steps=%d are not reached; "
                "training goes on.", progress.current_epoch, progress.global_step, config.min_epochs,
                config.min_steps,
            )
        self.trainer.should_stop = False
        return False

    def out_of_time(self) -> bool:
        """Whether ``max_time`` has passed since fit started."""
        limit = self.trainer.config.max_time
        return limit is not None and time.monotonic() - self.started >= limit

    # ------------------------------------------------------------------ epoch

    def run_epoch(self) -> None:
        """Run one epoch: its batches, mid-epoch and end-of-epoch validation, schedulers, ``on_epoch_end``."""
        trainer = self.trainer
        progress = trainer._progress
        epoch = progress.current_epoch
        module = trainer.lightning_module
        module.train()
        trainer._metrics.stage = "train"
        resuming = progress.batches_done > 0

        if not resuming:
            trainer.bus.emit(Event.EPOCH_START, epoch=epoch)
        outcome = self.run_batches(epoch, resuming)
        # A stop request leaves the epoch open: a checkpoint written from now on resumes inside it.
        left_open = outcome == EpochOutcome.STOPPED
        trainer._metrics.end_epoch("train", keep=left_open)
        trainer._emit_log()

        if self.validation_due_at_end(outcome != EpochOutcome.COMPLETE):
            trainer._run_validation()
        if not left_open:
            if trainer._has_epoch_schedulers:
                trainer._step_schedulers("epoch", epoch + 1)
            progress.epoch_closed = True
        trainer.bus.emit(Event.EPOCH_END, epoch=epoch)
        trainer._emit_log()
        if not left_open:
            progress.next_epoch()

    def run_batches(self, epoch: int, resuming: bool) -> EpochOutcome:
        """Run the epoch's batches and return how the epoch ended."""
        trainer = self.trainer
        progress = trainer._progress
        val_points = trainer.config.val_points(self.length)
        iterator = self.open_iterator(epoch, resuming)
        if resuming and progress.val_done_at != progress.batches_done and self.validation_due_mid_epoch(
            progress.batches_done, val_points, is_last=progress.batches_done >= self.length
        ):
            trainer._run_validation()  # the checkpoint was written after the batch, before its validation
        # Worked out once per epoch, so the batch loop below does few calls when nothing is due.
        accumulate = self.accumulate
        may_validate = trainer._validation_enabled and self.epoch_validates()
        config = trainer.config
        # Under DDP every batch ends with the stop check, because its agreement step is a collective.
        limited = config.max_steps != -1 or config.max_time is not None or self.several
        try:
            for batch_idx, batch, is_last in self.batches(iterator, progress.batches_done):
                closes = is_last or (batch_idx + 1) % accumulate == 0
                window = 1 if accumulate == 1 else self.window(batch_idx)
                self.run_batch(batch, batch_idx, window, closes)
                if may_validate and self.validation_due_mid_epoch(batch_idx + 1, val_points, is_last):
                    trainer._run_validation()
                if (limited or trainer.should_stop) and self.should_stop_now():
                    return EpochOutcome.COMPLETE if is_last else EpochOutcome.STOPPED
        except CancelEpoch:
            logger.debug("epoch %d cancelled after %d batches", epoch, progress.batches_done)
            self.step.flush(progress.batches_done, self.window(max(progress.batches_done - 1, 0)))
            return EpochOutcome.CANCELLED
        return EpochOutcome.COMPLETE

    def open_iterator(self, epoch: int, resuming: bool) -> Iterator[Any]:
        """Create the epoch's loader iterator; when resuming mid-epoch, replay it to the saved position.

        The iterator is created from the RNG state recorded at the start of the
        epoch, so the sampler's order and the workers' seeds repeat; the batches
        already trained are fetched again and dropped, and then the RNG states of
        the checkpoint are restored.
        """
        trainer = self.trainer
        progress = trainer._progress
        set_loader_epoch(self.loader, epoch)
        if resuming and progress.epoch_rng is not None:
            torch.set_rng_state(progress.epoch_rng)
        else:
            progress.epoch_rng = torch.get_rng_state()
        iterator = iter(self.loader)
        if resuming:
            for _ in range(progress.batches_done):
                next(iterator, None)
            trainer._restore_rng_if_pending(resuming_mid_epoch=False)
        return iterator

    def batches(self, iterator: Iterator[Any], start: int) -> Iterator[tuple[int, Any, bool]]:
        """Yield ``(batch_idx, batch, is_last)`` from ``start`` on.

        With a known length, ``is_last`` comes from it; without one, the next
        batch is fetched ahead so the last batch is known when it runs.
        """
        limit = self.length
        if not math.isinf(limit):
            last = int(limit) - 1
            for batch_idx in range(start, int(limit)):
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                yield batch_idx, batch, batch_idx == last
            return
        yield from self._lookahead(iterator, start)

    @staticmethod
    def _lookahead(iterator: Iterator[Any], start: int) -> Iterator[tuple[int, Any, bool]]:
        sentinel = object()
        batch = next(iterator, sentinel)
        batch_idx = start
        while batch is not sentinel:
            following = next(iterator, sentinel)
            yield batch_idx, batch, following is sentinel
            batch, batch_idx = following, batch_idx + 1

    def window(self, batch_idx: int) -> int:
        """Return how many micro-batches the accumulation window of ``batch_idx`` holds."""
        if self.accumulate == 1:
            return 1
        start = batch_idx - batch_idx % self.accumulate
        if math.isinf(self.length):
            return self.accumulate
        return int(min(self.accumulate, self.length - start))

    # ------------------------------------------------------------------ batch

    def run_batch(self, batch: Any, batch_idx: int, window: int, closes: bool) -> None:
        """Run one batch: ``on_batch_start``, the batch step, ``on_batch_end``, then ``on_log`` when due."""
        trainer = self.trainer
        bus = trainer.bus
        metrics = trainer._metrics
        progress = trainer._progress
        trainer.batch_idx = batch_idx
        metrics.begin_batch(batch)
        steps_before = progress.global_step
        try:
            if _BATCH_START in bus._dispatch:
                batch = bus.emit(_BATCH_START, batch=batch, batch_idx=batch_idx).batch  # type: ignore[union-attr]
                metrics.begin_batch(batch)  # handlers may move or replace the batch
            outputs = self.step.run(batch, batch_idx, window, closes)
        except CancelBatch:
            metrics.end_batch()
            progress.batches_done = batch_idx + 1
            if closes:
                self.step.flush(batch_idx, window)
            return
        # Counted before on_batch_end, so a checkpoint requested there resumes after this batch.
        progress.batches_done = batch_idx + 1
        if _BATCH_END in bus._dispatch:
            try:
                bus.emit(_BATCH_END, batch=batch, batch_idx=batch_idx, outputs=outputs)
            except CancelBatch:
                raise MisconfigurationError(
                    "hookrt.CancelBatch was raised by a handler of on_batch_end, after the batch had run, so there "
                    "is nothing left to skip. Raise it from on_batch_start or training_step to skip a batch, or "
                    "raise hookrt.CancelEpoch to end the epoch."
                ) from None
        metrics.end_batch()
        if progress.global_step != steps_before and progress.global_step % self.log_every_n_steps == 0:
            trainer._emit_log()

    def should_stop_now(self) -> bool:
        """Whether training stops after the current batch (``should_stop``, ``max_steps``, ``max_time``)."""
        trainer = self.trainer
        config = trainer.config
        progress = trainer._progress
        if config.max_steps != -1 and progress.global_step >= config.max_steps:
            self.settle_agreement()
            return True
        if self.several:
            # Only an agreed decision counts, so that every rank stops after the same batch.
            if not trainer._stop_agreed and not self.agree_stop_late(self.out_of_time()):
                return False
        else:
            if self.out_of_time():
                trainer.should_stop = True
            if not trainer.should_stop:
                return False
        if self.can_stop():
            self.settle_agreement()
            window = self.window(max(progress.batches_done - 1, 0))
            self.step.flush(progress.batches_done - 1, window)
            return True
        return False

    # ------------------------------------------------------------------ validation schedule

    def validation_due_mid_epoch(self, batches_done: int, points: set[int] | None, is_last: bool) -> bool:
        """Whether validation runs after ``batches_done`` batches, before the epoch's end."""
        if is_last or not self.trainer._validation_enabled or not self.epoch_validates():
            return False
        if points is None:
            interval = self.trainer.config.val_check_interval
            return isinstance(interval, int) and batches_done % interval == 0
        return batches_done in points

    def validation_due_at_end(self, stopped_early: bool) -> bool:
        """Whether validation runs at the end of the epoch that just ran its batches."""
        trainer = self.trainer
        progress = trainer._progress
        if not trainer._validation_enabled or not self.epoch_validates():
            return False
        if progress.val_done_at == progress.batches_done or progress.batches_done == 0:
            return False
        config = trainer.config
        if stopped_early:
            return config.max_steps != -1 and progress.global_step >= config.max_steps
        points = trainer.config.val_points(self.length)
        if points is None:
            return not isinstance(config.val_check_interval, int) or progress.batches_done % \
                config.val_check_interval == 0
        return progress.batches_done in points or math.isinf(self.length)

    def epoch_validates(self) -> bool:
        """Whether ``check_val_every_n_epoch`` lets the current epoch validate."""
        every = self.trainer.config.check_val_every_n_epoch
        return every is None or (self.trainer._progress.current_epoch + 1) % every == 0


class EvalLoop:
    """Runs validation, test or prediction over one or more loaders."""

    _EVENTS = {
        "validate": (Event.VALIDATION_START, Event.VALIDATION_BATCH_START, Event.VALIDATION_BATCH_END,
                     Event.VALIDATION_END),
        "test": (Event.TEST_START, Event.TEST_BATCH_START, Event.TEST_BATCH_END, Event.TEST_END),
        "predict": (Event.PREDICT_START, None, Event.PREDICT_BATCH_END, Event.PREDICT_END),
    }
    _STEPS = {"validate": "validation_step", "test": "test_step", "predict": "predict_step"}
    _EPOCH_ENDS = {
        "validate": ("validation_end", "validation_epoch_end"),
        "test": ("test_end", "test_epoch_end"),
        "predict": (),
    }

    def __init__(self, trainer: Trainer, stage: str, loaders: list[Any], limit: int | float,
                 sanity_checking: bool = False) -> None:
        self.trainer = trainer
        self.stage = stage
        self.loaders = loaders
        self.limit = limit
        self.sanity_checking = sanity_checking

    def run(self) -> list[Any]:
        """Run every loader; returns per-loader outputs (predictions for predict, else step outputs)."""
        trainer = self.trainer
        module = trainer.lightning_module
        was_training = module.training
        grad_enabled = torch.is_grad_enabled()
        module.eval()
        torch.set_grad_enabled(False)
        try:
            return self._run()
        finally:
            torch.set_grad_enabled(grad_enabled)
            module.train(was_training)

    def _run(self) -> list[Any]:
        trainer = self.trainer
        bus = trainer.bus
        metrics = trainer._metrics
        start, batch_start, batch_end, end = self._EVENTS[self.stage]
        stage_fields = {} if self.stage == "predict" else {"sanity_checking": self.sanity_checking}
        previous_stage = metrics.stage
        metrics.stage = self.stage
        try:
            bus.emit(start, **stage_fields)
            outputs = [self._run_loader(index, loader, batch_start, batch_end, stage_fields)
                       for index, loader in enumerate(self.loaders)]
            metrics.dataloader_suffix = ""
            self._epoch_end(outputs)
            metrics.end_epoch(self.stage)
            bus.emit(end, **stage_fields)
        finally:
            metrics.dataloader_suffix = ""
            metrics.stage = previous_stage
        return outputs

    def _run_loader(self, index: int, loader: Any, batch_start: Event | None, batch_end: Event,
                    stage_fields: dict[str, Any]) -> list[Any]:
        trainer = self.trainer
        bus = trainer.bus
        metrics = trainer._metrics
        module = trainer.lightning_module
        step = getattr(module, self._STEPS[self.stage])
        several = len(self.loaders) > 1
        pass_index = (several or self.stage == "predict") and _takes_dataloader_idx(step)
        metrics.dataloader_suffix = f"/dataloader_idx_{index}" if several else ""
        keep = self.stage == "predict" or self._collects_outputs()
        limit = self.limit if self.limit == -1 else limited_length(loader, self.limit, f"limit_{self.stage}_batches")
        outputs: list[Any] = []
        if self.stage != "predict":
            set_loader_epoch(loader, trainer.current_epoch)
        for batch_idx, batch in enumerate(loader):
            if limit != -1 and batch_idx >= limit:
                break
            metrics.begin_batch(batch)
            if batch_start is not None:
                payload = bus.emit(batch_start, batch=batch, batch_idx=batch_idx, dataloader_idx=index,
                                   **stage_fields)
                if payload is not None:
                    batch = payload.batch  # type: ignore[attr-defined]  # handlers may move or replace it
            args = (batch, batch_idx, index) if pass_index else (batch, batch_idx)
            if bus.has_wrappers(WrapPoint.FORWARD):
                output = bus.wrap(WrapPoint.FORWARD, call_payload, stage=self.stage, call=step, args=args)
            else:
                output = step(*args)
            if keep:
                outputs.append(output)
            bus.emit(batch_end, batch=batch, batch_idx=batch_idx, dataloader_idx=index, outputs=output,
                     **stage_fields)
            metrics.end_batch()
        return outputs

    def _collects_outputs(self) -> bool:
        module = self.trainer.lightning_module
        return any(callable(getattr(module, name, None)) for name in self._EPOCH_ENDS[self.stage])

    def _epoch_end(self, outputs: list[list[Any]]) -> None:
        module = self.trainer.lightning_module
        for name in self._EPOCH_ENDS[self.stage]:
            method = getattr(module, name, None)
            if not callable(method):
                continue
            # One loader passes its list of outputs; several pass a list per loader, as Lightning 0.5 did.
            if len(outputs) > 1:
                argument: list[Any] = outputs
            elif outputs:
                argument = outputs[0]
            else:
                argument = []
            result = method(argument)
            if result is None:
                continue
            if not isinstance(result, dict):
                raise MisconfigurationError(
                    f"{type(module).__name__}.{name} returned a {type(result).__name__}; it must return a dict of "
                    "metrics (with optional 'log' and 'progress_bar' entries) or None."
                )
            self.trainer._metrics.log_legacy_output(result)


def _takes_dataloader_idx(step: Any) -> bool:
    """Whether a ``*_step`` method accepts a third argument, the loader index."""
    try:
        parameters = inspect.signature(step).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in parameters)
