"""Rank-zero helpers: run code or give warnings on the process of global rank 0 only.

Under DDP every process runs the same plugins. Loggers, progress bars and
warnings should act once, on global rank 0, and these helpers are the one place
that decides which process that is.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from hookrt._errors import HookrtWarning

__all__ = ["global_rank", "rank_zero_only", "rank_zero_warn", "reset_warning_cache"]

P = ParamSpec("P")
R = TypeVar("R")

#: Environment variables that launchers set to the global rank, in the order they are read.
#: torchrun sets RANK; LOCAL_RANK alone is read as the global rank, which holds on one node.
RANK_VARIABLES = ("RANK", "LOCAL_RANK")

_warned: set[tuple[type[Warning], str]] = set()


def global_rank() -> int:
    """Return the global rank of this process, 0 when it is not part of a distributed run.

    An initialized default process group of ``torch.distributed`` is asked first,
    then the environment variables in `RANK_VARIABLES`. torch is not imported
    here: when it was never imported, no process group can exist.
    """
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return int(distributed.get_rank())
    for variable in RANK_VARIABLES:
        value = os.environ.get(variable)
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value)
    return 0


def rank_zero_only(fn: Callable[P, R]) -> Callable[P, R | None]:
    """Decorate ``fn`` so that it runs on global rank 0 only and returns None on other ranks.

    The rank is read at each call, not at decoration, because a process group is
    usually set up after the decorated code was imported.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
        if global_rank() == 0:
            return fn(*args, **kwargs)
        return None

    return wrapper


def rank_zero_warn(message: str, category: type[Warning] = HookrtWarning, stacklevel: int = 2) -> None:
    """Warn once per process about ``message``, on global rank 0 only.

    A second call with the same message and category does nothing, so a
    warning given from a per-batch handler appears once per run.

    Args:
        message: the warning text. Name the plugin or argument, what is wrong and what to do.
        category: the warning class, `HookrtWarning` unless given.
        stacklevel: as for `warnings.warn`, counted from the caller of this function:
            2 points at the caller's caller.
    """
    if global_rank() != 0:
        return
    key = (category, message)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, category, stacklevel=stacklevel + 1)


def reset_warning_cache() -> None:
    """Forget which warnings `rank_zero_warn` has given, so each can appear again (for tests)."""
    _warned.clear()
