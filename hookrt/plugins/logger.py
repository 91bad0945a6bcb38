"""The base class of metric loggers: run folders, per-step buffering and rank-zero writes.

A logger hears ``on_log(metrics, step)`` and writes the values through its
backend. Each logger writes into ``{save_dir}/{experiment_name}/version_{N}``,
where N is the next free integer unless a version is given or restored from a
checkpoint, so a resumed run continues the folder it started in.
"""

from __future__ import annotations

import abc
import argparse
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from hookrt._errors import MisconfigurationError
from hookrt._events import ExceptionPayload, LogPayload, Payload, StagePayload
from hookrt._plugin import Plugin, on
from hookrt._rank import global_rank, rank_zero_warn

__all__ = ["Logger", "NullExperiment", "log_through_trainer", "module_hyperparameters"]

_VERSION_FOLDER = re.compile(r"version_(\d+)")


class NullExperiment:
    """The experiment object of a logger on a process other than global rank 0.

    Every attribute is a function that accepts any arguments and does nothing,
    so module code such as ``self.logger.experiment.add_image(...)`` runs
    unchanged on every rank while only rank 0 writes.
    """

    def __getattr__(self, name: str) -> Callable[..., None]:
        def ignore(*args: Any, **kwargs: Any) -> None:
            return None

        return ignore

    def __bool__(self) -> bool:
        return False


