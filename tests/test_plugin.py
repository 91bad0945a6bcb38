"""Tests for `hookrt.Plugin` and the ``@on`` / ``@around`` decorators."""

from __future__ import annotations

import hookrt
from hookrt import Event, Plugin, WrapPoint, around, on
from hookrt._plugin import SPECS_ATTRIBUTE, HandlerSpec


class Recorder(Plugin):
    @on("on_batch_end", order=3, every=2)
    def batch_end(self, payload):
        pass

    @on(Event.EPOCH_END)
    @on("on_train_end", once=True)
    def finish(self, payload):
        pass

    def undecorated(self, payload):
        pass

    @around("batch_step", order=-1)
    def wrap_step(self, payload, proceed):
        return proceed()


class NamedRecorder(Recorder):
    name = "recorder"


class ChildOfNamed(NamedRecorder):
    pass


class OverridingRecorder(Recorder):
    def batch_end(self, payload):
        """Overrides without a decorator, so this method subscribes to nothing."""

    @on("on_fit_start")
    def added(self, payload):
        pass


def spec_list(plugin: Plugin) -> list[tuple[str, str, str, dict]]:
    return [(fn.__name__, spec.kind, spec.target, spec.options) for fn, spec in plugin.handler_specs()]


def test_on_records_spec_and_returns_function():
    def handler(payload):
        pass

    decorated = on("on_batch_end", order=2)(handler)
    (spec,) = getattr(handler, SPECS_ATTRIBUTE)

    assert decorated is handler
    assert (spec.kind, spec.target, spec.options) == ("on", "on_batch_end", {"order": 2})


def test_on_accepts_event_member():
    def handler(payload):
        pass

    on(Event.BATCH_END)(handler)
    (spec,) = getattr(handler, SPECS_ATTRIBUTE)

    assert spec.target == "on_batch_end"
    assert type(spec.target) is str


def test_around_records_wrapper_spec():
    def wrapper(payload, proceed):
        return proceed()

    around(WrapPoint.FORWARD, order=5)(wrapper)
    (spec,) = getattr(wrapper, SPECS_ATTRIBUTE)

    assert (spec.kind, spec.target, spec.options) == ("around", "forward", {"order": 5})


def test_decorators_keep_options_unchecked():
    """Options are checked at registration, where the error can name the plugin."""

    def handler(payload):
        pass

    on("not_an_event", colour="blue")(handler)
    (spec,) = getattr(handler, SPECS_ATTRIBUTE)

    assert spec.target == "not_an_event"
    assert spec.options == {"colour": "blue"}


def test_handler_spec_repr():
    spec = HandlerSpec("on", "on_batch_end", {"order": 1})

    assert repr(spec) == "HandlerSpec('on', 'on_batch_end', {'order': 1})"


def test_name_defaults_to_class_name():
    assert Recorder.name == "Recorder"
    assert Recorder().name == "Recorder"


def test_explicit_name_is_kept():
    assert NamedRecorder.name == "recorder"


def test_subclass_of_named_plugin_gets_own_name():
    assert ChildOfNamed.name == "ChildOfNamed"


def test_base_plugin_defaults():
    plugin = Plugin()

    assert Plugin.name == "Plugin"
    assert plugin.critical is True
    assert plugin.state_dict() == {}
    assert plugin.load_state_dict({"anything": 1}) is None
    assert list(plugin.handler_specs()) == []


def test_state_key_defaults_to_name():
    assert NamedRecorder().state_key == "recorder"


def test_state_key_can_be_set_per_instance():
    first = Recorder()
    second = Recorder()
    second.state_key = "Recorder[val_loss]"

    assert first.state_key == "Recorder"
    assert second.state_key == "Recorder[val_loss]"


def test_plugin_repr_shows_state_key():
    plugin = Recorder()
    plugin.state_key = "Recorder[1]"

    assert repr(plugin) == "Recorder(state_key='Recorder[1]')"


def test_handler_specs_in_definition_order():
    assert spec_list(Recorder()) == [
        ("batch_end", "on", "on_batch_end", {"order": 3, "every": 2}),
        ("finish", "on", "on_train_end", {"once": True}),
        ("finish", "on", "on_epoch_end", {}),
        ("wrap_step", "around", "batch_step", {"order": -1}),
    ]


def test_handler_specs_yield_bound_methods():
    plugin = Recorder()
    methods = [fn for fn, _ in plugin.handler_specs()]

    assert all(method.__self__ is plugin for method in methods)


def test_override_without_decorator_drops_subscription():
    specs = spec_list(OverridingRecorder())

    assert ("batch_end", "on", "on_batch_end", {"order": 3, "every": 2}) not in specs
    assert specs == [
        ("finish", "on", "on_train_end", {"once": True}),
        ("finish", "on", "on_epoch_end", {}),
        ("wrap_step", "around", "batch_step", {"order": -1}),
        ("added", "on", "on_fit_start", {}),
    ]


def test_package_exports_plugin_api():
    assert hookrt.Plugin is Plugin
    assert hookrt.on is on
    assert hookrt.around is around
