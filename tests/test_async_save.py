"""Tests for hookrt._async_save: background checkpoint writes, their snapshot, errors and waiting."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt
from hookrt import _async_save
from hookrt._async_save import AsyncCheckpointWriter, snapshot_to_host, writer_for
from hookrt._checkpoint_io import load_checkpoint, save_atomic
from hookrt._errors import CheckpointError
from hookrt.plugins.checkpoint import ModelCheckpoint


class Regressor(hookrt.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = F.mse_loss(self.net(inputs), targets)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def loader(batches: int = 4) -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batches * 8, 4, generator=generator)
    targets = torch.randn(batches * 8, 1, generator=generator)
    return DataLoader(TensorDataset(inputs, targets), batch_size=8)


def quiet_trainer(root: Path, plugins: list[hookrt.Plugin] | None = None, **flags: Any) -> hookrt.Trainer:
    settings: dict[str, Any] = dict(max_epochs=1, logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    settings.update(flags)
    return hookrt.Trainer(plugins=plugins or [], **settings)


def fitted_trainer(root: Path) -> tuple[hookrt.Trainer, Regressor]:
    torch.manual_seed(0)
    module = Regressor()
    trainer = quiet_trainer(root)
    trainer.fit(module, loader())
    return trainer, module


def assert_same(actual: Any, expected: Any, where: str = "checkpoint") -> None:
    """Assert that two loaded checkpoints contain equal values: tensors by torch.equal, the rest by ==."""
    assert type(actual) is type(expected), f"{where}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (item, other) in enumerate(zip(actual, expected, strict=True)):
            assert_same(item, other, f"{where}[{index}]")
    else:
        assert actual == expected, where


class BlockedWrites:
    """Stands in for save_atomic in the writer thread; each write waits until `release` is called."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.finished: list[str] = []

    def __call__(self, checkpoint: Any, path: Any, *, owners: Any = None) -> None:
        self.released.wait(timeout=30)
        save_atomic(checkpoint, path, owners=owners)
        self.finished.append(str(path))

    def release(self) -> None:
        self.released.set()


# ---------------------------------------------------------------------- snapshot_to_host


def test_snapshot_copies_tensors_and_containers():
    weight = torch.arange(6.0).reshape(2, 3)
    state = OrderedDict(weight=weight, nested={"steps": [1, 2], "pair": (weight, 3)}, tags={"a"})
    snapshot = snapshot_to_host(state)
    weight.add_(100)
    state["nested"]["steps"].append(3)

    assert type(snapshot) is OrderedDict
    assert torch.equal(snapshot["weight"], torch.arange(6.0).reshape(2, 3))
    assert snapshot["nested"]["steps"] == [1, 2]
    assert snapshot["tags"] == {"a"}
    assert snapshot["nested"]["pair"][1] == 3


def test_snapshot_keeps_shared_storage_shared():
    base = torch.arange(8.0)
    view = base[2:6]
    snapshot = snapshot_to_host({"base": base, "view": view, "again": base})

    assert snapshot["again"] is not base
    assert snapshot["view"].untyped_storage().data_ptr() == snapshot["base"].untyped_storage().data_ptr()
    assert snapshot["view"].storage_offset() == 2
    assert torch.equal(snapshot["view"], torch.arange(2.0, 6.0))


@pytest.mark.parametrize("tensor", [
    torch.arange(7, dtype=torch.uint8),  # 7 bytes: copied as bytes
    torch.arange(3, dtype=torch.int32),  # 12 bytes: copied as 4-byte elements
    torch.tensor([True, False, True, True, False, True]),
    torch.arange(5, dtype=torch.float16),
    torch.randn(4, 3, dtype=torch.float64),
    torch.empty(0),
], ids=["uint8-7", "int32-3", "bool-6", "float16-5", "float64-12", "empty"])
def test_snapshot_copies_every_byte(tensor):
    original = tensor.clone()
    snapshot = snapshot_to_host({"value": tensor}, {})["value"]
    tensor.zero_()

    assert snapshot.dtype == original.dtype
    assert torch.equal(snapshot, original)


