from __future__ import annotations

import argparse
import io
import logging
import os
from typing import Any

import pytest

import hookrt
from hookrt.plugins.csv_logger import CSVLogger
from hookrt.plugins.logger import Logger, NullExperiment, log_through_trainer, module_hyperparameters
from hookrt.plugins.progress import ProgressBar


class RecordingLogger(Logger):
    """A logger that keeps what it is asked to write."""

    def __init__(self, name: str = "recorded") -> None:
        super().__init__(None, name)
        self.metrics: list[tuple[dict[str, float], int]] = []
        self.params: list[dict[str, Any]] = []
        self.statuses: list[str] = []

    @property
    def experiment(self) -> Any:
        return self

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((dict(metrics), step))

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        self.params.append(dict(params))

    def finalize(self, status: str) -> None:
        self.statuses.append(status)


class BrokenLogger(RecordingLogger):
    """A logger whose every write raises."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise OSError("disk full")

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        raise OSError("disk full")


def test_steps_merged_and_written_in_order(make_trainer, run_fit, fit_helpers):
    trainer = make_trainer(max_epochs=1, num_training_batches=4, log_every_n_steps=2)
    logger = RecordingLogger()
    trainer.register(logger)

    run_fit(trainer)

    assert logger.params == [{"lr": 0.1, "hidden": 3, "activation": "relu"}]
    assert [step for _, step in logger.metrics] == [2, 4]
    assert logger.metrics[1] == ({"loss": fit_helpers.loss_at(4), "epoch": 0.0, "val_loss": 2 / 5}, 4)
    assert logger.statuses == ["success"]


def test_failed_run_finalizes_once_as_failed(make_trainer, run_fit):
    trainer = make_trainer(max_epochs=1)
    logger = RecordingLogger()
    trainer.register(logger)

    with pytest.raises(RuntimeError, match="fake failure"):
        run_fit(trainer, fail_at=(0, 2))

    assert logger.statuses == ["failed"]
    assert [step for _, step in logger.metrics] == [2]


def test_keyboard_interrupt_finalizes_as_interrupted(make_trainer):
    trainer = make_trainer()
    logger = RecordingLogger()
    trainer.register(logger)
    trainer.bus.emit("setup", stage="fit")
    trainer.bus.emit("on_exception", exception=KeyboardInterrupt())
    trainer.bus.emit("teardown", stage="fit")

    assert logger.statuses == ["interrupted"]


def test_module_without_hparams_logs_none(make_trainer, run_fit):
    trainer = make_trainer(max_epochs=1)
    trainer.module.hparams = {}
    logger = RecordingLogger()
    trainer.register(logger)

    run_fit(trainer)

    assert logger.params == []


def test_broken_logger_disabled_after_one_error(make_trainer, run_fit, caplog):
    trainer = make_trainer(max_epochs=2)
    broken = BrokenLogger()
    healthy = CSVLogger()
    stream = io.StringIO()
    trainer.register(broken, healthy, ProgressBar(file=stream))

    with caplog.at_level(logging.ERROR, logger="hookrt"):
        run_fit(trainer)

    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "BrokenLogger" in errors[0].getMessage()
    assert "disabled for the rest of the run" in errors[0].getMessage()
    assert errors[0].exc_info is not None
    assert trainer.bus.is_disabled(broken)
    assert os.path.exists(os.path.join(healthy.log_dir, "metrics.csv"))
    assert stream.getvalue().count("\n") == 2


def test_log_through_trainer_uses_log_metrics(make_trainer):
    trainer = make_trainer()
    log_through_trainer(trainer, {"a": 1}, 3)

    assert trainer.log_calls == [({"a": 1.0}, 3)]


def test_log_through_trainer_without_log_metrics_emits():
    class Bare:
        pass

    trainer = Bare()
    trainer.bus = hookrt.Bus(trainer=trainer)
    received: list[tuple[dict[str, float], int]] = []
    trainer.bus.subscribe("on_log", lambda payload: received.append((payload.metrics, payload.step)))

    log_through_trainer(trainer, {"a": 2}, 5)
    log_through_trainer(trainer, {}, 6)

    assert received == [({"a": 2.0}, 5)]


def test_module_hyperparameters_forms():
    class WithDict:
        hparams = {"a": 1}

    class WithNamespace:
        hparams = argparse.Namespace(b=2)

    class WithNothing:
        pass

    assert module_hyperparameters(WithDict()) == {"a": 1}
    assert module_hyperparameters(WithNamespace()) == {"b": 2}
    assert module_hyperparameters(WithNothing()) == {}


def test_null_experiment_accepts_any_call():
    experiment = NullExperiment()

    assert experiment.add_image("tag", object(), global_step=3) is None
    assert not experiment


def test_save_dir_before_run_is_working_directory():
    logger = RecordingLogger()

    assert logger.save_dir == os.getcwd()
    assert logger.experiment_name == "recorded"
    assert logger.name == "RecordingLogger"
