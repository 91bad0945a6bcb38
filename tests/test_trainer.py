"""Trainer entry points, module API, metrics, optimizer forms and the errors users see."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt
from hookrt import Event, MisconfigurationError

QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


def make_loader(batches: int = 3, batch_size: int = 4, features: int = 3) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batches * batch_size, features, generator=generator)
    y = torch.randn(batches * batch_size, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class Regressor(hookrt.LightningModule):
    def __init__(self, lr: float = 0.1, hidden: int = 3):
        super().__init__()
        self.layer = torch.nn.Linear(hidden, 1)
        self.lr = lr

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit(model, *, train=None, val=None, **flags):
    options = {"max_epochs": 1, "num_sanity_val_steps": 0, **QUIET, **flags}
    trainer = hookrt.Trainer(**options)
    trainer.fit(model, train if train is not None else make_loader(), val)
    return trainer


# ---------------------------------------------------------------- errors a module can cause


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (None, r"training_step returned None; it must return the loss tensor or a dict with a 'loss' tensor"),
        ({"out": 1}, r"training_step returned a dict with keys \['out'\]"),
        (3.0, r"training_step returned a float"),
    ],
)
def test_training_step_unusable_return(returned, message):
    class Broken(Regressor):
        def training_step(self, batch, batch_idx):
            return returned

    with pytest.raises(MisconfigurationError, match=message):
        fit(Broken())


def test_training_step_loss_without_grad():
    class Detached(Regressor):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx).detach()

    with pytest.raises(MisconfigurationError, match=r"a loss that does not require grad"):
        fit(Detached())


def test_training_step_vector_loss():
    class Vector(Regressor):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return (self(x) - y).pow(2)

    with pytest.raises(MisconfigurationError, match=r"loss of shape \(4, 1\); the loss must be a single value"):
        fit(Vector())


def test_missing_configure_optimizers():
    class NoOptimizer(hookrt.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

    with pytest.raises(MisconfigurationError, match=r"NoOptimizer does not override configure_optimizers\(\)"):
        fit(NoOptimizer())


def test_configure_optimizers_unusable_return():
    class Bad(Regressor):
        def configure_optimizers(self):
            return "adam"

    with pytest.raises(MisconfigurationError, match=r"configure_optimizers\(\) returned a str, which hookrt cannot"):
        fit(Bad())


def test_optimizer_without_parameters():
    class Empty(Regressor):
        def configure_optimizers(self):
            return torch.optim.SGD([{"params": []}], lr=0.1)

    with pytest.raises(MisconfigurationError, match=r"Optimizer 0 \(SGD\) from configure_optimizers\(\) has no"):
        fit(Empty())


def test_scheduler_of_foreign_optimizer():
    class Foreign(Regressor):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            other = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
            return [optimizer], [torch.optim.lr_scheduler.StepLR(other, 1)]

    with pytest.raises(MisconfigurationError, match=r"belongs to an optimizer that configure_optimizers\(\) did not"):
        fit(Foreign())


def test_empty_training_loader():
    empty = DataLoader(TensorDataset(torch.empty(0, 3), torch.empty(0, 1)), batch_size=4)
    with pytest.raises(MisconfigurationError, match=r"The training loader has no batches"):
        fit(Regressor(), train=empty)


def test_no_training_data():
    trainer = hookrt.Trainer(max_epochs=1, **QUIET)
    with pytest.raises(MisconfigurationError, match=r"No training data: pass train_dataloaders to fit\(\)"):
        trainer.fit(Regressor())


def test_dataset_instead_of_loader():
    dataset = TensorDataset(torch.randn(4, 3), torch.randn(4, 1))
    with pytest.raises(MisconfigurationError, match=r"is a Dataset, not a loader of batches\. Wrap it"):
        fit(Regressor(), train=dataset)


def test_dataloader_hook_that_raises():
    class Failing(Regressor):
        def train_dataloader(self):
            raise FileNotFoundError("data.csv")

    trainer = hookrt.Trainer(max_epochs=1, **QUIET)
    with pytest.raises(MisconfigurationError, match=r"Failing\.train_dataloader\(\) raised FileNotFoundError: data"):
        trainer.fit(Failing())


def test_nan_loss_under_detect_anomaly():
    class Nan(Regressor):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * float("nan")

    with pytest.raises(MisconfigurationError, match=r"non-finite loss \(nan\) at epoch 0, batch 0"):
        fit(Nan(), detect_anomaly=True)


def test_fit_rejects_plain_module():
    trainer = hookrt.Trainer(max_epochs=1, **QUIET)
    with pytest.raises(MisconfigurationError, match=r"Trainer\.fit needs a hookrt\.LightningModule, got Linear"):
        trainer.fit(torch.nn.Linear(1, 1))  # type: ignore[arg-type]


def test_validation_end_wrong_return():
    class Wrong(Regressor):
        def validation_end(self, outputs):
            return 1.0

    with pytest.raises(MisconfigurationError, match=r"Wrong\.validation_end returned a float; it must return a dict"):
        fit(Wrong(), val=make_loader(1))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"max_epochs": -2}, r"Trainer\(max_epochs=-2\) is not valid: max_epochs must be None, -1"),
        ({"accumulate_grad_batches": 0}, r"accumulate_grad_batches must be an int >= 1"),
        ({"val_check_interval": 1.5}, r"val_check_interval must be a fraction in \(0\.0, 1\.0\]"),
        ({"limit_train_batches": -1}, r"limit_train_batches must be a fraction between 0\.0 and 1\.0"),
        ({"precision": "8-bit"}, r"precision must be one of '32-true', 'bf16-mixed', '16-mixed'"),
        ({"gradient_clip_algorithm": "l1"}, r"gradient_clip_algorithm must be 'norm' or 'value'"),
        ({"min_epochs": 5, "max_epochs": 2}, r"min_epochs=5, max_epochs=2\) conflict"),
        ({"min_steps": 10, "max_steps": 3}, r"min_steps=10, max_steps=3\) conflict"),
        ({"max_time": "1 hour"}, r"max_time must be a 'DD:HH:MM:SS' string"),
        ({"strategy": "horovod"}, r"strategy must be one of 'auto'"),
        ({"log_every_n_steps": 0}, r"log_every_n_steps must be an int >= 1"),
    ],
)
def test_invalid_flags(flags, message):
    with pytest.raises(MisconfigurationError, match=message):
        hookrt.Trainer(**flags, **QUIET)


def test_unknown_plugin_name():
    with pytest.raises(hookrt.PluginError, match=r"No plugin named 'progres_bar' is installed\. Did you mean"):
        hookrt.Trainer(plugins=["progres_bar"], **QUIET)


def test_plugin_of_wrong_type():
    with pytest.raises(hookrt.PluginError, match=r"item 0 is a int, not a hookrt\.Plugin or a plugin name"):
        hookrt.Trainer(plugins=[3], **QUIET)


# ---------------------------------------------------------------- failure handling


def test_exception_reaches_caller_after_on_exception_and_teardown():
    seen = []

    class Boom(Regressor):
        def training_step(self, batch, batch_idx):
            raise KeyError("boom")

    class Watcher(hookrt.Plugin):
        @hookrt.on("on_exception")
        def failed(self, payload):
            seen.append(("exception", type(payload.exception).__name__))

        @hookrt.on("teardown")
        def closed(self, payload):
            seen.append(("teardown", payload.stage))

    model = Boom()
    model.eval()
    with torch.no_grad():
        with pytest.raises(KeyError, match="boom"):
            fit(model, plugins=[Watcher()])
        assert not torch.is_grad_enabled()
    assert seen == [("exception", "KeyError"), ("teardown", "fit")]
    assert not model.training


def test_teardown_runs_every_handler_when_one_fails(caplog):
    closed = []

    class Failing(hookrt.Plugin):
        @hookrt.on("teardown")
        def close(self, payload):
            raise OSError("disk gone")

    class Closing(hookrt.Plugin):
        @hookrt.on("teardown")
        def close(self, payload):
            closed.append(True)

    class Boom(Regressor):
        def training_step(self, batch, batch_idx):
            raise ValueError("first")

    with pytest.raises(ValueError, match="first"):
        fit(Boom(), plugins=[Failing(), Closing()])
    assert closed == [True]
    assert any("Failing.close" in record.getMessage() for record in caplog.records)


def test_trainer_can_fit_again_after_failure():
    class Flaky(Regressor):
        fail = True

        def training_step(self, batch, batch_idx):
            if self.fail:
                raise RuntimeError("once")
            return super().training_step(batch, batch_idx)

    model = Flaky()
    trainer = hookrt.Trainer(max_epochs=1, num_sanity_val_steps=0, **QUIET)
    with pytest.raises(RuntimeError, match="once"):
        trainer.fit(model, make_loader())
    model.fail = False
    trainer.fit(model, make_loader())
    assert trainer.global_step == 3


def test_validation_restores_train_mode_and_grad():
    modes = []

    class Watch(Regressor):
        def on_train_batch_start(self, batch, batch_idx):
            modes.append((self.training, torch.is_grad_enabled()))

        def validation_step(self, batch, batch_idx):
            modes.append((self.training, torch.is_grad_enabled()))

    fit(Watch(), train=make_loader(2), val=make_loader(1), val_check_interval=1)
    assert modes == [(True, True), (False, False), (True, True), (False, False)]


# ---------------------------------------------------------------- metrics and logging


def test_log_every_n_steps_emits_on_log():
    logs = []

    class Logged(Regressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return loss

    class Sink(hookrt.Plugin):
        @hookrt.on("on_log")
        def write(self, payload):
            logs.append((payload.step, sorted(payload.metrics)))

    fit(Logged(), train=make_loader(6), log_every_n_steps=2, plugins=[Sink()])
    assert logs == [(2, ["train_loss"]), (4, ["train_loss"]), (6, ["train_loss"])]


def test_log_step_and_epoch_keys():
    class Both(Regressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("loss_both", loss, on_step=True, on_epoch=True, prog_bar=True)
            return loss

    trainer = fit(Both(), log_every_n_steps=1)
    assert {"loss_both_step", "loss_both_epoch"} <= set(trainer.logged_metrics)
    assert "loss_both" in trainer.callback_metrics
    assert "loss_both_epoch" in trainer.progress_bar_metrics
    assert "loss" in trainer.progress_bar_metrics


def test_legacy_dict_returns_reach_metrics():
    class Legacy(Regressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return {"loss": loss, "log": {"train_mse": loss}, "progress_bar": {"mse": loss}}

        def validation_step(self, batch, batch_idx):
            x, y = batch
            return {"val_loss": F.mse_loss(self(x), y)}

        def validation_end(self, outputs):
            mean = torch.stack([output["val_loss"] for output in outputs]).mean()
            return {"avg_val_loss": mean, "log": {"val_loss": mean}}

    trainer = fit(Legacy(), val=make_loader(2), log_every_n_steps=1)
    assert set(trainer.callback_metrics) >= {"avg_val_loss", "val_loss", "train_mse", "mse"}
    assert "train_mse" in trainer.logged_metrics
    assert "mse" in trainer.progress_bar_metrics


def test_log_rejects_non_scalar():
    class Vector(Regressor):
        def training_step(self, batch, batch_idx):
            self.log("weights", self.layer.weight)
            return super().training_step(batch, batch_idx)

    with pytest.raises(MisconfigurationError, match=r"self\.log\('weights', \.\.\.\) got a tensor of shape \(1, 3\)"):
        fit(Vector())



def test_log_takes_numpy_scalars():
    class NumpyValues(Regressor):
        def training_step(self, batch, batch_idx):
            self.log("half", np.float32(0.5))
            self.log("count", np.int64(3))
            self.log("array", np.array(0.25, dtype=np.float32))
            return super().training_step(batch, batch_idx)

    trainer = fit(NumpyValues())
    assert float(trainer.callback_metrics["half"]) == 0.5
    assert float(trainer.callback_metrics["count"]) == 3.0
    assert float(trainer.callback_metrics["array"]) == 0.25


def test_log_rejects_numpy_bool():
    class Flag(Regressor):
        def training_step(self, batch, batch_idx):
            self.log("flag", np.bool_(True))
            return super().training_step(batch, batch_idx)

    with pytest.raises(MisconfigurationError, match=r"self\.log\('flag', \.\.\.\) got a bool; it takes a number or "
                                                    r"a one-element tensor\."):
        fit(Flag())

def test_ambiguous_batch_warns():
    class Mixed(Regressor):
        def training_step(self, batch, batch_idx):
            self.log("metric", 1.0, on_epoch=True)
            return super().training_step(batch[:2], batch_idx)

    def with_odd_tensor(items):
        x, y = torch.utils.data.default_collate(items)
        return [x, y, torch.zeros(2)]  # first dimensions 4, 4 and 2: the batch size is unclear

    dataset = TensorDataset(torch.randn(8, 3), torch.randn(8, 1))
    loader = DataLoader(dataset, batch_size=4, collate_fn=with_odd_tensor)
    with pytest.warns(hookrt.HookrtWarning, match=r"Could not tell the batch size .* Pass batch_size= to self\.log"):
        fit(Mixed(), train=loader)


# ---------------------------------------------------------------- evaluation entry points


def test_validate_and_test_return_metrics_per_loader():
    model = Regressor()
    trainer = fit(model)
    results = trainer.validate(model, make_loader(2))
    assert list(results[0]) == ["val_loss"]
    results = trainer.test(model, [make_loader(1), make_loader(2)])
    assert set(results[0]) == {"test_loss/dataloader_idx_0"}
    assert set(results[1]) == {"test_loss/dataloader_idx_1"}


def test_validation_with_two_loaders_passes_dataloader_idx():
    seen = []

    class Two(Regressor):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            seen.append((dataloader_idx, batch_idx))

    fit(Two(), val=[make_loader(1), make_loader(2)])
    assert seen == [(0, 0), (1, 0), (1, 1)]


def test_predict_returns_outputs():
    model = Regressor()
    trainer = fit(model)
    loader = DataLoader(torch.randn(8, 3), batch_size=4)
    predictions = trainer.predict(model, loader)
    assert len(predictions) == 2
    assert predictions[0].shape == (4, 1)


def test_validate_without_step_is_an_error():
    class NoValidation(hookrt.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)

    trainer = hookrt.Trainer(**QUIET)
    with pytest.raises(MisconfigurationError, match=r"needs NoValidation\.validation_step\(batch, batch_idx\)"):
        trainer.validate(NoValidation(), make_loader(1))


def test_test_without_model_is_an_error():
    trainer = hookrt.Trainer(**QUIET)
    with pytest.raises(MisconfigurationError, match=r"trainer\.test\(\) got no model and none was fitted before"):
        trainer.test()


# ---------------------------------------------------------------- optimization forms


def test_manual_optimization_counts_steps_and_emits_backward():
    events = []

    class Manual(Regressor):
        automatic_optimization = False

        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            optimizer.zero_grad()
            loss = super().training_step(batch, batch_idx)
            self.manual_backward(loss)
            optimizer.step()
            return loss

    class Watch(hookrt.Plugin):
        @hookrt.on("after_backward")
        def backward(self, payload):
            events.append("after_backward")

        @hookrt.on("optimizer_step")
        def step(self, payload):
            events.append("optimizer_step")

    trainer = fit(Manual(), plugins=[Watch()])
    assert trainer.global_step == 3
    assert events == ["after_backward", "optimizer_step"] * 3


def test_truncated_bptt_passes_hiddens():
    seen = []

    class Recurrent(hookrt.LightningModule):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.GRU(2, 4, batch_first=True)
            self.head = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx, hiddens):
            x, y = batch
            seen.append((x.shape[1], hiddens is None))
            out, hidden = self.rnn(x, hiddens)
            return {"loss": F.mse_loss(self.head(out), y), "hiddens": hidden}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = DataLoader(TensorDataset(torch.randn(4, 6, 2), torch.randn(4, 6, 1)), batch_size=2)
    trainer = fit(Recurrent(), train=loader, truncated_bptt_steps=2)
    assert seen[:3] == [(2, True), (2, False), (2, False)]
    assert len(seen) == 6
    assert trainer.global_step == 6


@pytest.mark.parametrize(
    "form",
    ["optimizer", "list", "pair", "dict", "list_of_dicts"],
)
def test_configure_optimizers_forms(form):
    class Forms(Regressor):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
            return {
                "optimizer": optimizer,
                "list": [optimizer],
                "pair": ([optimizer], [scheduler]),
                "dict": {"optimizer": optimizer, "lr_scheduler": scheduler},
                "list_of_dicts": [{"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler}}],
            }[form]

    trainer = fit(Forms())
    assert len(trainer.optimizers) == 1
    expected = 0 if form in ("optimizer", "list") else 1
    assert len(trainer.lr_scheduler_configs) == expected


# ---------------------------------------------------------------- module attributes


def test_module_reads_trainer_state():
    seen = {}

    class Reader(Regressor):
        def on_train_end(self):
            seen.update(epoch=self.current_epoch, step=self.global_step, device=self.device.type,
                        logger=self.logger, rank=self.trainer.is_global_zero)

    trainer = fit(Reader(), max_epochs=2)
    assert seen == {"epoch": 2, "step": 6, "device": "cpu", "logger": None, "rank": True}
    assert trainer.world_size == 1
    assert trainer.global_rank == 0


def test_module_outside_trainer_is_an_error():
    with pytest.raises(MisconfigurationError, match=r"Regressor is not attached to a Trainer"):
        _ = Regressor().trainer


def test_hparams_assignable_and_saved():
    class Legacy(hookrt.LightningModule):
        def __init__(self, hparams):
            super().__init__()
            self.hparams = hparams
            self.layer = torch.nn.Linear(hparams.width, 1)

    module = Legacy(argparse.Namespace(width=3, lr=0.5))
    assert module.hparams.width == 3
    assert module.hparams["lr"] == 0.5

    class Modern(hookrt.LightningModule):
        def __init__(self, width: int = 2, name: str = "x", ignored: object = None):
            super().__init__()
            self.save_hyperparameters(ignore="ignored")

    assert dict(Modern(width=5).hparams) == {"width": 5, "name": "x"}


def test_load_from_checkpoint_rebuilds_module(tmp_path):
    class Saved(Regressor):
        def __init__(self, lr: float = 0.1, hidden: int = 3):
            super().__init__(lr=lr, hidden=hidden)
            self.save_hyperparameters()

    model = Saved(lr=0.3)
    trainer = fit(model)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = Saved.load_from_checkpoint(path)
    assert restored.hparams.lr == 0.3
    assert torch.equal(restored.layer.weight, model.layer.weight)
    overridden = Saved.load_from_checkpoint(path, lr=0.9)
    assert overridden.lr == 0.9


def test_legacy_hparams_module_loads_from_checkpoint(tmp_path):
    class Legacy(hookrt.LightningModule):
        def __init__(self, hparams):
            super().__init__()
            self.hparams = hparams
            self.layer = torch.nn.Linear(hparams.width, 1)

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self.layer(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    model = Legacy(argparse.Namespace(width=3, lr=0.5))
    trainer = fit(model)
    path = tmp_path / "legacy.ckpt"
    trainer.save_checkpoint(path)
    restored = Legacy.load_from_checkpoint(path)
    assert restored.hparams.lr == 0.5
    assert torch.equal(restored.layer.weight, model.layer.weight)


def test_checkpoint_of_other_model_lists_keys(tmp_path):
    trainer = fit(Regressor())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    class Other(Regressor):
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Linear(2, 2)

    trainer = hookrt.Trainer(max_epochs=1, **QUIET)
    with pytest.raises(hookrt.CheckpointError, match=r"extra\.weight"):
        trainer.fit(Other(), make_loader(), ckpt_path=path)


def test_event_payload_fields_available_to_plugins():
    seen = {}

    class Reader(hookrt.Plugin):
        @hookrt.on(Event.OPTIMIZER_STEP, once=True)
        def step(self, payload):
            seen["optimizer"] = type(payload.optimizer).__name__
            seen["skipped"] = payload.skipped
            seen["step"] = payload.trainer.global_step

    trainer = fit(Regressor(), plugins=[Reader()])
    assert seen == {"optimizer": "SGD", "skipped": False, "step": 1}
    assert math.isclose(trainer.estimated_stepping_batches, 3)


def test_default_stack_members_and_replacement():
    from hookrt.plugins import ModelCheckpoint, ProgressBar, SignalHandler, TensorBoardLogger

    names = [type(plugin).__name__ for plugin in hookrt.Trainer().plugins]
    assert names == ["TensorBoardLogger", "ModelSummary", "ProgressBar", "SignalHandler", "ModelCheckpoint"]

    class Bar(hookrt.Plugin):
        replaces_default = "progress_bar"

    checkpoint = ModelCheckpoint(monitor="val_loss")
    plugins = hookrt.Trainer(plugins=[Bar(), checkpoint], enable_model_summary=False, logger=False).plugins
    assert not any(isinstance(plugin, (ProgressBar, TensorBoardLogger)) for plugin in plugins)
    assert [plugin for plugin in plugins if isinstance(plugin, ModelCheckpoint)] == [checkpoint]
    assert any(isinstance(plugin, SignalHandler) for plugin in plugins)


def test_signal_handler_flag_leaves_it_out():
    from hookrt.plugins import SignalHandler

    plugins = hookrt.Trainer(enable_signal_handler=False).plugins

    assert not any(isinstance(plugin, SignalHandler) for plugin in plugins)
    assert [type(plugin).__name__ for plugin in plugins] == [
        "TensorBoardLogger", "ModelSummary", "ProgressBar", "ModelCheckpoint"
    ]


def test_resume_continues_logger_run_folder(tmp_path):
    class Logged(Regressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return loss

    flags = {"max_epochs": 1, "num_sanity_val_steps": 0, "enable_progress_bar": False,
             "enable_model_summary": False, "default_root_dir": tmp_path, "log_every_n_steps": 1}
    trainer = hookrt.Trainer(**flags)
    trainer.fit(Logged(), make_loader())
    first = trainer.logger.log_dir
    checkpoint = tmp_path / "checkpoints" / "epoch=0-step=3.ckpt"
    assert checkpoint.exists()

    trainer = hookrt.Trainer(**{**flags, "max_epochs": 2})
    trainer.fit(Logged(), make_loader(), ckpt_path=checkpoint)
    assert trainer.logger.log_dir == first
    assert sorted(path.name for path in (tmp_path / "hookrt_logs").iterdir()) == ["version_0"]
    assert trainer.global_step == 6


def test_precision_flag_adds_mixed_precision():
    from hookrt.plugins import MixedPrecision

    trainer = fit(Regressor(), precision="bf16-mixed")
    assert [type(plugin) for plugin in trainer.plugins if isinstance(plugin, MixedPrecision)] == [MixedPrecision]
    assert trainer.global_step == 3


def test_nested_fit_from_handler_is_rejected():
    class Nested(hookrt.Plugin):
        @hookrt.on("on_epoch_end")
        def refit(self, payload):
            payload.trainer.fit(payload.module, make_loader())

    with pytest.raises(MisconfigurationError, match=r"Trainer\.fit was called while trainer\.fit is still running"):
        fit(Regressor(), max_epochs=3, plugins=[Nested()])


def test_plugin_class_instead_of_instance():
    class Probe(hookrt.Plugin):
        pass

    with pytest.raises(hookrt.PluginError, match=r"item 0 is the class Probe, not an instance\. Pass Probe\(\)"):
        hookrt.Trainer(plugins=[Probe], **QUIET)


def test_resume_with_other_optimizer_class(tmp_path):
    trainer = fit(Regressor())
    path = tmp_path / "sgd.ckpt"
    trainer.save_checkpoint(path)

    class WithAdam(Regressor):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters())

    trainer = hookrt.Trainer(max_epochs=2, **QUIET)
    with pytest.raises(hookrt.CheckpointError, match=r"contains the state of SGD for optimizer 0, but .* returns Adam"):
        trainer.fit(WithAdam(), make_loader(), ckpt_path=path)


def test_load_from_checkpoint_rejects_unknown_override(tmp_path):
    class Saved(Regressor):
        def __init__(self, lr: float = 0.1, hidden: int = 3):
            super().__init__(lr=lr, hidden=hidden)
            self.save_hyperparameters()

    trainer = fit(Saved())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(MisconfigurationError, match=r"got 'hiden', which Saved\.__init__ does not take\. Did you"):
        Saved.load_from_checkpoint(path, hiden=4)


def test_undecorated_event_method_warns():
    class Forgot(hookrt.Plugin):
        def on_batch_end(self, payload):
            pass

    with pytest.warns(hookrt.HookrtWarning, match=r"Forgot\.on_batch_end\(\) is named after the event 'on_batch_end'"):
        hookrt.Bus().register(Forgot())


def test_misspelled_callback_method_warns():
    class Typo(hookrt.Callback):
        def on_train_batch_ends(self, trainer, pl_module, outputs, batch, batch_idx):
            pass

    with pytest.warns(hookrt.HookrtWarning, match=r"Typo\.on_train_batch_ends\(\) is not a callback method.*Did you"):
        hookrt.Bus().register(Typo())


def test_lightning_hook_name_points_at_event():
    bus = hookrt.Bus()
    with pytest.raises(hookrt.PluginError, match=r"'on_train_batch_end' is a LightningModule hook name; on the bus "
                                                 r"it runs on the event 'on_batch_end'"):
        bus.subscribe("on_train_batch_end", lambda payload: None)


def test_bool_flag_rejects_string():
    with pytest.raises(MisconfigurationError, match=r"Trainer\(enable_checkpointing='false'\) is not valid"):
        hookrt.Trainer(enable_checkpointing="false")


def test_float_loss_in_dict_names_type():
    class FloatLoss(Regressor):
        def training_step(self, batch, batch_idx):
            return {"loss": 0.3}

    with pytest.raises(MisconfigurationError, match=r"returned a dict whose 'loss' is a float, not a tensor"):
        fit(FloatLoss())


def test_validation_loader_without_step_warns():
    class Plain(hookrt.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self.layer(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.warns(hookrt.HookrtWarning, match=r"Validation data was given but Plain defines no validation_step"):
        fit(Plain(), val=make_loader(1))


def test_one_shot_iterator_warns():
    batches = iter(list(make_loader()))
    with pytest.warns(hookrt.HookrtWarning, match=r"one-shot iterator \(list_iterator\), so only the first epoch"):
        fit(Regressor(), train=batches, max_epochs=2)
