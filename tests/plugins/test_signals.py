"""SignalHandler: handlers installed only during fit, signal checkpoints, clean stops and exact resume.

The tests send real signals to the pytest process. Every sender first checks
that a SignalHandler's handler is installed, so a failure cannot kill the test
run with SIGTERM or interrupt it with SIGINT.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import hookrt
from hookrt import Event
from hookrt.plugins import signals as signals_module
from hookrt.plugins.signals import SignalHandler

QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
WATCHED = (signal.SIGTERM, signal.SIGINT)


class NoisyDataset(Dataset):
    """Fixed points whose inputs get fresh torch.randn noise on every read."""

    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, 4, generator=generator)
        self.y = self.x.sum(dim=1, keepdim=True)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index] + 0.1 * torch.randn(4), self.y[index]


class DropoutNet(hookrt.LightningModule):
    def __init__(self, fail_at_batch: int | None = None) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1)
        )
        self.fail_at_batch = fail_at_batch

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at_batch:
            raise RuntimeError(f"planned failure at batch {batch_idx}")
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=8, eta_min=1e-4)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def installed_handler(signum: int) -> SignalHandler | None:
    """Return the SignalHandler whose handler is installed for ``signum``, or None."""
    owner = getattr(signal.getsignal(signum), "__self__", None)
    return owner if isinstance(owner, SignalHandler) else None


def send(signum: int) -> None:
    """Send ``signum`` to this process, after checking that a SignalHandler will receive it."""
    assert installed_handler(signum) is not None, f"no SignalHandler is installed for {signum!r}; not sending it"
    os.kill(os.getpid(), signum)


class Sender:
    """Send signals to this process from one event, at chosen (epoch, batch_idx) positions.

    Events without a batch index use -1. `make_trainer` subscribes it before the SignalHandler's handlers.
    """

    def __init__(self, event: str, at: dict[tuple[int, int], tuple[int, ...]], sanity: bool = False) -> None:
        self.event = event
        self.at = at
        self.sanity = sanity

    def fire(self, payload: Any) -> None:
        if getattr(payload, "sanity_checking", False) != self.sanity:
            return
        position = (payload.trainer.current_epoch, getattr(payload, "batch_idx", -1))
        for signum in self.at.pop(position, ()):
            send(signum)


class Recorder(hookrt.Plugin):
    """Record the installed handlers and the batches that ran."""

    def __init__(self) -> None:
        self.handlers: dict[int, Any] = {}
        self.batches: list[tuple[int, int]] = []

    @hookrt.on(Event.BATCH_END)
    def record(self, payload):
        self.handlers = {signum: signal.getsignal(signum) for signum in WATCHED}
        self.batches.append((payload.trainer.current_epoch, payload.batch_idx))


def make_trainer(root, *plugins: hookrt.Plugin | Sender, **flags: Any) -> hookrt.Trainer:
    options = {"max_epochs": 2, "default_root_dir": str(root), **QUIET, **flags}
    trainer = hookrt.Trainer(plugins=[p for p in plugins if not isinstance(p, Sender)], **options)
    for index, sender in enumerate(p for p in plugins if isinstance(p, Sender)):
        trainer.bus.subscribe(sender.event, sender.fire, name=f"Sender{index}")
    return trainer


def fit(trainer: hookrt.Trainer, ckpt_path: Any = None, fail_at_batch: int | None = None) -> DropoutNet:
    """Seed, build the module and the loaders (10 training batches, 2 validation batches) and fit."""
    torch.manual_seed(0)
    model = DropoutNet(fail_at_batch)
    train = DataLoader(NoisyDataset(40, seed=1), batch_size=4, shuffle=True)
    val = DataLoader(NoisyDataset(8, seed=2), batch_size=4)
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return model


def final_state(trainer: hookrt.Trainer, model: DropoutNet) -> dict[str, Any]:
    return {
        "parameters": model.state_dict(),
        "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "callback_metrics": trainer.callback_metrics,
        "global_step": trainer.global_step,
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


@pytest.fixture
def reference(tmp_path) -> Callable[..., dict[str, Any]]:
    """Return a function that runs an uninterrupted fit with the given flags and returns its final state."""

    def run(**flags: Any) -> dict[str, Any]:
        trainer = make_trainer(tmp_path / "reference", SignalHandler(), **flags)
        model = fit(trainer)
        return final_state(trainer, model)

    return run


# ---------------------------------------------------------------------- installing and restoring


def test_nothing_installed_at_import_or_construction():
    before = {signum: signal.getsignal(signum) for signum in WATCHED}
    # Execute the module's code afresh under another name, so its import-time code runs again.
    spec = importlib.util.spec_from_file_location("fresh_signals_module", signals_module.__file__)
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)

    fresh.SignalHandler()
    SignalHandler(signals=(signal.SIGTERM,), filename="other.ckpt")

    assert {signum: signal.getsignal(signum) for signum in WATCHED} == before


def test_handlers_installed_only_during_fit(tmp_path):
    before = {signum: signal.getsignal(signum) for signum in WATCHED}
    handler = SignalHandler()
    recorder = Recorder()

    fit(make_trainer(tmp_path, handler, recorder, max_epochs=1))

    for signum in WATCHED:
        assert getattr(recorder.handlers[signum], "__self__", None) is handler
        assert signal.getsignal(signum) == before[signum]


def test_handlers_restored_when_fit_raises(tmp_path):
    before = {signum: signal.getsignal(signum) for signum in WATCHED}

    with pytest.raises(RuntimeError, match="planned failure at batch 3"):
        fit(make_trainer(tmp_path, SignalHandler()), fail_at_batch=3)

    assert {signum: signal.getsignal(signum) for signum in WATCHED} == before


def test_previous_python_handler_restored(tmp_path):
    calls: list[int] = []

    def previous(signum, frame):
        calls.append(signum)

    original = signal.signal(signal.SIGTERM, previous)
    try:
        fit(make_trainer(tmp_path, SignalHandler(), max_epochs=1))
        restored = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, original)

    assert restored is previous
    assert calls == []


def test_only_listed_signals_installed(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    recorder = Recorder()

    fit(make_trainer(tmp_path, SignalHandler(signals=(signal.SIGTERM,)), recorder, max_epochs=1))

    assert recorder.handlers[signal.SIGINT] == before
    assert isinstance(getattr(recorder.handlers[signal.SIGTERM], "__self__", None), SignalHandler)


def test_validate_installs_nothing(tmp_path):
    before = {signum: signal.getsignal(signum) for signum in WATCHED}
    seen: list[dict[int, Any]] = []
    trainer = make_trainer(tmp_path, SignalHandler())
    trainer.bus.subscribe(
        Event.VALIDATION_BATCH_END, lambda payload: seen.append({s: signal.getsignal(s) for s in WATCHED})
    )
    torch.manual_seed(0)

    trainer.validate(DropoutNet(), DataLoader(NoisyDataset(8, seed=2), batch_size=4))

    assert seen == [before, before]


def test_no_handlers_from_non_main_thread(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger=signals_module.__name__)
    before = {signum: signal.getsignal(signum) for signum in WATCHED}
    recorder = Recorder()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fit(make_trainer(tmp_path, SignalHandler(), recorder, max_epochs=1))
        except BaseException as exc:  # reported by the assert below
            errors.append(exc)

    thread = threading.Thread(target=run, name="fit-thread")
    thread.start()
    thread.join(timeout=60)

    assert not thread.is_alive()
    assert errors == []
    assert recorder.handlers == before
    assert "SignalHandler installs no signal handlers: fit runs in thread 'fit-thread'" in caplog.text


# ---------------------------------------------------------------------- acting on a signal


def test_sigterm_writes_checkpoint_and_stops(tmp_path, caplog):
    handler = SignalHandler()
    recorder = Recorder()
    trainer = make_trainer(tmp_path, handler, Sender(Event.BATCH_END, {(0, 3): (signal.SIGTERM,)}), recorder)

    fit(trainer)

    path = os.path.join(str(tmp_path), "signal.ckpt")
    assert handler.received == signal.SIGTERM
    assert handler.checkpoint_path == path
    assert trainer.should_stop
    assert recorder.batches == [(0, 0), (0, 1), (0, 2), (0, 3)]
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["loops"]["progress"]["current_epoch"] == 0
    assert checkpoint["loops"]["progress"]["batches_done"] == 4
    assert checkpoint["global_step"] == 4
    message = (
        f"Received SIGTERM: wrote a checkpoint of epoch 0 after batch 3 (global step 4) to {path} and stopping "
        f"training. To resume, call trainer.fit(model, ..., ckpt_path={path!r})."
    )
    assert [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING] == [message]


def test_checkpoint_goes_to_dirpath_and_filename(tmp_path):
    handler = SignalHandler(dirpath=tmp_path / "signals", filename="stop.ckpt")
    trainer = make_trainer(tmp_path / "root", handler, Sender(Event.BATCH_END, {(0, 1): (signal.SIGINT,)}))

    fit(trainer)

    assert handler.received == signal.SIGINT
    assert handler.checkpoint_path == os.path.join(str(tmp_path / "signals"), "stop.ckpt")
    assert os.path.isfile(handler.checkpoint_path)
    assert not (tmp_path / "root" / "signal.ckpt").exists()


def test_second_sigint_raises_keyboard_interrupt(tmp_path, caplog):
    before = {signum: signal.getsignal(signum) for signum in WATCHED}
    handler = SignalHandler()
    sender = Sender(Event.BATCH_END, {(0, 2): (signal.SIGINT, signal.SIGINT)})

    with pytest.raises(KeyboardInterrupt):
        fit(make_trainer(tmp_path, handler, sender))

    assert handler.received == signal.SIGINT
    assert handler.checkpoint_path is None
    assert not (tmp_path / "signal.ckpt").exists()
    assert {signum: signal.getsignal(signum) for signum in WATCHED} == before
    assert "no signal checkpoint was written" not in caplog.text


def test_sigint_after_signal_checkpoint_raises_keyboard_interrupt(tmp_path):
    handler = SignalHandler()
    trainer = make_trainer(
        tmp_path, handler,
        Sender(Event.BATCH_END, {(0, 1): (signal.SIGTERM,)}),
        Sender(Event.EPOCH_END, {(0, -1): (signal.SIGINT,)}),
    )

    with pytest.raises(KeyboardInterrupt):
        fit(trainer)

    assert handler.received == signal.SIGTERM
    assert handler.checkpoint_path == os.path.join(str(tmp_path), "signal.ckpt")


def test_repeated_sigterm_writes_one_checkpoint(tmp_path, caplog):
    handler = SignalHandler()
    trainer = make_trainer(tmp_path, handler, Sender(Event.BATCH_END, {(0, 1): (signal.SIGTERM, signal.SIGTERM)}))

    fit(trainer)

    assert handler.received == signal.SIGTERM
    assert trainer.global_step == 2
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1


def test_signal_after_last_safe_point_writes_nothing(tmp_path, caplog):
    handler = SignalHandler()
    trainer = make_trainer(tmp_path, handler, Sender(Event.TRAIN_END, {(2, -1): (signal.SIGTERM,)}))

    fit(trainer)

    assert handler.received == signal.SIGTERM
    assert handler.checkpoint_path is None
    assert not (tmp_path / "signal.ckpt").exists()
    assert trainer.global_step == 20
    assert (
        "Received SIGTERM, but fit ended before the next point where a checkpoint can be taken (the end of a "
        "training batch or of a validation run), so no signal checkpoint was written." in caplog.text
    )


def test_signal_stop_ignores_min_epochs(tmp_path):
    handler = SignalHandler()
    trainer = make_trainer(
        tmp_path, handler, Sender(Event.BATCH_END, {(0, 1): (signal.SIGTERM,)}), min_epochs=2, max_epochs=2
    )

    fit(trainer)

    path = os.path.join(str(tmp_path), "signal.ckpt")
    assert trainer.global_step == 2
    assert torch.load(path, weights_only=True)["global_step"] == 2
    assert trainer.stop_reason == "received SIGTERM"


def test_state_reset_by_next_fit(tmp_path):
    handler = SignalHandler()
    fit(make_trainer(tmp_path, handler, Sender(Event.BATCH_END, {(0, 1): (signal.SIGTERM,)})))
    assert handler.received == signal.SIGTERM

    fit(make_trainer(tmp_path, handler, max_epochs=1))

    assert handler.received is None
    assert handler.checkpoint_path is None


# ---------------------------------------------------------------------- exact resume from a signal checkpoint


def test_mid_window_checkpoint_resumes_exactly(tmp_path, reference):
    flags = {"max_epochs": 2, "accumulate_grad_batches": 3}
    expected = reference(**flags)
    # Windows are [0, 1, 2], [3, 4, 5], [6, 7, 8] and [9], so the signal after batch 4 leaves [3, 4] open.
    handler = SignalHandler()
    fit(make_trainer(tmp_path, handler, Sender(Event.BATCH_END, {(1, 4): (signal.SIGTERM,)}), **flags))
    assert handler.checkpoint_path is not None
    checkpoint = torch.load(handler.checkpoint_path, weights_only=True)
    assert checkpoint["partial_gradients"]["contributions"] == [2]

    resumed = make_trainer(tmp_path / "resumed", SignalHandler(), **flags)
    model = fit(resumed, ckpt_path=handler.checkpoint_path)

    assert_identical(final_state(resumed, model), expected)


def test_signal_during_validation_acts_at_its_end(tmp_path, reference):
    flags = {"max_epochs": 2, "accumulate_grad_batches": 3, "val_check_interval": 0.5}
    expected = reference(**flags)
    handler = SignalHandler()
    recorder = Recorder()
    # Sent after the first batch of the validation that runs after 5 training batches of epoch 1.
    sender = Sender(Event.VALIDATION_BATCH_END, {(1, 0): (signal.SIGTERM,)})
    fit(make_trainer(tmp_path, handler, sender, recorder, **flags))

    assert handler.checkpoint_path is not None
    progress = torch.load(handler.checkpoint_path, weights_only=True)["loops"]["progress"]
    assert (progress["current_epoch"], progress["batches_done"], progress["val_done_at"]) == (1, 5, 5)
    assert recorder.batches[-1] == (1, 4)

    resumed = make_trainer(tmp_path / "resumed", SignalHandler(), **flags)
    model = fit(resumed, ckpt_path=handler.checkpoint_path)

    assert_identical(final_state(resumed, model), expected)


def test_signal_during_sanity_check_acts_after_first_batch(tmp_path, reference):
    expected = reference()
    handler = SignalHandler()
    recorder = Recorder()
    sender = Sender(Event.VALIDATION_BATCH_END, {(0, 0): (signal.SIGTERM,)}, sanity=True)
    fit(make_trainer(tmp_path, handler, sender, recorder))

    assert recorder.batches == [(0, 0)]
    assert handler.checkpoint_path is not None
    progress = torch.load(handler.checkpoint_path, weights_only=True)["loops"]["progress"]
    assert (progress["current_epoch"], progress["batches_done"]) == (0, 1)

    resumed = make_trainer(tmp_path / "resumed", SignalHandler())
    model = fit(resumed, ckpt_path=handler.checkpoint_path)

    assert_identical(final_state(resumed, model), expected)


# ---------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"signals": (signal.SIGTERM, signal.SIGKILL)}, "contains SIGKILL, which a process cannot catch"),
        ({"signals": (10_000,)}, "contains 10000, which is not a signal number on this platform"),
        ({"signals": ("SIGTERM",)}, "contains 'SIGTERM', which is not a signal number"),
        ({"signals": signal.SIGTERM}, "signals must be a sequence of signal numbers"),
        ({"signals": None}, "signals must be a sequence of signal numbers"),
        ({"filename": "ckpts/signal.ckpt"}, "filename must be a non-empty file name without a folder"),
        ({"filename": ""}, "filename must be a non-empty file name without a folder"),
    ],
)
def test_invalid_arguments_rejected(arguments, message):
    with pytest.raises(hookrt.MisconfigurationError, match=message):
        SignalHandler(**arguments)


def test_duplicate_signals_installed_once():
    handler = SignalHandler(signals=(signal.SIGTERM, signal.SIGTERM, signal.SIGINT))

    assert handler.signals == (signal.SIGTERM, signal.SIGINT)
