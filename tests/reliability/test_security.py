"""Files as an attack surface: code in checkpoints, file names built from input, and the CLI's imports.

A checkpoint whose pickle would run code is rejected without running it.
Checkpoint and log file names built from templates, metric names and logger
names stay inside their folders. ``hookrt fit FILE:Class`` imports the named
file and nothing else from its folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt
from hookrt import MisconfigurationError
from hookrt._checkpoint_io import CheckpointLoadError
from hookrt.plugins.checkpoint import ModelCheckpoint
from hookrt.plugins.csv_logger import CSVLogger
from hookrt.plugins.tensorboard import TensorBoardLogger

QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
REPOSITORY = Path(__file__).resolve().parents[2]


class Regressor(hookrt.LightningModule):
    def __init__(self, hidden: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("val_loss", loss)
        # Metric names are user input too. These two try to climb out of the checkpoint folder.
        self.log("../../escape", loss)
        self.log("..\\..\\escape", loss)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_loader(batches: int = 2) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batches * 4, 3, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4)


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()}


# ---------------------------------------------------------------------- code in checkpoints


class ExecOnLoad:
    """Unpickles as a call of exec that writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('ran')",))


class SystemOnLoad:
    """Unpickles as a call of os.system that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (os.system, (f"touch '{self.marker}'",))


PAYLOADS: dict[str, Callable[[Path], Any]] = {"exec": ExecOnLoad, "os.system": SystemOnLoad}
PLACES = ["plugin state", "state_dict", "whole file"]


def poisoned_checkpoint(folder: Path, payload: str, place: str, legacy: bool) -> tuple[Path, Path]:
    """Write a real checkpoint with a code payload in ``place``, and return its path and the payload's marker."""
    trainer = hookrt.Trainer(max_epochs=1, num_sanity_val_steps=0, **QUIET)
    trainer.fit(Regressor(), make_loader())
    clean = folder / "clean.ckpt"
    trainer.save_checkpoint(clean)
    checkpoint = torch.load(clean, weights_only=True)
    marker = folder / "payload-ran"
    code = PAYLOADS[payload](marker)
    if place == "plugin state":
        checkpoint["plugins"]["EarlyStopping"] = {"wait_count": code}
    elif place == "state_dict":
        checkpoint["state_dict"]["layer.bias"] = code
    else:
        checkpoint = code
    path = folder / "poisoned.ckpt"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    return path, marker


def test_payload_is_live(tmp_path: Path) -> None:
    # An unsafe load of such a file does run its code, so the marker checks below can fail.
    for payload in PAYLOADS:
        path, marker = poisoned_checkpoint(tmp_path, payload, "plugin state", legacy=False)
        torch.load(path, weights_only=False)
        assert marker.exists(), payload
        marker.unlink()


LOADERS: dict[str, Callable[[Path], Any]] = {
    "fit": lambda path: hookrt.Trainer(max_epochs=2, **QUIET).fit(Regressor(), make_loader(), ckpt_path=path),
    "validate": lambda path: hookrt.Trainer(**QUIET).validate(Regressor(), make_loader(), ckpt_path=path),
    "test": lambda path: hookrt.Trainer(**QUIET).test(Regressor(), make_loader(), ckpt_path=path),
    "load_from_checkpoint": lambda path: Regressor.load_from_checkpoint(path),
}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_checkpoint_with_code_is_rejected(payload: str, place: str, legacy: bool, tmp_path: Path) -> None:
    path, marker = poisoned_checkpoint(tmp_path, payload, place, legacy)

    for name, load in LOADERS.items():
        with pytest.raises(CheckpointLoadError, match="loading it would execute code. hookrt never loads such files") \
                as caught:
            load(path)

        assert caught.value.reason == "unsafe", name
        assert not marker.exists(), name


# ---------------------------------------------------------------------- file names


TEMPLATES = [
    "../../escape-{epoch}",
    "{epoch}/../../../escape",
    "/tmp/escape-{step}",
    "..\\..\\escape-{step}",
    "{../../escape:.3f}-{step}",
    "{..\\..\\escape}-{step}",
    "{val_loss:/>12.4f}-{step}",
    "{val_loss:.>12.4f}-{step}",
    "nul\0byte-{step}",
    "..",
]


