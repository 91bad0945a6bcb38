"""How long a checkpoint save stalls training, synchronous against asynchronous, for a large model.

Run by ``python -m benchmarks``; alone::

    OMP_NUM_THREADS=1 python -m benchmarks.checkpoint_stall --parameters 50e6 --json out.json

The model is a stack of square ``nn.Linear`` layers sized to the requested
parameter count, trained with Adam for one step by a hookrt Trainer, so the
checkpoint contains the weights and both Adam moments (three tensors per
parameter, float32). The stall is the wall-clock time that
``trainer.save_checkpoint(path)`` blocks its caller: the whole
``torch.save``, flush and fsync for a synchronous save, and the copy of the
state to new host memory for ``asynchronous=True``. For the asynchronous save
the time until the background write has finished is reported too. Rounds
alternate between the two kinds, and each round waits for the previous
background write before it starts, so the writes do not overlap.

A warm-up round of each kind comes first and is reported on its own: the
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


def build_trainer(parameters: float, root: Path) -> tuple[Any, int]:
    """Train the model for one Adam step and return the trainer and the model's parameter count."""
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
    model = WideModel()
    data = TensorDataset(torch.randn(4, width), torch.randn(4, width))
    trainer = hookrt.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(root))
    trainer.fit(model, DataLoader(data, batch_size=4))
    return trainer, sum(parameter.numel() for parameter in model.parameters())


def measure(parameters: float, rounds: int, folder: Path) -> dict[str, Any]:
    from hookrt._async_save import writer_for

    trainer, count = build_trainer(parameters, folder)
    writer = writer_for(trainer)

    def save(kind: str) -> tuple[float, float]:
        """Save once and return the stall and the time until the file is complete."""
        path = folder / f"{kind}.ckpt"
        path.unlink(missing_ok=True)
        start = time.perf_counter()
        trainer.save_checkpoint(path, asynchronous=kind == "async")
        stall = time.perf_counter() - start
        writer.wait()
        return stall, time.perf_counter() - start

    first_sync, _ = save("sync")
    first_async, _ = save("async")
    synchronous: list[float] = []
    stalls: list[float] = []
    writes: list[float] = []
    for round_index in range(rounds):
        for kind in (("sync", "async") if round_index % 2 == 0 else ("async", "sync")):
            stall, complete = save(kind)
            if kind == "sync":
                synchronous.append(stall)
            else:
                stalls.append(stall)
                writes.append(complete)
    size = (folder / "sync.ckpt").stat().st_size
    return {
        "parameters": count,
        "layer_width": layer_width(parameters),
        "file_mib": size / 2**20,
        "rounds": rounds,
        "first_sync_stall_s": first_sync,
        "first_async_stall_s": first_async,
        "sync_stall_s": synchronous,
        "async_stall_s": stalls,
        "async_write_s": writes,
        "sync_median_s": statistics.median(synchronous),
        "async_median_s": statistics.median(stalls),
        "async_write_median_s": statistics.median(writes),
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
