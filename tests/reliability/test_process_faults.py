"""Faults in real training processes: SIGKILL, crashes inside a checkpoint write, SIGTERM and SIGINT.

Each test runs tests/reliability/jobs/train_job.py in subprocesses, breaks
them at chosen points and resumes from the last checkpoint on disk. The final
weights of every chain must equal those of one uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from hookrt._checkpoint_io import load_checkpoint

JOB = Path(__file__).parent / "jobs" / "train_job.py"
REPOSITORY = JOB.parents[3]
#: The optimizer steps of an uninterrupted run of the job.
TOTAL_STEPS = 240
#: Optimizer steps between the job's writes of ckpt/last.ckpt.
EVERY = 5
#: The maximum wait for one job, in seconds. Its torch import alone takes about 2 s on a 2-core machine.
JOB_TIMEOUT = 120.0

pytestmark = pytest.mark.slow


class Job:
    """One run of the job, with its stdout and stderr in ``root/{name}.out`` and ``root/{name}.err``."""

    def __init__(self, root: Path, name: str, *arguments: str, fault: str | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.stdout_path = root / f"{name}.out"
        self.stderr_path = root / f"{name}.err"
        import_paths = [str(REPOSITORY), *filter(None, [os.environ.get("PYTHONPATH")])]
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(import_paths)}
        environment.pop("HOOKRT_FAULT", None)
        if fault is not None:
            environment["HOOKRT_FAULT"] = fault
        command = [sys.executable, str(JOB), "--root", str(root), "--out", str(root / "final.pt"), *arguments]
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(command, stdout=stdout, stderr=stderr, cwd=root, env=environment)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def running(self) -> bool:
        return self.process.poll() is None

    def finish(self) -> tuple[int, dict[str, Any] | None]:
        """Wait for the job and return its exit status and the JSON line it printed, if any."""
        try:
            status = self.process.wait(timeout=JOB_TIMEOUT)
        finally:
            self.stop()
        lines = self.stdout_path.read_text().strip().splitlines()
        return status, json.loads(lines[-1]) if lines else None

    def kill(self) -> int:
        self.process.kill()
        return self.process.wait(timeout=10)

    def stop(self) -> None:
        """Kill the job if it is still running, so that a failed test leaves no process behind."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def jobs() -> Iterator[list[Job]]:
    """A list that tests append their jobs to; every job still running at the end is killed."""
    started: list[Job] = []
    yield started
    for job in started:
        job.stop()


class Reference:
    """The uninterrupted run, started once per module and awaited by the tests that compare against it."""

    def __init__(self, root: Path) -> None:
        self.job = Job(root, "reference")
        self._weights: dict[str, torch.Tensor] | None = None

    def weights(self) -> dict[str, torch.Tensor]:
        if self._weights is None:
            status, summary = self.job.finish()
            assert status == 0, self.job.stderr
            assert summary == {"first_step": 0, "last_step": TOTAL_STEPS, "signal": None}
            self._weights = torch.load(self.job.root / "final.pt", weights_only=True)
        return self._weights


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    run = Reference(tmp_path_factory.mktemp("reference"))
    yield run
    run.job.stop()


def saved_step(path: Path) -> int:
    return int(load_checkpoint(path)["global_step"])


def wait_for_checkpoint(job: Job, path: Path, step: int) -> int:
    """Poll until the job has written ``path`` at global step ``step`` or later, and return that step."""
    deadline = time.monotonic() + JOB_TIMEOUT
    last_inode = None
    while time.monotonic() < deadline:
        assert job.running(), f"the job exited with status {job.process.returncode} before step {step}:\n{job.stderr}"
        # Each save renames a new file over the old one, so only a new inode is loaded.
        inode = path.stat().st_ino if path.exists() else None
        if inode is not None and inode != last_inode:
            last_inode = inode
            saved = torch.load(path, weights_only=True)["global_step"]
            if saved >= step:
                return int(saved)
        time.sleep(0.005)
    pytest.fail(f"the job did not write {path.name} at step {step} or later within {JOB_TIMEOUT} s")


