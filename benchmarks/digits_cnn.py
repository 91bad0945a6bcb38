"""The digits workload of `benchmarks.stack`: a small CNN on scikit-learn's 8x8 digit images.

Each step does more arithmetic than the tiny MLP's, so a framework's fixed
cost per step is a smaller share of it. scikit-learn ships the 1797 images,
so nothing is downloaded. One run is one epoch over the images, repeated in
their order until the requested number of batches of 32 is reached.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

DESCRIPTION = ("CNN conv3x3(16)-conv3x3(32)-maxpool-linear(10) with ReLU on scikit-learn's 8x8 digits, "
               "batches of 32, the 1797 images repeated in order to fill the epoch")
BATCH_SIZE = 32


def build_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def build_loader(steps: int) -> DataLoader[Any]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    indices = torch.arange(steps * BATCH_SIZE) % len(labels)
    return DataLoader(TensorDataset(images[indices], labels[indices]), batch_size=BATCH_SIZE, shuffle=False)
