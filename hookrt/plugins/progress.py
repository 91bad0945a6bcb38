"""A progress bar for training and validation, with a plain-text mode for logs and CI."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from hookrt._errors import MisconfigurationError
from hookrt._events import BatchEndPayload, EpochPayload, EvalBatchEndPayload, EvalPayload, Payload, StagePayload
from hookrt._plugin import Plugin, on

__all__ = ["ProgressBar", "format_metrics"]


class ProgressBar(Plugin):
    """Show training progress per epoch, with the loss and every progress-bar metric.

    The metrics shown are ``trainer.progress_bar_metrics``: the loss under
    ``"loss"`` and what the module logged with ``prog_bar=True``.

    When the output stream is a terminal, tqdm draws one bar per epoch and a
    transient bar for each validation run (and the sanity check). Otherwise,
    such as under CI or with output sent to a file, no bar is redrawn: one line
    is written at the end of each epoch, with the epoch number, the batches
    run, the metrics and the elapsed seconds. Only global rank 0 writes.

    Args:
        refresh_rate: redraw the bar every this many batches; 0 turns all output off.
        leave: keep each finished epoch's bar on screen (terminal mode only).
        file: the output stream; None means ``sys.stderr`` as it is when fit starts.

    Raises:
        MisconfigurationError: ``refresh_rate`` is not a non-negative int.
    """

    critical = False

    def __init__(self, refresh_rate: int = 1, leave: bool = True, file: TextIO | None = None) -> None:
        if isinstance(refresh_rate, bool) or not isinstance(refresh_rate, int) or refresh_rate < 0:
            raise MisconfigurationError(
                f"ProgressBar(refresh_rate={refresh_rate!r}) is invalid: refresh_rate must be an int >= 0, "
                "the number of batches between redraws (0 turns the progress bar off)."
            )
        self.refresh_rate = refresh_rate
        self.leave = bool(leave)
        self.file = file
        self._stream: TextIO | None = None
        self._interactive = False
        self._active = False
        self._train_bar: Any = None
        self._eval_bar: Any = None
        self._epoch_started_at = 0.0
        self._batches_done = 0
        self._eval_batches_done = 0

    @property
    def enabled(self) -> bool:
        """Whether the bar writes anything in this run: ``refresh_rate > 0`` and global rank 0."""
        return self._active

    @property
    def interactive(self) -> bool:
        """Whether the output stream is a terminal, so tqdm redraws bars in place."""
        return self._interactive

    # ------------------------------------------------------------------ run start and end

    @on("setup")
    def _open(self, payload: StagePayload) -> None:
        self._active = self.refresh_rate > 0 and bool(getattr(payload.trainer, "is_global_zero", True))
        self._stream = self.file if self.file is not None else sys.stderr
        isatty = getattr(self._stream, "isatty", None)
        self._interactive = bool(callable(isatty) and isatty())

    @on("on_train_start")
    def _start_clock(self, payload: Payload) -> None:
        # A fit resumed in the middle of an epoch gets no on_epoch_start, so its first line counts from here.
        self._epoch_started_at = time.monotonic()

    @on("teardown")
    def _close_on_teardown(self, payload: StagePayload) -> None:
        self._close_bars()

    @on("on_exception")
    def _close_on_exception(self, payload: Payload) -> None:
        self._close_bars()

    # ------------------------------------------------------------------ training

    @on("on_epoch_start")
    def _start_epoch(self, payload: EpochPayload) -> None:
        if not self._active:
            return
        self._epoch_started_at = time.monotonic()
        self._batches_done = 0
        if self._interactive:
            self._close_train_bar()
            self._train_bar = self._new_bar(
                total=_finite_total(getattr(payload.trainer, "num_training_batches", None)),
                description=f"Epoch {payload.epoch + 1}",
                leave=self.leave,
            )

    @on("on_batch_end")
    def _advance_train(self, payload: BatchEndPayload) -> None:
        if not self._active:
            return
        self._batches_done = max(self._batches_done, payload.batch_idx + 1)
        bar = self._train_bar
        if bar is None:
            return
        if self._batches_done % self.refresh_rate == 0 or self._batches_done == bar.total:
            bar.set_postfix_str(format_metrics(_bar_metrics(payload.trainer)), refresh=False)
            bar.update(self._batches_done - bar.n)

    @on("on_epoch_end")
    def _finish_epoch(self, payload: EpochPayload) -> None:
        if not self._active:
            return
        metrics = format_metrics(_bar_metrics(payload.trainer))
        if self._interactive:
            bar = self._train_bar
            if bar is not None:
                bar.set_postfix_str(metrics, refresh=False)
                bar.update(self._batches_done - bar.n)
                bar.refresh()
            self._close_train_bar()
            return
        self._write_epoch_line(payload, metrics)

    def _write_epoch_line(self, payload: EpochPayload, metrics: str) -> None:
        total = _finite_total(getattr(payload.trainer, "num_training_batches", None))
        batches = f"{self._batches_done}/{total}" if total is not None else str(self._batches_done)
        max_epochs = getattr(payload.trainer, "max_epochs", None)
        # Shown counting from 1 ("Epoch 1/3"), as people count; payloads and file names count from 0.
        last = f"/{max_epochs}" if isinstance(max_epochs, int) and max_epochs > 0 else ""
        epoch = f"Epoch {payload.epoch + 1}{last}"
        elapsed = time.monotonic() - self._epoch_started_at
        parts = [f"{epoch}: {batches} batches"]
        if metrics:
            parts.append(metrics)
        parts.append(f"{elapsed:.1f}s")
        stream = self._stream or sys.stderr
        stream.write(", ".join(parts) + "\n")
        stream.flush()

    # ------------------------------------------------------------------ validation

    @on("on_validation_start")
    def _start_validation(self, payload: EvalPayload) -> None:
        if not (self._active and self._interactive):
            return
        self._close_eval_bar()
        self._eval_batches_done = 0
        self._eval_bar = self._new_bar(
            total=_finite_total(_validation_batches(payload.trainer)),
            description="Sanity checking" if payload.sanity_checking else "Validation",
            leave=False,
        )

    @on("on_validation_batch_end")
    def _advance_validation(self, payload: EvalBatchEndPayload) -> None:
        bar = self._eval_bar
        if bar is None:
            return
        self._eval_batches_done += 1
        if self._eval_batches_done % self.refresh_rate == 0:
            bar.update(self._eval_batches_done - bar.n)

    @on("on_validation_end")
    def _finish_validation(self, payload: EvalPayload) -> None:
        self._close_eval_bar()
        if self._train_bar is not None and not payload.sanity_checking:
            self._train_bar.set_postfix_str(format_metrics(_bar_metrics(payload.trainer)))

    # ------------------------------------------------------------------ bars

    def _new_bar(self, *, total: int | None, description: str, leave: bool) -> Any:
        from tqdm import tqdm

        return tqdm(
            total=total,
            desc=description,
            leave=leave,
            file=self._stream,
            dynamic_ncols=True,
            unit="batch",
        )

    def _close_train_bar(self) -> None:
        if self._train_bar is not None:
            self._train_bar.close()
            self._train_bar = None

    def _close_eval_bar(self) -> None:
        if self._eval_bar is not None:
            self._eval_bar.close()
            self._eval_bar = None

    def _close_bars(self) -> None:
        self._close_eval_bar()
        self._close_train_bar()


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """Format metrics as ``name=value`` pairs in their given order, numbers with 4 significant digits."""
    parts = []
    for name, value in metrics.items():
        try:
            text = f"{float(value):.4g}"
        except (TypeError, ValueError):
            text = str(value)
        parts.append(f"{name}={text}")
    return ", ".join(parts)


def _bar_metrics(trainer: Any) -> Mapping[str, Any]:
    metrics = getattr(trainer, "progress_bar_metrics", None)
    return metrics if isinstance(metrics, Mapping) else {}


def _validation_batches(trainer: Any) -> Any:
    """Return ``trainer.num_val_batches`` summed over loaders when the trainer has it, else None."""
    count = getattr(trainer, "num_val_batches", None)
    if isinstance(count, (list, tuple)):
        return sum(count) if count else None
    return count


def _finite_total(count: Any) -> int | None:
    if isinstance(count, bool) or not isinstance(count, (int, float)):
        return None
    if math.isinf(count) or math.isnan(count):
        return None
    return int(count)
