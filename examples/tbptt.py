"""A GRU trained with truncated backpropagation through time to predict a noisy sine wave.

Each training sequence is 200 noisy samples of a sine wave with its own
frequency and phase. The target at each time step is the clean value one step
ahead. With ``truncated_bptt_steps=25`` the trainer cuts every batch along
dim 1 (time) into 8 chunks of 25 steps and runs an optimizer step per chunk.
``training_step`` receives a fourth argument, ``hiddens``: the hidden state
that the previous chunk returned under ``"hiddens"``, detached by the trainer
so gradients stop at the chunk boundary (None for the first chunk).

Validation runs the whole sequences at once and logs the mean squared error
(``val_mse``) next to that of a naive forecast that repeats the last noisy
input (``naive_mse``), which the model should beat by a wide margin.

Run it with ``python examples/tbptt.py``.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt
from hookrt.plugins import ModelCheckpoint

SEQUENCE_LENGTH = 200
#: The noise on the inputs; the targets are clean.
NOISE_STD = 0.2
#: Range of the angular frequency, in radians per time step.
MIN_FREQUENCY = 0.05
MAX_FREQUENCY = 0.3


def noisy_sines(count: int, generator: torch.Generator) -> TensorDataset:
    """Return ``count`` (inputs, targets) pairs, each of shape (SEQUENCE_LENGTH, 1).

    The target at step t is the clean wave at step t + 1.
    """
    frequency = MIN_FREQUENCY + (MAX_FREQUENCY - MIN_FREQUENCY) * torch.rand(count, 1, generator=generator)
    phase = 2 * math.pi * torch.rand(count, 1, generator=generator)
    steps = torch.arange(SEQUENCE_LENGTH + 1, dtype=torch.float32)
    clean = torch.sin(frequency * steps + phase)
    noisy = clean[:, :-1] + NOISE_STD * torch.randn(count, SEQUENCE_LENGTH, generator=generator)
    return TensorDataset(noisy.unsqueeze(-1), clean[:, 1:].unsqueeze(-1))


class SineForecaster(hookrt.LightningModule):
    """A one-layer GRU with a linear read-out.

    Args:
        hidden_size: the GRU's state size.
        lr: the Adam learning rate.
        num_sequences: training sequences (validation uses a quarter as many).
        batch_size: sequences per batch.
        seed: seed of the generated data.
    """

    def __init__(
        self,
        hidden_size: int = 32,
        lr: float = 1e-2,
        num_sequences: int = 256,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.gru = nn.GRU(input_size=1, hidden_size=hidden_size, batch_first=True)
        self.readout = nn.Linear(hidden_size, 1)

    def forward(self, inputs: torch.Tensor, hiddens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        states, last = self.gru(inputs, hiddens)
        return self.readout(states), last

    def training_step(self, batch: Any, batch_idx: int, hiddens: torch.Tensor | None) -> dict[str, Any]:
        inputs, targets = batch  # one chunk: (batch, truncated_bptt_steps, 1)
        predictions, last = self(inputs, hiddens)
        loss = F.mse_loss(predictions, targets)
        self.log("train_mse", loss, prog_bar=True)
        # The trainer detaches "hiddens" and hands it to the next chunk of the same batch.
        return {"loss": loss, "hiddens": last}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets = batch
        predictions, _ = self(inputs)
        self.log("val_mse", F.mse_loss(predictions, targets), prog_bar=True)
        self.log("naive_mse", F.mse_loss(inputs, targets))

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=2)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_mse"}}

    def train_dataloader(self) -> DataLoader:
        data = noisy_sines(self.hparams.num_sequences, torch.Generator().manual_seed(self.hparams.seed))
        return DataLoader(data, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        data = noisy_sines(self.hparams.num_sequences // 4, torch.Generator().manual_seed(self.hparams.seed + 1))
        return DataLoader(data, batch_size=self.hparams.batch_size)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a GRU with truncated BPTT to forecast a noisy sine wave.")
    parser.add_argument("--max-epochs", type=int, default=15, help="epochs to train (default: 15)")
    parser.add_argument("--default-root-dir", default="tbptt_run",
                        help="folder for TensorBoard logs and checkpoints (default: ./tbptt_run)")
    parser.add_argument("--tbptt-steps", type=int, default=25,
                        help="time steps per chunk; gradients do not cross chunk boundaries (default: 25)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the weights")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or model summary")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train the forecaster; returns the last ``val_mse`` and ``naive_mse``."""
    args = parse_args(argv)
    hookrt.seed_everything(args.seed)
    model = SineForecaster(seed=args.seed)

    checkpoint = ModelCheckpoint(monitor="val_mse", filename="tbptt-{epoch}-{val_mse:.4f}")
    trainer = hookrt.Trainer(
        max_epochs=args.max_epochs,
        default_root_dir=args.default_root_dir,
        plugins=[checkpoint],
        enable_progress_bar=not args.quiet,
        enable_model_summary=not args.quiet,
        truncated_bptt_steps=args.tbptt_steps,
        log_every_n_steps=10,
    )
    trainer.fit(model)

    scores = {name: float(trainer.callback_metrics[name]) for name in ("val_mse", "naive_mse")}
    print(f"validation MSE: {scores['val_mse']:.4f} (repeating the last noisy input: {scores['naive_mse']:.4f})")
    print(f"optimizer steps: {trainer.global_step} ({SEQUENCE_LENGTH // args.tbptt_steps} per batch)")
    print(f"best checkpoint: {checkpoint.best_model_path}")
    print(f"TensorBoard logs: {trainer.logger.log_dir}")
    return scores


if __name__ == "__main__":
    main()
