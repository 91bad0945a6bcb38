"""A training job that the resume tests run in a subprocess, kill, and resume.

It trains a small network with dropout on a shuffled loader whose dataset adds
torch.randn noise to every sample. Adam steps after every 2 batches, with a
cosine learning-rate schedule per step, for 200 optimizer steps in all, and
validation runs twice per epoch. Every ``--every`` optimizer steps it writes
``ROOT/step.ckpt`` with ``trainer.save_checkpoint``, which replaces the file
atomically. A SignalHandler turns SIGTERM or SIGINT into ``ROOT/signal.ckpt``
and a clean stop.

When training finishes, the job writes the module's state_dict to ``--out``
with torch.save, prints one JSON line with the first and last global step and
exits with status 0. When a signal stopped it, it writes nothing to ``--out``,
prints the JSON line and exits with status 128 + the signal number, as shells
report a job ended by that signal.

Usage::

    python tests/_resume_job.py --root DIR --out FILE [--resume CKPT] [--every N] [--batch-sleep SECONDS]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import hookrt
from hookrt import Event
from hookrt.plugins.signals import SignalHandler

EPOCHS = 4
BATCH_SIZE = 4
TRAIN_SAMPLES = 400  # 100 batches per epoch, 50 optimizer steps with accumulation over 2


class NoisyDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Fixed points whose inputs get fresh torch.randn noise on every read."""

    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, 6, generator=generator)
        self.y = self.x[:, :3].sum(dim=1, keepdim=True) - self.x[:, 3:].prod(dim=1, keepdim=True)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index] + 0.1 * torch.randn(6), self.y[index]


class DropoutNet(hookrt.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        steps = EPOCHS * TRAIN_SAMPLES // BATCH_SIZE // 2
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=1e-4)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class PeriodicCheckpoint(hookrt.Plugin):
    """Write ``path`` at the end of each batch in which the global step reached a multiple of ``every``."""

    def __init__(self, path: str, every: int) -> None:
        self.path = path
        self.every = every
        self.saved_step = -1

    @hookrt.on(Event.BATCH_END)
    def save(self, payload: Any) -> None:
        step = payload.trainer.global_step
        if step % self.every == 0 and step != self.saved_step:
            self.saved_step = step
            payload.trainer.save_checkpoint(self.path)


class Pace(hookrt.Plugin):
    """Sleep before each batch, so that a test can stop the job at a chosen step."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    @hookrt.on(Event.BATCH_START)
    def wait(self, payload: Any) -> None:
        time.sleep(self.seconds)


class StepRange(hookrt.Plugin):
    """Record the global step at which training started and the one it ended at."""

    def __init__(self) -> None:
        self.first: int | None = None
        self.last: int | None = None

    @hookrt.on(Event.TRAIN_START)
    def start(self, payload: Any) -> None:
        self.first = payload.trainer.global_step

    @hookrt.on(Event.TRAIN_END)
    def end(self, payload: Any) -> None:
        self.last = payload.trainer.global_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder of step.ckpt and signal.ckpt")
    parser.add_argument("--out", required=True, help="file to write the final state_dict to")
    parser.add_argument("--resume", help="checkpoint to resume from")
    parser.add_argument("--every", type=int, default=10, help="optimizer steps between writes of step.ckpt")
    parser.add_argument("--batch-sleep", type=float, default=0.0, help="seconds to sleep before each batch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # One thread, so the job does not compete with the test that polls it, and the results do not depend on
    # how many cores the machine has.
    torch.set_num_threads(1)

    torch.manual_seed(0)
    model = DropoutNet()
    train = DataLoader(NoisyDataset(TRAIN_SAMPLES, seed=1), batch_size=BATCH_SIZE, shuffle=True)
    val = DataLoader(NoisyDataset(16, seed=2), batch_size=BATCH_SIZE)
    handler = SignalHandler()
    steps = StepRange()
    periodic = PeriodicCheckpoint(os.path.join(args.root, "step.ckpt"), args.every)
    plugins: list[hookrt.Plugin] = [handler, steps, periodic]
    if args.batch_sleep > 0:
        plugins.append(Pace(args.batch_sleep))
    trainer = hookrt.Trainer(
        max_epochs=EPOCHS, accumulate_grad_batches=2, val_check_interval=0.5, default_root_dir=args.root,
        plugins=plugins, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train, val, ckpt_path=args.resume)

    print(json.dumps({"first_step": steps.first, "last_step": steps.last, "signal": handler.received}), flush=True)
    if handler.received is not None:
        return 128 + handler.received
    torch.save(model.state_dict(), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
