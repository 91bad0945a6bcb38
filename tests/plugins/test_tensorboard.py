from __future__ import annotations

import glob
import os
from collections import Counter

import pytest
import torch
from event_files import read_events, read_events_of_file
from tensorboardX.proto.api_pb2 import Status
from tensorboardX.proto.event_pb2 import SessionLog
from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

import hookrt
from hookrt.plugins.tensorboard import TensorBoardLogger


def scalars(log_dir: str) -> list[tuple[str, int, float]]:
    """Return (tag, step, value) of every scalar in the run folder, in write order."""
    return [
        (value.tag, event.step, value.simple_value)
        for event in read_events(log_dir)
        for value in event.summary.value
        if value.HasField("simple_value")
    ]


def hparams_records(log_dir: str) -> list[HParamsPluginData]:
    return [
        HParamsPluginData.FromString(value.metadata.plugin_data.content)
        for event in read_events(log_dir)
        for value in event.summary.value
        if value.metadata.plugin_data.plugin_name == "hparams"
    ]


def test_fit_writes_scalars(make_trainer, run_fit, fit_helpers):
    trainer = make_trainer(max_epochs=2, num_training_batches=4, log_every_n_steps=2)
    logger = TensorBoardLogger()
    trainer.register(logger)

    run_fit(trainer)

    assert logger.log_dir == os.path.join(trainer.default_root_dir, "hookrt_logs", "version_0")
    written = scalars(logger.log_dir)
    loss = [(step, value) for tag, step, value in written if tag == "loss"]
    assert loss == [(step, pytest.approx(fit_helpers.loss_at(step))) for step in (2, 4, 6, 8)]
    val_loss = [(step, value) for tag, step, value in written if tag == "val_loss"]
    assert val_loss == [(4, pytest.approx(2 / 5)), (8, pytest.approx(2 / 9))]
    epochs = [(step, value) for tag, step, value in written if tag == "epoch"]
    assert epochs == [(2, 0.0), (4, 0.0), (6, 1.0), (8, 1.0)]


def test_duplicate_tag_step_written_once(make_trainer):
    trainer = make_trainer()
    logger = TensorBoardLogger()
    trainer.register(logger)
    bus = trainer.bus
    bus.emit("setup", stage="fit")
    bus.emit("on_fit_start")
    # Gradient accumulation and several log calls: the same (tag, step) arrives three times.
    bus.emit("on_log", metrics={"loss": 1.0}, step=1)
    bus.emit("on_log", metrics={"loss": 0.5, "acc": 0.25}, step=1)
    bus.emit("on_log", metrics={"loss": 0.75}, step=1)
    bus.emit("on_log", metrics={"loss": 0.5}, step=2)
    bus.emit("teardown", stage="fit")

    written = scalars(logger.log_dir)
    counts = Counter((tag, step) for tag, step, _ in written)
    assert set(counts.values()) == {1}
    assert sorted(written) == [("acc", 1, 0.25), ("loss", 1, 0.75), ("loss", 2, 0.5)]


def test_step_going_back_is_dropped_with_warning(make_trainer):
    trainer = make_trainer()
    logger = TensorBoardLogger()
    trainer.register(logger)
    bus = trainer.bus
    bus.emit("setup", stage="fit")
    bus.emit("on_log", metrics={"loss": 1.0, "acc": 0.5}, step=5)
    bus.emit("on_log", metrics={"loss": 2.0}, step=3)
    with pytest.warns(hookrt.HookrtWarning) as record:
        bus.emit("on_log", metrics={"loss": 3.0, "acc": 0.75}, step=5)
        bus.emit("teardown", stage="fit")

    # One warning per metric: the second drop of 'loss' (step 5 again) is not reported.
    messages = [str(warning.message) for warning in record]
    assert len(messages) == 2
    assert messages[0].startswith(
        "TensorBoardLogger dropped metric 'loss' at step 3 because it already wrote that metric at step 5. "
    )
    assert messages[1].startswith(
        "TensorBoardLogger dropped metric 'acc' at step 5 because it already wrote that metric at step 5. "
    )
    assert sorted(scalars(logger.log_dir)) == [("acc", 5, 0.5), ("loss", 5, 1.0)]