@pytest.mark.parametrize("template", TEMPLATES)
def test_checkpoint_name_stays_in_folder(template: str, tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "c"
    folder = root / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=folder, filename=template, monitor="val_loss", save_top_k=-1,
                                 save_last=True)
    trainer = hookrt.Trainer(max_epochs=2, num_sanity_val_steps=0, plugins=[checkpoint], default_root_dir=root,
                             logger=False, enable_progress_bar=False, enable_model_summary=False)

    trainer.fit(Regressor(), make_loader(), make_loader())

    written = files_under(tmp_path)
    assert len(written) == 3  # one file per epoch and last.ckpt
    assert {path.parent for path in written} == {folder}
    assert all(path.name.endswith(".ckpt") and ".." not in path.name for path in written)
    assert Path(checkpoint.best_model_path).parent == folder


@pytest.mark.parametrize("logger_class", [TensorBoardLogger, CSVLogger])
@pytest.mark.parametrize("name", ["..", "../../escape", "runs/../../escape", "..\\escape", "/tmp/escape"])
def test_logger_name_cannot_leave_save_dir(logger_class: type, name: str) -> None:
    with pytest.raises(MisconfigurationError, match=r"name must be a folder inside save_dir, without '\.\.' parts"):
        logger_class(save_dir="logs", name=name)


@pytest.mark.parametrize("logger_class", [TensorBoardLogger, CSVLogger])
def test_logger_files_stay_in_run_folder(logger_class: type, tmp_path: Path) -> None:
    save_dir = tmp_path / "a" / "b" / "logs"
    logger = logger_class(save_dir=save_dir, name="runs/nested")
    trainer = hookrt.Trainer(max_epochs=1, num_sanity_val_steps=0, log_every_n_steps=1, logger=logger,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)

    trainer.fit(Regressor(), make_loader(), make_loader())

    written = files_under(tmp_path)
    assert written
    assert {path.parent for path in written} == {save_dir / "runs" / "nested" / "version_0"}


# ---------------------------------------------------------------------- the CLI's imports


MODEL_FILE = '''
import pathlib

import torch
from torch.utils.data import DataLoader, TensorDataset

import hookrt

pathlib.Path(__file__).with_name("model-ran").write_text("ran")


class Net(hookrt.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        x = torch.ones(8, 2)
        return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4)
'''

#: Files next to the model that would run if the CLI put their folder on sys.path or imported the folder.
SIBLINGS = ["json.py", "torch.py", "hookrt.py", "numpy.py", "logging.py", "helper.py", "__init__.py",
            "conftest.py", "sitecustomize.py", "usercustomize.py"]

CLI_RUNNER = '''
import json, sys
from hookrt.cli import main
status = main(sys.argv[1:])
folder = {folder!r}
loaded = sorted(name for name, module in list(sys.modules.items())
                if (getattr(module, "__file__", None) or "").startswith(folder))
print(json.dumps({{"status": status, "loaded": loaded}}))
'''


@pytest.mark.slow
def test_cli_imports_only_named_file(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.py").write_text(MODEL_FILE)
    for name in SIBLINGS:
        marker = outside / f"{name}-ran"
        (outside / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit(99)\n")
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    import_paths = [str(REPOSITORY), *filter(None, [os.environ.get("PYTHONPATH")])]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(import_paths)}
    arguments = ["fit", f"{outside / 'model.py'}:Net", "--max-epochs", "1", "--logger", "false",
                 "--no-enable-checkpointing", "--no-enable-progress-bar", "--no-enable-model-summary",
                 "--log-level", "error"]
    runner = CLI_RUNNER.format(folder=str(outside))

    result = subprocess.run([sys.executable, "-c", runner, *arguments], cwd=workdir, env=environment,
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("fit finished: Net, 1 epoch, 2 steps")
    report = json.loads(lines[-1])
    assert report["status"] == 0
    (loaded,) = report["loaded"]
    assert loaded.startswith("_hookrt_cli_model_")
    assert (outside / "model-ran").exists()
    assert sorted(path.name for path in outside.glob("*-ran")) == ["model-ran"]
    assert sorted(path.name for path in workdir.iterdir()) == []
