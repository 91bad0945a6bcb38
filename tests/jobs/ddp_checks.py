"""One process of a two-process DDP job that runs every multi-process check in a row.

Start it twice with the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT)::

    python tests/jobs/ddp_checks.py OUTPUT_FOLDER

Each process writes ``OUTPUT_FOLDER/rank{RANK}.json`` with what each check
measured, and at interpreter exit ``OUTPUT_FOLDER/rank{RANK}-exit.json``
with whether the process group still existed once hookrt's own exit
handler had run; tests/plugins/test_ddp.py asserts on those files. Every run in one
process shares the process group that the first run joined, so the job pays
for one process start and one rendezvous.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from ddp_models import QUIET, Regressor, indexed_dataset, indexed_loader, weights
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils.data import DataLoader

import hookrt
from hookrt import _distributed as distributed
from hookrt.plugins.checkpoint import ModelCheckpoint
from hookrt.plugins.csv_logger import CSVLogger
from hookrt.plugins.ddp import DistributedBatchSampler, DistributedDataParallel
from hookrt.plugins.signals import SignalHandler

#: Seconds a collective may wait before the run fails instead of hanging.
COLLECTIVE_TIMEOUT = 60.0


def ddp(**options: Any) -> DistributedDataParallel:
    return DistributedDataParallel(timeout=COLLECTIVE_TIMEOUT, **options)


def counting_allreduce(state, bucket):
    """A DDP communication hook that counts its calls and then averages the bucket like DDP's default.

    torch checks a hook's annotations against the real classes, which string annotations fail, so it has none.
    """
    state["calls"] += 1
    return allreduce_hook(None, bucket)  # type: ignore[arg-type]


def check_weights_match() -> dict[str, Any]:
    """DDP on 2 ranks x 4 samples against one process on batches of 8 drawn in the same global order."""
    counter = {"calls": 0}
    module = Regressor(momentum=0.9)
    trainer = hookrt.Trainer(max_epochs=2, accumulate_grad_batches=3, **QUIET,
                             plugins=[ddp(comm_hook=counting_allreduce, comm_hook_state=counter)])
    trainer.fit(module, indexed_loader(32, 4, shuffle=True))

    reference = Regressor(momentum=0.9)
    sampler = DistributedBatchSampler(32, 8, num_replicas=1, rank=0, shuffle=True, seed=0)
    reference_trainer = hookrt.Trainer(max_epochs=2, accumulate_grad_batches=3, **QUIET)
    reference_trainer.fit(reference, DataLoader(indexed_dataset(32), batch_sampler=sampler))

    every_rank = distributed.all_gather_object(weights(module).tolist())
    return {
        "max_difference": float((weights(module) - weights(reference)).abs().max()),
        "changed": float((weights(module) - weights(Regressor())).abs().max()),
        "steps": trainer.global_step,
        "reference_steps": reference_trainer.global_step,
        "allreduce_calls": counter["calls"],
        "ranks_equal": all(item == every_rank[0] for item in every_rank),
    }


def check_sampling() -> list[dict[str, Any]]:
    """Which samples each rank trained on, per epoch, for even and uneven dataset lengths."""
    results = []
    for length, batch_size, drop_last in [(20, 3, False), (21, 3, False), (9, 4, False), (21, 4, True)]:
        module = Regressor()
        trainer = hookrt.Trainer(max_epochs=2, plugins=[ddp()], **QUIET)
        trainer.fit(module, indexed_loader(length, batch_size, shuffle=True, drop_last=drop_last))
        every_rank = distributed.all_gather_object(module.seen)
        epochs = []
        for epoch in range(2):
            batches = [rank_seen[epoch] for rank_seen in every_rank]
            samples = [index for rank_batches in batches for batch in rank_batches for index in batch]
            epochs.append({
                "batches_per_rank": [len(rank_batches) for rank_batches in batches],
                "largest_batch": max(len(batch) for rank_batches in batches for batch in rank_batches),
                "repeated": len(samples) - len(set(samples)),
                "missing": sorted(set(range(length)) - set(samples)),
                "order": [index for batch in batches[0] for index in batch],
            })
        results.append({"length": length, "batch_size": batch_size, "drop_last": drop_last, "epochs": epochs})
    return results


class RankReporter(Regressor):
    """Logs its rank with sync_dist and gathers a tensor from every rank when training ends."""

    def training_step(self, batch, batch_idx):
        rank = float(self.trainer.global_rank)
        self.log("rank_mean", rank, sync_dist=True)
        self.log("rank_max", rank, sync_dist=True, reduce_fx="max")
        return super().training_step(batch, batch_idx)

    def on_train_end(self):
        rank = self.trainer.global_rank
        self.gathered = self.all_gather({"ranks": torch.tensor([rank, 10 + rank])})


def check_sync_and_gather() -> dict[str, Any]:
    module = RankReporter()
    trainer = hookrt.Trainer(max_epochs=1, plugins=[ddp()], **QUIET)
    trainer.fit(module, indexed_loader(16, 4))
    return {
        "rank_mean": float(trainer.callback_metrics["rank_mean"]),
        "rank_max": float(trainer.callback_metrics["rank_max"]),
        "gathered": module.gathered["ranks"].tolist(),
        "world_size": trainer.world_size,
        "is_global_zero": trainer.is_global_zero,
    }


def check_rank_zero_files(output: Path) -> dict[str, Any]:
    """Each rank gets its own folder for checkpoints and CSV logs; only rank 0's may fill up."""
    folder = output / "files" / f"rank{distributed.rank()}"
    folder.mkdir(parents=True)
    trainer = hookrt.Trainer(
        max_epochs=2, default_root_dir=folder, enable_progress_bar=False, enable_model_summary=False,
        logger=CSVLogger(save_dir=folder), plugins=[ddp(), ModelCheckpoint(dirpath=folder / "checkpoints")],
        log_every_n_steps=1,
    )
    trainer.fit(Regressor(), indexed_loader(16, 4), indexed_loader(8, 4))
    files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
    return {"files": files}


