"""Starting the processes of a distributed run when no launcher (torchrun) started them.

``Trainer(devices=N)`` with a strategy that needs N processes, run from a
plain ``python script.py``, comes here: `launch_processes` pickles the
module, the loaders, the plugins and the flags, starts N processes with
``torch.multiprocessing`` (start method "spawn"), and waits. Each process
sets the environment variables that torchrun would set, rebuilds the
trainer and runs the same entry point. Global rank 0 writes its results to a
private temporary folder, from which the caller's module and trainer receive them.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from hookrt import _distributed as distributed
from hookrt._errors import HookrtError, MisconfigurationError

if TYPE_CHECKING:
    from hookrt._module import LightningModule
    from hookrt._plugin import Plugin
    from hookrt._trainer import Trainer

__all__ = ["LaunchError", "Strategy", "launch_processes"]

logger = logging.getLogger(__name__)

_RESULT_FILE = "result.pkl"
_LOOPBACK = "127.0.0.1"


@runtime_checkable
class Strategy(Protocol):
    """A plugin that decides how many processes run, and starts them when no launcher did."""

    def needs_launch(self, trainer: Trainer) -> bool:
        """Whether the entry point must start processes instead of running in this one."""

    def launch(self, trainer: Trainer, stage: str, model: LightningModule, arguments: dict[str, Any]) -> Any:
        """Run ``trainer.<stage>(model, **arguments)`` in the started processes; returns rank 0's result."""


class LaunchError(HookrtError):
    """A started process failed without an exception that could be sent back, or the run timed out."""


@dataclass
class _Job:
    """The flags, plugins, module and arguments that every started process runs the entry point with."""

    config: Any
    plugins: list[Plugin]
    stage: str
    model: LightningModule
    arguments: dict[str, Any]


def _pickled(value: Any, what: str, num_processes: int) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise MisconfigurationError(
            f"Cannot start {num_processes} processes: {what} cannot be pickled ({type(exc).__name__}: {exc}). "
            "Processes started with torch.multiprocessing receive the module, the loaders and the plugins by "
            "pickling, so define their classes and functions at module level and hold no lambdas, open files or "
            f"locks. Or start the processes with torchrun instead: torchrun --nproc-per-node={num_processes} "
            "your_script.py"
        ) from exc


def _pickle_job(trainer: Trainer, stage: str, model: LightningModule, arguments: dict[str, Any],
                num_processes: int) -> bytes:
    """Pickle the job, checking each part first so that an error names the part that failed."""
    attached = model.__dict__.get("_trainer")
    model.trainer = None  # the caller's trainer stays here; each process builds its own
    try:
        _pickled(model, f"the module {type(model).__name__}", num_processes)
        for name, value in arguments.items():
            _pickled(value, f"the argument {name}={type(value).__name__}", num_processes)
        plugins = list(trainer.bus.plugins)
        for plugin in plugins:
            _pickled(plugin, f"the plugin {plugin!r}", num_processes)
        job = _Job(config=trainer.config, plugins=plugins, stage=stage, model=model, arguments=arguments)
        return _pickled(job, "the job", num_processes)
    finally:
        model.trainer = attached


def launch_processes(trainer: Trainer, stage: str, model: LightningModule, arguments: dict[str, Any], *,
                     num_processes: int, start_method: str = "spawn", timeout: float | None = None) -> Any:
    """Run ``trainer.<stage>(model, **arguments)`` in ``num_processes`` new processes on this machine.

    Rank 0's final ``state_dict`` is loaded into ``model``; ``trainer``'s
    ``global_step``, ``current_epoch``, ``callback_metrics`` and plugin states
    take rank 0's values.

    Args:
        trainer: the caller's trainer; its flags and plugins are sent to every process.
        stage: ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.
        model: the module, sent as it is now.
        arguments: the entry point's other arguments (loaders, ``ckpt_path``).
        num_processes: how many processes to start.
        start_method: the ``multiprocessing`` start method.
        timeout: seconds the processes may run in all before they are terminated; None waits for ever.

    Returns:
        What the entry point returned on rank 0.

    Raises:
        MisconfigurationError: a part of the job cannot be pickled.
        LaunchError: the run timed out, or a process died without an exception.
        Exception: the exception a process raised, re-raised here.
    """
    from torch.multiprocessing.spawn import start_processes

    job = _pickle_job(trainer, stage, model, arguments, num_processes)
    port = distributed.find_free_port(_LOOPBACK)
    result_dir = tempfile.mkdtemp(prefix="hookrt-launch-")
    logger.info("Starting %d processes for %s (start method %s, master %s:%d)", num_processes, stage, start_method,
                _LOOPBACK, port)
    try:
        context = start_processes(_run_process, args=(num_processes, port, job, result_dir), nprocs=num_processes,
                                     join=False, start_method=start_method)
        _wait(context, result_dir, timeout)
        with open(os.path.join(result_dir, _RESULT_FILE), "rb") as file:
            # The file was written by rank 0 of this launch into a folder that only this user can read.
            result = pickle.load(file)  # noqa: S301
    finally:
        shutil.rmtree(result_dir, ignore_errors=True)
    _apply_result(trainer, model, result)
    return result["returned"]


def _wait(context: Any, result_dir: str, timeout: float | None) -> None:
    from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):
            if deadline is not None and time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.terminate()
                raise LaunchError(
                    f"The started processes did not finish within timeout={timeout} s and were terminated."
                )
    except (ProcessRaisedException, ProcessExitedException) as exc:
        error = _first_recorded_error(result_dir)
        if error is not None:
            raise error from exc
        raise LaunchError(f"A started process failed: {exc}") from exc


