"""Time a two-process hookrt DDP run against a hand-written torch DDP loop on the same model and data.

Run it from the repository root::

    python -m benchmarks.ddp_overhead [--quick] [--rounds N] [--steps N]

The script starts two processes (torch.multiprocessing, start method
"spawn") that join one gloo process group on 127.0.0.1, with one torch
thread each. Both contenders train an MLP 32-32-4 with ReLU, cross entropy
and SGD at lr 0.01 on in-memory data, with batches of 32 per process drawn by
the same `DistributedBatchSampler`, starting from the same weights:

- hookrt: ``Trainer.fit`` with the DistributedDataParallel plugin, which
  wraps the module, shards the loader and routes ``training_step`` through DDP;
- torch: ``torch.nn.parallel.DistributedDataParallel`` around the same MLP and
  a ``for`` loop of zero_grad, forward, backward and step.

They run in interleaved rounds whose order rotates, after one warm-up run
each. Two regions are timed on rank 0, between barriers. The loop runs from
the start of the first batch to the end of the last (for hookrt, from
``on_train_start`` to ``on_train_end``). The whole call is ``fit`` for
hookrt, and the DDP construction plus the loop for torch. The table
gives the median time per step, its range over the rounds and the ratio of
hookrt's median to torch's. The script prints figures and never fails on a
ratio. It raises only when the two did not take the same number of steps or
did not reach the same weights, because the comparison would then be wrong.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt
from benchmarks._timing import RegionClock, Summary, cpu_model, git_commit, markdown_table, run_interleaved
from hookrt._distributed import find_free_port
from hookrt.plugins.ddp import DistributedBatchSampler, DistributedDataParallel

FEATURES = 32
HIDDEN = 32
CLASSES = 4
BATCH_SIZE = 32
LEARNING_RATE = 0.01
PROCESSES = 2
FULL_STEPS = 1000
QUICK_STEPS = 200
FULL_ROUNDS = 5
#: Largest difference between the two contenders' final weights that still counts as the same training.
WEIGHT_TOLERANCE = 1e-4


def build_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def build_dataset(steps: int) -> TensorDataset:
    """Return enough samples for ``steps`` batches on every process, drawn once from a fixed generator."""
    generator = torch.Generator().manual_seed(0)
    samples = steps * BATCH_SIZE * PROCESSES
    inputs = torch.randn(samples, FEATURES, generator=generator)
    targets = torch.randint(0, CLASSES, (samples,), generator=generator)
    return TensorDataset(inputs, targets)


def flat_weights(module: nn.Module) -> torch.Tensor:
    return torch.cat([parameter.detach().reshape(-1) for parameter in module.parameters()])


def run_torch(dataset: TensorDataset, initial: dict[str, torch.Tensor]) -> dict[str, Any]:
    model = build_mlp()
    model.load_state_dict(initial)
    loader = DataLoader(dataset, batch_sampler=DistributedBatchSampler(len(dataset), BATCH_SIZE))
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    call, loop = RegionClock(), RegionClock()
    steps = 0
    gc.collect()
    dist.barrier()
    call.start()
    wrapped = nn.parallel.DistributedDataParallel(model)
    loop.start()
    for inputs, targets in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(wrapped(inputs), targets)
        loss.backward()
        optimizer.step()
        steps += 1
    loop.end()
    call.end()
    dist.barrier()
    return {"loop": loop.seconds, "call": call.seconds, "steps": steps, "weights": flat_weights(model)}


class HookrtMLP(hookrt.LightningModule):
    def __init__(self, initial: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.net = build_mlp()
        self.net.load_state_dict(initial)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        return F.cross_entropy(self.net(inputs), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LEARNING_RATE)


class LoopClock(hookrt.Plugin):
    """Times the region between ``on_train_start`` and ``on_train_end``."""

    def __init__(self) -> None:
        self.clock = RegionClock()

    @hookrt.on("on_train_start", order=10**6)
    def started(self, payload: Any) -> None:
        self.clock.start()

    @hookrt.on("on_train_end", order=-(10**6))
    def ended(self, payload: Any) -> None:
        self.clock.end()


def run_hookrt(dataset: TensorDataset, initial: dict[str, torch.Tensor]) -> dict[str, Any]:
    module = HookrtMLP(initial)
    clock = LoopClock()
    trainer = hookrt.Trainer(
        max_epochs=1, plugins=[DistributedDataParallel(), clock], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    loader = DataLoader(dataset, batch_size=BATCH_SIZE)
    call = RegionClock()
    gc.collect()
    dist.barrier()
    call.start()
    trainer.fit(module, loader)
    call.end()
    dist.barrier()
    return {"loop": clock.clock.seconds, "call": call.seconds, "steps": trainer.global_step,
            "weights": flat_weights(module)}


def benchmark_process(rank: int, port: int, steps: int, rounds: int) -> None:
    """Body of each started process; rank 0 prints the table."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(PROCESSES), "LOCAL_WORLD_SIZE": str(PROCESSES)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        dataset = build_dataset(steps)
        torch.manual_seed(0)
        initial = {key: value.clone() for key, value in build_mlp().state_dict().items()}
        runs: dict[str, Callable[[], dict[str, Any]]] = {
            "hookrt": lambda: run_hookrt(dataset, initial),
            "torch": lambda: run_torch(dataset, initial),
        }
        for run in runs.values():
            run()  # warm-up: imports, first DDP construction, allocator
        samples = run_interleaved(runs, rounds)
        check_same_training(samples)
        if rank == 0:
            print(report(samples, steps, rounds))
    finally:
        dist.destroy_process_group()


