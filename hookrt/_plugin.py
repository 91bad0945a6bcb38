"""The plugin base class and the ``@on`` / ``@around`` decorators."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from typing import Any, TypeVar

__all__ = ["HandlerSpec", "Plugin", "around", "on"]

F = TypeVar("F", bound=Callable[..., Any])

#: Attribute under which the decorators record their specs on a function.
SPECS_ATTRIBUTE = "__hookrt_specs__"


class HandlerSpec:
    """What one ``@on`` or ``@around`` decoration asked for.

    The options are kept as given: they are checked when the plugin is
    registered on a bus, so the error can name the plugin as well.
    """

    __slots__ = ("kind", "target", "options")

    def __init__(self, kind: str, target: str, options: dict[str, Any]) -> None:
        self.kind = kind
        self.target = target
        self.options = options

    def __repr__(self) -> str:
        return f"HandlerSpec({self.kind!r}, {self.target!r}, {self.options!r})"


def _record(kind: str, target: object, options: dict[str, Any]) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        specs: list[HandlerSpec] = list(getattr(fn, SPECS_ATTRIBUTE, ()))
        specs.append(HandlerSpec(kind, str(target), options))
        setattr(fn, SPECS_ATTRIBUTE, specs)
        return fn

    return decorate


def on(event: object, **options: Any) -> Callable[[F], F]:
    """Subscribe a plugin method to an event.

    Args:
        event: a ``hookrt.Event`` member or its string value, such as ``"on_batch_end"``.
        **options: ``order`` (int, lower runs first, default 0), ``before`` and
            ``after`` (plugin names this handler runs before or after on the same
            event), ``every`` (fire on every Nth emission), ``once`` (fire on the
            first emission only) and ``when`` (a predicate on the payload).

    The method takes one argument, the event's payload. Unknown events and
    options are reported when the plugin is registered, as ``hookrt.PluginError``.
    """
    return _record("on", event, options)


def around(point: object, **options: Any) -> Callable[[F], F]:
    """Wrap a plugin method around a wrapper point (``hookrt.WrapPoint``).

    Args:
        point: ``"batch_step"``, ``"forward"`` or ``"optimizer_step"``.
        **options: ``order`` (int, default 0): lower orders wrap further out.

    The method takes ``(payload, proceed)`` and must call ``proceed()`` exactly
    once. It returns what ``proceed()`` returned, or a replacement; returning
    None passes on the inner result unchanged.
    """
    return _record("around", point, options)


class Plugin:
    """Base class of everything that subscribes to the bus.

    Attributes:
        name: the name other plugins use in ``before=`` / ``after=``; the class
            name unless a subclass sets it.
        critical: when False, an exception in one of the plugin's handlers is
            logged once and the plugin is disabled for the rest of the run,
            instead of ending the run. Loggers, progress bars and probes set it.
    """

    name: str = "Plugin"
    critical: bool = True
    #: The default-stack member this plugin stands in for: "logger", "checkpoint",
    #: "progress_bar" or "model_summary". A Trainer given such a plugin leaves that
    #: default out, as it does for subclasses of the built-in ones.
    replaces_default: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__

    @property
    def state_key(self) -> str:
        """The key of this plugin's state in a checkpoint.

        Defaults to ``name``. Subclasses whose instances can be used side by
        side derive it from their arguments, so that each keeps its own state.
        """
        return getattr(self, "_state_key", None) or self.name

    @state_key.setter
    def state_key(self, value: str) -> None:
        self._state_key = value

    def state_dict(self) -> dict[str, Any]:
        """Return the state to store in checkpoints (tensors, numbers, strings and containers)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state that ``state_dict`` returned."""

    def idle_handlers(self, trainer: Any) -> Collection[str]:
        """Return the names of handler methods that have nothing to do in the coming run.

        The trainer calls this once per run (fit, validate, test or predict),
        after ``setup`` has been emitted, and leaves the named handlers out of
        dispatch until the run ends, so they cost nothing per event. A plugin whose
        per-batch handlers matter only in some configurations names them here,
        as ``ModelCheckpoint`` does with its step-schedule handlers when it saves
        only at epoch ends. A plugin that needs such a handler again later in the
        run calls ``trainer.bus.wake(self, name)``. The filter counters of an idle
        handler (``every``, ``once``) do not advance. By default no handler is idle.

        Args:
            trainer: the trainer of the run.
        """
        return ()

    def handler_specs(self) -> Iterator[tuple[Callable[..., Any], HandlerSpec]]:
        """Yield each decorated method, bound to this instance, with its spec.

        Methods come in definition order, base classes first. A method
        overridden in a subclass replaces the base class's, decorations
        included, as ordinary attribute lookup does.
        """
        names: dict[str, None] = {}
        for klass in reversed(type(self).__mro__):
            names.update(dict.fromkeys(vars(klass)))
        for attribute in names:
            definition = next(vars(k)[attribute] for k in type(self).__mro__ if attribute in vars(k))
            specs = getattr(definition, SPECS_ATTRIBUTE, None)
            if specs:
                bound = getattr(self, attribute)
                for spec in specs:
                    yield bound, spec

    def undecorated_handlers(self) -> list[str]:
        """Return messages about methods that look like handlers but will never be called.

        A method named after an event (``on_batch_end``) without ``@hookrt.on`` is
        such a method; the bus warns about each one when the plugin is registered.
        """
        from hookrt._events import Event

        events = {member.value for member in Event}
        messages = []
        for klass in type(self).__mro__:
            if klass is Plugin or not issubclass(klass, Plugin):
                continue
            for attribute, value in vars(klass).items():
                if attribute in events and callable(value) and not getattr(value, SPECS_ATTRIBUTE, None):
                    messages.append(
                        f"{klass.__name__}.{attribute}() is named after the event '{attribute}' but is not "
                        f"decorated, so it is never called. Add @hookrt.on('{attribute}') above it."
                    )
        return messages

    def __repr__(self) -> str:
        return f"{type(self).__name__}(state_key={self.state_key!r})"
