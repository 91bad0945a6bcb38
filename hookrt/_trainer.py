"""`Trainer`: builds the bus and plugin stack, then runs fit, validate, test and predict."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from hookrt._bus import Bus, Handle
from hookrt._config import TrainerConfig
from hookrt._data import as_loader_list, check_loader, limited_length
from hookrt._errors import HookrtWarning, MisconfigurationError
from hookrt._events import Event
from hookrt._hooks import subscribe_module_hooks
from hookrt._loop import EvalLoop, FitLoop, Progress
from hookrt._metrics import MetricStore
from hookrt._module import LightningModule
from hookrt._optim import LRSchedulerConfig, parse_optimizers, step_schedulers
from hookrt._plugin import Plugin
from hookrt._seed import add_worker_seeding

if TYPE_CHECKING:
    from hookrt._launch import Strategy

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)


class Trainer:
    """Runs a LightningModule: an event loop whose behaviour comes from plugins.

    The flags follow Lightning's names and meanings. ``plugins`` and
    ``callbacks`` are joined; either may hold plugin instances, Lightning-style
    callbacks, or names of installed plugins. A user's checkpoint or logger
    plugin replaces the default one.
    """

    def __init__(
        self,
        max_epochs: int | None = None,
        min_epochs: int | None = None,
        max_steps: int = -1,
        min_steps: int | None = None,
        max_time: Any = None,
        plugins: Sequence[Any] = (),
        callbacks: Sequence[Any] = (),
        logger: Any = True,
        enable_checkpointing: bool = True,
        enable_progress_bar: bool = True,
        enable_model_summary: bool = True,
        enable_signal_handler: bool = True,
        default_root_dir: Any = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        val_check_interval: int | float = 1.0,
        check_val_every_n_epoch: int | None = 1,
        num_sanity_val_steps: int = 2,
        limit_train_batches: int | float = 1.0,
        limit_val_batches: int | float = 1.0,
        limit_test_batches: int | float = 1.0,
        limit_predict_batches: int | float = 1.0,
        fast_dev_run: bool | int = False,
        truncated_bptt_steps: int | None = None,
        log_every_n_steps: int = 50,
        precision: Any = "32-true",
        accelerator: str = "auto",
        devices: Any = "auto",
        num_nodes: int = 1,
        strategy: Any = "auto",
        deterministic: bool = False,
        detect_anomaly: bool = False,
    ) -> None:
        flags = dict(locals())
        for name in ("self", "plugins", "callbacks"):
            flags.pop(name)
        self.config = TrainerConfig.from_flags(**flags)
        self.bus = Bus(trainer=self)
        self.should_stop = False
        #: Why the last stop was requested through `request_stop`, or None.
        self.stop_reason: str | None = None
        self._forced_stop = False
        self._stop_agreed = False
        self.sanity_checking = False
        self.batch_idx = 0
        self.optimizers: list[torch.optim.Optimizer] = []
        self.lr_scheduler_configs: list[LRSchedulerConfig] = []
        self.num_training_batches: float = 0
        self.num_val_batches: list[float] = []
        self.train_dataloader: Any = None
        self.val_dataloaders: list[Any] = []
        self._progress = Progress()
        self._metrics = MetricStore()
        self._module: LightningModule | None = None
        self._last_loss: torch.Tensor | None = None
        self._step_skipped = False
        self._has_step_schedulers = False
        self._has_epoch_schedulers = False
        self._validation_enabled = False
        self._toggled: list[tuple[torch.nn.Parameter, bool]] = []
        self._pending_rng: dict[str, Any] | None = None
        self._pending_gradients: dict[str, Any] | None = None
        self._batch_step: Any = None
        #: The entry point running now ("fit", "validate", ...), or None.
        self._running: str | None = None
        self._run_handles: list[Handle] = []
        if self.config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        from hookrt._defaults import build_plugin_stack, plugin_items

        items = [*plugin_items(plugins, "plugins"), *plugin_items(callbacks, "callbacks")]
        for plugin in build_plugin_stack(self, items):
            self.bus.register(plugin)

    # ------------------------------------------------------------------ attributes

    @property
    def lightning_module(self) -> LightningModule:
        """The module of the current or last run."""
        if self._module is None:
            raise MisconfigurationError("No module is attached yet. Pass one to fit, validate, test or predict.")
        return self._module

    model = lightning_module

    @property
    def current_epoch(self) -> int:
        """The epoch being trained, counted from 0."""
        return self._progress.current_epoch

    @property
    def global_step(self) -> int:
        """The number of optimizer steps taken (a batch with two optimizers adds two)."""
        return self._progress.global_step

    @property
    def max_epochs(self) -> int:
        """The epoch limit (-1 for none)."""
        return self.config.max_epochs

    @property
    def max_steps(self) -> int:
        """The step limit (-1 for none)."""
        return self.config.max_steps

    @property
    def log_every_n_steps(self) -> int:
        """How often, in optimizer steps, step metrics reach the loggers."""
        return self.config.log_every_n_steps

    @property
    def default_root_dir(self) -> str:
        """The folder under which logs and checkpoints go by default."""
        return self.config.default_root_dir

    @property
    def callback_metrics(self) -> dict[str, torch.Tensor]:
        """The latest value of every metric, as tensors: what checkpointing and early stopping read."""
        metrics = dict(self._metrics.callback_metrics)
        if self._last_loss is not None and "loss" not in metrics:
            metrics["loss"] = self._last_loss.detach()
        return metrics

    @property
    def logged_metrics(self) -> dict[str, torch.Tensor]:
        """The values sent to loggers so far (the latest per key)."""
        return dict(self._metrics.logged_metrics)

    @property
    def progress_bar_metrics(self) -> dict[str, float]:
        """The loss and every metric logged with ``prog_bar=True``, as floats."""
        metrics = {key: float(value) for key, value in self._metrics.progress.items()}
        if self._last_loss is not None:
            metrics.setdefault("loss", float(self._last_loss.detach()))
        return metrics

    @property
    def global_rank(self) -> int:
        """This process's rank among all processes (0 without distributed training)."""
        from hookrt._rank import global_rank

        return global_rank()

    @property
    def world_size(self) -> int:
        """The number of processes training together."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size()
        return int(os.environ.get("WORLD_SIZE", 1))

    @property
    def is_global_zero(self) -> bool:
        """Whether this process writes files and logs."""
        return self.global_rank == 0

    @property
    def strategy(self) -> Strategy | None:
        """The registered plugin that decides how many processes run (DistributedDataParallel), or None."""
        from hookrt._launch import Strategy

        for plugin in self.bus.plugins:
            if isinstance(plugin, Strategy):
                return plugin
        return None

    @property
    def plugins(self) -> tuple[Plugin, ...]:
        """The registered plugins, in registration order."""
        return self.bus.plugins

    @property
    def loggers(self) -> list[Any]:
        """The logger plugins."""
        from hookrt.plugins.logger import Logger

        return [plugin for plugin in self.bus.plugins if isinstance(plugin, Logger)]

    @property
    def logger(self) -> Any:
        """The first logger plugin, or None."""
        loggers = self.loggers
        return loggers[0] if loggers else None

    @property
    def estimated_stepping_batches(self) -> float:
        """The number of optimizer steps fit will take, as far as the flags and loader tell."""
        per_epoch = math.ceil(self.num_training_batches / self.config.accumulate_grad_batches) \
            if not math.isinf(self.num_training_batches) else math.inf
        total = per_epoch * self.config.max_epochs if self.config.max_epochs != -1 else math.inf
        if self.config.max_steps != -1:
            total = min(total, self.config.max_steps)
        return total

    # ------------------------------------------------------------------ entry points

    def fit(self, model: LightningModule, train_dataloaders: Any = None, val_dataloaders: Any = None,
            ckpt_path: Any = None) -> None:
        """Train ``model``, validating as the flags say, optionally resuming from ``ckpt_path``."""
        strategy = self.strategy
        if strategy is not None and strategy.needs_launch(self):
            strategy.launch(self, "fit", model, {"train_dataloaders": train_dataloaders,
                                                 "val_dataloaders": val_dataloaders, "ckpt_path": ckpt_path})
            return
        with self._run("fit", model):
            self._connect_train_data(train_dataloaders, val_dataloaders)
            self._configure_optimizers()
            if ckpt_path is not None:
                from hookrt._checkpoint import restore_checkpoint

                restore_checkpoint(self, self._resolve_ckpt_path(ckpt_path, "fit"), training=True)
            # on_fit_start comes before the loop is built, so a strategy plugin can still swap the loaders.
            self.bus.emit(Event.FIT_START)
            loop = FitLoop(self, self.train_dataloader)
            if ckpt_path is not None:
                from hookrt._checkpoint import apply_partial_gradients

                apply_partial_gradients(self)
            if not loop.done():
                self._run_sanity_check()
                loop.run()
            self.bus.emit(Event.FIT_END)

    def validate(self, model: LightningModule | None = None, dataloaders: Any = None,
                 ckpt_path: Any = None) -> list[dict[str, float]]:
        """Run one validation pass; returns one dict of metrics per loader."""
        strategy = self.strategy
        if strategy is not None and strategy.needs_launch(self):
            return strategy.launch(self, "validate", self._model_for(model, "validate"),
                                   {"dataloaders": dataloaders, "ckpt_path": ckpt_path})
        return self._evaluate("validate", model, dataloaders, ckpt_path)

    def test(self, model: LightningModule | None = None, dataloaders: Any = None,
             ckpt_path: Any = None) -> list[dict[str, float]]:
        """Run the test loop; returns one dict of metrics per loader."""
        strategy = self.strategy
        if strategy is not None and strategy.needs_launch(self):
            return strategy.launch(self, "test", self._model_for(model, "test"),
                                   {"dataloaders": dataloaders, "ckpt_path": ckpt_path})
        return self._evaluate("test", model, dataloaders, ckpt_path)

    def predict(self, model: LightningModule | None = None, dataloaders: Any = None,
                ckpt_path: Any = None) -> list[Any]:
        """Run ``predict_step`` over the loaders; returns the outputs (a list per loader when several)."""
        model = self._model_for(model, "predict")
        strategy = self.strategy
        if strategy is not None and strategy.needs_launch(self):
            return strategy.launch(self, "predict", model,
                                   {"dataloaders": dataloaders, "ckpt_path": ckpt_path})
        with self._run("predict", model):
            loaders = self._eval_loaders("predict", dataloaders)
            if ckpt_path is not None:
                self._load_weights(ckpt_path, "predict")
            results = EvalLoop(self, "predict", loaders, self.config.limit_predict_batches).run()
        return results[0] if len(results) == 1 else results

    def save_checkpoint(self, path: Any, asynchronous: bool = False) -> None:
        """Write a checkpoint of the current state to ``path``.

        Called from a handler, the write waits until the event being dispatched
        has reached every handler, so each plugin's state is that of one moment.

        With ``asynchronous=True``, the state is copied to host memory and the
        file is written from a background thread. During fit, the weights and
        the optimizer state are copied while the next batch runs forward and
        backward. Its optimizer step, and any event after that batch's
        ``before_optimizer_step``, waits for that copy, so training stalls only
        while the other tensors (buffers, plugin states) are copied. Changing them in place
        outside an optimizer step before the copy is done makes the save fail
        with `CheckpointError` instead of writing a mixed state. Changes that
        bypass the tensor's version counter (through ``tensor.data``,
        ``tensor.numpy()`` or the storage) cannot be seen. At most one such write is in flight:
        the next save waits for it. An error in the write is raised by the next
        save or at the end of the run, and the run does not return before the
        file is complete.
        """
        from hookrt._checkpoint import write_checkpoint

        target = os.fspath(path)
        self.bus.after_dispatch(lambda: write_checkpoint(self, target, asynchronous=asynchronous))

    def request_stop(self, reason: str, *, force: bool = False, agreed: bool = False) -> None:
        """Stop fit after the current batch, recording ``reason``.

        Setting ``should_stop`` does the same without a reason. With ``force``,
        the stop happens even when ``min_epochs`` or ``min_steps`` is not reached
        (a signal uses it: the process is about to be killed). Under DDP the
        ranks agree on a stop requested on some of them, and it takes effect
        one batch later on all of them. With ``agreed``, the caller promises
        that every rank makes this call after the same batch, so the stop
        takes effect after the current batch.
        """
        self.should_stop = True
        self.stop_reason = reason
        self._forced_stop = self._forced_stop or force
        self._stop_agreed = self._stop_agreed or agreed
        logger.info("Stop requested: %s", reason)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Send values straight to the loggers (through ``on_log``) at ``step`` or the global step."""
        if metrics and not self.sanity_checking:
            self.bus.emit(Event.LOG, metrics=dict(metrics), step=self.global_step if step is None else step)

    # ------------------------------------------------------------------ run lifecycle

    @contextlib.contextmanager
    def _run(self, stage: str, model: LightningModule) -> Iterator[None]:
        if not isinstance(model, LightningModule):
            raise MisconfigurationError(
                f"Trainer.{stage} needs a hookrt.LightningModule, got {type(model).__name__}. "
                "Subclass hookrt.LightningModule (or `pl.LightningModule` with `import hookrt as pl`)."
            )
        if self._running is not None:
            raise MisconfigurationError(
                f"Trainer.{stage} was called while trainer.{self._running} is still running (from one of its "
                f"handlers). Runs cannot nest: build a second Trainer, or call {stage} after {self._running} returns."
            )
        self._running = stage
        try:
            with self._attached_run(stage, model):
                yield
        finally:
            self._running = None

    @contextlib.contextmanager
    def _attached_run(self, stage: str, model: LightningModule) -> Iterator[None]:
        self._attach(model)
        was_training = model.training
        grad_enabled = torch.is_grad_enabled()
        self.bus.begin_run()
        self.should_stop = False
        self.stop_reason = None
        self._forced_stop = False
        self._stop_agreed = False
        failed = False
        anomaly = torch.autograd.set_detect_anomaly(True) if self.config.detect_anomaly else contextlib.nullcontext()
        try:
            with anomaly:
                self.bus.emit(Event.SETUP, stage=stage)
                self.bus.settle_idle(self)
                yield
        except BaseException as exc:
            failed = True
            self._emit_exception(exc)
            raise
        finally:
            self._teardown(stage, failed)
            model.train(was_training)
            torch.set_grad_enabled(grad_enabled)

    def _attach(self, model: LightningModule) -> None:
        if self._module is not model:
            self._progress = Progress()
            self._metrics = MetricStore()
            self._last_loss = None
        self._module = model
        model.trainer = self
        self.bus.module = model
        self._run_handles = subscribe_module_hooks(self.bus, model, LightningModule)

    def _emit_exception(self, exc: BaseException) -> None:
        # Every handler hears of the failure, so one failing handler cannot keep a logger from recording it.
        if self.bus.emit_to_all(Event.EXCEPTION, exception=exc):
            logger.error("A handler of on_exception failed while handling %r; the original error is raised.", exc)

    def _teardown(self, stage: str, failed: bool) -> None:
        # Every teardown handler runs, so one failing plugin cannot keep others from closing their files.
        try:
            errors = self.bus.emit_to_all(Event.TEARDOWN, stage=stage)
            if errors and not failed:
                raise errors[0]
        finally:
            for handle in self._run_handles:
                handle.remove()
            self._run_handles = []
            self._untoggle_optimizer()
            self.bus.wake_all()

    # ------------------------------------------------------------------ data and optimizers

    def _connect_train_data(self, train_dataloaders: Any, val_dataloaders: Any) -> None:
        module = self.lightning_module
        loader = train_dataloaders if train_dataloaders is not None else self._call_loader_hook("train_dataloader")
        if loader is None:
            raise MisconfigurationError(
                f"No training data: pass train_dataloaders to fit(), or define "
                f"{type(module).__name__}.train_dataloader() to return a DataLoader."
            )
        self.train_dataloader = check_loader(loader, "train_dataloaders" if train_dataloaders is not None
                                             else f"{type(module).__name__}.train_dataloader()")
        add_worker_seeding(self.train_dataloader)
        self.num_training_batches = limited_length(loader, self.config.limit_train_batches, "limit_train_batches")
        if self.num_training_batches == 0:
            raise MisconfigurationError(
                "The training loader has no batches (its length, after limit_train_batches, is 0). Check the "
                "dataset size, batch_size with drop_last=True, and limit_train_batches."
            )
        self.val_dataloaders = self._eval_loaders("validate", val_dataloaders, required=False,
                                                  argument="val_dataloaders")
        self._validation_enabled = bool(self.val_dataloaders) and self._overrides("validation_step") \
            and self.config.limit_val_batches != 0
        module_name = type(self.lightning_module).__name__
        if self.val_dataloaders and not self._overrides("validation_step"):
            warnings.warn(
                f"Validation data was given but {module_name} defines no validation_step(batch, batch_idx), so "
                "fit will not validate. Define validation_step, or drop the validation loader.",
                HookrtWarning,
                stacklevel=4,
            )
        if isinstance(loader, Iterator) and self.config.max_epochs != 1:
            warnings.warn(
                f"The training data is a one-shot iterator ({type(loader).__name__}), so only the first epoch gets "
                "batches. Pass a DataLoader or another re-iterable object, or set max_epochs=1.",
                HookrtWarning,
                stacklevel=4,
            )
        self.config.val_points(self.num_training_batches)  # reject a fractional interval without a length now
        if self._validation_enabled:
            self.config.check_val_interval_fits(self.num_training_batches)

    def _eval_loaders(self, stage: str, dataloaders: Any, required: bool = True,
                      argument: str = "dataloaders") -> list[Any]:
        hook = {"validate": "val_dataloader", "test": "test_dataloader", "predict": "predict_dataloader"}[stage]
        source = argument if dataloaders is not None else f"{type(self.lightning_module).__name__}.{hook}()"
        value = dataloaders if dataloaders is not None else self._call_loader_hook(hook)
        loaders = as_loader_list(value, source)
        if required and not loaders:
            raise MisconfigurationError(
                f"No data for {stage}: pass dataloaders= to trainer.{stage}(), or define "
                f"{type(self.lightning_module).__name__}.{hook}()."
            )
        step = {"validate": "validation_step", "test": "test_step", "predict": "predict_step"}[stage]
        if required and stage != "predict" and not self._overrides(step):
            raise MisconfigurationError(
                f"trainer.{stage}() needs {type(self.lightning_module).__name__}.{step}(batch, batch_idx); "
                "define it."
            )
        for loader in loaders:
            add_worker_seeding(loader)
        return loaders

    def _call_loader_hook(self, hook: str) -> Any:
        module = self.lightning_module
        try:
            return getattr(module, hook)()
        except MisconfigurationError:
            raise
        except Exception as exc:
            raise MisconfigurationError(
                f"{type(module).__name__}.{hook}() raised {type(exc).__name__}: {exc}. Fix the hook; the original "
                "traceback is chained above."
            ) from exc

    def _overrides(self, name: str) -> bool:
        implementation = getattr(type(self.lightning_module), name, None)
        return callable(implementation) and implementation is not getattr(LightningModule, name, None)

    def _configure_optimizers(self) -> None:
        module = self.lightning_module
        try:
            result = module.configure_optimizers()
        except MisconfigurationError:
            raise
        except Exception as exc:
            raise MisconfigurationError(
                f"{type(module).__name__}.configure_optimizers() raised {type(exc).__name__}: {exc}. Fix it; the "
                "original traceback is chained above."
            ) from exc
        self.optimizers, self.lr_scheduler_configs = parse_optimizers(result)
        self._progress.optimizer_steps = [0] * len(self.optimizers)
        self._has_step_schedulers = any(c.interval == "step" for c in self.lr_scheduler_configs)
        self._has_epoch_schedulers = any(c.interval == "epoch" for c in self.lr_scheduler_configs)
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        if not module.automatic_optimization:
            self._add_manual_hooks()

    def _step_schedulers(self, interval: str, count: int, optimizer_idx: int | None = None) -> None:
        step_schedulers(self.lr_scheduler_configs, interval, count, self.callback_metrics, optimizer_idx)

    def _toggle_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        own = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self._untoggle_optimizer()
        for other in self.optimizers:
            for group in other.param_groups:
                for parameter in group["params"]:
                    if id(parameter) not in own and parameter.requires_grad:
                        self._toggled.append((parameter, True))
                        parameter.requires_grad = False

    def _untoggle_optimizer(self) -> None:
        for parameter, flag in self._toggled:
            parameter.requires_grad = flag
        self._toggled = []

    # ------------------------------------------------------------------ manual optimization

    def _add_manual_hooks(self) -> None:
        for index, optimizer in enumerate(self.optimizers):
            def before(opt: Any, args: Any, kwargs: Any, index: int = index) -> None:
                self.bus.emit(Event.BEFORE_OPTIMIZER_STEP, optimizer=opt, optimizer_idx=index)

            def after(opt: Any, args: Any, kwargs: Any, index: int = index) -> None:
                self._progress.global_step += 1
                self._progress.optimizer_steps[index] += 1
                self.bus.emit(Event.OPTIMIZER_STEP, optimizer=opt, optimizer_idx=index, skipped=False)
                if self._has_step_schedulers:
                    self._step_schedulers("step", self._progress.optimizer_steps[index], index)

            self._run_handles.append(_TorchHookHandle(optimizer.register_step_pre_hook(before)))
            self._run_handles.append(_TorchHookHandle(optimizer.register_step_post_hook(after)))

    def _manual_backward(self, loss: torch.Tensor) -> None:
        payload = self.bus.emit(Event.BEFORE_BACKWARD, loss=loss, optimizer_idx=0)
        if payload is not None:
            loss = payload.loss  # type: ignore[attr-defined]
        loss.backward()
        self.bus.emit(Event.AFTER_BACKWARD, loss=loss, optimizer_idx=0)

    # ------------------------------------------------------------------ validation and logging

    def _run_validation(self) -> None:
        # Marked first: a checkpoint written at on_validation_end must record that this position validated.
        self._progress.val_done_at = self._progress.batches_done
        EvalLoop(self, "validate", self.val_dataloaders, self.config.limit_val_batches).run()
        self._emit_log()

    def _run_sanity_check(self) -> None:
        steps = self.config.num_sanity_val_steps
        if not self._validation_enabled or steps == 0:
            return
        saved = (dict(self._metrics.callback_metrics), dict(self._metrics.logged_metrics),
                 dict(self._metrics.progress))
        self.sanity_checking = True
        try:
            self.bus.emit(Event.SANITY_CHECK_START)
            EvalLoop(self, "validate", self.val_dataloaders, steps, sanity_checking=True).run()
            self.bus.emit(Event.SANITY_CHECK_END)
        finally:
            self.sanity_checking = False
            metrics = self._metrics
            metrics.callback_metrics, metrics.logged_metrics, metrics.progress = saved
            metrics.discard_pending()

    def _emit_log(self) -> None:
        if self.sanity_checking:
            return
        metrics = self._metrics.take_pending()
        if metrics:
            self.bus.emit(Event.LOG, metrics=metrics, step=self.global_step)

    def _restore_rng_if_pending(self, resuming_mid_epoch: bool) -> None:
        """Apply the RNG states of a restored checkpoint, unless the loader must be replayed first."""
        if self._pending_rng is None or resuming_mid_epoch:
            return
        from hookrt._checkpoint_io import restore_rng_state

        restore_rng_state(self._pending_rng)
        self._pending_rng = None

    # ------------------------------------------------------------------ evaluation entry points

    def _model_for(self, model: LightningModule | None, stage: str) -> LightningModule:
        if model is not None:
            return model
        if self._module is None:
            raise MisconfigurationError(
                f"trainer.{stage}() got no model and none was fitted before. Pass the model: trainer.{stage}(model)."
            )
        return self._module

    def _evaluate(self, stage: str, model: LightningModule | None, dataloaders: Any,
                  ckpt_path: Any) -> list[dict[str, float]]:
        model = self._model_for(model, stage)
        with self._run(stage, model):
            loaders = self._eval_loaders(stage, dataloaders)
            if ckpt_path is not None:
                self._load_weights(ckpt_path, stage)
            before = dict(self._metrics.callback_metrics)
            limit = self.config.limit_val_batches if stage == "validate" else self.config.limit_test_batches
            EvalLoop(self, stage, loaders, limit).run()
            self._emit_log()
            after = self._metrics.callback_metrics
            changed = {key: value for key, value in after.items() if before.get(key) is not value}
        results: list[dict[str, float]] = []
        for index in range(len(loaders)):
            suffix = f"/dataloader_idx_{index}"
            results.append({key: float(value) for key, value in changed.items()
                            if len(loaders) == 1 or key.endswith(suffix) or "/dataloader_idx_" not in key})
        return results

    def _resolve_ckpt_path(self, ckpt_path: Any, stage: str) -> str:
        if ckpt_path in ("best", "last"):
            from hookrt._checkpoint import find_checkpoint

            return find_checkpoint(self, ckpt_path, stage)
        return os.fspath(ckpt_path)

    def _load_weights(self, ckpt_path: Any, stage: str) -> None:
        from hookrt._checkpoint import restore_checkpoint

        restore_checkpoint(self, self._resolve_ckpt_path(ckpt_path, stage), training=False)


class _TorchHookHandle(Handle):
    """Adapts a ``torch.utils.hooks.RemovableHandle`` to the bus handle interface."""

    def __init__(self, handle: Any) -> None:
        self._torch_handle = handle

    def remove(self) -> None:
        self._torch_handle.remove()

