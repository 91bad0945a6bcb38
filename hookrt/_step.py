"""The batch step: the closure that runs forward and backward, and the optimizer step.

For each optimizer and each truncated-BPTT split, the closure runs
``training_step``, emits ``before_backward``, runs backward and emits
``after_backward``. When the accumulation window closes, the optimizer steps
through ``module.optimizer_step(..., closure)``; the closure fires
``before_optimizer_step`` after its first evaluation, so gradients are final
and a closure optimizer such as LBFGS can evaluate it again.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from hookrt._async_save import finish_pending_copy
from hookrt._errors import MisconfigurationError
from hookrt._events import Event, WrapPoint

if TYPE_CHECKING:
    from hookrt._trainer import Trainer

__all__ = ["BatchStep", "extract_loss"]

# Plain strings: looking up an Enum member costs more than a module global, on every batch.
_BEFORE_BACKWARD = Event.BEFORE_BACKWARD.value
_AFTER_BACKWARD = Event.AFTER_BACKWARD.value
_BEFORE_OPTIMIZER_STEP = Event.BEFORE_OPTIMIZER_STEP.value
_OPTIMIZER_STEP = Event.OPTIMIZER_STEP.value


def extract_loss(output: Any) -> torch.Tensor:
    """Return the loss tensor from a ``training_step`` result.

    Raises:
        MisconfigurationError: the result is neither a tensor nor a dict with a
            ``"loss"`` tensor, or the loss is not a single value.
    """
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, torch.Tensor):
        if isinstance(output, Mapping) and "loss" in output:
            found = f"a dict whose 'loss' is a {type(loss).__name__}, not a tensor"
        elif isinstance(output, Mapping):
            found = f"a dict with keys {sorted(map(str, output))}"
        else:
            found = "None" if output is None else f"a {type(output).__name__}"
        raise MisconfigurationError(
            f"training_step returned {found}; it must return the loss tensor or a dict with a 'loss' tensor. "
            "To skip a batch on purpose, raise hookrt.CancelBatch."
        )
    if loss.numel() != 1:
        raise MisconfigurationError(
            f"training_step returned a loss of shape {tuple(loss.shape)}; the loss must be a single value. "
            "Reduce it first, e.g. loss.mean()."
        )
    if not loss.requires_grad:
        raise MisconfigurationError(
            "training_step returned a loss that does not require grad, so backward cannot run. Compute it from "
            "the module's parameters, outside torch.no_grad(), and do not detach it."
        )
    return loss


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(item) for item in value)
    if isinstance(value, Mapping):
        return {key: _detach(item) for key, item in value.items()}
    return value


def call_payload(payload: Any) -> Any:
    """Run a forward payload's step: the innermost body of the ``forward`` wrapper point."""
    return payload.call(*payload.args)


def _takes_legacy_closure(module: Any) -> bool:
    try:
        parameters = list(inspect.signature(module.optimizer_step).parameters)
    except (TypeError, ValueError):
        return False
    return bool(parameters) and parameters[-1] == "second_order_closure"


def _positional_names(fn: Callable[..., Any]) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    try:
        return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds]
    except (TypeError, ValueError):
        return []


def _check_training_step(module: Any, arguments: list[str]) -> None:
    """Raise when ``module.training_step`` cannot take the positional ``arguments`` the batch step passes."""
    try:
        signature = inspect.signature(module.training_step)
    except (TypeError, ValueError):
        return  # no signature to check against, so the call itself reports a mismatch
    try:
        signature.bind(*arguments)
    except TypeError as exc:
        # Annotations are left out: under `from __future__ import annotations` they print as quoted strings.
        parameters = [parameter.replace(annotation=parameter.empty) for parameter in signature.parameters.values()]
        plain = signature.replace(parameters=parameters, return_annotation=signature.empty)
        expected = ", ".join(arguments)
        raise MisconfigurationError(
            f"{type(module).__name__}.training_step{plain} cannot be called as training_step({expected}): {exc}. "
            f"Define it as training_step(self, {expected})."
        ) from None