def check_same_training(samples: dict[str, list[dict[str, Any]]]) -> None:
    hookrt_run, torch_run = samples["hookrt"][-1], samples["torch"][-1]
    if hookrt_run["steps"] != torch_run["steps"]:
        raise RuntimeError(
            f"hookrt took {hookrt_run['steps']} steps and torch {torch_run['steps']}, so the runs differ."
        )
    difference = float((hookrt_run["weights"] - torch_run["weights"]).abs().max())
    if difference > WEIGHT_TOLERANCE:
        raise RuntimeError(f"hookrt and torch ended {difference:.2e} apart (tolerance {WEIGHT_TOLERANCE}).")


def report(samples: dict[str, list[dict[str, Any]]], steps: int, rounds: int) -> str:
    rows = []
    medians = {}
    for region, label in (("loop", "loop"), ("call", "whole call")):
        for name in ("torch", "hookrt"):
            summary = Summary.of([sample[region] / steps * 1e6 for sample in samples[name]])
            medians[(region, name)] = summary.median
            ratio = summary.median / medians[(region, "torch")]
            rows.append([label, name, f"{summary.median:.1f}", f"{summary.minimum:.1f} - {summary.maximum:.1f}",
                         f"{ratio:.2f}"])
    table = markdown_table(["region", "contender", "median us/step", "range", "ratio to torch"], rows,
                           [False, False, True, True, True])
    header = (
        f"DDP overhead: {PROCESSES} processes, gloo on 127.0.0.1, {steps} steps of {BATCH_SIZE} samples per process, "
        f"{rounds} rounds\nmachine: {cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}, commit {git_commit()}\n"
    )
    return header + table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="hookrt DDP against a hand-written torch DDP loop")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps per run instead of {FULL_STEPS}")
    parser.add_argument("--steps", type=int, default=None, help="steps per run on each process")
    parser.add_argument("--rounds", type=int, default=FULL_ROUNDS, help="timed rounds per contender")
    args = parser.parse_args(argv)
    steps = args.steps or (QUICK_STEPS if args.quick else FULL_STEPS)
    import torch.multiprocessing as mp

    mp.start_processes(benchmark_process, args=(find_free_port(), steps, args.rounds), nprocs=PROCESSES,
                       start_method="spawn")


if __name__ == "__main__":
    main()
