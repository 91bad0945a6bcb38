from __future__ import annotations

import csv
import json
import os

import pytest

import hookrt
from hookrt.plugins.csv_logger import CSVLogger, MetricsTable


def read_csv(path: str) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def test_fit_writes_metrics_csv(make_trainer, run_fit, fit_helpers):
    trainer = make_trainer(max_epochs=2, num_training_batches=4, log_every_n_steps=2)
    logger = CSVLogger()
    trainer.register(logger)

    run_fit(trainer)

    path = os.path.join(trainer.default_root_dir, "csv_logs", "version_0", "metrics.csv")
    header, rows = read_csv(path)
    assert header == ["step", "epoch", "loss", "val_loss"]
    assert [row["step"] for row in rows] == ["2", "4", "6", "8"]
    assert [row["epoch"] for row in rows] == ["0", "0", "1", "1"]
    assert [float(row["loss"]) for row in rows] == [pytest.approx(fit_helpers.loss_at(s)) for s in (2, 4, 6, 8)]
    # val_loss is logged at the end of each epoch, at the same step as that epoch's last loss.
    assert [row["val_loss"] for row in rows][0::2] == ["", ""]
    assert [float(row["val_loss"]) for row in rows[1::2]] == [pytest.approx(2 / 5), pytest.approx(2 / 9)]


def test_new_metric_widens_header(tmp_path):
    table = MetricsTable(str(tmp_path / "metrics.csv"))
    table.append({"step": 1, "loss": 0.5})
    table.append({"step": 2, "loss": 0.25, "acc": 0.75})
    table.append({"step": 3, "acc": 0.5})

    header, rows = read_csv(table.path)
    assert header == ["step", "acc", "loss"]
    assert rows == [
        {"step": "1", "acc": "", "loss": "0.5"},
        {"step": "2", "acc": "0.75", "loss": "0.25"},
        {"step": "3", "acc": "0.5", "loss": ""},
    ]
    assert not os.path.exists(table.path + ".tmp")


def test_existing_file_is_continued(tmp_path):
    path = str(tmp_path / "metrics.csv")
    MetricsTable(path).append({"step": 1, "loss": 0.5})

    continued = MetricsTable(path)
    assert continued.columns == ["step", "loss"]
    continued.append({"step": 2, "loss": 0.25})

    header, rows = read_csv(path)
    assert header == ["step", "loss"]
    assert [row["step"] for row in rows] == ["1", "2"]


def test_hparams_json_written(make_trainer, run_fit):
    trainer = make_trainer(max_epochs=1)
    trainer.module.hparams["layers"] = (3, 1)
    trainer.module.hparams["path"] = object()
    logger = CSVLogger()
    trainer.register(logger)

    run_fit(trainer)

    with open(os.path.join(logger.log_dir, "hparams.json"), encoding="utf-8") as file:
        params = json.load(file)
    assert params["lr"] == 0.1
    assert params["hidden"] == 3
    assert params["activation"] == "relu"
    assert params["layers"] == [3, 1]
    assert params["path"].startswith("<object object at")


def test_namespace_hparams_written(make_trainer, run_fit):
    import argparse

    trainer = make_trainer(max_epochs=1)
    trainer.module.hparams = argparse.Namespace(batch_size=32, optimizer="adam")
    logger = CSVLogger()
    trainer.register(logger)

    run_fit(trainer)

    with open(os.path.join(logger.log_dir, "hparams.json"), encoding="utf-8") as file:
        assert json.load(file) == {"batch_size": 32, "optimizer": "adam"}


def test_duplicate_step_merged_into_one_row(make_trainer):
    trainer = make_trainer()
    logger = CSVLogger()
    trainer.register(logger)
    bus = trainer.bus
    bus.emit("setup", stage="fit")
    bus.emit("on_log", metrics={"loss": 1.0}, step=3)
    bus.emit("on_log", metrics={"acc": 0.5}, step=3)
    bus.emit("on_log", metrics={"loss": 0.5}, step=3)
    bus.emit("teardown", stage="fit")

    _, rows = read_csv(os.path.join(logger.log_dir, "metrics.csv"))
    assert rows == [{"step": "3", "acc": "0.5", "loss": "0.5"}]


def test_resumed_run_appends_to_same_file(make_trainer, run_fit):
    first = make_trainer(max_epochs=1)
    first_logger = CSVLogger()
    first.register(first_logger)
    run_fit(first)

    resumed = make_trainer(max_epochs=1)
    resumed_logger = CSVLogger()
    resumed.register(resumed_logger)
    resumed.bus.emit("setup", stage="fit")
    resumed_logger.load_state_dict(first_logger.state_dict())
    resumed.bus.emit("on_fit_start")
    resumed.bus.emit("on_log", metrics={"loss": 0.125, "lr": 0.01}, step=7)
    resumed.bus.emit("teardown", stage="fit")

    assert resumed_logger.log_dir == first_logger.log_dir
    header, rows = read_csv(os.path.join(resumed_logger.log_dir, "metrics.csv"))
    assert header == ["step", "epoch", "loss", "lr", "val_loss"]
    assert [row["step"] for row in rows] == ["2", "4", "7"]
    assert rows[-1]["lr"] == "0.01"
    assert rows[0]["lr"] == ""


def test_save_dir_and_version_arguments(make_trainer):
    trainer = make_trainer()
    save_dir = os.path.join(trainer.default_root_dir, "logs")
    logger = CSVLogger(save_dir=save_dir, name="run", version=3)
    trainer.register(logger)
    trainer.bus.emit("setup", stage="fit")
    trainer.bus.emit("on_log", metrics={"loss": 1.0}, step=1)
    trainer.bus.emit("teardown", stage="fit")

    assert logger.log_dir == os.path.join(save_dir, "run", "version_3")
    assert os.path.exists(os.path.join(save_dir, "run", "version_3", "metrics.csv"))
    assert logger.state_dict() == {"version": 3}


def test_next_version_skips_existing_folders(make_trainer):
    trainer = make_trainer()
    for folder in ("version_0", "version_4", "version_x", "other"):
        os.makedirs(os.path.join(trainer.default_root_dir, "csv_logs", folder))
    logger = CSVLogger()
    trainer.register(logger)
    trainer.bus.emit("setup", stage="fit")

    assert logger.version == 5
    assert not os.path.exists(logger.log_dir)


def test_version_not_in_state_before_picked():
    assert CSVLogger().state_dict() == {}


def test_non_zero_rank_writes_nothing(make_trainer, run_fit):
    trainer = make_trainer(max_epochs=1, is_global_zero=False)
    logger = CSVLogger()
    trainer.register(logger)

    run_fit(trainer)

    assert not os.path.exists(os.path.join(trainer.default_root_dir, "csv_logs"))


def test_invalid_name_raises():
    with pytest.raises(hookrt.MisconfigurationError, match=r"CSVLogger\(name=''\) is invalid"):
        CSVLogger(name="")


def test_version_picked_before_run_not_kept(make_trainer, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    os.makedirs(elsewhere / "csv_logs" / "version_0")
    monkeypatch.chdir(elsewhere)
    logger = CSVLogger()
    assert logger.version == 1

    trainer = make_trainer()
    trainer.register(logger)
    trainer.bus.emit("setup", stage="fit")

    assert logger.version == 0
    assert logger.log_dir == os.path.join(trainer.default_root_dir, "csv_logs", "version_0")
