"""`EarlyStopping`: stop fit when a monitored metric stops improving, crosses a threshold or is not finite."""

from __future__ import annotations

import enum
import logging
import math
from typing import Any

import torch

from hookrt._errors import MisconfigurationError
from hookrt._events import EvalPayload, StagePayload
from hookrt._plugin import Plugin, on
from hookrt._rank import rank_zero_warn

__all__ = ["EarlyStopping", "EarlyStoppingReason"]

logger = logging.getLogger(__name__)

_MODES = ("min", "max")


class EarlyStoppingReason(enum.Enum):
    """The reason `EarlyStopping` stopped the run, or NOT_STOPPED."""

    NOT_STOPPED = "not_stopped"
    PATIENCE_EXHAUSTED = "patience_exhausted"
    STOPPING_THRESHOLD = "stopping_threshold"
    DIVERGENCE = "divergence"
    NON_FINITE = "non_finite"


class EarlyStopping(Plugin):
    """Stop ``fit`` when the monitored metric stops improving.

    The check runs after each validation run of ``fit``; sanity validation and
    ``trainer.validate()`` are ignored. A value improves when it beats
    ``best_score`` by more than ``min_delta`` in the direction of ``mode``.
    After ``patience`` validation runs in a row without improvement, the
    plugin sets ``trainer.should_stop``, and the trainer stops after the
    current batch (``min_epochs`` and ``min_steps`` can hold the stop back,
    in which case the next check requests it again). It also stops at once
    when the value is not finite (with ``check_finite``), is strictly better
    than ``stopping_threshold``, or strictly worse than ``divergence_threshold``.
    The reason is logged at INFO and kept in ``stopping_reason``.

    Args:
        monitor: the name of the metric in ``trainer.callback_metrics``.
        min_delta: how much a value must beat ``best_score`` by to count as an improvement (>= 0).
        patience: how many validation runs without improvement end the run (>= 0).
        mode: ``"min"`` when a lower value is better, ``"max"`` when a higher one is.
        strict: raise when the metric is missing after validation; when False,
            warn once and skip the check instead.
        check_finite: stop when the value is NaN or infinite.
        stopping_threshold: stop once the value is strictly better than this.
        divergence_threshold: stop once the value is strictly worse than this.

    Raises:
        MisconfigurationError: an argument is invalid.
    """

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int = 3,
        mode: str = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise MisconfigurationError(
                f"EarlyStopping(monitor={monitor!r}) is invalid: give the name of a logged metric, such as "
                "'val_loss'."
            )
        if mode not in _MODES:
            raise MisconfigurationError(
                f"EarlyStopping(mode={mode!r}) is invalid: the valid modes are 'min' (a lower value is better) "
                "and 'max' (a higher value is better)."
            )
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise MisconfigurationError(
                f"EarlyStopping(patience={patience!r}) is invalid: use the number of validation runs without "
                "improvement to allow, 0 or more."
            )
        if not isinstance(min_delta, (int, float)) or isinstance(min_delta, bool) or not min_delta >= 0:
            raise MisconfigurationError(
                f"EarlyStopping(min_delta={min_delta!r}) is invalid: use a number >= 0; mode sets the direction "
                "of improvement."
            )
        self.monitor = monitor
        self.min_delta = float(min_delta)
        self.patience = patience
        self.mode = mode
        self.strict = bool(strict)
        self.check_finite = bool(check_finite)
        self.stopping_threshold = None if stopping_threshold is None else float(stopping_threshold)
        self.divergence_threshold = None if divergence_threshold is None else float(divergence_threshold)

        #: Validation runs since the last improvement.
        self.wait_count = 0
        #: The best value seen: +inf (mode "min") or -inf (mode "max") before the first check.
        self.best_score = torch.tensor(math.inf if mode == "min" else -math.inf)
        #: The epoch during which the plugin requested the stop; 0 until then.
        self.stopped_epoch = 0
        #: The reason the plugin requested the stop.
        self.stopping_reason = EarlyStoppingReason.NOT_STOPPED
        #: The logged explanation of the stop, or None.
        self.stopping_reason_message: str | None = None
        self._fitting = False
        self._warned_missing = False
        self.state_key = f"EarlyStopping{{monitor={monitor!r}, mode={mode!r}}}"

    # ------------------------------------------------------------------ event handlers

    @on("setup")
    def _start_run(self, payload: StagePayload) -> None:
        self._fitting = payload.stage == "fit"

    @on("teardown")
    def _end_run(self, payload: StagePayload) -> None:
        self._fitting = False

    @on("on_validation_end")
    def _check_after_validation(self, payload: EvalPayload) -> None:
        if not self._fitting or payload.sanity_checking:
            return
        trainer = payload.trainer
        current = self._read_monitor(trainer.callback_metrics)
        if current is None:
            return
        reason, message = self._evaluate(current)
        if reason is EarlyStoppingReason.NOT_STOPPED:
            return
        self.stopped_epoch = int(trainer.current_epoch)
        self.stopping_reason = reason
        self.stopping_reason_message = f"EarlyStopping stops the run at epoch {self.stopped_epoch}: {message}"
        trainer.should_stop = True
        logger.info(self.stopping_reason_message)

    # ------------------------------------------------------------------ the check

    def _read_monitor(self, metrics: dict[str, torch.Tensor]) -> torch.Tensor | None:
        value = metrics.get(self.monitor)
        if value is not None:
            return value.detach().to("cpu").reshape(()).clone()
        available = ", ".join(repr(name) for name in sorted(metrics)) or "none"
        if self.strict:
            raise MisconfigurationError(
                f"EarlyStopping(monitor={self.monitor!r}) found no metric {self.monitor!r} after validation. "
                f"Metrics available: {available}. Log it with self.log({self.monitor!r}, value), for example in "
                "validation_step, set monitor= to one of the available names, or pass strict=False to skip the "
                "check when the metric is missing."
            )
        if not self._warned_missing:
            self._warned_missing = True
            rank_zero_warn(
                f"EarlyStopping(monitor={self.monitor!r}, strict=False) found no metric {self.monitor!r} after "
                f"validation, so it skips the check while the metric is missing. Metrics available: {available}. "
                f"Log it with self.log({self.monitor!r}, value), or set monitor= to one of the available names."
            )
        return None

    def _improves(self, current: torch.Tensor) -> bool:
        if self.mode == "min":
            return float(current) < float(self.best_score) - self.min_delta
        return float(current) > float(self.best_score) + self.min_delta

    def _evaluate(self, current: torch.Tensor) -> tuple[EarlyStoppingReason, str]:
        """Update ``best_score`` and ``wait_count`` with ``current``; return whether to stop, and why."""
        value = float(current)
        improved = self._improves(current)
        if improved:
            logger.debug("EarlyStopping: %r improved from %s to %s.", self.monitor, float(self.best_score), value)
            self.best_score = current
            self.wait_count = 0
        else:
            self.wait_count += 1

        below, above = ("below", "above") if self.mode == "min" else ("above", "below")
        if self.check_finite and not math.isfinite(value):
            return EarlyStoppingReason.NON_FINITE, (
                f"{self.monitor!r} = {value:.6g} is not finite. Pass check_finite=False to keep training through "
                "non-finite values."
            )
        if self.stopping_threshold is not None and self._strictly_better(value, self.stopping_threshold):
            return EarlyStoppingReason.STOPPING_THRESHOLD, (
                f"{self.monitor!r} = {value:.6g} is {below} the stopping_threshold {self.stopping_threshold:g}."
            )
        if self.divergence_threshold is not None and self._strictly_better(self.divergence_threshold, value):
            return EarlyStoppingReason.DIVERGENCE, (
                f"{self.monitor!r} = {value:.6g} is {above} the divergence_threshold {self.divergence_threshold:g}."
            )
        if not improved and self.wait_count >= self.patience:
            return EarlyStoppingReason.PATIENCE_EXHAUSTED, (
                f"{self.monitor!r} did not improve by more than min_delta={self.min_delta:g} in the last "
                f"{self.wait_count} validation run(s); the best value is {float(self.best_score):.6g}."
            )
        return EarlyStoppingReason.NOT_STOPPED, ""

    def _strictly_better(self, value: float, other: float) -> bool:
        return value < other if self.mode == "min" else value > other

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Return the counters that resume needs, as numbers, strings and a tensor."""
        return {
            "wait_count": self.wait_count,
            "stopped_epoch": self.stopped_epoch,
            "best_score": self.best_score,
            "patience": self.patience,
            "stopping_reason": self.stopping_reason.value,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` returned.

        ``patience`` stays the value given to this instance, so a resumed run
        can change it; a different saved value is logged at INFO.
        """
        self.wait_count = int(state_dict.get("wait_count", 0))
        self.stopped_epoch = int(state_dict.get("stopped_epoch", 0))
        if "best_score" in state_dict:
            self.best_score = torch.as_tensor(state_dict["best_score"])
        self.stopping_reason = EarlyStoppingReason(state_dict.get("stopping_reason", "not_stopped"))
        saved_patience = state_dict.get("patience", self.patience)
        if saved_patience != self.patience:
            logger.info("EarlyStopping(monitor=%r) resumes with patience=%d; the checkpoint had patience=%s.",
                        self.monitor, self.patience, saved_patience)
