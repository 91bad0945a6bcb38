"""An exception in the handler of every event that fit emits, for critical and non-critical plugins.

A critical plugin's exception reaches the caller of fit as the same object,
after on_exception and teardown ran once each. By then the loggers have closed
their files, and the trainer can fit again. A non-critical plugin's failure is
logged once, the plugin is disabled, and training completes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
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
from hookrt.plugins.tensorboard import TensorBoardLogger

MAX_EPOCHS = 2
FLAGS = {
    "max_epochs": MAX_EPOCHS,
    "num_sanity_val_steps": 1,
    "log_every_n_steps": 1,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
#: Every event that a fit resumed from a checkpoint emits: all but on_exception and the test and predict events.
FIT_EVENTS = [
    event for event in Event
    if event is not Event.EXCEPTION and not event.value.startswith(("on_test", "on_predict"))
]


class Boom(Exception):
    """The exception the failing handlers raise."""


class Regressor(hookrt.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_loader(batches: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * 4, 3, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4)


def new_model() -> Regressor:
    torch.manual_seed(0)
    return Regressor()


class Watcher(hookrt.Plugin):
    """Record every on_exception payload and count teardowns."""

    def __init__(self) -> None:
        self.exceptions: list[BaseException] = []
        self.teardowns = 0

    @hookrt.on(Event.EXCEPTION)
    def failed(self, payload: Any) -> None:
        self.exceptions.append(payload.exception)

    @hookrt.on(Event.TEARDOWN)
    def closed(self, payload: Any) -> None:
        self.teardowns += 1


class FailingBase(hookrt.Plugin):
    """A plugin whose handler raises Boom. A critical one raises only on its first call, so a second fit succeeds."""

    def __init__(self) -> None:
        self.calls = 0
        self.armed = True
        self.raised: Boom | None = None

    def fail(self, payload: Any) -> None:
        self.calls += 1
        if self.armed:
            self.armed = not self.critical
            self.raised = Boom(f"handler of {payload.__class__.__name__} failed")
            raise self.raised


def failing_plugin(event: Event, critical: bool) -> FailingBase:
    # A new function per plugin, because @hookrt.on records the event on the function object.
    def fail(self: FailingBase, payload: Any) -> None:
        FailingBase.fail(self, payload)

    fail.__qualname__ = "Failing.fail"
    namespace = {"critical": critical, "fail": hookrt.on(event)(fail)}
    return type("Failing", (FailingBase,), namespace)()


def open_files() -> list[str]:
    """The targets of this process's open file descriptors."""
    # A closed tensorboardX writer closes its multiprocessing.Queue, whose feeder thread then closes the
    # queue's pipe, soon but not at once.
    for thread in threading.enumerate():
        if thread.name == "QueueFeederThread":
            thread.join(timeout=10)
    targets = []
    for entry in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{entry}"))
        except FileNotFoundError:
            continue  # the descriptor that listed the folder, closed by now
    return sorted(targets)


def event_writer_threads() -> list[threading.Thread]:
    """The running worker threads of tensorboardX event files."""
    return [thread for thread in threading.enumerate() if type(thread).__name__ == "_EventLoggerThread"]


