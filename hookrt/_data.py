"""Data loaders: checking what the user passed, batch limits, ``set_epoch`` and TBPTT splits."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from hookrt._errors import HookrtWarning, MisconfigurationError

__all__ = [
    "as_loader_list",
    "check_loader",
    "limited_length",
    "loader_length",
    "set_loader_epoch",
    "split_along_time",
]


def check_loader(loader: Any, source: str) -> Any:
    """Return ``loader`` if it can be iterated for batches, else raise naming ``source``.

    Raises:
        MisconfigurationError: a map-style Dataset (which would yield single
            samples, not batches), or something that cannot be iterated.
    """
    if isinstance(loader, Dataset) and not isinstance(loader, IterableDataset):
        raise MisconfigurationError(
            f"{source} gave a {type(loader).__name__}, which is a Dataset, not a loader of batches. "
            f"Wrap it: DataLoader(dataset, batch_size=...)."
        )
    if isinstance(loader, (str, bytes, Mapping)) or not isinstance(loader, Iterable):
        raise MisconfigurationError(
            f"{source} gave a {type(loader).__name__}, which is not an iterable of batches. "
            "Return a torch.utils.data.DataLoader (or a list of them for several validation or test sets)."
        )
    return loader


def as_loader_list(value: Any, source: str) -> list[Any]:
    """Return a list of checked loaders from one loader, a list or tuple of them, or None.

    A loader whose length is 0 gets a `HookrtWarning`, because nothing would run over it.
    """
    if value is None:
        return []
    named = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
    loaders = []
    for index, item in named:
        where = source if index is None else f"{source} (item {index})"
        loaders.append(check_loader(item, where))
        if loader_length(item) == 0:
            warnings.warn(
                f"{where} gave a loader with no batches, so nothing runs over it. Check the dataset size, and "
                "batch_size with drop_last=True.", HookrtWarning, stacklevel=5,
            )
    return loaders


def loader_length(loader: Any) -> float:
    """Return the number of batches, or ``math.inf`` for a loader without ``__len__``."""
    try:
        return float(len(loader))
    except TypeError:
        return math.inf


def limited_length(loader: Any, limit: int | float, flag: str) -> float:
    """Apply a ``limit_*_batches`` value (fraction of the loader or batch count) to its length.

    Raises:
        MisconfigurationError: a fraction below 1.0 of a loader without a length.
    """
    length = loader_length(loader)
    if isinstance(limit, float):
        if limit == 1.0:
            return length
        if math.isinf(length):
            raise MisconfigurationError(
                f"{flag}={limit} is a fraction, but the loader has no length. Give a batch count instead "
                f"({flag}=100) or a loader with __len__."
            )
        return float(max(1, int(length * limit))) if limit > 0 else 0.0
    return float(min(length, limit))


def set_loader_epoch(loader: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on the loader's sampler and batch sampler where they have it."""
    seen: set[int] = set()
    for holder in (loader, getattr(loader, "batch_sampler", None)):
        for attribute in ("sampler", "batch_sampler"):
            sampler = getattr(holder, attribute, None)
            if sampler is not None and id(sampler) not in seen and callable(getattr(sampler, "set_epoch", None)):
                seen.add(id(sampler))
                sampler.set_epoch(epoch)


def split_along_time(batch: Any, split_size: int) -> list[Any]:
    """Split every tensor of dim >= 2 in ``batch`` into chunks of ``split_size`` along dim 1.

    Other values are repeated in every split. All tensors must have the same
    length along dim 1.
    """
    lengths: set[int] = set()
    _time_lengths(batch, lengths)
    if not lengths:
        return [batch]
    if len(lengths) > 1:
        raise MisconfigurationError(
            f"truncated_bptt_steps needs every tensor of the batch to have the same length along dim 1 "
            f"(time), but found {sorted(lengths)}. Override tbptt_split_batch(batch, split_size) to split it."
        )
    total = lengths.pop()
    return [_slice_time(batch, start, start + split_size) for start in range(0, total, split_size)]


def _time_lengths(batch: Any, lengths: set[int]) -> None:
    if isinstance(batch, torch.Tensor):
        if batch.dim() >= 2:
            lengths.add(batch.shape[1])
    elif isinstance(batch, Mapping):
        for value in batch.values():
            _time_lengths(value, lengths)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            _time_lengths(value, lengths)


def _slice_time(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:, start:stop] if batch.dim() >= 2 else batch
    if isinstance(batch, Mapping):
        return type(batch)({key: _slice_time(value, start, stop) for key, value in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_slice_time(value, start, stop) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice_time(value, start, stop) for value in batch)
    return batch