class Logger(Plugin, abc.ABC):
    """Base class of loggers. Subclasses implement the writes, this class decides when they happen.

    Metrics arrive through ``on_log`` and are buffered per step: values given
    for one step are merged (the last value of a metric wins) and written when
    a later step arrives or the run ends. Within one run (``setup`` to
    ``teardown``), a metric is written at most once per step, and the steps of
    one metric only increase. A value that would break this is dropped with a
    warning. Only the process with ``trainer.is_global_zero`` writes anything.

    Args:
        save_dir: the folder that contains the experiment folder. None means the
            trainer's ``default_root_dir``, read when the run starts.
        name: the experiment name, the folder under ``save_dir`` that holds
            one ``version_N`` folder per run.
        version: the run's version number; None picks the next free number, or
            the number restored from a checkpoint when a run resumes.

    Raises:
        MisconfigurationError: ``name`` is empty or ``version`` is not a non-negative int.
    """

    critical = False

    def __init__(self, save_dir: str | os.PathLike[str] | None, name: str, version: int | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise MisconfigurationError(
                f"{type(self).__name__}(name={name!r}) is invalid: name must be a non-empty string, "
                "the experiment folder under save_dir."
            )
        if os.path.isabs(name) or ".." in re.split(r"[\\/]", name):
            raise MisconfigurationError(
                f"{type(self).__name__}(name={name!r}) is invalid: name must be a folder inside save_dir, "
                "without '..' parts and not an absolute path. Give the folder that should contain the "
                "experiment as save_dir."
            )
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
            raise MisconfigurationError(
                f"{type(self).__name__}(version={version!r}) is invalid: version must be a non-negative int, "
                "or None to use the next free version number."
            )
        self._save_dir = os.fspath(save_dir) if save_dir is not None else None
        self._experiment_name = name
        self._version_argument = version
        self._version: int | None = version
        self._resumed = False
        self._trainer: Any = None
        self._pending: dict[str, float] = {}
        self._pending_step: int | None = None
        self._last_written_step: dict[str, int] = {}
        self._dropped_tags: set[str] = set()
        self._finalized = False
        self.state_key = f"{type(self).__name__}(save_dir={self._save_dir!r}, name={name!r})"

    # ------------------------------------------------------------------ backend interface

    @abc.abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Write metric values at a global step, at once and without buffering."""

    @abc.abstractmethod
    def log_hyperparams(self, params: dict[str, Any]) -> None:
        """Write the run's hyperparameters."""

    @abc.abstractmethod
    def finalize(self, status: str) -> None:
        """Flush and close what the backend keeps open.

        Args:
            status: ``"success"``, ``"failed"`` or ``"interrupted"``.
        """

    @property
    @abc.abstractmethod
    def experiment(self) -> Any:
        """The backend's writer object, created on first use."""

    # ------------------------------------------------------------------ run folder

    @property
    def experiment_name(self) -> str:
        """The experiment folder under ``save_dir``.

        It is not called ``name``, because ``Plugin.name`` identifies the plugin
        on the bus (in ``before=``/``after=`` and in error messages).
        """
        return self._experiment_name

    @property
    def save_dir(self) -> str:
        """The folder that contains the experiment folder.

        The ``save_dir`` argument when given, otherwise the trainer's
        ``default_root_dir``, or the working directory before a run has started.
        """
        if self._save_dir is not None:
            return self._save_dir
        root = getattr(self._trainer, "default_root_dir", None)
        return os.fspath(root) if root is not None else os.getcwd()

    @property
    def version(self) -> int:
        """The run's version number, picked on first access when not given or restored.

        The pick is the smallest number above every existing ``version_N``
        folder of the experiment, and reading it creates no folder. Before a run
        has started, a logger without ``save_dir`` does not keep its pick,
        because the trainer's ``default_root_dir`` may point elsewhere.
        """
        if self._version is not None:
            return self._version
        version = self._next_free_version()
        if self._save_dir is not None or self._trainer is not None:
            self._version = version
        return version

    @property
    def log_dir(self) -> str:
        """The run folder, ``{save_dir}/{experiment_name}/version_{version}``."""
        return os.path.join(self.save_dir, self._experiment_name, f"version_{self.version}")

    def _next_free_version(self) -> int:
        root = os.path.join(self.save_dir, self._experiment_name)
        try:
            entries = os.listdir(root)
        except FileNotFoundError:
            return 0
        numbers = [
            int(match.group(1))
            for entry in entries
            if (match := _VERSION_FOLDER.fullmatch(entry)) and os.path.isdir(os.path.join(root, entry))
        ]
        return max(numbers, default=-1) + 1

    def is_writer(self) -> bool:
        """Return whether this process writes: ``trainer.is_global_zero``, or global rank 0 before a run."""
        if self._trainer is not None:
            return bool(getattr(self._trainer, "is_global_zero", True))
        return global_rank() == 0

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """Return the version number once picked, so that a resumed run writes into the same folder."""
        return {} if self._version is None else {"version": self._version}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the saved version, unless a version was given as an argument."""
        version = state_dict.get("version")
        if isinstance(version, int) and self._version_argument is None:
            self._version = version
            self._resumed = True

    # ------------------------------------------------------------------ event handlers

    @on("setup")
    def _attach_trainer(self, payload: StagePayload) -> None:
        self._trainer = payload.trainer
        self._finalized = False
        # Steps are checked within one run (fit, validate, test): a validate() after fit() logs its
        # metrics at the step where fit ended, which is not a repeat within either run.
        self._last_written_step = {}
        self._dropped_tags = set()

    @on("on_fit_start")
    def _start_fit(self, payload: Payload) -> None:
        self._trainer = payload.trainer
        if not self.is_writer():
            return
        self._begin_fit(payload)
        params = module_hyperparameters(payload.module)
        if params:
            self.log_hyperparams(params)

    @on("on_log")
    def _buffer_metrics(self, payload: LogPayload) -> None:
        if self._trainer is None:
            self._trainer = payload.trainer
        if not self.is_writer():
            return
        step = int(payload.step)
        if self._pending and step != self._pending_step:
            self._flush_pending()
        self._pending_step = step
        for tag, value in payload.metrics.items():
            self._pending[tag] = float(value)

    @on("on_exception")
    def _finish_failed(self, payload: ExceptionPayload) -> None:
        self._finish("interrupted" if isinstance(payload.exception, KeyboardInterrupt) else "failed")

    @on("teardown")
    def _finish_teardown(self, payload: StagePayload) -> None:
        self._finish("success")

    def _begin_fit(self, payload: Payload) -> None:
        """Prepare the backend for a fit, before the hyperparameters are written. Does nothing by default."""

    def _finish(self, status: str) -> None:
        if self._finalized:
            return
        self._finalized = True
        if not self.is_writer():
            return
        self._flush_pending()
        self.finalize(status)

    def _flush_pending(self) -> None:
        """Write the buffered step, leaving out metrics that would repeat or go back in steps."""
        if not self._pending or self._pending_step is None:
            return
        step, metrics = self._pending_step, self._pending
        self._pending = {}
        self._pending_step = None
        fresh: dict[str, float] = {}
        for tag, value in metrics.items():
            last = self._last_written_step.get(tag)
            if last is not None and step <= last:
                if tag not in self._dropped_tags:
                    self._dropped_tags.add(tag)
                    rank_zero_warn(
                        f"{type(self).__name__} dropped metric {tag!r} at step {step} because it already wrote that "
                        f"metric at step {last}. A logger writes each metric once per step, with increasing steps, "
                        "so log each metric at a later global step than its previous value. Later drops of this "
                        "metric in this run are not reported."
                    )
                continue
            self._last_written_step[tag] = step
            fresh[tag] = value
        if fresh:
            self.log_metrics(fresh, step)


def module_hyperparameters(module: Any) -> dict[str, Any]:
    """Return the module's ``hparams`` as a plain dict, empty when it has none.

    Accepts a mapping (the current style) or an ``argparse.Namespace`` (the
    style of the 0.5 era, where modules assign ``self.hparams = args``).
    """
    params = getattr(module, "hparams", None)
    if isinstance(params, Mapping):
        return dict(params)
    if isinstance(params, argparse.Namespace):
        return dict(vars(params))
    return {}


def log_through_trainer(trainer: Any, metrics: dict[str, float], step: int) -> None:
    """Hand metrics from a plugin to the loggers at a global step.

    Calls ``trainer.log_metrics``, which records the values and emits
    ``on_log``. A trainer without that method gets the ``on_log`` emit directly.
    Non-finite values are passed on unchanged, because loggers can record them.
    """
    values = {name: float(value) for name, value in metrics.items()}
    if not values:
        return
    log_metrics = getattr(trainer, "log_metrics", None)
    if callable(log_metrics):
        log_metrics(values, step)
        return
    trainer.bus.emit("on_log", metrics=values, step=step)
