"""Tests for `hookrt.Bus`: registration, validation, ordering, filters, wrappers and dispatch."""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import Callable
from typing import Any

import blinker
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hookrt import (
    Bus,
    BusRow,
    CancelBatch,
    CancelEpoch,
    Event,
    Handle,
    HookrtError,
    Plugin,
    PluginError,
    around,
    on,
)
from hookrt._events import BatchEndPayload, BatchPayload, EpochPayload, Payload

BUS_LOGGER = "hookrt._bus"


def batch_end_fields(batch_idx: int = 0) -> dict[str, Any]:
    return {"batch": [batch_idx], "batch_idx": batch_idx, "outputs": None}


def recorder(calls: list[str], label: str) -> Callable[[Any], None]:
    """Return a handler that appends ``label`` to ``calls``."""

    def handler(payload: Any) -> None:
        calls.append(label)

    handler.__qualname__ = label
    return handler


def order_of(bus: Bus, event: str = "on_batch_end") -> list[str]:
    return [subscription.handler_name for subscription in bus.resolved(event)]


# ------------------------------------------------------------------------------ plugins used below


class Counter(Plugin):
    """Records the index of each batch it receives."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    @on("on_batch_end")
    def count(self, payload: BatchEndPayload) -> None:
        self.batches.append(payload.batch_idx)


class EveryThird(Plugin):
    def __init__(self) -> None:
        self.batches: list[int] = []

    @on("on_batch_end", every=3)
    def tick(self, payload: BatchEndPayload) -> None:
        self.batches.append(payload.batch_idx)


class Flaky(Plugin):
    """A non-critical plugin whose batch handler fails on demand."""

    critical = False

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.batches: list[int] = []
        self.epochs: list[int] = []

    @on("on_batch_end")
    def batch_end(self, payload: BatchEndPayload) -> None:
        self.batches.append(payload.batch_idx)
        if self.error is not None:
            raise self.error

    @on("on_epoch_end")
    def epoch_end(self, payload: EpochPayload) -> None:
        self.epochs.append(payload.epoch)


class Strict(Plugin):
    """A critical plugin whose batch handler raises the error it was given."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    @on("on_batch_end")
    def batch_end(self, payload: BatchEndPayload) -> None:
        raise self.error


# Plugins of the describe() golden test, at module level so their qualified names are short.


class Checkpoint(Plugin):
    @on("on_epoch_end", order=10)
    def save(self, payload: EpochPayload) -> None:
        pass


def after_first_epoch(payload: EpochPayload) -> bool:
    return payload.epoch > 0


class Meter(Plugin):
    @on("on_batch_end", every=2)
    def tick(self, payload: BatchEndPayload) -> None:
        pass

    @on("on_epoch_end", before=("Checkpoint",), when=after_first_epoch)
    def summarize(self, payload: EpochPayload) -> None:
        pass


class Precision(Plugin):
    @around("batch_step", order=-1)
    def autocast(self, payload: BatchPayload, proceed: Callable[[], Any]) -> Any:
        return proceed()


def batch_end_hook(payload: BatchEndPayload) -> None:
    pass


# ------------------------------------------------------------------------------ emit


def test_emit_without_subscribers_returns_none():
    bus = Bus()

    assert bus.emit("on_batch_end", **batch_end_fields()) is None
    assert not bus.has_subscribers("on_batch_end")


def test_emit_without_subscribers_builds_no_payload():
    # Missing fields go unnoticed: the bus returns before building the payload.
    assert Bus().emit("on_batch_end") is None


def test_emit_returns_filled_payload():
    bus = Bus(trainer="the trainer", module="the module")
    received: list[Any] = []
    bus.subscribe("on_batch_end", received.append)

    payload = bus.emit("on_batch_end", **batch_end_fields(7))

    assert received == [payload]
    assert isinstance(payload, BatchEndPayload)
    assert payload.trainer == "the trainer"
    assert payload.module == "the module"
    assert payload.batch_idx == 7


def test_emit_accepts_event_member():
    bus = Bus()
    received: list[Any] = []
    bus.subscribe(Event.FIT_START, received.append)

    bus.emit(Event.FIT_START)

    assert len(received) == 1
    assert bus.has_subscribers(Event.FIT_START)


def test_handlers_share_one_payload():
    bus = Bus()

    def first(payload: BatchEndPayload) -> None:
        payload.outputs = {"loss": 1.0}

    seen: list[Any] = []
    bus.subscribe("on_batch_end", first)
    bus.subscribe("on_batch_end", lambda payload: seen.append(payload.outputs))

    payload = bus.emit("on_batch_end", **batch_end_fields())

    assert seen == [{"loss": 1.0}]
    assert payload is not None
    assert payload.outputs == {"loss": 1.0}


def test_emit_missing_field_raises():
    bus = Bus()
    bus.subscribe("on_batch_end", lambda payload: None)

    with pytest.raises(HookrtError, match=re.escape("missing 1 required keyword-only argument: 'outputs'")) as info:
        bus.emit("on_batch_end", batch=[1], batch_idx=0)

    assert str(info.value) == (
        "Cannot build the payload of event 'on_batch_end': BatchEndPayload.__init__() missing 1 required "
        "keyword-only argument: 'outputs'. Its fields are: batch, batch_idx, outputs."
    )


def test_emit_unknown_field_raises():
    bus = Bus()
    bus.subscribe("on_fit_start", lambda payload: None)

    with pytest.raises(HookrtError) as info:
        bus.emit("on_fit_start", epoch=1)

    assert str(info.value) == (
        "Cannot build the payload of event 'on_fit_start': Payload.__init__() got an unexpected keyword "
        "argument 'epoch'. It takes no fields."
    )


def test_emit_unknown_field_beside_default_raises():
    # after_backward has a field with a default (optimizer_idx), so the field count alone cannot tell.
    bus = Bus()
    bus.subscribe("after_backward", lambda payload: None)

    with pytest.raises(HookrtError, match=re.escape("got an unexpected keyword argument 'scale'")):
        bus.emit("after_backward", loss=1.0, scale=2.0)


def test_emit_default_field_filled():
    bus = Bus()
    bus.subscribe("after_backward", lambda payload: None)

    payload = bus.emit("after_backward", loss=1.0)

    assert payload.loss == 1.0
    assert payload.optimizer_idx == 0


# ------------------------------------------------------------------------------ namespace and references


def test_buses_have_separate_namespaces():
    first, second = Bus(), Bus()
    received_first: list[Any] = []
    received_second: list[Any] = []
    first.subscribe("on_fit_start", received_first.append)
    second.subscribe("on_fit_start", received_second.append)

    first.emit("on_fit_start")

    assert first.namespace is not second.namespace
    assert first.signal("on_fit_start") is not second.signal("on_fit_start")
    assert len(received_first) == 1
    assert received_second == []


