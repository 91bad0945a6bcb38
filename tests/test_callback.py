"""Lightning 2.x style callbacks run unchanged on the bus."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt

QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


class Model(hookrt.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return {"loss": F.mse_loss(self.layer(x), y)}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Recorder(hookrt.Callback):
    def __init__(self):
        self.calls: list[tuple] = []
        self.counter = 0

    def on_fit_start(self, trainer, pl_module):
        self.calls.append(("fit_start", trainer.max_epochs, type(pl_module).__name__))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counter += 1
        self.calls.append(("batch_end", batch_idx, trainer.global_step, sorted(outputs), len(batch)))

    def on_validation_epoch_end(self, trainer, pl_module):
        self.calls.append(("val_epoch_end", trainer.sanity_checking, "val_loss" in trainer.callback_metrics))

    def on_train_epoch_end(self, trainer, pl_module):
        self.calls.append(("epoch_end", trainer.current_epoch))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["recorder"] = self.counter

    def state_dict(self):
        return {"counter": self.counter}

    def load_state_dict(self, state_dict):
        self.counter = state_dict["counter"]


def loader(batches: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(batches * 2, 2, generator=generator),
                                    torch.randn(batches * 2, 1, generator=generator)), batch_size=2)


def test_callback_methods_called_with_lightning_arguments():
    recorder = Recorder()
    trainer = hookrt.Trainer(max_epochs=2, num_sanity_val_steps=1, callbacks=[recorder], **QUIET)
    trainer.fit(Model(), loader(2), loader(1))
    assert recorder.calls == [
        ("fit_start", 2, "Model"),
        ("val_epoch_end", True, True),
        ("batch_end", 0, 1, ["loss"], 2),
        ("batch_end", 1, 2, ["loss"], 2),
        ("val_epoch_end", False, True),
        ("epoch_end", 0),
        ("batch_end", 0, 3, ["loss"], 2),
        ("batch_end", 1, 4, ["loss"], 2),
        ("val_epoch_end", False, True),
        ("epoch_end", 1),
    ]


def test_callback_state_round_trips_through_checkpoint(tmp_path):
    recorder = Recorder()
    trainer = hookrt.Trainer(max_epochs=1, num_sanity_val_steps=0, callbacks=[recorder], **QUIET)
    trainer.fit(Model(), loader(3))
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["recorder"] == 3
    assert checkpoint["plugins"]["Recorder"] == {"counter": 3}

    resumed = Recorder()
    trainer = hookrt.Trainer(max_epochs=2, num_sanity_val_steps=0, callbacks=[resumed], **QUIET)
    trainer.fit(Model(), loader(3), ckpt_path=path)
    assert resumed.counter == 6


def test_callback_only_overridden_methods_subscribe():
    class Quiet(hookrt.Callback):
        def on_train_end(self, trainer, pl_module):
            pass

    bus = hookrt.Bus()
    bus.register(Quiet())
    rows = [(row.target, row.handler) for row in bus.describe()]
    assert rows == [("on_train_end", "Quiet.on_train_end")]


def test_idle_handlers_name_callback_methods(tmp_path):
    calls: list[str] = []

    class Quiet(hookrt.Callback):
        def idle_handlers(self, trainer):
            return ("on_train_batch_end",)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            calls.append("batch")

        def on_train_end(self, trainer, pl_module):
            calls.append("end")

    trainer = hookrt.Trainer(max_epochs=1, num_sanity_val_steps=0, callbacks=[Quiet()], default_root_dir=tmp_path,
                             **QUIET)
    trainer.fit(Model(), loader(3))

    assert calls == ["end"]
