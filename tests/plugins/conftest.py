"""A fake trainer and a scripted fit, so plugin tests run without the real training loop.

`FakeTrainer` has the attributes plugins read from ``payload.trainer``, and
`fake_fit` emits the events of a short fit on its bus in the order
``Trainer.fit`` emits them. Tests get both through fixtures, because
``--import-mode=importlib`` does not make conftest modules importable.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import hookrt
from hookrt._rank import reset_warning_cache


class FakeTrainer:
    """The trainer attributes that plugins read, with a real bus and a log_metrics that emits on_log."""

    def __init__(
        self,
        root: str,
        module: nn.Module | None = None,
        *,
        max_epochs: int = 2,
        num_training_batches: int | float = 4,
        log_every_n_steps: int = 2,
        is_global_zero: bool = True,
        world_size: int = 1,
        optimizers: list[torch.optim.Optimizer] | None = None,
        lr_scheduler_configs: list[Any] | None = None,
    ) -> None:
        self.module = module if module is not None else TinyModule()
        self.bus = hookrt.Bus(trainer=self, module=self.module)
        self.current_epoch = 0
        self.global_step = 0
        self.max_epochs = max_epochs
        self.max_steps = -1
        self.num_training_batches = num_training_batches
        self.num_val_batches = [2]
        self.batch_idx = 0
        self.is_global_zero = is_global_zero
        self.global_rank = 0 if is_global_zero else 1
        self.world_size = world_size
        self.default_root_dir = root
        self.log_every_n_steps = log_every_n_steps
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self.logged_metrics: dict[str, torch.Tensor] = {}
        self.progress_bar_metrics: dict[str, float] = {}
        self.optimizers = optimizers if optimizers is not None else [torch.optim.SGD(self.module.parameters(), lr=0.1)]
        self.lr_scheduler_configs = lr_scheduler_configs or []
        self.loggers: list[Any] = []
        self.sanity_checking = False
        #: Every (metrics, step) pair handed to log_metrics, in order.
        self.log_calls: list[tuple[dict[str, float], int]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.log_calls.append((dict(metrics), step))
        for name, value in metrics.items():
            self.logged_metrics[name] = torch.tensor(value)
        self.bus.emit("on_log", metrics=dict(metrics), step=step)

    def register(self, *plugins: hookrt.Plugin) -> None:
        for plugin in plugins:
            self.bus.register(plugin)
            if hasattr(plugin, "log_hyperparams"):
                self.loggers.append(plugin)


class TinyModule(nn.Module):
    """A two-layer network with dict hyperparameters, like a LightningModule after save_hyperparameters()."""

    def __init__(self) -> None:
        super().__init__()
        self.hparams: dict[str, Any] = {"lr": 0.1, "hidden": 3, "activation": "relu"}
        self.layer = nn.Linear(2, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.layer(x)))


def loss_at(step: int) -> float:
    """The fake training loss after ``step`` optimizer steps."""
    return 1.0 / (step + 1)


def fake_fit(
    trainer: FakeTrainer,
    *,
    epochs: int | None = None,
    batches: int | None = None,
    accumulate: int = 1,
    val_batches: int = 2,
    sanity_batches: int = 1,
    fail_at: tuple[int, int] | None = None,
    batch_body: Callable[[FakeTrainer, int], None] | None = None,
) -> None:
    """Emit the events of a fit: sanity check, ``epochs`` epochs of ``batches`` batches, validation each epoch.

    The loss of each batch goes into ``progress_bar_metrics["loss"]``. It is
    logged, with the epoch, through ``trainer.log_metrics`` whenever
    ``global_step`` reaches a multiple of ``log_every_n_steps``. The validation
    loss is logged at the end of each epoch, at the same step. ``fail_at``
    (epoch, batch) raises a RuntimeError inside that batch step, after which the
    fit emits ``on_exception`` and ``teardown`` and re-raises, as the trainer does.
    """
    epochs = trainer.max_epochs if epochs is None else epochs
    batches = int(trainer.num_training_batches) if batches is None else batches
    bus = trainer.bus
    bus.begin_run()
    bus.emit("setup", stage="fit")
    try:
        bus.emit("on_fit_start")
        if sanity_batches:
            trainer.sanity_checking = True
            bus.emit("on_sanity_check_start")
            _validate(trainer, sanity_batches, sanity=True)
            bus.emit("on_sanity_check_end")
            trainer.sanity_checking = False
        bus.emit("on_train_start")
        for epoch in range(epochs):
            trainer.current_epoch = epoch
            bus.emit("on_epoch_start", epoch=epoch)
            for batch_idx in range(batches):
                _train_batch(trainer, epoch, batch_idx, batches, accumulate, fail_at, batch_body)
            _validate(trainer, val_batches, sanity=False)
            trainer.log_metrics({"val_loss": 2 * loss_at(trainer.global_step)}, trainer.global_step)
            bus.emit("on_epoch_end", epoch=epoch)
        bus.emit("on_train_end")
        bus.emit("on_fit_end")
    except BaseException as exc:
        bus.emit("on_exception", exception=exc)
        bus.emit("teardown", stage="fit")
        raise
    bus.emit("teardown", stage="fit")


def _train_batch(
    trainer: FakeTrainer,
    epoch: int,
    batch_idx: int,
    batches: int,
    accumulate: int,
    fail_at: tuple[int, int] | None,
    batch_body: Callable[[FakeTrainer, int], None] | None,
) -> None:
    bus = trainer.bus
    batch = torch.full((2, 2), float(batch_idx))
    trainer.batch_idx = batch_idx
    bus.emit("on_batch_start", batch=batch, batch_idx=batch_idx)
    step_before = trainer.global_step

    def step(payload: Any) -> None:
        if fail_at == (epoch, batch_idx):
            raise RuntimeError(f"fake failure in epoch {epoch}, batch {batch_idx}")
        loss = torch.tensor(loss_at(trainer.global_step))
        bus.emit("before_backward", loss=loss)
        bus.emit("after_backward", loss=loss)
        if (batch_idx + 1) % accumulate == 0 or batch_idx + 1 == batches:
            for index, optimizer in enumerate(trainer.optimizers):
                bus.emit("before_optimizer_step", optimizer=optimizer, optimizer_idx=index)
                optimizer.step()
                bus.emit("optimizer_step", optimizer=optimizer, optimizer_idx=index, skipped=False)
                trainer.global_step += 1
        if batch_body is not None:
            batch_body(trainer, batch_idx)

    bus.wrap("batch_step", step, batch=batch, batch_idx=batch_idx)
    trainer.progress_bar_metrics["loss"] = loss_at(trainer.global_step)
    bus.emit("on_batch_end", batch=batch, batch_idx=batch_idx, outputs={"loss": loss_at(trainer.global_step)})
    every = trainer.log_every_n_steps
    if trainer.global_step // every > step_before // every:
        trainer.log_metrics({"loss": loss_at(trainer.global_step), "epoch": float(epoch)}, trainer.global_step)


def _validate(trainer: FakeTrainer, batches: int, *, sanity: bool) -> None:
    bus = trainer.bus
    bus.emit("on_validation_start", sanity_checking=sanity)
    for batch_idx in range(batches):
        batch = torch.zeros(2, 2)
        bus.emit("on_validation_batch_start", batch=batch, batch_idx=batch_idx, sanity_checking=sanity)
        bus.emit("on_validation_batch_end", batch=batch, batch_idx=batch_idx, outputs=None, sanity_checking=sanity)
    if not sanity:
        trainer.progress_bar_metrics["val_loss"] = 2 * loss_at(trainer.global_step)
    bus.emit("on_validation_end", sanity_checking=sanity)


@pytest.fixture
def make_trainer(tmp_path: Any) -> Callable[..., FakeTrainer]:
    """Return a factory of fake trainers whose default_root_dir is the test's tmp_path."""

    def make(**options: Any) -> FakeTrainer:
        return FakeTrainer(str(tmp_path), **options)

    return make


@pytest.fixture
def run_fit() -> Callable[..., None]:
    """Return `fake_fit`."""
    return fake_fit


@pytest.fixture
def fit_helpers() -> types.SimpleNamespace:
    """Return the module's helpers: `loss_at` and `TinyModule`."""
    return types.SimpleNamespace(loss_at=loss_at, TinyModule=TinyModule)


@pytest.fixture(autouse=True)
def _fresh_warning_cache() -> None:
    """Let every test see the warnings that rank_zero_warn gives once per process."""
    reset_warning_cache()