def test_subscriptions_connected_in_blinker():
    bus = Bus()
    received: list[Any] = []
    handle = bus.subscribe("on_fit_start", received.append)

    bus.signal("on_fit_start").send("sent through blinker")

    assert received == ["sent through blinker"]
    assert not blinker.signal("on_fit_start").receivers  # the global namespace stays empty
    handle.remove()
    assert not bus.signal("on_fit_start").receivers


def test_unreferenced_plugin_still_receives():
    bus = Bus()
    batches: list[int] = []

    class Appender(Plugin):
        @on("on_batch_end")
        def append(self, payload: BatchEndPayload) -> None:
            batches.append(payload.batch_idx)

    bus.register(Appender())
    gc.collect()
    bus.emit("on_batch_end", **batch_end_fields(4))

    assert batches == [4]
    assert len(bus.signal("on_batch_end").receivers) == 1


# ------------------------------------------------------------------------------ handles, connected, muted


def test_subscribe_returns_handle_that_removes():
    bus = Bus()
    calls: list[str] = []
    handle = bus.subscribe("on_fit_start", recorder(calls, "hook"))

    bus.emit("on_fit_start")
    handle.remove()
    bus.emit("on_fit_start")

    assert isinstance(handle, Handle)
    assert calls == ["hook"]
    assert not bus.has_subscribers("on_fit_start")
    assert handle.subscriptions == ()


def test_handle_remove_twice_is_harmless():
    bus = Bus()
    handle = bus.subscribe("on_fit_start", lambda payload: None)

    handle.remove()
    handle.remove()

    assert bus.resolved("on_fit_start") == []


def test_handle_as_context_manager():
    bus = Bus()
    calls: list[str] = []

    with bus.subscribe("on_fit_start", recorder(calls, "inside")) as handle:
        bus.emit("on_fit_start")
        assert len(handle.subscriptions) == 1
    bus.emit("on_fit_start")

    assert calls == ["inside"]


def test_register_handle_removes_plugin():
    bus = Bus()
    counter = Counter()
    handle = bus.register(counter)

    bus.emit("on_batch_end", **batch_end_fields(0))
    handle.remove()
    bus.emit("on_batch_end", **batch_end_fields(1))

    assert handle.plugin is counter
    assert counter.batches == [0]
    assert bus.plugins == ()


def test_removed_plugin_can_register_again():
    bus = Bus()
    counter = Counter()
    bus.register(counter).remove()

    bus.register(counter)
    bus.emit("on_batch_end", **batch_end_fields(2))

    assert counter.batches == [2]


def test_connected_registers_for_block():
    bus = Bus()
    counter = Counter()

    with bus.connected(counter) as plugin:
        assert plugin is counter
        assert bus.plugins == (counter,)
        bus.emit("on_batch_end", **batch_end_fields(0))
    bus.emit("on_batch_end", **batch_end_fields(1))

    assert counter.batches == [0]
    assert bus.plugins == ()


def test_muted_dispatches_nothing():
    bus = Bus()
    counter = Counter()
    bus.register(counter)

    with bus.muted():
        assert bus.emit("on_batch_end", **batch_end_fields(0)) is None
        assert not bus.has_subscribers("on_batch_end")
    bus.emit("on_batch_end", **batch_end_fields(1))

    assert counter.batches == [1]


def test_muted_nested():
    bus = Bus()
    counter = Counter()
    bus.register(counter)

    with bus.muted():
        with bus.muted():
            bus.emit("on_batch_end", **batch_end_fields(0))
        bus.emit("on_batch_end", **batch_end_fields(1))
    bus.emit("on_batch_end", **batch_end_fields(2))

    assert counter.batches == [2]


def test_muted_keeps_subscribe_inside_block():
    bus = Bus()
    calls: list[str] = []

    with bus.muted():
        bus.subscribe("on_fit_start", recorder(calls, "added while muted"))
        bus.emit("on_fit_start")
        calls_while_muted = list(calls)
    bus.emit("on_fit_start")

    assert calls_while_muted == []
    assert calls == ["added while muted"]


def test_muted_keeps_remove_inside_block():
    bus = Bus()
    calls: list[str] = []
    handle = bus.subscribe("on_fit_start", recorder(calls, "removed while muted"))

    with bus.muted():
        handle.remove()
    bus.emit("on_fit_start")

    assert calls == []


def test_muted_still_runs_wrappers():
    bus = Bus()
    calls: list[str] = []

    def wrapper(payload: BatchPayload, proceed: Callable[[], Any]) -> Any:
        calls.append("wrapper")
        return proceed()

    bus.wrap_with("batch_step", wrapper)
    with bus.muted():
        result = bus.wrap("batch_step", lambda payload: "body", batch=[0], batch_idx=0)

    assert result == "body"
    assert calls == ["wrapper"]


# ------------------------------------------------------------------------------ ordering


def test_lower_order_runs_first():
    bus = Bus()
    calls: list[str] = []
    bus.subscribe("on_batch_end", recorder(calls, "late"), order=5)
    bus.subscribe("on_batch_end", recorder(calls, "early"), order=-5)
    bus.subscribe("on_batch_end", recorder(calls, "middle"))

    bus.emit("on_batch_end", **batch_end_fields())

    assert calls == ["early", "middle", "late"]


def test_equal_orders_run_in_registration_order():
    bus = Bus()
    calls: list[str] = []
    for label in ("first", "second", "third"):
        bus.subscribe("on_batch_end", recorder(calls, label), order=1)

    bus.emit("on_batch_end", **batch_end_fields())

    assert calls == ["first", "second", "third"]


def test_before_overrides_order():
    bus = Bus()
    calls: list[str] = []
    bus.subscribe("on_batch_end", recorder(calls, "logger"), name="Logger", order=-10)
    bus.subscribe("on_batch_end", recorder(calls, "meter"), name="Meter", order=10, before=("Logger",))

    bus.emit("on_batch_end", **batch_end_fields())

    assert calls == ["meter", "logger"]


def test_after_overrides_order():
    bus = Bus()
    calls: list[str] = []
    bus.subscribe("on_batch_end", recorder(calls, "saver"), name="Saver", order=-10, after="Meter")
    bus.subscribe("on_batch_end", recorder(calls, "meter"), name="Meter", order=10)

    bus.emit("on_batch_end", **batch_end_fields())

    assert calls == ["meter", "saver"]


def test_after_module_name():
    bus = Bus()
    calls: list[str] = []
    bus.subscribe("on_batch_end", recorder(calls, "plugin"), name="EarlyStopping", order=-100, after=("module",))
    bus.subscribe("on_batch_end", recorder(calls, "module hook"), name="module")

    bus.emit("on_batch_end", **batch_end_fields())

    assert calls == ["module hook", "plugin"]


