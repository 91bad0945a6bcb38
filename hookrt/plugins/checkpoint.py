"""`ModelCheckpoint`: save checkpoints during fit and keep the best k of them."""

from __future__ import annotations

import logging
import math
import os
import re
import string
import sys
from collections.abc import Mapping
from typing import Any

import torch

from hookrt._errors import MisconfigurationError
from hookrt._events import BatchEndPayload, BatchPayload, EpochPayload, EvalPayload, Payload, StagePayload
from hookrt._plugin import Plugin, on
from hookrt._rank import rank_zero_warn

__all__ = ["ModelCheckpoint"]

logger = logging.getLogger(__name__)

#: Order of every handler: after the module hooks and the other plugins on the same event,
#: so the metrics of the moment are logged before a save reads them.
CHECKPOINT_ORDER = 1000
#: Extension added to every file name.
FILE_EXTENSION = ".ckpt"
#: Name, without extension, of the file that ``save_last=True`` rewrites at each save.
LAST_NAME = "last"
#: File name template used when ``filename`` is None.
DEFAULT_FILENAME = "epoch={epoch}-step={step}"

_MODES = ("min", "max")
#: Two or more dots in a row; replaced in formatted names so that no ".." component can appear.
_DOT_RUN = re.compile(r"\.{2,}")


