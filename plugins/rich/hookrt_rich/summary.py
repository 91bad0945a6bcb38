"""`RichModelSummary`: the module's layers and parameter counts as a Rich table when fit starts."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from torch import nn

import hookrt
from hookrt import MisconfigurationError
from hookrt.plugins.summary import ModelSummary

__all__ = ["RichModelSummary"]


class RichModelSummary(hookrt.Plugin):
    """Print a table of the module's layers, parameter counts and parameter size when fit starts.

    The numbers are those of hookrt's built-in ``ModelSummary``: one row per
    submodule down to ``max_depth`` levels (name, class, parameter count with
    its children), then the trainable, non-trainable and total parameter counts
    and the parameters' size in MB (10**6 bytes). Only global rank 0 prints.

    A Trainer given this plugin leaves its built-in summary out, so the table shows once.

    Args:
        max_depth: how many levels of submodules to list; 0 lists none (totals only)
            and -1 lists every level.
        console: the Rich console to print on; None prints to standard output.

    Raises:
        MisconfigurationError: ``max_depth`` is not an int >= -1.
    """

    # Stands in for the built-in ModelSummary, which the Trainer then leaves out of its default stack.
    replaces_default = "model_summary"

    critical = False

    def __init__(self, max_depth: int = 1, console: Console | None = None) -> None:
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < -1:
            raise MisconfigurationError(
                f"RichModelSummary(max_depth={max_depth!r}) is invalid: max_depth must be an int, the number of "
                "submodule levels to list (0 for totals only, -1 for every level)."
            )
        self.max_depth = max_depth
        self.console = console
        #: The counts of the latest summary: ``table``, ``total_parameters``, ``size_mb`` and the rest.
        self.summary = ModelSummary(max_depth=max_depth)

    def render(self, module: nn.Module) -> Table:
        """Count the parameters of ``module`` into ``summary`` and return the Rich table that shows them."""
        summary = self.summary
        summary.summarize(module)
        table = Table(title=f"{type(module).__name__} summary", title_justify="left")
        table.add_column("", justify="right", style="dim")
        table.add_column("Name")
        table.add_column("Type")
        table.add_column("Params", justify="right")
        for index, row in enumerate(summary.table):
            table.add_row(str(index), row.name, row.type, f"{row.parameters:,}")
        table.add_section()
        table.add_row("", "Trainable params", "", f"{summary.trainable_parameters:,}")
        table.add_row("", "Non-trainable params", "", f"{summary.non_trainable_parameters:,}")
        table.add_row("", "Total params", "", f"{summary.total_parameters:,}")
        table.add_row("", "Size (MB)", "", f"{summary.size_mb:.3f}")
        if summary.has_uninitialized_parameters:
            table.caption = "Lazy parameters not yet initialized count as 0 until the module's first forward."
        return table

    @hookrt.on("on_fit_start")
    def _print_summary(self, payload: Any) -> None:
        if not getattr(payload.trainer, "is_global_zero", True) or not isinstance(payload.module, nn.Module):
            return
        console = self.console if self.console is not None else Console()
        console.print(self.render(payload.module))
