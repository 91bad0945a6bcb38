"""Tests for the event catalog: `Event`, `WrapPoint` and the payload classes."""

from __future__ import annotations

import inspect
import re

import pytest

import hookrt
from hookrt import _events
from hookrt._events import (
    PAYLOAD_TYPES,
    WRAP_PAYLOAD_TYPES,
    BatchEndPayload,
    EvalBatchEndPayload,
    Event,
    LossPayload,
    Payload,
    WrapPoint,
    payload_fields,
)

ALL_PAYLOAD_TYPES = sorted({*PAYLOAD_TYPES.values(), *WRAP_PAYLOAD_TYPES.values()}, key=lambda cls: cls.__name__)


def build_payload(payload_type: type[Payload]) -> Payload:
    """Build a payload with every field set to a distinct string."""
    values = {name: f"value of {name}" for name in payload_fields(payload_type)}
    return payload_type("the trainer", "the module", **values)


def test_event_is_str_enum():
    assert Event.BATCH_END == "on_batch_end"
    assert isinstance(Event.BATCH_END, str)
    assert str(Event.BATCH_END) == "on_batch_end"
    assert f"{Event.FIT_START}" == "on_fit_start"
    assert Event("on_batch_end") is Event.BATCH_END


def test_event_hashes_like_its_value():
    table = {"on_batch_end": 1}

    assert table[Event.BATCH_END] == 1
    assert {Event.BATCH_END: 1}["on_batch_end"] == 1


def test_wrap_point_is_str_enum():
    assert WrapPoint.BATCH_STEP == "batch_step"
    assert str(WrapPoint.FORWARD) == "forward"
    assert [point.value for point in WrapPoint] == ["batch_step", "forward", "optimizer_step"]


def test_wrap_point_and_event_share_only_optimizer_step():
    shared = {point.value for point in WrapPoint} & {event.value for event in Event}

    assert shared == {"optimizer_step"}


def test_every_event_has_payload_type():
    assert set(PAYLOAD_TYPES) == set(Event)
    for event in Event:
        assert issubclass(event.payload_type, Payload), event
        assert event.payload_type is PAYLOAD_TYPES[event]


def test_every_wrap_point_has_payload_type():
    assert set(WRAP_PAYLOAD_TYPES) == set(WrapPoint)


@pytest.mark.parametrize("payload_type", ALL_PAYLOAD_TYPES, ids=lambda cls: cls.__name__)
def test_payload_has_trainer_and_module(payload_type):
    payload = build_payload(payload_type)

    assert payload.trainer == "the trainer"
    assert payload.module == "the module"
    for name in payload_fields(payload_type):
        assert getattr(payload, name) == f"value of {name}"


@pytest.mark.parametrize("payload_type", ALL_PAYLOAD_TYPES, ids=lambda cls: cls.__name__)
def test_payload_uses_slots(payload_type):
    payload = build_payload(payload_type)

    assert not hasattr(payload, "__dict__")
    for klass in payload_type.__mro__[:-1]:
        assert "__slots__" in vars(klass), klass
    with pytest.raises(AttributeError):
        payload.not_a_field = 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("payload_type", ALL_PAYLOAD_TYPES, ids=lambda cls: cls.__name__)
def test_payload_fields_match_init(payload_type):
    parameters = list(inspect.signature(payload_type.__init__).parameters)

    assert parameters[:3] == ["self", "trainer", "module"]
    assert sorted(parameters[3:]) == sorted(payload_fields(payload_type))


def test_event_fields_exclude_trainer_and_module():
    assert Event.BATCH_END.fields == ("batch", "batch_idx", "outputs")
    assert Event.EPOCH_START.fields == ("epoch",)


def test_event_fields_empty_for_plain_payload():
    assert Event.FIT_START.payload_type is Payload
    assert Event.FIT_START.fields == ()
    assert payload_fields(Payload) == ()


def test_payload_fields_include_base_class_slots():
    class ExtendedPayload(BatchEndPayload):
        __slots__ = ("extra",)

    assert payload_fields(ExtendedPayload) == ("batch", "batch_idx", "outputs", "extra")


def test_payload_defaults():
    loss = LossPayload(None, None, loss=1.5)
    end = EvalBatchEndPayload(None, None, batch=[1], batch_idx=3, outputs={})

    assert loss.optimizer_idx == 0
    assert end.dataloader_idx == 0
    assert end.sanity_checking is False


def test_payload_fields_are_keyword_only():
    with pytest.raises(TypeError, match=r"takes 3 positional arguments but 6 were given"):
        BatchEndPayload(None, None, [1], 0, None)  # type: ignore[misc]


def test_payload_repr_shows_fields_only():
    payload = BatchEndPayload("the trainer", "the module", batch=[1, 2], batch_idx=0, outputs=None)

    assert repr(payload) == "BatchEndPayload(batch=[1, 2], batch_idx=0, outputs=None)"
    assert repr(Payload("the trainer", "the module")) == "Payload()"


def test_package_exports_catalog():
    assert hookrt.Event is Event
    assert hookrt.WrapPoint is WrapPoint
    assert hookrt.Payload is Payload


def test_module_docstring_names_real_events():
    """The pseudocode in the module docstring must name real events, and all of them."""
    docstring = _events.__doc__
    assert docstring is not None
    values = {event.value for event in Event}

    # Names that look like events (on_*, before_*, after_*) must be events.
    look_like_events = set(re.findall(r"\b(?:on|before|after)_[a-z_]+\b", docstring))
    assert look_like_events, "the docstring names no events"
    assert look_like_events - values == set()

    # Every event appears as a name of its own, not only inside "[around ...]"
    # or as part of a longer name such as "module.optimizer_step".
    without_wrappers = re.sub(r"\[around \w+\]", "", docstring)
    for value in sorted(values):
        assert re.search(rf"(?<![\w.]){value}(?!\w)", without_wrappers), f"{value} is missing from the docstring"
