"""A training job that the fault-injection tests start, kill, signal and resume.

It trains a small network with dropout on a shuffled loader whose dataset adds
torch.randn noise to every read. Adam steps after every 2 batches with a cosine
learning-rate schedule per step, for TOTAL_STEPS optimizer steps, and validation
runs twice per epoch. A ModelCheckpoint writes ``ROOT/ckpt/last.ckpt`` every
``--every`` optimizer steps, and a SignalHandler turns SIGTERM or SIGINT into
``ROOT/signal.ckpt`` and a clean stop.

Faults, chosen by the environment variable ``HOOKRT_FAULT``:

- ``kill-before-rename:K``: the K-th save of ``last.ckpt`` in this process
  writes its temporary file completely and then SIGKILLs the process just
  before the rename.
- ``enospc:K``: the K-th save of ``last.ckpt`` in this process fails with
  ``OSError(ENOSPC)`` after part of the temporary file is written, as a full
  disk does.

``--hold PHASE:N`` makes the job wait inside a phase until a signal arrives,
so a test can deliver the signal exactly there. PHASE is ``train`` (the N-th
batch start), ``validation`` (the N-th validation batch end outside the sanity
check) or ``save`` (the N-th ``on_save_checkpoint``). On entering the hold,
the job writes the phase name to ``ROOT/holding``.

When training finishes, the job writes the module's state_dict to ``--out``,
prints one JSON line with the first and last global step and the signal
received, and exits with status 0. When a signal stopped it, it writes nothing
to ``--out``, prints the JSON line and exits with status 128 + the signal
number. A hookrt error is printed as one ``error:`` line, with exit status 1.

Usage::

    python train_job.py --root DIR --out FILE [--resume CKPT] [--every N] [--batch-sleep S] [--hold PHASE:N]
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import hookrt
import hookrt._checkpoint_io as checkpoint_io
from hookrt import Event
from hookrt.plugins.checkpoint import ModelCheckpoint
from hookrt.plugins.signals import SignalHandler

EPOCHS = 4
BATCH_SIZE = 4
TRAIN_SAMPLES = 480  # 120 batches per epoch, 60 optimizer steps with accumulation over 2
TOTAL_STEPS = EPOCHS * TRAIN_SAMPLES // BATCH_SIZE // 2
#: The maximum time a hold waits for its signal, in seconds.
HOLD_TIMEOUT = 60.0


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
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=TOTAL_STEPS, eta_min=1e-4)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


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


class Hold(hookrt.Plugin):
    """Wait inside the N-th occurrence of a phase until the signal handler has recorded a signal."""

    def __init__(self, phase: str, occurrence: int, marker: str, handler: SignalHandler) -> None:
        self.phase = phase
        self.occurrence = occurrence
        self.marker = marker
        self.handler = handler
        self.count = 0

    @hookrt.on(Event.BATCH_START)
    def in_training(self, payload: Any) -> None:
        self._reach("train")

    @hookrt.on(Event.VALIDATION_BATCH_END)
    def in_validation(self, payload: Any) -> None:
        if not payload.sanity_checking:
            self._reach("validation")

    @hookrt.on(Event.SAVE_CHECKPOINT)
    def in_save(self, payload: Any) -> None:
        self._reach("save")

    def _reach(self, phase: str) -> None:
        if phase != self.phase:
            return
        self.count += 1
        if self.count != self.occurrence:
            return
        with open(self.marker, "w", encoding="utf-8") as file:
            file.write(phase)
        deadline = time.monotonic() + HOLD_TIMEOUT
        while self.handler.received is None and time.monotonic() < deadline:
            time.sleep(0.005)


def is_last_checkpoint_temp(path: Any) -> bool:
    return os.path.basename(os.fspath(path)).startswith(".last.ckpt.tmp-")


def install_fault(spec: str) -> None:
    """Patch the checkpoint writer of this process as ``HOOKRT_FAULT`` requests."""
    kind, _, count_text = spec.partition(":")
    target = int(count_text)
    saves = 0
    if kind == "kill-before-rename":
        real_replace = os.replace

        def replace(source: Any, destination: Any, **kwargs: Any) -> None:
            nonlocal saves
            if is_last_checkpoint_temp(source):
                saves += 1
                if saves == target:
                    os.kill(os.getpid(), signal.SIGKILL)
            real_replace(source, destination, **kwargs)

        os.replace = replace  # type: ignore[assignment]
    elif kind == "enospc":

        class FullDisk:
            """A binary file whose writes fail with ENOSPC once 256 bytes are written."""

            def __init__(self, file: Any) -> None:
                self.file = file
                self.written = 0

            def write(self, data: bytes) -> int:
                if self.written + len(data) > 256:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                self.written += len(data)
                return int(self.file.write(data))

            def __getattr__(self, name: str) -> Any:
                return getattr(self.file, name)

            def __enter__(self) -> FullDisk:
                return self

            def __exit__(self, *exc_info: object) -> None:
                self.file.close()

        def open_for_save(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            nonlocal saves
            file = open(path, mode, *args, **kwargs)
            if is_last_checkpoint_temp(path):
                saves += 1
                if saves == target:
                    return FullDisk(file)
            return file

        # A module global shadows the builtin, so only the checkpoint writer calls this open.
        checkpoint_io.open = open_for_save  # type: ignore[attr-defined]
    else:
        raise SystemExit(f"unknown HOOKRT_FAULT {spec!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--root", required=True, help="folder of ckpt/last.ckpt, signal.ckpt and holding")
    parser.add_argument("--out", required=True, help="file to write the final state_dict to")
    parser.add_argument("--resume", help="checkpoint to resume from")
    parser.add_argument("--every", type=int, default=5, help="optimizer steps between writes of last.ckpt")
    parser.add_argument("--batch-sleep", type=float, default=0.0, help="seconds to sleep before each batch")
    parser.add_argument("--hold", help="PHASE:N, wait in the N-th occurrence of PHASE until a signal arrives")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # One thread, so the job does not compete with the test that polls it, and the weights do not depend on
    # how many cores the machine has.
    torch.set_num_threads(1)
    fault = os.environ.get("HOOKRT_FAULT")
    if fault:
        install_fault(fault)

    torch.manual_seed(0)
    model = DropoutNet()
    train = DataLoader(NoisyDataset(TRAIN_SAMPLES, seed=1), batch_size=BATCH_SIZE, shuffle=True)
    val = DataLoader(NoisyDataset(16, seed=2), batch_size=BATCH_SIZE)
    handler = SignalHandler()
    steps = StepRange()
    checkpoint = ModelCheckpoint(dirpath=os.path.join(args.root, "ckpt"), save_top_k=0, save_last=True,
                                 every_n_train_steps=args.every)
    plugins: list[hookrt.Plugin] = [handler, steps, checkpoint]
    if args.batch_sleep > 0:
        plugins.append(Pace(args.batch_sleep))
    if args.hold:
        phase, _, occurrence = args.hold.partition(":")
        plugins.append(Hold(phase, int(occurrence), os.path.join(args.root, "holding"), handler))
    trainer = hookrt.Trainer(
        max_epochs=EPOCHS, accumulate_grad_batches=2, val_check_interval=0.5, default_root_dir=args.root,
        plugins=plugins, logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    try:
        trainer.fit(model, train, val, ckpt_path=args.resume)
    except hookrt.HookrtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    print(json.dumps({"first_step": steps.first, "last_step": steps.last, "signal": handler.received}), flush=True)
    if handler.received is not None:
        return 128 + handler.received
    torch.save(model.state_dict(), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
