"""An MNIST classifier written the way PyTorch Lightning 0.5 modules were.

The module below uses the 0.5-era API, which hookrt runs unchanged:
``import hookrt as pl``, hyperparameters assigned to ``self.hparams``,
``training_step`` returning ``{"loss": ..., "log": {...}}``, ``validation_step``
and ``test_step`` returning dicts that ``validation_end`` and ``test_end``
reduce, and dataloaders built once by ``@pl.data_loader`` methods.

The data is torchvision's MNIST. With ``--data-dir`` pointing at a folder
that already contains ``MNIST/raw/*-ubyte`` files, nothing is downloaded.
Otherwise torchvision downloads the dataset into that folder (about 67 MB
on disk: the archives and the unpacked files).

Run it with ``python examples/mnist.py --max-epochs 3``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

import hookrt as pl
from hookrt.plugins import ModelCheckpoint

#: The four files torchvision's MNIST reads from ``{data_dir}/MNIST/raw``.
RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
#: Mean and standard deviation of the MNIST training pixels, after scaling to [0, 1].
PIXEL_MEAN = 0.1307
PIXEL_STD = 0.3081
#: Share of the training split held out for validation.
VAL_FRACTION = 0.1


def mnist_is_local(data_dir: str) -> bool:
    """Check whether ``data_dir`` already contains the unpacked MNIST files, so no download is needed."""
    raw = os.path.join(data_dir, "MNIST", "raw")
    return all(os.path.isfile(os.path.join(raw, name)) for name in RAW_FILES)


class MNISTClassifier(pl.LightningModule):
    """A two-layer perceptron in the 0.5 style: hparams in, dicts out of every step."""

    def __init__(self, hparams: argparse.Namespace) -> None:
        super().__init__()
        self.hparams = hparams
        self.hidden = nn.Linear(28 * 28, hparams.hidden_dim)
        self.dropout = nn.Dropout(0.2)
        self.out = nn.Linear(hparams.hidden_dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        return self.out(self.dropout(torch.relu(self.hidden(x))))

    # ------------------------------------------------------------------ training and evaluation

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        x, y = batch
        loss = F.cross_entropy(self.forward(x), y)
        # "log" goes to the loggers, the loss itself to the progress bar.
        return {"loss": loss, "log": {"train_loss": loss}}

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._score(batch, "val")

    def validation_end(self, outputs: list[dict[str, Any]]) -> dict[str, Any]:
        loss, accuracy = self._reduce(outputs, "val")
        return {"val_loss": loss, "log": {"val_loss": loss, "val_acc": accuracy}, "progress_bar": {"val_acc": accuracy}}

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._score(batch, "test")

    def test_end(self, outputs: list[dict[str, Any]]) -> dict[str, Any]:
        loss, accuracy = self._reduce(outputs, "test")
        return {"log": {"test_loss": loss, "test_acc": accuracy}}

    def _score(self, batch: Any, prefix: str) -> dict[str, Any]:
        x, y = batch
        logits = self.forward(x)
        return {
            f"{prefix}_loss": F.cross_entropy(logits, y, reduction="sum"),
            f"{prefix}_correct": (logits.argmax(dim=1) == y).sum(),
            f"{prefix}_count": len(y),
        }

    @staticmethod
    def _reduce(outputs: list[dict[str, Any]], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum the per-batch totals, so a smaller last batch counts in proportion to its size."""
        count = sum(output[f"{prefix}_count"] for output in outputs)
        loss = torch.stack([output[f"{prefix}_loss"] for output in outputs]).sum() / count
        correct = torch.stack([output[f"{prefix}_correct"] for output in outputs]).sum()
        return loss, correct.float() / count

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)

    # ------------------------------------------------------------------ data

    def _dataset(self, train: bool) -> Any:
        from torchvision import datasets, transforms

        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((PIXEL_MEAN,), (PIXEL_STD,))])
        data_dir = self.hparams.data_dir
        return datasets.MNIST(data_dir, train=train, transform=transform, download=not mnist_is_local(data_dir))

    def _train_and_val(self) -> list[Any]:
        if not hasattr(self, "_split"):
            full = self._dataset(train=True)
            val_size = int(len(full) * VAL_FRACTION)
            generator = torch.Generator().manual_seed(self.hparams.seed)
            self._split = torch.utils.data.random_split(full, [len(full) - val_size, val_size], generator=generator)
        return self._split

    @pl.data_loader
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._train_and_val()[0], batch_size=self.hparams.batch_size, shuffle=True)

    @pl.data_loader
    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._train_and_val()[1], batch_size=256)

    @pl.data_loader
    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(train=False), batch_size=256)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train an MNIST classifier written in the Lightning 0.5 style.")
    parser.add_argument("--data-dir", default="data",
                        help="folder containing MNIST/raw; MNIST is downloaded there when missing (default: ./data)")
    parser.add_argument("--default-root-dir", default="mnist_run",
                        help="folder for TensorBoard logs and checkpoints (default: ./mnist_run)")
    parser.add_argument("--max-epochs", type=int, default=3, help="epochs to train (default: 3)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size (default: 64)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate (default: 0.001)")
    parser.add_argument("--hidden-dim", type=int, default=128, help="width of the hidden layer (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the weights and the shuffling")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or model summary")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train and test; returns the test metrics (``test_loss``, ``test_acc``)."""
    hparams = parse_args(argv)
    pl.seed_everything(hparams.seed)
    model = MNISTClassifier(hparams)

    # A ModelCheckpoint passed here replaces the trainer's default one, which keeps the latest epoch.
    checkpoint = ModelCheckpoint(monitor="val_loss", filename="mnist-{epoch}-{val_loss:.4f}")
    trainer = pl.Trainer(
        max_epochs=hparams.max_epochs,
        default_root_dir=hparams.default_root_dir,
        callbacks=[checkpoint],
        enable_progress_bar=not hparams.quiet,
        enable_model_summary=not hparams.quiet,
    )
    trainer.fit(model)

    # As in the 0.5 era, test() with no arguments tests the model that fit trained, with its final weights.
    metrics = trainer.test()[0]
    print(f"test accuracy: {metrics['test_acc']:.2%} (test loss {metrics['test_loss']:.4f})")
    print(f"best checkpoint: {checkpoint.best_model_path}")
    print(f"TensorBoard logs: {trainer.logger.log_dir}")
    return metrics


if __name__ == "__main__":
    main()
