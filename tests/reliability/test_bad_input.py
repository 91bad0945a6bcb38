"""A catalogue of bad input: each case checks the error type, a message naming the culprit and the fix,
and that the error comes before the first optimizer step wherever the input can be checked that early.

Each case is a function that takes the test's folder and a `StepCounter` and does one wrong thing. A
case marked ``late`` is one that cannot be checked before training: a metric that the module never logs
is only known to be missing after the first validation run, because modules may log it in any hook.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt
from hookrt import CheckpointError, Event, HookrtWarning, MisconfigurationError, PluginError
from hookrt._checkpoint_io import FORMAT_VERSION, MARKER_KEY, CheckpointLoadError
from hookrt.plugins.checkpoint import ModelCheckpoint
from hookrt.plugins.early_stopping import EarlyStopping
from hookrt.plugins.signals import SignalHandler

QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}

#: Text that shows a message leaks internals the user cannot act on.
INTERNAL_TEXT = ("Traceback", 'File "', "enforce fail", "inline_container", "PytorchStreamReader", "hookrt/_")


class StepCounter(hookrt.Plugin):
    """Count applied optimizer steps."""

    def __init__(self) -> None:
        self.steps = 0

    @hookrt.on(Event.OPTIMIZER_STEP)
    def count(self, payload: Any) -> None:
        self.steps += 1


def make_loader(batches: int = 3, features: int = 3) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batches * 4, features, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4)


class Regressor(hookrt.LightningModule):
    def __init__(self, features: int = 3) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(
    counter: StepCounter,
    model: hookrt.LightningModule | None = None,
    train: Any = None,
    val: Any = None,
    plugins: tuple[Any, ...] = (),
    ckpt_path: Any = None,
    **flags: Any,
) -> hookrt.Trainer:
    """Fit for one epoch with the counter registered; ``train`` defaults to three batches."""
    options = {"max_epochs": 1, "num_sanity_val_steps": 0, **QUIET, **flags}
    trainer = hookrt.Trainer(plugins=[counter, *plugins], **options)
    trainer.fit(model or Regressor(), make_loader() if train is None else train, val, ckpt_path=ckpt_path)
    return trainer


def saved_checkpoint(folder: Path, model: hookrt.LightningModule | None = None) -> Path:
    """Fit one epoch, save a checkpoint and return its path."""
    trainer = hookrt.Trainer(max_epochs=1, num_sanity_val_steps=0, **QUIET)
    trainer.fit(model or Regressor(), make_loader())
    path = folder / "good.ckpt"
    trainer.save_checkpoint(path)
    return path


def returning(hook: str, value: Callable[[hookrt.LightningModule], Any]) -> hookrt.LightningModule:
    """A Regressor whose ``hook`` returns ``value(self)`` (for *_step hooks: in place of the usual result)."""

    def method(self: hookrt.LightningModule, *args: Any) -> Any:
        return value(self)

    return type(f"Bad{hook.title().replace('_', '')}", (Regressor,), {hook: method})()


class Case(NamedTuple):
    run: Callable[[Path, StepCounter], Any]
    error: type[BaseException]
    match: str
    #: True when the input can only be checked after training has started.
    late: bool = False


# ---------------------------------------------------------------------- module hooks


def training_step_none(path: Path, counter: StepCounter) -> None:
    fit(counter, returning("training_step", lambda self: None))


def training_step_dict_without_loss(path: Path, counter: StepCounter) -> None:
    fit(counter, returning("training_step", lambda self: {"acc": torch.tensor(1.0)}))


def training_step_string(path: Path, counter: StepCounter) -> None:
    fit(counter, returning("training_step", lambda self: "loss"))


def training_step_float(path: Path, counter: StepCounter) -> None:
    fit(counter, returning("training_step", lambda self: 0.5))


def training_step_vector(path: Path, counter: StepCounter) -> None:
    fit(counter, returning("training_step", lambda self: self(torch.ones(4, 3))))


def training_step_detached(path: Path, counter: StepCounter) -> None:
    fit(counter, returning("training_step", lambda self: self(torch.ones(1, 3)).sum().detach()))


class MissingBatchIdx(Regressor):
    def training_step(self, batch: Any) -> Any:  # type: ignore[override]
        return super().training_step(batch, 0)


def training_step_signature(path: Path, counter: StepCounter) -> None:
    fit(counter, MissingBatchIdx())


def validation_end_list(path: Path, counter: StepCounter) -> None:
    # The sanity check runs validation before training, so the return value is checked there.
    fit(counter, returning("validation_end", lambda self: [1.0]), val=make_loader(1), num_sanity_val_steps=1)


def validation_epoch_end_string(path: Path, counter: StepCounter) -> None:
    model = returning("validation_epoch_end", lambda self: "done")
    fit(counter, model, val=make_loader(1), num_sanity_val_steps=1)


def eval_end_float_for_test(path: Path, counter: StepCounter) -> None:
    hookrt.Trainer(plugins=[counter], **QUIET).test(returning("test_end", lambda self: 0.5), make_loader(1))


def configure_optimizers_none(path: Path, counter: StepCounter) -> None:
    fit(counter, returning("configure_optimizers", lambda self: None))


def configure_optimizers_parameters(path: Path, counter: StepCounter) -> None:
    fit(counter, returning("configure_optimizers", lambda self: self.parameters()))


def configure_optimizers_string(path: Path, counter: StepCounter) -> None:
    fit(counter, returning("configure_optimizers", lambda self: "adam"))


def configure_optimizers_raises(path: Path, counter: StepCounter) -> None:
    fit(counter, returning("configure_optimizers", lambda self: torch.optim.SGD([], lr=0.1)))


def optimizer_without_parameters(path: Path, counter: StepCounter) -> None:
    fit(counter, returning("configure_optimizers", lambda self: torch.optim.SGD([{"params": []}], lr=0.1)))


def scheduler_without_optimizer(path: Path, counter: StepCounter) -> None:
    def schedulers_only(self: hookrt.LightningModule) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1)}

    fit(counter, returning("configure_optimizers", schedulers_only))


def scheduler_alone(path: Path, counter: StepCounter) -> None:
    def scheduler(self: hookrt.LightningModule) -> Any:
        return torch.optim.lr_scheduler.StepLR(torch.optim.SGD(self.parameters(), lr=0.1), 1)

    fit(counter, returning("configure_optimizers", scheduler))


def scheduler_of_other_optimizer(path: Path, counter: StepCounter) -> None:
    def mismatched(self: hookrt.LightningModule) -> Any:
        other = torch.optim.SGD(self.parameters(), lr=0.1)
        return [torch.optim.SGD(self.parameters(), lr=0.1)], [torch.optim.lr_scheduler.StepLR(other, 1)]

    fit(counter, returning("configure_optimizers", mismatched))


def scheduler_dict_without_scheduler(path: Path, counter: StepCounter) -> None:
    def no_scheduler(self: hookrt.LightningModule) -> Any:
        return {"optimizer": torch.optim.SGD(self.parameters(), lr=0.1), "lr_scheduler": {"interval": "step"}}

    fit(counter, returning("configure_optimizers", no_scheduler))


def scheduler_bad_interval(path: Path, counter: StepCounter) -> None:
    def by_batch(self: hookrt.LightningModule) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "batch"}}

    fit(counter, returning("configure_optimizers", by_batch))


# ---------------------------------------------------------------------- data


def train_dataloader_dataset(path: Path, counter: StepCounter) -> None:
    class DatasetHook(Regressor):
        def train_dataloader(self) -> Any:
            return make_loader().dataset

    hookrt.Trainer(max_epochs=1, plugins=[counter], **QUIET).fit(DatasetHook())


def train_dataloaders_dict(path: Path, counter: StepCounter) -> None:
    fit(counter, train={"a": make_loader()})


def train_dataloaders_string(path: Path, counter: StepCounter) -> None:
    fit(counter, train="data/train.csv")


def no_training_data(path: Path, counter: StepCounter) -> None:
    hookrt.Trainer(max_epochs=1, plugins=[counter], **QUIET).fit(Regressor())


def empty_training_loader(path: Path, counter: StepCounter) -> None:
    fit(counter, train=make_loader(0))


def val_dataloaders_dataset(path: Path, counter: StepCounter) -> None:
    fit(counter, val=[make_loader(1), make_loader(1).dataset])


def val_dataloader_hook_raises(path: Path, counter: StepCounter) -> None:
    class MissingFile(Regressor):
        def val_dataloader(self) -> Any:
            raise FileNotFoundError("val.csv")

    fit(counter, MissingFile())


def val_dataloader_dict(path: Path, counter: StepCounter) -> None:
    class DictHook(Regressor):
        def val_dataloader(self) -> Any:
            return {"clean": make_loader(1), "noisy": make_loader(1)}

    fit(counter, DictHook())


def dataset_from_test_dataloader(path: Path, counter: StepCounter) -> None:
    class DatasetHook(Regressor):
        def test_dataloader(self) -> Any:
            return make_loader(1).dataset

    hookrt.Trainer(plugins=[counter], **QUIET).test(DatasetHook())


def predict_dataloader_string(path: Path, counter: StepCounter) -> None:
    class PathHook(Regressor):
        def predict_dataloader(self) -> Any:
            return "data/predict.csv"

    hookrt.Trainer(plugins=[counter], **QUIET).predict(PathHook())


def dataloaders_string_for_test(path: Path, counter: StepCounter) -> None:
    hookrt.Trainer(plugins=[counter], **QUIET).test(Regressor(), "data/test.csv")


def nan_loss_detect_anomaly(path: Path, counter: StepCounter) -> None:
    fit(counter, returning("training_step", lambda self: self(torch.ones(1, 3)).sum() * math.nan),
        detect_anomaly=True)


def inf_loss_detect_anomaly(path: Path, counter: StepCounter) -> None:
    fit(counter, returning("training_step", lambda self: self(torch.ones(1, 3)).abs().sum() * math.inf),
        detect_anomaly=True)


# ---------------------------------------------------------------------- monitored metrics


def early_stopping_monitor_missing(path: Path, counter: StepCounter) -> None:
    fit(counter, val=make_loader(1), plugins=(EarlyStopping(monitor="val_acc"),))


def model_checkpoint_monitor_missing(path: Path, counter: StepCounter) -> None:
    checkpoint = ModelCheckpoint(dirpath=path / "checkpoints", monitor="val_acc")
    fit(counter, val=make_loader(1), plugins=(checkpoint,))


def plateau_monitor_missing(path: Path, counter: StepCounter) -> None:
    def plateau(self: hookrt.LightningModule) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_acc"}}

    fit(counter, returning("configure_optimizers", plateau), val=make_loader(1))


# ---------------------------------------------------------------------- trainer flags and plugins


def trainer(**flags: Any) -> Callable[[Path, StepCounter], Any]:
    def build(path: Path, counter: StepCounter) -> None:
        hookrt.Trainer(plugins=[counter], **{**QUIET, **flags})

    return build


def val_check_interval_longer_than_epoch(path: Path, counter: StepCounter) -> None:
    fit(counter, val=make_loader(1), val_check_interval=10)


def checkpoint_folder_is_file(path: Path, counter: StepCounter) -> None:
    (path / "checkpoints").write_text("not a folder")
    fit(counter, plugins=(ModelCheckpoint(dirpath=path / "checkpoints" / "run1"),))


def signal_folder_is_file(path: Path, counter: StepCounter) -> None:
    (path / "root").write_text("not a folder")
    fit(counter, plugins=(SignalHandler(),), default_root_dir=path / "root")


def unknown_plugin_name(path: Path, counter: StepCounter) -> None:
    hookrt.Trainer(plugins=[counter, "early_stoping"], **QUIET)


def plugin_of_wrong_type(path: Path, counter: StepCounter) -> None:
    hookrt.Trainer(plugins=[counter, 42], **QUIET)


def plugins_not_a_list(path: Path, counter: StepCounter) -> None:
    hookrt.Trainer(plugins=3.5, **QUIET)


def handler_of_unknown_event(path: Path, counter: StepCounter) -> None:
    class Typo(hookrt.Plugin):
        @hookrt.on("on_batch_ends")
        def handle(self, payload: Any) -> None:
            pass

    hookrt.Trainer(plugins=[counter, Typo()], **QUIET)


def handler_without_payload(path: Path, counter: StepCounter) -> None:
    class NoPayload(hookrt.Plugin):
        @hookrt.on(Event.BATCH_END)
        def handle(self) -> None:
            pass

    hookrt.Trainer(plugins=[counter, NoPayload()], **QUIET)


def handler_with_unknown_option(path: Path, counter: StepCounter) -> None:
    class Option(hookrt.Plugin):
        @hookrt.on(Event.BATCH_END, evry=2)
        def handle(self, payload: Any) -> None:
            pass

    hookrt.Trainer(plugins=[counter, Option()], **QUIET)


def handler_on_wrapper_point(path: Path, counter: StepCounter) -> None:
    class Wrapper(hookrt.Plugin):
        @hookrt.on("batch_step")
        def handle(self, payload: Any) -> None:
            pass

    hookrt.Trainer(plugins=[counter, Wrapper()], **QUIET)


def plugins_with_same_state_key(path: Path, counter: StepCounter) -> None:
    hookrt.Trainer(plugins=[counter, EarlyStopping("val_loss"), EarlyStopping("val_loss", patience=5)], **QUIET)


# ---------------------------------------------------------------------- checkpoints


def checkpoint_missing(path: Path, counter: StepCounter) -> None:
    fit(counter, ckpt_path=path / "missing.ckpt")


def checkpoint_truncated(path: Path, counter: StepCounter) -> None:
    good = saved_checkpoint(path)
    truncated = path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    fit(counter, ckpt_path=truncated)


def checkpoint_plain_state_dict(path: Path, counter: StepCounter) -> None:
    torch.save(Regressor().state_dict(), path / "weights.pt")
    fit(counter, ckpt_path=path / "weights.pt")


def checkpoint_not_from_torch(path: Path, counter: StepCounter) -> None:
    (path / "notes.ckpt").write_text("epoch,loss\n0,0.5\n")
    fit(counter, ckpt_path=path / "notes.ckpt")


def checkpoint_newer_format(path: Path, counter: StepCounter) -> None:
    checkpoint = torch.load(saved_checkpoint(path), weights_only=True)
    checkpoint[MARKER_KEY] = {"format_version": FORMAT_VERSION + 98, "hookrt_version": "9.0.0"}
    torch.save(checkpoint, path / "newer.ckpt")
    fit(counter, ckpt_path=path / "newer.ckpt")


def checkpoint_other_model(path: Path, counter: StepCounter) -> None:
    other = saved_checkpoint(path, Regressor())
    fit(counter, Regressor(features=5), train=make_loader(features=5), ckpt_path=other)


def checkpoint_other_optimizers(path: Path, counter: StepCounter) -> None:
    def two(self: hookrt.LightningModule) -> Any:
        return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.SGD(self.parameters(), lr=0.1)]

    fit(counter, returning("configure_optimizers", two), ckpt_path=saved_checkpoint(path))


def best_checkpoint_without_checkpointing(path: Path, counter: StepCounter) -> None:
    fit(counter, ckpt_path="best")


def load_from_truncated_checkpoint(path: Path, counter: StepCounter) -> None:
    good = saved_checkpoint(path)
    truncated = path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:100])
    Regressor.load_from_checkpoint(truncated)


CASES = {
    # module hooks
    "training_step returns None": Case(
        training_step_none, MisconfigurationError,
        r"training_step returned None; it must return the loss tensor or a dict with a 'loss' tensor"),
    "training_step returns dict without loss": Case(
        training_step_dict_without_loss, MisconfigurationError,
        r"training_step returned a dict with keys \['acc'\]; it must return the loss tensor"),
    "training_step returns str": Case(
        training_step_string, MisconfigurationError, r"training_step returned a str; it must return the loss tensor"),
    "training_step returns float": Case(
        training_step_float, MisconfigurationError,
        r"training_step returned a float; it must return the loss tensor"),
    "training_step returns vector": Case(
        training_step_vector, MisconfigurationError,
        r"training_step returned a loss of shape \(4, 1\); the loss must be a single value\. Reduce it first"),
    "training_step returns detached loss": Case(
        training_step_detached, MisconfigurationError,
        r"training_step returned a loss that does not require grad.*do not detach it"),
    "training_step without batch_idx": Case(
        training_step_signature, MisconfigurationError,
        r"MissingBatchIdx\.training_step\(batch\) cannot be called as training_step\(batch, batch_idx\): too many "
        r"positional arguments\. Define it as training_step\(self, batch, batch_idx\)"),
    "validation_end returns list": Case(
        validation_end_list, MisconfigurationError,
        r"BadValidationEnd\.validation_end returned a list; it must return a dict of metrics"),
    "validation_epoch_end returns str": Case(
        validation_epoch_end_string, MisconfigurationError,
        r"BadValidationEpochEnd\.validation_epoch_end returned a str; it must return a dict of metrics"),
    "test_end returns float": Case(
        eval_end_float_for_test, MisconfigurationError,
        r"BadTestEnd\.test_end returned a float; it must return a dict"),
    "configure_optimizers returns None": Case(
        configure_optimizers_none, MisconfigurationError,
        r"configure_optimizers\(\) returned None, which hookrt cannot use\. Return an optimizer"),
    "configure_optimizers returns parameters": Case(
        configure_optimizers_parameters, MisconfigurationError,
        r"configure_optimizers\(\) returned a generator, which hookrt cannot use\. Return an optimizer"),
    "configure_optimizers returns str": Case(
        configure_optimizers_string, MisconfigurationError,
        r"configure_optimizers\(\) returned a str, which hookrt cannot use"),
    "configure_optimizers raises": Case(
        configure_optimizers_raises, MisconfigurationError,
        r"BadConfigureOptimizers\.configure_optimizers\(\) raised ValueError: optimizer got an empty parameter "
        r"list\. Fix it"),
    "optimizer without parameters": Case(
        optimizer_without_parameters, MisconfigurationError,
        r"Optimizer 0 \(SGD\) from configure_optimizers\(\) has no parameters\. Pass the module's parameters"),
    "scheduler without optimizer": Case(
        scheduler_without_optimizer, MisconfigurationError,
        r"configure_optimizers\(\) returned a dict \(item 0\) with no torch optimizer under 'optimizer'\. Use "
        r"\{'optimizer': optimizer, 'lr_scheduler': scheduler"),
    "scheduler alone": Case(
        scheduler_alone, MisconfigurationError,
        r"configure_optimizers\(\) returned a StepLR, which hookrt cannot use\. Return an optimizer"),
    "scheduler of another optimizer": Case(
        scheduler_of_other_optimizer, MisconfigurationError,
        r"Scheduler StepLR from configure_optimizers\(\) belongs to an optimizer that configure_optimizers\(\) "
        r"did not return\. Build the scheduler on one of the returned optimizers"),
    "scheduler dict without scheduler": Case(
        scheduler_dict_without_scheduler, MisconfigurationError,
        r"lr_scheduler dict without a 'scheduler' entry in item 0\. Put the scheduler object under 'scheduler'"),
    "scheduler interval batch": Case(
        scheduler_bad_interval, MisconfigurationError,
        r"lr_scheduler interval='batch' in item 0 is not valid\. Use 'epoch' or 'step'"),
    # data
    "train_dataloader returns Dataset": Case(
        train_dataloader_dataset, MisconfigurationError,
        r"DatasetHook\.train_dataloader\(\) gave a TensorDataset, which is a Dataset, not a loader of batches\. "
        r"Wrap it: DataLoader\(dataset, batch_size=\.\.\.\)"),
    "train_dataloaders dict": Case(
        train_dataloaders_dict, MisconfigurationError,
        r"train_dataloaders gave a dict, which is not an iterable of batches\. Return a torch\.utils\.data\."
        r"DataLoader"),
    "train_dataloaders str": Case(
        train_dataloaders_string, MisconfigurationError, r"train_dataloaders gave a str, which is not an iterable"),
    "no training data": Case(
        no_training_data, MisconfigurationError,
        r"No training data: pass train_dataloaders to fit\(\), or define Regressor\.train_dataloader\(\)"),
    "empty training loader": Case(
        empty_training_loader, MisconfigurationError,
        r"The training loader has no batches.*Check the dataset size, batch_size with drop_last=True"),
    "val_dataloaders holds Dataset": Case(
        val_dataloaders_dataset, MisconfigurationError,
        r"val_dataloaders \(item 1\) gave a TensorDataset, which is a Dataset, not a loader of batches\. Wrap it"),
    "val_dataloader hook raises": Case(
        val_dataloader_hook_raises, MisconfigurationError,
        r"MissingFile\.val_dataloader\(\) raised FileNotFoundError: val\.csv\. Fix the hook"),
    "val_dataloader returns dict": Case(
        val_dataloader_dict, MisconfigurationError,
        r"DictHook\.val_dataloader\(\) gave a dict, which is not an iterable of batches\. Return a torch\.utils\."
        r"data\.DataLoader \(or a list of them"),
    "test_dataloader returns Dataset": Case(
        dataset_from_test_dataloader, MisconfigurationError,
        r"DatasetHook\.test_dataloader\(\) gave a TensorDataset, which is a Dataset, not a loader of batches\. "
        r"Wrap it"),
    "predict_dataloader returns str": Case(
        predict_dataloader_string, MisconfigurationError,
        r"PathHook\.predict_dataloader\(\) gave a str, which is not an iterable of batches"),
    "test dataloaders str": Case(
        dataloaders_string_for_test, MisconfigurationError,
        r"dataloaders gave a str, which is not an iterable of batches\. Return a torch\.utils\.data\.DataLoader"),
    "nan loss with detect_anomaly": Case(
        nan_loss_detect_anomaly, MisconfigurationError,
        r"training_step returned a non-finite loss \(nan\) at epoch 0, batch 0, with detect_anomaly=True\. Check "
        r"the inputs and the learning rate"),
    "inf loss with detect_anomaly": Case(
        inf_loss_detect_anomaly, MisconfigurationError,
        r"training_step returned a non-finite loss \(inf\) at epoch 0, batch 0"),
    # monitored metrics: known to be missing only after the first validation run
    "EarlyStopping monitor never logged": Case(
        early_stopping_monitor_missing, MisconfigurationError,
        r"EarlyStopping\(monitor='val_acc'\) found no metric 'val_acc' after validation\. Metrics available: "
        r"'loss', 'train_loss', 'val_loss'\. Log it with self\.log\('val_acc', value\)", late=True),
    "ModelCheckpoint monitor never logged": Case(
        model_checkpoint_monitor_missing, MisconfigurationError,
        r"ModelCheckpoint\(monitor='val_acc'\) found no metric 'val_acc' after validation\. Metrics available: "
        r"'loss', 'train_loss', 'val_loss'\. Log it with self\.log\('val_acc', value\)", late=True),
    "ReduceLROnPlateau monitor never logged": Case(
        plateau_monitor_missing, MisconfigurationError,
        r"Scheduler ReduceLROnPlateau monitors 'val_acc', which was not logged\. Logged metrics: loss, train_loss, "
        r"val_loss\. Log it with self\.log\('val_acc', \.\.\.\)", late=True),
    # trainer flags
    "max_epochs negative": Case(
        trainer(max_epochs=-2), MisconfigurationError,
        r"Trainer\(max_epochs=-2\) is not valid: max_epochs must be None, -1 \(no limit\) or an int >= 0"),
    "accumulate_grad_batches zero": Case(
        trainer(accumulate_grad_batches=0), MisconfigurationError,
        r"Trainer\(accumulate_grad_batches=0\) is not valid: accumulate_grad_batches must be an int >= 1"),
    "val_check_interval above one": Case(
        trainer(val_check_interval=1.5), MisconfigurationError,
        r"Trainer\(val_check_interval=1\.5\) is not valid: val_check_interval must be a fraction in \(0\.0, 1\.0\]"),
    "limit_train_batches above one": Case(
        trainer(limit_train_batches=1.5), MisconfigurationError,
        r"Trainer\(limit_train_batches=1\.5\) is not valid: limit_train_batches must be a fraction between 0\.0 "
        r"and 1\.0 or a batch count"),
    "precision unknown": Case(
        trainer(precision="fp8"), MisconfigurationError,
        r"Trainer\(precision='fp8'\) is not valid: precision must be one of '32-true', 'bf16-mixed', '16-mixed'"),
    "gradient_clip_algorithm unknown": Case(
        trainer(gradient_clip_algorithm="max"), MisconfigurationError,
        r"Trainer\(gradient_clip_algorithm='max'\) is not valid: gradient_clip_algorithm must be 'norm' or 'value'"),
    "log_every_n_steps zero": Case(
        trainer(log_every_n_steps=0), MisconfigurationError,
        r"Trainer\(log_every_n_steps=0\) is not valid: log_every_n_steps must be an int >= 1"),
    "max_time text": Case(
        trainer(max_time="1h"), MisconfigurationError,
        r"Trainer\(max_time='1h'\) is not valid: max_time must be a 'DD:HH:MM:SS' string"),
    "accelerator unknown": Case(
        trainer(accelerator="tpu"), MisconfigurationError,
        r"Trainer\(accelerator='tpu'\) is not valid: accelerator must be one of 'auto', 'cpu'"),
    "default_root_dir number": Case(
        trainer(default_root_dir=123), MisconfigurationError,
        r"Trainer\(default_root_dir=123\) is not valid: default_root_dir must be None or a folder path"),
    "min_epochs above max_epochs": Case(
        trainer(min_epochs=5, max_epochs=2), MisconfigurationError,
        r"Trainer\(min_epochs=5, max_epochs=2\) conflict: min_epochs must not exceed max_epochs\. Raise "
        r"max_epochs or lower min_epochs"),
    "min_steps above max_steps": Case(
        trainer(min_steps=10, max_steps=5), MisconfigurationError,
        r"Trainer\(min_steps=10, max_steps=5\) conflict: min_steps must not exceed max_steps"),
    "val_check_interval longer than epoch": Case(
        val_check_interval_longer_than_epoch, MisconfigurationError,
        r"Trainer\(val_check_interval=10\) is larger than the 3 training batches of an epoch \(after "
        r"limit_train_batches\), so validation would never run\. Use a batch count of at most 3"),
    "ModelCheckpoint two schedules": Case(
        lambda path, counter: ModelCheckpoint(every_n_train_steps=5, every_n_epochs=2), MisconfigurationError,
        r"ModelCheckpoint\(every_n_train_steps=5, every_n_epochs=2\) sets two save schedules.*pass only one"),
    "ModelCheckpoint folder is a file": Case(
        checkpoint_folder_is_file, MisconfigurationError,
        r"ModelCheckpoint dirpath '.*run1' is not usable: '.*checkpoints' is a file, not a folder.*Pass a folder "
        r"path"),
    "SignalHandler folder is a file": Case(
        signal_folder_is_file, MisconfigurationError,
        r"SignalHandler dirpath '.*root' is not usable: '.*root' is a file, not a folder.*Pass a folder path"),
    "EarlyStopping mode unknown": Case(
        lambda path, counter: EarlyStopping("val_loss", mode="minimum"), MisconfigurationError,
        r"EarlyStopping\(mode='minimum'\) is invalid: the valid modes are 'min'.*and 'max'"),
    # plugins
    "unknown plugin name": Case(
        unknown_plugin_name, PluginError,
        r"No plugin named 'early_stoping' is installed\. Did you mean 'early_stopping'\? Run `hookrt plugins`"),
    "plugin of wrong type": Case(
        plugin_of_wrong_type, PluginError,
        r"plugins/callbacks item 1 is a int, not a hookrt\.Plugin or a plugin name\. Subclass hookrt\.Plugin"),
    "plugins not a list": Case(
        plugins_not_a_list, PluginError,
        r"Trainer\(plugins=3\.5\) is invalid: plugins must be a list of hookrt\.Plugin objects or names"),
    "handler of unknown event": Case(
        handler_of_unknown_event, PluginError,
        r"Plugin 'Typo' handler '.*Typo\.handle' subscribes to unknown event 'on_batch_ends'\. Did you mean "
        r"'on_batch_end'\?"),
    "handler without payload": Case(
        handler_without_payload, PluginError,
        r"Plugin 'NoPayload' handler '.*NoPayload\.handle\(\)' on 'on_batch_end' cannot be called with one "
        r"argument, the payload \(BatchEndPayload\).*Change the handler to take one argument"),
    "handler with unknown option": Case(
        handler_with_unknown_option, PluginError,
        r"Plugin 'Option' handler '.*Option\.handle' on 'on_batch_end' got unknown option\(s\) 'evry'\. Valid "
        r"options: after, before, every, once, order, when"),
    "handler on wrapper point": Case(
        handler_on_wrapper_point, PluginError,
        r"'batch_step' is a wrapper point: use @hookrt\.around\('batch_step'\) for it"),
    "plugins with same state_key": Case(
        plugins_with_same_state_key, PluginError,
        r"Plugin 'EarlyStopping' has state_key .* which the registered plugin .* already uses, so their "
        r"checkpoint states would collide\. Give the two instances different arguments"),
    # checkpoints
    "checkpoint missing": Case(
        checkpoint_missing, CheckpointLoadError,
        r"No checkpoint at '.*missing\.ckpt': it does not exist, and '.*' contains no \*\.ckpt files\. Check the "
        r"path"),
    "checkpoint truncated": Case(
        checkpoint_truncated, CheckpointLoadError,
        r"The checkpoint '.*truncated\.ckpt' is truncated or corrupt \(.*\), probably because a write was "
        r"interrupted\. Use an earlier checkpoint"),
    "checkpoint is plain state_dict": Case(
        checkpoint_plain_state_dict, CheckpointLoadError,
        r"'.*weights\.pt' was written by torch\.save but is not a hookrt checkpoint.*It looks like a plain "
        r"state_dict: load it with module\.load_state_dict"),
    "checkpoint not from torch": Case(
        checkpoint_not_from_torch, CheckpointLoadError,
        r"'.*notes\.ckpt' was not written by torch\.save \(it starts with b'epoch,lo'\), so it is not a hookrt "
        r"checkpoint\. Check the path"),
    "checkpoint of newer format": Case(
        checkpoint_newer_format, CheckpointLoadError,
        r"The checkpoint '.*newer\.ckpt' has format version 99 \(written by hookrt 9\.0\.0\), but this hookrt "
        r"reads format versions up to 1\. Upgrade hookrt to load it"),
    "checkpoint of other model": Case(
        checkpoint_other_model, CheckpointError,
        r"The saved state_dict does not fit Regressor: 1 shape mismatches: layer\.weight \(checkpoint \(1, 3\), "
        r"module \(1, 5\)\)\. The checkpoint was probably written for a different model"),
    "checkpoint of other optimizers": Case(
        checkpoint_other_optimizers, CheckpointError,
        r"Checkpoint .*good\.ckpt contains 1 optimizer state\(s\), but configure_optimizers\(\) returned 2\. Resume "
        r"with the same optimizer set-up"),
    "best checkpoint without checkpointing": Case(
        best_checkpoint_without_checkpointing, MisconfigurationError,
        r"trainer\.fit\(ckpt_path='best'\) found no best checkpoint: no ModelCheckpoint plugin has written one "
        r"yet\. Fit with checkpointing on first, or pass a file path"),
    "load_from_checkpoint of truncated file": Case(
        load_from_truncated_checkpoint, CheckpointLoadError,
        r"The checkpoint '.*truncated\.ckpt' is truncated or corrupt.*Use an earlier checkpoint"),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input(case: Case, tmp_path: Path) -> None:
    counter = StepCounter()
    torch.manual_seed(0)

    with pytest.raises(case.error, match=case.match) as caught:
        case.run(tmp_path, counter)

    message = str(caught.value)
    for text in INTERNAL_TEXT:
        assert text not in message
    if case.late:
        assert counter.steps > 0
    else:
        assert counter.steps == 0


def test_nan_loss_without_detect_anomaly_trains_on() -> None:
    # Without detect_anomaly the loss is not checked, because the check would synchronise with the device on
    # every batch. The NaN reaches the weights and training goes on. EarlyStopping(check_finite=True) or
    # detect_anomaly=True stop on it.
    counter = StepCounter()
    model = returning("training_step", lambda self: self(torch.ones(1, 3)).sum() * math.nan)

    trainer = fit(counter, model)

    assert counter.steps == 3
    assert trainer.global_step == 3
    assert torch.isnan(model.layer.weight).all()


def test_single_plugin_and_none_are_accepted(tmp_path: Path) -> None:
    counter = StepCounter()
    trainer = hookrt.Trainer(max_epochs=1, plugins=counter, callbacks=None, num_sanity_val_steps=0, **QUIET)

    trainer.fit(Regressor(), make_loader())

    assert counter.steps == 3
    named = hookrt.Trainer(plugins="lr_monitor", **QUIET)
    assert [type(plugin).__name__ for plugin in named.plugins].count("LearningRateMonitor") == 1


def test_empty_evaluation_loaders_warn() -> None:
    counter = StepCounter()
    empty = make_loader(0)

    with pytest.warns(HookrtWarning, match=r"val_dataloaders \(item 1\) gave a loader with no batches, so nothing "
                      r"runs over it\. Check the dataset size, and batch_size with drop_last=True"):
        trainer = fit(counter, val=[make_loader(1), empty])
    with pytest.warns(HookrtWarning, match=r"^dataloaders gave a loader with no batches"):
        results = trainer.test(Regressor(), empty)

    assert counter.steps == 3
    assert results == [{}]