def test_constraint_on_absent_name_is_ignored():
    bus = Bus()
    calls: list[str] = []
    bus.subscribe("on_batch_end", recorder(calls, "a"), order=1, before=("NotRegistered",))
    bus.subscribe("on_batch_end", recorder(calls, "b"), order=0)

    bus.emit("on_batch_end", **batch_end_fields())

    assert calls == ["b", "a"]


def test_constraints_apply_per_event():
    bus = Bus()
    bus.subscribe("on_batch_end", recorder([], "meter"), name="Meter", before=("Logger",), order=1)
    bus.subscribe("on_epoch_end", recorder([], "logger"), name="Logger")
    bus.subscribe("on_epoch_end", recorder([], "meter epoch"), name="Meter", order=1)

    assert order_of(bus, "on_epoch_end") == ["logger", "meter epoch"]


def test_plugin_handlers_ordered_by_plugin_name():
    class Reader(Plugin):
        def __init__(self, calls: list[str]) -> None:
            self.calls = calls

        @on("on_batch_end", order=-1, after=("Counter",))
        def read(self, payload: BatchEndPayload) -> None:
            self.calls.append("reader")

    bus = Bus()
    calls: list[str] = []
    bus.register(Reader(calls))
    counter = Counter()
    bus.register(counter)
    bus.subscribe("on_batch_end", lambda payload: calls.append(f"counter has {len(counter.batches)}"), order=-2)

    bus.emit("on_batch_end", **batch_end_fields())

    assert calls == ["counter has 0", "reader"]
    assert counter.batches == [0]


def test_cycle_raises_naming_plugins():
    bus = Bus()
    bus.subscribe("on_batch_end", recorder([], "saver"), name="Saver", before=("Logger",))

    with pytest.raises(PluginError) as info:
        bus.subscribe("on_batch_end", recorder([], "logger"), name="Logger", before=("Saver",))

    assert str(info.value) == (
        "The before=/after= constraints on 'on_batch_end' form a cycle: 'Saver' -> 'Logger' -> 'Saver', "
        "where each must run before the next. Drop one of these constraints so that an order exists."
    )
    assert info.value.event == "on_batch_end"
    assert order_of(bus) == ["saver"]


def test_cycle_with_handler_outside_it():
    """A handler that only follows the cycle must not hide it (it has no successor in the cycle)."""
    bus = Bus()
    bus.subscribe("on_batch_end", recorder([], "tail"), name="Tail", after=("Saver",))
    bus.subscribe("on_batch_end", recorder([], "saver"), name="Saver", after=("Logger",))

    with pytest.raises(PluginError, match=re.escape("form a cycle: 'Saver' -> 'Logger' -> 'Saver', where")):
        bus.subscribe("on_batch_end", recorder([], "logger"), name="Logger", after=("Saver",))

    assert order_of(bus) == ["saver", "tail"]


def test_cycle_rolls_back_whole_plugin():
    class Looping(Plugin):
        @on("on_epoch_end")
        def epoch_end(self, payload: EpochPayload) -> None:
            pass

        @on("on_batch_end", before=("Saver",))
        def batch_end(self, payload: BatchEndPayload) -> None:
            pass

    bus = Bus()
    bus.subscribe("on_batch_end", recorder([], "saver"), name="Saver", before=("Looping",))

    with pytest.raises(PluginError, match=re.escape("form a cycle: 'Saver' -> 'Looping' -> 'Saver', where")):
        bus.register(Looping())

    assert bus.plugins == ()
    assert bus.resolved("on_epoch_end") == []
    assert not bus.signal("on_epoch_end").receivers
    assert order_of(bus) == ["saver"]


NAMES = ("A", "B", "C", "D")


@st.composite
def registrations(draw: st.DrawFn) -> list[tuple[str, int, tuple[str, ...], tuple[str, ...]]]:
    """Draw (owner, order, before, after) for up to 8 handlers on one event."""
    names = st.sampled_from(NAMES)
    constraint = st.lists(names, max_size=2, unique=True).map(tuple)
    entry = st.tuples(names, st.integers(-2, 2), constraint, constraint)
    return draw(st.lists(entry, min_size=1, max_size=8))


def reference_order(entries: list[tuple[str, int, tuple[str, ...], tuple[str, ...]]]) -> list[int] | None:
    """Return the dispatch order as indices into ``entries``, or None when the constraints form a cycle.

    Repeatedly picks, among the handlers whose predecessors have all been
    placed, the one with the smallest (order, registration index).
    """

    def must_precede(first: int, second: int) -> bool:
        first_owner, _, first_before, _ = entries[first]
        second_owner, _, _, second_after = entries[second]
        return first != second and (second_owner in first_before or first_owner in second_after)

    placed: list[int] = []
    remaining = set(range(len(entries)))
    while remaining:
        ready = [i for i in remaining if not any(must_precede(j, i) for j in remaining)]
        if not ready:
            return None
        chosen = min(ready, key=lambda i: (entries[i][1], i))
        placed.append(chosen)
        remaining.remove(chosen)
    return placed


@settings(max_examples=200, deadline=None, database=None)
@given(registrations())
def test_order_matches_reference(entries):
    bus = Bus()
    accepted: list[tuple[str, int, tuple[str, ...], tuple[str, ...]]] = []
    accepted_labels: list[str] = []
    for index, (owner, order, before, after) in enumerate(entries):
        label = f"handler{index}"
        options = {"name": owner, "order": order, "before": before, "after": after}
        if reference_order([*accepted, (owner, order, before, after)]) is None:
            # A draw that makes a cycle is rejected, and the bus stays as it was.
            with pytest.raises(PluginError, match="form a cycle"):
                bus.subscribe("on_batch_end", recorder([], label), **options)
            continue
        bus.subscribe("on_batch_end", recorder([], label), **options)
        accepted.append((owner, order, before, after))
        accepted_labels.append(label)

    expected = reference_order(accepted)

    assert expected is not None
    assert order_of(bus) == [accepted_labels[i] for i in expected]


# ------------------------------------------------------------------------------ filters


def test_every_fires_on_multiples():
    bus = Bus()
    plugin = EveryThird()
    bus.register(plugin)

    for batch_idx in range(1, 10):
        bus.emit("on_batch_end", **batch_end_fields(batch_idx))

    assert plugin.batches == [3, 6, 9]


def test_once_fires_on_first_only():
    bus = Bus()
    calls: list[int] = []
    bus.subscribe("on_epoch_end", lambda payload: calls.append(payload.epoch), once=True)

    for epoch in range(3):
        bus.emit("on_epoch_end", epoch=epoch)

    assert calls == [0]


