"""The event bus: registration, validation, ordering and dispatch.

Each `Bus` owns a private blinker `Namespace` in which every subscription is
also connected (strongly), so blinker tools can inspect who listens. Dispatch
does not go through `blinker.Signal.send`: the bus compiles, per event, the
payload class and a tuple of callables in their resolved order, and `emit`
walks that tuple. An event with no subscribers costs one dictionary lookup.
"""

from __future__ import annotations

import contextlib
import difflib
import heapq
import inspect
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import blinker

from hookrt._errors import CancelBatch, CancelEpoch, HookrtError, HookrtWarning, PluginError
from hookrt._events import PAYLOAD_TYPES, WRAP_PAYLOAD_TYPES, Event, Payload, WrapPoint, payload_fields
from hookrt._plugin import Plugin

__all__ = ["Bus", "BusRow", "BusTable", "Handle", "Subscription"]

logger = logging.getLogger(__name__)

_EVENT_OPTIONS = frozenset({"order", "before", "after", "every", "once", "when"})
_WRAP_OPTIONS = frozenset({"order"})
_CONTROL_FLOW = (CancelBatch, CancelEpoch)
_NO_PLUGIN = "<ad hoc>"

# Keyed by the plain string, so that `emit` looks up a str in a str-keyed dict.
_PAYLOAD_BY_NAME: dict[str, type[Payload]] = {event.value: payload for event, payload in PAYLOAD_TYPES.items()}

#: Dispatch entry of one event: its payload class and its handlers in dispatch order.
_DispatchEntry = tuple[Callable[[Any, Any, dict[str, Any]], Payload], tuple[Callable[[Any], Any], ...]]


class Subscription:
    """One handler on one event or wrapper point, with its options and filter counter."""

    __slots__ = (
        "kind",
        "target",
        "fn",
        "plugin",
        "owner",
        "handler_name",
        "order",
        "before",
        "after",
        "every",
        "once",
        "when",
        "seq",
        "count",
        "critical",
    )

    def __init__(
        self,
        *,
        kind: str,
        target: str,
        fn: Callable[..., Any],
        plugin: Plugin | None,
        owner: str,
        handler_name: str,
        order: int,
        before: tuple[str, ...],
        after: tuple[str, ...],
        every: int | None,
        once: bool,
        when: Callable[[Any], bool] | None,
        seq: int,
        critical: bool,
    ) -> None:
        self.kind = kind
        self.target = target
        self.fn = fn
        self.plugin = plugin
        self.owner = owner
        self.handler_name = handler_name
        self.order = order
        self.before = before
        self.after = after
        self.every = every
        self.once = once
        self.when = when
        self.seq = seq
        self.count = 0
        self.critical = critical

    @property
    def has_filter(self) -> bool:
        """Whether ``every``, ``once`` or ``when`` is set."""
        return self.every is not None or self.once or self.when is not None

    @property
    def counter_key(self) -> str:
        """The stable key of this subscription's filter counter in the bus state."""
        owner = self.plugin.state_key if self.plugin is not None else self.owner
        return "/".join((owner, self.handler_name, self.target))

    def filter_text(self) -> str:
        """The filters as ``every=N once when=NAME`` text, empty when there are none."""
        parts = []
        if self.every is not None:
            parts.append(f"every={self.every}")
        if self.once:
            parts.append("once")
        if self.when is not None:
            parts.append(f"when={_callable_name(self.when)}")
        return " ".join(parts)


class Handle:
    """Undoes one subscription, or all of a plugin's; also a context manager."""

    __slots__ = ("_bus", "_subscriptions", "plugin")

    def __init__(self, bus: Bus, subscriptions: list[Subscription], plugin: Plugin | None = None) -> None:
        self._bus = bus
        self._subscriptions = subscriptions
        self.plugin = plugin

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        """The subscriptions this handle removes."""
        return tuple(self._subscriptions)

    def remove(self) -> None:
        """Remove the subscriptions from the bus. Removing twice does nothing."""
        self._bus._remove(self._subscriptions, self.plugin)
        self._subscriptions = []

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


@dataclass(frozen=True)
class BusRow:
    """One handler in the resolved order of an event or wrapper point."""

    target: str
    position: int
    plugin: str
    handler: str
    order: int
    filters: str
    kind: str


