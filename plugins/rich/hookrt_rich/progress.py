"""`RichProgressBar`: training and evaluation progress drawn with ``rich.progress``."""

from __future__ import annotations

import math
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

import hookrt
from hookrt import MisconfigurationError
from hookrt.plugins.progress import format_metrics

__all__ = ["RichProgressBar"]


class RichProgressBar(hookrt.Plugin):
    """Show one Rich progress bar per epoch, with the loss and every progress-bar metric.

    The metrics shown are ``trainer.progress_bar_metrics``: the loss under
    ``"loss"`` and what the module logged with ``prog_bar=True``.

    On a terminal, a bar per epoch shows batches done, elapsed and remaining
    time and the metrics. Validation, test and predict runs and the sanity
    check each get a bar of their own, removed when the run ends. Otherwise,
    such as under CI or with output sent to a file, nothing is redrawn: one line
    is printed at the end of each epoch with the epoch number, the batches run,
    the metrics and the elapsed seconds. Only global rank 0 prints.

    A Trainer given this plugin leaves its built-in tqdm bar out, so only one bar is drawn.

    Args:
        refresh_rate: update the bar every this many batches; 0 turns all output off.
        leave: keep each finished epoch's bar on screen (terminal only); otherwise the next
            epoch's bar replaces it. The live display is cut to the terminal's height, so
            long runs should leave this off.
        console: the Rich console to draw on; None creates one on standard error when fit starts.

    Raises:
        MisconfigurationError: ``refresh_rate`` is not an int >= 0.
    """

    # Stands in for the built-in tqdm bar, which the Trainer then leaves out of its default stack.
    replaces_default = "progress_bar"

    # A broken progress bar must not end a training run: hookrt logs its error once and disables it.
    critical = False

    def __init__(self, refresh_rate: int = 1, leave: bool = False, console: Console | None = None) -> None:
        if isinstance(refresh_rate, bool) or not isinstance(refresh_rate, int) or refresh_rate < 0:
            raise MisconfigurationError(
                f"RichProgressBar(refresh_rate={refresh_rate!r}) is invalid: refresh_rate must be an int >= 0, the "
                "number of batches between updates (0 turns the progress bar off)."
            )
        self.refresh_rate = refresh_rate
        self.leave = bool(leave)
        self.console = console
        self._active = False
        self._progress: Progress | None = None
        self._train_task: TaskID | None = None
        self._eval_task: TaskID | None = None
        self._batches_done = 0
        self._eval_batches_done = 0
        self._epoch_started_at = 0.0

    @property
    def interactive(self) -> bool:
        """Whether the console is a terminal, so bars are redrawn in place."""
        return self.console is not None and self.console.is_terminal

    # ------------------------------------------------------------------ run start and end

    @hookrt.on("setup")
    def _open(self, payload: Any) -> None:
        self._active = self.refresh_rate > 0 and bool(getattr(payload.trainer, "is_global_zero", True))
        if self.console is None:
            self.console = Console(stderr=True)

    @hookrt.on("teardown")
    def _close_on_teardown(self, payload: Any) -> None:
        self._stop()

    @hookrt.on("on_exception")
    def _close_on_exception(self, payload: Any) -> None:
        self._stop()

    # ------------------------------------------------------------------ training

    @hookrt.on("on_epoch_start")
    def _start_epoch(self, payload: Any) -> None:
        if not self._active:
            return
        self._epoch_started_at = time.monotonic()
        self._batches_done = 0
        progress = self._live_progress()
        if progress is None:
            return
        if self._train_task is not None and not self.leave:
            progress.remove_task(self._train_task)
        self._train_task = progress.add_task(
            f"Epoch {payload.epoch + 1}", total=_finite_total(getattr(payload.trainer, "num_training_batches", None)),
            metrics="",
        )

    @hookrt.on("on_batch_end")
    def _advance_train(self, payload: Any) -> None:
        if not self._active:
            return
        self._batches_done = max(self._batches_done, payload.batch_idx + 1)
        if self._progress is None or self._train_task is None or self._batches_done % self.refresh_rate:
            return
        self._progress.update(self._train_task, completed=self._batches_done, metrics=_metrics_text(payload.trainer))

    @hookrt.on("on_epoch_end")
    def _finish_epoch(self, payload: Any) -> None:
        if not self._active:
            return
        metrics = _metrics_text(payload.trainer)
        if self._progress is not None and self._train_task is not None:
            self._progress.update(self._train_task, completed=self._batches_done, metrics=metrics, refresh=True)
            return
        if self.console is not None and not self.interactive:
            self._print_epoch_line(self.console, payload, metrics)

    def _print_epoch_line(self, console: Console, payload: Any, metrics: str) -> None:
        total = _finite_total(getattr(payload.trainer, "num_training_batches", None))
        batches = f"{self._batches_done}/{total}" if total is not None else str(self._batches_done)
        parts = [f"Epoch {payload.epoch + 1}: {batches} batches"]
        if metrics:
            parts.append(metrics)
        parts.append(f"{time.monotonic() - self._epoch_started_at:.1f}s")
        # Metric names may contain square brackets, which Rich would read as markup.
        console.print(", ".join(parts), markup=False, highlight=False)

    # ------------------------------------------------------------------ validation, test and predict

    @hookrt.on("on_validation_start")
    def _start_validation(self, payload: Any) -> None:
        description = "Sanity checking" if payload.sanity_checking else "Validation"
        self._start_eval(description, _validation_batches(payload.trainer))

    @hookrt.on("on_test_start")
    def _start_test(self, payload: Any) -> None:
        self._start_eval("Testing", None)

    @hookrt.on("on_predict_start")
    def _start_predict(self, payload: Any) -> None:
        self._start_eval("Predicting", None)

    @hookrt.on("on_validation_batch_end")
    def _advance_validation(self, payload: Any) -> None:
        self._advance_eval()

    @hookrt.on("on_test_batch_end")
    def _advance_test(self, payload: Any) -> None:
        self._advance_eval()

    @hookrt.on("on_predict_batch_end")
    def _advance_predict(self, payload: Any) -> None:
        self._advance_eval()

    @hookrt.on("on_validation_end")
    def _finish_validation(self, payload: Any) -> None:
        self._finish_eval()
        if self._progress is not None and self._train_task is not None and not payload.sanity_checking:
            self._progress.update(self._train_task, metrics=_metrics_text(payload.trainer))

    @hookrt.on("on_test_end")
    def _finish_test(self, payload: Any) -> None:
        self._finish_eval()

    @hookrt.on("on_predict_end")
    def _finish_predict(self, payload: Any) -> None:
        self._finish_eval()

    def _start_eval(self, description: str, total: int | None) -> None:
        if not self._active:
            return
        progress = self._live_progress()
        if progress is None:
            return
        self._finish_eval()
        self._eval_batches_done = 0
        self._eval_task = progress.add_task(description, total=total, metrics="")

    def _advance_eval(self) -> None:
        if self._progress is None or self._eval_task is None:
            return
        self._eval_batches_done += 1
        if self._eval_batches_done % self.refresh_rate == 0:
            self._progress.update(self._eval_task, completed=self._eval_batches_done)

    def _finish_eval(self) -> None:
        if self._progress is not None and self._eval_task is not None:
            self._progress.remove_task(self._eval_task)
        self._eval_task = None

    # ------------------------------------------------------------------ the Rich display

    def _live_progress(self) -> Progress | None:
        """Return the running Progress display, starting it first; None when the console is not a terminal."""
        if not self.interactive:
            return None
        if self._progress is None:
            self._progress = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[metrics]}", markup=False),
                console=self.console,
            )
            self._progress.start()
        return self._progress

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress = None
        self._train_task = None
        self._eval_task = None


def _metrics_text(trainer: Any) -> str:
    metrics = getattr(trainer, "progress_bar_metrics", None)
    return format_metrics(metrics) if isinstance(metrics, dict) else ""


def _validation_batches(trainer: Any) -> int | None:
    """Return ``trainer.num_val_batches`` summed over the loaders, or None when unknown or infinite."""
    count = getattr(trainer, "num_val_batches", None)
    if isinstance(count, (list, tuple)):
        count = sum(count) if count else None
    return _finite_total(count)


def _finite_total(count: Any) -> int | None:
    if isinstance(count, bool) or not isinstance(count, (int, float)):
        return None
    if not math.isfinite(count):  # a loader without a length
        return None
    return int(count)