def test_when_filters_by_payload():
    bus = Bus()
    calls: list[int] = []
    bus.subscribe("on_epoch_end", lambda payload: calls.append(payload.epoch), when=lambda payload: payload.epoch % 2)

    for epoch in range(5):
        bus.emit("on_epoch_end", epoch=epoch)

    assert calls == [1, 3]


def test_every_counts_emissions_not_calls():
    bus = Bus()
    calls: list[int] = []
    bus.subscribe(
        "on_epoch_end", lambda payload: calls.append(payload.epoch), every=2, when=lambda payload: payload.epoch > 2
    )

    for epoch in range(1, 7):
        bus.emit("on_epoch_end", epoch=epoch)

    assert calls == [4, 6]


def test_state_dict_holds_filter_counters():
    bus = Bus()
    bus.register(EveryThird())
    bus.register(Counter())
    once_handle = bus.subscribe("on_epoch_end", recorder([], "once_hook"), name="module", once=True)

    for batch_idx in range(4):
        bus.emit("on_batch_end", **batch_end_fields(batch_idx))
    bus.emit("on_epoch_end", epoch=0)

    assert bus.state_dict() == {
        "counters": {"EveryThird/EveryThird.tick/on_batch_end": 4, "module/once_hook/on_epoch_end": 1}
    }
    once_handle.remove()


def test_load_state_dict_continues_counting():
    first_bus = Bus()
    first_bus.register(EveryThird())
    for batch_idx in range(2):
        first_bus.emit("on_batch_end", **batch_end_fields(batch_idx))
    state = first_bus.state_dict()

    second_bus = Bus()
    plugin = EveryThird()
    second_bus.register(plugin)
    second_bus.load_state_dict(state)
    for batch_idx in range(2, 6):
        second_bus.emit("on_batch_end", **batch_end_fields(batch_idx))

    assert plugin.batches == [2, 5]


def test_load_state_dict_restores_once():
    state = {"counters": {"module/once_hook/on_epoch_end": 1}}
    bus = Bus()
    calls: list[str] = []
    bus.subscribe("on_epoch_end", recorder(calls, "once_hook"), name="module", once=True)

    bus.load_state_dict(state)
    bus.emit("on_epoch_end", epoch=1)

    assert calls == []


def test_load_state_dict_ignores_unknown_keys():
    bus = Bus()
    plugin = EveryThird()
    bus.register(plugin)

    bus.load_state_dict({"counters": {"Gone/Gone.tick/on_batch_end": 2}})
    for batch_idx in range(3):
        bus.emit("on_batch_end", **batch_end_fields(batch_idx))

    assert plugin.batches == [2]


def test_counters_follow_state_key():
    first, second = EveryThird(), EveryThird()
    first.state_key = "EveryThird[a]"
    second.state_key = "EveryThird[b]"
    bus = Bus()
    bus.register(first)
    bus.register(second)

    bus.emit("on_batch_end", **batch_end_fields())

    assert set(bus.state_dict()["counters"]) == {
        "EveryThird[a]/EveryThird.tick/on_batch_end",
        "EveryThird[b]/EveryThird.tick/on_batch_end",
    }


# ------------------------------------------------------------------------------ wrappers


def tracing_wrapper(trace: list[str], label: str) -> Callable[[Any, Callable[[], Any]], Any]:
    def wrapper(payload: Any, proceed: Callable[[], Any]) -> Any:
        trace.append(f"enter {label}")
        proceed()
        trace.append(f"exit {label}")
        return None

    wrapper.__qualname__ = label
    return wrapper


def test_wrappers_nest_outermost_first():
    bus = Bus()
    trace: list[str] = []
    bus.wrap_with("batch_step", tracing_wrapper(trace, "inner"), order=5)
    bus.wrap_with("batch_step", tracing_wrapper(trace, "outer"), order=-5)
    bus.wrap_with("batch_step", tracing_wrapper(trace, "middle"))

    result = bus.wrap("batch_step", lambda payload: trace.append("body") or "loss", batch=[0], batch_idx=0)

    assert result == "loss"
    assert trace == ["enter outer", "enter middle", "enter inner", "body", "exit inner", "exit middle", "exit outer"]


def test_wrap_without_wrappers_calls_body():
    bus = Bus(trainer="the trainer")
    received: list[Any] = []

    result = bus.wrap("optimizer_step", lambda payload: received.append(payload) or 3, optimizer="sgd", optimizer_idx=1)

    assert result == 3
    assert received[0].optimizer == "sgd"
    assert received[0].trainer == "the trainer"
    assert not bus.has_wrappers("optimizer_step")


def test_wrapper_return_replaces_result():
    bus = Bus()
    bus.wrap_with("forward", lambda payload, proceed: proceed() * 10)

    result = bus.wrap("forward", lambda payload: 4, stage="train", call=None, args=())

    assert result == 40


def test_wrapper_returning_none_keeps_result():
    bus = Bus()
    bus.wrap_with("forward", lambda payload, proceed: None if proceed() else None)

    result = bus.wrap("forward", lambda payload: 4, stage="train", call=None, args=())

    assert result == 4


def test_wrapper_can_change_payload():
    bus = Bus()

    def reroute(payload: Any, proceed: Callable[[], Any]) -> Any:
        payload.call = lambda x: x + 100
        return proceed()

    bus.wrap_with("forward", reroute)
    result = bus.wrap("forward", lambda payload: payload.call(*payload.args), stage="train", call=abs, args=(1,))

    assert result == 101


def test_plugin_wrapper_registered():
    bus = Bus()
    bus.register(Precision())

    assert bus.has_wrappers("batch_step")
    assert bus.wrap("batch_step", lambda payload: "done", batch=[0], batch_idx=0) == "done"


class Skipper(Plugin):
    @around("batch_step")
    def wrap(self, payload: BatchPayload, proceed: Callable[[], Any]) -> Any:
        return "skipped"


class Twice(Plugin):
    @around("batch_step")
    def wrap(self, payload: BatchPayload, proceed: Callable[[], Any]) -> Any:
        proceed()
        return proceed()


def test_wrapper_without_proceed_raises():
    bus = Bus()
    bus.register(Skipper())

    with pytest.raises(PluginError) as info:
        bus.wrap("batch_step", lambda payload: None, batch=[0], batch_idx=0)

    assert str(info.value) == (
        "Wrapper 'Skipper.wrap' of plugin 'Skipper' around 'batch_step' returned without calling proceed(). "
        "Call it exactly once, or raise hookrt.CancelBatch to skip the batch on purpose."
    )
    assert info.value.plugin == "Skipper"


