"""seed_everything, worker seeding through the trainer, and the deterministic flag."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt
from hookrt._seed import SEED_ENV, SEED_WORKERS_ENV, seed_worker

QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


@pytest.fixture(autouse=True)
def _restore_seed_environment(monkeypatch):
    # seed_everything writes os.environ itself; setting each variable first makes monkeypatch restore it.
    for variable in (SEED_ENV, SEED_WORKERS_ENV, "RANK", "LOCAL_RANK"):
        monkeypatch.setenv(variable, "0")
        monkeypatch.delenv(variable)


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


class Regressor(hookrt.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_loader(num_workers=0, worker_init_fn=None):
    data = TensorDataset(torch.randn(8, 2), torch.randn(8, 1))
    return DataLoader(data, batch_size=4, num_workers=num_workers, worker_init_fn=worker_init_fn)


def test_seed_everything_repeats_draws():
    assert hookrt.seed_everything(123) == 123
    first = draws()
    hookrt.seed_everything(123)
    second = draws()
    hookrt.seed_everything(124)
    third = draws()

    assert first == second
    assert first != third


def test_seed_everything_reads_environment(monkeypatch):
    monkeypatch.setenv(SEED_ENV, "77")

    assert hookrt.seed_everything() == 77


def test_seed_everything_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"seed_everything\(-1\) is out of range: the seed must be in 0 \.\. "):
        hookrt.seed_everything(-1)


def test_workers_seeded_when_requested():
    hookrt.seed_everything(5, workers=True)
    train, val = make_loader(num_workers=1), make_loader(num_workers=1)
    trainer = hookrt.Trainer(max_epochs=1, num_sanity_val_steps=0, **QUIET)
    trainer.fit(Regressor(), train, val)

    assert train.worker_init_fn is seed_worker
    assert val.worker_init_fn is seed_worker


def test_workers_untouched_without_request():
    hookrt.seed_everything(5)
    with_workers = make_loader(num_workers=1)
    trainer = hookrt.Trainer(max_epochs=1, limit_train_batches=1, **QUIET)
    trainer.fit(Regressor(), with_workers)

    assert with_workers.worker_init_fn is None


def test_workers_keep_own_init_fn():
    hookrt.seed_everything(5, workers=True)

    def own(worker_id):
        return None

    loader = make_loader(num_workers=1, worker_init_fn=own)
    trainer = hookrt.Trainer(max_epochs=1, limit_train_batches=1, **QUIET)
    trainer.fit(Regressor(), loader)

    assert loader.worker_init_fn is own


def test_seed_worker_differs_by_rank(monkeypatch):
    torch.manual_seed(9)
    seed_worker(0)
    rank_zero = float(np.random.rand())
    torch.manual_seed(9)
    monkeypatch.setenv("RANK", "1")
    seed_worker(0)
    rank_one = float(np.random.rand())
    torch.manual_seed(9)
    monkeypatch.setenv("RANK", "0")
    seed_worker(0)

    assert rank_zero != rank_one
    assert float(np.random.rand()) == rank_zero


def test_deterministic_flag_enables_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    try:
        hookrt.Trainer(deterministic=True, **QUIET)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(before)