class Interrupt(hookrt.Plugin):
    """Saves a checkpoint after batch 0 of epoch 1 (inside an accumulation window) and fails at batch 1."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.visible_after_save = False

    @hookrt.on("on_batch_end")
    def save(self, payload):
        if payload.trainer.current_epoch == 1 and payload.batch_idx == 0:
            payload.trainer.save_checkpoint(self.path)

    @hookrt.on("on_batch_start")
    def fail(self, payload):
        if payload.trainer.current_epoch == 1 and payload.batch_idx == 1:
            self.visible_after_save = self.path.exists()
            raise RuntimeError("interrupted on purpose")


def resume_run(path: Path | None = None, ckpt_path: Path | None = None, seed: int = 0) -> tuple[Regressor, Any]:
    # Each rank draws different dropout masks, so a resume that gave rank 1 the RNG state of rank 0 would differ.
    torch.manual_seed(seed + distributed.rank())
    module = Regressor(dropout=0.2, momentum=0.9)
    plugins: list[hookrt.Plugin] = [ddp()]
    interrupt = Interrupt(path) if path is not None else None
    if interrupt is not None:
        plugins.append(interrupt)
    trainer = hookrt.Trainer(max_epochs=3, accumulate_grad_batches=2, plugins=plugins, **QUIET)
    try:
        trainer.fit(module, indexed_loader(40, 4, shuffle=True), ckpt_path=ckpt_path)
    except RuntimeError as exc:
        if "interrupted on purpose" not in str(exc):
            raise
    return module, interrupt if interrupt is not None else trainer


def check_resume(output: Path) -> dict[str, Any]:
    path = output / "interrupted.ckpt"
    uninterrupted, trainer = resume_run(seed=100)
    _, interrupt = resume_run(path=path, seed=100)
    checkpoint = torch.load(path, weights_only=True)
    resumed, resumed_trainer = resume_run(ckpt_path=path, seed=5000)
    return {
        "max_difference": float((weights(resumed) - weights(uninterrupted)).abs().max()),
        "steps": trainer.global_step,
        "resumed_steps": resumed_trainer.global_step,
        "rank_states": len(checkpoint.get("rank_states", [])),
        "visible_after_save": interrupt.visible_after_save,
    }


class SignalOnRankOne(hookrt.Plugin):
    """Sends SIGTERM to rank 1's own process at the start of batch 2 of epoch 0; rank 0 receives nothing."""

    @hookrt.on("on_batch_start")
    def send(self, payload):
        if distributed.rank() == 1 and payload.trainer.current_epoch == 0 and payload.batch_idx == 2:
            os.kill(os.getpid(), signal.SIGTERM)


def check_signal_agreement(output: Path) -> dict[str, Any]:
    """A signal received by one rank stops every rank after the same batch, with one checkpoint."""
    handler = SignalHandler(dirpath=output / "signal")
    trainer = hookrt.Trainer(max_epochs=2, plugins=[ddp(), handler, SignalOnRankOne()], **QUIET)
    trainer.fit(Regressor(), indexed_loader(40, 4, shuffle=True))
    return {
        "received": handler.received,
        "steps": trainer.global_step,
        "epoch": trainer.current_epoch,
        "checkpoint": handler.checkpoint_path,
        "checkpoint_exists": handler.checkpoint_path is not None and Path(handler.checkpoint_path).exists(),
    }


class StopOnRankOne(hookrt.Plugin):
    """Requests a stop on rank 1 only: after batch 2 of epoch 0, or at the end of epoch 1 when ``at_epoch_end``."""

    def __init__(self, at_epoch_end: bool) -> None:
        self.at_epoch_end = at_epoch_end

    @hookrt.on("on_batch_end")
    def after_batch(self, payload):
        if not self.at_epoch_end and distributed.rank() == 1 and payload.batch_idx == 2:
            payload.trainer.should_stop = True

    @hookrt.on("on_epoch_end")
    def after_epoch(self, payload):
        if self.at_epoch_end and distributed.rank() == 1 and payload.epoch == 1:
            payload.trainer.should_stop = True


def check_stop_agreement() -> dict[str, Any]:
    """A stop requested on one rank only ends training on every rank at the same step, mid-epoch and at its end."""
    results = {}
    for at_epoch_end in (False, True):
        trainer = hookrt.Trainer(max_epochs=4, plugins=[ddp(), StopOnRankOne(at_epoch_end)], **QUIET)
        trainer.fit(Regressor(), indexed_loader(40, 4, shuffle=True))
        results["epoch_end" if at_epoch_end else "mid_epoch"] = {"steps": trainer.global_step,
                                                                 "epoch": trainer.current_epoch}
    return results


def report_exit_state(path: Path) -> None:
    """Record whether the process group outlived hookrt's exit handler (registered later, so run earlier)."""
    path.write_text(json.dumps({"group_alive": torch.distributed.is_initialized()}))


def main(argv: list[str]) -> int:
    output = Path(argv[0])
    rank = int(os.environ["RANK"])
    atexit.register(report_exit_state, output / f"rank{rank}-exit.json")
    torch.set_num_threads(1)
    results = {
        "weights": check_weights_match(),
        "sampling": check_sampling(),
        "sync": check_sync_and_gather(),
        "files": check_rank_zero_files(output),
        "resume": check_resume(output),
        "signal": check_signal_agreement(output),
        "stop": check_stop_agreement(),
    }
    (output / f"rank{rank}.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