def _first_recorded_error(result_dir: str) -> BaseException | None:
    """Return the exception that a process recorded first, or None when none recorded one.

    The first is the cause: when one rank fails, its peers fail after it, in
    their next collective, with connection errors that do not name the cause.
    """
    paths = [entry.path for entry in os.scandir(result_dir) if entry.name.startswith("error-rank")]
    if not paths:
        return None
    first = min(paths, key=lambda path: (os.stat(path).st_mtime_ns, path))
    with open(first, "rb") as file:
        error = pickle.load(file)  # noqa: S301 - written by a process of this launch
    if isinstance(error, BaseException):
        return error
    return LaunchError(str(error))


def _apply_result(trainer: Trainer, model: LightningModule, result: dict[str, Any]) -> None:
    from hookrt._loop import Progress
    from hookrt._metrics import MetricStore

    model.load_state_dict(result["state_dict"])
    if trainer._module is not model:
        trainer._progress = Progress()
        trainer._metrics = MetricStore()
    trainer._module = model
    trainer.bus.module = model
    model.trainer = trainer
    trainer._progress.global_step = result["global_step"]
    trainer._progress.current_epoch = result["current_epoch"]
    trainer._metrics.callback_metrics = result["callback_metrics"]
    trainer._metrics.logged_metrics = result["logged_metrics"]
    states = result["plugin_states"]
    for plugin in trainer.bus.plugins:
        if plugin.state_key in states:
            plugin.load_state_dict(states[plugin.state_key])


# ---------------------------------------------------------------------- inside a started process


def _run_process(index: int, num_processes: int, port: int, job_bytes: bytes, result_dir: str) -> None:
    """Entry point of each started process; ``index`` is its rank."""
    os.environ.update({
        "MASTER_ADDR": _LOOPBACK,
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(num_processes),
        "RANK": str(index),
        "LOCAL_RANK": str(index),
        "LOCAL_WORLD_SIZE": str(num_processes),
        "GROUP_RANK": "0",
    })
    if "OMP_NUM_THREADS" not in os.environ:
        # As torchrun does: without a limit every process starts one thread per core, and they compete.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_processes))
    try:
        job = _load_job(job_bytes)
        trainer = _rebuild_trainer(job)
        returned = getattr(trainer, job.stage)(job.model, **job.arguments)
        if index == 0:
            _write_result(trainer, job.model, returned, result_dir)
        # Dropped here so that leave_process_group can collect the DDP wrapper, which references the group.
        del trainer, job, returned
        distributed.barrier()  # no process tears the group down while a peer still uses it
    except BaseException as exc:
        _write_error(exc, index, result_dir)
        raise
    finally:
        distributed.leave_process_group()
    _exit_without_finalizing()


def _exit_without_finalizing() -> None:
    """End a started process that succeeded: run its ``atexit`` handlers, flush, and exit with status 0.

    The interpreter's own finalization is skipped on purpose. torch's C++
    threads that outlive the process group can still try to acquire the GIL
    then, and a thread that does so during finalization aborts the process (see
    `hookrt._distributed.leave_process_group`), which would turn a finished
    run into a failed launch.
    """
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def _load_job(job_bytes: bytes) -> _Job:
    """Unpickle the job in a started process.

    Raises:
        MisconfigurationError: a class or function of the job cannot be found by name in this process.
    """
    try:
        job: _Job = pickle.loads(job_bytes)  # noqa: S301 - pickled by the parent process of this launch
    except (AttributeError, ImportError) as exc:
        raise MisconfigurationError(
            f"A started process could not rebuild the module, loaders or plugins: {exc}. Processes started with "
            "torch.multiprocessing find their classes and functions by name, so define them at the top level of "
            "an importable file, not inside `if __name__ == \"__main__\":` or inside a function. Or start the "
            "processes with torchrun."
        ) from exc
    return job


def _rebuild_trainer(job: _Job) -> Trainer:
    from hookrt._bus import Bus
    from hookrt._seed import SEED_ENV, seed_everything, wants_worker_seeding
    from hookrt._trainer import Trainer

    if SEED_ENV in os.environ:
        seed_everything(int(os.environ[SEED_ENV]), workers=wants_worker_seeding())
    # A trainer whose flags add no plugins; the caller's flags and complete plugin stack replace its own.
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1, strategy="single_device")
    trainer.config = job.config
    trainer.bus = Bus(trainer=trainer)
    for plugin in job.plugins:
        trainer.bus.register(plugin)
    if job.config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return trainer


def _write_result(trainer: Trainer, model: LightningModule, returned: Any, result_dir: str) -> None:
    from hookrt.plugins.device import move_to_device

    cpu = torch.device("cpu")
    result = {
        "state_dict": move_to_device(dict(model.state_dict()), cpu),
        "global_step": trainer.global_step,
        "current_epoch": trainer.current_epoch,
        "callback_metrics": move_to_device(trainer.callback_metrics, cpu),
        "logged_metrics": move_to_device(trainer.logged_metrics, cpu),
        "plugin_states": {plugin.state_key: plugin.state_dict() for plugin in trainer.bus.plugins},
        "returned": move_to_device(returned, cpu),
    }
    path = os.path.join(result_dir, _RESULT_FILE)
    with open(path + ".tmp", "wb") as file:
        pickle.dump(result, file, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(path + ".tmp", path)


def _write_error(exc: BaseException, index: int, result_dir: str) -> None:
    try:
        data = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(data)  # noqa: S301 - an exception that cannot be rebuilt is sent as text instead
    except Exception:
        data = pickle.dumps("".join(traceback.format_exception(exc)))
    with open(os.path.join(result_dir, f"error-rank{index:05d}.pkl"), "wb") as file:
        file.write(data)
