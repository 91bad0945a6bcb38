"""How long a checkpoint save stalls training, synchronous against asynchronous, for a large model.

Run by ``python -m benchmarks``; alone::

    OMP_NUM_THREADS=1 python -m benchmarks.checkpoint_stall --parameters 50e6 --json out.json

The model is a stack of square ``nn.Linear`` layers sized to the requested
parameter count, trained with Adam by a hookrt Trainer, so the checkpoint
contains the weights and both Adam moments (three tensors per parameter,
float32). A plugin saves after chosen batches of that fit, with
``trainer.save_checkpoint(path)`` or ``asynchronous=True``.

The stall of a save is the time the training thread is blocked by it: the
save call (the whole ``torch.save``, flush and fsync of a synchronous save;
the copy of everything but the weights and the optimizer state for an
asynchronous one) plus the time the next optimizer steps wait for the
background copy of the weights and the optimizer state. The training thread
is not blocked otherwise, but the background copy and write compete with it
for memory bandwidth and cores. So the report also gives the whole cost: the
time that the `WINDOW` batches after the save took beyond `WINDOW` median
batches of the same fit, from the end of the batch before the save. With
the default 50M parameters, the write finishes within the window. Before the next save, the
plugin waits for the write in flight, and that batch is left out of the
median.

A warm-up save of each kind comes first and is reported on its own: the
first asynchronous save allocates the host buffers that later saves reuse,
and on a virtual machine the first writes to fresh memory also pay for the
host backing it. The medians describe the steady state of a run that saves
periodically, as the per-step benchmarks describe their steps after a warm-up
run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

LAYERS = 4


def layer_width(parameters: float) -> int:
    """Return the width at which `LAYERS` square linear layers (weights and biases) have about ``parameters``."""
    return int((-1 + math.sqrt(1 + 4 * parameters / LAYERS)) / 2)


#: Batches after a save over which its stall is measured.
WINDOW = 4
#: Batches from one save to the next: the window, one more that the write may still slow, two quiet
#: batches for the median, and the batch that waits for the write in flight.
SPACING = WINDOW + 5


def build_module(parameters: float) -> Any:
    """Return the module: `LAYERS` square linear layers of about ``parameters`` in all, trained with Adam."""
    import hookrt

    width = layer_width(parameters)

    class WideModel(hookrt.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(*(nn.Linear(width, width) for _ in range(LAYERS)))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inputs, targets = batch
            return F.mse_loss(self.layers(inputs), targets)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    torch.manual_seed(0)
    return WideModel()


def measure(parameters: float, rounds: int, folder: Path) -> dict[str, Any]:
    import hookrt
    from hookrt._async_save import writer_for

    # Warm-up saves of each kind, then the rounds, sync and async alternating in rotating order.
    kinds = ["sync", "async"]
    for round_index in range(rounds):
        kinds += ["sync", "async"] if round_index % 2 == 0 else ["async", "sync"]
    schedule = {SPACING * (index + 1): kind for index, kind in enumerate(kinds)}
    steps = SPACING * (len(kinds) + 1)

    class SaveProbe(hookrt.Plugin):
        """Saves after the scheduled batches and records when each batch ended."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.write_times: dict[int, float] = {}
            #: Per save: the time the save call blocked training, and the time the next optimizer step waited.
            self.calls: dict[int, float] = {}
            self.waits: dict[int, float] = {}
            self.saving: int | None = None

        @hookrt.on("on_batch_end")
        def record(self, payload: Any) -> None:
            trainer = payload.trainer
            batch_idx = payload.batch_idx
            if batch_idx + 1 in schedule:
                writer_for(trainer).wait()  # so that no write is in flight when the next save starts
            self.ends.append(time.perf_counter())
            kind = schedule.get(batch_idx)
            if kind is None:
                return
            path = folder / f"{kind}.ckpt"
            path.unlink(missing_ok=True)
            # The save runs once this event has reached every handler; the clock brackets it there.
            bus = trainer.bus
            bus.after_dispatch(lambda: self.calls.__setitem__(batch_idx, time.perf_counter()))
            trainer.save_checkpoint(path, asynchronous=kind == "async")
            bus.after_dispatch(lambda: self.calls.__setitem__(batch_idx, time.perf_counter() - self.calls[batch_idx]))
            self.saving = batch_idx
            if kind == "async":
                started = self.ends[-1]
                trainer.bus.after_dispatch(lambda: writer_for(trainer).after_write(
                    lambda: self.write_times.__setitem__(batch_idx, time.perf_counter() - started)))

    probe = SaveProbe()

    def timed_wait(optimizer: Any, args: Any, kwargs: Any) -> None:
        start = time.perf_counter()
        wait_for_copy(optimizer, args, kwargs)
        if probe.saving is not None:
            probe.waits[probe.saving] = probe.waits.get(probe.saving, 0.0) + time.perf_counter() - start

    module = build_module(parameters)
    width = layer_width(parameters)
    data = TensorDataset(torch.randn(4 * steps, width), torch.randn(4 * steps, width))
    trainer = hookrt.Trainer(max_epochs=1, plugins=[probe], logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             enable_signal_handler=False, num_sanity_val_steps=0, default_root_dir=str(folder))
    # The optimizer step pre-hook that an asynchronous save registers is timed, to see how long steps wait.
    writer = writer_for(trainer)
    wait_for_copy = writer._wait_for_copy
    writer._wait_for_copy = timed_wait  # type: ignore[method-assign]
    trainer.fit(module, DataLoader(data, batch_size=4))

    durations = [later - earlier for earlier, later in zip(probe.ends, probe.ends[1:], strict=False)]
    # durations[i] is the time of batch i + 1, from the end of batch i. The first batches warm up, so they
    # are left out of the median, as are the batches next to a save.
    disturbed = {batch + offset for batch in schedule for offset in (-1, *range(1, WINDOW + 2))}
    quiet = [duration for index, duration in enumerate(durations) if index + 1 not in disturbed and index >= 2]
    median_batch = statistics.median(quiet)
    stalls: dict[str, list[float]] = {"sync": [], "async": []}
    extra: dict[str, list[float]] = {"sync": [], "async": []}
    for batch, kind in schedule.items():
        stalls[kind].append(probe.calls[batch] + probe.waits.get(batch, 0.0))
        extra[kind].append(sum(durations[batch:batch + WINDOW]) - WINDOW * median_batch)
    writes = [probe.write_times[batch] for batch, kind in sorted(schedule.items()) if kind == "async"]
    synchronous, asynchronous = stalls["sync"][1:], stalls["async"][1:]
    size = (folder / "sync.ckpt").stat().st_size
    return {
        "parameters": sum(parameter.numel() for parameter in module.parameters()),
        "layer_width": width,
        "file_mib": size / 2**20,
        "rounds": rounds,
        "window_batches": WINDOW,
        "median_batch_s": median_batch,
        "first_sync_stall_s": stalls["sync"][0],
        "first_async_stall_s": stalls["async"][0],
        "sync_stall_s": synchronous,
        "async_stall_s": asynchronous,
        "async_write_s": writes[1:],
        "sync_median_s": statistics.median(synchronous),
        "async_median_s": statistics.median(asynchronous),
        "async_write_median_s": statistics.median(writes[1:]),
        "sync_extra_s": extra["sync"][1:],
        "async_extra_s": extra["async"][1:],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parameters", type=float, default=50e6, help="model size in parameters")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # The files go to the default folder for temporary files. The report names its file system, because on a
    # RAM disk (tmpfs) the synchronous save would look cheaper than on a disk.
    with tempfile.TemporaryDirectory(prefix="hookrt-stall-") as folder:
        report = measure(args.parameters, args.rounds, Path(folder))
        report["folder_filesystem"] = _filesystem_of(Path(folder))
    args.json.write_text(json.dumps(report, indent=1))


def _filesystem_of(folder: Path) -> str:
    """Return the type of the file system that contains ``folder``, from /proc/mounts, or "unknown"."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    best = ("", "unknown")
    resolved = str(folder.resolve())
    for fields in mounts:
        if len(fields) >= 3 and resolved.startswith(fields[1]) and len(fields[1]) > len(best[0]):
            best = (fields[1], fields[2])
    return best[1]


if __name__ == "__main__":
    main()
