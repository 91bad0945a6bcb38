"""A profiler that times every event handler of every plugin, the batch step and the data wait."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from hookrt._bus import Subscription
from hookrt._errors import MisconfigurationError
from hookrt._events import BatchEndPayload, BatchPayload, Payload, StagePayload
from hookrt._plugin import Plugin, around, on

__all__ = ["HookProfiler", "ProfileRow"]

log = logging.getLogger(__name__)

#: The ``plugin`` column of the rows that time the loop itself rather than a handler.
LOOP = "loop"
#: Orders that place a handler before, or after, every handler a plugin would reasonably register.
FIRST = -(2**31)
LAST = 2**31


class ProfileRow(NamedTuple):
    """Time spent in one handler owner on one event, over the profiled run."""

    plugin: str
    event: str
    calls: int
    total_ns: int
    mean_ns: float


class _Totals:
    __slots__ = ("calls", "total_ns")

    def __init__(self) -> None:
        self.calls = 0
        self.total_ns = 0


class HookProfiler(Plugin):
    """Time each plugin's event handlers, the batch step and the data wait during a run.

    At ``setup`` the profiler calls ``bus.instrument`` to wrap every event
    handler in a timer. At ``teardown`` it removes the timers, logs
    a summary table at INFO level and, when ``trace_path`` is given, writes a
    JSON file in the Chrome Trace Event Format, which Perfetto and
    ``chrome://tracing`` load.

    What is measured, per (plugin, event) pair: calls and total time. The
    plugin column is the handler owner's ``state_key`` (``module`` for the
    module's hooks). Handler times are inclusive: a handler that emits another
    event, such as a plugin calling ``trainer.log_metrics``, includes the time
    of that event's handlers, which also appear in their own rows. Two more
    rows time the loop itself, under the plugin name ``loop``:

    - ``batch_step``: the whole batch step, measured by a wrapper with order
      ``-2**31``, outside every other wrapper of a higher order. It includes
      forward, backward, the optimizer step and the handlers that run inside.
    - ``data_wait``: the time from the end of one batch (after the last
      ``on_batch_end`` handler) to the start of the next batch of the same
      epoch (before the first ``on_batch_start`` handler). The time spent in
      handlers in between, such as ``on_log``, is subtracted, so what remains
      is mostly the data loader producing the next batch. The first batch of
      each epoch is not counted, nor a gap with a validation run in it.

    Args:
        trace_path: where to write the trace JSON file at teardown; None writes
            no trace. When ``trainer.world_size > 1``, each rank writes its own
            file, with ``.rank{N}`` inserted before the extension.
        clock: a function returning monotonic time in integer nanoseconds.
        max_trace_events: the maximum number of trace events kept in memory.
            Later ones are dropped with one warning, while the summary keeps counting.

    Raises:
        MisconfigurationError: ``clock`` is not callable or ``max_trace_events`` is not a positive int.
    """

    critical = False

    def __init__(
        self,
        trace_path: str | os.PathLike[str] | None = None,
        clock: Callable[[], int] = time.perf_counter_ns,
        max_trace_events: int = 1_000_000,
    ) -> None:
        if not callable(clock):
            raise MisconfigurationError(
                f"HookProfiler(clock={clock!r}) is invalid: clock must be a function that returns "
                "monotonic time in integer nanoseconds, such as time.perf_counter_ns."
            )
        if isinstance(max_trace_events, bool) or not isinstance(max_trace_events, int) or max_trace_events < 1:
            raise MisconfigurationError(
                f"HookProfiler(max_trace_events={max_trace_events!r}) is invalid: max_trace_events must be a "
                "positive int."
            )
        self.trace_path = os.fspath(trace_path) if trace_path is not None else None
        self.clock = clock
        self.max_trace_events = max_trace_events
        self._totals: dict[tuple[str, str], _Totals] = {}
        self._trace: list[dict[str, Any]] = []
        self._trace_full = False
        self._origin_ns = 0
        self._depth = 0
        self._handler_ns = 0
        self._batch_end_mark: tuple[int, int] | None = None
        self._bus: Any = None

    # ------------------------------------------------------------------ results

    def summary(self) -> list[ProfileRow]:
        """Return one row per (plugin, event), most total time first."""
        rows = [
            ProfileRow(plugin, event, totals.calls, totals.total_ns, totals.total_ns / totals.calls)
            for (plugin, event), totals in self._totals.items()
            if totals.calls
        ]
        rows.sort(key=lambda row: (-row.total_ns, row.plugin, row.event))
        return rows

    def format_summary(self) -> str:
        """Return the summary as an aligned text table with times in milliseconds and microseconds."""
        rows = self.summary()
        if not rows:
            return "(nothing was timed)"
        headers = ("plugin", "event", "calls", "total ms", "mean us")
        cells = [
            (row.plugin, row.event, str(row.calls), f"{row.total_ns / 1e6:.3f}", f"{row.mean_ns / 1e3:.1f}")
            for row in rows
        ]
        widths = [max([len(header), *(len(cell[i]) for cell in cells)]) for i, header in enumerate(headers)]
        lines = ["  ".join(f"{header:<{widths[i]}}" for i, header in enumerate(headers)).rstrip()]
        for cell in cells:
            text = f"{cell[0]:<{widths[0]}}  {cell[1]:<{widths[1]}}  "
            text += "  ".join(f"{value:>{widths[i]}}" for i, value in enumerate(cell[2:], start=2))
            lines.append(text)
        return "\n".join(lines)

    def trace(self) -> dict[str, Any]:
        """Return the Chrome trace of the run: ``traceEvents`` sorted by thread, then start time."""
        events = sorted(self._trace, key=lambda event: (event["tid"], event["ts"], -event["dur"]))
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    # ------------------------------------------------------------------ run start and end

    @on("setup", order=FIRST)
    def _start(self, payload: StagePayload) -> None:
        self._totals = {}
        self._trace = []
        self._trace_full = False
        self._depth = 0
        self._handler_ns = 0
        self._batch_end_mark = None
        self._origin_ns = self.clock()
        self._bus = payload.trainer.bus
        self._bus.instrument(self._instrument)

    @on("teardown", order=LAST)
    def _stop(self, payload: StagePayload) -> None:
        if self._bus is not None:
            self._bus.instrument(None)
            self._bus = None
        log.info("Time spent in event handlers, the batch step and the data wait:\n%s", self.format_summary())
        if self.trace_path is not None:
            self._write_trace(self.trace_path, payload.trainer)

    def _write_trace(self, path: str, trainer: Any) -> None:
        if int(getattr(trainer, "world_size", 1) or 1) > 1:
            stem, extension = os.path.splitext(path)
            path = f"{stem}.rank{int(getattr(trainer, 'global_rank', 0))}{extension}"
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        temporary = f"{path}.tmp"
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(self.trace(), file)
        os.replace(temporary, path)
        log.info("HookProfiler wrote the Chrome trace to %s", path)

    # ------------------------------------------------------------------ timing

    def _instrument(self, subscription: Subscription, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Return ``handler`` wrapped in a timer; the profiler's own handlers stay untimed."""
        if subscription.plugin is self:
            return handler
        plugin = subscription.plugin.state_key if subscription.plugin is not None else subscription.owner
        event = subscription.target
        totals = self._totals.setdefault((plugin, event), _Totals())
        clock = self.clock
        arguments = {"plugin": plugin, "event": event, "handler": subscription.handler_name}

        def timed(payload: Any) -> Any:
            outermost = self._depth == 0
            self._depth += 1
            start = clock()
            try:
                return handler(payload)
            finally:
                elapsed = clock() - start
                self._depth -= 1
                totals.calls += 1
                totals.total_ns += elapsed
                if outermost:
                    self._handler_ns += elapsed
                self._record(f"{plugin} {event}", "handler", start, elapsed, arguments)

        return timed

    def _add_loop_time(self, event: str, start: int, elapsed: int) -> None:
        totals = self._totals.setdefault((LOOP, event), _Totals())
        totals.calls += 1
        totals.total_ns += elapsed
        self._record(event, LOOP, start, elapsed, {"plugin": LOOP, "event": event})

    def _record(self, name: str, category: str, start: int, elapsed: int, arguments: dict[str, str]) -> None:
        if self.trace_path is None:
            return
        if len(self._trace) >= self.max_trace_events:
            if not self._trace_full:
                self._trace_full = True
                log.warning(
                    "HookProfiler reached max_trace_events=%d; later events are left out of the trace, "
                    "but the summary still counts them. Raise max_trace_events to keep more.",
                    self.max_trace_events,
                )
            return
        self._trace.append(
            {
                "name": name,
                "cat": category,
                "ph": "X",
                "ts": (start - self._origin_ns) / 1000,
                "dur": elapsed / 1000,
                "pid": os.getpid(),
                "tid": threading.get_native_id(),
                "args": arguments,
            }
        )

    @around("batch_step", order=FIRST)
    def _time_batch_step(self, payload: BatchPayload, proceed: Callable[[], Any]) -> Any:
        start = self.clock()
        try:
            return proceed()
        finally:
            self._add_loop_time("batch_step", start, self.clock() - start)

    @on("on_batch_start", order=FIRST)
    def _end_data_wait(self, payload: BatchPayload) -> None:
        mark = self._batch_end_mark
        self._batch_end_mark = None
        if mark is None:
            return
        now = self.clock()
        marked_at, handler_ns_at_mark = mark
        waited = max((now - marked_at) - (self._handler_ns - handler_ns_at_mark), 0)
        # The wait is placed just before the batch start, where the loader produces the batch,
        # so that in the trace it does not overlap the handlers that ran after the previous batch.
        self._add_loop_time("data_wait", now - waited, waited)

    @on("on_batch_end", order=LAST)
    def _start_data_wait(self, payload: BatchEndPayload) -> None:
        self._batch_end_mark = (self.clock(), self._handler_ns)

    @on("on_epoch_start")
    def _forget_mark_at_epoch_start(self, payload: Payload) -> None:
        self._batch_end_mark = None

    @on("on_epoch_end")
    def _forget_mark_at_epoch_end(self, payload: Payload) -> None:
        self._batch_end_mark = None

    @on("on_validation_start")
    def _forget_mark_at_validation(self, payload: Payload) -> None:
        self._batch_end_mark = None