def test_snapshot_parallel_copy_matches(monkeypatch):
    monkeypatch.setattr(_async_save, "_COPY_THREADS", 2)
    monkeypatch.setattr(_async_save, "_COPY_PIECE_BYTES", 64)  # pieces of 8 int64 elements, so many pieces
    state = {"weight": torch.randn(37, 5), "bytes": torch.arange(99, dtype=torch.uint8), "step": torch.tensor(3)}
    originals = {key: value.clone() for key, value in state.items()}
    snapshot = snapshot_to_host(state)
    for value in state.values():
        value.zero_()

    for key, original in originals.items():
        assert torch.equal(snapshot[key], original), key


def test_snapshot_keeps_parameter_type():
    parameter = nn.Parameter(torch.ones(3))
    copied = snapshot_to_host({"p": parameter})["p"]

    assert type(copied) is nn.Parameter
    assert copied.requires_grad
    assert torch.equal(copied, parameter)


# ---------------------------------------------------------------------- Trainer.save_checkpoint


def test_async_file_equals_synchronous_save(tmp_path):
    trainer, _ = fitted_trainer(tmp_path)
    trainer.save_checkpoint(tmp_path / "sync.ckpt")
    trainer.save_checkpoint(tmp_path / "async.ckpt", asynchronous=True)
    writer_for(trainer).wait()

    expected = load_checkpoint(tmp_path / "sync.ckpt")
    actual = load_checkpoint(tmp_path / "async.ckpt")
    assert expected["optimizer_states"][0]["state"], "Adam should have state after training"
    assert_same(actual, expected)


def test_snapshot_ignores_later_training_steps(tmp_path, monkeypatch):
    trainer, module = fitted_trainer(tmp_path)
    trainer.save_checkpoint(tmp_path / "before.ckpt")
    blocked = BlockedWrites()
    monkeypatch.setattr(_async_save, "save_atomic", blocked)

    trainer.save_checkpoint(tmp_path / "async.ckpt", asynchronous=True)
    assert writer_for(trainer).in_flight
    # More training changes the weights and Adam's moments in place while the write waits.
    optimizer = trainer.optimizers[0]
    for inputs, targets in loader():
        optimizer.zero_grad()
        F.mse_loss(module.net(inputs), targets).backward()
        optimizer.step()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(1.0)
    blocked.release()
    writer_for(trainer).wait()

    assert blocked.finished == [str(tmp_path / "async.ckpt")]
    assert_same(load_checkpoint(tmp_path / "async.ckpt"), load_checkpoint(tmp_path / "before.ckpt"))


def test_next_save_waits_for_write_in_flight(tmp_path, monkeypatch):
    trainer, _ = fitted_trainer(tmp_path)
    blocked = BlockedWrites()
    monkeypatch.setattr(_async_save, "save_atomic", blocked)
    trainer.save_checkpoint(tmp_path / "first.ckpt", asynchronous=True)
    threading.Timer(0.2, blocked.release).start()

    trainer.save_checkpoint(tmp_path / "second.ckpt", asynchronous=True)
    assert blocked.finished[0] == str(tmp_path / "first.ckpt")
    writer_for(trainer).wait()
    assert blocked.finished == [str(tmp_path / "first.ckpt"), str(tmp_path / "second.ckpt")]


def test_failed_write_raises_at_next_save(tmp_path, monkeypatch):
    trainer, _ = fitted_trainer(tmp_path)

    def fail(checkpoint: Any, path: Any, *, owners: Any = None) -> None:
        raise CheckpointError(f"Could not save the checkpoint {str(path)!r}: disk full.")

    monkeypatch.setattr(_async_save, "save_atomic", fail)
    trainer.save_checkpoint(tmp_path / "broken.ckpt", asynchronous=True)
    monkeypatch.setattr(_async_save, "save_atomic", save_atomic)

    with pytest.raises(CheckpointError, match=r"broken\.ckpt.*disk full"):
        trainer.save_checkpoint(tmp_path / "next.ckpt", asynchronous=True)
    # The error is raised once; the next save writes normally.
    trainer.save_checkpoint(tmp_path / "next.ckpt", asynchronous=True)
    writer_for(trainer).wait()
    assert (tmp_path / "next.ckpt").exists()


