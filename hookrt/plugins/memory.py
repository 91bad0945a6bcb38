"""A probe that logs memory use: CUDA allocator statistics per device and the host's resident memory."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch

from hookrt._errors import MisconfigurationError
from hookrt._events import BatchEndPayload, Payload
from hookrt._plugin import Plugin, on
from hookrt.plugins.logger import log_through_trainer

__all__ = ["MemoryProbe", "cuda_memory", "host_memory"]

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]


class MemoryProbe(Plugin):
    """Log memory use every few optimizer steps and report the peaks when fit ends.

    Every sample has the host process's resident set size (``memory/host/rss_mib``
    from ``/proc/self/statm``) and its peak (``memory/host/peak_rss_mib`` from
    ``getrusage``). When CUDA is available, each CUDA device with the
    module's parameters or buffers adds ``memory/cudaN/allocated_mib``,
    ``reserved_mib`` and ``max_allocated_mib`` from the caching allocator
    where N is the device index. The names have no colon because tensorboardX
    replaces colons in scalar tags.
    Values are in MiB (2**20 bytes). A metric the platform cannot provide is
    left out: ``/proc`` exists on Linux only, ``resource`` on POSIX only.

    Samples go to the loggers through ``trainer.log_metrics`` at the global
    step, after the batch in which ``global_step`` reached a multiple of
    ``every_n_steps``. The largest value of each metric seen over the run is
    kept in `summary` and logged at INFO level when fit ends.

    Args:
        every_n_steps: optimizer steps between samples.

    Raises:
        MisconfigurationError: ``every_n_steps`` is not a positive int.
    """

    critical = False

    def __init__(self, every_n_steps: int = 50) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise MisconfigurationError(
                f"MemoryProbe(every_n_steps={every_n_steps!r}) is invalid: every_n_steps must be a positive int, "
                "the number of optimizer steps between samples."
            )
        self.every_n_steps = every_n_steps
        self._peaks: dict[str, float] = {}
        #: The first global step of the next interval of ``every_n_steps``, where the next sample is taken.
        self._next_step = every_n_steps
        #: The CUDA devices of the fitted module, looked up once when fit starts. None outside fit.
        self._fit_devices: list[torch.device] | None = None

    @property
    def summary(self) -> dict[str, float]:
        """The largest value of each metric over the run so far, in MiB, by metric name."""
        return dict(self._peaks)

    def sample(self, module: Any = None) -> dict[str, float]:
        """Read the memory metrics now, update the peaks and return the values.

        Args:
            module: the module whose CUDA devices are read; None reads the current CUDA device
                when CUDA is already initialized, and no CUDA device otherwise.
        """
        values = host_memory()
        devices = self._fit_devices
        if devices is None:
            devices = _cuda_devices(module) if torch.cuda.is_available() else []
        for device in devices:
            values.update(cuda_memory(device))
        for name, value in values.items():
            if value > self._peaks.get(name, float("-inf")):
                self._peaks[name] = value
        return values

    @on("on_fit_start")
    def _reset(self, payload: Payload) -> None:
        self._peaks = {}
        self._next_step = self._interval_after(int(getattr(payload.trainer, "global_step", 0)))
        # The module stays on these devices until fit ends. Looking them up once saves a walk over every
        # parameter and a CUDA availability query (tens of microseconds without a GPU) at each sample.
        self._fit_devices = _cuda_devices(payload.module) if torch.cuda.is_available() else []

    @on("on_batch_end")
    def _sample_on_step(self, payload: BatchEndPayload) -> None:
        # A batch can advance global_step by more than one, so the test is whether a new interval was
        # reached, not step % n == 0.
        if payload.trainer.global_step < self._next_step:
            return
        step = int(payload.trainer.global_step)
        self._next_step = self._interval_after(step)
        log_through_trainer(payload.trainer, self.sample(payload.module), step)

    def _interval_after(self, step: int) -> int:
        """Return the first step of the interval of ``every_n_steps`` that follows the one containing ``step``."""
        return (step // self.every_n_steps + 1) * self.every_n_steps

    @on("on_fit_end")
    def _report(self, payload: Payload) -> None:
        self.sample(payload.module)

    @on("teardown")
    def _forget_devices(self, payload: Payload) -> None:
        # Here rather than at on_fit_end, which a failed fit never reaches: a later sample() must not read them.
        self._fit_devices = None
        if not self._peaks:
            return
        width = max(len(name) for name in self._peaks)
        lines = [f"  {name:<{width}}  {value:12.1f} MiB" for name, value in sorted(self._peaks.items())]
        log.info("Peak memory over the run:\n%s", "\n".join(lines))


def host_memory() -> dict[str, float]:
    """Return the process's current and peak resident set size in MiB, where the platform provides them."""
    values: dict[str, float] = {}
    try:
        # os.open and os.read skip the text layer of open(), which costs more than the read.
        statm = os.open("/proc/self/statm", os.O_RDONLY)
        try:
            resident_pages = int(os.read(statm, 128).split()[1])
        finally:
            os.close(statm)
        values["memory/host/rss_mib"] = resident_pages * _PAGE_SIZE / _MIB
    except (OSError, ValueError, IndexError):
        pass  # no /proc (macOS, Windows): the current RSS is left out
    if resource is None:
        return values  # Windows has no resource module: the peak RSS is left out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    values["memory/host/peak_rss_mib"] = peak / _MIB if sys.platform == "darwin" else peak / 1024
    return values


def cuda_memory(device: torch.device) -> dict[str, float]:
    """Return the caching allocator's allocated, reserved and peak allocated memory on one CUDA device, in MiB."""
    prefix = f"memory/cuda{device.index}"
    return {
        f"{prefix}/allocated_mib": torch.cuda.memory_allocated(device) / _MIB,
        f"{prefix}/reserved_mib": torch.cuda.memory_reserved(device) / _MIB,
        f"{prefix}/max_allocated_mib": torch.cuda.max_memory_allocated(device) / _MIB,
    }


def _cuda_devices(module: Any) -> list[torch.device]:
    """Return the CUDA devices of the module's tensors, sorted by index.

    Devices the module does not use are not read, because reading one creates
    a CUDA context on it, which costs memory on every GPU of the machine.
    """
    if module is None or not isinstance(module, torch.nn.Module):
        if torch.cuda.is_initialized():
            return [torch.device("cuda", torch.cuda.current_device())]
        return []
    indices = {
        tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
        for tensor in [*module.parameters(), *module.buffers()]
        if tensor.device.type == "cuda"
    }
    return [torch.device("cuda", index) for index in sorted(indices)]
