"""Asynchronous checkpoint writes: copy the state now, write the file from a background thread.

A synchronous save stalls training for the whole ``torch.save``, flush and
fsync. An asynchronous save stalls it only while `snapshot_to_host` copies
every tensor of the checkpoint into host memory of its own (pinned memory for
CUDA tensors, so the device-to-host copies run asynchronously and the snapshot
waits for the device once). Training can then change the weights and the
optimizer state in place without touching what is written. The writer keeps
the host buffers of a finished write and copies the next snapshot into them.
The first write to fresh memory also pays for the kernel's mapping and zeroing
of each page, which took about 3.5 times as long as the copy itself for 600 MB
on the 2-core VM of benchmarks/results. So from the first asynchronous save to
the end of the run, the writer keeps one checkpoint's worth of host memory.
The write itself goes through `save_atomic`, so it is as atomic as a
synchronous one.

During fit, the largest part of the copy overlaps training. The storages of
the module's parameters and of the optimizers' state change only in
optimizer steps, so the writer thread copies them while the next batch loads,
runs forward and runs backward. An optimizer step pre-hook makes every
optimizer step wait until that copy is complete, and so does every event
other than the four that come before the step inside a batch
(`OVERLAPPED_EVENTS`), because plugins may swap weights at such events, for
example at the end of training or before validation. Everything else (buffers,
gradients of an open accumulation window, plugin states) is copied before the
save returns. An in-place change to those storages outside an optimizer step
would reach the copy. So each such tensor's version counter is read at the
save and again after the copy. When one has changed, the file is not written,
and the next save or the end of the run raises `CheckpointError`. Changes that
bypass the version counter go unseen: through ``tensor.data``, through
``tensor.numpy()`` or through the storage.

Each trainer has at most one `AsyncCheckpointWriter`, and the writer has at
most one write in flight: a new save first waits for the previous write. An
error in a background write is raised by the next save, or when the run that
requested it ends (the writer subscribes to ``teardown``), so ``fit`` never
returns before the file is complete.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from hookrt._checkpoint_io import check_loadable, save_atomic
from hookrt._errors import CheckpointError
from hookrt._events import Event

__all__ = ["AsyncCheckpointWriter", "finish_pending_copy", "snapshot_to_host", "writer_for"]

logger = logging.getLogger(__name__)

#: Attribute of the trainer under which its writer is kept.
_WRITER_ATTRIBUTE = "_async_checkpoint_writer"
#: Order of the writer's teardown handler: after every plugin's, so their files are closed first.
_TEARDOWN_ORDER = 2**30


#: The events that may run while the deferred copy is in progress: those of the next batch before its step.
OVERLAPPED_EVENTS = frozenset({Event.BATCH_START.value, Event.BEFORE_BACKWARD.value, Event.AFTER_BACKWARD.value,
                               Event.BEFORE_OPTIMIZER_STEP.value})
#: Order of the handlers that wait for the deferred copy: before every other handler of their event.
_COPY_WAIT_ORDER = -(2**30)


#: Host storages that a finished snapshot no longer needs, by (pinned, size in bytes).
BufferPool = dict[tuple[bool, int], list[torch.UntypedStorage]]


def snapshot_to_host(value: Any, pool: BufferPool | None = None) -> Any:
    """Return a copy of ``value`` whose tensors live in host memory and share nothing with the originals.

    Containers (dict, OrderedDict, list, tuple, set) are rebuilt with their
    types, and other values are kept as they are, because a checkpoint may
    only contain immutable ones besides tensors. Tensors that share storage
    in ``value`` share the copied storage, as ``torch.save`` would store them
    once. A CUDA tensor is copied into pinned host memory, and the copy
    waits for the device once, at the end. Every copied tensor is a CPU
    tensor, so the file stores CPU tensors where a synchronous save would
    store CUDA ones. Storages of the right size are taken from ``pool``
    when it has them, instead of being allocated.
    """
    return _snapshot(value, pool if pool is not None else {})[0]


def _snapshot(
    value: Any, pool: BufferPool, deferrable: set[tuple[int, int]] | None = None
) -> tuple[Any, _HostCopier]:
    """Return the copy of ``value`` and its copier, whose ``filled`` lists the host storages it fills.

    The storages in ``deferrable`` are left uncopied, in the copier's ``deferred_copies``.
    """
    copier = _HostCopier(pool, deferrable)
    result = copier.copy(value)
    _copy_host_storages(copier.host_copies)
    if copier.used_cuda:
        torch.cuda.synchronize()
    return result, copier


class _DeferredCopy:
    """Host copies of storages that change only in optimizer steps, made after the save returns."""

    def __init__(self, copies: list[tuple[torch.UntypedStorage, torch.UntypedStorage]],
                 watched: list[tuple[torch.Tensor, int]]) -> None:
        self.copies = copies
        #: Each source tensor with its version counter at the save, checked again after the copy.
        self.watched = watched
        self.copied = threading.Event()
        self.verified = threading.Event()
        self.changed = False

    def run(self) -> None:
        """Copy the storages on the writer thread, then wait until the training thread has checked them."""
        try:
            _copy_host_storages(self.copies)
        finally:
            self.copies = []
            self.copied.set()
        self.verified.wait()

    def verify(self) -> None:
        """Wait for the copy, then note whether a source changed in place since the save. Training thread only.

        torch moves a tensor's version counter when an in-place operation
        has finished, so a check on the writer thread could pass while such an
        operation was still writing. On the thread that trains, every operation
        it started has finished, so a change made before this call is seen.
        """
        if self.verified.is_set():
            return
        self.copied.wait()
        self.changed = any(tensor._version != version for tensor, version in self.watched)
        self.watched = []
        self.verified.set()


class _HostCopier:
    """One snapshot: remembers copied storages and containers so that shared references stay shared."""

    def __init__(self, pool: BufferPool, deferrable: set[tuple[int, int]] | None = None) -> None:
        self.pool = pool
        #: (data_ptr, nbytes) of the CPU storages whose copy may wait until after the save returns.
        self.deferrable = deferrable or set()
        #: The copies of those storages, and the tensors that read them with their version counters.
        self.deferred_copies: list[tuple[torch.UntypedStorage, torch.UntypedStorage]] = []
        self.watched: list[tuple[torch.Tensor, int]] = []
        self.storages: dict[tuple[str, int, int], torch.UntypedStorage] = {}
        self.filled: BufferPool = {}
        self.containers: dict[int, Any] = {}
        self.used_cuda = False
        #: Host-to-host copies (target, source), made together by `_copy_host_storages` after the walk.
        self.host_copies: list[tuple[torch.UntypedStorage, torch.UntypedStorage]] = []

    def copy(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self.copy_tensor(value)
        kind = type(value)
        if kind is dict or kind is OrderedDict:
            return self.copy_mapping(value)
        if kind is list:
            return self.copy_list(value)
        if kind is tuple:
            return tuple(self.copy(item) for item in value)
        if kind is set:
            return {self.copy(item) for item in value}
        return value

    def copy_mapping(self, value: dict[Any, Any]) -> dict[Any, Any]:
        known = self.containers.get(id(value))
        if known is not None:
            return known
        result = type(value)()
        self.containers[id(value)] = result
        for key, item in value.items():
            result[key] = self.copy(item)
        return result

    def copy_list(self, value: list[Any]) -> list[Any]:
        known = self.containers.get(id(value))
        if known is not None:
            return known
        result: list[Any] = []
        self.containers[id(value)] = result
        result.extend(self.copy(item) for item in value)
        return result

    def copy_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.layout is not torch.strided or tensor.is_quantized or tensor.device.type == "meta":
            # NOTE: sparse and quantized tensors are cloned one by one, so they lose storage sharing.
            return tensor.detach().to("cpu", copy=True)
        storage = tensor.untyped_storage()
        key = (str(storage.device), storage.data_ptr(), storage.nbytes())
        deferred = storage.device.type == "cpu" and key[1:] in self.deferrable
        if deferred:
            self.watched.append((tensor, tensor._version))
        copied = self.storages.get(key)
        if copied is None:
            copied = self.copy_storage(storage, deferred)
            self.storages[key] = copied
        result = torch.empty(0, dtype=tensor.dtype)
        result.set_(copied, tensor.storage_offset(), tensor.size(), tensor.stride())
        if type(tensor) is torch.nn.Parameter:
            return torch.nn.Parameter(result, requires_grad=tensor.requires_grad)
        if tensor.requires_grad:
            result.requires_grad_(True)
        return result

    def copy_storage(self, storage: torch.UntypedStorage, deferred: bool = False) -> torch.UntypedStorage:
        pinned = storage.device.type == "cuda"
        spare = self.pool.get((pinned, storage.nbytes()))
        if spare:
            host = spare.pop()
        else:
            host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pinned).untyped_storage()
        if pinned:
            # NOTE: the pinned CUDA path has not run in this project's tests, which have no GPU.
            host.copy_(storage, non_blocking=True)
        elif deferred:
            self.deferred_copies.append((host, storage))
        else:
            self.host_copies.append((host, storage))
        self.used_cuda = self.used_cuda or pinned
        self.filled.setdefault((pinned, storage.nbytes()), []).append(host)
        return host


class AsyncCheckpointWriter:
    """Writes checkpoints from a background thread, one at a time.

    `submit` returns once the snapshot is taken. The next `submit`, and
    `wait`, first wait for the write in flight and raise its error, if any.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._writing = False
        self._after: list[Callable[[], Any]] = []
        #: Host storages free for the next snapshot, and those the write in flight still reads.
        self._pool: BufferPool = {}
        self._lent: BufferPool = {}
        #: The copy that the write in flight makes after `submit` returned, and the optimizer step
        #: pre-hook that waits for it; None when there is none.
        self._deferred: _DeferredCopy | None = None
        self._step_hook: Any = None
        #: Handles of the handlers that make events wait for the deferred copy.
        self._event_guards: list[Any] = []
        #: Whether a teardown handler of the current run waits for this writer.
        self.teardown_subscribed = False

    @property
    def in_flight(self) -> bool:
        """Whether a background write has started and not finished."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def submit(self, checkpoint: Mapping[str, Any], path: str, *, owners: Mapping[str, str] | None = None,
               deferrable: set[tuple[int, int]] | None = None, bus: Any = None) -> None:
        """Snapshot ``checkpoint`` and write it to ``path`` in the background.

        Args:
            checkpoint: the checkpoint dict.
            path: the file to write.
            owners: passed to `check_loadable`, so that its error names the plugin.
            deferrable: ``(data_ptr, nbytes)`` of CPU storages that change only in optimizer
                steps. The writer thread copies them after this call returns, and every
                optimizer step waits for that copy.
            bus: the bus whose events outside `OVERLAPPED_EVENTS` wait for that copy too.

        Raises:
            CheckpointError: the previous background write failed, or ``checkpoint``
                contains a value that ``torch.load(weights_only=True)`` cannot load.
                The second is checked here, before the snapshot, as a synchronous
                save checks it.
        """
        self.wait()
        check_loadable(checkpoint, owners=owners)
        snapshot, copier = _snapshot(checkpoint, self._pool, deferrable)
        self._lent = copier.filled
        if copier.deferred_copies:
            self._deferred = _DeferredCopy(copier.deferred_copies, copier.watched)
            self._step_hook = register_optimizer_step_pre_hook(self._wait_for_copy)
            if bus is not None:
                self._guard_events(bus)
        thread = threading.Thread(
            target=self._write, args=(snapshot, path, owners, self._deferred),
            name=f"hookrt checkpoint writer ({path})",
        )
        with self._lock:
            self._thread = thread
            self._writing = True
        thread.start()

    def after_write(self, action: Callable[[], Any]) -> None:
        """Run ``action`` once the write in flight has succeeded, from the writer thread; at once if none is.

        The action is dropped when that write fails.
        """
        with self._lock:
            if self._writing:
                self._after.append(action)
                return
        action()

    def wait(self) -> None:
        """Block until the write in flight is complete; raise its error, once, if it failed."""
        self.finish_copy()  # the writer thread waits for this check before it writes
        thread = self._thread
        if thread is not None:
            thread.join()
        with self._lock:
            self._thread = None
            error, self._error = self._error, None
        for key, storages in self._lent.items():
            self._pool.setdefault(key, []).extend(storages)
        self._lent = {}
        if error is not None:
            raise error

    def release_buffers(self) -> None:
        """Wait for the write in flight, then drop the host buffers kept for the next snapshot."""
        try:
            self.wait()
        finally:
            self._pool = {}

    def _guard_events(self, bus: Any) -> None:
        def wait_for_copy(payload: Any) -> None:
            self.finish_copy()

        for event in Event:
            if event.value not in OVERLAPPED_EVENTS:
                self._event_guards.append(bus.subscribe(event, wait_for_copy, name="AsyncCheckpointWriter",
                                                        order=_COPY_WAIT_ORDER))

    @property
    def copy_pending(self) -> bool:
        """True while a deferred copy has not been waited for and checked."""
        return self._deferred is not None

    def finish_copy(self) -> None:
        """Wait for the deferred copy and check it, then remove the hook and the handlers that wait for it.

        Call it from the thread that trains, before anything that may change
        the parameters or the optimizer state in place.
        """
        deferred = self._deferred
        if deferred is not None:
            deferred.verify()
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        guards, self._event_guards = self._event_guards, []
        for guard in guards:
            guard.remove()
        self._deferred = None

    def _wait_for_copy(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Hold an optimizer step until the deferred copy no longer reads the tensors it changes."""
        deferred = self._deferred
        if deferred is not None:
            deferred.verify()

    def _write(self, snapshot: Mapping[str, Any], path: str, owners: Mapping[str, str] | None,
               deferred: _DeferredCopy | None) -> None:
        try:
            if deferred is not None:
                deferred.run()
                if deferred.changed:
                    raise CheckpointError(
                        f"The asynchronous checkpoint {path!r} was not written: a parameter or an optimizer state "
                        "tensor was changed in place after save_checkpoint(asynchronous=True) returned, before the "
                        "background copy had read it. During fit these are copied while the next batch runs, and "
                        "only optimizer steps and the events after that batch wait for the copy. Change them in "
                        "place only in optimizer steps, or save with asynchronous=False."
                    )
            save_atomic(snapshot, path, owners=owners)
        except BaseException as exc:  # re-raised in the training thread by `wait`
            with self._lock:
                self._error = exc
                self._writing = False
                self._after.clear()
            logger.error("The background write of checkpoint %s failed; the next save or the end of the run "
                         "raises the error: %s", path, exc)
            return
        with self._lock:
            self._writing = False
            actions, self._after = self._after, []
        logger.info("Finished the background write of checkpoint %s", path)
        for action in actions:
            try:
                action()
            except Exception:
                logger.exception("An action queued after the background write of %s failed.", path)