class ModelCheckpoint(Plugin):
    """Save checkpoints during ``fit`` and keep the best ``save_top_k`` of them.

    When it saves:

    - With ``monitor``: after each validation run of fit, sanity validation
      excluded. A monitored metric missing after validation is an error.
      Also at the end of an epoch that did not validate, when the monitored
      metric is there and is a training metric. A validation metric is not
      scored there, because its value would be the stale one of the last
      validation run.
    - Without ``monitor``: at the end of every ``every_n_epochs``-th epoch.
    - With ``every_n_train_steps``: at the end of each batch whose optimizer steps
      reach a multiple of it. This replaces the epoch schedule above.

    A save moment never repeats a global step, so resuming a finished run writes
    nothing. Writes go through ``trainer.save_checkpoint``, so a save requested
    from a handler contains every plugin's state after that event, and only global
    rank 0 writes or deletes files. Every rank keeps the same bookkeeping, as
    long as the monitored value is the same on every rank (log it with
    ``sync_dist=True``).

    Which files stay: with ``monitor``, the ``save_top_k`` best scores under
    ``mode``. A new score must be strictly better than the worst kept one to
    displace it, so on ties the earlier file stays, and NaN or infinite scores
    are never written as top-k files. Without ``monitor``, the latest
    ``save_top_k`` files stay, and the scores in ``best_k_models`` are the
    global steps of the saves. A file that leaves the top k is deleted after
    the new one is written; files this plugin did not write are never deleted.

    File names come from ``filename``, a `str.format` template with ``{epoch}``
    (counted from 0), ``{step}`` (the global step) and any metric of
    ``trainer.callback_metrics`` by its name, with format specs:
    ``"{epoch}-{val_loss:.2f}"`` gives ``0-0.25.ckpt``. Names may contain
    ``/``. Path separators and runs of dots in the formatted name become
    ``_``, so no metric can place a file outside ``dirpath``. A name that an
    earlier save or another file already uses gets ``-v1``, ``-v2``, ...

    Args:
        dirpath: the folder of the files; ``{trainer.default_root_dir}/checkpoints``
            when None, resolved when fit starts.
        filename: the file name template, without extension; ``"epoch={epoch}-step={step}"`` when None.
        monitor: the metric that ranks the files, or None to keep the latest ones.
        mode: ``"min"`` or ``"max"``: whether a lower or a higher ``monitor`` value is better.
        save_top_k: how many files to keep; -1 keeps every file and 0 writes none
            (``last.ckpt`` is still written when ``save_last`` is set).
        save_last: also write ``last.ckpt`` at each save moment.
        every_n_train_steps: save every this many optimizer steps; None or 0 for no step schedule.
        every_n_epochs: save every this many epochs; None or 0 for no epoch schedule.
        async_save: write the files from a background thread (``trainer.save_checkpoint(path,
            asynchronous=True)``), so training stalls only while the state is copied. A file that
            leaves the top k is deleted after the new file's write has succeeded.

    Raises:
        MisconfigurationError: an argument is invalid, or ``every_n_train_steps`` is
            combined with an ``every_n_epochs`` other than 1.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int = 1,
        save_last: bool = False,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = 1,
        async_save: bool = False,
    ) -> None:
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise MisconfigurationError(
                f"ModelCheckpoint(monitor={monitor!r}) is invalid: give the name of a logged metric, or None "
                "to keep the latest checkpoints."
            )
        if mode not in _MODES:
            raise MisconfigurationError(
                f"ModelCheckpoint(mode={mode!r}) is invalid: use 'min' when a lower monitored value is better, "
                "or 'max' when a higher one is."
            )
        if isinstance(save_top_k, bool) or not isinstance(save_top_k, int) or save_top_k < -1:
            raise MisconfigurationError(
                f"ModelCheckpoint(save_top_k={save_top_k!r}) is invalid: use -1 to keep every file, 0 to keep "
                "none, or the number of files to keep."
            )
        steps = _check_interval("every_n_train_steps", every_n_train_steps)
        epochs = _check_interval("every_n_epochs", every_n_epochs)
        if steps is not None and epochs not in (None, 1):
            raise MisconfigurationError(
                f"ModelCheckpoint(every_n_train_steps={steps}, every_n_epochs={epochs}) sets two save "
                "schedules. every_n_train_steps replaces the epoch schedule; pass only one of them."
            )
        template = DEFAULT_FILENAME if filename is None else str(filename)
        if template.endswith(FILE_EXTENSION):
            template = template[: -len(FILE_EXTENSION)]
        self._template_fields = _template_fields(template)

        self._dirpath_argument = None if dirpath is None else os.path.abspath(os.path.expanduser(os.fspath(dirpath)))
        #: The folder of the files; None until fit starts when no ``dirpath`` was given.
        self.dirpath: str | None = self._dirpath_argument
        self.filename = template
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.save_last = bool(save_last)
        #: The bus of the fit in progress, so that setting `every_n_train_steps` can wake its handlers.
        self._bus: Any = None
        self._every_n_train_steps = steps
        #: The epoch schedule in effect: None when ``every_n_train_steps`` replaces it.
        self.every_n_epochs = epochs if steps is None else None
        self.async_save = bool(async_save)

        #: The file with the best score (the latest file without ``monitor``); "" before the first save.
        self.best_model_path = ""
        #: The best monitored value kept, or None (always None without ``monitor``).
        self.best_model_score: torch.Tensor | None = None
        #: Each kept file and its score, in the order the files were written.
        self.best_k_models: dict[str, torch.Tensor] = {}
        #: The file that ``save_last`` rewrites; "" before the first save.
        self.last_model_path = ""

        self._last_saved_step = -1
        self._validated_epoch = -1
        self._monitor_from_validation = False
        self._monitor_before_validation: torch.Tensor | None = None
        self._step_at_batch_start = 0
        self._fitting = False
        self._skipped_missing_monitor = False
        #: The bookkeeping before the save moment whose files are not written yet, or None.
        self._before_unwritten_save: dict[str, Any] | None = None
        self.state_key = (
            f"ModelCheckpoint{{monitor={monitor!r}, mode={mode!r}, every_n_train_steps={steps!r}, "
            f"every_n_epochs={epochs!r}}}"
        )

    # ------------------------------------------------------------------ event handlers

    @property
    def every_n_train_steps(self) -> int | None:
        """The optimizer steps between saves, or None without a step schedule.

        Setting it during fit, for example from another plugin's handler, takes
        effect from the next batch on. None and 0 turn the step schedule off.
        """
        return self._every_n_train_steps

    @every_n_train_steps.setter
    def every_n_train_steps(self, value: int | None) -> None:
        self._every_n_train_steps = _check_interval("every_n_train_steps", value)
        if self._every_n_train_steps is not None and self._bus is not None:
            for name in _STEP_HANDLERS:
                self._bus.wake(self, name)

    @on("setup", order=CHECKPOINT_ORDER)
    def _start_run(self, payload: StagePayload) -> None:
        self._fitting = payload.stage == "fit"
        self._bus = getattr(payload.trainer, "bus", None)
        if self._fitting:
            self.dirpath = self._dirpath_argument or os.path.join(payload.trainer.default_root_dir, "checkpoints")
            argument = "dirpath" if self._dirpath_argument else "the default dirpath, under default_root_dir"
            check_folder(self.dirpath, f"ModelCheckpoint {argument} {self.dirpath!r}")

    def idle_handlers(self, trainer: Any) -> tuple[str, ...]:
        """Return the step-schedule handlers outside fit or without ``every_n_train_steps``, where they do nothing."""
        if self._fitting and self.every_n_train_steps is not None:
            return ()
        return _STEP_HANDLERS

    @on("teardown", order=CHECKPOINT_ORDER)
    def _end_run(self, payload: StagePayload) -> None:
        self._fitting = False
        self._bus = None

    @on("on_validation_start", order=CHECKPOINT_ORDER)
    def _note_monitor_before_validation(self, payload: EvalPayload) -> None:
        if self.monitor is not None and self._fitting and not payload.sanity_checking:
            self._monitor_before_validation = payload.trainer.callback_metrics.get(self.monitor)

    @on("on_validation_end", order=CHECKPOINT_ORDER)
    def _save_after_validation(self, payload: EvalPayload) -> None:
        if not self._fitting or payload.sanity_checking:
            return
        trainer = payload.trainer
        self._validated_epoch = trainer.current_epoch
        if self.monitor is None:
            return
        metrics = trainer.callback_metrics
        current = metrics.get(self.monitor)
        if current is not None and not _same_value(current, self._monitor_before_validation):
            self._monitor_from_validation = True
        if not self._epoch_due(trainer.current_epoch):
            return
        if current is None:
            raise MisconfigurationError(self._missing_monitor_message(metrics, "after validation"))
        self._save(trainer, metrics)

    @on("on_epoch_end", order=CHECKPOINT_ORDER)
    def _save_at_epoch_end(self, payload: EpochPayload) -> None:
        if not self._fitting or not self._epoch_due(payload.epoch):
            return
        trainer = payload.trainer
        if getattr(trainer, "_forced_stop", False):
            # A forced stop (a signal) wrote its own checkpoint, which the next run resumes from. A file saved
            # after it would be unknown to the resumed ModelCheckpoint and never replaced or deleted.
            logger.debug("ModelCheckpoint skips the epoch-end save after a forced stop")
            return
        metrics = trainer.callback_metrics
        if self.monitor is not None:
            if self._validated_epoch == payload.epoch or self._monitor_from_validation:
                return  # scored at validation end, or a validation metric that this epoch did not update
            if self.monitor not in metrics:
                self._skipped_missing_monitor = True
                return
        self._save(trainer, metrics)

    @on("on_batch_start", order=CHECKPOINT_ORDER)
    def _note_step_at_batch_start(self, payload: BatchPayload) -> None:
        if self.every_n_train_steps is not None:
            self._step_at_batch_start = payload.trainer.global_step

    @on("on_batch_end", order=CHECKPOINT_ORDER)
    def _save_on_step_schedule(self, payload: BatchEndPayload) -> None:
        every = self.every_n_train_steps
        if every is None or not self._fitting:
            return
        trainer = payload.trainer
        # A batch with several optimizers adds several steps, so test whether a multiple was reached
        # or passed during this batch rather than whether the step count is one.
        if trainer.global_step // every <= self._step_at_batch_start // every:
            return
        metrics = trainer.callback_metrics
        if self.monitor is not None and self.monitor not in metrics:
            if self._validated_epoch >= 0:
                raise MisconfigurationError(self._missing_monitor_message(metrics, "at a step save"))
            self._skipped_missing_monitor = True  # a validation metric before the first validation
            return
        self._save(trainer, metrics)

    @on("on_train_end", order=CHECKPOINT_ORDER)
    def _warn_if_nothing_saved(self, payload: Payload) -> None:
        if self._skipped_missing_monitor and self._last_saved_step < 0:
            rank_zero_warn(
                f"ModelCheckpoint(monitor={self.monitor!r}) saved no checkpoint: the metric was never in "
                "trainer.callback_metrics at a save moment. Log it with self.log, or set monitor=None to "
                "keep the latest checkpoints."
            )

    # ------------------------------------------------------------------ saving

    def _epoch_due(self, epoch: int) -> bool:
        every = self.every_n_epochs
        return every is not None and (epoch + 1) % every == 0

    def _save(self, trainer: Any, metrics: Mapping[str, torch.Tensor]) -> None:
        """Run one save moment: the top-k file, then ``last.ckpt``."""
        step = int(trainer.global_step)
        if step == self._last_saved_step:
            logger.debug("ModelCheckpoint already saved at step %d; skipping this save moment.", step)
            return
        # The bookkeeping changes before the writes, so that each file records itself in the state it contains.
        # If a write fails or is dropped, the run fails, and on_exception puts the previous bookkeeping back.
        self._before_unwritten_save = self._bookkeeping()
        self._last_saved_step = step
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        if self.save_top_k != 0:
            self._save_top_k(trainer, metrics)
        if self.save_last:
            self._save_last(trainer)
        trainer.bus.after_dispatch(self._saves_written)

    def _bookkeeping(self) -> dict[str, Any]:
        return {
            "best_model_path": self.best_model_path,
            "best_model_score": self.best_model_score,
            "best_k_models": dict(self.best_k_models),
            "last_model_path": self.last_model_path,
            "last_saved_step": self._last_saved_step,
        }

    def _saves_written(self) -> None:
        # NOTE: with async_save this runs once the writes are queued, so a background write that fails later
        # stays recorded.
        self._before_unwritten_save = None

    @on("on_exception", order=CHECKPOINT_ORDER)
    def _forget_unwritten_save(self, payload: Payload) -> None:
        previous, self._before_unwritten_save = self._before_unwritten_save, None
        if previous is None:
            return
        logger.info("ModelCheckpoint: the run failed before the save at step %d was written, so that save is "
                    "not recorded.", self._last_saved_step)
        self.best_model_path = previous["best_model_path"]
        self.best_model_score = previous["best_model_score"]
        self.best_k_models = previous["best_k_models"]
        self.last_model_path = previous["last_model_path"]
        self._last_saved_step = previous["last_saved_step"]

    def _save_top_k(self, trainer: Any, metrics: Mapping[str, torch.Tensor]) -> None:
        step = int(trainer.global_step)
        if self.monitor is None:
            score = torch.tensor(float(step))
        else:
            score = metrics[self.monitor].detach().to("cpu").clone()
            if not bool(torch.isfinite(score).all()):
                logger.info(
                    "ModelCheckpoint(monitor=%r): the value %s at step %d is not finite, so no top-k file "
                    "is written.", self.monitor, float(score), step,
                )
                return
        enters, displaced = self._place_in_top_k(score)
        if not enters:
            logger.debug("ModelCheckpoint: %s at step %d does not enter the top %d.", float(score), step,
                         self.save_top_k)
            return
        name = self._format_name(int(trainer.current_epoch), step, metrics)
        path = self._free_path(name, keep=displaced)
        self._write(trainer, path)
        if displaced is not None:
            del self.best_k_models[displaced]
            if displaced != path:
                self._remove_after_write(trainer, displaced)
        self.best_k_models[path] = score
        self._update_best()

    def _save_last(self, trainer: Any) -> None:
        path = self._free_path(LAST_NAME, keep=self.last_model_path or None)
        self._write(trainer, path)
        self.last_model_path = path

    def _better(self, score: torch.Tensor, other: torch.Tensor) -> bool:
        """Return whether ``score`` is strictly better than ``other``. Without ``monitor``, later steps win."""
        if self.mode == "max" or self.monitor is None:
            return float(score) > float(other)
        return float(score) < float(other)

    def _place_in_top_k(self, score: torch.Tensor) -> tuple[bool, str | None]:
        """Return whether ``score`` enters the top k, and the kept file it displaces (or None)."""
        if self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k:
            return True, None
        worst: str | None = None
        for path, kept_score in self.best_k_models.items():
            # Among equally bad files the latest one is the worst, so on ties the earlier file stays.
            if worst is None or not self._better(kept_score, self.best_k_models[worst]):
                worst = path
        assert worst is not None  # save_top_k >= 1 here, so best_k_models is not empty
        if self._better(score, self.best_k_models[worst]):
            return True, worst
        return False, None

    def _update_best(self) -> None:
        best: str | None = None
        for path, score in self.best_k_models.items():
            if best is None or self._better(score, self.best_k_models[best]):
                best = path
        self.best_model_path = best or ""
        if self.monitor is not None and best is not None:
            self.best_model_score = self.best_k_models[best]

    def _free_path(self, name: str, keep: str | None) -> str:
        """Return ``dirpath/name.ckpt``, versioned with ``-vN`` until no other file or kept save uses it.

        ``keep`` is a file of this plugin that the new one may replace in place.
        """
        assert self.dirpath is not None  # set by _save before any path is chosen
        version = 0
        while True:
            stem = name if version == 0 else f"{name}-v{version}"
            path = os.path.join(self.dirpath, stem + FILE_EXTENSION)
            if path == keep or not self._path_taken(path):
                return path
            version += 1

    def _path_taken(self, path: str) -> bool:
        return path in self.best_k_models or path == self.last_model_path or _exists_on_rank_zero(path)

    def _write(self, trainer: Any, path: str) -> None:
        if self.async_save:
            trainer.save_checkpoint(path, asynchronous=True)
        else:
            trainer.save_checkpoint(path)

    def _remove_after_write(self, trainer: Any, path: str) -> None:
        """Delete ``path`` once the pending write has run: deferred like it, so the new file is complete first."""
        if not self.async_save:
            trainer.bus.after_dispatch(lambda: self._remove_file(trainer, path))
            return
        from hookrt._async_save import writer_for

        def remove_when_written() -> None:
            writer_for(trainer).after_write(lambda: self._remove_file(trainer, path))

        trainer.bus.after_dispatch(remove_when_written)

    @staticmethod
    def _remove_file(trainer: Any, path: str) -> None:
        if not trainer.is_global_zero:
            return
        try:
            os.remove(path)
        except FileNotFoundError:
            logger.warning("ModelCheckpoint could not delete %s, which left the top k: the file is already gone.",
                           path)
            return
        logger.debug("ModelCheckpoint deleted %s, which left the top k.", path)

    # ------------------------------------------------------------------ file names

    def format_checkpoint_name(
        self, epoch: int, step: int, metrics: Mapping[str, Any] | None = None, version: int = 0
    ) -> str:
        """Return the file name (without folder) of a save at ``epoch`` and ``step``.

        Args:
            epoch: the epoch, counted from 0.
            step: the global step.
            metrics: the values for the metric fields of the template, by name.
            version: the clash counter: 0 for none, N for the suffix ``-vN``.
        """
        name = self._format_name(epoch, step, metrics or {})
        return (name if version == 0 else f"{name}-v{version}") + FILE_EXTENSION

    def _format_name(self, epoch: int, step: int, metrics: Mapping[str, Any]) -> str:
        values: dict[str, Any] = {}
        for field in self._template_fields:
            if field in ("epoch", "step"):
                continue
            value = metrics.get(field)
            if value is None:
                rank_zero_warn(
                    f"ModelCheckpoint(filename={self.filename!r}) names the metric {field!r}, which is not in "
                    "trainer.callback_metrics at this save, so its place in the file name reads 'nan'. Log the "
                    "metric before the save, or remove it from filename."
                )
                value = math.nan
            values[field] = value.item() if isinstance(value, torch.Tensor) else value
        values["epoch"] = epoch
        values["step"] = step
        return _safe_file_name(_render(self.filename, values))

    def _missing_monitor_message(self, metrics: Mapping[str, Any], where: str) -> str:
        available = ", ".join(repr(name) for name in sorted(metrics)) or "none"
        return (
            f"ModelCheckpoint(monitor={self.monitor!r}) found no metric {self.monitor!r} {where}. Metrics "
            f"available: {available}. Log it with self.log({self.monitor!r}, value), for example in "
            "validation_step or on_validation_epoch_end, or set monitor= to one of the available names."
        )

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Return the bookkeeping that resume needs, as strings, numbers and tensors."""
        return {
            "dirpath": self.dirpath,
            "best_model_path": self.best_model_path,
            "best_model_score": self.best_model_score,
            "best_k_models": dict(self.best_k_models),
            "last_model_path": self.last_model_path,
            "last_saved_step": self._last_saved_step,
            "validated_epoch": self._validated_epoch,
            "monitor_from_validation": self._monitor_from_validation,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` returned.

        When the checkpoint's folder differs from this run's, a warning is
        given and the kept files stay out of the bookkeeping, so this run
        neither ranks nor deletes them. The save schedule is restored either way.
        """
        self._last_saved_step = int(state_dict.get("last_saved_step", -1))
        self._validated_epoch = int(state_dict.get("validated_epoch", -1))
        self._monitor_from_validation = bool(state_dict.get("monitor_from_validation", False))
        saved_dirpath = state_dict.get("dirpath")
        if self.dirpath is not None and saved_dirpath is not None and saved_dirpath != self.dirpath:
            rank_zero_warn(
                f"ModelCheckpoint resumes with dirpath {self.dirpath!r}, but the checkpoint was written with "
                f"{saved_dirpath!r}. The files kept there are not ranked or deleted by this run, and "
                "best_model_path starts afresh. Pass dirpath= the old folder to continue its top k."
            )
            return
        if self.dirpath is None and saved_dirpath is not None:
            self.dirpath = str(saved_dirpath)
        self.best_model_path = str(state_dict.get("best_model_path", ""))
        score = state_dict.get("best_model_score")
        self.best_model_score = None if score is None else torch.as_tensor(score)
        self.best_k_models = {str(path): torch.as_tensor(value)
                              for path, value in state_dict.get("best_k_models", {}).items()}
        self.last_model_path = str(state_dict.get("last_model_path", ""))


def check_folder(path: str, what: str) -> None:
    """Raise when ``path``, or the nearest part of it that exists, is not a folder, so files cannot go there.

    Args:
        path: the folder that files will be written to; it may not exist yet.
        what: how the error names the folder, such as "ModelCheckpoint dirpath '/data/run'".

    Raises:
        MisconfigurationError: a file is in the way.
    """
    existing = path
    while not os.path.lexists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            return
        existing = parent
    if not os.path.isdir(existing):
        raise MisconfigurationError(
            f"{what} is not usable: {existing!r} is a file, not a folder, so no checkpoint can be written there. "
            "Pass a folder path."
        )


#: The handlers of the step schedule, idle in a run without it.
_STEP_HANDLERS = ("_note_step_at_batch_start", "_save_on_step_schedule")


def _check_interval(name: str, value: int | None) -> int | None:
    """Return ``value`` as a positive int, or None for None and 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MisconfigurationError(
            f"ModelCheckpoint({name}={value!r}) is invalid: use a positive number, or None or 0 to turn this "
            "schedule off."
        )
    return value or None


def _template_fields(template: str) -> list[str]:
    """Return the field names of a file name template, checking that it parses."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise MisconfigurationError(
            f"ModelCheckpoint(filename={template!r}) is not a valid format template: {exc}. Write fields as "
            "{name} or {name:.2f}, and double a literal brace: {{ or }}."
        ) from None
    fields = [field for _, field, _, _ in parsed if field is not None]
    if "" in fields or any(field.isdigit() for field in fields):
        raise MisconfigurationError(
            f"ModelCheckpoint(filename={template!r}) has a positional field. Name every field: {{epoch}}, "
            "{step} or a metric name such as {val_loss:.2f}."
        )
    return fields


def _render(template: str, values: Mapping[str, Any]) -> str:
    """Format ``template`` looking each field up by its whole name, so names may contain '.', '/' or '-'."""
    formatter = string.Formatter()
    parts: list[str] = []
    for literal, field, spec, conversion in formatter.parse(template):
        parts.append(literal)
        if field is None:
            continue
        value = values[field]
        if conversion:
            value = formatter.convert_field(value, conversion)
        try:
            parts.append(format(value, spec or ""))
        except (TypeError, ValueError) as exc:
            raise MisconfigurationError(
                f"ModelCheckpoint(filename={template!r}) cannot format {field}={value!r} with spec {spec!r}: "
                f"{exc}. Use a spec that fits a number, such as {{{field}:.4f}}."
            ) from None
    return "".join(parts)


def _safe_file_name(name: str) -> str:
    """Replace path separators, NUL and runs of dots with '_', so the name stays inside its folder."""
    for separator in {"/", "\\", os.sep, os.altsep or "/", "\0"}:
        name = name.replace(separator, "_")
    return _DOT_RUN.sub("_", name) or "checkpoint"


def _same_value(value: torch.Tensor, other: torch.Tensor | None) -> bool:
    """Return whether ``value`` is ``other`` or equal to it (NaN equals NaN), meaning the metric did not change."""
    if other is None:
        return False
    if value is other:
        return True
    return value.shape == other.shape and bool(torch.equal(value, other) or
                                               (torch.isnan(value).all() and torch.isnan(other).all()))


def _exists_on_rank_zero(path: str) -> bool:
    """Return whether ``path`` exists on global rank 0, so every rank picks the same file names.

    Under ``torch.distributed`` the result of rank 0 is broadcast to the other ranks,
    whose file systems may differ (several machines).
    """
    distributed = sys.modules.get("torch.distributed")
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        return os.path.exists(path)
    if distributed.get_world_size() == 1:
        return os.path.exists(path)
    # NOTE: this branch has no test here, because it needs a process group of two or more ranks.
    result = [os.path.exists(path) if distributed.get_rank() == 0 else None]
    distributed.broadcast_object_list(result, src=0)
    return bool(result[0])
