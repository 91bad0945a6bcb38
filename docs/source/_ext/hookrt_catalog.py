"""A Sphinx extension that renders hookrt's catalogs from the code, so the docs cannot drift from it.

``.. hookrt-catalog:: PART`` expands to reStructuredText built when the docs
are built. The parts:

- ``loop``: the docstring of ``hookrt._events``, the pseudocode of where each event fires;
- ``events``: every ``hookrt.Event`` member with its payload class and fields;
- ``payloads``: an ``autoclass`` entry for every payload class;
- ``wrap-points``: every ``hookrt.WrapPoint`` member with its payload;
- ``module-hooks``: which event each LightningModule hook listens to;
- ``callback-methods``: which event each ``hookrt.Callback`` method listens to, and its arguments;
- ``plugin-names``: the names of the built-in plugins, for ``Trainer(plugins=["name"])``;
- ``plugins-api``: an ``autoclass`` entry for every name in ``hookrt.plugins.__all__``.

The extension also warns, which ``sphinx -W`` turns into a failure, when a
name of ``hookrt.__all__`` or ``hookrt.plugins.__all__`` is documented nowhere.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)


def _summary(obj: Any) -> str:
    """Return the first paragraph of ``obj``'s docstring on one line."""
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _literal_list(names: list[str] | tuple[str, ...]) -> str:
    return ", ".join(f"``{name}``" for name in names) if names else "(only ``trainer`` and ``module``)"


def _public_path(obj: type) -> str:
    """Return ``hookrt.Name`` when the package exports ``obj``, else its defining module's path."""
    import hookrt

    name = obj.__name__
    return f"hookrt.{name}" if getattr(hookrt, name, None) is obj else f"{obj.__module__}.{name}"


def _payload_ref(payload_type: type) -> str:
    return f":class:`~{_public_path(payload_type)}`"


def _list_table(title: str, header: list[str], rows: list[list[str]], widths: list[int]) -> list[str]:
    """Return the lines of a ``list-table`` directive with a header row."""
    lines = [f".. list-table:: {title}", "   :header-rows: 1", f"   :widths: {' '.join(map(str, widths))}", ""]
    for row in [header, *rows]:
        lines.append(f"   * - {row[0] or '..'}")
        lines.extend(f"     - {cell or '..'}" for cell in row[1:])
    lines.append("")
    return lines


def render_loop() -> list[str]:
    """Return the events module's docstring without its summary line."""
    import hookrt._events

    doc = inspect.getdoc(hookrt._events) or ""
    return doc.partition("\n\n")[2].splitlines() + [""]


def render_events() -> list[str]:
    from hookrt import Event

    rows = [
        [f"``Event.{event.name}``", f"``{event.value}``", _payload_ref(event.payload_type),
         _literal_list(event.fields)]
        for event in Event
    ]
    return _list_table("Events, in catalog order", ["Member", "Name", "Payload", "Payload fields"], rows,
                       [25, 25, 20, 30])


def render_payloads() -> list[str]:
    from hookrt._events import PAYLOAD_TYPES, WRAP_PAYLOAD_TYPES, payload_fields

    lines: list[str] = []
    seen: list[type] = []
    for payload_type in [*PAYLOAD_TYPES.values(), *WRAP_PAYLOAD_TYPES.values()]:
        if payload_type in seen:
            continue
        seen.append(payload_type)
        fields = ", ".join(f"``{name}``" for name in ("trainer", "module", *payload_fields(payload_type)))
        lines += [f".. autoclass:: {_public_path(payload_type)}", "", f"   Fields: {fields}.", ""]
    return lines


def render_wrap_points() -> list[str]:
    from hookrt import WrapPoint
    from hookrt._events import WRAP_PAYLOAD_TYPES, payload_fields

    rows = [
        [f"``WrapPoint.{point.name}``", f"``{point.value}``", _payload_ref(WRAP_PAYLOAD_TYPES[point]),
         _literal_list(payload_fields(WRAP_PAYLOAD_TYPES[point]))]
        for point in WrapPoint
    ]
    return _list_table("Wrapper points, outermost first", ["Member", "Name", "Payload", "Payload fields"], rows,
                       [25, 25, 20, 30])


def render_module_hooks() -> list[str]:
    from hookrt._hooks import MODULE_HOOKS

    rows = [[f"``{row.hook}``", f"``{row.event.value}``"] for row in MODULE_HOOKS]
    return _list_table("LightningModule hooks and their events", ["Module hook", "Event"], rows, [50, 50])


def render_callback_methods() -> list[str]:
    from hookrt._callback import CALLBACK_METHODS

    rows = [
        [f"``{row.method}``", f"``{row.event.value}``", ", ".join(["trainer", "pl_module", *row.fields])]
        for row in CALLBACK_METHODS
    ]
    return _list_table("Callback methods, their events and arguments", ["Callback method", "Event", "Arguments"],
                       rows, [35, 30, 35])


def render_plugin_names() -> list[str]:
    from hookrt._registry import BUILTIN_PLUGINS

    rows = [[f"``{name}``", f"``{target.replace(':', '.')}``"] for name, target in BUILTIN_PLUGINS.items()]
    return _list_table("Built-in plugin names", ["Name", "Class"], rows, [30, 70])


def render_plugins_api() -> list[str]:
    import hookrt.plugins

    lines: list[str] = []
    for name in hookrt.plugins.__all__:
        lines += [f".. autoclass:: hookrt.plugins.{name}", "   :members:", "   :show-inheritance:", ""]
    return lines


RENDERERS: dict[str, Callable[[], list[str]]] = {
    "loop": render_loop,
    "events": render_events,
    "payloads": render_payloads,
    "wrap-points": render_wrap_points,
    "module-hooks": render_module_hooks,
    "callback-methods": render_callback_methods,
    "plugin-names": render_plugin_names,
    "plugins-api": render_plugins_api,
}

#: The modules whose changes make the pages that use the directive stale.
SOURCE_MODULES = ("hookrt._events", "hookrt._hooks", "hookrt._callback", "hookrt._registry", "hookrt.plugins")


class CatalogDirective(SphinxDirective):
    """``.. hookrt-catalog:: PART``: insert one of the generated catalogs."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        part = self.arguments[0]
        renderer = RENDERERS.get(part)
        if renderer is None:
            raise self.error(f"hookrt-catalog: unknown part {part!r}; valid parts: {', '.join(RENDERERS)}.")
        import importlib

        for module_name in SOURCE_MODULES:
            self.env.note_dependency(inspect.getfile(importlib.import_module(module_name)))
        container = nodes.container()
        source = f"<hookrt-catalog {part}>"
        self.state.nested_parse(StringList(renderer(), source=source), self.content_offset, container,
                                match_titles=True)
        return list(container.children)


def check_public_names_documented(app: Sphinx, env: BuildEnvironment) -> None:
    """Warn about every public name of hookrt and hookrt.plugins that no page documents."""
    import hookrt
    import hookrt.plugins

    documented = set(env.get_domain("py").objects)  # type: ignore[attr-defined]
    expected = [f"hookrt.{name}" for name in hookrt.__all__ if name != "__version__"]
    expected += [f"hookrt.plugins.{name}" for name in hookrt.plugins.__all__]
    for name in expected:
        if name not in documented:
            logger.warning("hookrt-catalog: the public name %s is not documented on any page; add it to api.rst.",
                           name)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("hookrt-catalog", CatalogDirective)
    app.connect("env-check-consistency", check_public_names_documented)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