def test_hyperparameters_written_as_session_start(make_trainer, run_fit):
    trainer = make_trainer(max_epochs=1)
    trainer.module.hparams["layers"] = [3, 1]
    trainer.module.hparams["scale"] = torch.tensor(0.5)
    trainer.module.hparams["missing"] = None
    logger = TensorBoardLogger()
    trainer.register(logger)

    run_fit(trainer)

    records = hparams_records(logger.log_dir)
    start = [record.session_start_info for record in records if record.HasField("session_start_info")]
    assert len(start) == 1
    params = start[0].hparams
    assert params["lr"].number_value == pytest.approx(0.1)
    assert params["hidden"].number_value == 3
    assert params["activation"].string_value == "relu"
    assert params["layers"].string_value == "[3, 1]"
    assert params["scale"].number_value == pytest.approx(0.5)
    assert "missing" not in params
    end = [record.session_end_info for record in records if record.HasField("session_end_info")]
    assert [info.status for info in end] == [Status.Value("STATUS_SUCCESS")]


def test_failed_fit_marks_session_failed(make_trainer, run_fit):
    trainer = make_trainer(max_epochs=1)
    logger = TensorBoardLogger()
    trainer.register(logger)

    with pytest.raises(RuntimeError, match="fake failure in epoch 0, batch 3"):
        run_fit(trainer, fail_at=(0, 3))

    records = hparams_records(logger.log_dir)
    end = [record.session_end_info for record in records if record.HasField("session_end_info")]
    assert [info.status for info in end] == [Status.Value("STATUS_FAILURE")]
    # The loss of step 2 was buffered when the batch failed; closing the run wrote it.
    assert ("loss", 2, pytest.approx(1 / 3)) in scalars(logger.log_dir)


def test_new_run_takes_next_version(make_trainer, run_fit):
    first = make_trainer(max_epochs=1)
    first_logger = TensorBoardLogger()
    first.register(first_logger)
    run_fit(first)
    second = make_trainer(max_epochs=1)
    second_logger = TensorBoardLogger()
    second.register(second_logger)
    run_fit(second)

    assert first_logger.version == 0
    assert second_logger.version == 1
    assert os.path.isdir(second_logger.log_dir)


def resume_and_log(make_trainer, run_fit) -> tuple[TensorBoardLogger, TensorBoardLogger, dict]:
    """Fit once, then resume the same version at global step 4 and log ``loss`` at step 5.

    Returns the first run's logger, the resumed run's logger and the state the resumed one loaded.
    """
    first = make_trainer(max_epochs=1)
    first_logger = TensorBoardLogger()
    first.register(first_logger)
    run_fit(first)
    saved = first_logger.state_dict()
    resumed = make_trainer(max_epochs=1)
    resumed_logger = TensorBoardLogger()
    resumed.register(resumed_logger)
    resumed.bus.emit("setup", stage="fit")
    resumed_logger.load_state_dict(saved)
    resumed.global_step = 4
    resumed.bus.emit("on_fit_start")
    resumed.bus.emit("on_log", metrics={"loss": 0.125}, step=5)
    resumed.bus.emit("teardown", stage="fit")
    return first_logger, resumed_logger, saved


def test_resumed_run_continues_version(make_trainer, run_fit):
    first_logger, resumed_logger, saved = resume_and_log(make_trainer, run_fit)

    assert saved == {"version": 0}
    assert resumed_logger.version == 0
    assert resumed_logger.log_dir == first_logger.log_dir
    assert ("loss", 5, 0.125) in scalars(resumed_logger.log_dir)
    # tensorboardX marks the purge as a file-version event at the purge step; the first event of every file has step 0.
    purge_steps = [event.step for event in read_events(resumed_logger.log_dir) if event.file_version and event.step]
    assert purge_steps == [5]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "queue"])
def test_purge_marker_precedes_resumed_scalars(make_trainer, run_fit, monkeypatch, direct):
    if not direct:
        # The fallback for a tensorboardX whose writer has another layout: every event goes through its queue.
        monkeypatch.setattr("hookrt.plugins.tensorboard._synchronous_events", lambda writer: None)
    _, logger, _ = resume_and_log(make_trainer, run_fit)
    newest = sorted(glob.glob(os.path.join(logger.log_dir, "events.out.tfevents.*")), key=os.path.getmtime)[-1]
    events = read_events_of_file(newest)
    starts = [index for index, event in enumerate(events) if event.session_log.status == SessionLog.START]
    resumed = [index for index, event in enumerate(events) if any(v.tag == "loss" for v in event.summary.value)]

    assert [events[index].step for index in starts] == [5]
    assert [events[index].step for index in resumed] == [5]
    assert starts[0] < resumed[0]