def wait_for_hold(job: Job, marker: Path, phase: str) -> None:
    """Poll until the job has entered the hold of ``phase``."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        assert job.running(), f"the job exited with status {job.process.returncode} before its hold:\n{job.stderr}"
        if marker.exists() and marker.read_text() == phase:
            return
        time.sleep(0.005)
    pytest.fail(f"the job did not reach its {phase} hold within {JOB_TIMEOUT} s")


def temp_files(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if ".tmp-" in entry.name)


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), f"{name} differs from the uninterrupted run"


def finish_resumed(job: Job, first_step: int, reference: Reference) -> None:
    """Wait for the run that completes a chain and compare its weights with the uninterrupted run."""
    status, summary = job.finish()

    assert status == 0, job.stderr
    assert summary == {"first_step": first_step, "last_step": TOTAL_STEPS, "signal": None}
    assert_same_weights(torch.load(job.root / "final.pt", weights_only=True), reference.weights())


# ---------------------------------------------------------------------- SIGKILL


def test_ten_sigkills_chained_resume_exactly(tmp_path: Path, jobs: list[Job], reference: Reference) -> None:
    chooser = random.Random(20250611)
    # The last target leaves 40 steps, so the job is still running when the kill comes after its save.
    targets = sorted(chooser.sample(range(12, TOTAL_STEPS - 40), 10))
    last = tmp_path / "ckpt" / "last.ckpt"
    resumed_from = 0

    for index, target in enumerate(targets):
        resume = ("--resume", str(last)) if index else ()
        job = Job(tmp_path, f"killed{index}", "--every", str(EVERY), "--batch-sleep", "0.002", *resume)
        jobs.append(job)
        wait_for_checkpoint(job, last, max(target, resumed_from + 1))
        time.sleep(chooser.uniform(0.0, 0.05))

        assert job.kill() == -signal.SIGKILL
        # A kill between a save's write and its rename leaves a temporary file, never a partial last.ckpt.
        step = saved_step(last)
        assert step >= max(target, resumed_from + 1)
        assert not (tmp_path / "final.pt").exists()
        resumed_from = step

    job = Job(tmp_path, "completed", "--every", str(EVERY), "--resume", str(last))
    jobs.append(job)
    finish_resumed(job, resumed_from, reference)
    assert temp_files(last.parent) == []


# ---------------------------------------------------------------------- crashes inside a checkpoint write


def test_crash_inside_checkpoint_write_keeps_last_complete(
    tmp_path: Path, jobs: list[Job], reference: Reference
) -> None:
    folder = tmp_path / "ckpt"
    last = folder / "last.ckpt"

    # The third save fails with a full disk: fit stops with an error that names the full disk.
    full = Job(tmp_path, "disk_full", "--every", str(EVERY), fault="enospc:3")
    jobs.append(full)
    status, summary = full.finish()
    stderr = full.stderr
    assert status == 1, stderr
    assert summary is None
    assert f"error: Could not save the checkpoint {str(last)!r}: [Errno 28] No space left on device." in stderr
    assert "The previous file at that path, if any, is unchanged. The disk is full" in stderr
    assert "Traceback" not in stderr
    assert "enforce fail" not in stderr
    assert saved_step(last) == 2 * EVERY
    assert sorted(entry.name for entry in folder.iterdir()) == ["last.ckpt"]

    # The second save after resuming is killed after its temporary file is written, before the rename.
    killed = Job(tmp_path, "killed_before_rename", "--every", str(EVERY), "--resume", str(last),
                 fault="kill-before-rename:2")
    jobs.append(killed)
    status, summary = killed.finish()
    assert status == -signal.SIGKILL, killed.stderr
    assert saved_step(last) == 3 * EVERY
    (leftover,) = temp_files(folder)
    assert leftover.startswith(".last.ckpt.tmp-")
    assert saved_step(folder / leftover) == 4 * EVERY

    # Resuming uses the last complete checkpoint, and its first save removes the leftover file.
    completed = Job(tmp_path, "completed", "--every", str(EVERY), "--resume", str(last))
    jobs.append(completed)
    finish_resumed(completed, 3 * EVERY, reference)
    assert sorted(entry.name for entry in folder.iterdir()) == ["last.ckpt"]


# ---------------------------------------------------------------------- SIGTERM and SIGINT

SIGNAL_CHAIN = [
    (signal.SIGTERM, "train", 15),
    (signal.SIGINT, "validation", 2),
    (signal.SIGTERM, "save", 2),
    (signal.SIGINT, "train", 40),
    (signal.SIGTERM, "validation", 3),
    (signal.SIGINT, "save", 3),
]


def test_signals_in_each_phase_stop_cleanly_and_resume(
    tmp_path: Path, jobs: list[Job], reference: Reference
) -> None:
    marker = tmp_path / "holding"
    signal_checkpoint = tmp_path / "signal.ckpt"
    first_step = 0

    for index, (signum, phase, occurrence) in enumerate(SIGNAL_CHAIN):
        marker.unlink(missing_ok=True)
        resume = ("--resume", str(signal_checkpoint)) if index else ()
        name = f"{index}-{signum.name}-{phase}"
        job = Job(tmp_path, name, "--every", str(EVERY), "--hold", f"{phase}:{occurrence}", *resume)
        jobs.append(job)
        wait_for_hold(job, marker, phase)

        job.process.send_signal(signum)
        status, summary = job.finish()

        stderr = job.stderr
        assert status == 128 + signum, f"{name}:\n{stderr}"
        assert summary is not None
        assert summary["signal"] == signum
        assert summary["first_step"] == first_step, name
        assert "Traceback" not in stderr
        assert f"Received {signum.name}: wrote a checkpoint of epoch " in stderr
        step = saved_step(signal_checkpoint)
        # Stopping steps the optimizer once more when the signal came inside an accumulation window.
        assert summary["last_step"] - step in (0, 1), name
        # The save that the signal interrupted finished: no temporary file, and last.ckpt loads.
        assert temp_files(tmp_path) == []
        assert temp_files(tmp_path / "ckpt") == []
        assert saved_step(tmp_path / "ckpt" / "last.ckpt") <= step
        first_step = step

    job = Job(tmp_path, "completed", "--every", str(EVERY), "--resume", str(signal_checkpoint))
    jobs.append(job)
    finish_resumed(job, first_step, reference)
