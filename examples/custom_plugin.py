"""Two plugins written from scratch, and a run that uses them.

`GradientNormMonitor` listens to ``before_optimizer_step``, where gradients
are final (accumulated, and unscaled when mixed precision scales the loss)
and reports their norm before the clipping plugin clips them. `StepTimer` wraps the
``batch_step`` wrapper point, the forward, backward and optimizer step of
one batch, and measures how long it takes.

Together they show the parts of the plugin API a plugin author needs:

- ``@hookrt.on(event, ...)`` subscribes a method; it takes one argument, the
  event's payload, whose fields are listed in the event reference;
- ``order=`` and ``before=`` place a handler among the others on its event;
- ``@hookrt.around(point)`` wraps a step and must call ``proceed()`` once;
- ``critical = False`` turns a failure of the plugin into a logged error
  instead of the end of training;
- ``state_dict`` / ``load_state_dict`` carry a plugin's state through checkpoints;
- ``trainer.log_metrics`` sends values to every logger.

The run trains a small regression network on synthetic data with both plugins
and gradient clipping at norm 1.0. It prints where the plugins' handlers sit in
the bus's handler order, then what they measured: the largest gradient norm is
above 1.0 because the monitor runs before the clipping.
Run it with ``python examples/custom_plugin.py``.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt
from hookrt.plugins import GradientClipping


class GradientNormMonitor(hookrt.Plugin):
    """Log the total gradient norm of each optimizer's parameters every ``every_n_steps`` optimizer steps.

    Args:
        every_n_steps: log on every Nth optimizer step.
        norm_type: the p of the p-norm (2.0 for the Euclidean norm).
    """

    # A monitor must never end a training run. With critical = False, an exception in one of these handlers is
    # logged once with its traceback, the plugin is switched off for the rest of the run and training goes on.
    critical = False

    def __init__(self, every_n_steps: int = 10, norm_type: float = 2.0) -> None:
        self.every_n_steps = every_n_steps
        self.norm_type = norm_type
        #: The largest norm seen so far, kept across checkpoints.
        self.max_norm = 0.0

    # The handler takes one argument, the payload: here an OptimizerPayload with .trainer, .module,
    # .optimizer and .optimizer_idx. before=("GradientClipping",) places it ahead of the clipping plugin on
    # this event, so it measures the gradients before they are clipped. A fixed interval could be written as
    # every=10 here, but this one comes from the constructor, so the handler checks it itself.
    @hookrt.on("before_optimizer_step", before=("GradientClipping",))
    def measure(self, payload: Any) -> None:
        trainer = payload.trainer
        step = trainer.global_step + 1  # the step about to be applied
        if step % self.every_n_steps:
            return
        gradients = [p.grad for group in payload.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not gradients:
            return
        norms = torch.stack([torch.linalg.vector_norm(gradient, self.norm_type) for gradient in gradients])
        norm = float(torch.linalg.vector_norm(norms, self.norm_type))
        self.max_norm = max(self.max_norm, norm)
        # log_metrics goes out as an on_log event, which every logger plugin receives.
        trainer.log_metrics({f"grad_norm/optimizer_{payload.optimizer_idx}": norm}, step=step)

    # Called when a checkpoint is written. The dict may contain only tensors, numbers, strings and containers
    # of them, so that the checkpoint loads with torch.load(weights_only=True).
    def state_dict(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    # Called when fit resumes from a checkpoint, with what state_dict returned then.
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.max_norm = float(state_dict["max_norm"])


class StepTimer(hookrt.Plugin):
    """Time the batch step (forward, backward and optimizer step) and log the mean of each epoch."""

    critical = False

    def __init__(self) -> None:
        self._seconds: list[float] = []
        #: The mean batch step time of each finished epoch, in milliseconds.
        self.epoch_means_ms: list[float] = []

    # A wrapper gets the payload and `proceed`, which runs the inner wrappers and then the step itself. It must
    # call proceed() exactly once (the bus raises PluginError otherwise), and returning None passes the step's
    # result on unchanged. Lower orders wrap further out, so order=-100 also times the batch_step wrappers at
    # the default order 0, such as the DDP plugin's.
    @hookrt.around("batch_step", order=-100)
    def time_step(self, payload: Any, proceed: Any) -> None:
        start = time.perf_counter()
        proceed()
        self._seconds.append(time.perf_counter() - start)

    # An epoch cancelled before its first batch (hookrt.CancelEpoch) still ends with on_epoch_end, so the
    # handler must cope with an empty list.
    @hookrt.on("on_epoch_end")
    def report(self, payload: Any) -> None:
        if not self._seconds:
            return
        mean_ms = 1000 * sum(self._seconds) / len(self._seconds)
        self._seconds = []
        self.epoch_means_ms.append(mean_ms)
        trainer = payload.trainer
        trainer.log_metrics({"step_time_ms": mean_ms}, step=trainer.global_step)


class Regressor(hookrt.LightningModule):
    """A two-layer network fitting y = sin(x1) + x2 * x3 with noise."""

    def __init__(self, lr: float = 1e-2, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def _data(self, count: int, seed: int) -> TensorDataset:
        generator = torch.Generator().manual_seed(seed)
        x = torch.rand(count, 3, generator=generator) * 2 * math.pi - math.pi
        y = torch.sin(x[:, :1]) + x[:, 1:2] * x[:, 2:3] / 4 + 0.05 * torch.randn(count, 1, generator=generator)
        return TensorDataset(x, y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._data(2048, self.hparams.seed), batch_size=64, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._data(512, self.hparams.seed + 1), batch_size=256)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train with two plugins written from scratch.")
    parser.add_argument("--max-epochs", type=int, default=5, help="epochs to train (default: 5)")
    parser.add_argument("--default-root-dir", default="custom_plugin_run",
                        help="folder for TensorBoard logs and checkpoints (default: ./custom_plugin_run)")
    parser.add_argument("--every-n-steps", type=int, default=10, help="log the gradient norm every N steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the weights")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or handler-order table")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train the regressor with both plugins; returns the final ``val_loss``, the max gradient norm and step time."""
    args = parse_args(argv)
    hookrt.seed_everything(args.seed)
    monitor = GradientNormMonitor(every_n_steps=args.every_n_steps)
    timer = StepTimer()
    clipping = GradientClipping(clip_val=1.0)
    trainer = hookrt.Trainer(
        max_epochs=args.max_epochs,
        default_root_dir=args.default_root_dir,
        plugins=[monitor, timer, clipping],
        enable_progress_bar=not args.quiet,
        enable_model_summary=False,
    )
    if not args.quiet:
        # The resolved order of the handlers, per event: the first thing to read when plugins interact.
        table = trainer.bus.describe()
        print(hookrt.BusTable(table.for_target("batch_step") + table.for_target("before_optimizer_step")))
    trainer.fit(Regressor(seed=args.seed))

    results = {
        "val_loss": float(trainer.callback_metrics["val_loss"]),
        "max_grad_norm": monitor.max_norm,
        "step_time_ms": timer.epoch_means_ms[-1],
    }
    print(f"val_loss {results['val_loss']:.4f}; largest gradient norm {results['max_grad_norm']:.3f}; "
          f"mean batch step {results['step_time_ms']:.2f} ms in the last epoch")
    print(f"TensorBoard logs: {trainer.logger.log_dir}")
    return results


if __name__ == "__main__":
    main()