def test_explicit_version_wins_over_restored(make_trainer):
    trainer = make_trainer()
    logger = TensorBoardLogger(version=7)
    trainer.register(logger)
    logger.load_state_dict({"version": 2})

    assert logger.version == 7


def test_experiment_is_summary_writer(make_trainer):
    from tensorboardX import SummaryWriter

    trainer = make_trainer()
    logger = TensorBoardLogger(save_dir=os.path.join(trainer.default_root_dir, "elsewhere"), name="images")
    trainer.register(logger)
    trainer.bus.emit("setup", stage="fit")
    logger.experiment.add_text("note", "hello", global_step=3)
    trainer.bus.emit("teardown", stage="fit")

    assert isinstance(logger.experiment, SummaryWriter)
    assert logger.log_dir == os.path.join(trainer.default_root_dir, "elsewhere", "images", "version_0")
    texts = [value.tag for event in read_events(logger.log_dir) for value in event.summary.value]
    assert "note/text_summary" in texts


def test_non_zero_rank_writes_nothing(make_trainer, run_fit):
    trainer = make_trainer(max_epochs=1, is_global_zero=False)
    logger = TensorBoardLogger()
    trainer.register(logger)

    run_fit(trainer)
    logger.experiment.add_image("ignored", torch.zeros(3, 2, 2))

    assert not os.path.exists(os.path.join(trainer.default_root_dir, "hookrt_logs"))
    assert not logger.experiment


def test_two_loggers_side_by_side(make_trainer, run_fit):
    trainer = make_trainer(max_epochs=1)
    first = TensorBoardLogger(name="a")
    second = TensorBoardLogger(name="b")
    trainer.register(first, second)

    run_fit(trainer)

    assert first.state_key != second.state_key
    assert scalars(first.log_dir) == scalars(second.log_dir)
    assert scalars(first.log_dir)


def test_log_graph_without_example_input_warns(make_trainer, run_fit):
    trainer = make_trainer(max_epochs=1)
    trainer.register(TensorBoardLogger(log_graph=True))

    with pytest.warns(hookrt.HookrtWarning, match="module has no example_input_array"):
        run_fit(trainer)


def test_log_graph_without_tensorboard_warns(make_trainer, run_fit):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("the tensorboard package is installed, so the graph can be drawn")
    trainer = make_trainer(max_epochs=1)
    trainer.module.example_input_array = torch.zeros(1, 2)
    trainer.register(TensorBoardLogger(log_graph=True))

    with pytest.warns(hookrt.HookrtWarning, match="'tensorboard' package is not installed"):
        run_fit(trainer)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"name": ""}, r"name=''\) is invalid: name must be a non-empty string"),
        ({"version": -1}, r"version=-1\) is invalid: version must be a non-negative int"),
        ({"version": True}, r"version=True\) is invalid"),
        ({"flush_secs": 0}, r"flush_secs=0\) is invalid: flush_secs must be a positive number"),
    ],
)
def test_invalid_arguments_raise(arguments, message):
    with pytest.raises(hookrt.MisconfigurationError, match=message):
        TensorBoardLogger(**arguments)


def test_reopened_writer_keeps_earlier_file(make_trainer):
    # Both writers are created within the same second: the second must not overwrite the first's file.
    trainer = make_trainer()
    logger = TensorBoardLogger(version=0)
    trainer.register(logger)
    for step in (1, 2):
        trainer.bus.emit("setup", stage="fit")
        trainer.bus.emit("on_log", metrics={"loss": float(step)}, step=step)
        trainer.bus.emit("teardown", stage="fit")

    assert scalars(logger.log_dir) == [("loss", 1, 1.0), ("loss", 2, 2.0)]
    assert len(glob.glob(os.path.join(logger.log_dir, "events.out.tfevents.*"))) == 2


def test_event_records_checksummed_by_compiled_crc32c():
    # The crc32c package is a dependency because tensorboardX falls back to a byte loop in Python without it.
    import crc32c
    from tensorboardX import crc32c as tensorboardx_crc

    assert tensorboardx_crc.crc32c is crc32c.crc32c