@pytest.fixture(scope="module")
def resume_from(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint after the first epoch, so that a fit from it also emits on_load_checkpoint."""
    path = tmp_path_factory.mktemp("first_epoch") / "epoch0.ckpt"
    trainer = hookrt.Trainer(**{**FLAGS, "max_epochs": 1}, logger=False, enable_checkpointing=False)
    trainer.fit(new_model(), make_loader(4, 1), make_loader(2, 2))
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def reference_weights() -> dict[str, torch.Tensor]:
    """The weights after MAX_EPOCHS epochs on a trainer that never failed."""
    model = new_model()
    hookrt.Trainer(**FLAGS, logger=False, enable_checkpointing=False).fit(model, make_loader(4, 1), make_loader(2, 2))
    return model.state_dict()


def build_trainer(root: Path, *plugins: hookrt.Plugin) -> hookrt.Trainer:
    loggers = [CSVLogger(save_dir=root), TensorBoardLogger(save_dir=root)]
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints")
    return hookrt.Trainer(**FLAGS, plugins=[*loggers, checkpoint, *plugins], default_root_dir=root)


def test_fit_emits_every_listed_event(tmp_path: Path, resume_from: Path) -> None:
    seen: set[str] = set()
    trainer = build_trainer(tmp_path)
    for event in Event:
        trainer.bus.subscribe(event, lambda payload, event=event: seen.add(event.value))

    trainer.fit(new_model(), make_loader(4, 1), make_loader(2, 2), ckpt_path=resume_from)

    assert seen == {event.value for event in FIT_EVENTS}


@pytest.mark.parametrize("event", FIT_EVENTS, ids=[event.value for event in FIT_EVENTS])
def test_critical_handler_failure(
    event: Event, tmp_path: Path, resume_from: Path, reference_weights: dict[str, torch.Tensor]
) -> None:
    watcher = Watcher()
    failing = failing_plugin(event, critical=True)
    trainer = build_trainer(tmp_path, watcher, failing)
    files_before = open_files()
    writers_before = event_writer_threads()
    sigint_before = signal.getsignal(signal.SIGINT)

    with pytest.raises(Boom) as caught:
        trainer.fit(new_model(), make_loader(4, 1), make_loader(2, 2), ckpt_path=resume_from)

    assert caught.value is failing.raised
    # on_exception comes before teardown, so a failure in teardown itself is not reported through it.
    assert watcher.exceptions == ([] if event is Event.TEARDOWN else [failing.raised])
    assert watcher.teardowns == 1
    # The TensorBoard writer and its worker thread are closed, and the CSV logger keeps no file open.
    assert open_files() == files_before
    assert event_writer_threads() == writers_before
    assert signal.getsignal(signal.SIGINT) == sigint_before
    # ModelCheckpoint records only the files that were written.
    (checkpoint,) = [plugin for plugin in trainer.plugins if isinstance(plugin, ModelCheckpoint)]
    assert all(os.path.isfile(path) for path in checkpoint.best_k_models)

    model = new_model()
    trainer.fit(model, make_loader(4, 1), make_loader(2, 2))

    assert watcher.teardowns == 2
    assert len(watcher.exceptions) == (0 if event is Event.TEARDOWN else 1)
    assert trainer.current_epoch == MAX_EPOCHS
    for name, tensor in reference_weights.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert open_files() == files_before


@pytest.mark.parametrize("event", FIT_EVENTS, ids=[event.value for event in FIT_EVENTS])
def test_non_critical_handler_failure(
    event: Event, tmp_path: Path, resume_from: Path, caplog: pytest.LogCaptureFixture
) -> None:
    watcher = Watcher()
    failing = failing_plugin(event, critical=False)
    trainer = build_trainer(tmp_path, watcher, failing)
    files_before = open_files()

    with caplog.at_level(logging.ERROR, logger="hookrt"):
        trainer.fit(new_model(), make_loader(4, 1), make_loader(2, 2), ckpt_path=resume_from)

    assert trainer.current_epoch == MAX_EPOCHS
    assert failing.calls == 1
    reports = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(reports) == 1, [record.getMessage() for record in reports]
    assert reports[0].getMessage() == (
        f"Plugin 'Failing' failed in handler Failing.fail on '{event.value}' and is disabled "
        "for the rest of the run; training goes on."
    )
    assert reports[0].exc_info is not None
    assert reports[0].exc_info[1] is failing.raised
    assert watcher.exceptions == []
    assert watcher.teardowns == 1
    assert open_files() == files_before


def test_on_exception_failure_keeps_original_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            raise Boom("training_step failed")

    failing = failing_plugin(Event.EXCEPTION, critical=True)
    watcher = Watcher()
    trainer = build_trainer(tmp_path, failing, watcher)
    files_before = open_files()

    with caplog.at_level(logging.ERROR, logger="hookrt"), pytest.raises(Boom, match="training_step failed") as caught:
        trainer.fit(Broken(), make_loader(4, 1), make_loader(2, 2))

    assert failing.raised is not None
    assert caught.value is not failing.raised
    # The handler registered after the failing one still heard of the failure.
    assert watcher.exceptions == [caught.value]
    assert watcher.teardowns == 1
    messages = [record.getMessage() for record in caplog.records]
    assert "Handler Failing.fail of 'on_exception' failed; the other handlers still run." in messages
    original = f"A handler of on_exception failed while handling {caught.value!r}; the original error is raised."
    assert original in messages
    assert open_files() == files_before


class LateFailure(hookrt.Plugin):
    """A plugin that raises from on_batch_end after ModelCheckpoint (order 1000) has requested its save."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    @hookrt.on(Event.BATCH_END, order=2000)
    def fail(self, payload: Any) -> None:
        raise self.error


class FailingSave(hookrt.Plugin):
    @hookrt.on(Event.SAVE_CHECKPOINT)
    def fail(self, payload: Any) -> None:
        raise OSError("the checkpoint folder went away")


def test_failure_drops_save_requested_in_same_event(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    error = Boom("after the save request")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1)
    trainer = hookrt.Trainer(**FLAGS, plugins=[checkpoint, LateFailure(error), FailingSave()], logger=False)

    with pytest.raises(Boom) as caught:
        trainer.fit(new_model(), make_loader(4, 1))

    # The save that would have failed never ran, so its error cannot replace the handler's.
    assert caught.value is error
    assert not (tmp_path / "checkpoints").exists()
    assert checkpoint.best_model_path == ""
    assert checkpoint.best_k_models == {}
    (message,) = [message for message in caplog.messages if "dropped" in message]
    assert message.startswith("A handler of 'on_batch_end' raised Boom, so ")
    assert message.endswith(" action(s) requested during that event, such as checkpoint saves, are dropped.")


def test_failed_save_is_not_recorded(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=folder)
    failing = failing_plugin(Event.SAVE_CHECKPOINT, critical=True)
    trainer = hookrt.Trainer(**FLAGS, plugins=[checkpoint, failing], logger=False)

    with pytest.raises(Boom):
        trainer.fit(new_model(), make_loader(4, 1))

    assert not folder.exists()
    assert checkpoint.best_model_path == ""
    assert checkpoint.best_k_models == {}

    trainer.fit(new_model(), make_loader(4, 1))

    # Both epochs save again: the failed save at step 4 did not count as done.
    assert checkpoint.best_model_path == str(folder / "epoch=1-step=8.ckpt")
    assert sorted(path.name for path in folder.iterdir()) == ["epoch=1-step=8.ckpt"]


def test_cancel_keeps_save_requested_in_same_event(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1)
    trainer = hookrt.Trainer(**FLAGS, plugins=[checkpoint, LateFailure(hookrt.CancelEpoch())], logger=False)

    trainer.fit(new_model(), make_loader(4, 1))

    # Each epoch ends after its first batch, and that batch's save is written.
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["epoch=1-step=2.ckpt"]
    assert trainer.global_step == MAX_EPOCHS


def test_second_sigint_during_signal_save_interrupts(tmp_path: Path) -> None:
    class Signals(hookrt.Plugin):
        """A plugin that sends SIGTERM at the second batch, then SIGINT while the signal checkpoint is built."""

        @hookrt.on(Event.BATCH_START)
        def terminate(self, payload: Any) -> None:
            if payload.batch_idx == 1:
                os.kill(os.getpid(), signal.SIGTERM)

        @hookrt.on(Event.SAVE_CHECKPOINT)
        def interrupt(self, payload: Any) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between two bytecodes, soon after the kill
                pass

    watcher = Watcher()
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    trainer = hookrt.Trainer(**FLAGS, plugins=[Signals(), watcher], default_root_dir=tmp_path, logger=False,
                             enable_checkpointing=False)

    with pytest.raises(KeyboardInterrupt):
        trainer.fit(new_model(), make_loader(4, 1))

    assert [type(exception) for exception in watcher.exceptions] == [KeyboardInterrupt]
    assert watcher.teardowns == 1
    assert list(tmp_path.iterdir()) == []
    assert {signum: signal.getsignal(signum) for signum in previous} == previous
