"""A logger that writes TensorBoard event files through tensorboardX.

tensorboardX is imported when the first writer is created, not when this
module is imported, so building the default plugin stack stays cheap.
"""

from __future__ import annotations

import functools
import itertools
import numbers
import os
import time
from typing import Any

import torch

from hookrt._errors import MisconfigurationError
from hookrt._events import Payload
from hookrt._rank import rank_zero_warn
from hookrt.plugins.logger import Logger, NullExperiment

__all__ = ["TensorBoardLogger"]

#: Session status names of the TensorBoard HParams plugin, by the status given to `finalize`.
#: Numbers the writers this process creates, for their file name suffix. tensorboardX 2.6 names an event
#: file after the second it was created and opens it with mode "wb". Without a distinct suffix, a writer
#: reopened within the same second (a test run right after fit, a resumed run) would overwrite the earlier file.
_WRITER_NUMBERS = itertools.count()

_SESSION_STATUS = {"success": "STATUS_SUCCESS", "failed": "STATUS_FAILURE", "interrupted": "STATUS_FAILURE"}


class TensorBoardLogger(Logger):
    """Write scalars and hyperparameters as TensorBoard event files.

    The writer is a ``tensorboardX.SummaryWriter`` in ``log_dir``, created on
    first use and exposed as `experiment`, so module code can add images,
    histograms or text itself. Hyperparameters go to the HParams dashboard as
    a session start record; TensorBoard discovers the metric columns from the
    scalars. A resumed run writes into its old folder with ``purge_step`` set,
    so TensorBoard hides what the interrupted run logged after the checkpoint.

    Args:
        save_dir: the folder that contains the experiment folder. None means the
            trainer's ``default_root_dir``.
        name: the experiment folder under ``save_dir``.
        version: the run's version number; None picks the next free one or continues a resumed run.
        log_graph: write the module's graph at the start of fit, traced from
            ``module.example_input_array`` (needs the ``tensorboard`` package,
            which ``torch.utils.tensorboard`` uses to build the graph).
        flush_secs: how often, in seconds, the writer flushes pending events to disk.

    Raises:
        MisconfigurationError: ``flush_secs`` is not a positive number, or ``name``/``version`` is invalid.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str] | None = None,
        name: str = "hookrt_logs",
        version: int | None = None,
        log_graph: bool = False,
        flush_secs: float = 120,
    ) -> None:
        super().__init__(save_dir, name, version)
        if isinstance(flush_secs, bool) or not isinstance(flush_secs, (int, float)) or not flush_secs > 0:
            raise MisconfigurationError(
                f"TensorBoardLogger(flush_secs={flush_secs!r}) is invalid: flush_secs must be a positive number "
                "of seconds between flushes to disk."
            )
        self.log_graph = bool(log_graph)
        self.flush_secs = flush_secs
        self._writer: Any = None
        #: tensorboardX's synchronous writer of the run's event file, or None to go through its queue.
        self._events: Any = None
        self._purge_step: int | None = None
        self._session_started = False

    @property
    def experiment(self) -> Any:
        """The ``tensorboardX.SummaryWriter`` of this run, or a `NullExperiment` on ranks other than 0."""
        if not self.is_writer():
            return NullExperiment()
        if self._writer is None:
            from tensorboardX import SummaryWriter

            os.makedirs(self.log_dir, exist_ok=True)
            self._writer = SummaryWriter(
                logdir=self.log_dir,
                flush_secs=self.flush_secs,
                filename_suffix=f".{os.getpid()}.{next(_WRITER_NUMBERS):04d}",
            )
            self._events = _synchronous_events(self._writer)
            if self._purge_step is not None:
                self._purge(self._purge_step)
            # Only the first writer of a resumed run purges, because a later one would hide this run's events.
            self._purge_step = None
        return self._writer

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Write the metrics as scalars at ``step``, all in one event.

        One event per step instead of one per metric: the writer serializes
        and checksums each event, so this is the cheaper form, and TensorBoard
        reads every value of the event as its own scalar.
        """
        if not metrics:
            return
        event_class, summary_class = _scalar_event_classes()
        values = [summary_class.Value(tag=tag, simple_value=float(value)) for tag, value in metrics.items()]
        self._add_event(event_class(summary=summary_class(value=values), step=step))

    def _add_event(self, event: Any) -> None:
        """Write an event to the run's file: directly when tensorboardX allows it, else through its queue."""
        writer = self.experiment
        if self._events is None:
            writer.file_writer.add_event(event)
            return
        event.wall_time = time.time()
        self._events.write_event(event)

    def _purge(self, step: int) -> None:
        """Write the marker that makes TensorBoard hide what an interrupted run logged at ``step`` and later.

        The same two events that tensorboardX writes for ``purge_step``; written
        here so that they go through the same path as the scalars and precede them.
        """
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self._add_event(Event(step=step, file_version="brain.Event:2"))
        self._add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        """Write the hyperparameters as an HParams session start record.

        Numbers, strings and bools are kept as they are, and None is left out.
        Other values (lists, nested dicts, tensors with more than one element)
        are written as their ``str()``.
        """
        from tensorboardX.summary import hparams

        values = {key: _hparam_value(value) for key, value in params.items() if value is not None}
        _, session_start, _ = hparams(values, {})
        self.experiment.file_writer.add_summary(session_start)
        self._session_started = True

    def finalize(self, status: str) -> None:
        """Record the session's end status for the HParams dashboard, then flush and close the writer."""
        if self._writer is None:
            return
        if self._session_started:
            self._writer.file_writer.add_summary(_session_end_summary(status))
            self._session_started = False
        self._writer.flush()
        self._writer.close()
        self._writer = None
        self._events = None

    def _begin_fit(self, payload: Payload) -> None:
        if self._resumed and self._writer is None:
            self._purge_step = int(getattr(payload.trainer, "global_step", 0)) + 1
        if self.log_graph:
            self._write_graph(payload.module)

    def _write_graph(self, module: Any) -> None:
        example = getattr(module, "example_input_array", None)
        if example is None:
            rank_zero_warn(
                "TensorBoardLogger(log_graph=True) cannot draw the graph because the module has no "
                "example_input_array. Set module.example_input_array to an input batch, or pass log_graph=False."
            )
            return
        try:
            from torch.utils.tensorboard._pytorch_graph import graph  # noqa: F401 - checks that tensorboard exists
        except ImportError:
            rank_zero_warn(
                "TensorBoardLogger(log_graph=True) cannot draw the graph because the 'tensorboard' package is not "
                "installed (tensorboardX traces graphs through torch.utils.tensorboard). Install tensorboard, "
                "or pass log_graph=False."
            )
            return
        device = next((parameter.device for parameter in module.parameters()), torch.device("cpu"))
        example = _to_device(example, device)
        was_training = module.training
        # Eval mode and no_grad keep the trace from updating batch-norm statistics or consuming dropout randomness.
        module.eval()
        try:
            with torch.no_grad():
                self.experiment.add_graph(module, example)
        except (RuntimeError, TypeError, ValueError) as error:
            rank_zero_warn(
                f"TensorBoardLogger(log_graph=True) could not trace the module with its example_input_array: "
                f"{error}. Fix the example input, or pass log_graph=False."
            )
        finally:
            module.train(was_training)


