"""The ``hookrt`` command: train or describe a LightningModule, list the events and the installed plugins.

``hookrt fit model.py:Net --max-epochs 3 --plugin example:factor=5`` imports
``Net`` from ``model.py``, builds a Trainer from the flags and trains. The
Trainer flags are generated from the signature of ``Trainer.__init__``, so each
new Trainer parameter becomes a flag. Exit status: 0 on success, 1 when hookrt
raised an error while building or running, 2 for a command line that cannot
run as written (unknown flag, file, class or plugin).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import logging
import os
import re
import sys
import textwrap
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import hookrt
from hookrt._cli_options import (
    INT_TEXT,
    TrainerFlag,
    UsageError,
    add_trainer_flags,
    attach_optional_values,
    parse_options,
    trainer_flags,
)
from hookrt._errors import HookrtError
from hookrt._registry import keyword_mismatch

__all__ = ["main"]

_TARGET_HELP = (
    "The LightningModule to load, as FILE.py:Class or package.module:Class. A FILE is imported on its own "
    "under a private module name: hookrt adds nothing to sys.path, so FILE cannot import the files next to "
    "it (install them as a package or put their folder on PYTHONPATH). A dotted module is imported from "
    "sys.path as it is. The class is built with no arguments unless --init gives some."
)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises its errors as `UsageError`, so main prints them on one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)


# ---------------------------------------------------------------------- parser


def _build_parser(flags: list[TrainerFlag] | None) -> tuple[_Parser, dict[str, _Parser]]:
    parser = _Parser(prog="hookrt", allow_abbrev=False,
                     description="Train a LightningModule on the hookrt event bus, or inspect what is installed.",
                     epilog="Run 'hookrt COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"hookrt {hookrt.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers: dict[str, _Parser] = {}
    run_help = {
        "fit": ("train a LightningModule", "Build the module and a Trainer from the flags, then train with "
                "trainer.fit(module). The module must provide its own train_dataloader (and val_dataloader "
                "for validation). Prints one summary line when training ends."),
        "describe": ("print the handler order a run would use, without training",
                     "Build the module and a Trainer as fit would, subscribe the module's hooks as a run does, "
                     "print the resolved order of every event's handlers and exit."),
    }
    for name, (summary, description) in run_help.items():
        sub = commands.add_parser(name, help=summary, description=description, allow_abbrev=False)
        sub.add_argument("target", metavar="FILE_OR_MODULE:Class", help=_TARGET_HELP)
        sub.add_argument("--init", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE...]",
                         help="Keyword arguments for the class's constructor; values are Python literals "
                         "(3, 0.1, 'text', [1, 2], True), anything else is a string. Repeatable. "
                         "Default: none.")
        sub.add_argument("--plugin", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                         help="Add the installed plugin NAME (see 'hookrt plugins'), built with the given "
                         "keyword options, parsed as --init values are. Repeatable. Default: none.")
        sub.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                         help="Lowest level of log messages to print, when no logging is set up yet. "
                         "Default: info.")
        sub.add_argument("--traceback", action="store_true",
                         help="On a hookrt error, show the full traceback instead of one line. Default: off.")
        if name == "fit":
            sub.add_argument("--ckpt-path", default=None, metavar="PATH",
                             help="Resume from this checkpoint (for example the signal.ckpt a stopped run "
                             "wrote). Default: start from scratch.")
        if flags is not None:
            add_trainer_flags(sub, flags)
        subparsers[name] = sub
    subparsers["events"] = commands.add_parser(
        "events", help="list every event with its payload fields and where it fires",
        description="Print where each event fires during fit, every event with its payload type and fields, "
        "and the wrapper points that @hookrt.around wraps.")
    subparsers["plugins"] = commands.add_parser(
        "plugins", help="list the installed plugins and where each comes from",
        description="Print every plugin name usable in --plugin and Trainer(plugins=[...]): the built-ins and "
        "those of installed packs, with the distribution that provides each. A pack that fails to load is "
        "listed with its error; the exit status is then 1.")
    return parser, subparsers


def _reject_extras(sub: argparse.ArgumentParser, extras: list[str]) -> None:
    options = [option for action in sub._actions for option in action.option_strings]
    for token in extras:
        if token.startswith("-") and not INT_TEXT.fullmatch(token):
            name = token.partition("=")[0]
            close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UsageError(f"unknown option '{name}'.{hint} Run '{sub.prog} --help' to list the options.")
    raise UsageError(f"unexpected argument '{extras[0]}'. Run '{sub.prog} --help' for the usage.")


# ---------------------------------------------------------------------- loading the module


def _import_file(path: Path) -> types.ModuleType:
    if not path.is_file():
        siblings = [p.name for p in path.parent.glob("*.py")] if path.parent.is_dir() else []
        close = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.6)
        hint = f" Did you mean '{path.parent / close[0]}'?" if close else ""
        raise UsageError(f"file not found: {path}.{hint}")
    resolved = path.resolve()
    # A private, path-derived name: the file never shadows or replaces a real module, even one named like it.
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    name = f"_hookrt_cli_{re.sub(r'[^0-9a-zA-Z_]', '_', resolved.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise UsageError(f"{path} cannot be imported: expected a Python source file (.py).")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, as an import does, so dataclasses and pickling can find the module by name.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _import_dotted(name: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            raise UsageError(f"no module named '{missing}' on sys.path. Give a FILE.py:Class "
                              "path, install the package, or put its folder on PYTHONPATH.") from None
        raise


def load_module_class(target: str) -> type:
    """Import ``FILE.py:Class`` or ``package.module:Class`` and return the LightningModule subclass it names."""
    from hookrt._module import LightningModule

    source, colon, class_path = target.rpartition(":")
    if not colon or not source or not class_path:
        raise UsageError(f"invalid target '{target}': expected FILE.py:Class or package.module:Class.")
    looks_like_file = source.endswith(".py") or "/" in source or "\\" in source
    module = _import_file(Path(source)) if looks_like_file else _import_dotted(source)
    lightning_classes = sorted(
        attribute for attribute, item in vars(module).items()
        if isinstance(item, type) and issubclass(item, LightningModule) and item is not LightningModule
    )
    found: Any = module
    for part in class_path.split("."):  # "Outer.Inner" names a nested class
        found = getattr(found, part, None)
    if found is None:
        candidates = lightning_classes or [attribute for attribute, item in vars(module).items()
                                           if isinstance(item, type)]
        close = difflib.get_close_matches(class_path, candidates, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        if lightning_classes and not close:
            hint = f" Its LightningModule classes: {', '.join(lightning_classes)}."
        raise UsageError(f"{source} has no class '{class_path}'.{hint}")
    if not (isinstance(found, type) and issubclass(found, LightningModule)):
        close = difflib.get_close_matches(class_path, lightning_classes, n=1, cutoff=0.0)
        hint = f" Did you mean '{close[0]}'?" if close else " It defines no LightningModule subclass."
        raise UsageError(f"'{class_path}' in {source} is not a hookrt.LightningModule subclass.{hint}")
    return found


def _check_init_options(cls: type, init_options: dict[str, Any]) -> None:
    """Raise a usage error when the class's constructor cannot take ``init_options``, before anything is built."""
    mismatch = keyword_mismatch(cls, init_options, "argument")
    if mismatch is not None:
        reason, parameters = mismatch
        raise UsageError(f"{cls.__name__}() cannot be built from --init: {reason} "
                         f"Its parameters: {', '.join(parameters) or 'none'}.")