def test_wrapper_proceeding_twice_raises():
    bus = Bus()
    bus.register(Twice())
    bodies: list[str] = []

    with pytest.raises(PluginError) as info:
        bus.wrap("batch_step", lambda payload: bodies.append("body"), batch=[0], batch_idx=0)

    assert str(info.value) == (
        "Wrapper 'Twice.wrap' of plugin 'Twice' around 'batch_step' called proceed() a second time. "
        "Call it exactly once."
    )
    assert bodies == ["body"]


def test_wrap_with_handle_removes():
    bus = Bus()
    handle = bus.wrap_with("batch_step", lambda payload, proceed: proceed())

    handle.remove()

    assert not bus.has_wrappers("batch_step")


# ------------------------------------------------------------------------------ describe


def golden_bus() -> Bus:
    bus = Bus()
    bus.register(Checkpoint())
    bus.register(Meter())
    bus.register(Precision())
    bus.subscribe("on_batch_end", batch_end_hook, name="module", order=-10, once=True)
    return bus


def test_describe_text():
    expected = "\n".join(
        [
            "[around batch_step]",
            "   1. Precision   Precision.autocast  order=-1",
            "on_epoch_end",
            "   1. Meter       Meter.summarize     order=0    when=after_first_epoch",
            "   2. Checkpoint  Checkpoint.save     order=10",
            "on_batch_end",
            "   1. module      batch_end_hook      order=-10  once",
            "   2. Meter       Meter.tick          order=0    every=2",
        ]
    )

    assert str(golden_bus().describe()) == expected


def test_describe_rows():
    table = golden_bus().describe()

    assert len(table) == 5
    assert table.for_target("on_epoch_end") == [
        BusRow("on_epoch_end", 1, "Meter", "Meter.summarize", 0, "when=after_first_epoch", "on"),
        BusRow("on_epoch_end", 2, "Checkpoint", "Checkpoint.save", 10, "", "on"),
    ]
    assert [row.handler for row in table.for_target(Event.BATCH_END)] == ["batch_end_hook", "Meter.tick"]
    assert [row.kind for row in table] == ["around", "on", "on", "on", "on"]


def test_describe_empty_bus():
    table = Bus().describe()

    assert len(table) == 0
    assert str(table) == "(no subscriptions)"


# ------------------------------------------------------------------------------ validation


def test_unknown_event_suggests_closest():
    with pytest.raises(PluginError) as info:
        Bus().subscribe("on_batch_ed", batch_end_hook)

    assert str(info.value) == (
        "Plugin '<ad hoc>' handler 'batch_end_hook' subscribes to unknown event 'on_batch_ed'. "
        "Did you mean 'on_batch_end'? Run `hookrt events` to list them."
    )
    assert info.value.event == "on_batch_ed"


def test_unknown_event_in_plugin_names_plugin():
    class Typo(Plugin):
        @on("on_epoch_ends")
        def handler(self, payload: EpochPayload) -> None:
            pass

    with pytest.raises(PluginError, match=re.escape("Did you mean 'on_epoch_end'?")) as info:
        Bus().register(Typo())

    assert str(info.value).startswith(
        "Plugin 'Typo' handler 'test_unknown_event_in_plugin_names_plugin.<locals>.Typo.handler' subscribes to "
        "unknown event 'on_epoch_ends'."
    )
    assert info.value.plugin == "Typo"


def test_around_given_event_name():
    class Misplaced(Plugin):
        @around("on_batch_end")
        def wrap(self, payload: Any, proceed: Callable[[], Any]) -> Any:
            return proceed()

    with pytest.raises(PluginError) as info:
        Bus().register(Misplaced())

    assert str(info.value).endswith(
        "subscribes to unknown wrapper point 'on_batch_end'. 'on_batch_end' is an event: use "
        "@hookrt.on('on_batch_end') for it. Valid points: batch_step, forward, optimizer_step."
    )


def test_on_given_wrapper_point():
    with pytest.raises(PluginError) as info:
        Bus().subscribe("batch_step", batch_end_hook)

    assert str(info.value) == (
        "Plugin '<ad hoc>' handler 'batch_end_hook' subscribes to unknown event 'batch_step'. 'batch_step' is a "
        "wrapper point: use @hookrt.around('batch_step') for it. Run `hookrt events` to list them."
    )


def test_optimizer_step_on_and_around():
    bus = Bus()
    bus.subscribe("optimizer_step", lambda payload: None)
    bus.wrap_with("optimizer_step", lambda payload, proceed: proceed())

    assert bus.has_subscribers("optimizer_step")
    assert bus.has_wrappers("optimizer_step")


def test_handler_with_wrong_arity():
    class TwoArguments(Plugin):
        @on("on_batch_end")
        def handler(self, payload: BatchEndPayload, extra: int) -> None:
            pass

    with pytest.raises(PluginError) as info:
        Bus().register(TwoArguments())

    assert str(info.value).endswith(
        "TwoArguments.handler(payload, extra)' on 'on_batch_end' cannot be called with "
        "one argument, the payload (BatchEndPayload): missing a required argument: 'extra'. Change the handler to "
        "take one argument, the payload (BatchEndPayload)."
    )


def test_handler_without_arguments():
    with pytest.raises(
        PluginError, match=re.escape("<lambda>()' on 'on_fit_start' cannot be called with one argument")
    ):
        Bus().subscribe("on_fit_start", lambda: None)


def test_wrapper_with_wrong_arity():
    with pytest.raises(PluginError) as info:
        Bus().wrap_with("forward", lambda payload: None)

    assert str(info.value).endswith(
        "<lambda>(payload)' on 'forward' cannot be called with two arguments, the "
        "payload (ForwardPayload) and proceed: too many positional arguments. Change the handler to take two "
        "arguments, the payload (ForwardPayload) and proceed."
    )


def test_handler_not_callable():
    with pytest.raises(PluginError) as info:
        Bus().subscribe("on_fit_start", "not a function")  # type: ignore[arg-type]

    assert str(info.value) == (
        "Plugin '<ad hoc>' handler 'not a function' on 'on_fit_start' is not callable. Pass a function or method."
    )


def test_unknown_option():
    class Misspelled(Plugin):
        @on("on_batch_end", evry=2, ordr=1)
        def handler(self, payload: BatchEndPayload) -> None:
            pass

    with pytest.raises(PluginError) as info:
        Bus().register(Misspelled())

    assert str(info.value).endswith(
        "Misspelled.handler' on 'on_batch_end' got unknown option(s) 'evry', 'ordr'. "
        "Valid options: after, before, every, once, order, when."
    )


def test_wrapper_rejects_event_options():
    with pytest.raises(PluginError, match=re.escape("got unknown option(s) 'every'. Valid options: order.")):
        Bus().wrap_with("batch_step", lambda payload, proceed: proceed(), every=2)


