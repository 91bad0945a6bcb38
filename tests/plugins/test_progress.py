from __future__ import annotations

import io
import re

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import hookrt
from hookrt.plugins import progress as progress_module
from hookrt.plugins.progress import ProgressBar, format_metrics

LINE = re.compile(r"Epoch (\d+)/2: (\d+)/4 batches, loss=([0-9.e-]+), val_loss=([0-9.e-]+), \d+\.\ds")


class TerminalStream(io.StringIO):
    """A text stream that claims to be a terminal, so the bar takes its tqdm path."""

    def isatty(self) -> bool:
        return True


def test_non_interactive_writes_one_line_per_epoch(make_trainer, run_fit):
    trainer = make_trainer(max_epochs=2, num_training_batches=4)
    stream = io.StringIO()
    bar = ProgressBar(file=stream)
    trainer.register(bar)

    run_fit(trainer)

    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    matches = [LINE.fullmatch(line) for line in lines]
    assert all(matches), lines
    assert [match.group(1) for match in matches] == ["1", "2"]
    assert [match.group(2) for match in matches] == ["4", "4"]
    losses = [float(match.group(3)) for match in matches]
    assert losses == [pytest.approx(1 / 5, rel=1e-3), pytest.approx(1 / 9, rel=1e-3)]
    assert not bar.interactive



class StepModule(hookrt.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_stopped_epoch_line_counts_batches_run(tmp_path):
    stream = io.StringIO()
    bar = ProgressBar(file=stream)
    trainer = hookrt.Trainer(max_epochs=2, max_steps=3, plugins=[bar], logger=False, enable_checkpointing=False,
                             enable_model_summary=False, default_root_dir=tmp_path)
    loader = DataLoader(TensorDataset(torch.randn(10, 2)), batch_size=2)

    trainer.fit(StepModule(), loader)

    assert stream.getvalue().startswith("Epoch 1/2: 3/5 batches, loss=")
    assert len(stream.getvalue().splitlines()) == 1


class CancelLast(hookrt.Plugin):
    @hookrt.on("on_batch_start")
    def cancel(self, payload) -> None:
        if payload.batch_idx >= 3:
            raise hookrt.CancelBatch()


def test_line_counts_batches_up_to_last_finished(tmp_path):
    stream = io.StringIO()
    trainer = hookrt.Trainer(max_epochs=1, plugins=[ProgressBar(file=stream), CancelLast()], logger=False,
                             enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)

    trainer.fit(StepModule(), DataLoader(TensorDataset(torch.randn(10, 2)), batch_size=2))

    assert stream.getvalue().startswith("Epoch 1/1: 3/5 batches, ")


class FakeClock:
    """Stands in for the time module in the progress bar: monotonic() starts at 10000 s and adds 1 s per call."""

    def __init__(self) -> None:
        self.now = 10_000.0

    def monotonic(self) -> float:
        self.now += 1.0
        return self.now


def test_resumed_epoch_line_counts_time_from_resume(tmp_path, monkeypatch):
    # A fit resumed in the middle of an epoch gets no on_epoch_start, so the clock starts at on_train_start.
    loader = DataLoader(TensorDataset(torch.randn(10, 2)), batch_size=2)
    flags = dict(logger=False, enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    first = hookrt.Trainer(max_epochs=1, max_steps=2, enable_progress_bar=False, **flags)
    module = StepModule()
    first.fit(module, loader)
    first.save_checkpoint(tmp_path / "mid.ckpt")
    monkeypatch.setattr(progress_module, "time", FakeClock())
    stream = io.StringIO()

    hookrt.Trainer(max_epochs=1, plugins=[ProgressBar(file=stream)], **flags).fit(
        StepModule(), loader, ckpt_path=tmp_path / "mid.ckpt")

    line = stream.getvalue()
    assert line.startswith("Epoch 1/1: 5/5 batches, ")
    assert float(line.rstrip().rsplit(", ", 1)[1].rstrip("s")) < 100

def test_line_shows_every_progress_bar_metric(make_trainer, run_fit):
    trainer = make_trainer(max_epochs=1)
    trainer.progress_bar_metrics["acc"] = 0.875
    stream = io.StringIO()
    trainer.register(ProgressBar(file=stream))

    run_fit(trainer)

    assert "acc=0.875" in stream.getvalue()
    assert "loss=0.2" in stream.getvalue()


def test_unknown_batch_count_shows_batches_run(make_trainer, run_fit):
    trainer = make_trainer(max_epochs=1, num_training_batches=float("inf"))
    stream = io.StringIO()
    trainer.register(ProgressBar(file=stream))

    run_fit(trainer, batches=3)

    assert stream.getvalue().startswith("Epoch 1/1: 3 batches, ")


def test_cancelled_last_batches_count_batches_reached(make_trainer):
    trainer = make_trainer(max_epochs=1, num_training_batches=4)
    stream = io.StringIO()
    trainer.register(ProgressBar(file=stream))
    bus = trainer.bus
    bus.emit("setup", stage="fit")
    bus.emit("on_epoch_start", epoch=0)
    for batch_idx in range(2):
        bus.emit("on_batch_start", batch=None, batch_idx=batch_idx)
        bus.emit("on_batch_end", batch=None, batch_idx=batch_idx, outputs=None)
    bus.emit("on_epoch_end", epoch=0)

    assert stream.getvalue().startswith("Epoch 1/1: 2/4 batches, ")


def test_refresh_rate_zero_writes_nothing(make_trainer, run_fit):
    trainer = make_trainer(max_epochs=2)
    stream = TerminalStream()
    bar = ProgressBar(refresh_rate=0, file=stream)
    trainer.register(bar)

    run_fit(trainer)

    assert stream.getvalue() == ""
    assert not bar.enabled


def test_non_zero_rank_writes_nothing(make_trainer, run_fit):
    trainer = make_trainer(max_epochs=1, is_global_zero=False)
    stream = io.StringIO()
    trainer.register(ProgressBar(file=stream))

    run_fit(trainer)

    assert stream.getvalue() == ""


def test_interactive_draws_tqdm_bars(make_trainer, run_fit):
    trainer = make_trainer(max_epochs=2, num_training_batches=4)
    stream = TerminalStream()
    bar = ProgressBar(file=stream)
    trainer.register(bar)

    run_fit(trainer)

    output = stream.getvalue()
    assert bar.interactive
    assert "Epoch 1" in output
    assert "Epoch 2" in output
    assert "Sanity checking" in output
    assert "Validation" in output
    assert "4/4" in output
    assert "val_loss=0.2222" in output
    assert bar._train_bar is None
    assert bar._eval_bar is None


def test_interactive_bars_closed_on_exception(make_trainer, run_fit):
    trainer = make_trainer(max_epochs=1)
    bar = ProgressBar(file=TerminalStream())
    trainer.register(bar)

    with pytest.raises(RuntimeError, match="fake failure"):
        run_fit(trainer, fail_at=(0, 1))

    assert bar._train_bar is None


def test_format_metrics():
    assert format_metrics({"loss": 0.123456, "name": "abc", "steps": 12}) == "loss=0.1235, name=abc, steps=12"


@pytest.mark.parametrize("rate", [-1, 1.5, True])
def test_invalid_refresh_rate_raises(rate):
    with pytest.raises(hookrt.MisconfigurationError, match=r"refresh_rate must be an int >= 0"):
        ProgressBar(refresh_rate=rate)