def test_unloadable_value_raises_before_snapshot(tmp_path):
    trainer, _ = fitted_trainer(tmp_path)

    class AddsPath(hookrt.Plugin):
        @hookrt.on("on_save_checkpoint")
        def add(self, payload: Any) -> None:
            payload.checkpoint["where"] = tmp_path

    trainer.bus.register(AddsPath())
    with pytest.raises(CheckpointError, match=r"checkpoint\['where'\].*store it as a string"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt", asynchronous=True)
    assert not writer_for(trainer).in_flight


# ---------------------------------------------------------------------- during fit


class SaveAtEpochEnd(hookrt.Plugin):
    def __init__(self, path: Path) -> None:
        self.path = path

    @hookrt.on("on_epoch_end")
    def save(self, payload: Any) -> None:
        payload.trainer.save_checkpoint(self.path, asynchronous=True)


def test_fit_waits_for_writer(tmp_path, monkeypatch):
    finished: list[str] = []

    def slow_save(checkpoint: Any, path: Any, *, owners: Any = None) -> None:
        time.sleep(0.3)
        save_atomic(checkpoint, path, owners=owners)
        finished.append(str(path))

    monkeypatch.setattr(_async_save, "save_atomic", slow_save)
    target = tmp_path / "epoch.ckpt"
    trainer = quiet_trainer(tmp_path, [SaveAtEpochEnd(target)])
    trainer.fit(Regressor(), loader())

    assert finished == [str(target)]
    assert load_checkpoint(target)["global_step"] == 4
    assert not writer_for(trainer).in_flight


def test_write_error_raised_at_end_of_fit(tmp_path, monkeypatch):
    def fail(checkpoint: Any, path: Any, *, owners: Any = None) -> None:
        raise CheckpointError(f"Could not save the checkpoint {str(path)!r}: no space left on device.")

    monkeypatch.setattr(_async_save, "save_atomic", fail)
    trainer = quiet_trainer(tmp_path, [SaveAtEpochEnd(tmp_path / "epoch.ckpt")])

    with pytest.raises(CheckpointError, match=r"epoch\.ckpt.*no space left"):
        trainer.fit(Regressor(), loader())


def test_model_checkpoint_async_matches_sync(tmp_path):
    results = {}
    for name, async_save in (("sync", False), ("async", True)):
        torch.manual_seed(0)
        plugin = ModelCheckpoint(dirpath=tmp_path / name, save_top_k=2, async_save=async_save)
        trainer = quiet_trainer(tmp_path, [plugin], max_epochs=3)
        trainer.fit(Regressor(), loader())
        results[name] = plugin

    sync, asynchronous = results["sync"], results["async"]
    assert sorted(Path(path).name for path in asynchronous.best_k_models) == \
        sorted(Path(path).name for path in sync.best_k_models)
    assert sorted(entry.name for entry in (tmp_path / "async").iterdir()) == \
        sorted(entry.name for entry in (tmp_path / "sync").iterdir())
    expected = load_checkpoint(sync.best_model_path)
    actual = load_checkpoint(asynchronous.best_model_path)
    assert_same(actual["state_dict"], expected["state_dict"])
    assert_same(actual["optimizer_states"], expected["optimizer_states"])


def test_after_write_runs_once_write_succeeded(tmp_path, monkeypatch):
    writer = AsyncCheckpointWriter()
    blocked = BlockedWrites()
    monkeypatch.setattr(_async_save, "save_atomic", blocked)
    ran: list[bool] = []
    writer.submit({"value": torch.ones(2)}, str(tmp_path / "a.ckpt"))
    writer.after_write(lambda: ran.append((tmp_path / "a.ckpt").exists()))
    assert ran == []

    blocked.release()
    writer.wait()
    assert ran == [True]
    writer.after_write(lambda: ran.append(False))
    assert ran == [True, False]


def test_writer_reuses_host_buffers(tmp_path):
    writer = AsyncCheckpointWriter()
    writer.submit({"weight": torch.ones(1000)}, str(tmp_path / "a.ckpt"))
    writer.wait()
    (pooled,) = writer._pool[(False, 4000)]

    writer.submit({"weight": torch.full((1000,), 2.0)}, str(tmp_path / "b.ckpt"))
    assert writer._lent[(False, 4000)] == [pooled]
    writer.release_buffers()
    assert writer._pool == {}
    assert torch.equal(load_checkpoint(tmp_path / "b.ckpt")["weight"], torch.full((1000,), 2.0))


# ---------------------------------------------------------------------- copy overlapping the next batch


class SlowDeferredCopy:
    """Stands in for _copy_host_storages: copies made on the writer thread start only after `delay` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.copy = _async_save._copy_host_storages
        self.deferred_calls = 0

    def __call__(self, copies: Any) -> None:
        if copies and threading.current_thread() is not threading.main_thread():
            self.deferred_calls += 1
            time.sleep(self.delay)
        self.copy(copies)


class SaveAtBatch(hookrt.Plugin):
    """Saves asynchronously after one batch and keeps a clone of the state at that moment."""

    def __init__(self, path: Path, batch_idx: int) -> None:
        self.path = path
        self.batch_idx = batch_idx
        self.expected: dict[str, Any] = {}

    @hookrt.on("on_batch_end")
    def save(self, payload: Any) -> None:
        if payload.batch_idx != self.batch_idx:
            return
        trainer = payload.trainer
        self.expected = {
            "state_dict": OrderedDict((name, value.clone())
                                      for name, value in trainer.lightning_module.state_dict().items()),
            "optimizer": {index: {name: value.clone() for name, value in state.items()}
                          for index, state in trainer.optimizers[0].state_dict()["state"].items()},
        }
        trainer.save_checkpoint(self.path, asynchronous=True)


def test_deferred_copy_holds_next_optimizer_step(tmp_path, monkeypatch):
    # The copy of weights and Adam state starts only after the next batch's forward and backward have run,
    # so the file is right only if that batch's optimizer step waited for it.
    slow = SlowDeferredCopy(delay=0.3)
    monkeypatch.setattr(_async_save, "_copy_host_storages", slow)
    torch.manual_seed(0)
    saver = SaveAtBatch(tmp_path / "async.ckpt", batch_idx=1)

    quiet_trainer(tmp_path, [saver]).fit(Regressor(), loader())

    saved = load_checkpoint(tmp_path / "async.ckpt")
    assert slow.deferred_calls == 1
    assert saved["global_step"] == 2
    assert_same(saved["state_dict"], saver.expected["state_dict"])
    for index, state in saver.expected["optimizer"].items():
        assert_same(saved["optimizer_states"][0]["state"][index], state)


class ChangeWeightsBeforeStep(hookrt.Plugin):
    """Changes the weights in place at the start of the batch after the save, outside an optimizer step."""

    @hookrt.on("on_batch_start")
    def change(self, payload: Any) -> None:
        if payload.batch_idx == 2:
            with torch.no_grad():
                next(payload.module.parameters()).add_(1.0)


def test_in_place_change_before_copy_drops_file(tmp_path, monkeypatch):
    monkeypatch.setattr(_async_save, "_copy_host_storages", SlowDeferredCopy(delay=0.3))
    saver = SaveAtBatch(tmp_path / "async.ckpt", batch_idx=1)
    trainer = quiet_trainer(tmp_path, [saver, ChangeWeightsBeforeStep()])

    with pytest.raises(CheckpointError, match=r"The asynchronous checkpoint '.*async\.ckpt' was not written: a "
                                              r"parameter or an optimizer state tensor was changed in place after "
                                              r"save_checkpoint\(asynchronous=True\) returned"):
        trainer.fit(Regressor(), loader())

    assert not (tmp_path / "async.ckpt").exists()


def test_save_outside_fit_copies_before_returning(tmp_path, monkeypatch):
    trainer, _ = fitted_trainer(tmp_path)
    slow = SlowDeferredCopy(delay=0.0)
    monkeypatch.setattr(_async_save, "_copy_host_storages", slow)

    trainer.save_checkpoint(tmp_path / "after.ckpt", asynchronous=True)
    writer_for(trainer).wait()

    # Outside fit no optimizer step is sure to come, so nothing is left for the writer thread to copy.
    assert slow.deferred_calls == 0
    assert (tmp_path / "after.ckpt").exists()


class SwapWeightsAtTrainEnd(hookrt.Plugin):
    """Changes the weights in place at the end of training, as a weight-averaging plugin does."""

    @hookrt.on("on_train_end")
    def swap(self, payload: Any) -> None:
        with torch.no_grad():
            for parameter in payload.module.parameters():
                parameter.mul_(0.5)


def test_events_after_the_batch_wait_for_copy(tmp_path, monkeypatch):
    # The save is after the last batch, so no optimizer step comes before on_train_end changes the weights.
    monkeypatch.setattr(_async_save, "_copy_host_storages", SlowDeferredCopy(delay=0.3))
    torch.manual_seed(0)
    saver = SaveAtBatch(tmp_path / "async.ckpt", batch_idx=3)

    quiet_trainer(tmp_path, [saver, SwapWeightsAtTrainEnd()]).fit(Regressor(), loader())

    assert_same(load_checkpoint(tmp_path / "async.ckpt")["state_dict"], saver.expected["state_dict"])


class WithLargeParameter(Regressor):
    """The regressor with a large parameter that the loss does not use, so only code outside steps changes it."""

    def __init__(self) -> None:
        super().__init__()
        self.large = nn.Parameter(torch.randn(8_000_000))


class SlowInPlaceChange(hookrt.Plugin):
    """Changes the large parameter in place with an operation that runs for a while, in the batch after the save."""

    @hookrt.on("on_batch_start")
    def change(self, payload: Any) -> None:
        if payload.batch_idx == 2:
            with torch.no_grad():
                for _ in range(3):
                    payload.module.large.i0_()


def test_in_place_change_during_copy_drops_file(tmp_path):
    # torch moves the version counter only when the operation has finished, so the check must not run on the
    # writer thread, where it could pass while the copy reads half-changed values.
    saver = SaveAtBatch(tmp_path / "async.ckpt", batch_idx=1)
    trainer = quiet_trainer(tmp_path, [saver, SlowInPlaceChange()])

    with pytest.raises(CheckpointError, match=r"was not written: a parameter or an optimizer state tensor was "
                                              r"changed in place"):
        trainer.fit(WithLargeParameter(), loader())

    assert not (tmp_path / "async.ckpt").exists()


class DecayInOptimizerStep(Regressor):
    """Decays the weights by hand in an optimizer_step override, before the optimizer's own step."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_idx, optimizer_closure):
        optimizer_closure()
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.mul_(0.999)
        optimizer.step()


def test_optimizer_step_override_waits_for_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(_async_save, "_copy_host_storages", SlowDeferredCopy(delay=0.2))
    torch.manual_seed(0)
    saver = SaveAtBatch(tmp_path / "async.ckpt", batch_idx=1)

    quiet_trainer(tmp_path, [saver]).fit(DecayInOptimizerStep(), loader())

    assert_same(load_checkpoint(tmp_path / "async.ckpt")["state_dict"], saver.expected["state_dict"])
