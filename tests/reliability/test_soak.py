"""A long run with every built-in plugin on: memory and open files must not grow.

The step count comes from ``HOOKRT_SOAK_STEPS`` (20,000 by default). At ten
points of the run, a probe reads the resident set size from
``/proc/self/statm`` and counts the entries of ``/proc/self/fd``. After a
warm-up of a tenth of the steps, RSS may grow by less than 5 MB, and the
number of open files must not change. Set ``HOOKRT_SOAK_REPORT`` to a file name to
get the samples as JSON lines.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt
from hookrt import Event
from hookrt.plugins.checkpoint import ModelCheckpoint
from hookrt.plugins.csv_logger import CSVLogger
from hookrt.plugins.early_stopping import EarlyStopping
from hookrt.plugins.lr_monitor import LearningRateMonitor
from hookrt.plugins.memory import MemoryProbe
from hookrt.plugins.profiler import HookProfiler
from hookrt.plugins.progress import ProgressBar
from hookrt.plugins.summary import ModelSummary
from hookrt.plugins.tensorboard import TensorBoardLogger

STEPS = int(os.environ.get("HOOKRT_SOAK_STEPS", "20000"))
BATCH_SIZE = 8
BATCHES_PER_EPOCH = 500
#: The largest growth of the resident set size allowed after warm-up, in bytes.
MAX_RSS_GROWTH = 5 * 1024 * 1024
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc, which only Linux has"),
]


class Tiny(hookrt.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y), prog_bar=True)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5000, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Sample:
    """One reading of the process's memory and open files."""

    def __init__(self, step: int, started: float) -> None:
        with open("/proc/self/statm", encoding="ascii") as statm:
            self.rss = int(statm.read().split()[1]) * PAGE_SIZE
        self.open_files = len(os.listdir("/proc/self/fd"))
        self.step = step
        self.seconds = time.monotonic() - started

    def as_dict(self) -> dict[str, float]:
        return {"step": self.step, "rss_mib": self.rss / 2**20, "open_files": self.open_files,
                "seconds": round(self.seconds, 2)}


class Probe(hookrt.Plugin):
    """Read memory and open files at the end of the batches whose global step is in ``steps``."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.samples: list[Sample] = []
        self.started = time.monotonic()

    @hookrt.on(Event.BATCH_END, order=2**31)
    def sample(self, payload: Any) -> None:
        step = payload.trainer.global_step
        if step in self.steps and not any(sample.step == step for sample in self.samples):
            self.samples.append(Sample(step, self.started))


def soak_loaders() -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCHES_PER_EPOCH * BATCH_SIZE, 4, generator=generator)
    y = torch.sin(x).sum(dim=1, keepdim=True)
    train = DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=True, num_workers=0)
    val = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=BATCH_SIZE)
    return train, val


def test_soak_memory_and_open_files_stay_flat(tmp_path: Path) -> None:
    warm_up = max(STEPS // 10, 1000)
    probe = Probe({warm_up, *range(STEPS // 10, STEPS + 1, max(STEPS // 10, 1))})
    with open(os.devnull, "w") as progress_output:
        plugins = [
            TensorBoardLogger(save_dir=tmp_path),
            CSVLogger(save_dir=tmp_path),
            ProgressBar(file=progress_output),
            LearningRateMonitor(log_momentum=True),
            MemoryProbe(every_n_steps=100),
            HookProfiler(),
            ModelSummary(),
            ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1000, save_top_k=2, save_last=True),
            EarlyStopping(monitor="val_loss", patience=STEPS),
            probe,
        ]
        trainer = hookrt.Trainer(
            max_steps=STEPS, val_check_interval=250, num_sanity_val_steps=2, log_every_n_steps=50,
            gradient_clip_val=1.0, default_root_dir=tmp_path, plugins=plugins,
        )
        torch.manual_seed(0)
        train, val = soak_loaders()
        trainer.fit(Tiny(), train, val)

    report = [sample.as_dict() for sample in probe.samples]
    target = os.environ.get("HOOKRT_SOAK_REPORT")
    if target:
        Path(target).write_text("".join(json.dumps(line) + "\n" for line in report))
    sys.stderr.write(f"soak of {STEPS} steps: {report}\n")

    assert trainer.global_step == STEPS
    assert trainer.stop_reason is None
    samples = {sample.step: sample for sample in probe.samples}
    assert sorted(samples) == sorted(probe.steps)
    first, last = samples[warm_up], samples[STEPS]
    assert last.rss - first.rss < MAX_RSS_GROWTH, report
    assert last.open_files == first.open_files, report
    # Every built-in plugin was on: the checkpoint folder contains the two latest step saves and last.ckpt.
    saved = sorted(path.name for path in (tmp_path / "checkpoints").iterdir())
    assert len(saved) == 3, saved