#: Threads that copy a large snapshot. Training waits for the copy, so more threads shorten the stall.
_COPY_THREADS = max(1, min(4, os.cpu_count() or 1))
#: Bytes per piece of a parallel copy. A snapshot smaller than two pieces is copied by one thread.
_COPY_PIECE_BYTES = 16 * 2**20


def _copy_host_storages(copies: list[tuple[torch.UntypedStorage, torch.UntypedStorage]]) -> None:
    """Copy each source storage into its target of the same size, in pieces on several threads when large.

    The bytes are copied through views of the widest element that divides
    the size, because ``UntypedStorage.copy_`` copies byte elements. On the
    2-core VM of benchmarks/results, 600 MB copied as 8-byte elements took
    about 20% less time, and two threads took about 25% less again. Tensor
    copies release the GIL, so the threads run in parallel.
    """
    pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
    total = 0
    for target, source in copies:
        size = source.nbytes()
        total += size
        dtype = next(kind for kind in (torch.int64, torch.int32, torch.uint8) if size % kind.itemsize == 0)
        count = size // dtype.itemsize
        target_view = torch.empty(0, dtype=dtype).set_(target, 0, (count,), (1,))
        source_view = torch.empty(0, dtype=dtype).set_(source, 0, (count,), (1,))
        step = max(1, _COPY_PIECE_BYTES // dtype.itemsize)
        for begin in range(0, count, step):
            pieces.append((target_view[begin:begin + step], source_view[begin:begin + step]))
    if _COPY_THREADS == 1 or total < 2 * _COPY_PIECE_BYTES:
        for target_piece, source_piece in pieces:
            target_piece.copy_(source_piece)
        return
    with ThreadPoolExecutor(_COPY_THREADS, thread_name_prefix="hookrt snapshot copy") as executor:
        for future in [executor.submit(target.copy_, source) for target, source in pieces]:
            future.result()


def finish_pending_copy(trainer: Any) -> None:
    """Wait for the deferred copy of the trainer's asynchronous save, if one is pending, and check it.

    The batch step calls this before a step whose closure, ``optimizer_step``
    override or wrapper may change the weights in place before the optimizer
    step pre-hook runs.
    """
    writer: AsyncCheckpointWriter | None = getattr(trainer, _WRITER_ATTRIBUTE, None)
    if writer is not None and writer.copy_pending:
        writer.finish_copy()


def writer_for(trainer: Any) -> AsyncCheckpointWriter:
    """Return the trainer's writer, created on first use, and make the run's teardown wait for it.

    The teardown handler is subscribed once per run: it waits for the write
    in flight, drops the kept host buffers, raises the write's error if it
    failed, and removes itself.
    """
    writer: AsyncCheckpointWriter | None = getattr(trainer, _WRITER_ATTRIBUTE, None)
    if writer is None:
        writer = AsyncCheckpointWriter()
        setattr(trainer, _WRITER_ATTRIBUTE, writer)
    if not writer.teardown_subscribed:
        _subscribe_teardown(trainer, writer)
    return writer


def _subscribe_teardown(trainer: Any, writer: AsyncCheckpointWriter) -> None:
    handle: Any = None

    def finish_writes(payload: Any) -> None:
        writer.teardown_subscribed = False
        handle.remove()
        writer.release_buffers()

    handle = trainer.bus.subscribe(Event.TEARDOWN, finish_writes, name="AsyncCheckpointWriter",
                                   order=_TEARDOWN_ORDER)
    writer.teardown_subscribed = True
