"""A module written for PyTorch Lightning 0.5 trains unchanged with ``import hookrt as pl``.

The modules here use the 0.5-era API: dict returns from the ``*_step``
methods, ``validation_end`` / ``test_end``, ``@pl.data_loader`` methods and
``trainer.fit(model)`` with no loaders. Their data is ``torchvision``'s MNIST
class reading IDX files that each test writes under ``tmp_path``. The images
are synthetic, so nothing is downloaded: every digit class draws its own
bright square on a noisy background, which a small model learns in a few
epochs.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

import hookrt as pl
from hookrt import MisconfigurationError
from hookrt._seed import SEED_ENV, SEED_WORKERS_ENV

datasets = pytest.importorskip("torchvision.datasets")
transforms = pytest.importorskip("torchvision.transforms")

IMAGE_SIDE = 28
#: Magic numbers of the IDX format: 0x08 (unsigned byte) << 8 | number of dimensions.
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
TRAIN_RECORDS = 256
TEST_RECORDS = 64
BATCH_SIZE = 32
TRAIN_BATCHES = TRAIN_RECORDS // BATCH_SIZE
EPOCHS = 3
#: The four flags that turn off the default plugins, so these tests see only the core loop.
QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
         "enable_model_summary": False}


# ---------------------------------------------------------------------- data


def write_idx_images(path: Path, images: np.ndarray) -> None:
    """Write ``images`` (uint8, N x 28 x 28) as an IDX3 file, header fields big-endian."""
    count, rows, columns = images.shape
    path.write_bytes(struct.pack(">IIII", IMAGES_MAGIC, count, rows, columns) + images.tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    """Write ``labels`` (uint8, N) as an IDX1 file."""
    path.write_bytes(struct.pack(">II", LABELS_MAGIC, len(labels)) + labels.tobytes())


def draw_digits(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return ``count`` noisy images and their labels. Label k draws a bright 6x6 square at its own spot."""
    labels = rng.permutation(np.arange(count) % 10).astype(np.uint8)
    images = rng.integers(0, 90, size=(count, IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
    for image, label in zip(images, labels, strict=True):
        row = 2 + 12 * (label // 5)
        column = 1 + 5 * (label % 5)
        image[row:row + 6, column:column + 6] = rng.integers(200, 256, size=(6, 6), dtype=np.uint8)
    return images, labels


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    """A folder that ``torchvision.datasets.MNIST(root, download=False)`` reads both splits from."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for split, count in (("train", TRAIN_RECORDS), ("t10k", TEST_RECORDS)):
        images, labels = draw_digits(count, rng)
        write_idx_images(raw / f"{split}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{split}-labels-idx1-ubyte", labels)
    return tmp_path


@pytest.fixture
def seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seed every generator, and undo the environment variables that seed_everything sets when the test ends."""
    monkeypatch.setenv(SEED_ENV, "0")
    monkeypatch.setenv(SEED_WORKERS_ENV, "0")
    pl.seed_everything(1234)


def mnist_loader(root: Path | str, train: bool, shuffle: bool = False) -> DataLoader:
    dataset = datasets.MNIST(root, train=train, download=False, transform=transforms.ToTensor())
    return DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=shuffle)


# ---------------------------------------------------------------------- modules in the 0.5 style


class DigitClassifier(pl.LightningModule):
    """A two-layer classifier written against the Lightning 0.5 API."""

    def __init__(self, root: Path, learning_rate: float = 0.005):
        super().__init__()
        self.root = root
        self.learning_rate = learning_rate
        self.hidden = nn.Linear(IMAGE_SIDE * IMAGE_SIDE, 64)
        self.classify = nn.Linear(64, 10)
        self.loader_calls = {"train": 0, "val": 0, "test": 0}

    def forward(self, x):
        return self.classify(torch.relu(self.hidden(x.view(x.size(0), -1))))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self.forward(images), labels)
        return {"loss": loss, "log": {"train_loss": loss}}

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.forward(images)
        return {"val_loss": F.cross_entropy(logits, labels), "val_correct": (logits.argmax(1) == labels).sum(),
                "val_count": len(labels)}

    def validation_end(self, outputs):
        avg_loss = torch.stack([output["val_loss"] for output in outputs]).mean()
        accuracy = sum(int(output["val_correct"]) for output in outputs) / sum(o["val_count"] for o in outputs)
        return {"avg_val_loss": avg_loss, "log": {"val_loss": avg_loss, "val_acc": accuracy}}

    def test_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.forward(images)
        return {"test_loss": F.cross_entropy(logits, labels), "test_correct": (logits.argmax(1) == labels).sum(),
                "test_count": len(labels)}

    def test_end(self, outputs):
        avg_loss = torch.stack([output["test_loss"] for output in outputs]).mean()
        accuracy = sum(int(output["test_correct"]) for output in outputs) / sum(o["test_count"] for o in outputs)
        return {"avg_test_loss": avg_loss, "log": {"test_loss": avg_loss, "test_acc": accuracy}}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.learning_rate)

    @pl.data_loader
    def train_dataloader(self):
        self.loader_calls["train"] += 1
        return mnist_loader(self.root, train=True, shuffle=True)

    @pl.data_loader
    def val_dataloader(self):
        self.loader_calls["val"] += 1
        return mnist_loader(self.root, train=False)

    @pl.data_loader
    def test_dataloader(self):
        self.loader_calls["test"] += 1
        return mnist_loader(self.root, train=False)


