from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import hookrt
from hookrt.plugins.csv_logger import CSVLogger
from hookrt.plugins.lr_monitor import LearningRateMonitor


def scheduler_config(scheduler, interval="epoch", name=None):
    return types.SimpleNamespace(scheduler=scheduler, interval=interval, frequency=1, name=name)


def parameters(count=2):
    return [nn.Parameter(torch.zeros(1)) for _ in range(count)]


def test_names_for_groups_and_repeated_classes(make_trainer, run_fit):
    first_params = parameters()
    grouped = torch.optim.Adam([{"params": [first_params[0]]}, {"params": [first_params[1]], "lr": 0.5}], lr=0.01)
    second = torch.optim.Adam(parameters(1), lr=0.02)
    sgd = torch.optim.SGD(parameters(1), lr=0.3, momentum=0.9)
    trainer = make_trainer(max_epochs=1, optimizers=[grouped, second, sgd])
    trainer.register(CSVLogger())
    monitor = LearningRateMonitor(log_momentum=True)
    trainer.register(monitor)

    run_fit(trainer)

    assert monitor.last_values == {
        "lr-Adam/pg1": 0.01,
        "lr-Adam/pg2": 0.5,
        "lr-Adam-momentum/pg1": 0.9,
        "lr-Adam-momentum/pg2": 0.9,
        "lr-Adam-1": 0.02,
        "lr-Adam-1-momentum": 0.9,
        "lr-SGD": 0.3,
        "lr-SGD-momentum": 0.9,
    }


def test_step_interval_follows_log_every_n_steps(make_trainer, run_fit):
    optimizer = torch.optim.SGD(parameters(1), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    trainer = make_trainer(max_epochs=2, num_training_batches=4, log_every_n_steps=3, optimizers=[optimizer])
    trainer.lr_scheduler_configs = [scheduler_config(scheduler, interval="step")]
    trainer.register(CSVLogger())
    trainer.register(LearningRateMonitor(logging_interval="step"))

    def step_scheduler(trainer, batch_idx):
        scheduler.step()

    run_fit(trainer, batch_body=step_scheduler)

    lr_calls = [(metrics["lr-SGD"], step) for metrics, step in trainer.log_calls if "lr-SGD" in metrics]
    # Read at batch start, before the step: at global step s the scheduler has stepped s times.
    assert lr_calls == [(1.0, 0), (pytest.approx(1 / 4), 3), (pytest.approx(1 / 7), 6)]


def test_step_interval_with_two_optimizers_jumping_steps(make_trainer, run_fit):
    optimizers = [torch.optim.SGD(parameters(1), lr=0.1), torch.optim.SGD(parameters(1), lr=0.2)]
    trainer = make_trainer(max_epochs=1, num_training_batches=4, log_every_n_steps=3, optimizers=optimizers)
    trainer.register(CSVLogger())
    trainer.register(LearningRateMonitor(logging_interval="step"))

    run_fit(trainer)

    steps = [step for metrics, step in trainer.log_calls if "lr-SGD" in metrics]
    # At batch starts global_step is 0, 2, 4, 6. Step 2 is in the interval of 3 that step 0 opened;
    # 4 and 6 each open a new one, although neither is a multiple of 3.
    assert steps == [0, 4, 6]
    assert trainer.log_calls[0][0] == {"lr-SGD": 0.1, "lr-SGD-1": 0.2}


def test_epoch_interval(make_trainer, run_fit):
    optimizer = torch.optim.SGD(parameters(1), lr=0.5)
    trainer = make_trainer(max_epochs=3, num_training_batches=2, optimizers=[optimizer])
    trainer.register(CSVLogger())
    trainer.register(LearningRateMonitor(logging_interval="epoch"))

    run_fit(trainer)

    steps = [step for metrics, step in trainer.log_calls if "lr-SGD" in metrics]
    assert steps == [0, 2, 4]


def test_default_interval_follows_schedulers(make_trainer, run_fit):
    per_epoch = torch.optim.SGD(parameters(1), lr=0.1)
    per_step = torch.optim.Adam(parameters(1), lr=0.2)
    plain = torch.optim.RMSprop(parameters(1), lr=0.3)
    trainer = make_trainer(
        max_epochs=2, num_training_batches=2, log_every_n_steps=100, optimizers=[per_epoch, per_step, plain]
    )
    trainer.lr_scheduler_configs = [
        scheduler_config(torch.optim.lr_scheduler.StepLR(per_epoch, step_size=1), interval="epoch", name="warmup"),
        scheduler_config(torch.optim.lr_scheduler.StepLR(per_step, step_size=1), interval="step"),
    ]
    trainer.register(CSVLogger())
    trainer.register(LearningRateMonitor())

    run_fit(trainer)

    calls = [(sorted(metrics), step) for metrics, step in trainer.log_calls if "val_loss" not in metrics]
    # Epoch 0 start (step 0): the epoch-interval optimizer; first batch (step 0): the other two.
    # Epoch 1 start (step 6): the epoch-interval optimizer only, as step 6 is in the same interval of 100.
    assert calls == [(["warmup"], 0), (["lr-Adam", "lr-RMSprop"], 0), (["warmup"], 6)]


def test_lr_values_reach_logger(make_trainer, run_fit):
    import csv
    import os

    trainer = make_trainer(max_epochs=1, num_training_batches=4, log_every_n_steps=2)
    logger = CSVLogger()
    trainer.register(logger)
    trainer.register(LearningRateMonitor(logging_interval="step"))

    run_fit(trainer)

    with open(os.path.join(logger.log_dir, "metrics.csv"), newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["step"], row["lr-SGD"]) for row in rows] == [("0", "0.1"), ("2", "0.1"), ("4", "")]
    # The lr read at the start of step 2's batch shares a row with the loss logged after step 2.
    assert rows[1]["loss"] != ""


def test_without_loggers_warns(make_trainer, run_fit):
    trainer = make_trainer(max_epochs=1)
    trainer.register(LearningRateMonitor())

    with pytest.warns(hookrt.HookrtWarning, match="LearningRateMonitor has no logger to write to"):
        run_fit(trainer)


def test_momentum_missing_warns(make_trainer, run_fit):
    optimizer = torch.optim.Adagrad(parameters(1), lr=0.1)
    trainer = make_trainer(max_epochs=1, optimizers=[optimizer])
    trainer.register(CSVLogger())
    monitor = LearningRateMonitor(log_momentum=True)
    trainer.register(monitor)

    with pytest.warns(hookrt.HookrtWarning, match="found no momentum for optimizer Adagrad"):
        run_fit(trainer)

    assert monitor.last_values == {"lr-Adagrad": 0.1}


def test_invalid_interval_raises():
    with pytest.raises(hookrt.MisconfigurationError, match=r"logging_interval='batch'\) is invalid: use 'step'"):
        LearningRateMonitor(logging_interval="batch")
