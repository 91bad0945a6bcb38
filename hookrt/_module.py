"""`LightningModule`: the user's model, with the hooks users of Lightning know.

The module holds no loop logic. The trainer subscribes the hooks a subclass
overrides (see `hookrt._hooks`) and calls the ``*_step`` methods; properties
such as ``current_epoch`` read the trainer the module is attached to.
"""

from __future__ import annotations

import argparse
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from hookrt._errors import MisconfigurationError

if TYPE_CHECKING:
    from hookrt._trainer import Trainer

__all__ = ["LightningModule", "data_loader"]

T = TypeVar("T")
M = TypeVar("M", bound="LightningModule")


def data_loader(fn: Callable[[Any], T]) -> Callable[[Any], T]:
    """Cache a ``*_dataloader`` method: the first call builds the loader, later calls reuse it.

    This is the decorator of the Lightning 0.5 era (``@pl.data_loader``).
    """
    attribute = f"_cached_{fn.__name__}"

    @functools.wraps(fn)
    def cached(self: Any) -> T:
        if attribute not in self.__dict__:
            self.__dict__[attribute] = fn(self)
        return self.__dict__[attribute]

    return cached


class AttributeDict(dict):  # type: ignore[type-arg]
    """A dict whose keys also read as attributes, as ``self.hparams.lr``."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(
                f"hparams has no entry '{key}'. Available: {', '.join(sorted(map(str, self))) or 'none'}."
            ) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value


class LightningModule(nn.Module):
    """An ``nn.Module`` with training hooks, compatible with Lightning 0.5 and 2.x modules.

    Override ``training_step`` and ``configure_optimizers``; everything else is
    optional. Hooks that a subclass does not override cost nothing at run time.
    """

    #: False switches to manual optimization: ``training_step`` calls
    #: ``self.optimizers()``, ``self.manual_backward(loss)`` and ``optimizer.step()``.
    automatic_optimization: bool = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._trainer: Trainer | None = None
        self._hparams: AttributeDict = AttributeDict()

    # ------------------------------------------------------------------ trainer state

    @property
    def trainer(self) -> Trainer:
        """The trainer this module is attached to.

        Raises:
            MisconfigurationError: the module is not attached to a trainer.
        """
        trainer = self.__dict__.get("_trainer")
        if trainer is None:
            raise MisconfigurationError(
                f"{type(self).__name__} is not attached to a Trainer. Call trainer.fit(model), "
                "trainer.validate(model), trainer.test(model) or trainer.predict(model) first."
            )
        return trainer

    @trainer.setter
    def trainer(self, trainer: Trainer | None) -> None:
        self.__dict__["_trainer"] = trainer

    @property
    def current_epoch(self) -> int:
        """The epoch being trained, counted from 0; 0 when not attached."""
        trainer = self.__dict__.get("_trainer")
        return trainer.current_epoch if trainer is not None else 0

    @property
    def global_step(self) -> int:
        """The number of optimizer steps taken; 0 when not attached."""
        trainer = self.__dict__.get("_trainer")
        return trainer.global_step if trainer is not None else 0

    @property
    def device(self) -> torch.device:
        """The device of the module's first parameter or buffer (the CPU when it has none)."""
        for parameter in self.parameters():
            return parameter.device
        for buffer in self.buffers():
            return buffer.device
        return torch.device("cpu")

    @property
    def logger(self) -> Any:
        """The trainer's first logger (its ``.experiment`` is the backend's writer), or None."""
        trainer = self.__dict__.get("_trainer")
        return trainer.logger if trainer is not None else None

    @property
    def hparams(self) -> AttributeDict:
        """The hyperparameters: assignable (0.5 style) or filled by `save_hyperparameters`."""
        return self.__dict__.setdefault("_hparams", AttributeDict())

    @hparams.setter
    def hparams(self, value: Any) -> None:
        if isinstance(value, argparse.Namespace):
            value = vars(value)
        if not isinstance(value, Mapping):
            raise MisconfigurationError(
                f"hparams must be a dict or an argparse.Namespace, got {type(value).__name__}. "
                "Assign a dict, or call self.save_hyperparameters() in __init__."
            )
        self.__dict__["_hparams"] = AttributeDict(value)

    def save_hyperparameters(self, *names: str, ignore: str | list[str] | None = None) -> None:
        """Store the arguments of the calling ``__init__`` in ``self.hparams``.

        Args:
            *names: store only these arguments; all of them when none is given.
            ignore: arguments to leave out (modules and other large objects).
        """
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        if caller is None:
            raise MisconfigurationError("save_hyperparameters() could not find the calling __init__ frame.")
        arguments = inspect.getargvalues(caller)
        values: dict[str, Any] = {}
        for name in arguments.args[1:]:
            values[name] = arguments.locals[name]
        if arguments.varargs:
            values[arguments.varargs] = arguments.locals[arguments.varargs]
        if arguments.keywords:
            values.update(arguments.locals[arguments.keywords])
        skipped = {ignore} if isinstance(ignore, str) else set(ignore or ())
        if names:
            unknown = [name for name in names if name not in values]
            if unknown:
                raise MisconfigurationError(
                    f"save_hyperparameters() got {', '.join(map(repr, unknown))}, which __init__ does not take. "
                    f"Its arguments are: {', '.join(values) or 'none'}."
                )
            values = {name: values[name] for name in names}
        self.hparams.update({key: value for key, value in values.items() if key not in skipped})

    # ------------------------------------------------------------------ logging and optimization

    def log(
        self,
        name: str,
        value: Any,
        *,
        prog_bar: bool = False,
        logger: bool = True,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        reduce_fx: str = "mean",
        batch_size: int | None = None,
        sync_dist: bool = False,
    ) -> None:
        """Record a metric for loggers, the progress bar and ``trainer.callback_metrics``.

        Args:
            name: the metric's key.
            value: a number or a one-element tensor.
            prog_bar: also show it in the progress bar.
            logger: send it to the loggers.
            on_step: log the value at this step (default: True in ``training_step``, else False).
            on_epoch: also log its epoch mean, weighted by batch size (default: False in
                ``training_step``, else True).
            reduce_fx: ``"mean"``, ``"sum"``, ``"max"`` or ``"min"`` for the epoch value.
            batch_size: the weight of this value in the epoch mean; inferred from the batch if None.
            sync_dist: reduce the value across processes under DDP.
        """
        # Positional, because this runs at every step and keyword passing costs more.
        self.trainer._metrics.log(name, value, prog_bar, logger, on_step, on_epoch, reduce_fx, batch_size, sync_dist)

    def log_dict(self, metrics: Mapping[str, Any], **kwargs: Any) -> None:
        """Call `log` for each item of ``metrics`` with the same options."""
        for name, value in metrics.items():
            self.log(name, value, **kwargs)

    def all_gather(self, data: Any, sync_grads: bool = False) -> Any:
        """Gather a tensor, or the tensors in a list, tuple or dict, from every process.

        Each tensor comes back with a new first dimension of size
        ``trainer.world_size``, indexed by rank; every rank must pass the same
        shapes. Without a process group, ``data`` comes back unchanged.

        Args:
            data: a tensor or a container of tensors.
            sync_grads: let gradients flow back through the gather to every rank.
        """
        from hookrt._distributed import all_gather_tensors

        return all_gather_tensors(data, sync_grads=sync_grads)

    def optimizers(self) -> Any:
        """Return the optimizer, or the list of optimizers when there are several."""
        optimizers = self.trainer.optimizers
        return optimizers[0] if len(optimizers) == 1 else list(optimizers)

    def lr_schedulers(self) -> Any:
        """Return the scheduler, the list of schedulers, or None when there is none."""
        schedulers = [config.scheduler for config in self.trainer.lr_scheduler_configs]
        if not schedulers:
            return None
        return schedulers[0] if len(schedulers) == 1 else schedulers

    def manual_backward(self, loss: torch.Tensor) -> None:
        """Run backward on ``loss`` under manual optimization, emitting the backward events."""
        self.trainer._manual_backward(loss)

    def toggle_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Let only ``optimizer``'s parameters require gradients, until `untoggle_optimizer`."""
        self.trainer._toggle_optimizer(optimizer)

    def untoggle_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Restore the ``requires_grad`` flags that `toggle_optimizer` changed."""
        self.trainer._untoggle_optimizer()

    def freeze(self) -> None:
        """Stop gradients for every parameter and switch to evaluation mode."""
        for parameter in self.parameters():
            parameter.requires_grad = False
        self.eval()

    def unfreeze(self) -> None:
        """Let every parameter require gradients again and switch to training mode."""
        for parameter in self.parameters():
            parameter.requires_grad = True
        self.train()

    # ------------------------------------------------------------------ methods users override

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Compute the loss of one batch: a tensor, or a dict with ``"loss"``."""
        raise MisconfigurationError(
            f"{type(self).__name__} does not override training_step(batch, batch_idx). Define it to return "
            "the loss tensor, or a dict with a 'loss' entry."
        )

    def configure_optimizers(self) -> Any:
        """Return the optimizer(s) and optional learning-rate schedulers."""
        raise MisconfigurationError(
            f"{type(self).__name__} does not override configure_optimizers(). Define it to return an "
            "optimizer, e.g. `return torch.optim.Adam(self.parameters(), lr=1e-3)`."
        )

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: torch.optim.Optimizer,
        optimizer_idx: int = 0,
        closure: Callable[[], Any] | None = None,
    ) -> None:
        """Step ``optimizer``. Overrides must call ``optimizer.step(closure=closure)``."""
        optimizer.step(closure=closure)

    def tbptt_split_batch(self, batch: Any, split_size: int) -> list[Any]:
        """Split a batch along its time dimension (dim 1) into chunks of ``split_size`` steps."""
        from hookrt._data import split_along_time

        return split_along_time(batch, split_size)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """Return the prediction for one batch; the default calls ``self(batch)``."""
        return self(batch)

    def train_dataloader(self) -> Any:
        """Return the training loader; None when it is passed to ``fit``."""
        return None

    def val_dataloader(self) -> Any:
        """Return the validation loader or a list of them; None for no validation."""
        return None

    def test_dataloader(self) -> Any:
        """Return the test loader or a list of them."""
        return None

    def predict_dataloader(self) -> Any:
        """Return the prediction loader or a list of them."""
        return None

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add entries to a checkpoint dict before it is written."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Read entries back from a checkpoint dict after the weights were loaded."""

    @classmethod
    def load_from_checkpoint(
        cls: type[M], checkpoint_path: Any, map_location: Any = "cpu", strict: bool = True, **overrides: Any
    ) -> M:
        """Build a module from a checkpoint's saved hyperparameters and load its weights.

        Args:
            checkpoint_path: a checkpoint written by hookrt.
            map_location: where to load tensors, as for ``torch.load``.
            strict: require the checkpoint's keys to match the module's exactly.
            **overrides: constructor arguments that replace the saved hyperparameters.
        """
        from hookrt._checkpoint import build_module_from_checkpoint

        return build_module_from_checkpoint(cls, checkpoint_path, map_location, strict, overrides)


def _add_hook_stubs() -> None:
    """Give the base class a no-op for every hook of the table, so ``super().hook()`` works.

    The trainer subscribes a hook only when a subclass overrides it, so these
    stubs never run unless a subclass calls them.
    """
    from hookrt._hooks import MODULE_HOOKS

    for row in MODULE_HOOKS:
        if hasattr(LightningModule, row.hook):
            continue

        def stub(self: LightningModule, *args: Any, **kwargs: Any) -> None:
            return None

        stub.__name__ = stub.__qualname__ = row.hook
        stub.__doc__ = f"Hook run on the ``{row.event.value}`` event; override it to act there."
        setattr(LightningModule, row.hook, stub)


_add_hook_stubs()