def _resolve_plugins(specs: list[str]) -> list[hookrt.Plugin]:
    from hookrt._registry import plugin_entries, resolve_plugin

    names = list(dict.fromkeys(entry.name for entry in plugin_entries()))
    plugins = []
    for spec in specs:
        name, _, option_text = spec.partition(":")
        name = name.strip()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UsageError(f"no plugin named '{name}' is installed.{hint} "
                              "Run 'hookrt plugins' to list the installed ones.")
        plugins.append(resolve_plugin(name, parse_options(option_text, f"--plugin {spec}")))
    return plugins


# ---------------------------------------------------------------------- commands


def _build_run(args: argparse.Namespace) -> tuple[Any, Any]:
    """Return ``(trainer, module)`` built from the parsed fit/describe arguments."""
    init_options: dict[str, Any] = {}
    for text in args.init:
        init_options.update(parse_options(text, f"--init {text}"))
    cls = load_module_class(args.target)
    _check_init_options(cls, init_options)
    plugins = _resolve_plugins(args.plugin)
    flags = {key.partition(".")[2]: value for key, value in vars(args).items() if key.startswith("flag.")}
    from hookrt._trainer import Trainer

    trainer = Trainer(plugins=plugins, **flags)
    return trainer, cls(**init_options)


def _format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for name, value in metrics.items():
        try:
            parts.append(f"{name}={float(value):.4g}")
        except (TypeError, ValueError, RuntimeError):  # a non-scalar tensor or an object: not a one-line value
            continue
    return ", ".join(parts)


