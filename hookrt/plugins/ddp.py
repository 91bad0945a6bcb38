"""`DistributedDataParallel`: data-parallel training over several processes with ``torch.distributed``.

Start the processes with torchrun (one machine or several), or let the
plugin start them: ``Trainer(devices=N)`` run from a plain ``python
script.py`` starts N processes with ``torch.multiprocessing`` and hands rank
0's results back to the caller.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from hookrt import _distributed as distributed
from hookrt._data import limited_length
from hookrt._errors import MisconfigurationError
from hookrt._events import BatchPayload, Event, ForwardPayload, Payload, StagePayload, WrapPoint
from hookrt._plugin import Plugin, around, on
from hookrt._rank import rank_zero_warn
from hookrt._seed import SEED_ENV
from hookrt.plugins.dp import StepRouter

if TYPE_CHECKING:
    from hookrt._module import LightningModule
    from hookrt._trainer import Trainer

__all__ = ["DistributedBatchSampler", "DistributedDataParallel"]

logger = logging.getLogger(__name__)

#: After `DevicePlacement` (-500), so the module is on its device before it is wrapped.
STRATEGY_ORDER = -400


class DistributedBatchSampler(Sampler[list[int]]):
    """Yield this rank's batches: a disjoint share of the samples, the same number of batches on every rank.

    Every rank draws the same order of all indices (shuffled with ``seed +
    epoch`` when ``shuffle``) and takes every ``num_replicas``-th index from
    position ``rank`` on, so the shares are disjoint and together contain every
    index, without the padding ``DistributedSampler`` adds. When the shares
    are uneven, a rank with fewer samples splits its last batches smaller, so
    it still runs as many batches as the others. Only with ``batch_size=1``
    (or fewer samples than ranks) does a rank repeat samples to keep up. With
    ``drop_last`` every batch is full and the samples that do not fill a batch
    on every rank are dropped.

    With equal shares, batch ``k`` of all ranks together is positions
    ``k*B*W .. (k+1)*B*W - 1`` of the order, so a run on W ranks sees the same
    global batches as a run on one rank with batch size ``B*W``.

    Args:
        length: the number of samples in the dataset.
        batch_size: samples per batch on each rank.
        num_replicas: the number of ranks; the process group's size by default.
        rank: this rank; the process group's rank by default.
        shuffle: shuffle the order every epoch.
        seed: the seed of the shuffle, the same on every rank.
        drop_last: keep full batches only.
    """

    def __init__(self, length: int, batch_size: int, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False) -> None:
        num_replicas = distributed.world_size() if num_replicas is None else num_replicas
        rank = distributed.rank() if rank is None else rank
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas or length < 0:
            raise MisconfigurationError(
                f"DistributedBatchSampler(length={length}, batch_size={batch_size}, num_replicas={num_replicas}, "
                f"rank={rank}) is not valid: need length >= 0, batch_size >= 1 and 0 <= rank < num_replicas."
            )
        self.length = length
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch, which changes the shuffled order."""
        self.epoch = epoch

    def __len__(self) -> int:
        smallest_share = self.length // self.num_replicas
        largest_share = -(-self.length // self.num_replicas)
        if self.drop_last:
            return smallest_share // self.batch_size
        return -(-largest_share // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        share = order[self.rank::self.num_replicas]
        batches = len(self)
        if self.drop_last:
            for start in range(0, batches * self.batch_size, self.batch_size):
                yield share[start:start + self.batch_size]
            return
        if len(share) < batches:
            # Only with batch_size 1 or fewer samples than ranks: repeat samples from the start of the order.
            share = share + [order[i % len(order)] for i in range(batches - len(share))]
        start = 0
        for batch_index in range(batches):
            # Leave at least one sample for each batch still to come.
            size = min(self.batch_size, len(share) - start - (batches - 1 - batch_index))
            yield share[start:start + size]
            start += size


def _shuffles(sampler: Any) -> bool | None:
    """Return whether a loader's sampler shuffles, or None for a sampler this plugin does not replace."""
    if type(sampler) is SequentialSampler:
        return False
    if type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None:
        return True
    return None


def _shard_loader(loader: Any, name: str, seed: int) -> Any:
    """Return ``loader`` rebuilt with a `DistributedBatchSampler`, or unchanged (with a warning) when it cannot be."""
    if not isinstance(loader, DataLoader):
        rank_zero_warn(f"DistributedDataParallel cannot shard {name}: it is a {type(loader).__name__}, not a "
                       "DataLoader, so every rank iterates all of it. Give each rank its own share of the data.")
        return loader
    if isinstance(loader.sampler, DistributedSampler) or isinstance(loader.batch_sampler, DistributedBatchSampler):
        return loader
    problem = None
    if isinstance(loader.dataset, IterableDataset):
        problem = "its dataset is an IterableDataset, which must split the data between ranks itself"
    elif type(loader) is not DataLoader:
        problem = f"it is a {type(loader).__name__}, a DataLoader subclass this plugin cannot rebuild"
    elif loader.batch_size is None:
        problem = "it has automatic batching turned off (batch_size=None)"
    elif type(loader.batch_sampler) is not BatchSampler:
        problem = f"it has its own batch sampler ({type(loader.batch_sampler).__name__})"
    elif _shuffles(loader.sampler) is None:
        problem = f"it has its own sampler ({type(loader.sampler).__name__})"
    if problem is not None:
        rank_zero_warn(f"DistributedDataParallel did not shard {name}: {problem}. Unless it does so already, every "
                       "rank sees the same samples. Give it a DistributedSampler or DistributedBatchSampler.")
        return loader
    batch_sampler = DistributedBatchSampler(len(loader.dataset), loader.batch_size,  # type: ignore[arg-type]
                                            shuffle=bool(_shuffles(loader.sampler)), seed=seed,
                                            drop_last=loader.drop_last)
    options: dict[str, Any] = {}
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    if loader.pin_memory_device:
        options["pin_memory_device"] = loader.pin_memory_device
    return DataLoader(
        loader.dataset, batch_sampler=batch_sampler, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
        persistent_workers=loader.persistent_workers, in_order=loader.in_order, **options,
    )


class DistributedDataParallel(Plugin):
    """Train with one process per device, synchronising gradients with ``torch.nn.parallel.DistributedDataParallel``.

    Processes: under torchrun (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` set) the plugin joins the process group at ``setup`` and
    keeps it until the process ends, so several runs in one script share it.
    Without a launcher, ``fit``, ``validate``, ``test`` and ``predict`` start
    ``num_processes`` processes with torch.multiprocessing; the module, the
    loaders and the plugins must then be picklable. With one process and no
    launcher, a one-process group lives for the duration of the run.

    Training: ``training_step`` runs through the DDP wrapper, so gradients are
    averaged across ranks during backward. Micro-batches that do not close an
    accumulation window run under ``no_sync``, so gradients are exchanged once
    per optimizer step. Each rank's loaders (training and validation, in
    ``fit``) get a `DistributedBatchSampler` unless they have a sampler of their
    own; shuffling and ``drop_last`` are kept.

    Uneven inputs: every rank runs the same number of batches, because the
    sampler splits the last batches of a smaller share instead of giving that
    rank fewer (`torch.distributed.algorithms.Join` is not used). A loader the
    plugin does not shard must give every rank the same number of batches, or
    the ranks wait for each other until the process group's timeout.

    Checkpoints: ``trainer.save_checkpoint`` must run on every rank, because it
    gathers each rank's RNG state. Only global rank 0 writes the file, and the
    other ranks wait at a barrier until it is complete.

    Evaluation entry points (``validate``, ``test``, ``predict``) do not shard
    their loaders, so each rank runs all of them; only ``fit`` shards.

    Args:
        backend: the ``torch.distributed`` backend; None picks nccl for CUDA and gloo otherwise.
        find_unused_parameters: let some parameters get no gradient in a step (costs time).
        sync_batchnorm: convert BatchNorm layers to SyncBatchNorm at ``setup`` (CUDA only).
        num_processes: processes to start without a launcher; None reads the Trainer's ``devices``.
        start_method: the ``multiprocessing`` start method of those processes.
        timeout: seconds a collective operation may wait for the other ranks.
        launch_timeout: seconds the started processes may run in all; None waits for ever.
        seed: the shuffle seed of the injected samplers; None reads ``seed_everything``'s seed, else 0.
        comm_hook: a DDP communication hook, registered with ``comm_hook_state`` once the module is wrapped.
        comm_hook_state: the state passed to ``comm_hook``.
        **ddp_kwargs: more arguments for ``torch.nn.parallel.DistributedDataParallel``.
    """

    def __init__(self, backend: str | None = None, find_unused_parameters: bool = False,
                 sync_batchnorm: bool = False, *, num_processes: int | None = None, start_method: str = "spawn",
                 timeout: float = 1800.0, launch_timeout: float | None = None, seed: int | None = None,
                 comm_hook: Callable[..., Any] | None = None, comm_hook_state: Any = None,
                 **ddp_kwargs: Any) -> None:
        if num_processes is not None and num_processes < 1:
            raise MisconfigurationError(
                f"DistributedDataParallel(num_processes={num_processes}) is not valid: it must be 1 or more."
            )
        self.backend = backend
        self.find_unused_parameters = find_unused_parameters
        self.sync_batchnorm = sync_batchnorm
        self.num_processes = num_processes
        self.start_method = start_method
        self.timeout = timeout
        self.launch_timeout = launch_timeout
        self.seed = seed
        self.comm_hook = comm_hook
        self.comm_hook_state = comm_hook_state
        self.ddp_kwargs = ddp_kwargs
        #: The DDP wrapper (around a `StepRouter` of the module) during ``fit``, else None.
        self.ddp_module: torch.nn.parallel.DistributedDataParallel | None = None
        self._owns_group = False

    # ------------------------------------------------------------------ processes

    def process_count(self, trainer: Trainer) -> int:
        """Return how many processes this machine runs: ``num_processes``, else the Trainer's ``devices``."""
        if self.num_processes is not None:
            return self.num_processes
        from hookrt.plugins.device import requested_devices

        return len(requested_devices(trainer.config.accelerator, trainer.config.devices)[1])

    def needs_launch(self, trainer: Trainer) -> bool:
        """Whether the entry point must start processes: no launcher, no process group, more than one process.

        Raises:
            MisconfigurationError: several nodes were asked for without a launcher.
        """
        if distributed.launched_by_launcher() or distributed.is_initialized():
            return False
        if trainer.config.num_nodes > 1:
            raise MisconfigurationError(
                f"Trainer(num_nodes={trainer.config.num_nodes}) needs a launcher on every machine; hookrt starts "
                "processes on this machine only. Run torchrun --nnodes=N --nproc-per-node=M --node-rank=R "
                "--master-addr=HOST --master-port=PORT script.py on each machine."
            )
        return self.process_count(trainer) > 1

    def launch(self, trainer: Trainer, stage: str, model: LightningModule, arguments: dict[str, Any]) -> Any:
        """Run the entry point in `process_count` new processes; returns rank 0's result."""
        from hookrt._launch import launch_processes

        return launch_processes(trainer, stage, model, arguments, num_processes=self.process_count(trainer),
                                start_method=self.start_method, timeout=self.launch_timeout)

    @on(Event.SETUP, order=STRATEGY_ORDER)
    def join_process_group(self, payload: StagePayload) -> None:
        """Join (or create) the process group; convert BatchNorm layers when asked."""
        module = payload.module
        device_type = module.device.type
        if self.sync_batchnorm and device_type != "cuda":
            raise MisconfigurationError(
                f"DistributedDataParallel(sync_batchnorm=True) needs CUDA modules, and the module is on "
                f"{device_type}; torch's SyncBatchNorm runs on GPUs only. Train on GPUs or set sync_batchnorm=False."
            )
        if not distributed.is_initialized():
            backend = self.backend or distributed.default_backend(device_type)
            timeout = datetime.timedelta(seconds=self.timeout)
            if distributed.launched_by_launcher():
                distributed.init_from_env(backend, timeout)
            elif self.process_count(payload.trainer) == 1:
                from torch.distributed import HashStore  # type: ignore[attr-defined]

                dist.init_process_group(backend, store=HashStore(), rank=0, world_size=1, timeout=timeout)
                self._owns_group = True
            else:
                raise MisconfigurationError(
                    f"DistributedDataParallel expects {self.process_count(payload.trainer)} processes, but this one "
                    "was not started by a launcher and no process group exists. Call trainer.fit/validate/test/"
                    "predict, which start the processes, or run the script under torchrun."
                )
        # Also for a group the user created: torch's gloo threads can abort a process that exits with it.
        distributed.leave_at_exit()
        if self.sync_batchnorm and payload.stage == "fit":
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)

    @on(Event.TEARDOWN, order=-STRATEGY_ORDER)
    def leave(self, payload: StagePayload) -> None:
        """Drop the DDP wrapper; destroy the process group if this plugin created it for one process."""
        wrapped = self.ddp_module is not None
        self.ddp_module = None
        if wrapped:
            # Reference cycles around the DDP wrapper and its reducer can keep the process group alive, so
            # they are collected now and the group can go when its last user drops it.
            gc.collect()
        if self._owns_group and distributed.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False

    # ------------------------------------------------------------------ data and wrapping

    @on(Event.FIT_START, order=STRATEGY_ORDER)
    def wrap_module(self, payload: Payload) -> None:
        """Shard the loaders and wrap the module for training."""
        trainer = payload.trainer
        seed = self.seed if self.seed is not None else int(os.environ.get(SEED_ENV, 0))
        trainer.train_dataloader = _shard_loader(trainer.train_dataloader, "the training loader", seed)
        trainer.val_dataloaders = [_shard_loader(loader, f"validation loader {index}", seed)
                                   for index, loader in enumerate(trainer.val_dataloaders)]
        # TODO: configure_optimizers ran before this point, so trainer.estimated_stepping_batches there still
        # counted the whole dataset on each rank. Fixing it needs a trainer hook between connecting the loaders
        # and configuring the optimizers.
        trainer.num_training_batches = limited_length(trainer.train_dataloader, trainer.config.limit_train_batches,
                                                      "limit_train_batches")
        module = payload.module
        device = module.device
        self.ddp_module = torch.nn.parallel.DistributedDataParallel(
            StepRouter(module), device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=self.find_unused_parameters, **self.ddp_kwargs,
        )
        if self.comm_hook is not None:
            self.ddp_module.register_comm_hook(self.comm_hook_state, self.comm_hook)
        logger.info("DDP: rank %d of %d trains %s on %s", distributed.rank(), distributed.world_size(),
                    type(module).__name__, device)

    @around(WrapPoint.FORWARD)
    def route_training_step(self, payload: ForwardPayload, proceed: Callable[[], Any]) -> Any:
        """Send ``training_step`` through the DDP wrapper, so backward averages the gradients across ranks."""
        if self.ddp_module is not None and payload.stage == "train" and payload.call == payload.module.training_step:
            payload.call = self.ddp_module
        return proceed()

    @around(WrapPoint.BATCH_STEP)
    def skip_sync_inside_window(self, payload: BatchPayload, proceed: Callable[[], Any]) -> Any:
        """Run a micro-batch that does not close its accumulation window without exchanging gradients."""
        batch_step = payload.trainer._batch_step
        if self.ddp_module is None or batch_step is None or batch_step.closing:
            return proceed()
        with self.ddp_module.no_sync():
            return proceed()

    def __repr__(self) -> str:
        return (f"DistributedDataParallel(backend={self.backend!r}, num_processes={self.num_processes}, "
                f"find_unused_parameters={self.find_unused_parameters}, sync_batchnorm={self.sync_batchnorm})")