def test_same_handler_twice_on_event():
    bus = Bus()
    bus.subscribe("on_batch_end", batch_end_hook)

    with pytest.raises(PluginError) as info:
        bus.subscribe("on_batch_end", batch_end_hook, order=1)

    assert str(info.value) == (
        "Plugin '<ad hoc>' handler 'batch_end_hook' is already subscribed to 'on_batch_end'. Remove the earlier "
        "subscription first (handle.remove()), or subscribe a different function."
    )
    assert len(bus.resolved("on_batch_end")) == 1


def test_method_decorated_twice_rejected():
    class Doubled(Plugin):
        @on("on_batch_end", order=1)
        @on("on_batch_end")
        def handler(self, payload: BatchEndPayload) -> None:
            pass

    bus = Bus()
    with pytest.raises(PluginError, match=r"Plugin 'Doubled' handler '.*Doubled\.handler' is already subscribed to"):
        bus.register(Doubled())

    assert bus.plugins == ()
    assert bus.resolved("on_batch_end") == []


def test_same_handler_on_two_events_is_fine():
    bus = Bus()
    bus.subscribe("on_train_start", batch_end_hook)
    bus.subscribe("on_train_end", batch_end_hook)

    assert bus.has_subscribers("on_train_start")
    assert bus.has_subscribers("on_train_end")


def test_once_and_every_together():
    with pytest.raises(PluginError) as info:
        Bus().subscribe("on_batch_end", batch_end_hook, once=True, every=2)

    assert str(info.value) == (
        "Plugin '<ad hoc>' handler 'batch_end_hook' on 'on_batch_end' sets both once=True and every=2; they "
        "conflict. Keep one of them."
    )


@pytest.mark.parametrize("every", [0, -1, True, 1.5, "2"])
def test_bad_every(every):
    with pytest.raises(PluginError) as info:
        Bus().subscribe("on_batch_end", batch_end_hook, every=every)

    assert str(info.value) == (
        f"Plugin '<ad hoc>' handler 'batch_end_hook' on 'on_batch_end' has every={every!r}; every must be a "
        "positive int (every=N fires on the Nth, 2Nth, ... emission)."
    )


@pytest.mark.parametrize("order", ["1", 1.0, None, False])
def test_bad_order(order):
    with pytest.raises(PluginError) as info:
        Bus().subscribe("on_batch_end", batch_end_hook, order=order)

    assert str(info.value) == (
        f"Plugin '<ad hoc>' handler 'batch_end_hook' on 'on_batch_end' has order={order!r}; order must be an "
        "int (lower runs first)."
    )


def test_bad_when():
    with pytest.raises(PluginError) as info:
        Bus().subscribe("on_batch_end", batch_end_hook, when=True)

    assert str(info.value) == (
        "Plugin '<ad hoc>' handler 'batch_end_hook' on 'on_batch_end' has when=True; when must be a callable "
        "that takes the payload and returns a bool."
    )


def test_bad_before():
    with pytest.raises(PluginError) as info:
        Bus().subscribe("on_batch_end", batch_end_hook, before=("Logger", 3))

    assert str(info.value) == (
        "Plugin '<ad hoc>' handler 'batch_end_hook' on 'on_batch_end' has before=('Logger', 3); before must be "
        "a plugin name or a tuple of plugin names."
    )


def test_same_state_key_rejected():
    bus = Bus()
    bus.register(Counter())

    with pytest.raises(PluginError) as info:
        bus.register(Counter())

    assert str(info.value) == (
        "Plugin 'Counter' has state_key 'Counter', which the registered plugin Counter(state_key='Counter') "
        "already uses, so their checkpoint states would collide. Give the two instances different arguments, "
        "or set a distinct state_key on one of them."
    )
    assert len(bus.plugins) == 1


def test_different_state_keys_accepted():
    bus = Bus()
    first, second = Counter(), Counter()
    first.state_key = "Counter[train]"
    second.state_key = "Counter[val]"

    bus.register(first)
    bus.register(second)
    bus.emit("on_batch_end", **batch_end_fields(3))

    assert bus.plugins == (first, second)
    assert first.batches == [3]
    assert second.batches == [3]


def test_same_plugin_twice_rejected():
    bus = Bus()
    counter = Counter()
    bus.register(counter)

    with pytest.raises(PluginError, match=re.escape("Plugin 'Counter' is already registered on this bus.")):
        bus.register(counter)


def test_register_rejects_non_plugin():
    with pytest.raises(PluginError, match=r"is not a hookrt\.Plugin\. Subclass hookrt\.Plugin and decorate"):
        Bus().register(object())  # type: ignore[arg-type]


def test_failed_registration_leaves_bus_unchanged():
    class HalfValid(Plugin):
        @on("on_epoch_end")
        def valid(self, payload: EpochPayload) -> None:
            pass

        @on("on_batch_end", every=0)
        def invalid(self, payload: BatchEndPayload) -> None:
            pass

    bus = Bus()
    with pytest.raises(PluginError, match="every must be a positive int"):
        bus.register(HalfValid())

    assert bus.plugins == ()
    assert not bus.has_subscribers("on_epoch_end")
    assert not bus.signal("on_epoch_end").receivers


# ------------------------------------------------------------------------------ error policy


def test_critical_error_propagates_unchanged():
    bus = Bus()
    error = RuntimeError("boom")
    bus.register(Strict(error))
    calls: list[str] = []
    bus.subscribe("on_batch_end", recorder(calls, "later"), order=1)

    with pytest.raises(RuntimeError) as info:
        bus.emit("on_batch_end", **batch_end_fields())

    assert info.value is error
    assert calls == []


def test_ad_hoc_error_propagates():
    bus = Bus()
    error = ValueError("bad value")

    def failing(payload: Any) -> None:
        raise error

    bus.subscribe("on_fit_start", failing)

    with pytest.raises(ValueError) as info:
        bus.emit("on_fit_start")

    assert info.value is error
    assert bus.has_subscribers("on_fit_start")


def test_noncritical_error_disables_plugin(caplog):
    bus = Bus()
    error = RuntimeError("disk full")
    flaky = Flaky(error)
    bus.register(flaky)
    calls: list[str] = []
    bus.subscribe("on_batch_end", recorder(calls, "after flaky"), order=1)

    with caplog.at_level(logging.ERROR, logger=BUS_LOGGER):
        for batch_idx in range(3):
            bus.emit("on_batch_end", **batch_end_fields(batch_idx))
        bus.emit("on_epoch_end", epoch=0)

    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].name == BUS_LOGGER
    assert errors[0].exc_info is not None
    assert errors[0].exc_info[1] is error
    assert errors[0].getMessage() == (
        "Plugin 'Flaky' failed in handler Flaky.batch_end on 'on_batch_end' and is disabled for the rest of "
        "the run; training goes on."
    )
    assert flaky.batches == [0]
    assert flaky.epochs == []
    assert calls == ["after flaky"] * 3
    assert bus.is_disabled(flaky)


