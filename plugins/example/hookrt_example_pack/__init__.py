"""An example hookrt plugin pack: `LossSpikeDetector` warns when the training loss spikes.

Copy this folder to start a pack of your own. The parts that matter:

- ``pyproject.toml`` declares the entry point ``example`` in the ``hookrt.plugins``
  group, pointing at `LossSpikeDetector`. After ``pip install``, hookrt finds the
  plugin by that name: ``Trainer(plugins=["example"])`` or
  ``hookrt fit model.py:Net --plugin example:factor=5``.
- The plugin subclasses ``hookrt.Plugin`` and subscribes methods to events
  with ``@hookrt.on``. Each handler takes one argument, the event's payload.
- It checks its arguments in ``__init__`` and raises
  ``hookrt.MisconfigurationError`` with the fix, so a typo fails before training.
- It keeps its state in plain floats and lists and returns it from
  ``state_dict``, so a run resumed from a checkpoint continues where it stopped.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import hookrt
from hookrt import BatchEndPayload, MisconfigurationError

__all__ = ["LossSpike", "LossSpikeDetector"]

__version__ = "0.1.0"

# Packs log through the standard logging module under their own name, so users can filter them.
log = logging.getLogger(__name__)


class LossSpike(NamedTuple):
    """One detected spike."""

    #: The trainer's global step (optimizer steps taken) when the batch ended.
    step: int
    #: The batch's training loss.
    loss: float
    #: The running mean the loss was compared with.
    mean: float


class LossSpikeDetector(hookrt.Plugin):
    """Warn when a training loss exceeds ``factor`` times the mean of the recent losses.

    After each training batch the detector reads the loss that ``training_step``
    returned: a tensor, or the ``"loss"`` entry of a dict. With several
    optimizers or truncated-BPTT splits it takes the mean of their losses. It
    compares the loss with the mean of the last ``window`` losses. A loss above
    ``factor`` times that mean, or a NaN or infinite loss, is a spike. For each
    spike the detector logs a warning with the global step and appends a
    `LossSpike` to ``spikes``. With ``stop=True`` it also sets
    ``trainer.should_stop``, so fit ends after the current batch.

    Checks start once ``warmup`` losses are in the window. Finite spikes enter
    the window too, so a lasting rise in the loss becomes the new normal after
    about ``window`` batches. The ratio is meaningful for non-negative losses
    only: while the running mean is 0 or negative, no loss counts as a spike.

    Args:
        factor: how many times the running mean a loss must exceed to be a spike; must be > 1.
        window: how many recent losses the running mean covers; must be >= 1.
        warmup: how many losses the window must hold before the first check; between 1 and ``window``.
        stop: set ``trainer.should_stop`` when a spike is detected.

    Raises:
        MisconfigurationError: an argument is out of range.
    """

    # A detector only observes: if it fails, hookrt logs the error once, disables it, and training goes on.
    critical = False

    def __init__(self, factor: float = 3.0, window: int = 50, warmup: int = 10, stop: bool = False) -> None:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
            raise MisconfigurationError(
                f"LossSpikeDetector(factor={factor!r}) is invalid: factor must be a number > 1, the multiple of "
                "the running mean above which a loss counts as a spike."
            )
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise MisconfigurationError(
                f"LossSpikeDetector(window={window!r}) is invalid: window must be an int >= 1, the number of "
                "recent losses in the running mean."
            )
        if isinstance(warmup, bool) or not isinstance(warmup, int) or not 1 <= warmup <= window:
            raise MisconfigurationError(
                f"LossSpikeDetector(warmup={warmup!r}) is invalid: warmup must be an int between 1 and "
                f"window ({window}), the number of losses to collect before the first check."
            )
        self.factor = float(factor)
        self.window = window
        self.warmup = warmup
        self.stop = bool(stop)
        #: The spikes detected so far, oldest first.
        self.spikes: list[LossSpike] = []
        self._losses: collections.deque[float] = collections.deque(maxlen=window)
        # Two detectors with different settings keep separate state in a checkpoint.
        self.state_key = f"{self.name}(factor={self.factor:g}, window={window})"

    @hookrt.on("on_batch_end")
    def _check_loss(self, payload: BatchEndPayload) -> None:
        loss = _loss_value(payload.outputs)
        if loss is None:
            return  # a manual-optimization step that returned nothing: nothing to compare
        if len(self._losses) >= self.warmup:
            mean = sum(self._losses) / len(self._losses)
            if not math.isfinite(loss) or (mean > 0 and loss > self.factor * mean):
                self._report(payload.trainer, LossSpike(int(payload.trainer.global_step), loss, mean))
        if math.isfinite(loss):
            self._losses.append(loss)

    def _report(self, trainer: Any, spike: LossSpike) -> None:
        self.spikes.append(spike)
        # Under distributed training every process detects the spike, so only global rank 0 logs it.
        if getattr(trainer, "is_global_zero", True):
            if math.isfinite(spike.loss):
                detail = (f"loss {spike.loss:.4g} is {spike.loss / spike.mean:.1f} times the running mean "
                          f"{spike.mean:.4g} of the last {len(self._losses)} batches")
            else:
                detail = f"loss is {spike.loss}, not a finite number"
            log.warning("Loss spike at global step %d: %s.%s", spike.step, detail,
                        " Stopping fit because stop=True." if self.stop else "")
        if self.stop:
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        """Return the window of recent losses and the spikes so far, as floats and lists."""
        return {"losses": list(self._losses), "spikes": [list(spike) for spike in self.spikes]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self._losses = collections.deque((float(loss) for loss in state_dict["losses"]), maxlen=self.window)
        self.spikes = [LossSpike(int(step), float(loss), float(mean)) for step, loss, mean in state_dict["spikes"]]


def _loss_value(outputs: Any) -> float | None:
    """Return the loss in what ``training_step`` returned, as a float, or None when there is none."""
    if isinstance(outputs, (list, tuple)):
        losses = [loss for loss in map(_loss_value, outputs) if loss is not None]
        return sum(losses) / len(losses) if losses else None
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    if outputs is None:
        return None
    if hasattr(outputs, "detach"):
        outputs = outputs.detach()  # float() of a tensor that requires grad warns
    try:
        return float(outputs)  # a 0-dim tensor or a number
    except (TypeError, ValueError, RuntimeError):
        return None  # not a scalar: a module returning something other than a loss is not this plugin's concern
