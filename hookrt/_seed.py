"""Seeding every random number generator a training run draws from."""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import numpy as np
import torch

from hookrt._rank import global_rank

__all__ = ["seed_everything", "seed_worker"]

logger = logging.getLogger(__name__)

#: Environment variable that carries the seed to spawned processes.
SEED_ENV = "HOOKRT_GLOBAL_SEED"
#: Environment variable that asks the trainer to seed dataloader workers.
SEED_WORKERS_ENV = "HOOKRT_SEED_WORKERS"

_MAX_SEED = 2**32 - 1


def seed_everything(seed: int | None = None, workers: bool = False) -> int:
    """Seed Python's ``random``, numpy's global generator and torch (CPU and every CUDA device).

    Args:
        seed: the seed; when None, the ``HOOKRT_GLOBAL_SEED`` environment variable, else 0.
        workers: also seed ``random`` and numpy inside each dataloader worker, from
            the worker's torch seed, so augmentations differ between workers and
            repeat between runs.

    Returns:
        The seed used.

    Raises:
        ValueError: the seed is outside 0 .. 2**32 - 1.
    """
    if seed is None:
        seed = int(os.environ.get(SEED_ENV, 0))
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed_everything({seed}) is out of range: the seed must be in 0 .. {_MAX_SEED}.")
    os.environ[SEED_ENV] = str(seed)
    os.environ[SEED_WORKERS_ENV] = "1" if workers else "0"
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    logger.info("Seeded random, numpy and torch with %d (workers: %s)", seed, workers)
    return seed


def seed_worker(worker_id: int) -> None:
    """Seed ``random`` and numpy in a dataloader worker from the seed torch gave that worker.

    Pass it as ``DataLoader(worker_init_fn=seed_worker)``; with
    ``seed_everything(workers=True)`` the trainer sets it on loaders that have none.
    On a process of global rank r > 0 the seed is first mixed with r (and torch
    is reseeded with it too), so that ranks seeded alike do not draw the same
    augmentations; on rank 0 it is torch's seed unchanged.
    """
    seed = torch.initial_seed() % (_MAX_SEED + 1)
    rank = global_rank()
    if rank > 0:
        seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
        torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def wants_worker_seeding() -> bool:
    """Whether ``seed_everything(workers=True)`` was called in this process or its parent."""
    return os.environ.get(SEED_WORKERS_ENV) == "1"


def add_worker_seeding(loader: Any) -> None:
    """Set `seed_worker` as the loader's ``worker_init_fn`` after ``seed_everything(workers=True)``.

    Only a loader with workers and no ``worker_init_fn`` of its own gets it.
    """
    if not wants_worker_seeding():
        return
    if getattr(loader, "num_workers", 0) > 0 and getattr(loader, "worker_init_fn", True) is None:
        loader.worker_init_fn = seed_worker
