"""A plugin that logs a table of the module's layers and parameter counts when fit starts."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from torch import nn

from hookrt._errors import MisconfigurationError
from hookrt._events import Payload
from hookrt._plugin import Plugin, on

__all__ = ["LayerRow", "ModelSummary"]

log = logging.getLogger(__name__)


class LayerRow(NamedTuple):
    """One submodule in the summary table."""

    name: str
    type: str
    parameters: int


class ModelSummary(Plugin):
    """Log the module's layers, parameter counts and parameter size at the start of fit.

    The table lists the submodules down to ``max_depth`` levels below the module:
    name, class and parameter count, the submodule's children included. Below it
    come the trainable, non-trainable and total parameter counts, and the
    parameters' size in MB (10**6 bytes, each at its dtype's element size).
    A parameter shared by several submodules counts in each of their rows but
    once in the totals. Parameters of lazy modules that have not run yet count
    as 0, and a line under the table points this out. Only global rank 0 logs.

    Args:
        max_depth: how many levels of submodules to list; 0 lists none (totals
            only) and -1 lists every level.

    Raises:
        MisconfigurationError: ``max_depth`` is not an int >= -1.
    """

    critical = False

    def __init__(self, max_depth: int = 1) -> None:
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < -1:
            raise MisconfigurationError(
                f"ModelSummary(max_depth={max_depth!r}) is invalid: max_depth must be an int, the number of "
                "submodule levels to list (0 for totals only, -1 for every level)."
            )
        self.max_depth = max_depth
        #: The rows of the latest summary.
        self.table: list[LayerRow] = []
        #: Parameter counts and size of the latest summary.
        self.total_parameters = 0
        self.trainable_parameters = 0
        self.non_trainable_parameters = 0
        self.size_mb = 0.0
        self.has_uninitialized_parameters = False

    def summarize(self, module: nn.Module) -> str:
        """Compute the table and totals for ``module``, store them on this plugin and return the text."""
        self.table = [
            LayerRow(name, type(submodule).__name__, _count(submodule.parameters()))
            for name, submodule in module.named_modules()
            if name and (self.max_depth == -1 or name.count(".") < self.max_depth)
        ]
        parameters = list(module.parameters())
        self.has_uninitialized_parameters = any(_is_uninitialized(parameter) for parameter in parameters)
        self.trainable_parameters = _count(parameter for parameter in parameters if parameter.requires_grad)
        self.non_trainable_parameters = _count(parameter for parameter in parameters if not parameter.requires_grad)
        self.total_parameters = self.trainable_parameters + self.non_trainable_parameters
        self.size_mb = (
            sum(
                parameter.numel() * parameter.element_size()
                for parameter in parameters
                if not _is_uninitialized(parameter)
            )
            / 1e6
        )
        return self.format()

    def format(self) -> str:
        """Return the latest summary as aligned text."""
        headers = ("", "name", "type", "params")
        cells = [(str(index), row.name, row.type, f"{row.parameters:,}") for index, row in enumerate(self.table)]
        widths = [max([len(header), *(len(cell[i]) for cell in cells)]) for i, header in enumerate(headers)]
        lines = []
        if cells:
            lines.append(_join(headers, widths))
            lines.append("-" * len(lines[0]))
            lines.extend(_join(cell, widths) for cell in cells)
            lines.append("-" * len(lines[0]))
        lines.append(f"{self.trainable_parameters:,} trainable parameters")
        lines.append(f"{self.non_trainable_parameters:,} non-trainable parameters")
        lines.append(f"{self.total_parameters:,} total parameters")
        lines.append(f"{self.size_mb:.3f} MB of parameters")
        if self.has_uninitialized_parameters:
            lines.append("The module has uninitialized lazy parameters, counted as 0 until its first forward.")
        return "\n".join(lines)

    @on("on_fit_start")
    def _log_summary(self, payload: Payload) -> None:
        if not getattr(payload.trainer, "is_global_zero", True):
            return
        module = payload.module
        if not isinstance(module, nn.Module):
            return
        log.info("Model summary of %s:\n%s", type(module).__name__, self.summarize(module))


def _is_uninitialized(parameter: Any) -> bool:
    return isinstance(parameter, nn.parameter.UninitializedParameter)


def _count(parameters: Any) -> int:
    return sum(parameter.numel() for parameter in parameters if not _is_uninitialized(parameter))


def _join(cells: tuple[str, ...], widths: list[int]) -> str:
    index, name, kind, count = cells
    return f"{index:>{widths[0]}}  {name:<{widths[1]}}  {kind:<{widths[2]}}  {count:>{widths[3]}}".rstrip()
