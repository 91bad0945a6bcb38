"""Exact resume: a run resumed from a checkpoint ends bit for bit where an uninterrupted run ends.

The in-process tests compare parameters, optimizer state, scheduler state and
``trainer.callback_metrics`` with torch.equal. The subprocess tests kill a real
training job (tests/_resume_job.py) with SIGKILL or SIGTERM, resume it in a new
process and compare the final weights.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import hookrt
from hookrt import Event
from hookrt.plugins.signals import SignalHandler

QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
BATCHES_PER_EPOCH = 10
EPOCHS = 3
JOB = Path(__file__).with_name("_resume_job.py")
REPOSITORY = JOB.parent.parent
#: The optimizer steps of the job's uninterrupted run.
TOTAL_STEPS = 200
#: The maximum wait for a subprocess, in seconds. Its torch import alone takes about 2 s on a 2-core machine.
JOB_TIMEOUT = 120.0


class NoisyDataset(Dataset):
    """Fixed points whose inputs get fresh torch.randn noise on every read (in the worker, with workers)."""

    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, 4, generator=generator)
        self.y = self.x.sum(dim=1, keepdim=True)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index] + 0.1 * torch.randn(4), self.y[index]


class DropoutNet(hookrt.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        # 4 optimizer steps per epoch: windows [0, 1, 2], [3, 4, 5], [6, 7, 8] and the short [9].
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4 * EPOCHS, eta_min=1e-4)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SaveAt(hookrt.Plugin):
    """Save a checkpoint at each emission of ``event`` during ``epochs``, outside the sanity check.

    The files are named ``{epoch}-{batch_idx}-{count}.ckpt``, with -1 for events without a batch index.
    """

    def __init__(self, folder: Path, event: str, epochs: range) -> None:
        self.folder = folder
        self.event = event
        self.epochs = epochs
        self.paths: list[Path] = []

    @hookrt.on(Event.SETUP)
    def subscribe(self, payload):
        payload.trainer.bus.subscribe(self.event, self.save, name="SaveAt.save")

    def save(self, payload):
        trainer = payload.trainer
        if trainer.current_epoch not in self.epochs or getattr(payload, "sanity_checking", False):
            return
        path = self.folder / f"{trainer.current_epoch}-{getattr(payload, 'batch_idx', -1)}-{len(self.paths)}.ckpt"
        trainer.save_checkpoint(path)
        self.paths.append(path)


class BatchCounter(hookrt.Plugin):
    def __init__(self) -> None:
        self.batches = 0

    @hookrt.on(Event.BATCH_START)
    def count(self, payload):
        self.batches += 1


def run_fit(
    root: Path, num_workers: int = 0, plugins: tuple[hookrt.Plugin, ...] = (), ckpt_path: Any = None
) -> tuple[hookrt.Trainer, DropoutNet]:
    """Seed, build the module and the loaders, and fit for EPOCHS epochs (resuming from ``ckpt_path``)."""
    torch.manual_seed(0)
    model = DropoutNet()
    train = DataLoader(NoisyDataset(4 * BATCHES_PER_EPOCH, seed=1), batch_size=4, shuffle=True,
                       num_workers=num_workers)
    val = DataLoader(NoisyDataset(12, seed=2), batch_size=4, num_workers=num_workers)
    trainer = hookrt.Trainer(
        max_epochs=EPOCHS, accumulate_grad_batches=3, val_check_interval=0.5, default_root_dir=str(root),
        plugins=[SignalHandler(), *plugins], **QUIET,
    )
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return trainer, model


def final_state(trainer: hookrt.Trainer, model: DropoutNet) -> dict[str, Any]:
    return {
        "parameters": model.state_dict(),
        "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "callback_metrics": trainer.callback_metrics,
        "global_step": trainer.global_step,
        "current_epoch": trainer.current_epoch,
    }


def assert_identical(actual: Any, expected: Any, where: str = "state") -> None:
    """Assert that two nested states are equal, tensors bit for bit (torch.equal)."""
    if isinstance(expected, dict):
        assert sorted(actual, key=str) == sorted(expected, key=str), f"{where}: keys differ"
        for key in expected:
            assert_identical(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: lengths differ"
        for index, (left, right) in enumerate(zip(actual, expected, strict=True)):
            assert_identical(left, right, f"{where}[{index}]")
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), f"{where}: tensors differ"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


# ---------------------------------------------------------------------- in process


@pytest.mark.parametrize(
    "num_workers",
    [0, pytest.param(2, marks=[pytest.mark.slow, pytest.mark.filterwarnings("ignore:This DataLoader will create")])],
)
def test_resume_after_every_batch_of_second_epoch(tmp_path, num_workers):
    expected = final_state(*run_fit(tmp_path / "reference", num_workers))
    # Saving must not change the run, so the saving run is checked against the reference too.
    saver = SaveAt(tmp_path / "ckpts", Event.BATCH_END, range(1, 2))
    assert_identical(final_state(*run_fit(tmp_path / "saving", num_workers, (saver,))), expected)
    assert len(saver.paths) == BATCHES_PER_EPOCH

    for path in saver.paths:
        checkpoint = torch.load(path, weights_only=True)
        # Windows [0, 1, 2], [3, 4, 5], [6, 7, 8] and [9]: a checkpoint inside a window contains its gradients.
        batches_done = checkpoint["loops"]["progress"]["batches_done"]
        window_open = batches_done % 3 != 0 and batches_done < BATCHES_PER_EPOCH
        assert ("partial_gradients" in checkpoint) == window_open, path.name

        resumed = run_fit(tmp_path / "resumed", num_workers, ckpt_path=path)

        assert_identical(final_state(*resumed), expected, where=path.name)


@pytest.mark.parametrize("event", [Event.EPOCH_END, Event.VALIDATION_END])
def test_resume_from_epoch_and_validation_end(tmp_path, event):
    expected = final_state(*run_fit(tmp_path / "reference"))
    saver = SaveAt(tmp_path / "ckpts", event, range(0, EPOCHS - 1))
    run_fit(tmp_path / "saving", plugins=(saver,))
    # on_epoch_end fires once per epoch. Validation runs mid-epoch and at the end of each epoch.
    assert len(saver.paths) == (EPOCHS - 1) * (1 if event == Event.EPOCH_END else 2)

    for path in saver.paths:
        resumed = run_fit(tmp_path / "resumed", ckpt_path=path)

        assert_identical(final_state(*resumed), expected, where=path.name)


@pytest.mark.parametrize("saved_at", ["after_fit", "last_epoch_end"])
def test_resume_finished_run_trains_nothing(tmp_path, saved_at):
    folder = tmp_path / "ckpts"
    saver = SaveAt(folder, Event.EPOCH_END, range(EPOCHS - 1, EPOCHS))
    trainer, model = run_fit(tmp_path / "first", plugins=(saver,))
    if saved_at == "after_fit":
        path = folder / "after_fit.ckpt"
        trainer.save_checkpoint(path)
    else:
        (path,) = saver.paths
    expected = final_state(trainer, model)
    root = tmp_path / "root"
    root.mkdir()
    counter = BatchCounter()

    resumed, resumed_model = run_fit(root, plugins=(counter,), ckpt_path=path)

    assert counter.batches == 0
    assert resumed.global_step == expected["global_step"] == EPOCHS * 4
    assert_identical(resumed_model.state_dict(), expected["parameters"])
    assert files_under(root) == []


# ---------------------------------------------------------------------- subprocesses


def start_job(folder: Path, *arguments: str) -> subprocess.Popen[bytes]:
    """Start the job with its root and outputs in ``folder``, and its stdout and stderr in files there."""
    folder.mkdir(parents=True, exist_ok=True)
    import_paths = [str(REPOSITORY), *filter(None, [os.environ.get("PYTHONPATH")])]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(import_paths)}
    with open(folder / "stdout.txt", "wb") as stdout, open(folder / "stderr.txt", "wb") as stderr:
        return subprocess.Popen(
            [sys.executable, str(JOB), "--root", str(folder), "--out", str(folder / "final.pt"), *arguments],
            stdout=stdout, stderr=stderr, cwd=folder, env=environment,
        )


def finish(process: subprocess.Popen[bytes], folder: Path) -> tuple[int, dict[str, Any]]:
    """Wait for the job (with a timeout) and return its exit status and the JSON line it printed."""
    try:
        status = process.wait(timeout=JOB_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    stdout = (folder / "stdout.txt").read_text()
    stderr = (folder / "stderr.txt").read_text()
    assert stdout.strip(), f"the job printed nothing; status {status}, stderr:\n{stderr}"
    return status, json.loads(stdout.strip().splitlines()[-1])


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    """Kill the processes that are still running, so that a failed test leaves none behind."""
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def wait_for_checkpoint(process: subprocess.Popen[bytes], path: Path, step: int) -> int:
    """Poll until the job has written ``path`` at global step ``step`` or later, and return that step."""
    deadline = time.monotonic() + JOB_TIMEOUT
    last_inode = None
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the job exited with status {process.returncode} before step {step}"
        # Each save renames a new file over the old one, so a new inode means a new checkpoint. Only a new
        # one is loaded, which keeps this loop from competing with the job for the CPU.
        inode = path.stat().st_ino if path.exists() else None
        if inode is not None and inode != last_inode:
            last_inode = inode
            saved = torch.load(path, weights_only=True)["global_step"]
            if saved >= step:
                return int(saved)
        time.sleep(0.005)
    process.kill()
    process.wait(timeout=10)
    pytest.fail(f"the job did not write {path.name} at step {step} or later within {JOB_TIMEOUT} s")


def check_resumed(
    process: subprocess.Popen[bytes], folder: Path, expected: dict[str, torch.Tensor], first_step: int
) -> None:
    """Wait for a resumed job and compare its final weights with ``expected``."""
    status, summary = finish(process, folder)

    assert status == 0, (folder / "stderr.txt").read_text()
    assert summary["first_step"] == first_step
    assert summary["last_step"] == TOTAL_STEPS
    weights = torch.load(folder / "final.pt", weights_only=True)
    assert_identical(weights, expected, where=folder.name)


@pytest.fixture(scope="module")
def uninterrupted_weights(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final weights of the job run once without interruption."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    status, summary = finish(start_job(folder), folder)
    assert status == 0, (folder / "stderr.txt").read_text()
    assert summary == {"first_step": 0, "last_step": TOTAL_STEPS, "signal": None}
    return torch.load(folder / "final.pt", weights_only=True)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, uninterrupted_weights):
    chooser = random.Random(20240229)
    steps = sorted(chooser.randrange(15, 150) for _ in range(3))
    folders = [tmp_path / f"killed{trial}" for trial in range(3)]
    # One job at a time: jobs run side by side on a loaded machine could finish before their turn to be
    # killed. Each is killed once its checkpoint reaches its step, after a random delay.
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for folder, step in zip(folders, steps, strict=True):
            process = start_job(folder, "--every", "7", "--batch-sleep", "0.002")
            processes.append(process)
            wait_for_checkpoint(process, folder / "step.ckpt", step)
            time.sleep(chooser.uniform(0.0, 0.05))
            process.kill()
            process.wait(timeout=10)
    finally:
        stop_all(processes)

    saved_steps = []
    for folder, process, step in zip(folders, processes, steps, strict=True):
        assert process.returncode == -signal.SIGKILL
        assert not (folder / "final.pt").exists()
        saved = torch.load(folder / "step.ckpt", weights_only=True)["global_step"]
        assert saved >= step
        saved_steps.append(saved)

    resumed = [tmp_path / f"resumed{trial}" for trial in range(3)]
    checkpoints = [folder / "step.ckpt" for folder in folders]
    processes = [start_job(target, "--resume", str(path)) for target, path in zip(resumed, checkpoints, strict=True)]
    try:
        for folder, process, saved in zip(resumed, processes, saved_steps, strict=True):
            check_resumed(process, folder, uninterrupted_weights, first_step=saved)
    finally:
        stop_all(processes)


@pytest.mark.slow
def test_sigterm_then_resume_matches_uninterrupted(tmp_path, uninterrupted_weights):
    folder = tmp_path / "terminated"
    process = start_job(folder, "--batch-sleep", "0.002")
    try:
        wait_for_checkpoint(process, folder / "step.ckpt", 70)
    except BaseException:
        stop_all([process])
        raise
    process.send_signal(signal.SIGTERM)
    status, summary = finish(process, folder)

    stderr = (folder / "stderr.txt").read_text()
    path = folder / "signal.ckpt"
    assert status == 128 + signal.SIGTERM, stderr
    assert summary["signal"] == signal.SIGTERM
    assert "Traceback" not in stderr
    assert "Received SIGTERM: wrote a checkpoint of epoch " in stderr
    assert f"To resume, call trainer.fit(model, ..., ckpt_path={str(path)!r})." in stderr
    assert not (folder / "final.pt").exists()
    saved = torch.load(path, weights_only=True)["global_step"]
    # Stopping steps the optimizer once more when the signal came inside an accumulation window.
    assert summary["last_step"] - saved in (0, 1)

    folder = tmp_path / "resumed"
    check_resumed(start_job(folder, "--resume", str(path)), folder, uninterrupted_weights, first_step=saved)
