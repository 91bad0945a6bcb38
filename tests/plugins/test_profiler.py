from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest

import hookrt
from hookrt.plugins.csv_logger import CSVLogger
from hookrt.plugins.profiler import HookProfiler, ProfileRow
from hookrt.plugins.progress import ProgressBar


class ManualClock:
    """A nanosecond clock that moves only when the test advances it."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now

    def advance(self, nanoseconds: int) -> None:
        self.now += nanoseconds


class StepClock:
    """A nanosecond clock that moves forward by a fixed amount at every reading."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.now = 0

    def __call__(self) -> int:
        self.now += self.step
        return self.now


class Costly(hookrt.Plugin):
    """Spends fixed fake time in its handlers; its on_log handler emits a nested event."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock

    @hookrt.on("on_batch_start")
    def start(self, payload: Any) -> None:
        self.clock.advance(20)

    @hookrt.on("on_batch_end")
    def end(self, payload: Any) -> None:
        self.clock.advance(100)

    @hookrt.on("on_log")
    def log(self, payload: Any) -> None:
        self.clock.advance(5)
        payload.trainer.bus.emit("on_save_checkpoint", checkpoint={})


class Inner(hookrt.Plugin):
    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock

    @hookrt.on("on_save_checkpoint")
    def save(self, payload: Any) -> None:
        self.clock.advance(25)


def rows_by_key(profiler: HookProfiler) -> dict[tuple[str, str], ProfileRow]:
    return {(row.plugin, row.event): row for row in profiler.summary()}


def drive_epoch(trainer: Any, clock: ManualClock, batches: int) -> None:
    """Emit one epoch in which loading each batch takes 1000 ns and each batch step 500 ns."""
    bus = trainer.bus
    bus.emit("setup", stage="fit")
    bus.emit("on_epoch_start", epoch=0)
    for batch_idx in range(batches):
        clock.advance(1000)
        bus.emit("on_batch_start", batch=None, batch_idx=batch_idx)
        bus.wrap("batch_step", lambda payload: clock.advance(500), batch=None, batch_idx=batch_idx)
        bus.emit("on_batch_end", batch=None, batch_idx=batch_idx, outputs=None)
        bus.emit("on_log", metrics={"loss": 1.0}, step=batch_idx)
    bus.emit("on_epoch_end", epoch=0)
    bus.emit("teardown", stage="fit")


def test_totals_exact_with_manual_clock(make_trainer):
    clock = ManualClock()
    trainer = make_trainer()
    profiler = HookProfiler(clock=clock)
    trainer.register(profiler, Costly(clock), Inner(clock))

    drive_epoch(trainer, clock, batches=3)

    rows = rows_by_key(profiler)
    assert rows[("Costly", "on_batch_start")] == ProfileRow("Costly", "on_batch_start", 3, 60, 20.0)
    assert rows[("Costly", "on_batch_end")] == ProfileRow("Costly", "on_batch_end", 3, 300, 100.0)
    # Inclusive: Costly's on_log time contains the nested on_save_checkpoint handler.
    assert rows[("Costly", "on_log")] == ProfileRow("Costly", "on_log", 3, 90, 30.0)
    assert rows[("Inner", "on_save_checkpoint")] == ProfileRow("Inner", "on_save_checkpoint", 3, 75, 25.0)
    assert rows[("loop", "batch_step")] == ProfileRow("loop", "batch_step", 3, 1500, 500.0)
    # The first batch has no data wait; the on_log time between batches is not counted as waiting.
    assert rows[("loop", "data_wait")] == ProfileRow("loop", "data_wait", 2, 2000, 1000.0)
    assert not any(row.plugin == "HookProfiler" for row in profiler.summary())


def test_summary_sorted_by_total(make_trainer):
    clock = ManualClock()
    trainer = make_trainer()
    profiler = HookProfiler(clock=clock)
    trainer.register(profiler, Costly(clock), Inner(clock))

    drive_epoch(trainer, clock, batches=3)

    totals = [row.total_ns for row in profiler.summary()]
    assert totals == sorted(totals, reverse=True)
    assert profiler.summary()[0] == ProfileRow("loop", "data_wait", 2, 2000, 1000.0)


def test_validation_gap_not_counted_as_data_wait(make_trainer):
    clock = ManualClock()
    trainer = make_trainer()
    profiler = HookProfiler(clock=clock)
    trainer.register(profiler)
    bus = trainer.bus
    bus.emit("setup", stage="fit")
    bus.emit("on_epoch_start", epoch=0)
    bus.emit("on_batch_start", batch=None, batch_idx=0)
    bus.emit("on_batch_end", batch=None, batch_idx=0, outputs=None)
    bus.emit("on_validation_start", sanity_checking=False)
    clock.advance(10_000)
    bus.emit("on_validation_end", sanity_checking=False)
    bus.emit("on_batch_start", batch=None, batch_idx=1)
    bus.emit("on_batch_end", batch=None, batch_idx=1, outputs=None)
    bus.emit("on_epoch_end", epoch=0)
    clock.advance(10_000)
    bus.emit("on_epoch_start", epoch=1)
    bus.emit("on_batch_start", batch=None, batch_idx=0)
    bus.emit("teardown", stage="fit")

    assert ("loop", "data_wait") not in rows_by_key(profiler)


def test_fake_fit_totals_with_step_clock(make_trainer, run_fit):
    trainer = make_trainer(max_epochs=2, num_training_batches=4)
    profiler = HookProfiler(clock=StepClock(1000))
    trainer.register(profiler, CSVLogger(), ProgressBar(file=io.StringIO()))
    trainer.bus.subscribe("on_batch_end", lambda payload: None, name="module")

    run_fit(trainer)

    rows = rows_by_key(profiler)
    # Each timed call reads the clock twice and no handler here reads it in between, so each call costs one step.
    for (plugin, event), row in rows.items():
        if plugin != "loop":
            assert row.total_ns == row.calls * 1000, (plugin, event)
    assert rows[("module", "on_batch_end")].calls == 8
    assert rows[("ProgressBar", "on_batch_end")].calls == 8
    logger_key = next(plugin for plugin, event in rows if plugin.startswith("CSVLogger("))
    assert rows[(logger_key, "on_log")].calls == 6
    assert rows[("loop", "batch_step")].calls == 8
    assert rows[("loop", "data_wait")].calls == 6


def test_instrumentation_removed_at_teardown(make_trainer):
    clock = ManualClock()
    trainer = make_trainer()
    profiler = HookProfiler(clock=clock)
    trainer.register(profiler, Costly(clock), Inner(clock))
    drive_epoch(trainer, clock, batches=1)
    before = rows_by_key(profiler)[("Costly", "on_batch_end")].calls

    trainer.bus.emit("on_batch_end", batch=None, batch_idx=0, outputs=None)

    assert rows_by_key(profiler)[("Costly", "on_batch_end")].calls == before
    assert trainer.bus._instrument is None


def test_summary_table_logged(make_trainer, caplog):
    clock = ManualClock()
    trainer = make_trainer()
    trainer.register(HookProfiler(clock=clock), Costly(clock), Inner(clock))

    with caplog.at_level(logging.INFO, logger="hookrt.plugins.profiler"):
        drive_epoch(trainer, clock, batches=2)

    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    table = messages[0].splitlines()
    assert table[0] == "Time spent in event handlers, the batch step and the data wait:"
    assert table[1].split() == ["plugin", "event", "calls", "total", "ms", "mean", "us"]
    assert table[2].split() == ["loop", "batch_step", "2", "0.001", "0.5"]


def test_trace_file_structure(make_trainer, run_fit, tmp_path):
    trace_path = tmp_path / "traces" / "run.json"
    trainer = make_trainer(max_epochs=1, num_training_batches=3)
    trainer.register(HookProfiler(trace_path=trace_path, clock=StepClock(1500)), CSVLogger())

    run_fit(trainer)

    with open(trace_path, encoding="utf-8") as file:
        trace = json.load(file)
    assert trace["displayTimeUnit"] == "ms"
    events = trace["traceEvents"]
    assert events
    for event in events:
        assert set(event) == {"name", "cat", "ph", "ts", "dur", "pid", "tid", "args"}
        assert event["ph"] == "X"
        assert isinstance(event["name"], str)
        assert event["cat"] in {"handler", "loop"}
        assert isinstance(event["ts"], (int, float))
        assert isinstance(event["dur"], (int, float))
        assert event["ts"] >= 0
        assert event["dur"] >= 0
        assert isinstance(event["pid"], int)
        assert isinstance(event["tid"], int)
        assert isinstance(event["args"], dict)
    for tid in {event["tid"] for event in events}:
        starts = [event["ts"] for event in events if event["tid"] == tid]
        assert starts == sorted(starts)
    names = {event["name"] for event in events}
    assert "batch_step" in names
    assert "data_wait" in names
    assert any(name.endswith(" on_log") for name in names)
    # Microseconds: a handler timed with a 1500 ns step lasts 1.5 us.
    handler = next(event for event in events if event["cat"] == "handler")
    assert handler["dur"] == 1.5


def test_trace_path_per_rank(make_trainer, run_fit, tmp_path):
    trainer = make_trainer(max_epochs=1, num_training_batches=1, world_size=2, is_global_zero=False)
    trainer.register(HookProfiler(trace_path=tmp_path / "trace.json"))

    run_fit(trainer)

    assert (tmp_path / "trace.rank1.json").exists()
    assert not (tmp_path / "trace.json").exists()


def test_trace_capped_at_max_events(make_trainer, run_fit, tmp_path, caplog):
    trainer = make_trainer(max_epochs=1, num_training_batches=4)
    profiler = HookProfiler(trace_path=tmp_path / "trace.json", max_trace_events=5)
    trainer.register(profiler, CSVLogger())

    with caplog.at_level(logging.WARNING, logger="hookrt.plugins.profiler"):
        run_fit(trainer)

    assert len(profiler.trace()["traceEvents"]) == 5
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "reached max_trace_events=5" in warnings[0].getMessage()
    assert rows_by_key(profiler)[("loop", "batch_step")].calls == 4


def test_invalid_arguments_raise():
    with pytest.raises(hookrt.MisconfigurationError, match=r"clock=1\) is invalid: clock must be a function"):
        HookProfiler(clock=1)  # type: ignore[arg-type]
    with pytest.raises(hookrt.MisconfigurationError, match=r"max_trace_events=0\) is invalid"):
        HookProfiler(max_trace_events=0)