def test_disabled_plugin_skips_rest_of_emit(caplog):
    class TwoHandlers(Plugin):
        critical = False

        def __init__(self) -> None:
            self.calls: list[str] = []

        @on("on_batch_end")
        def first(self, payload: BatchEndPayload) -> None:
            self.calls.append("first")
            raise RuntimeError("first fails")

        @on("on_batch_end", order=1)
        def second(self, payload: BatchEndPayload) -> None:
            self.calls.append("second")

    bus = Bus()
    plugin = TwoHandlers()
    bus.register(plugin)

    with caplog.at_level(logging.ERROR, logger=BUS_LOGGER):
        bus.emit("on_batch_end", **batch_end_fields())

    assert plugin.calls == ["first"]
    assert len(caplog.records) == 1


def test_begin_run_reenables_disabled_plugin(caplog):
    bus = Bus()
    flaky = Flaky(RuntimeError("once"))
    bus.register(flaky)
    with caplog.at_level(logging.ERROR, logger=BUS_LOGGER):
        bus.emit("on_batch_end", **batch_end_fields(0))
    flaky.error = None

    bus.begin_run()
    bus.emit("on_batch_end", **batch_end_fields(1))
    bus.emit("on_epoch_end", epoch=1)

    assert not bus.is_disabled(flaky)
    assert flaky.batches == [0, 1]
    assert flaky.epochs == [1]


@pytest.mark.parametrize("control_flow", [CancelBatch, CancelEpoch])
def test_noncritical_control_flow_propagates(control_flow):
    bus = Bus()
    flaky = Flaky(control_flow())
    bus.register(flaky)

    with pytest.raises(control_flow):
        bus.emit("on_batch_end", **batch_end_fields())

    assert not bus.is_disabled(flaky)
    bus.emit("on_epoch_end", epoch=0)
    assert flaky.epochs == [0]


def test_noncritical_when_failure_disables(caplog):
    class BadPredicate(Plugin):
        critical = False

        def __init__(self) -> None:
            self.epochs: list[int] = []

        @on("on_batch_end", when=lambda payload: payload.outputs["loss"] > 0)
        def batch_end(self, payload: BatchEndPayload) -> None:
            pass

        @on("on_epoch_end")
        def epoch_end(self, payload: EpochPayload) -> None:
            self.epochs.append(payload.epoch)

    bus = Bus()
    plugin = BadPredicate()
    bus.register(plugin)

    with caplog.at_level(logging.ERROR, logger=BUS_LOGGER):
        bus.emit("on_batch_end", **batch_end_fields())  # outputs is None, so the predicate raises TypeError
        bus.emit("on_epoch_end", epoch=0)

    assert bus.is_disabled(plugin)
    assert plugin.epochs == []
    assert len(caplog.records) == 1
    assert caplog.records[0].exc_info is not None
    assert isinstance(caplog.records[0].exc_info[1], TypeError)


def test_critical_when_failure_propagates():
    bus = Bus()
    bus.subscribe("on_batch_end", batch_end_hook, when=lambda payload: payload.outputs["loss"] > 0)

    with pytest.raises(TypeError, match="not subscriptable"):
        bus.emit("on_batch_end", **batch_end_fields())


# ------------------------------------------------------------------------------ after_dispatch


def test_after_dispatch_runs_after_all_handlers():
    bus = Bus()
    calls: list[str] = []

    def request_save(payload: Any) -> None:
        calls.append("request")
        bus.after_dispatch(lambda: calls.append("save"))

    bus.subscribe("on_epoch_end", request_save)
    bus.subscribe("on_epoch_end", recorder(calls, "later handler"), order=1)

    bus.emit("on_epoch_end", epoch=0)

    assert calls == ["request", "later handler", "save"]


def test_after_dispatch_outside_emit_runs_at_once():
    calls: list[str] = []

    Bus().after_dispatch(lambda: calls.append("now"))

    assert calls == ["now"]


def test_after_dispatch_waits_for_outer_emit():
    bus = Bus()
    calls: list[str] = []

    def inner(payload: Any) -> None:
        bus.after_dispatch(lambda: calls.append("action"))
        calls.append("inner")

    def outer(payload: Any) -> None:
        bus.emit("on_fit_start")
        calls.append("outer continues")

    bus.subscribe("on_fit_start", inner)
    bus.subscribe("on_train_start", outer)
    bus.subscribe("on_train_start", recorder(calls, "outer second"), order=1)

    bus.emit("on_train_start")

    assert calls == ["inner", "outer continues", "outer second", "action"]


def test_after_dispatch_action_may_emit():
    bus = Bus()
    calls: list[str] = []
    bus.subscribe("on_save_checkpoint", lambda payload: calls.append("saved"))

    def request(payload: Any) -> None:
        bus.after_dispatch(lambda: bus.emit("on_save_checkpoint", checkpoint={}))

    bus.subscribe("on_epoch_end", request)
    bus.emit("on_epoch_end", epoch=0)
    bus.emit("on_epoch_end", epoch=1)

    assert calls == ["saved", "saved"]


# ------------------------------------------------------------------------------ instrument


