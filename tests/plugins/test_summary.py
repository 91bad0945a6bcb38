from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import hookrt
from hookrt.plugins.summary import LayerRow, ModelSummary


def small_network() -> nn.Sequential:
    network = nn.Sequential(
        nn.Linear(4, 8),
        nn.ReLU(),
        nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)),
        nn.Linear(8, 2),
    )
    network[3].requires_grad_(False)
    return network


def test_table_at_depth_one():
    summary = ModelSummary(max_depth=1)
    summary.summarize(small_network())

    assert summary.table == [
        LayerRow("0", "Linear", 40),
        LayerRow("1", "ReLU", 0),
        LayerRow("2", "Sequential", 72 + 16),
        LayerRow("3", "Linear", 18),
    ]
    assert summary.trainable_parameters == 40 + 72 + 16
    assert summary.non_trainable_parameters == 18
    assert summary.total_parameters == 40 + 72 + 16 + 18
    assert summary.size_mb == pytest.approx((40 + 72 + 16 + 18) * 4 / 1e6)


def test_table_every_level():
    summary = ModelSummary(max_depth=-1)
    summary.summarize(small_network())

    assert [row.name for row in summary.table] == ["0", "1", "2", "2.0", "2.1", "3"]
    assert summary.table[4] == LayerRow("2.1", "BatchNorm1d", 16)


def test_depth_zero_lists_totals_only():
    summary = ModelSummary(max_depth=0)
    text = summary.summarize(small_network())

    assert summary.table == []
    assert text.splitlines() == [
        "128 trainable parameters",
        "18 non-trainable parameters",
        "146 total parameters",
        "0.001 MB of parameters",
    ]


def test_size_follows_dtype():
    summary = ModelSummary()
    summary.summarize(nn.Linear(10, 10).to(torch.float16))

    assert summary.total_parameters == 110
    assert summary.size_mb == pytest.approx(110 * 2 / 1e6)


def test_shared_parameter_counted_once_in_totals():
    shared = nn.Linear(3, 3)
    summary = ModelSummary()
    summary.summarize(nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)}))

    assert summary.total_parameters == 12
    assert [row.parameters for row in summary.table] == [12, 12]


def test_lazy_parameters_counted_as_zero():
    summary = ModelSummary()
    text = summary.summarize(nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 1)))

    assert summary.total_parameters == 4
    assert summary.has_uninitialized_parameters
    assert "uninitialized lazy parameters" in text


def test_logged_at_fit_start(make_trainer, run_fit, caplog):
    trainer = make_trainer(max_epochs=1)
    summary = ModelSummary()
    trainer.register(summary)

    with caplog.at_level(logging.INFO, logger="hookrt.plugins.summary"):
        run_fit(trainer)

    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    lines = messages[0].splitlines()
    assert lines[0] == "Model summary of TinyModule:"
    assert lines[1].split() == ["name", "type", "params"]
    assert lines[3].split() == ["0", "layer", "Linear", "9"]
    assert lines[4].split() == ["1", "head", "Linear", "4"]
    assert "13 total parameters" in lines
    assert summary.total_parameters == 13


def test_thousands_separated():
    summary = ModelSummary()
    text = summary.summarize(nn.Linear(100, 100))

    assert "10,100 total parameters" in text


def test_non_zero_rank_logs_nothing(make_trainer, run_fit, caplog):
    trainer = make_trainer(max_epochs=1, is_global_zero=False)
    summary = ModelSummary()
    trainer.register(summary)

    with caplog.at_level(logging.INFO, logger="hookrt.plugins.summary"):
        run_fit(trainer)

    assert caplog.records == []
    assert summary.table == []


@pytest.mark.parametrize("depth", [-2, 1.0, True])
def test_invalid_max_depth_raises(depth):
    with pytest.raises(hookrt.MisconfigurationError, match=r"max_depth must be an int"):
        ModelSummary(max_depth=depth)