class LegacyLinearSystem(pl.LightningModule):
    """One linear layer reading MNIST from the working directory, laid out as 0.5-era quick starts were.

    It validates on the training split and defines a test loader but no
    ``test_step``.
    """

    def __init__(self):
        super(LegacyLinearSystem, self).__init__()  # noqa: UP008 - the Python 2 form that 0.5-era code used
        self.l1 = torch.nn.Linear(28 * 28, 10)

    def forward(self, x):
        return torch.relu(self.l1(x.view(x.size(0), -1)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        y_hat = self.forward(x)
        loss = F.cross_entropy(y_hat, y)
        return {"loss": loss, "log": {"train_loss": loss}}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        y_hat = self.forward(x)
        return {"val_loss": F.cross_entropy(y_hat, y)}

    def validation_end(self, outputs):
        avg_loss = torch.stack([x["val_loss"] for x in outputs]).mean()
        return {"avg_val_loss": avg_loss, "log": {"val_loss": avg_loss}}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.02)

    @pl.data_loader
    def train_dataloader(self):
        return mnist_loader(os.getcwd(), train=True)

    @pl.data_loader
    def val_dataloader(self):
        return mnist_loader(os.getcwd(), train=True)

    @pl.data_loader
    def test_dataloader(self):
        return mnist_loader(os.getcwd(), train=False)


class LossRecorder(pl.Plugin):
    """Keeps the training loss of every batch, grouped by epoch."""

    def __init__(self) -> None:
        self.losses: dict[int, list[float]] = {}

    @pl.on("on_batch_end")
    def record(self, payload):
        self.losses.setdefault(payload.trainer.current_epoch, []).append(payload.outputs["loss"].item())

    def epoch_mean(self, epoch: int) -> float:
        return sum(self.losses[epoch]) / len(self.losses[epoch])


# ---------------------------------------------------------------------- tests


def test_idx_files_load_through_torchvision(mnist_root):
    train = datasets.MNIST(mnist_root, train=True, download=False, transform=transforms.ToTensor())
    test = datasets.MNIST(mnist_root, train=False, download=False, transform=transforms.ToTensor())
    image, label = train[0]

    assert len(train) == TRAIN_RECORDS
    assert len(test) == TEST_RECORDS
    assert image.shape == (1, IMAGE_SIDE, IMAGE_SIDE)
    assert image.dtype == torch.float32
    assert 0 <= label < 10
    assert sorted(train.targets.unique().tolist()) == list(range(10))


def test_digit_classifier_fits(mnist_root, seeded):
    model = DigitClassifier(mnist_root)
    recorder = LossRecorder()
    trainer = pl.Trainer(max_epochs=EPOCHS, plugins=[recorder], **QUIET)

    trainer.fit(model)

    assert sorted(recorder.losses) == list(range(EPOCHS))
    assert all(len(losses) == TRAIN_BATCHES for losses in recorder.losses.values())
    first, last = recorder.epoch_mean(0), recorder.epoch_mean(EPOCHS - 1)
    assert last < 0.5 * first, f"mean loss went from {first:.3f} (epoch 0) to {last:.3f} (last epoch)"
    assert trainer.global_step == EPOCHS * TRAIN_BATCHES
    assert trainer.current_epoch == EPOCHS


def test_validation_end_reaches_callback_metrics(mnist_root, seeded):
    model = DigitClassifier(mnist_root)
    trainer = pl.Trainer(max_epochs=EPOCHS, **QUIET)

    trainer.fit(model)
    metrics = trainer.callback_metrics

    for key in ("avg_val_loss", "val_loss", "val_acc", "train_loss"):
        assert key in metrics, f"{key} missing from callback_metrics: {sorted(metrics)}"
    assert torch.isclose(metrics["avg_val_loss"], metrics["val_loss"])
    assert float(metrics["val_acc"]) > 0.5  # ten classes, so chance is 0.1
    assert {"val_loss", "val_acc", "train_loss"} <= set(trainer.logged_metrics)
    assert "avg_val_loss" not in trainer.logged_metrics  # only the "log" entries go to loggers


def test_data_loader_methods_run_once(mnist_root, seeded):
    model = DigitClassifier(mnist_root)
    trainer = pl.Trainer(max_epochs=2, **QUIET)

    trainer.fit(model)
    trainer.test(model)

    assert model.loader_calls == {"train": 1, "val": 1, "test": 1}
    assert model.train_dataloader() is model.train_dataloader()


def test_test_end_metrics_returned(mnist_root, seeded):
    model = DigitClassifier(mnist_root)
    trainer = pl.Trainer(max_epochs=EPOCHS, **QUIET)
    trainer.fit(model)

    results = trainer.test(model)

    assert len(results) == 1
    (result,) = results
    for key in ("avg_test_loss", "test_loss", "test_acc"):
        assert key in result, f"{key} missing from the test results: {sorted(result)}"
    assert result["avg_test_loss"] == pytest.approx(result["test_loss"])
    assert result["test_acc"] > 0.5
    assert trainer.callback_metrics["test_acc"] == pytest.approx(result["test_acc"])


def test_quickstart_system_fits(mnist_root, seeded, monkeypatch):
    monkeypatch.chdir(mnist_root)
    model = LegacyLinearSystem()
    recorder = LossRecorder()
    trainer = pl.Trainer(max_epochs=2, plugins=[recorder], **QUIET)

    trainer.fit(model)

    assert trainer.global_step == 2 * TRAIN_BATCHES
    assert recorder.epoch_mean(1) < recorder.epoch_mean(0)
    assert {"avg_val_loss", "val_loss", "train_loss"} <= set(trainer.callback_metrics)


def test_quickstart_test_needs_step(mnist_root, seeded, monkeypatch):
    monkeypatch.chdir(mnist_root)
    model = LegacyLinearSystem()
    trainer = pl.Trainer(max_epochs=1, **QUIET)
    trainer.fit(model)

    with pytest.raises(MisconfigurationError, match=r"trainer\.test\(\) needs LegacyLinearSystem\.test_step"):
        trainer.test(model)