@functools.cache
def _scalar_event_classes() -> tuple[Any, Any]:
    """Return tensorboardX's ``Event`` and ``Summary`` message classes, imported on first use."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.summary_pb2 import Summary

    return Event, Summary


def _synchronous_events(writer: Any) -> Any:
    """Return the synchronous writer behind a ``SummaryWriter``'s event file, or None when it has none.

    tensorboardX hands every event to a background thread through a
    ``multiprocessing.Queue``, which pickles it and passes it through a pipe
    even within one process. In an ablation of the full stack of
    benchmarks/stack.py, that made TensorBoard logging every 50 steps cost
    about 4% of the tiny MLP's step time.
    Writing the event directly, on the training thread, into the same file
    (tensorboardX's ``EventsWriter`` serializes writes with a lock) is much
    cheaper. The attribute is private to tensorboardX 2.6, so any other
    layout falls back to the queue.
    """
    events = getattr(getattr(getattr(writer, "file_writer", None), "event_writer", None), "_ev_writer", None)
    return events if callable(getattr(events, "write_event", None)) else None


def _hparam_value(value: Any) -> bool | int | float | str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, numbers.Real):
        return float(value)
    return str(value)


def _to_device(example: Any, device: torch.device) -> Any:
    if isinstance(example, torch.Tensor):
        return example.to(device)
    if isinstance(example, (tuple, list)):
        return type(example)(_to_device(item, device) for item in example)
    return example


def _session_end_summary(status: str) -> Any:
    from tensorboardX.proto.api_pb2 import Status
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata

    end = SessionEndInfo(status=Status.Value(_SESSION_STATUS.get(status, "STATUS_UNKNOWN")))
    content = HParamsPluginData(session_end_info=end, version=0)
    metadata = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(plugin_name="hparams", content=content.SerializeToString())
    )
    return Summary(value=[Summary.Value(tag="_hparams_/session_end_info", metadata=metadata)])
