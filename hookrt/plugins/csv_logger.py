"""A logger that writes metrics to a CSV file and hyperparameters to a JSON file."""

from __future__ import annotations

import csv
import json
import os
from typing import Any

from hookrt.plugins.logger import Logger, NullExperiment

__all__ = ["CSVLogger", "MetricsTable"]

#: File names inside the run folder.
METRICS_FILE = "metrics.csv"
HPARAMS_FILE = "hparams.json"


class MetricsTable:
    """A ``metrics.csv`` file with one row per step, whose columns grow as new metrics appear.

    The columns are ``step``, then ``epoch`` when some row has it, then the
    other metric names sorted. A row with a new metric rewrites the file
    under the wider header, through a temporary file and a rename. Every
    other row is appended. Cells of metrics a row lacks stay empty.

    Args:
        path: the CSV file. An existing file is continued: its header is read back on first write.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._columns: list[str] | None = None

    @property
    def columns(self) -> list[str]:
        """The header of the file, read from disk on first use; empty while the file does not exist."""
        if self._columns is None:
            self._columns = self._read_header()
        return list(self._columns)

    def append(self, row: dict[str, Any]) -> None:
        """Write one row, widening the header first when the row has a metric the file lacks."""
        columns = self.columns
        if not set(row) <= set(columns):
            self._rewrite(_order_columns(set(columns) | set(row)))
        with open(self.path, "a", newline="", encoding="utf-8") as file:
            csv.DictWriter(file, fieldnames=self.columns, restval="").writerow(row)

    def rows(self) -> list[dict[str, str]]:
        """Read every row back as a dict of column name to cell text."""
        if not os.path.exists(self.path):
            return []
        with open(self.path, newline="", encoding="utf-8") as file:
            return list(csv.DictReader(file))

    def _read_header(self) -> list[str]:
        try:
            with open(self.path, newline="", encoding="utf-8") as file:
                return next(csv.reader(file), [])
        except FileNotFoundError:
            return []

    def _rewrite(self, columns: list[str]) -> None:
        existing = self.rows()
        temporary = f"{self.path}.tmp"
        with open(temporary, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(existing)
        os.replace(temporary, self.path)
        self._columns = columns


class CSVLogger(Logger):
    """Write metrics to ``metrics.csv`` and hyperparameters to ``hparams.json`` in the run folder.

    Args:
        save_dir: the folder that contains the experiment folder. None means the
            trainer's ``default_root_dir``.
        name: the experiment folder under ``save_dir``.
        version: the run's version number; None picks the next free one or continues a resumed run.
    """

    def __init__(
        self, save_dir: str | os.PathLike[str] | None = None, name: str = "csv_logs", version: int | None = None
    ) -> None:
        super().__init__(save_dir, name, version)
        self._table: MetricsTable | None = None

    @property
    def experiment(self) -> Any:
        """The `MetricsTable` of this run, or a `NullExperiment` on ranks other than 0."""
        if not self.is_writer():
            return NullExperiment()
        if self._table is None:
            os.makedirs(self.log_dir, exist_ok=True)
            self._table = MetricsTable(os.path.join(self.log_dir, METRICS_FILE))
        return self._table

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Append one row: ``step`` and the given metrics. An integral ``epoch`` is written as an int."""
        row: dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            number = float(value)
            row[key] = int(number) if key == "epoch" and number.is_integer() else number
        self.experiment.append(row)

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        """Write ``hparams.json``, replacing an earlier one; values JSON cannot represent are written as ``str()``."""
        os.makedirs(self.log_dir, exist_ok=True)
        path = os.path.join(self.log_dir, HPARAMS_FILE)
        temporary = f"{path}.tmp"
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(params, file, indent=2, sort_keys=True, default=str)
            file.write("\n")
        os.replace(temporary, path)

    def finalize(self, status: str) -> None:
        """Drop the table object. Every row is already on disk, because each write closes the file."""
        self._table = None


def _order_columns(names: set[str]) -> list[str]:
    leading = [name for name in ("step", "epoch") if name in names]
    return leading + sorted(names - set(leading))
