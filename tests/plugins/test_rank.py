from __future__ import annotations

import warnings

import pytest

import hookrt
from hookrt._rank import global_rank, rank_zero_only, rank_zero_warn


@pytest.fixture
def no_rank_variables(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_global_rank_defaults_to_zero(no_rank_variables):
    assert global_rank() == 0


def test_global_rank_from_rank_variable(no_rank_variables, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")

    assert global_rank() == 3


def test_global_rank_from_local_rank_alone(no_rank_variables, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")

    assert global_rank() == 2


def test_global_rank_ignores_non_numbers(no_rank_variables, monkeypatch):
    monkeypatch.setenv("RANK", "")
    monkeypatch.setenv("LOCAL_RANK", "1")

    assert global_rank() == 1


def test_rank_zero_only_runs_on_rank_zero(no_rank_variables, monkeypatch):
    calls = []

    @rank_zero_only
    def record(value: int) -> int:
        calls.append(value)
        return value * 2

    assert record(4) == 8
    monkeypatch.setenv("RANK", "1")
    assert record(5) is None
    assert calls == [4]
    assert record.__name__ == "record"


def test_rank_zero_warn_once(no_rank_variables):
    with pytest.warns(hookrt.HookrtWarning, match="check the input") as record:
        for _ in range(3):
            rank_zero_warn("check the input", stacklevel=1)

    assert len(record) == 1
    assert record[0].filename == __file__


def test_rank_zero_warn_category_is_part_of_key(no_rank_variables):
    with pytest.warns(hookrt.HookrtWarning, match="same text"):
        rank_zero_warn("same text")
    with pytest.warns(RuntimeWarning, match="same text"):
        rank_zero_warn("same text", category=RuntimeWarning)


def test_rank_zero_warn_silent_on_other_ranks(no_rank_variables, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rank_zero_warn("never shown")