def test_instrument_wraps_every_handler():
    bus = Bus()
    calls: list[str] = []
    timed: list[str] = []
    bus.register(EveryThird())
    bus.subscribe("on_batch_end", recorder(calls, "plain"))

    def factory(subscription: Any, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def timed_handler(payload: Any) -> Any:
            timed.append(subscription.handler_name)
            return handler(payload)

        return timed_handler

    bus.instrument(factory)
    bus.subscribe("on_epoch_end", recorder(calls, "added later"))
    for batch_idx in range(3):
        bus.emit("on_batch_end", **batch_end_fields(batch_idx))
    bus.emit("on_epoch_end", epoch=0)

    # EveryThird fires on the third emission only: the filter runs outside the instrumented handler.
    assert timed == ["plain", "plain", "EveryThird.tick", "plain", "added later"]
    assert calls == ["plain", "plain", "plain", "added later"]


def test_instrument_none_restores_handlers():
    bus = Bus()
    timed: list[str] = []
    bus.subscribe("on_fit_start", lambda payload: None)

    bus.instrument(lambda subscription, handler: lambda payload: timed.append("timed"))
    bus.emit("on_fit_start")
    bus.instrument(None)
    bus.emit("on_fit_start")

    assert timed == ["timed"]


# ------------------------------------------------------------------------------ misc


def test_plugins_in_registration_order():
    bus = Bus()
    counter, every_third = Counter(), EveryThird()
    bus.register(counter)
    bus.register(every_third)

    assert bus.plugins == (counter, every_third)


def test_resolved_for_wrappers():
    bus = Bus()
    bus.wrap_with("batch_step", tracing_wrapper([], "second"), order=1)
    bus.wrap_with("batch_step", tracing_wrapper([], "first"))

    assert [subscription.handler_name for subscription in bus.resolved("batch_step", "around")] == ["first", "second"]


def test_payload_type_of_plain_event():
    bus = Bus()
    received: list[Any] = []
    bus.subscribe("on_train_start", received.append)

    bus.emit("on_train_start")

    assert type(received[0]) is Payload


# ------------------------------------------------------------------------------ idle handlers


class Sometimes(Plugin):
    """A plugin that names the handlers given to it idle. Its epoch handler is not named by default."""

    def __init__(self, idle: tuple[str, ...] = ("batch_end",)) -> None:
        self.idle = idle
        self.batches: list[int] = []
        self.epochs: list[int] = []
        self.asked_with: list[Any] = []

    def idle_handlers(self, trainer: Any) -> tuple[str, ...]:
        self.asked_with.append(trainer)
        return self.idle

    @on("on_batch_end")
    def batch_end(self, payload: BatchEndPayload) -> None:
        self.batches.append(payload.batch_idx)

    @on("on_epoch_end")
    def epoch_end(self, payload: EpochPayload) -> None:
        self.epochs.append(payload.epoch)


def test_idle_handler_is_left_out_until_woken():
    bus = Bus()
    plugin = Sometimes()
    bus.register(plugin)
    trainer = object()

    bus.settle_idle(trainer)
    skipped = bus.emit("on_batch_end", **batch_end_fields(0))
    bus.emit("on_epoch_end", epoch=0)
    idle_during_run = bus.is_idle(plugin, "batch_end")
    subscribed_while_idle = bus.has_subscribers("on_batch_end")
    bus.wake(plugin, "batch_end")
    bus.emit("on_batch_end", **batch_end_fields(1))

    assert plugin.asked_with == [trainer]
    assert skipped is None  # the only handler was idle, so not even the payload was built
    assert idle_during_run
    assert not subscribed_while_idle
    assert not bus.is_idle(plugin, "batch_end")
    assert plugin.batches == [1]
    assert plugin.epochs == [0]


def test_begin_run_wakes_idle_handlers():
    bus = Bus()
    plugin = Sometimes()
    bus.register(plugin)
    bus.settle_idle(None)

    bus.begin_run()
    bus.emit("on_batch_end", **batch_end_fields(3))

    assert plugin.batches == [3]


def test_idle_handler_keeps_others_in_order():
    bus = Bus()
    calls: list[str] = []
    bus.subscribe("on_batch_end", recorder(calls, "before"), order=-1)
    plugin = Sometimes()
    bus.register(plugin)
    bus.subscribe("on_batch_end", recorder(calls, "after"), order=1)

    bus.settle_idle(None)
    bus.emit("on_batch_end", **batch_end_fields(0))
    bus.wake_all()
    bus.emit("on_batch_end", **batch_end_fields(1))

    assert calls == ["before", "after", "before", "after"]
    assert plugin.batches == [1]


def test_idle_handlers_unknown_method_rejected():
    bus = Bus()
    bus.register(Sometimes(idle=("batch_ends",)))

    with pytest.raises(PluginError, match=r"Plugin 'Sometimes' idle_handlers\(\) returned 'batch_ends', which is not "
                                          r"one of its event handlers \(batch_end, epoch_end\)"):
        bus.settle_idle(None)


def test_wake_during_compile_kept(monkeypatch):
    # A signal handler may wake a handler while the bus is compiling the same event: the compile in
    # progress must not put back its older view of the idle handlers.
    bus = Bus()
    plugin = Sometimes()
    bus.register(plugin)
    bus.settle_idle(None)
    dispatcher = bus._dispatcher
    woken: list[bool] = []

    def dispatcher_with_wake(subscription: Any) -> Callable[[Any], Any]:
        # Runs after the compile has chosen its handlers, so the wake lands between choosing and storing.
        if not woken:
            woken.append(True)
            bus.wake(plugin, "batch_end")
        return dispatcher(subscription)

    monkeypatch.setattr(bus, "_dispatcher", dispatcher_with_wake)
    bus.subscribe("on_batch_end", lambda payload: None)  # compiles on_batch_end, and the wake lands inside
    bus.emit("on_batch_end", **batch_end_fields(5))

    assert woken == [True]
    assert plugin.batches == [5]


def test_idle_handlers_string_rejected():
    bus = Bus()
    bus.register(Sometimes(idle="batch_end"))  # type: ignore[arg-type]

    with pytest.raises(PluginError, match=r"Plugin 'Sometimes' idle_handlers\(\) returned the string 'batch_end'\. "
                                          r"Return a tuple of method names, for example \('batch_end',\)\."):
        bus.settle_idle(None)


def test_wake_before_settle_kept():
    # A handler woken during setup, before the trainer settles the idle handlers, stays in dispatch.
    bus = Bus()
    plugin = Sometimes()
    bus.register(plugin)
    bus.begin_run()

    bus.wake(plugin, "batch_end")
    bus.settle_idle(None)
    bus.emit("on_batch_end", **batch_end_fields(2))

    assert plugin.batches == [2]


@pytest.mark.parametrize("registered", [True, False])
def test_wake_unknown_handler_rejected(registered):
    bus = Bus()
    plugin = Sometimes()
    if registered:
        bus.register(plugin)

    with pytest.raises(PluginError, match=r"bus\.wake\(\) got 'batch_ends' of Sometimes\(state_key='Sometimes'\), "
                                          r"which is not an event handler of a plugin registered on this bus\. Pass a "
                                          r"registered plugin and the name of one of its @hookrt\.on methods\."):
        bus.wake(plugin, "batch_ends")


class BrokenIdle(Sometimes):
    def idle_handlers(self, trainer: Any) -> tuple[str, ...]:
        raise ZeroDivisionError("division by zero")


def test_idle_handlers_error_names_plugin():
    bus = Bus()
    bus.register(BrokenIdle())

    expected = (r"Plugin 'BrokenIdle' idle_handlers\(\) raised ZeroDivisionError: division by zero\. Fix the method, "
                r"or return \(\) to keep every handler\.")
    with pytest.raises(PluginError, match=expected) as caught:
        bus.settle_idle(None)
    assert isinstance(caught.value.__cause__, ZeroDivisionError)
