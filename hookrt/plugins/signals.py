"""A plugin that turns SIGTERM and SIGINT into a checkpoint of the current position and a clean stop.

Cluster schedulers send SIGTERM some seconds before they kill a job, and a
user stops a run with Ctrl-C (SIGINT). While ``fit`` runs, `SignalHandler`
replaces the handlers of those signals with one that only records the signal
number. The recorded signal is acted on at the next safe point: the end of a
training batch, or the end of a validation run. There the plugin requests a
checkpoint through ``trainer.save_checkpoint`` and sets
``trainer.should_stop``, so ``fit`` ends after the current batch and returns
normally. ``trainer.fit(model, ..., ckpt_path=PATH)`` then continues from the
same position, as if the run had never stopped. A checkpoint taken inside an
accumulation window carries that window's gradients.

A signal that arrives during validation is acted on at ``on_validation_end``
rather than at the next ``on_validation_batch_end``. Setting ``should_stop``
does not shorten a validation run, so stopping at its end costs no extra time.
A checkpoint written in the middle of validation would also not resume
exactly. It would hold RNG states and epoch metrics from partway through the
run, while the loop records the position as already validated, so the resumed
run would skip the rest of that validation. At ``on_validation_end`` the
validation metrics are complete and the RNG state is the one training goes on
with. A signal during the sanity check is acted on at the end of the first
training batch, because the sanity check's metrics are discarded when it ends.

A SIGINT that arrives after a signal was already received during this fit
raises ``KeyboardInterrupt`` at once: the user insists on stopping. Other
repeated signals are ignored.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from hookrt._errors import MisconfigurationError
from hookrt._events import BatchEndPayload, EvalPayload, Event, Payload, StagePayload
from hookrt._plugin import Plugin, on

__all__ = ["SignalHandler"]

log = logging.getLogger(__name__)

#: A handler as ``signal.getsignal`` returns it: a Python callable, SIG_DFL, SIG_IGN, or None for a
#: handler that was not installed from Python.
_PreviousHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

#: Signals whose handlers cannot be replaced. Windows has neither.
_UNCATCHABLE = frozenset(getattr(signal, name) for name in ("SIGKILL", "SIGSTOP") if hasattr(signal, name))

#: Orders on the bus. Acting last on ``on_batch_end`` also catches a signal that arrived while the
#: other handlers of that event ran. Restoring first at ``teardown`` puts the previous handlers back
#: even when a later teardown handler raises.
_LATE = 2**30
_EARLY = -(2**30)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _check_signals(signals: Iterable[Any]) -> tuple[signal.Signals, ...]:
    if isinstance(signals, (int, str)) or not isinstance(signals, Iterable):
        raise MisconfigurationError(
            f"SignalHandler(signals={signals!r}) is invalid: signals must be a sequence of signal numbers, "
            "such as (signal.SIGTERM, signal.SIGINT)."
        )
    checked: list[signal.Signals] = []
    valid = signal.valid_signals()
    for value in signals:
        if isinstance(value, bool) or not isinstance(value, int) or value not in valid:
            raise MisconfigurationError(
                f"SignalHandler(signals=...) contains {value!r}, which is not a signal number on this platform. "
                "Pass members of the signal module, such as signal.SIGTERM."
            )
        number = signal.Signals(value)
        if number.value in _UNCATCHABLE:
            raise MisconfigurationError(
                f"SignalHandler(signals=...) contains {number.name}, which a process cannot catch. "
                "Remove it. SIGTERM and SIGINT are the signals that request a stop."
            )
        if number not in checked:
            checked.append(number)
    return tuple(checked)


class SignalHandler(Plugin):
    """Turn a signal received during ``fit`` into a checkpoint of the current position and a clean stop.

    The handlers are installed at ``setup(stage="fit")`` and the previous ones
    are put back at ``teardown``, whether ``fit`` returned or raised. Nothing is
    installed at import or construction. Python lets only the main thread
    install signal handlers, so a ``fit`` running in another thread installs
    none and logs that at DEBUG level.

    The checkpoint goes to ``{dirpath}/{filename}``, with ``dirpath`` defaulting
    to ``trainer.default_root_dir``, and replaces an earlier file of that name.
    Only the process of global rank 0 writes it and logs the WARNING that names
    the signal, the file and the call that resumes from it. After ``fit``
    returns, `received` shows a script whether a signal stopped the run,
    for example to exit with status ``128 + received`` as shells report a job
    ended by a signal. The stop is forced: ``min_epochs`` and ``min_steps`` do
    not keep training going, because the process is about to be ended.

    Under DDP the processes agree on whether any of them received a signal,
    so all of them write the collective checkpoint and stop after the same
    batch, and `received` shows that signal on every rank. After a batch the
    agreement is a one-value all-reduce that runs while the next batch trains
    and is read after it, so a signal ends training one batch later than in
    one process. At the end of a validation run the processes agree at once.

    Args:
        signals: the signals to act on.
        dirpath: the folder of the checkpoint; None means ``trainer.default_root_dir``.
        filename: the checkpoint's file name.

    Raises:
        MisconfigurationError: a signal is not a signal number, or cannot be caught
            (SIGKILL, SIGSTOP), or ``filename`` is not a plain file name.
    """

    def __init__(
        self,
        signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
        dirpath: str | os.PathLike[str] | None = None,
        filename: str = "signal.ckpt",
    ) -> None:
        if not isinstance(filename, str) or not filename or os.path.basename(filename) != filename:
            raise MisconfigurationError(
                f"SignalHandler(filename={filename!r}) is invalid: filename must be a non-empty file name "
                "without a folder. Give the folder as dirpath."
            )
        self.signals = _check_signals(signals)
        self.dirpath = os.fspath(dirpath) if dirpath is not None else None
        self.filename = filename
        #: The first signal received during the current or last fit, or None.
        self.received: int | None = None
        #: The checkpoint written for that signal, or None when none was written.
        self.checkpoint_path: str | None = None
        self._pending: int | None = None
        self._previous: dict[signal.Signals, _PreviousHandler] = {}
        #: Whether fit runs in one process, so a batch without a recorded signal needs no agreement step.
        #: False until on_train_start has checked.
        self._single_process = False
        #: Under DDP, the agreement on a pending signal after each batch, read one batch later.
        self._late: Any = None

    # ------------------------------------------------------------------ install and restore

    @on(Event.SETUP)
    def install(self, payload: StagePayload) -> None:
        """Replace the handlers of `signals` for the duration of ``fit``."""
        if payload.stage != "fit" or self._previous:
            return
        from hookrt.plugins.checkpoint import check_folder

        folder = self.dirpath or payload.trainer.default_root_dir
        check_folder(folder, f"SignalHandler dirpath {folder!r}")
        self.received = None
        self.checkpoint_path = None
        self._pending = None
        if threading.current_thread() is not threading.main_thread():
            log.debug(
                "SignalHandler installs no signal handlers: fit runs in thread %r, and Python lets only the main "
                "thread install them.", threading.current_thread().name,
            )
            return
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._record)

    @on(Event.TEARDOWN, order=_EARLY)
    def restore(self, payload: StagePayload) -> None:
        """Put back the handlers that were installed before ``fit``."""
        if payload.stage != "fit":
            return
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            # None means a handler installed outside Python, which cannot be put back, so the default replaces it.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if self._pending is not None:
            log.warning(
                "Received %s, but fit ended before the next point where a checkpoint can be taken (the end of a "
                "training batch or of a validation run), so no signal checkpoint was written.",
                _signal_name(self._pending),
            )
            self._pending = None

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of the main thread: it only records, and acts later at a safe point.
        if self.received is not None:
            if signum == signal.SIGINT:
                self._pending = None
                raise KeyboardInterrupt
            return
        self.received = signum
        self._pending = signum

    # ------------------------------------------------------------------ safe points

    @on(Event.TRAIN_START)
    def _check_process_group(self, payload: Payload) -> None:
        from hookrt import _distributed

        self._single_process = not _distributed.is_initialized() or _distributed.world_size() < 2
        self._late = None if self._single_process else _distributed.LateAgreement()

    @on(Event.TRAIN_END)
    def _settle_agreement(self, payload: Payload) -> None:
        # Every rank ends training after the same batch, so each waits here for the last exchange it started.
        if self._late is not None:
            self._late.settle()
            self._late = None

    @on(Event.BATCH_END, order=_LATE)
    def after_batch(self, payload: BatchEndPayload) -> None:
        """Act on a recorded signal once the batch has finished.

        Under DDP the ranks exchange their pending signals after every batch
        without waiting, and act on the result after the next batch. So a
        signal ends training one batch later than in one process, and on every
        rank after the same batch.
        """
        if self._single_process:
            if self._pending is not None:
                self._act(payload, self._pending)
            return
        late = self._late
        if late is None:  # fit started without on_train_start, as in a test that emits events itself
            self._act(payload, _agreed_signal(self._pending))
            return
        agreed = late.exchange_values([self._pending or 0])
        if agreed is not None and agreed[0]:
            late.settle()  # every rank acts after this batch and stops, so none leaves an exchange behind
            self._late = None
            self._act(payload, agreed[0])

    @on(Event.VALIDATION_END, order=_LATE)
    def after_validation(self, payload: EvalPayload) -> None:
        """Act on a recorded signal once a validation run has finished, outside the sanity check."""
        if not payload.sanity_checking:
            self._act(payload, _agreed_signal(self._pending))

    def _act(self, payload: Payload, signum: int | None) -> None:
        trainer = payload.trainer
        if not signum:
            return
        self._pending = None
        # Under DDP a rank may stop for a peer's signal; recording it lets every rank exit with the same status.
        if self.received is None:
            self.received = signum
        path = os.path.join(self.dirpath or trainer.default_root_dir, self.filename)
        trainer.save_checkpoint(path)
        # Queued after the save, so it runs only once the file is written.
        trainer.bus.after_dispatch(lambda: self._report_checkpoint(trainer, signum, path))
        # Every rank reached this batch with the same agreed signal, so the stop needs no further agreement.
        trainer.request_stop(f"received {_signal_name(signum)}", force=True, agreed=True)

    def _report_checkpoint(self, trainer: Any, signum: int, path: str) -> None:
        self.checkpoint_path = path
        if not trainer.is_global_zero:
            return
        log.warning(
            "Received %s: wrote a checkpoint of epoch %d after batch %d (global step %d) to %s and stopping "
            "training. To resume, call trainer.fit(model, ..., ckpt_path=%r).",
            _signal_name(signum), trainer.current_epoch, trainer.batch_idx, trainer.global_step, path, path,
        )



def _agreed_signal(pending: int | None) -> int | None:
    """Return the signal any process of a DDP run received, or ``pending`` without one."""
    from hookrt import _distributed

    if not _distributed.is_initialized() or _distributed.world_size() < 2:
        return pending
    (agreed,) = _distributed.max_across_ranks([pending or 0])
    return agreed or None
