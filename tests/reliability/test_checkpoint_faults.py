"""Checkpoint writes that fail inside torch.save, in process: the error names the cause, nothing is left behind.

The subprocess tests in test_process_faults.py crash real training runs; these
tests fail single writes, so that each message and each file can be checked.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import hookrt._checkpoint_io as checkpoint_io
from hookrt import CheckpointError
from hookrt._checkpoint_io import load_checkpoint, save_atomic


class FailingFile:
    """A binary file whose writes fail with ``error`` once ``limit`` bytes are written."""

    def __init__(self, file: Any, error: OSError, limit: int) -> None:
        self.file = file
        self.error = error
        self.limit = limit
        self.written = 0

    def write(self, data: bytes) -> int:
        if self.written + len(data) > self.limit:
            raise self.error
        self.written += len(data)
        return int(self.file.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)

    def __enter__(self) -> FailingFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.file.close()


def fail_writes(monkeypatch: pytest.MonkeyPatch, error: OSError, limit: int = 200) -> None:
    """Make the checkpoint writer's files fail with ``error``, while torch.save itself stays real."""

    def open_failing(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> FailingFile:
        return FailingFile(open(path, mode, *args, **kwargs), error, limit)

    # A module global shadows the builtin, so only the checkpoint writer calls this open.
    monkeypatch.setattr(checkpoint_io, "open", open_failing, raising=False)


def checkpoint(value: float) -> dict[str, Any]:
    return {"state_dict": {"weight": torch.full((64, 64), value)}, "global_step": int(value)}


@pytest.mark.parametrize(
    ("code", "cause", "advice"),
    [
        (errno.ENOSPC, r"\[Errno 28\] No space left on device", "The disk is full: free space or save to another"),
        (errno.EDQUOT, r"\[Errno 122\] Disk quota exceeded", ""),
        (errno.EIO, r"\[Errno 5\] Input/output error", ""),
    ],
    ids=["ENOSPC", "EDQUOT", "EIO"],
)
def test_failed_write_names_os_error(
    code: int, cause: str, advice: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.ckpt"
    save_atomic(checkpoint(1.0), path)
    fail_writes(monkeypatch, OSError(code, os.strerror(code)))

    with pytest.raises(CheckpointError, match=rf"Could not save the checkpoint '.*last\.ckpt': {cause}\. The "
                       rf"previous file at that path, if any, is unchanged\.( {advice})?") as caught:
        save_atomic(checkpoint(2.0), path)
    monkeypatch.undo()

    # torch.save turns the failed write into a RuntimeError about its zip writer, which the message leaves out.
    assert "enforce fail" not in str(caught.value)
    assert "inline_container" not in str(caught.value)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert load_checkpoint(path)["global_step"] == 1
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["last.ckpt"]


def test_save_under_a_file_is_explained_quietly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "checkpoints"
    blocker.write_text("not a folder")

    with caplog.at_level(logging.DEBUG, logger="hookrt"), pytest.raises(
        CheckpointError, match=r"Could not save the checkpoint '.*checkpoints/run/last\.ckpt': .*A part of the "
        r"folder path is a file, not a folder: save to another folder\."
    ):
        save_atomic(checkpoint(1.0), blocker / "run" / "last.ckpt")

    # No temporary file can exist under a file, so there is nothing to remove and nothing to warn about.
    assert caplog.records == []
    assert blocker.read_text() == "not a folder"