def _check_spawnable(trainer: Any, module: Any, target: str) -> None:
    """Reject a class loaded from a file path when the run would start its own processes.

    Started processes import the class by module name, and a file loaded by path has no
    name they can import.
    """
    if not type(module).__module__.startswith("_hookrt_cli_"):
        return
    for plugin in trainer.plugins:
        needs_launch = getattr(plugin, "needs_launch", None)
        if callable(needs_launch) and needs_launch(trainer):
            folder, _, rest = target.rpartition("/")
            dotted = rest.replace(".py:", ":")
            raise UsageError(
                f"'{target}' is a file path, but this run starts several processes, which must import the class "
                f"by module name. Use the module form: PYTHONPATH={folder or '.'} hookrt fit {dotted} ..., or "
                "launch with torchrun."
            )


def _fit(args: argparse.Namespace) -> int:
    trainer, module = _build_run(args)
    _check_spawnable(trainer, module, args.target)
    trainer.fit(module, ckpt_path=args.ckpt_path)
    epochs = trainer.current_epoch
    line = f"fit finished: {type(module).__name__}, {epochs} epoch{'s' * (epochs != 1)}, {trainer.global_step} steps"
    metrics = _format_metrics(trainer.callback_metrics)
    print(f"{line}, {metrics}" if metrics else line)
    from hookrt.plugins.signals import SignalHandler

    for plugin in trainer.plugins:
        if isinstance(plugin, SignalHandler) and plugin.received is not None:
            # A run stopped by a signal exits as shells report a job ended by that signal.
            print(f"stopped by signal {plugin.received}; checkpoint: {plugin.checkpoint_path}; resume with "
                  f"--ckpt-path {plugin.checkpoint_path}", file=sys.stderr)
            return 128 + int(plugin.received)
    return 0


def _describe(args: argparse.Namespace) -> int:
    from hookrt._hooks import subscribe_module_hooks
    from hookrt._module import LightningModule

    trainer, module = _build_run(args)
    handles = subscribe_module_hooks(trainer.bus, module, LightningModule)
    try:
        plugins = ", ".join(plugin.name for plugin in trainer.plugins) or "none"
        print(f"Handler order for {type(module).__name__} (plugins: {plugins}):")
        print(trainer.bus.describe())
    finally:
        for handle in handles:
            handle.remove()
    return 0