def _keeps_default_optimizer_step(module: Any) -> bool:
    from hookrt._module import LightningModule

    return "optimizer_step" not in vars(module) and \
        getattr(type(module), "optimizer_step", None) is LightningModule.optimizer_step


#: torch optimizers whose ``step(closure)`` evaluates the closure exactly once, before updating, with grad
#: enabled (read in torch 2.14's torch/optim sources, where AdamW is a subclass of Adam). For these exact
#: classes, not subclasses, calling the closure and then ``step()`` is the same computation without the
#: closure wrapper and the grad-mode context that ``step`` puts around it.
_SINGLE_EVALUATION_OPTIMIZERS = frozenset(
    getattr(torch.optim, name) for name in (
        "SGD", "Adam", "AdamW", "Adamax", "Adagrad", "Adadelta", "RMSprop", "Rprop", "NAdam", "RAdam", "ASGD",
    ) if hasattr(torch.optim, name)
)


class BatchStep:
    """Runs one training batch under automatic optimization.

    Built once per fit; holds what does not change between batches, so the
    per-batch path does no introspection.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.module = trainer.lightning_module
        self.bus = trainer.bus
        self.optimizers = trainer.optimizers
        config = trainer.config
        self.accumulate = config.accumulate_grad_batches
        self.tbptt_steps = config.truncated_bptt_steps
        self.detect_anomaly = config.detect_anomaly
        self.legacy_optimizer_step = _takes_legacy_closure(self.module)
        names = _positional_names(self.module.training_step)
        self.pass_optimizer_idx = len(self.optimizers) > 1 and (
            "optimizer_idx" in names or len(names) >= 3 + (1 if self.tbptt_steps else 0)
        )
        arguments = ["batch", "batch_idx", *(["optimizer_idx"] if self.pass_optimizer_idx else [])]
        _check_training_step(self.module, [*arguments, *(["hiddens"] if self.tbptt_steps else [])])
        #: Micro-batches whose backward ran in the open window, per optimizer.
        self.contributions = [0] * len(self.optimizers)
        self.last_losses: list[torch.Tensor | None] = [None] * len(self.optimizers)
        self.manual = not self.module.automatic_optimization
        #: Whether the batch being run closes its accumulation window (wrappers read it, e.g. for no_sync).
        self.closing = False
        #: Whether the closure must toggle ``requires_grad`` (several optimizers).
        self.guarded = len(self.optimizers) > 1
        #: Whether batches can take the flat path of `_run_single`: one optimizer, no truncated BPTT,
        #: automatic optimization and the current optimizer_step signature. Wrappers are checked per batch.
        self.simple = not (self.manual or self.tbptt_steps or self.guarded or self.legacy_optimizer_step)
        #: Whether the module keeps LightningModule.optimizer_step, so that the flat path can make the
        #: call that it makes, ``optimizer.step(closure=closure)``, without the extra Python call.
        self.default_optimizer_step = _keeps_default_optimizer_step(self.module)
        #: Whether the flat path runs forward and backward without a closure, then ``optimizer.step()``
        #: (see `_SINGLE_EVALUATION_OPTIMIZERS`); only with the default optimizer_step and one such optimizer.
        self.direct_step = self.default_optimizer_step and len(self.optimizers) == 1 and \
            type(self.optimizers[0]) in _SINGLE_EVALUATION_OPTIMIZERS

    # ------------------------------------------------------------------ per batch

    def run(self, batch: Any, batch_idx: int, window: int, closes: bool) -> Any:
        """Run the batch: every split, every optimizer; step when ``closes``.

        Args:
            batch: the batch from the loader.
            batch_idx: its index in the epoch.
            window: the number of micro-batches the open window holds (the loss scale is 1/window).
            closes: whether this batch closes the window.
        """
        self.closing = closes
        if self.simple and not self.bus._wrappers:
            return self._run_single(batch, batch_idx, window, closes)
        if self.bus.has_wrappers(WrapPoint.BATCH_STEP):
            # The body reads the batch from the payload, so a wrapper may move or replace it.
            return self.bus.wrap(
                WrapPoint.BATCH_STEP, lambda payload: self._run(payload.batch, batch_idx, window, closes),
                batch=batch, batch_idx=batch_idx,
            )
        return self._run(batch, batch_idx, window, closes)

    def _run(self, batch: Any, batch_idx: int, window: int, closes: bool) -> Any:
        if self.manual:
            return self._run_manual(batch, batch_idx)
        splits = self.module.tbptt_split_batch(batch, self.tbptt_steps) if self.tbptt_steps else (batch,)
        outputs = []
        hiddens = None
        for split in splits:
            for optimizer_idx, optimizer in enumerate(self.optimizers):
                output = self._optimize(split, batch_idx, optimizer_idx, optimizer, hiddens, window, closes)
                outputs.append(output)
            if self.tbptt_steps:
                hiddens = _detach(output.get("hiddens")) if isinstance(output, Mapping) else None
        return outputs[0] if len(outputs) == 1 else outputs

    def _run_single(self, batch: Any, batch_idx: int, window: int, closes: bool) -> Any:
        """Run a batch in the common case, with the same events as `_optimize`, in fewer calls.

        The per-batch cost of the runtime is mostly Python calls, so this path
        inlines the step bookkeeping, and with one of torch's single-evaluation
        optimizers (`direct_step`) it runs forward and backward without a closure.
        """
        trainer = self.trainer
        optimizer = self.optimizers[0]
        if self.direct_step and torch.is_grad_enabled():
            output = self.module.training_step(batch, batch_idx)
            dispatch = self.bus._dispatch
            # Without accumulation and without handlers between backward and step, `_backward` comes down to
            # backward() and `_before_step` to nothing.
            bare = window == 1 and closes and type(output) is torch.Tensor and output.requires_grad and \
                output.dim() == 0 and not self.detect_anomaly and _BEFORE_BACKWARD not in dispatch and \
                _AFTER_BACKWARD not in dispatch and _BEFORE_OPTIMIZER_STEP not in dispatch
            if bare:
                output.backward()
                loss = output
            else:
                loss = self._backward(output, batch_idx, 0, window)
                self.contributions[0] += 1
            if closes:
                trainer._step_skipped = False
                if not bare:
                    self._before_step(optimizer, 0, window)
                optimizer.step()
                self._after_step(optimizer, 0)
            self.last_losses[0] = loss
            trainer._last_loss = loss
            return output

        calls = 0
        first_output: Any = None
        first_loss: Any = None

        def closure() -> torch.Tensor:
            nonlocal calls, first_output, first_loss
            calls += 1
            if calls > 1:
                optimizer.zero_grad()
            output = self.module.training_step(batch, batch_idx)
            loss = self._backward(output, batch_idx, 0, window)
            if calls == 1:
                first_output, first_loss = output, loss
                self.contributions[0] += 1
                if closes:
                    self._before_step(optimizer, 0, window)
            return loss

        if closes:
            trainer._step_skipped = False
            finish_pending_copy(trainer)
            if self.default_optimizer_step:
                optimizer.step(closure=closure)  # type: ignore[arg-type]  # torch's stub wants a float
            else:
                self.module.optimizer_step(trainer._progress.current_epoch, batch_idx, optimizer, 0, closure)
            if calls == 0:
                self._raise_closure_not_run()
            self._after_step(optimizer, 0)
        else:
            closure()
        self.last_losses[0] = first_loss
        trainer._last_loss = first_loss
        return first_output

    def _check_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        if not torch.isfinite(loss).all():
            raise MisconfigurationError(
                f"training_step returned a non-finite loss ({loss.item()}) at epoch {self.trainer.current_epoch}, "
                f"batch {batch_idx}, with detect_anomaly=True. Check the inputs and the learning rate."
            )

    def _raise_closure_not_run(self) -> None:
        raise MisconfigurationError(
            f"{type(self.module).__name__}.optimizer_step returned without running the closure, so the "
            "batch was never trained. Call optimizer.step(closure=closure) in the override."
        )

    def _run_manual(self, batch: Any, batch_idx: int) -> Any:
        """Manual optimization: ``training_step`` steps the optimizers itself; only the loss is recorded."""
        output = self._training_step(batch, batch_idx, 0, None)
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if isinstance(loss, torch.Tensor):
            self.trainer._last_loss = loss.detach()
        return output

    def _training_step(self, batch: Any, batch_idx: int, optimizer_idx: int, hiddens: Any) -> Any:
        args: tuple[Any, ...] = (batch, batch_idx)
        if self.pass_optimizer_idx:
            args += (optimizer_idx,)
        if self.tbptt_steps:
            args += (hiddens,)
        if self.bus.has_wrappers(WrapPoint.FORWARD):
            return self.bus.wrap(
                WrapPoint.FORWARD, call_payload, stage="train", call=self.module.training_step, args=args
            )
        return self.module.training_step(*args)

    def _optimize(
        self,
        batch: Any,
        batch_idx: int,
        optimizer_idx: int,
        optimizer: torch.optim.Optimizer,
        hiddens: Any,
        window: int,
        closes: bool,
    ) -> Any:
        calls = 0
        first_output: Any = None
        first_loss: Any = None

        def closure() -> torch.Tensor:
            nonlocal calls, first_output, first_loss
            calls += 1
            if calls > 1:
                optimizer.zero_grad()
            if self.guarded:
                with self._guards(optimizer_idx):
                    output, loss = self._forward_backward(batch, batch_idx, optimizer_idx, hiddens, window)
            else:
                output, loss = self._forward_backward(batch, batch_idx, optimizer_idx, hiddens, window)
            if calls == 1:
                first_output, first_loss = output, loss
                self.contributions[optimizer_idx] += 1
                if closes:
                    self._before_step(optimizer, optimizer_idx, window)
            return loss

        if not closes:
            closure()
        elif self.legacy_optimizer_step:
            closure()
            reused = False

            def second_order_closure() -> torch.Tensor:
                nonlocal reused
                if not reused:
                    reused = True
                    return first_loss
                return closure()

            self._step(batch_idx, optimizer, optimizer_idx, second_order_closure)
        else:
            self._step(batch_idx, optimizer, optimizer_idx, closure)
            if calls == 0:
                self._raise_closure_not_run()
        self.last_losses[optimizer_idx] = first_loss
        self.trainer._last_loss = first_loss
        return first_output

    def _forward_backward(
        self, batch: Any, batch_idx: int, optimizer_idx: int, hiddens: Any, window: int
    ) -> tuple[Any, torch.Tensor]:
        output = self._training_step(batch, batch_idx, optimizer_idx, hiddens)
        return output, self._backward(output, batch_idx, optimizer_idx, window)

    def _backward(self, output: Any, batch_idx: int, optimizer_idx: int, window: int) -> torch.Tensor:
        """Take the loss from ``training_step``'s output, run the backward pass and its events; return the loss."""
        bus = self.bus
        if type(output) is torch.Tensor and output.requires_grad and output.dim() == 0:
            loss = output  # the common case, checked here without the call of extract_loss
        else:
            loss = extract_loss(output)
        if self.detect_anomaly:
            self._check_finite(loss, batch_idx)
        scaled = loss / window if window > 1 else loss
        dispatch = bus._dispatch
        if _BEFORE_BACKWARD in dispatch:
            scaled = bus.emit(_BEFORE_BACKWARD, loss=scaled, optimizer_idx=optimizer_idx).loss  # type: ignore[union-attr]
        scaled.backward()
        if _AFTER_BACKWARD in dispatch:
            bus.emit(_AFTER_BACKWARD, loss=scaled, optimizer_idx=optimizer_idx)
        if type(output) is not torch.Tensor and isinstance(output, Mapping) and len(output) > 1:
            self.trainer._metrics.log_legacy_output(output, skip=("loss", "hiddens"))
        return loss

    # ------------------------------------------------------------------ steps

    def _before_step(self, optimizer: torch.optim.Optimizer, optimizer_idx: int, window: int) -> None:
        contributed = self.contributions[optimizer_idx]
        if contributed and contributed != window:
            _rescale_gradients(optimizer, window / contributed)
        if _BEFORE_OPTIMIZER_STEP in self.bus._dispatch:
            self.bus.emit(_BEFORE_OPTIMIZER_STEP, optimizer=optimizer, optimizer_idx=optimizer_idx)

    def _step(
        self, batch_idx: int, optimizer: torch.optim.Optimizer, optimizer_idx: int, closure: Callable[[], Any]
    ) -> None:
        trainer = self.trainer
        module = self.module
        trainer._step_skipped = False
        # The closure, an optimizer_step override or a wrapper may change weights before the step's pre-hook.
        finish_pending_copy(trainer)

        def body(payload: Any) -> Any:
            return module.optimizer_step(trainer.current_epoch, batch_idx, optimizer, optimizer_idx, closure)

        if self.bus.has_wrappers(WrapPoint.OPTIMIZER_STEP):
            self.bus.wrap(WrapPoint.OPTIMIZER_STEP, body, optimizer=optimizer, optimizer_idx=optimizer_idx)
        else:
            body(None)
        self._after_step(optimizer, optimizer_idx)

    def _after_step(self, optimizer: torch.optim.Optimizer, optimizer_idx: int) -> None:
        # Counters and schedulers move before the event, so a handler (or a checkpoint it requests) sees the
        # step as applied; gradients are zeroed after it, so on_before_zero_grad can still read them.
        trainer = self.trainer
        progress = trainer._progress
        skipped = trainer._step_skipped
        progress.global_step += 1
        progress.optimizer_steps[optimizer_idx] += 1
        self.contributions[optimizer_idx] = 0
        if not skipped and trainer._has_step_schedulers:
            trainer._step_schedulers("step", progress.optimizer_steps[optimizer_idx], optimizer_idx)
        if _OPTIMIZER_STEP in self.bus._dispatch:
            self.bus.emit(_OPTIMIZER_STEP, optimizer=optimizer, optimizer_idx=optimizer_idx, skipped=skipped)
        optimizer.zero_grad(set_to_none=True)

    def flush(self, batch_idx: int, window: int) -> bool:
        """Step every optimizer whose window holds gradients; returns whether any stepped.

        Used when a window closes without its planned last batch: the epoch
        stopped early, or the closing batch was cancelled.
        """
        stepped = False
        for optimizer_idx, optimizer in enumerate(self.optimizers):
            if not self.contributions[optimizer_idx]:
                continue
            loss = self.last_losses[optimizer_idx]
            self._before_step(optimizer, optimizer_idx, window)
            self._step(batch_idx, optimizer, optimizer_idx, lambda loss=loss: loss)  # type: ignore[misc]
            stepped = True
        return stepped

    # ------------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def _guards(self, optimizer_idx: int) -> Any:
        """Limit ``requires_grad`` to one optimizer's parameters while its closure runs."""
        self.trainer._toggle_optimizer(self.optimizers[optimizer_idx])
        try:
            yield
        finally:
            self.trainer._untoggle_optimizer()


def _rescale_gradients(optimizer: torch.optim.Optimizer, factor: float) -> None:
    with torch.no_grad():
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    parameter.grad.mul_(factor)
