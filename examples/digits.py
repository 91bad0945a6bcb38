"""Train a small CNN on scikit-learn's handwritten digits, then test the best checkpoint.

The data is ``sklearn.datasets.load_digits``: 1797 grey 8x8 images of the
digits 0-9 that ship with scikit-learn, so nothing is downloaded. They are
split into train, validation and test sets with a fixed seed. The run shows
the pieces of a real job:

- the module logs ``val_loss`` and ``val_acc`` (the latter in the progress bar);
- `EarlyStopping` ends fit when ``val_loss`` stops improving;
- `ModelCheckpoint` keeps the checkpoint with the best ``val_acc``;
- the default TensorBoard logger writes the curves under ``{default_root_dir}/hookrt_logs``;
- ``trainer.test(ckpt_path="best")`` scores the best checkpoint on the test set.

Run it with ``python examples/digits.py`` (``--help`` lists the options), or
through the command line tool: ``hookrt fit examples/digits.py:DigitsModule``.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt
from hookrt.plugins import EarlyStopping, ModelCheckpoint

#: Share of the 1797 images in the validation and in the test set; the rest is for training.
VAL_FRACTION = 0.15
TEST_FRACTION = 0.15
NUM_CLASSES = 10
#: load_digits pixel values are counts of set pixels in 4x4 blocks: 0 to 16.
MAX_PIXEL = 16.0
#: Validation runs without a lower val_loss before EarlyStopping ends fit.
PATIENCE = 3


def load_splits(seed: int) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Load the digits as (N, 1, 8, 8) float images in [0, 1] and split them into train, val and test.

    The split depends on ``seed`` only, so runs with one seed see the same test images.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / MAX_PIXEL
    labels = torch.tensor(digits.target, dtype=torch.long)

    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    val_size = round(len(labels) * VAL_FRACTION)
    test_size = round(len(labels) * TEST_FRACTION)
    val_index = order[:val_size]
    test_index = order[val_size:val_size + test_size]
    train_index = order[val_size + test_size:]
    return (
        TensorDataset(images[train_index], labels[train_index]),
        TensorDataset(images[val_index], labels[val_index]),
        TensorDataset(images[test_index], labels[test_index]),
    )


class DigitsModule(hookrt.LightningModule):
    """Two convolution layers and a linear head over 8x8 digit images.

    Every argument has a default, so ``DigitsModule()`` builds a working model
    (``hookrt fit`` constructs it that way). The module defines its own
    dataloaders; the datasets are loaded on first use.

    Args:
        lr: the Adam learning rate.
        batch_size: images per training batch (evaluation uses batches twice as large).
        channels: filters in the first convolution; the second has twice as many.
        dropout: dropout probability before the classifier.
        split_seed: the seed of the train/val/test split.
    """

    def __init__(
        self,
        lr: float = 3e-3,
        batch_size: int = 64,
        channels: int = 32,
        dropout: float = 0.25,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(2 * channels * 4 * 4, 128),
            nn.ReLU(),
            nn.Linear(128, NUM_CLASSES),
        )
        self._splits: tuple[TensorDataset, TensorDataset, TensorDataset] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, accuracy = self._evaluate(batch)
        self.log("val_loss", loss)
        self.log("val_acc", accuracy, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        loss, accuracy = self._evaluate(batch)
        self.log("test_loss", loss)
        self.log("test_acc", accuracy)

    def _evaluate(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        logits = self(images)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return F.cross_entropy(logits, labels), accuracy

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    # ------------------------------------------------------------------ data

    def _datasets(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        if self._splits is None:
            self._splits = load_splits(self.hparams.split_seed)
        return self._splits

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._datasets()[0], batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._datasets()[1], batch_size=2 * self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._datasets()[2], batch_size=2 * self.hparams.batch_size)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a small CNN on scikit-learn's 8x8 handwritten digits.")
    parser.add_argument("--max-epochs", type=int, default=15,
                        help="upper limit on epochs; early stopping may end the run sooner (default: 15)")
    parser.add_argument("--default-root-dir", default="digits_run",
                        help="folder for TensorBoard logs and checkpoints (default: ./digits_run)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data split, the weight initialisation and the shuffling (default: 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size (default: 64)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: 0.003)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, model summary or log lines")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train, validate and test; returns the test metrics (``test_loss``, ``test_acc``)."""
    args = parse_args(argv)
    if not args.quiet:
        # Shows what the plugins report at INFO: checkpoints written, why early stopping ended the run.
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    hookrt.seed_everything(args.seed)
    model = DigitsModule(lr=args.lr, batch_size=args.batch_size, split_seed=args.seed)

    # A ModelCheckpoint passed here replaces the trainer's default one, which keeps the latest epoch.
    checkpoint = ModelCheckpoint(monitor="val_acc", mode="max", filename="digits-{epoch}-{val_acc:.3f}")
    early_stopping = EarlyStopping(monitor="val_loss", patience=PATIENCE)
    # The default stack adds the TensorBoard logger, the progress bar, the model summary and the signal handler.
    trainer = hookrt.Trainer(
        max_epochs=args.max_epochs,
        default_root_dir=args.default_root_dir,
        plugins=[early_stopping, checkpoint],
        enable_progress_bar=not args.quiet,
        enable_model_summary=not args.quiet,
        log_every_n_steps=10,
    )
    trainer.fit(model)
    metrics = trainer.test(ckpt_path="best")[0]

    print(f"test accuracy: {metrics['test_acc']:.2%} (test loss {metrics['test_loss']:.4f})")
    print(f"trained {trainer.current_epoch} epochs; best val_acc {float(checkpoint.best_model_score):.2%}")
    print(f"best checkpoint: {checkpoint.best_model_path}")
    print(f"TensorBoard logs: {trainer.logger.log_dir}")
    return metrics


if __name__ == "__main__":
    main()