def _plain_text(text: str) -> str:
    """Turn reStructuredText from a docstring into terminal text: no markup, prose paragraphs rewrapped."""
    blocks = text.replace("``", "").replace("::\n", ":\n").split("\n\n")
    return "\n\n".join(block if block.startswith(" ") else textwrap.fill(" ".join(block.split()), 100)
                       for block in blocks)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def _events() -> int:
    from hookrt import _events
    from hookrt._hooks import MODULE_HOOKS

    # The module docstring, after its summary line, is the catalog's description of where each event fires.
    print(_plain_text((inspect.getdoc(_events) or "").partition("\n")[2].strip()))
    hooks: dict[str, list[str]] = {}
    for row in MODULE_HOOKS:
        hooks.setdefault(row.event.value, []).append(row.hook)
    print("\nEvents with their payload types and fields. Every payload also has .trainer and .module.\n")
    rows: list[tuple[str, ...]] = [("EVENT", "PAYLOAD", "FIELDS", "MODULE HOOKS")]
    for event in hookrt.Event:
        rows.append((event.value, event.payload_type.__name__, ", ".join(event.fields) or "-",
                     ", ".join(hooks.get(event.value, [])) or "-"))
    print("\n".join(_table(rows)))
    print("\nWrapper points for @hookrt.around(point), outermost first. A wrapper takes (payload, proceed)\n"
          "and calls proceed() exactly once.\n")
    rows = [("POINT", "PAYLOAD", "FIELDS")]
    for point in hookrt.WrapPoint:
        payload_type = _events.WRAP_PAYLOAD_TYPES[point]
        rows.append((point.value, payload_type.__name__, ", ".join(_events.payload_fields(payload_type)) or "-"))
    print("\n".join(_table(rows)))
    return 0


def _plugins() -> int:
    from hookrt._registry import plugin_entries

    rows: list[tuple[str, ...]] = [("NAME", "SOURCE", "TARGET", "DESCRIPTION")]
    seen: dict[str, str] = {}
    failed = []
    for entry in plugin_entries():
        if entry.name in seen:
            rows.append((entry.name, entry.source, entry.target, f"not used: shadowed by '{entry.name}' from "
                         f"{seen[entry.name]}"))
            continue
        seen[entry.name] = entry.source
        try:
            loaded = entry.load()
        except Exception as exc:  # any error in a pack's import; the listing goes on
            failed.append(entry.name)
            rows.append((entry.name, entry.source, entry.target,
                         f"failed to load: {type(exc).__name__}: {exc}".replace("\n", " ")))
            continue
        summary = (inspect.getdoc(loaded) or "").partition("\n")[0]
        rows.append((entry.name, entry.source, entry.target, _plain_text(summary)))
    print("\n".join(_table(rows)))
    if failed:
        print(f"hookrt plugins: error: {len(failed)} plugin pack(s) failed to load and are skipped: "
              f"{', '.join(failed)}. Reinstall or fix them.", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hookrt`` command line on ``argv`` (``sys.argv[1:]`` when None) and return the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = arguments[0] if arguments else ""
    flags = trainer_flags() if command in ("fit", "describe") else None
    parser, subparsers = _build_parser(flags)
    if not arguments:
        parser.print_help(sys.stderr)
        return 2
    prog = subparsers[command].prog if command in subparsers else parser.prog
    show_traceback = False
    try:
        if not command.startswith("-") and command not in subparsers:
            close = difflib.get_close_matches(command, list(subparsers), n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UsageError(f"unknown command '{command}'.{hint} Commands: {', '.join(subparsers)}.")
        if flags is not None:
            arguments = attach_optional_values(arguments, flags)
        args, extras = parser.parse_known_args(arguments)
        if extras:
            _reject_extras(subparsers[args.command], extras)
        if args.command == "events":
            return _events()
        if args.command == "plugins":
            return _plugins()
        show_traceback = args.traceback
        logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
        return _fit(args) if args.command == "fit" else _describe(args)
    except SystemExit as exc:  # --help and --version exit through argparse
        return exc.code if isinstance(exc.code, int) else 0
    except UsageError as exc:
        print(f"{exc.prog or prog}: error: {exc}", file=sys.stderr)
        return 2
    except HookrtError as exc:
        if show_traceback:
            raise
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`hookrt events | head`): stop quietly, and point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
