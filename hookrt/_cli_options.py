"""Command-line values for the ``hookrt`` command: Python literals, ``KEY=VALUE`` lists and the Trainer flags.

The Trainer flags are generated from the signature of ``Trainer.__init__``: one
option per parameter, typed from its annotation, so each new Trainer parameter
becomes a flag. `FLAG_HELP` contains the help text of each.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import types
import typing
from typing import Any, NamedTuple

__all__ = [
    "FLAG_HELP",
    "INT_TEXT",
    "TrainerFlag",
    "UsageError",
    "add_trainer_flags",
    "attach_optional_values",
    "parse_literal",
    "parse_options",
    "trainer_flags",
]

# Trainer parameters that get no flag: `self`, and the two that --plugin covers.
_SKIPPED_PARAMETERS = ("self", "plugins", "callbacks")
_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
INT_TEXT = re.compile(r"[+-]?\d+")

#: Help text of each Trainer flag. --help appends the default, read from the signature.
FLAG_HELP: dict[str, str] = {
    "max_epochs": "Stop after this many epochs; -1 for no limit. none means 1000, or no limit when --max-steps "
    "or --max-time is given.",
    "min_epochs": "Train at least this many epochs, even when a plugin asks to stop earlier.",
    "max_steps": "Stop after this many optimizer steps; -1 for no limit.",
    "min_steps": "Take at least this many optimizer steps before a stop request is honoured.",
    "max_time": "Stop after this much wall-clock time: 'DD:HH:MM:SS', a number of seconds, or a dict of "
    "timedelta arguments such as \"{'hours': 1}\".",
    "logger": "The logger: true for the default TensorBoard logger under --default-root-dir, false for none.",
    "enable_checkpointing": "Save a checkpoint at the end of each epoch under --default-root-dir.",
    "enable_progress_bar": "Show the built-in progress bar.",
    "enable_model_summary": "Log a table of the module's layers and parameter counts when fit starts.",
    "enable_signal_handler": "Turn SIGTERM and SIGINT during fit into a checkpoint and a clean stop.",
    "default_root_dir": "Folder for logs and checkpoints; none means the current working directory.",
    "accumulate_grad_batches": "Step the optimizer once every this many batches, on their averaged gradients.",
    "gradient_clip_val": "Clip gradients to this maximum (the total norm, or each element with "
    "--gradient-clip-algorithm value); none turns clipping off.",
    "gradient_clip_algorithm": "How --gradient-clip-val clips: 'norm' (total gradient norm) or 'value' "
    "(each element).",
    "val_check_interval": "When to validate within an epoch: a fraction of the epoch (0.25 validates four "
    "times per epoch) or a number of training batches.",
    "check_val_every_n_epoch": "Validate every this many epochs; none validates only by the batch count "
    "of --val-check-interval.",
    "num_sanity_val_steps": "Validation batches to run before training, to catch errors early; 0 skips "
    "the check, -1 runs every validation batch.",
    "limit_train_batches": "Training batches per epoch: a fraction of the loader (0.0 to 1.0) or a number "
    "of batches.",
    "limit_val_batches": "Validation batches per run: a fraction of each loader (0.0 to 1.0) or a number "
    "of batches.",
    "limit_test_batches": "Test batches: a fraction of each loader (0.0 to 1.0) or a number of batches.",
    "limit_predict_batches": "Predict batches: a fraction of each loader (0.0 to 1.0) or a number of batches.",
    "fast_dev_run": "Run this many batches (true means 1) of training and validation once, with no logger "
    "and no checkpoints, to check that the code runs.",
    "truncated_bptt_steps": "Split each batch into chunks of this many time steps for truncated "
    "back-propagation through time; none turns it off.",
    "log_every_n_steps": "Send step metrics to the loggers every this many optimizer steps.",
    "precision": "Numeric precision: '32-true', 'bf16-mixed' or '16-mixed'.",
    "accelerator": "Device type: 'auto', 'cpu', 'cuda', 'gpu' or 'mps'.",
    "devices": "Devices to train on: a count, a list of indices such as [0, 1], or 'auto'.",
    "num_nodes": "Number of machines in distributed training.",
    "strategy": "How to use several devices: 'auto', 'single_device', 'dp', 'ddp' or 'ddp_spawn'.",
    "deterministic": "Use deterministic algorithms where PyTorch has them (warns where it has none).",
    "detect_anomaly": "Run autograd anomaly detection, which names the operation that produced a NaN "
    "gradient but slows training down.",
}


class UsageError(Exception):
    """A command line that cannot run as written: printed on one line, exit status 2.

    ``prog`` is the command to name in the message; None names the command being run.
    """

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog



class TrainerFlag(NamedTuple):
    """One Trainer parameter as a command-line option."""

    parameter: str
    option: str
    kind: str  # bool, bool_or_int, int, float, number, str or any
    allows_none: bool
    default: Any



# ---------------------------------------------------------------------- values


def parse_literal(text: str) -> Any:
    """Parse a Python literal (``3``, ``0.1``, ``'a'``, ``[1, 2]``, ``True``), falling back to the text itself.

    ``true``, ``false`` and ``none`` in any case read as True, False and None.
    """
    lowered = text.strip().lower()
    if lowered in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[lowered]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _split_options(text: str) -> list[str]:
    """Split ``a=1,b=[1, 2]`` at the commas that are outside brackets and quotes."""
    parts: list[str] = []
    depth = 0
    quote = ""
    current: list[str] = []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def parse_options(text: str, where: str) -> dict[str, Any]:
    """Parse ``key=value,key=value`` into a dict of literal-evaluated values; ``where`` names the source in errors."""
    options: dict[str, Any] = {}
    for item in _split_options(text):
        key, equals, value = item.partition("=")
        if not equals or not key.strip().isidentifier():
            raise UsageError(f"invalid option '{item}' in {where}: expected KEY=VALUE with KEY a Python name")
        options[key.strip()] = parse_literal(value.strip())
    return options


def _value_parser(flag: TrainerFlag) -> typing.Callable[[str], Any]:
    def parse(text: str) -> Any:
        lowered = text.strip().lower()
        if flag.allows_none and lowered == "none":
            return None
        if flag.kind in ("bool", "bool_or_int") and lowered in _BOOL_WORDS:
            return _BOOL_WORDS[lowered]
        if flag.kind in ("int", "bool_or_int") or (flag.kind == "number" and INT_TEXT.fullmatch(text.strip())):
            try:
                return int(text)
            except ValueError:
                pass
        elif flag.kind in ("float", "number"):
            try:
                return float(text)
            except ValueError:
                pass
        elif flag.kind == "str":
            return text
        elif flag.kind == "any":
            return parse_literal(text)
        expected = {"bool": "true or false", "bool_or_int": "true, false or an int", "int": "an int",
                    "float": "a number", "number": "an int or a float"}[flag.kind]
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {expected}"
                                         + (" or none" if flag.allows_none else ""))

    return parse


# ---------------------------------------------------------------------- Trainer flags


def _annotation_names(annotation: Any) -> set[str]:
    if annotation is inspect.Parameter.empty:
        return set()
    if isinstance(annotation, str):
        return {part.strip() for part in annotation.split("|")}
    is_union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    members = typing.get_args(annotation) if is_union else (annotation,)
    return {"None" if member is type(None) else getattr(member, "__name__", str(member).rpartition(".")[2])
            for member in members}


_KINDS = {
    frozenset({"bool"}): "bool",
    frozenset({"bool", "int"}): "bool_or_int",
    frozenset({"int"}): "int",
    frozenset({"float"}): "float",
    frozenset({"int", "float"}): "number",
    frozenset({"str"}): "str",
}


def trainer_flags() -> list[TrainerFlag]:
    """Return one flag per ``Trainer.__init__`` parameter except ``plugins`` and ``callbacks``, in signature order."""
    from hookrt._trainer import Trainer

    try:
        signature = inspect.signature(Trainer.__init__, eval_str=True)
    except Exception:  # an annotation that names something not importable at run time: read it as text
        signature = inspect.signature(Trainer.__init__)
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    flags = []
    for parameter in signature.parameters.values():
        if parameter.name in _SKIPPED_PARAMETERS or parameter.kind in variadic:
            continue
        names = _annotation_names(parameter.annotation)
        if not names and parameter.default is not None:
            names = {type(parameter.default).__name__}
        kind = _KINDS.get(frozenset(names - {"None"}), "any")
        flags.append(TrainerFlag(parameter.name, "--" + parameter.name.replace("_", "-"), kind,
                           "None" in names or parameter.default is None, parameter.default))
    return flags


def _default_text(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return str(value).lower()
    return str(value)


def add_trainer_flags(parser: argparse.ArgumentParser, flags: list[TrainerFlag]) -> None:
    group = parser.add_argument_group("Trainer flags", "Each sets the Trainer argument of the same name.")
    metavars = {"bool": "true|false", "bool_or_int": "N|true|false", "int": "INT", "float": "FLOAT",
                "number": "N|FRACTION", "str": "TEXT", "any": "VALUE"}
    for flag in flags:
        text = FLAG_HELP.get(flag.parameter, f"Sets Trainer({flag.parameter}=...).")
        text = f"{text} Default: {_default_text(flag.default)}.".replace("%", "%%")
        metavar = metavars[flag.kind] + ("|none" if flag.allows_none and flag.kind != "any" else "")
        optional_value = flag.kind in ("bool", "bool_or_int")
        group.add_argument(flag.option, dest=f"flag.{flag.parameter}", type=_value_parser(flag), help=text,
                           metavar=metavar, default=argparse.SUPPRESS,
                           nargs="?" if optional_value else None, const=True if optional_value else None)
        if flag.kind == "bool":
            group.add_argument("--no-" + flag.option[2:], dest=f"flag.{flag.parameter}", action="store_false",
                               default=argparse.SUPPRESS, help=f"Same as {flag.option} false.")


def attach_optional_values(argv: list[str], flags: list[TrainerFlag]) -> list[str]:
    """Write ``--flag value`` as ``--flag=value`` for flags whose value is optional, and a bare one as ``=true``.

    argparse would otherwise take the next word as the value even when it is the
    FILE:Class target, so ``--deterministic model.py:Net`` would fail.
    """
    optional = {flag.option: flag.kind for flag in flags if flag.kind in ("bool", "bool_or_int")}
    result: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        if token == "--":
            result.extend(argv[index - 1:])
            break
        if token not in optional:
            result.append(token)
            continue
        following = argv[index].strip().lower() if index < len(argv) else ""
        takes_next = following in _BOOL_WORDS or following == "none" or (
            optional[token] == "bool_or_int" and INT_TEXT.fullmatch(following) is not None)
        result.append(f"{token}={argv[index]}" if takes_next else f"{token}=true")
        index += 1 if takes_next else 0
    return result

