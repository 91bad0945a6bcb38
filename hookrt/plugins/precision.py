"""`MixedPrecision`: autocast around every step method, and a gradient scaler for float16.

``"bf16-mixed"`` runs the ``*_step`` methods under ``torch.autocast`` with
bfloat16, on the CPU or a GPU; bfloat16 has float32's exponent range, so no
loss scaling is needed. ``"16-mixed"`` autocasts to float16 and scales the
loss with a ``torch.amp.GradScaler`` so that small gradients do not underflow:

- ``before_backward`` (last of its handlers): the loss is multiplied by the scale;
- ``before_optimizer_step`` (order -5000, before the module's hooks and
  gradient clipping): the gradients are divided by it, once per step;
- around ``optimizer_step``: the scaler steps the optimizer, skipping the
  update when a gradient is inf or NaN, and then updates the scale. A skipped
  update leaves the weights unchanged and is reported as ``skipped=True`` in
  the ``optimizer_step`` event.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from hookrt._config import _PRECISIONS
from hookrt._errors import MisconfigurationError
from hookrt._events import (
    Event,
    ForwardPayload,
    LossPayload,
    OptimizerPayload,
    Payload,
    StagePayload,
    WrapPoint,
)
from hookrt._plugin import Plugin, around, on

__all__ = ["MixedPrecision"]

logger = logging.getLogger(__name__)

#: Unscale before the module's hooks (order -1000) and gradient clipping (order 10000),
#: so both see the true gradients.
UNSCALE_ORDER = -5000
#: Scale the loss after every other ``before_backward`` handler has read or replaced it.
SCALE_ORDER = 2**20
#: After `DevicePlacement` (order -500) at ``setup``, so the module's device is known.
SETUP_ORDER = -400

_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def _requires_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Return whether ``optimizer.step`` has a ``closure`` parameter without a default (LBFGS has one)."""
    if isinstance(optimizer, torch.optim.LBFGS):
        return True
    try:
        parameter = inspect.signature(type(optimizer).step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty


class MixedPrecision(Plugin):
    """Run the step methods under autocast; with ``"16-mixed"``, also scale the loss.

    Args:
        precision: ``"bf16-mixed"`` or ``"16-mixed"`` (``"bf16"``, ``"16"`` and ``16`` also work).
        device_type: the autocast device type (``"cpu"``, ``"cuda"``, ``"mps"``);
            None reads it from the module's device at ``setup``.
        scaler: the ``torch.amp.GradScaler`` to use with ``"16-mixed"``; None
            creates one with torch's defaults.

    Raises:
        MisconfigurationError: an unknown precision, ``"32-true"`` (which needs
            no plugin), or a scaler given for bfloat16.
    """

    def __init__(self, precision: str | int = "bf16-mixed", device_type: str | None = None,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        normalized = _PRECISIONS.get(precision)
        if normalized is None or normalized == "32-true":
            raise MisconfigurationError(
                f"MixedPrecision(precision={precision!r}) is not valid: use 'bf16-mixed' or '16-mixed'. For "
                "float32 training leave the plugin out."
            )
        if scaler is not None and normalized != "16-mixed":
            raise MisconfigurationError(
                f"MixedPrecision({normalized!r}) got a scaler, but only '16-mixed' scales the loss; bfloat16 "
                "needs none. Remove scaler= or use '16-mixed'."
            )
        self.precision = normalized
        self.dtype = _DTYPES[normalized]
        self.device_type = device_type
        #: The gradient scaler of ``"16-mixed"``, created at ``setup`` unless one was given; None for bfloat16.
        self.scaler: torch.amp.GradScaler | None = scaler
        self._pending_state: dict[str, Any] | None = None
        self._unscaled: set[int] = set()
        self._manual_patches: list[contextlib.ExitStack] = []

    # ------------------------------------------------------------------ set-up checks

    @on(Event.SETUP, order=SETUP_ORDER)
    def resolve_device(self, payload: StagePayload) -> None:
        """Read the device type from the module, check bfloat16 support and create the scaler."""
        if self.device_type is None:
            self.device_type = payload.module.device.type
        device_type = self.device_type
        if self.dtype is torch.bfloat16 and device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise MisconfigurationError(
                "MixedPrecision('bf16-mixed') needs a GPU with bfloat16 support (compute capability 8.0 or "
                "later), and this one has none. Use '16-mixed' on this GPU."
            )
        if self.precision == "16-mixed" and self.scaler is None:
            self.scaler = torch.amp.GradScaler(device_type)
        if self.scaler is not None and self._pending_state is not None:
            self.scaler.load_state_dict(self._pending_state)
            self._pending_state = None

    @on(Event.FIT_START, order=SETUP_ORDER)
    def check_optimizers(self, payload: Payload) -> None:
        """Reject closure optimizers under ``"16-mixed"``; under manual optimization, route steps via the scaler."""
        if self.scaler is None:
            return
        for index, optimizer in enumerate(payload.trainer.optimizers):
            if _requires_closure(optimizer):
                raise MisconfigurationError(
                    f"MixedPrecision('16-mixed') cannot step {type(optimizer).__name__} (optimizer {index}): its "
                    "step() requires a closure, which a GradScaler cannot run. Use precision='bf16-mixed' or "
                    "'32-true' with this optimizer, or an optimizer that steps without a closure."
                )
        if not payload.module.automatic_optimization:
            # NOTE: a step that the scaler skips never reaches the optimizer's own step hooks, so under manual
            # optimization it is not counted in global_step.
            for optimizer in payload.trainer.optimizers:
                stack = contextlib.ExitStack()
                stack.enter_context(self._scaled_step(optimizer, payload.trainer))
                self._manual_patches.append(stack)

    @on(Event.TEARDOWN)
    def restore_steps(self, payload: StagePayload) -> None:
        """Give the optimizers back their own ``step`` after manual optimization."""
        patches, self._manual_patches = self._manual_patches, []
        for stack in patches:
            stack.close()
        self._unscaled.clear()

    # ------------------------------------------------------------------ autocast and scaling

    @around(WrapPoint.FORWARD)
    def autocast(self, payload: ForwardPayload, proceed: Callable[[], Any]) -> Any:
        """Run the step method under ``torch.autocast``."""
        with torch.autocast(self.device_type or "cpu", dtype=self.dtype):
            return proceed()

    @on(Event.BEFORE_BACKWARD, order=SCALE_ORDER)
    def scale_loss(self, payload: LossPayload) -> None:
        """Multiply the loss by the current scale."""
        if self.scaler is not None:
            payload.loss = self.scaler.scale(payload.loss)

    @on(Event.BEFORE_OPTIMIZER_STEP, order=UNSCALE_ORDER)
    def unscale_gradients(self, payload: OptimizerPayload) -> None:
        """Divide the optimizer's gradients by the scale, once per step."""
        if self.scaler is not None:
            self._unscale(payload.optimizer)

    def _unscale(self, optimizer: torch.optim.Optimizer) -> None:
        assert self.scaler is not None  # callers check it
        if id(optimizer) not in self._unscaled:
            self._unscaled.add(id(optimizer))
            self.scaler.unscale_(optimizer)

    @around(WrapPoint.OPTIMIZER_STEP)
    def step_through_scaler(self, payload: OptimizerPayload, proceed: Callable[[], Any]) -> Any:
        """Let the scaler step the optimizer while the module's ``optimizer_step`` runs."""
        if self.scaler is None:
            return proceed()
        with self._scaled_step(payload.optimizer, payload.trainer):
            return proceed()

    @contextlib.contextmanager
    def _scaled_step(self, optimizer: torch.optim.Optimizer, trainer: Any) -> Iterator[None]:
        """Replace ``optimizer.step`` on this instance with one that steps through the scaler.

        ``GradScaler.step`` cannot take a closure, so the replacement runs the
        closure itself, then lets the scaler call the original ``step``.
        """
        scaler = self.scaler
        assert scaler is not None  # callers check it
        own = optimizer.__dict__.get("step")
        original = optimizer.step

        def scaled_step(closure: Callable[[], Any] | None = None) -> Any:
            loss = closure() if closure is not None else None
            self._unscale(optimizer)
            scale = scaler.get_scale()
            optimizer.step = original  # type: ignore[method-assign]  # the scaler calls optimizer.step
            try:
                scaler.step(optimizer)
            finally:
                optimizer.step = scaled_step  # type: ignore[method-assign]
            scaler.update()
            self._unscaled.discard(id(optimizer))
            # The scaler lowers the scale exactly when it found inf or NaN gradients and skipped the update
            # (GradScaler requires backoff_factor < 1).
            if scaler.get_scale() < scale:
                trainer._step_skipped = True
                logger.debug("GradScaler skipped a step of %s: non-finite gradients; scale now %s",
                             type(optimizer).__name__, scaler.get_scale())
            return loss

        optimizer.step = scaled_step  # type: ignore[method-assign]
        try:
            yield
        finally:
            if own is None:
                vars(optimizer).pop("step", None)
            else:
                optimizer.step = own  # type: ignore[method-assign]

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Return the scaler's state (numbers only), or an empty dict for bfloat16."""
        if self.scaler is not None:
            return {"scaler": self.scaler.state_dict()}
        return {"scaler": dict(self._pending_state)} if self._pending_state else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the scaler's state, now or when the scaler is created at ``setup``."""
        state = state_dict.get("scaler")
        if not state:
            return
        if self.scaler is not None:
            self.scaler.load_state_dict(state)
        else:
            self._pending_state = dict(state)

    def __repr__(self) -> str:
        return f"MixedPrecision(precision={self.precision!r}, device_type={self.device_type!r})"
