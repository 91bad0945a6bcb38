"""Modules and data shared by the DDP job script and the DDP tests.

Processes started with the "spawn" method import these classes by module
name, so they live in a plain module rather than in a test file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt

QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}

FEATURES = 4


def indexed_dataset(length: int, seed: int = 0) -> TensorDataset:
    """Return samples ``(index, x, y)``, so a step can tell which samples it saw."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(length, FEATURES, generator=generator)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(length, 1, generator=generator)
    return TensorDataset(torch.arange(length), x, y)


def indexed_loader(length: int, batch_size: int, shuffle: bool = False, drop_last: bool = False) -> DataLoader:
    return DataLoader(indexed_dataset(length), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)


class Regressor(hookrt.LightningModule):
    """A linear regressor that records the sample indices of each epoch; optional dropout draws random numbers."""

    def __init__(self, dropout: float = 0.0, momentum: float = 0.0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.layer = torch.nn.Linear(FEATURES, 1)
        with torch.no_grad():
            self.layer.weight.copy_(torch.randn(1, FEATURES, generator=generator))
            self.layer.bias.zero_()
        self.dropout = torch.nn.Dropout(dropout)
        self.momentum = momentum
        #: epoch -> the sample indices of each batch this process trained on, in order.
        self.seen: dict[int, list[list[int]]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.dropout(x))

    def training_step(self, batch, batch_idx):
        index, x, y = batch
        self.seen.setdefault(self.current_epoch, []).append(index.tolist())
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        index, x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=self.momentum)


def weights(module: torch.nn.Module) -> torch.Tensor:
    """Return every parameter of ``module`` flattened into one vector."""
    return torch.cat([parameter.detach().reshape(-1) for parameter in module.parameters()])


class FailsOnRankOne(Regressor):
    """A Regressor whose training_step raises on rank 1 at batch 1, while rank 0 waits in the gradient all-reduce."""

    def training_step(self, batch, batch_idx):
        if self.trainer.global_rank == 1 and batch_idx == 1:
            raise ValueError("bad batch 1 on rank 1")
        return super().training_step(batch, batch_idx)