class BusTable:
    """The resolved dispatch order, as returned by `Bus.describe`.

    Iterating yields `BusRow` objects; ``str()`` gives an aligned text table
    with one block per event, handlers in the order they run.
    """

    def __init__(self, rows: list[BusRow]) -> None:
        self.rows = rows

    def __iter__(self) -> Iterator[BusRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def for_target(self, target: str) -> list[BusRow]:
        """Return the rows of one event or wrapper point, in dispatch order."""
        return [row for row in self.rows if row.target == str(target)]

    def __str__(self) -> str:
        if not self.rows:
            return "(no subscriptions)"
        plugin_width = max(len(row.plugin) for row in self.rows)
        handler_width = max(len(row.handler) for row in self.rows)
        order_width = max(len(f"order={row.order}") for row in self.rows)
        lines: list[str] = []
        current = None
        for row in self.rows:
            heading = (row.kind, row.target)
            if heading != current:
                current = heading
                lines.append(row.target if row.kind == "on" else f"[around {row.target}]")
            text = (
                f"  {row.position:>2}. {row.plugin:<{plugin_width}}  "
                f"{row.handler:<{handler_width}}  {f'order={row.order}':<{order_width}}  {row.filters}"
            )
            lines.append(text.rstrip())
        return "\n".join(lines)


class Bus:
    """An ordered event bus over a private blinker namespace.

    Args:
        trainer: the object handed to every payload as ``.trainer``.
        module: the object handed to every payload as ``.module``; the trainer
            sets it when a run starts.
    """

    def __init__(self, trainer: Any = None, module: Any = None) -> None:
        self.trainer = trainer
        self.module = module
        self.namespace = blinker.Namespace()
        self._subscriptions: dict[tuple[str, str], list[Subscription]] = {}
        # `_table` is always current; `_dispatch` is the table `emit` reads, an empty dict while muted.
        self._table: dict[str, _DispatchEntry] = {}
        self._dispatch = self._table
        self._wrappers: dict[str, tuple[Subscription, ...]] = {}
        self._plugins: list[Plugin] = []
        self._disabled: set[int] = set()
        #: (id(plugin), handler name) of the handlers their plugins left out of the current run.
        self._idle: set[tuple[int, str]] = set()
        #: Handlers woken since the run began, which `settle_idle` leaves in dispatch.
        self._woken: set[tuple[int, str]] = set()
        #: Number of `_compile` calls. A compile interrupted by another one (a signal handler that wakes a
        #: handler) finds the count changed and compiles again from the current state.
        self._compiles = 0
        self._seq = 0
        self._depth = 0
        self._deferred: list[Callable[[], Any]] = []
        self._debug = False
        self._instrument: Callable[[Subscription, Callable[[Any], Any]], Callable[[Any], Any]] | None = None

    # ------------------------------------------------------------------ registration

    @property
    def plugins(self) -> tuple[Plugin, ...]:
        """The registered plugins, in registration order."""
        return tuple(self._plugins)

    def signal(self, name: str) -> blinker.NamedSignal:
        """Return this bus's blinker signal for an event or wrapper point name."""
        return self.namespace.signal(str(name))

    def register(self, plugin: Plugin) -> Handle:
        """Subscribe every decorated handler of ``plugin``.

        Raises:
            PluginError: a handler names an unknown event or option, cannot take
                the payload, is already subscribed, its ordering makes a cycle,
                or another registered plugin has the same ``state_key``.
        """
        if not isinstance(plugin, Plugin):
            raise PluginError(
                f"{plugin!r} is not a hookrt.Plugin. Subclass hookrt.Plugin and decorate its "
                "handlers with @hookrt.on(...), or subscribe a function with bus.subscribe(...).",
                plugin=type(plugin).__name__,
            )
        for other in self._plugins:
            if other is plugin:
                raise PluginError(f"Plugin '{plugin.name}' is already registered on this bus.", plugin=plugin.name)
            if other.state_key == plugin.state_key:
                raise PluginError(
                    f"Plugin '{plugin.name}' has state_key '{plugin.state_key}', which the registered plugin "
                    f"{other!r} already uses, so their checkpoint states would collide. Give the two instances "
                    "different arguments, or set a distinct state_key on one of them.",
                    plugin=plugin.name,
                )
        for message in plugin.undecorated_handlers():
            warnings.warn(f"Plugin '{plugin.name}': {message}", HookrtWarning, stacklevel=3)
        added: list[Subscription] = []
        try:
            for fn, spec in plugin.handler_specs():
                added.append(
                    self._add(spec.kind, spec.target, fn, spec.options, plugin=plugin, owner=plugin.name)
                )
        except PluginError:
            self._remove(added, None)
            raise
        self._plugins.append(plugin)
        return Handle(self, added, plugin)

    def subscribe(self, event: object, fn: Callable[[Any], Any], *, name: str | None = None, **options: Any) -> Handle:
        """Subscribe a function to an event; returns a handle that removes it.

        Args:
            event: an ``Event`` member or its string value.
            fn: a callable taking the payload.
            name: the owner name that other handlers' ``before=``/``after=`` refer
                to; ``"module"`` marks the LightningModule's own hooks.
            **options: as for ``@hookrt.on``.
        """
        subscription = self._add("on", str(event), fn, options, plugin=None, owner=name or _NO_PLUGIN)
        return Handle(self, [subscription])

    def wrap_with(self, point: object, fn: Callable[[Any, Callable[[], Any]], Any], *, name: str | None = None,
                  **options: Any) -> Handle:
        """Add an ad hoc wrapper around a wrapper point; returns a handle that removes it."""
        subscription = self._add("around", str(point), fn, options, plugin=None, owner=name or _NO_PLUGIN)
        return Handle(self, [subscription])

    @contextlib.contextmanager
    def connected(self, plugin: Plugin) -> Iterator[Plugin]:
        """Register ``plugin`` for the duration of a ``with`` block."""
        handle = self.register(plugin)
        try:
            yield plugin
        finally:
            handle.remove()

    @contextlib.contextmanager
    def muted(self) -> Iterator[None]:
        """Dispatch no events inside a ``with`` block. Wrappers still run.

        Subscriptions added or removed inside the block take effect when it ends.
        """
        saved = self._dispatch
        self._dispatch = {}
        try:
            yield
        finally:
            self._dispatch = saved

    def _add(
        self,
        kind: str,
        target: str,
        fn: Callable[..., Any],
        options: dict[str, Any],
        *,
        plugin: Plugin | None,
        owner: str,
    ) -> Subscription:
        handler_name = _callable_name(fn)
        target = self._check_target(kind, target, owner, handler_name)
        allowed = _EVENT_OPTIONS if kind == "on" else _WRAP_OPTIONS
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise PluginError(
                f"Plugin '{owner}' handler '{handler_name}' on '{target}' got unknown option(s) "
                f"{', '.join(repr(key) for key in unknown)}. Valid options: {', '.join(sorted(allowed))}.",
                plugin=owner,
                event=target,
            )
        self._check_signature(kind, target, fn, owner, handler_name)
        for existing in self._subscriptions.get((kind, target), ()):
            if existing.fn == fn:
                raise PluginError(
                    f"Plugin '{owner}' handler '{handler_name}' is already subscribed to '{target}'. "
                    "Remove the earlier subscription first (handle.remove()), or subscribe a different function.",
                    plugin=owner,
                    event=target,
                )
        subscription = Subscription(
            kind=kind,
            target=target,
            fn=fn,
            plugin=plugin,
            owner=owner,
            handler_name=handler_name,
            order=_check_order(options.get("order", 0), owner, handler_name, target),
            before=_names(options.get("before", ()), "before", owner, handler_name, target),
            after=_names(options.get("after", ()), "after", owner, handler_name, target),
            every=_check_every(options.get("every"), owner, handler_name, target),
            once=bool(options.get("once", False)),
            when=_check_when(options.get("when"), owner, handler_name, target),
            seq=self._seq,
            critical=plugin.critical if plugin is not None else True,
        )
        if subscription.once and subscription.every is not None:
            raise PluginError(
                f"Plugin '{owner}' handler '{handler_name}' on '{target}' sets both once=True and "
                f"every={subscription.every}; they conflict. Keep one of them.",
                plugin=owner,
                event=target,
            )
        self._seq += 1
        subscriptions = self._subscriptions.setdefault((kind, target), [])
        subscriptions.append(subscription)
        try:
            self._compile(kind, target)
        except PluginError:
            subscriptions.remove(subscription)
            self._compile(kind, target)
            raise
        if kind == "on":
            self.signal(target).connect(fn, weak=False)
        return subscription

    def _check_target(self, kind: str, target: str, owner: str, handler_name: str) -> str:
        valid = [member.value for member in (Event if kind == "on" else WrapPoint)]
        if target in valid:
            return target
        what = "event" if kind == "on" else "wrapper point"
        close = difflib.get_close_matches(target, valid, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        if kind == "on":
            from hookrt._hooks import MODULE_HOOKS

            mapped = {row.hook: row.event.value for row in MODULE_HOOKS}
            if target in mapped:
                hint = (
                    f" '{target}' is a LightningModule hook name; on the bus it runs on the event "
                    f"'{mapped[target]}'."
                )
        other = [member.value for member in (WrapPoint if kind == "on" else Event)]
        if target in other:
            hint = (
                f" '{target}' is {'an event' if kind == 'around' else 'a wrapper point'}: use "
                f"@hookrt.{'on' if kind == 'around' else 'around'}('{target}') for it."
            )
        listing = "Run `hookrt events` to list them." if kind == "on" else f"Valid points: {', '.join(valid)}."
        raise PluginError(
            f"Plugin '{owner}' handler '{handler_name}' subscribes to unknown {what} '{target}'.{hint} {listing}",
            plugin=owner,
            event=target,
        )

    def _check_signature(self, kind: str, target: str, fn: Callable[..., Any], owner: str, handler_name: str) -> None:
        if not callable(fn):
            raise PluginError(
                f"Plugin '{owner}' handler {fn!r} on '{target}' is not callable. Pass a function or method.",
                plugin=owner,
                event=target,
            )
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):
            return  # builtins without a signature are taken on trust
        arguments = ("payload",) if kind == "on" else ("payload", "proceed")
        try:
            signature.bind(*arguments)
        except TypeError as exc:
            if kind == "on":
                payload_type = PAYLOAD_TYPES[Event(target)]
                expected = f"one argument, the payload ({payload_type.__name__})"
            else:
                payload_type = WRAP_PAYLOAD_TYPES[WrapPoint(target)]
                expected = f"two arguments, the payload ({payload_type.__name__}) and proceed"
            # Annotations are left out: under `from __future__ import annotations` they print as quoted strings.
            parameters = [parameter.replace(annotation=parameter.empty) for parameter in signature.parameters.values()]
            plain_signature = signature.replace(parameters=parameters, return_annotation=signature.empty)
            raise PluginError(
                f"Plugin '{owner}' handler '{handler_name}{plain_signature}' on '{target}' cannot be called with "
                f"{expected}: {exc}. Change the handler to take {expected}.",
                plugin=owner,
                event=target,
            ) from None

    def _remove(self, subscriptions: Iterable[Subscription], plugin: Plugin | None) -> None:
        touched = set()
        for subscription in subscriptions:
            key = (subscription.kind, subscription.target)
            listed = self._subscriptions.get(key, [])
            if subscription in listed:
                listed.remove(subscription)
                touched.add(key)
                if subscription.kind == "on":
                    self.signal(subscription.target).disconnect(subscription.fn)
        for kind, target in touched:
            self._compile(kind, target)
        if plugin is not None and plugin in self._plugins:
            self._plugins.remove(plugin)
            self._disabled.discard(id(plugin))

    # ------------------------------------------------------------------ ordering

    def resolved(self, target: str, kind: str = "on") -> list[Subscription]:
        """Return the handlers (``kind="on"``) or wrappers (``"around"``) of a target in dispatch order.

        Lower ``order`` runs first and equal orders run in registration order,
        except where ``before=``/``after=`` constraints require otherwise.

        Raises:
            PluginError: the constraints form a cycle; the message names its plugins.
        """
        subscriptions = self._subscriptions.get((kind, str(target)), [])
        successors: dict[int, set[int]] = {index: set() for index in range(len(subscriptions))}
        for index, subscription in enumerate(subscriptions):
            for other_index, other in enumerate(subscriptions):
                if other_index == index:
                    continue
                if other.owner in subscription.before or subscription.owner in other.after:
                    successors[index].add(other_index)
        indegree = dict.fromkeys(successors, 0)
        for targets in successors.values():
            for other_index in targets:
                indegree[other_index] += 1
        ready = [(subscriptions[i].order, subscriptions[i].seq, i) for i, degree in indegree.items() if degree == 0]
        heapq.heapify(ready)
        result: list[Subscription] = []
        while ready:
            _, _, index = heapq.heappop(ready)
            result.append(subscriptions[index])
            for other_index in successors[index]:
                indegree[other_index] -= 1
                if indegree[other_index] == 0:
                    other = subscriptions[other_index]
                    heapq.heappush(ready, (other.order, other.seq, other_index))
        if len(result) < len(subscriptions):
            cycle = _find_cycle(successors, {i for i, degree in indegree.items() if degree > 0})
            names = " -> ".join(f"'{subscriptions[i].owner}'" for i in cycle)
            raise PluginError(
                f"The before=/after= constraints on '{target}' form a cycle: {names}, where each must run "
                "before the next. Drop one of these constraints so that an order exists.",
                plugin=subscriptions[cycle[0]].owner,
                event=str(target),
            )
        return result

    def _compile(self, kind: str, target: str) -> None:
        table: dict[str, Any] = self._table if kind == "on" else self._wrappers
        while True:
            self._compiles += 1
            mark = self._compiles
            ordered = [s for s in self.resolved(target, kind) if self._dispatches(s)]
            if not ordered:
                table.pop(target, None)
            elif kind == "on":
                table[target] = (_BUILDER_BY_NAME[target], tuple(self._dispatcher(s) for s in ordered))
            else:
                table[target] = tuple(ordered)
            if self._compiles == mark:
                return

    def _dispatches(self, subscription: Subscription) -> bool:
        """Return whether a subscription takes part in dispatch, that is, its plugin has not disabled or idled it."""
        plugin = subscription.plugin
        if plugin is None:
            return True
        return id(plugin) not in self._disabled and (id(plugin), _method_name(subscription)) not in self._idle

    def _dispatcher(self, subscription: Subscription) -> Callable[[Any], Any]:
        """Return the callable that ``emit`` runs for one subscription.

        A critical handler without filters is the handler itself, so the common
        case adds no call layer.
        """
        fn = subscription.fn
        if self._instrument is not None:
            fn = self._instrument(subscription, fn)
        if not subscription.has_filter:
            return fn if subscription.critical else self._guarded(subscription, fn)
        every = subscription.every
        once = subscription.once
        when = subscription.when
        critical = subscription.critical
        plugin = subscription.plugin
        disabled = self._disabled
        bus = self

        def dispatch(payload: Any) -> None:
            subscription.count += 1
            if every is not None and subscription.count % every:
                return
            if once and subscription.count > 1:
                return
            if critical:
                if when is None or when(payload):
                    fn(payload)
                return
            if plugin is not None and id(plugin) in disabled:
                return  # an earlier handler of the same plugin failed during this emit
            # The `when` predicate is the plugin's code too, so its failure also disables the plugin.
            try:
                if when is None or when(payload):
                    fn(payload)
            except _CONTROL_FLOW:
                raise
            except Exception as exc:
                bus._disable(subscription, exc)

        return dispatch

    def _guarded(self, subscription: Subscription, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Wrap a non-critical handler without filters: a failure disables its plugin, and no counter is kept."""
        plugin = subscription.plugin
        disabled = self._disabled
        bus = self

        def guarded(payload: Any) -> None:
            if disabled and plugin is not None and id(plugin) in disabled:
                return  # an earlier handler of the same plugin failed during this emit
            try:
                fn(payload)
            except _CONTROL_FLOW:
                raise
            except Exception as exc:
                bus._disable(subscription, exc)

        return guarded

    def _disable(self, subscription: Subscription, exc: Exception) -> None:
        plugin = subscription.plugin
        logger.error(
            "Plugin %r failed in handler %s on %r and is disabled for the rest of the run; training goes on.",
            subscription.owner,
            subscription.handler_name,
            subscription.target,
            exc_info=exc,
        )
        if plugin is None:
            self._remove([subscription], None)
            return
        self._disabled.add(id(plugin))
        for (kind, target), subscriptions in self._subscriptions.items():
            if any(s.plugin is plugin for s in subscriptions):
                self._compile(kind, target)

    def instrument(
        self, factory: Callable[[Subscription, Callable[[Any], Any]], Callable[[Any], Any]] | None
    ) -> None:
        """Wrap every event handler with ``factory(subscription, handler)``, or stop with None.

        Profilers use this to time each plugin's handlers; the factory's result
        replaces the handler in dispatch, filters and error policy still apply.
        """
        self._instrument = factory
        for kind, target in list(self._subscriptions):
            self._compile(kind, target)

    def is_disabled(self, plugin: Plugin) -> bool:
        """Whether ``plugin`` was disabled by a failure during the current run."""
        return id(plugin) in self._disabled

    def begin_run(self) -> None:
        """Re-enable plugins that a failure disabled in an earlier run, wake idle handlers and read the log level."""
        if self._disabled:
            self._disabled.clear()
            for kind, target in list(self._subscriptions):
                self._compile(kind, target)
        self.wake_all()
        self._debug = logger.isEnabledFor(logging.DEBUG)

    # ------------------------------------------------------------------ idle handlers

    def settle_idle(self, trainer: Any) -> None:
        """Leave out of dispatch the handlers that their plugins' `Plugin.idle_handlers` name for this run.

        The trainer calls this once per run, after ``setup``. An idle handler
        costs nothing when its event is emitted, and when every handler of an
        event is idle, the event is not even built.

        Raises:
            PluginError: a plugin named a method that is not one of its event handlers.
        """
        idle: set[tuple[int, str]] = set()
        for plugin in self._plugins:
            try:
                names = plugin.idle_handlers(trainer)
            except Exception as exc:
                raise PluginError(
                    f"Plugin '{plugin.name}' idle_handlers() raised {type(exc).__name__}: {exc}. Fix the method, "
                    "or return () to keep every handler.",
                    plugin=plugin.name,
                ) from exc
            if not names:
                continue
            if isinstance(names, str):
                raise PluginError(
                    f"Plugin '{plugin.name}' idle_handlers() returned the string {names!r}. Return a tuple of method "
                    f"names, for example ({names!r},).",
                    plugin=plugin.name,
                )
            handlers = self._handler_names(plugin)
            for name in names:
                if name not in handlers:
                    raise PluginError(
                        f"Plugin '{plugin.name}' idle_handlers() returned {name!r}, which is not one of its event "
                        f"handlers ({', '.join(sorted(handlers)) or 'it has none'}). Return the names of methods "
                        "decorated with @hookrt.on.",
                        plugin=plugin.name,
                    )
                idle.add((id(plugin), name))
        self._set_idle(idle - self._woken)

    def wake(self, plugin: Plugin, handler_name: str) -> None:
        """Put an idle handler of ``plugin`` back into dispatch. A handler that is not idle is left as it is.

        Safe to call from a Python signal handler. The handler is called from
        the next emit of its event on.
        """
        key = (id(plugin), handler_name)
        if key not in self._idle and handler_name not in self._handler_names(plugin):
            raise PluginError(
                f"bus.wake() got {handler_name!r} of {plugin!r}, which is not an event handler of a plugin "
                "registered on this bus. Pass a registered plugin and the name of one of its @hookrt.on methods.",
                plugin=getattr(plugin, "name", type(plugin).__name__),
            )
        # Recorded first, so that a wake that arrives while `settle_idle` runs is not undone by it.
        self._woken.add(key)
        if key in self._idle:
            self._set_idle(self._idle - {key})

    def wake_all(self) -> None:
        """Put every idle handler back into dispatch and forget the handlers woken in this run."""
        self._woken.clear()
        if self._idle:
            self._set_idle(set())

    def _handler_names(self, plugin: Any) -> set[str]:
        """Return the method names of ``plugin``'s event handlers on this bus; empty for a plugin not registered."""
        return {_method_name(s) for (kind, _), listed in self._subscriptions.items() if kind == "on"
                for s in listed if s.plugin is plugin}

    def is_idle(self, plugin: Plugin, handler_name: str) -> bool:
        """Return whether the handler ``handler_name`` of ``plugin`` is left out of dispatch in the current run."""
        return (id(plugin), handler_name) in self._idle

    def _set_idle(self, idle: set[tuple[int, str]]) -> None:
        changed = idle ^ self._idle
        self._idle = idle
        if changed:
            for (kind, target), subscriptions in list(self._subscriptions.items()):
                if any(s.plugin is not None and (id(s.plugin), _method_name(s)) in changed for s in subscriptions):
                    self._compile(kind, target)
        if self._idle & self._woken:
            # A signal handler woke one of these handlers after `idle` was computed.
            self._set_idle(self._idle - self._woken)

    # ------------------------------------------------------------------ dispatch

    def has_subscribers(self, event: str) -> bool:
        """Whether an emit of ``event`` would call any handler (never while muted)."""
        return event in self._dispatch

    def has_wrappers(self, point: str) -> bool:
        """Whether any wrapper surrounds ``point``."""
        return point in self._wrappers

    def emit(self, event: str, /, **fields: Any) -> Payload | None:
        """Build the event's payload from ``fields`` and run its handlers in order.

        Returns the payload (handlers may have changed it), or None when no
        handler is subscribed: then nothing else is done, not even the payload.

        Raises:
            HookrtError: a payload field is missing or unknown.
        """
        # The hot path: `in` and indexing avoid the method call of `dict.get`, which
        # matters most for the common case of an event without subscribers.
        dispatch = self._dispatch
        if event not in dispatch:
            return None
        build, handlers = dispatch[event]
        try:
            payload = build(self.trainer, self.module, fields)
        except (TypeError, KeyError):
            payload = self._payload_from_class(event, fields)
        if self._debug:
            logger.debug("emit %s to %d handler(s)", event, len(handlers))
        # Restoring the saved depth reads and writes the attribute once each way.
        depth = self._depth
        self._depth = depth + 1
        try:
            for handler in handlers:
                handler(payload)
        except BaseException as exc:
            self._depth = depth
            if not depth and self._deferred:
                self._settle_deferred(event, exc)
            raise
        self._depth = depth
        if not depth and self._deferred:
            self._run_deferred()
        return payload

    def _payload_from_class(self, event: str, fields: dict[str, Any]) -> Payload:
        """Build the payload of ``event`` through its class, whose TypeError names the missing or unknown field.

        Raises:
            HookrtError: the fields do not fit the payload.
        """
        payload_type = _PAYLOAD_BY_NAME[event]
        try:
            return payload_type(self.trainer, self.module, **fields)
        except TypeError as exc:
            raise _payload_error(event, payload_type, exc) from None

    def emit_to_all(self, event: str, /, **fields: Any) -> list[Exception]:
        """Emit ``event`` so that every handler runs even when an earlier one raises.

        For teardown-like events, where one failing plugin must not keep the
        others from closing their files. Returns the exceptions raised, in
        handler order; each is also logged with its traceback.
        """
        dispatch = self._dispatch
        if event not in dispatch:
            return []
        handlers = dispatch[event][1]
        payload = self._payload_from_class(event, fields)
        errors: list[Exception] = []
        depth = self._depth
        self._depth = depth + 1
        try:
            for handler in handlers:
                try:
                    handler(payload)
                except Exception as exc:
                    logger.error("Handler %s of %r failed; the other handlers still run.",
                                 _callable_name(handler), str(event), exc_info=exc)
                    errors.append(exc)
        except BaseException as exc:
            self._depth = depth
            if not depth and self._deferred:
                self._settle_deferred(event, exc)
            raise
        self._depth = depth
        if not depth and self._deferred:
            self._run_deferred()
        return errors

    def wrap(self, point: str, body: Callable[[Any], Any], /, **fields: Any) -> Any:
        """Run ``body(payload)`` inside the wrappers of ``point``, outermost first.

        Raises:
            PluginError: a wrapper did not call ``proceed()`` exactly once.
        """
        payload = WRAP_PAYLOAD_TYPES[point](self.trainer, self.module, **fields)  # type: ignore[index]
        chain = self._wrappers.get(point, ())
        return self._call_wrapper(chain, 0, payload, body)

    def _call_wrapper(
        self, chain: tuple[Subscription, ...], index: int, payload: Any, body: Callable[[Any], Any]
    ) -> Any:
        if index == len(chain):
            return body(payload)
        subscription = chain[index]
        calls = 0
        inner: Any = None

        def proceed() -> Any:
            nonlocal calls, inner
            calls += 1
            if calls > 1:
                raise PluginError(
                    f"Wrapper '{subscription.handler_name}' of plugin '{subscription.owner}' around "
                    f"'{subscription.target}' called proceed() a second time. Call it exactly once.",
                    plugin=subscription.owner,
                    event=subscription.target,
                )
            inner = self._call_wrapper(chain, index + 1, payload, body)
            return inner

        returned = subscription.fn(payload, proceed)
        if calls == 0:
            raise PluginError(
                f"Wrapper '{subscription.handler_name}' of plugin '{subscription.owner}' around "
                f"'{subscription.target}' returned without calling proceed(). Call it exactly once, "
                "or raise hookrt.CancelBatch to skip the batch on purpose.",
                plugin=subscription.owner,
                event=subscription.target,
            )
        return inner if returned is None else returned

    def after_dispatch(self, action: Callable[[], Any]) -> None:
        """Run ``action`` once the event being dispatched has reached all its handlers.

        Outside of a dispatch it runs at once. Checkpoint saves requested from a
        handler go through here, so every plugin's state is that of one moment.
        When a later handler of that event raises anything but CancelBatch or
        CancelEpoch, the action is dropped: a failing run writes no checkpoint
        of a half-dispatched event, and a failure of the action cannot replace
        the handler's exception.
        """
        if self._depth:
            self._deferred.append(action)
        else:
            action()

    def _run_deferred(self) -> None:
        actions, self._deferred = self._deferred, []
        for action in actions:
            action()

    def _settle_deferred(self, event: str, exc: BaseException) -> None:
        """Run or drop the actions deferred during a dispatch of ``event`` that raised ``exc``."""
        if isinstance(exc, _CONTROL_FLOW):
            self._run_deferred()
            return
        dropped, self._deferred = self._deferred, []
        logger.warning(
            "A handler of %r raised %s, so %d action(s) requested during that event, such as checkpoint saves, "
            "are dropped.", str(event), type(exc).__name__, len(dropped),
        )

    # ------------------------------------------------------------------ state and description

    def state_dict(self) -> dict[str, Any]:
        """Return the filter counters of every subscription that has a filter."""
        counters = {
            s.counter_key: s.count
            for subscriptions in self._subscriptions.values()
            for s in subscriptions
            if s.has_filter
        }
        return {"counters": counters}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore filter counters saved by `state_dict`; unknown keys are ignored."""
        counters = state_dict.get("counters", {})
        for subscriptions in self._subscriptions.values():
            for subscription in subscriptions:
                if subscription.counter_key in counters:
                    subscription.count = int(counters[subscription.counter_key])

    def describe(self) -> BusTable:
        """Return the resolved handler order of every event and wrapper point."""
        rows: list[BusRow] = []
        for kind, names in (("around", [w.value for w in WrapPoint]), ("on", [e.value for e in Event])):
            for target in names:
                for position, subscription in enumerate(self.resolved(target, kind), start=1):
                    rows.append(
                        BusRow(
                            target=target,
                            position=position,
                            plugin=subscription.owner,
                            handler=subscription.handler_name,
                            order=subscription.order,
                            filters=subscription.filter_text(),
                            kind=kind,
                        )
                    )
        return BusTable(rows)


def _method_name(subscription: Subscription) -> str:
    """Return the bare method name of a plugin's handler, as `Plugin.idle_handlers` gives it."""
    return str(getattr(subscription.fn, "__name__", subscription.handler_name))


def _callable_name(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return str(name) if name else repr(fn)


def _find_cycle(successors: dict[int, set[int]], candidates: set[int]) -> list[int]:
    """Return one cycle among ``candidates`` in edge order, with the first node repeated at the end.

    ``candidates`` are the nodes a topological sort could not place. Each of them
    has a predecessor among them, but some may have no successor among them (a
    node that only comes after a cycle), so the walk follows predecessors. The
    cycle starts at its lowest node, the handler registered first.
    """
    predecessor = {node: min(p for p in candidates if node in successors[p]) for node in candidates}
    path: list[int] = []
    position: dict[int, int] = {}
    node = min(candidates)
    while node not in position:
        position[node] = len(path)
        path.append(node)
        node = predecessor[node]
    cycle = path[position[node]:]
    cycle.reverse()
    start = cycle.index(min(cycle))
    cycle = cycle[start:] + cycle[:start]
    return [*cycle, cycle[0]]


def _payload_builder(payload_type: type[Payload]) -> Callable[[Any, Any, dict[str, Any]], Payload]:
    """Return ``build(trainer, module, fields)``, which makes a ``payload_type`` from the dict of its fields.

    ``emit`` already has its keyword arguments in a dict, and unpacking them
    again into the payload's ``__init__`` took about a fifth of an emit's time.
    The builder assigns the slots directly, which is all that every payload's
    ``__init__`` does. It raises TypeError or KeyError for a missing or
    unknown field, and ``emit`` then builds through the class, whose error
    names the field.
    """
    parameters = inspect.signature(payload_type.__init__).parameters.values()
    keywords = [parameter for parameter in parameters if parameter.kind is inspect.Parameter.KEYWORD_ONLY]
    required = [parameter.name for parameter in keywords if parameter.default is inspect.Parameter.empty]
    defaults = {parameter.name: parameter.default for parameter in keywords
                if parameter.default is not inspect.Parameter.empty}
    check = f"len(fields) != {len(required)}" + (" and not allowed.issuperset(fields)" if defaults else "")
    lines = ["def build(trainer, module, fields):", f"    if {check}:", "        raise TypeError"]
    lines += ["    payload = new(payload_type)", "    payload.trainer = trainer", "    payload.module = module"]
    lines += [f"    payload.{name} = fields[{name!r}]" for name in required]
    lines += [f"    payload.{name} = fields.get({name!r}, defaults[{name!r}])" for name in defaults]
    lines.append("    return payload")
    namespace: dict[str, Any] = {"new": object.__new__, "payload_type": payload_type, "defaults": defaults,
                                 "allowed": frozenset(required) | frozenset(defaults)}
    exec("\n".join(lines), namespace)  # noqa: S102 - the source is built above from the payload's own signature
    build: Callable[[Any, Any, dict[str, Any]], Payload] = namespace["build"]
    return build


#: The builder of each event's payload, by event name (see `_payload_builder`).
_BUILDER_BY_NAME = {name: _payload_builder(payload_type) for name, payload_type in _PAYLOAD_BY_NAME.items()}


def _payload_error(event: str, payload_type: type[Payload], exc: TypeError) -> HookrtError:
    fields = payload_fields(payload_type)
    listing = f"Its fields are: {', '.join(fields)}." if fields else "It takes no fields."
    return HookrtError(f"Cannot build the payload of event '{event}': {exc}. {listing}")


def _check_order(value: Any, owner: str, handler_name: str, target: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PluginError(
            f"Plugin '{owner}' handler '{handler_name}' on '{target}' has order={value!r}; order must be an int "
            "(lower runs first).",
            plugin=owner,
            event=target,
        )
    return value


def _check_every(value: Any, owner: str, handler_name: str, target: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PluginError(
            f"Plugin '{owner}' handler '{handler_name}' on '{target}' has every={value!r}; every must be a "
            "positive int (every=N fires on the Nth, 2Nth, ... emission).",
            plugin=owner,
            event=target,
        )
    return value


def _check_when(value: Any, owner: str, handler_name: str, target: str) -> Callable[[Any], bool] | None:
    if value is not None and not callable(value):
        raise PluginError(
            f"Plugin '{owner}' handler '{handler_name}' on '{target}' has when={value!r}; when must be a callable "
            "that takes the payload and returns a bool.",
            plugin=owner,
            event=target,
        )
    return value


def _names(value: Any, option: str, owner: str, handler_name: str, target: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (tuple, list, set, frozenset)) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise PluginError(
        f"Plugin '{owner}' handler '{handler_name}' on '{target}' has {option}={value!r}; {option} must be a "
        "plugin name or a tuple of plugin names.",
        plugin=owner,
        event=target,
    )
