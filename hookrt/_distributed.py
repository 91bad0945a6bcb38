"""Small helpers over ``torch.distributed`` that also work when no process group exists.

Without an initialized default process group every helper acts as if this
process were the only one: rank 0 of a world of size 1, a barrier that
returns at once, gathers that return a one-element list.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import logging
import os
import socket
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "LAUNCHER_VARIABLES",
    "LateAgreement",
    "all_gather_object",
    "all_gather_tensors",
    "any_rank",
    "barrier",
    "default_backend",
    "find_free_port",
    "init_from_env",
    "is_initialized",
    "launched_by_launcher",
    "leave_at_exit",
    "leave_process_group",
    "local_rank",
    "max_across_ranks",
    "rank",
    "world_size",
]

logger = logging.getLogger(__name__)

#: The environment variables that torchrun (and `hookrt._launch`) set for each process.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def is_initialized() -> bool:
    """Return whether a default process group exists in this process."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Return this process's global rank, 0 without a process group."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Return the number of processes in the default group, 1 without a process group."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """Return the rank of this process on its machine: ``LOCAL_RANK``, else 0."""
    return int(os.environ.get("LOCAL_RANK", 0))


def launched_by_launcher() -> bool:
    """Return whether torchrun or a similar launcher started this process (every `LAUNCHER_VARIABLES` is set)."""
    return all(variable in os.environ for variable in LAUNCHER_VARIABLES)


def default_backend(device_type: str) -> str:
    """Return the backend for a device type: ``"nccl"`` for CUDA, ``"gloo"`` otherwise."""
    return "nccl" if device_type == "cuda" else "gloo"


def init_from_env(backend: str, timeout: datetime.timedelta) -> None:
    """Join the default process group described by the launcher's environment variables.

    Raises:
        RuntimeError: the rendezvous failed or timed out (raised by torch).
    """
    logger.info(
        "Joining the process group: backend %s, rank %s of %s, master %s:%s", backend, os.environ.get("RANK"),
        os.environ.get("WORLD_SIZE"), os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"),
    )
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    leave_at_exit()


#: Whether `leave_at_exit` has registered `leave_process_group` to run at interpreter exit.
_leave_registered = False


def leave_at_exit() -> None:
    """Register `leave_process_group` to run at interpreter exit, once per process."""
    global _leave_registered
    if not _leave_registered:
        atexit.register(leave_process_group)
        _leave_registered = True


def leave_process_group() -> None:
    """Destroy the default process group, if one exists, while the interpreter is still whole.

    `leave_at_exit` registers this to run at exit, for a group that hookrt
    joined or created and for one that DDP training used. Without it the group
    outlives ``atexit`` and is torn down during interpreter finalization.
    torch's gloo worker threads may then still be releasing a finished
    collective's tensors, which needs the GIL. A thread that tries to acquire
    the GIL while the interpreter finalizes is unwound by ``pthread_exit``,
    which ends in ``std::terminate`` inside torch's C++ frames. The process
    then dies by SIGABRT after training succeeded ("terminate called without
    an active exception"). Destroying the group here joins those threads first.
    """
    if is_initialized():
        # Free wrappers caught in reference cycles (a DDP reducer references the group), so the group goes now.
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process reaches this call; returns at once without a process group."""
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _int_tensor(values: list[int]) -> torch.Tensor:
    """Return ``values`` as an int64 tensor on the device that the default group's backend reduces on."""
    tensor = torch.tensor(values, dtype=torch.int64)
    return tensor.cuda() if dist.get_backend() == "nccl" else tensor


def max_across_ranks(values: list[int]) -> list[int]:
    """Return, for each value, its largest value over all ranks; the values unchanged without a process group.

    A collective call: every rank must make it, with as many values.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return values
    tensor = _int_tensor(values)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [int(value) for value in tensor.tolist()]


def any_rank(flags: list[bool]) -> list[bool]:
    """Return, for each flag, whether it is set on any rank; the flags unchanged without a process group.

    A collective call: every rank must make it, with as many flags.
    """
    return [bool(value) for value in max_across_ranks([int(flag) for flag in flags])]


class LateAgreement:
    """Agrees boolean flags between ranks one call late, so the all-reduce runs while the next step trains.

    `exchange` returns what every rank sent at the previous call, combined
    with "any", and starts the all-reduce of the flags given now. A blocking
    all-reduce per training step would make every rank wait for the slowest
    one once more per step. Every rank must make the same calls in the same
    order, as for any collective.
    """

    def __init__(self) -> None:
        self._tensor: torch.Tensor | None = None
        self._work: Any = None

    def exchange(self, flags: list[bool]) -> list[bool] | None:
        """Return the flags agreed at the previous call (None at the first) and send ``flags``."""
        agreed = self.exchange_values([int(flag) for flag in flags])
        return None if agreed is None else [bool(value) for value in agreed]

    def exchange_values(self, values: list[int]) -> list[int] | None:
        """Return the rank-wise maxima of the values sent at the previous call (None at the first); send ``values``."""
        agreed = self.settle()
        tensor = _int_tensor(values)
        self._tensor = tensor
        self._work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, async_op=True)
        return agreed

    def settle(self) -> list[int] | None:
        """Wait for the all-reduce in flight and return its result; None when none is in flight."""
        work, tensor = self._work, self._tensor
        if work is None or tensor is None:
            return None
        self._work = self._tensor = None
        work.wait()
        return [int(value) for value in tensor.tolist()]


def all_gather_object(value: Any) -> list[Any]:
    """Return the list of every rank's ``value`` (picklable), indexed by rank."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_gather_tensors(data: Any, sync_grads: bool = False) -> Any:
    """Gather every tensor in ``data`` from all ranks, stacked along a new first dimension of size world_size.

    Tensors inside lists, tuples and dicts are gathered too, in place in a
    container of the same kind; other values come back unchanged. Every rank
    must pass tensors of the same shape. Without a process group (or with one
    process) ``data`` comes back unchanged.

    Args:
        data: a tensor or a container of tensors.
        sync_grads: let gradients flow back through the gather to every rank's tensor.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return data
    if isinstance(data, torch.Tensor):
        return _gather_tensor(data, sync_grads)
    if isinstance(data, Mapping):
        return {key: all_gather_tensors(value, sync_grads) for key, value in data.items()}
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(all_gather_tensors(value, sync_grads) for value in data))
    if isinstance(data, (list, tuple)):
        return type(data)(all_gather_tensors(value, sync_grads) for value in data)
    return data


def _gather_tensor(tensor: torch.Tensor, sync_grads: bool) -> torch.Tensor:
    tensor = tensor.contiguous()
    if sync_grads:
        from torch.distributed.nn.functional import all_gather as differentiable_all_gather

        return torch.stack(differentiable_all_gather(tensor))
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, tensor)
    return torch.stack(pieces)


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
