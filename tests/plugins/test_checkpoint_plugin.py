"""ModelCheckpoint with the real Trainer: when it saves, which files stay, names, resume and state."""

from __future__ import annotations

import errno
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt
from hookrt import CheckpointError, HookrtWarning, MisconfigurationError
from hookrt._rank import reset_warning_cache
from hookrt.plugins.checkpoint import ModelCheckpoint
from hookrt.plugins.early_stopping import EarlyStopping
from hookrt.plugins.signals import SignalHandler

NAN = math.nan
INF = math.inf
QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}


@pytest.fixture(autouse=True)
def _fresh_warning_cache():
    """Let each test see the warnings that are given once per process."""
    reset_warning_cache()


def make_loader(samples: int, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 2, generator=generator)
    y = torch.randn(samples, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=2)


class ScriptedModule(hookrt.LightningModule):
    """A linear regressor that logs ``scores[current_epoch]`` as ``metric`` after each validation run.

    Two training batches per epoch (with `make_loader(4)`), so each epoch adds two global steps.
    After the last score, the last one repeats (``trainer.validate`` after fit is one epoch further).
    """

    def __init__(self, scores=None, metric="val_score", train_metric=None, validate=True):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(2, 1)
        self.scores = scores
        self.metric = metric
        self.train_metric = train_metric

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.layer(x), y)
        if self.train_metric is not None:
            self.log(self.train_metric, self.score(), on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.layer(x), y)

    def on_validation_epoch_end(self):
        if self.scores is not None and self.train_metric is None:
            self.log(self.metric, self.score())

    def score(self):
        return float(self.scores[min(self.current_epoch, len(self.scores) - 1)])

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.mse_loss(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TrainOnlyModule(ScriptedModule):
    """The same regressor with no validation_step, so fit never validates."""

    validation_step = None  # type: ignore[assignment]


def fit(tmp_path, plugins, module, max_epochs, ckpt_path=None, val=True, **flags):
    trainer = hookrt.Trainer(max_epochs=max_epochs, plugins=plugins, default_root_dir=tmp_path, **QUIET, **flags)
    trainer.fit(module, make_loader(4), make_loader(2) if val else None, ckpt_path=ckpt_path)
    return trainer


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def names(paths) -> list[str]:
    return sorted(os.path.basename(path) for path in paths)


# ---------------------------------------------------------------------- top k


def test_top_k_non_finite_and_ties(tmp_path):
    # k=2, mode min. NaN, inf and -inf never enter. 0.5 at epoch 4 ties the worst kept file (epoch 0),
    # so it does not displace it. 0.4 displaces epoch 0. 0.3 at epoch 7 displaces 0.4 and ties epoch 2 for best.
    scores = [0.5, NAN, 0.3, INF, 0.5, 0.4, -INF, 0.3]
    checkpoint = ModelCheckpoint(monitor="val_score", save_top_k=2)
    fit(tmp_path, [checkpoint], ScriptedModule(scores), max_epochs=len(scores))

    assert names(checkpoint.best_k_models) == ["epoch=2-step=6.ckpt", "epoch=7-step=16.ckpt"]
    assert listing(checkpoint.dirpath) == ["epoch=2-step=6.ckpt", "epoch=7-step=16.ckpt"]
    assert os.path.basename(checkpoint.best_model_path) == "epoch=2-step=6.ckpt"
    assert checkpoint.best_model_score == pytest.approx(0.3)
    assert all(math.isfinite(float(score)) for score in checkpoint.best_k_models.values())


def test_top_k_mode_max_ties(tmp_path):
    checkpoint = ModelCheckpoint(monitor="val_score", mode="max", save_top_k=1)
    fit(tmp_path, [checkpoint], ScriptedModule([1.0, 2.0, 2.0, NAN, 1.5]), max_epochs=5)

    assert listing(checkpoint.dirpath) == ["epoch=1-step=4.ckpt"]
    assert os.path.basename(checkpoint.best_model_path) == "epoch=1-step=4.ckpt"
    assert checkpoint.best_model_score == pytest.approx(2.0)


def test_non_finite_first_scores_leave_no_best(tmp_path):
    checkpoint = ModelCheckpoint(monitor="val_score", save_top_k=3)
    fit(tmp_path, [checkpoint], ScriptedModule([NAN, INF]), max_epochs=2)

    assert checkpoint.best_k_models == {}
    assert checkpoint.best_model_path == ""
    assert checkpoint.best_model_score is None
    assert listing(checkpoint.dirpath) == []


def test_save_top_k_all_finite(tmp_path):
    checkpoint = ModelCheckpoint(monitor="val_score", save_top_k=-1)
    fit(tmp_path, [checkpoint], ScriptedModule([0.3, 0.9, NAN, 0.1]), max_epochs=4)

    assert listing(checkpoint.dirpath) == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "epoch=3-step=8.ckpt"]
    assert os.path.basename(checkpoint.best_model_path) == "epoch=3-step=8.ckpt"


def test_save_top_k_zero_writes_only_last(tmp_path):
    checkpoint = ModelCheckpoint(monitor="val_score", save_top_k=0, save_last=True)
    fit(tmp_path, [checkpoint], ScriptedModule([0.3, 0.2]), max_epochs=2)

    assert listing(checkpoint.dirpath) == ["last.ckpt"]
    assert checkpoint.best_k_models == {}
    assert checkpoint.best_model_path == ""
    assert checkpoint.last_model_path == os.path.join(checkpoint.dirpath, "last.ckpt")


def test_save_top_k_zero_without_last_writes_nothing(tmp_path):
    checkpoint = ModelCheckpoint(save_top_k=0)
    fit(tmp_path, [checkpoint], ScriptedModule(), max_epochs=2)

    assert listing(tmp_path / "checkpoints") == []


def test_no_monitor_keeps_latest_files(tmp_path):
    checkpoint = ModelCheckpoint(save_top_k=2)
    fit(tmp_path, [checkpoint], ScriptedModule(), max_epochs=4)

    assert checkpoint.dirpath == os.path.join(str(tmp_path), "checkpoints")
    assert listing(checkpoint.dirpath) == ["epoch=2-step=6.ckpt", "epoch=3-step=8.ckpt"]
    assert os.path.basename(checkpoint.best_model_path) == "epoch=3-step=8.ckpt"
    assert checkpoint.best_model_score is None
    assert [float(score) for score in checkpoint.best_k_models.values()] == [6.0, 8.0]


class SignalAtEpochOne(hookrt.Plugin):
    """Sends this process SIGTERM during the first batch of epoch 1, as a job scheduler would."""

    @hookrt.on("on_batch_start")
    def send(self, payload):
        if payload.trainer.current_epoch == 1 and payload.batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def test_signal_resume_leaves_no_stale_file(tmp_path):
    handler = SignalHandler(dirpath=tmp_path)
    checkpoint = ModelCheckpoint()
    fit(tmp_path, [checkpoint, handler, SignalAtEpochOne()], ScriptedModule(), max_epochs=3)
    # The stop leaves epoch 1 open, and the signal checkpoint is where the next run resumes it.
    assert listing(checkpoint.dirpath) == ["epoch=0-step=2.ckpt"]

    resumed = ModelCheckpoint()
    fit(tmp_path, [resumed], ScriptedModule(), max_epochs=3, ckpt_path=handler.checkpoint_path)

    assert listing(resumed.dirpath) == ["epoch=2-step=6.ckpt"]


def test_no_monitor_keep_all(tmp_path):
    checkpoint = ModelCheckpoint(save_top_k=-1)
    fit(tmp_path, [checkpoint], ScriptedModule(), max_epochs=3)

    assert listing(checkpoint.dirpath) == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "epoch=2-step=6.ckpt"]


# ---------------------------------------------------------------------- file names


def test_filename_template_with_metric_format(tmp_path):
    checkpoint = ModelCheckpoint(monitor="val_score", filename="{epoch}-{step}-{val_score:.2f}", save_top_k=-1)
    fit(tmp_path, [checkpoint], ScriptedModule([0.5, 0.125]), max_epochs=2)

    assert listing(checkpoint.dirpath) == ["0-2-0.50.ckpt", "1-4-0.12.ckpt"]


def test_filename_metric_name_with_slash(tmp_path):
    checkpoint = ModelCheckpoint(monitor="val/score", filename="score={val/score:.3f}.ckpt", dirpath=tmp_path / "c")
    fit(tmp_path, [checkpoint], ScriptedModule([0.25], metric="val/score"), max_epochs=1)

    assert listing(tmp_path / "c") == ["score=0.250.ckpt"]
    assert checkpoint.best_model_path == str(tmp_path / "c" / "score=0.250.ckpt")


def test_name_clash_gets_version_suffix(tmp_path):
    checkpoint = ModelCheckpoint(filename="fixed", save_top_k=-1)
    fit(tmp_path, [checkpoint], ScriptedModule(), max_epochs=3)

    assert listing(checkpoint.dirpath) == ["fixed-v1.ckpt", "fixed-v2.ckpt", "fixed.ckpt"]
    assert os.path.basename(checkpoint.best_model_path) == "fixed-v2.ckpt"


def test_fixed_name_replaced_in_place(tmp_path):
    checkpoint = ModelCheckpoint(filename="fixed", save_top_k=1)
    fit(tmp_path, [checkpoint], ScriptedModule(), max_epochs=3)

    assert listing(checkpoint.dirpath) == ["fixed.ckpt"]
    assert torch.load(checkpoint.best_model_path, weights_only=True)["global_step"] == 6


def test_foreign_file_is_not_overwritten(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "fixed.ckpt").write_bytes(b"not ours")
    checkpoint = ModelCheckpoint(filename="fixed", save_top_k=1)
    fit(tmp_path, [checkpoint], ScriptedModule(), max_epochs=2)

    assert (folder / "fixed.ckpt").read_bytes() == b"not ours"
    assert listing(folder) == ["fixed-v1.ckpt", "fixed.ckpt"]


def test_metric_name_cannot_escape_dirpath(tmp_path):
    dirpath = tmp_path / "deep" / "checkpoints"
    metric = "../../escape"
    checkpoint = ModelCheckpoint(dirpath=dirpath, monitor=metric, filename="../{epoch}-{../../escape}")
    fit(tmp_path, [checkpoint], ScriptedModule([0.5], metric=metric), max_epochs=1)

    written = [os.path.join(root, name) for root, _, files in os.walk(tmp_path) for name in files]
    assert written == [checkpoint.best_model_path]
    assert os.path.dirname(checkpoint.best_model_path) == str(dirpath)
    assert ".." not in os.path.basename(checkpoint.best_model_path)
    assert "/" not in os.path.basename(checkpoint.best_model_path)


def test_format_checkpoint_name():
    checkpoint = ModelCheckpoint(filename="{epoch:03d}-{val/acc:.1%}-{loss}")
    metrics = {"val/acc": torch.tensor(0.5), "loss": torch.tensor(2)}

    assert checkpoint.format_checkpoint_name(4, 10, metrics) == "004-50.0%-2.ckpt"
    assert checkpoint.format_checkpoint_name(4, 10, metrics, version=2) == "004-50.0%-2-v2.ckpt"
    assert ModelCheckpoint().format_checkpoint_name(0, 7) == "epoch=0-step=7.ckpt"


def test_missing_filename_metric_warns_and_reads_nan():
    checkpoint = ModelCheckpoint(filename="{epoch}-{val_acc:.2f}")

    with pytest.warns(HookrtWarning, match="names the metric 'val_acc', which is not in trainer.callback_metrics"):
        name = checkpoint.format_checkpoint_name(1, 2, {})
    assert name == "1-nan.ckpt"


# ---------------------------------------------------------------------- when it saves


def test_no_save_during_sanity_check_or_validate(tmp_path):
    checkpoint = ModelCheckpoint(monitor="val_score", save_top_k=-1)
    trainer = hookrt.Trainer(max_epochs=1, plugins=[checkpoint], default_root_dir=tmp_path, num_sanity_val_steps=2,
                             **QUIET)
    seen_after_sanity: list[list[str]] = []
    trainer.bus.subscribe("on_sanity_check_end", lambda payload: seen_after_sanity.append(listing(tmp_path)))
    module = ScriptedModule([0.5])
    trainer.fit(module, make_loader(4), make_loader(2))

    assert seen_after_sanity == [[]]
    assert listing(checkpoint.dirpath) == ["epoch=0-step=2.ckpt"]

    trainer.validate(module, make_loader(2))

    assert listing(checkpoint.dirpath) == ["epoch=0-step=2.ckpt"]


def test_every_n_train_steps(tmp_path):
    checkpoint = ModelCheckpoint(every_n_train_steps=3, save_top_k=-1)
    fit(tmp_path, [checkpoint], ScriptedModule(), max_epochs=3)

    assert listing(checkpoint.dirpath) == ["epoch=1-step=3.ckpt", "epoch=2-step=6.ckpt"]


def test_every_n_train_steps_only_after_a_step(tmp_path):
    # With accumulation over the epoch's two batches, only the second batch steps.
    checkpoint = ModelCheckpoint(every_n_train_steps=1, save_top_k=-1)
    fit(tmp_path, [checkpoint], ScriptedModule(), max_epochs=2, accumulate_grad_batches=2)

    assert listing(checkpoint.dirpath) == ["epoch=0-step=1.ckpt", "epoch=1-step=2.ckpt"]



class IdleProbe(hookrt.Plugin):
    """Records, at the start of training, whether the checkpoint's step-schedule handlers are idle."""

    def __init__(self, checkpoint: ModelCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.idle: list[bool] = []

    @hookrt.on("on_train_start")
    def look(self, payload) -> None:
        bus = payload.trainer.bus
        self.idle = [bus.is_idle(self.checkpoint, name) for name in ("_note_step_at_batch_start",
                                                                     "_save_on_step_schedule")]


@pytest.mark.parametrize(("steps", "idle"), [(None, [True, True]), (2, [False, False])])
def test_step_handlers_idle_without_step_schedule(tmp_path, steps, idle):
    checkpoint = ModelCheckpoint(every_n_train_steps=steps, save_top_k=-1)
    probe = IdleProbe(checkpoint)
    trainer = fit(tmp_path, [checkpoint, probe], ScriptedModule(), max_epochs=2)

    assert probe.idle == idle
    assert not trainer.bus.is_idle(checkpoint, "_save_on_step_schedule")  # awake again after fit
    expected = ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt"]
    assert listing(checkpoint.dirpath) == expected


class TurnOnStepSchedule(hookrt.Plugin):
    def __init__(self, checkpoint: ModelCheckpoint) -> None:
        self.checkpoint = checkpoint

    @hookrt.on("on_fit_start")
    def turn_on(self, payload) -> None:
        self.checkpoint.every_n_train_steps = 3


def test_step_schedule_set_during_fit_wakes_handlers(tmp_path):
    # The step handlers were idle after setup, because the schedule was off then.
    checkpoint = ModelCheckpoint(save_top_k=-1)
    fit(tmp_path, [checkpoint, TurnOnStepSchedule(checkpoint)], ScriptedModule(), max_epochs=3, val=False)

    assert {"epoch=1-step=3.ckpt", "epoch=2-step=6.ckpt"} <= set(listing(checkpoint.dirpath))


def test_step_schedule_setter_zero_off(tmp_path):
    checkpoint = ModelCheckpoint(every_n_train_steps=3, save_top_k=-1)
    checkpoint.every_n_train_steps = 0

    assert checkpoint.every_n_train_steps is None
    with pytest.raises(MisconfigurationError, match=r"ModelCheckpoint\(every_n_train_steps=-1\) is invalid: use a "
                                                    r"positive number, or None or 0 to turn this schedule off\."):
        checkpoint.every_n_train_steps = -1

def test_every_n_epochs(tmp_path):
    checkpoint = ModelCheckpoint(every_n_epochs=2, save_top_k=-1)
    fit(tmp_path, [checkpoint], ScriptedModule(), max_epochs=5)

    assert listing(checkpoint.dirpath) == ["epoch=1-step=4.ckpt", "epoch=3-step=8.ckpt"]


def test_no_second_save_at_same_step(tmp_path):
    # Validation after every batch, one optimizer step per two batches: the first validation of epoch 1
    # comes before its step, at the global step of the last save.
    checkpoint = ModelCheckpoint(monitor="val_score", save_top_k=-1)
    fit(tmp_path, [checkpoint], ScriptedModule([0.5, 0.4]), max_epochs=2, accumulate_grad_batches=2,
        val_check_interval=1)

    assert listing(checkpoint.dirpath) == ["epoch=0-step=0.ckpt", "epoch=0-step=1.ckpt", "epoch=1-step=2.ckpt"]


def test_monitored_train_metric_saves_at_epoch_end(tmp_path):
    checkpoint = ModelCheckpoint(monitor="train_score", save_top_k=1)
    module = TrainOnlyModule([0.4, 0.2, 0.3], train_metric="train_score")
    fit(tmp_path, [checkpoint], module, max_epochs=3, val=False)

    assert listing(checkpoint.dirpath) == ["epoch=1-step=4.ckpt"]
    assert checkpoint.best_model_score == pytest.approx(0.2)


def test_stale_validation_metric_is_not_scored_again(tmp_path):
    # Validation runs in epochs 2 and 5 only; epochs 3 and 4 keep the value of epoch 2 and must not save.
    scores = [9.0, 9.0, 0.5, 9.0, 9.0, 0.4]
    checkpoint = ModelCheckpoint(monitor="val_score", save_top_k=-1)
    fit(tmp_path, [checkpoint], ScriptedModule(scores), max_epochs=6, check_val_every_n_epoch=3)

    assert listing(checkpoint.dirpath) == ["epoch=2-step=6.ckpt", "epoch=5-step=12.ckpt"]


def test_monitor_never_logged_warns_at_train_end(tmp_path):
    checkpoint = ModelCheckpoint(monitor="val_score")

    with pytest.warns(HookrtWarning, match=r"ModelCheckpoint\(monitor='val_score'\) saved no checkpoint"):
        fit(tmp_path, [checkpoint], TrainOnlyModule(), max_epochs=2, val=False)
    assert listing(tmp_path / "checkpoints") == []


def test_missing_monitor_after_validation_raises(tmp_path):
    checkpoint = ModelCheckpoint(monitor="val_acc")

    with pytest.raises(MisconfigurationError, match=r"found no metric 'val_acc' after validation\. Metrics "
                                                    r"available: 'loss', 'val_score'\. Log it with"):
        fit(tmp_path, [checkpoint], ScriptedModule([0.5]), max_epochs=1)


def test_save_last(tmp_path):
    checkpoint = ModelCheckpoint(monitor="val_score", save_last=True)
    fit(tmp_path, [checkpoint], ScriptedModule([0.2, 0.5, 0.7]), max_epochs=3)

    assert listing(checkpoint.dirpath) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert checkpoint.last_model_path == os.path.join(checkpoint.dirpath, "last.ckpt")
    last = torch.load(checkpoint.last_model_path, weights_only=True)
    assert last["global_step"] == 6
    assert last["epoch"] == 2


def test_failed_save_ends_the_run(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints")

    with pytest.raises(CheckpointError, match=r"Could not save the checkpoint .*No space left on device"):
        fit(tmp_path, [checkpoint], ScriptedModule(), max_epochs=2)


def test_other_rank_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    checkpoint = ModelCheckpoint(monitor="val_score", save_top_k=2, save_last=True)
    fit(tmp_path, [checkpoint], ScriptedModule([0.5, 0.3, 0.4, 0.1]), max_epochs=4)

    assert names(checkpoint.best_k_models) == ["epoch=1-step=4.ckpt", "epoch=3-step=8.ckpt"]
    assert os.path.basename(checkpoint.best_model_path) == "epoch=3-step=8.ckpt"
    assert checkpoint.last_model_path.endswith("last.ckpt")
    assert listing(tmp_path / "checkpoints") == []


# ---------------------------------------------------------------------- state and resume


def test_two_instances_keep_separate_state(tmp_path):
    lowest = ModelCheckpoint(monitor="val_score", mode="min", dirpath=tmp_path / "low")
    highest = ModelCheckpoint(monitor="val_score", mode="max", dirpath=tmp_path / "high", save_last=True)
    fit(tmp_path, [lowest, highest], ScriptedModule([0.5, 0.1, 0.9]), max_epochs=3)

    assert lowest.state_key != highest.state_key
    assert listing(tmp_path / "low") == ["epoch=1-step=4.ckpt"]
    assert listing(tmp_path / "high") == ["epoch=2-step=6.ckpt", "last.ckpt"]
    states = torch.load(highest.last_model_path, weights_only=True)["plugins"]
    assert states[lowest.state_key]["best_model_path"] == lowest.best_model_path
    assert states[highest.state_key]["best_model_path"] == highest.best_model_path
    assert float(states[lowest.state_key]["best_model_score"]) == pytest.approx(0.1)
    assert float(states[highest.state_key]["best_model_score"]) == pytest.approx(0.9)


def test_same_arguments_need_distinct_state_key(tmp_path):
    first = ModelCheckpoint(monitor="val_score")
    second = ModelCheckpoint(monitor="val_score", dirpath=tmp_path / "other")

    with pytest.raises(hookrt.PluginError, match="already uses, so their checkpoint states would collide"):
        hookrt.Trainer(plugins=[first, second], default_root_dir=tmp_path, **QUIET)
    second.state_key = "ModelCheckpoint-other"
    hookrt.Trainer(plugins=[first, second], default_root_dir=tmp_path, **QUIET)


def test_state_dict_loads_with_weights_only(tmp_path):
    checkpoint = ModelCheckpoint(monitor="val_score", save_top_k=2, save_last=True)
    fit(tmp_path, [checkpoint], ScriptedModule([0.5, 0.3]), max_epochs=2)

    state = torch.load(checkpoint.last_model_path, weights_only=True)["plugins"][checkpoint.state_key]
    assert state == {
        "dirpath": checkpoint.dirpath,
        "best_model_path": checkpoint.best_model_path,
        "best_model_score": checkpoint.best_model_score,
        "best_k_models": checkpoint.best_k_models,
        "last_model_path": checkpoint.last_model_path,
        "last_saved_step": 4,
        "validated_epoch": 1,
        "monitor_from_validation": True,
    }
    restored = ModelCheckpoint(monitor="val_score", save_top_k=2, save_last=True, dirpath=checkpoint.dirpath)
    restored.load_state_dict(state)
    assert restored.state_dict() == checkpoint.state_dict()


def test_load_from_other_folder_warns_and_starts_afresh(tmp_path):
    checkpoint = ModelCheckpoint(monitor="val_score", save_last=True)
    fit(tmp_path, [checkpoint], ScriptedModule([0.5, 0.3]), max_epochs=1)
    moved = ModelCheckpoint(monitor="val_score", save_last=True, dirpath=tmp_path / "elsewhere")

    with pytest.warns(HookrtWarning, match="but the checkpoint was written with"):
        fit(tmp_path, [moved], ScriptedModule([0.5, 0.3]), max_epochs=2, ckpt_path=checkpoint.last_model_path)
    assert list(moved.best_k_models) == [str(tmp_path / "elsewhere" / "epoch=1-step=4.ckpt")]
    assert listing(checkpoint.dirpath) == ["epoch=0-step=2.ckpt", "last.ckpt"]


def comparable(state: dict, folder: str) -> dict:
    """Return a plugin state with the checkpoint folder's path replaced, so two runs' states compare."""

    def local(value):
        if isinstance(value, str):
            return value.replace(folder, "<dir>")
        if isinstance(value, dict):
            return {local(key): local(item) for key, item in value.items()}
        if isinstance(value, torch.Tensor):
            return float(value)
        return value

    return local(state)


def resume_plugins(folder):
    return [
        ModelCheckpoint(dirpath=folder, monitor="val_score", save_top_k=2, save_last=True),
        EarlyStopping("val_score", patience=5),
    ]


def test_resume_matches_uninterrupted_run(tmp_path):
    scores = [0.5, 0.4, 0.6, 0.3, 0.7, 0.35]
    whole_dir, split_dir = str(tmp_path / "whole"), str(tmp_path / "split")
    whole = resume_plugins(whole_dir)
    fit(tmp_path, whole, ScriptedModule(scores), max_epochs=6)

    first = resume_plugins(split_dir)
    fit(tmp_path, first, ScriptedModule(scores), max_epochs=3)
    resumed = resume_plugins(split_dir)
    fit(tmp_path, resumed, ScriptedModule(scores), max_epochs=6, ckpt_path=first[0].last_model_path)

    for uninterrupted, continued in zip(whole, resumed, strict=True):
        assert comparable(continued.state_dict(), split_dir) == comparable(uninterrupted.state_dict(), whole_dir)
    assert listing(split_dir) == listing(whole_dir) == ["epoch=3-step=8.ckpt", "epoch=5-step=12.ckpt", "last.ckpt"]


def test_resume_from_step_checkpoint(tmp_path):
    whole_dir, split_dir = str(tmp_path / "whole"), str(tmp_path / "split")
    whole = ModelCheckpoint(dirpath=whole_dir, every_n_train_steps=3, save_top_k=2)
    whole_trainer = fit(tmp_path, [whole], ScriptedModule(), max_epochs=4)

    first = ModelCheckpoint(dirpath=split_dir, every_n_train_steps=3, save_top_k=2)
    fit(tmp_path, [first], ScriptedModule(), max_epochs=2)
    assert listing(split_dir) == ["epoch=1-step=3.ckpt"]  # written after the first batch of epoch 1
    resumed = ModelCheckpoint(dirpath=split_dir, every_n_train_steps=3, save_top_k=2)
    resumed_trainer = fit(tmp_path, [resumed], ScriptedModule(), max_epochs=4, ckpt_path=first.best_model_path)

    assert comparable(resumed.state_dict(), split_dir) == comparable(whole.state_dict(), whole_dir)
    assert listing(split_dir) == listing(whole_dir) == ["epoch=1-step=3.ckpt", "epoch=2-step=6.ckpt"]
    assert torch.equal(resumed_trainer.lightning_module.layer.weight, whole_trainer.lightning_module.layer.weight)


def test_resume_of_finished_run_writes_nothing(tmp_path):
    folder = str(tmp_path / "checkpoints")
    plugins = resume_plugins(folder)
    fit(tmp_path, plugins, ScriptedModule([0.5, 0.4]), max_epochs=2)
    before = {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in listing(folder)}
    state_before = plugins[0].state_dict()

    for source in (plugins[0].last_model_path, plugins[0].best_model_path):
        again = resume_plugins(folder)
        fit(tmp_path, again, ScriptedModule([0.5, 0.4]), max_epochs=2, ckpt_path=source)
        after = {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in listing(folder)}
        assert after == before
        assert comparable(again[0].state_dict(), folder) == comparable(state_before, folder)


class LateEarlyStopping(EarlyStopping):
    """EarlyStopping whose check runs after every ModelCheckpoint handler on on_validation_end."""

    @hookrt.on("on_validation_end", order=5000)
    def _check_after_validation(self, payload):
        super()._check_after_validation(payload)


@pytest.mark.parametrize("stopper_class", [EarlyStopping, LateEarlyStopping])
def test_saved_early_stopping_state_ignores_plugin_order(tmp_path, stopper_class):
    before = ModelCheckpoint(monitor="val_score", mode="min", save_top_k=-1, dirpath=tmp_path / "before")
    stopper = stopper_class("val_score", patience=2)
    after = ModelCheckpoint(monitor="val_score", mode="max", save_top_k=-1, dirpath=tmp_path / "after")
    fit(tmp_path, [before, stopper, after], ScriptedModule([0.5, 0.6, 0.7]), max_epochs=3)

    assert listing(tmp_path / "before") == listing(tmp_path / "after")
    for name in listing(tmp_path / "before"):
        first = torch.load(tmp_path / "before" / name, weights_only=True)["plugins"][stopper.state_key]
        second = torch.load(tmp_path / "after" / name, weights_only=True)["plugins"][stopper.state_key]
        assert first == second
    final = torch.load(tmp_path / "after" / "epoch=2-step=6.ckpt", weights_only=True)["plugins"]
    assert final[stopper.state_key]["wait_count"] == 2
    assert final[stopper.state_key]["stopping_reason"] == "patience_exhausted"


# ---------------------------------------------------------------------- best and last for test()


def test_trainer_test_loads_best_and_last(tmp_path):
    checkpoint = ModelCheckpoint(monitor="val_score", save_last=True)
    module = ScriptedModule([0.5, 0.1, 0.9])
    trainer = fit(tmp_path, [checkpoint], module, max_epochs=3)
    best_weights = torch.load(checkpoint.best_model_path, weights_only=True)["state_dict"]
    last_weights = torch.load(checkpoint.last_model_path, weights_only=True)["state_dict"]
    assert not torch.equal(best_weights["layer.weight"], last_weights["layer.weight"])

    trainer.test(module, make_loader(2), ckpt_path="best")
    assert torch.equal(module.layer.weight, best_weights["layer.weight"])

    trainer.test(module, make_loader(2), ckpt_path="last")
    assert torch.equal(module.layer.weight, last_weights["layer.weight"])


# ---------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"mode": "mean"}, r"ModelCheckpoint\(mode='mean'\) is invalid: use 'min'"),
        ({"save_top_k": -2}, r"ModelCheckpoint\(save_top_k=-2\) is invalid: use -1 to keep every file"),
        ({"monitor": ""}, r"ModelCheckpoint\(monitor=''\) is invalid"),
        ({"every_n_train_steps": -1}, r"ModelCheckpoint\(every_n_train_steps=-1\) is invalid"),
        ({"every_n_epochs": 1.5}, r"ModelCheckpoint\(every_n_epochs=1.5\) is invalid"),
        ({"every_n_train_steps": 5, "every_n_epochs": 2}, "sets two save schedules"),
        ({"filename": "{epoch"}, "is not a valid format template"),
        ({"filename": "{}-{epoch}"}, "has a positional field"),
    ],
)
def test_invalid_arguments(arguments, message):
    with pytest.raises(MisconfigurationError, match=message):
        ModelCheckpoint(**arguments)


def test_every_n_train_steps_turns_epoch_schedule_off():
    checkpoint = ModelCheckpoint(every_n_train_steps=4)

    assert checkpoint.every_n_train_steps == 4
    assert checkpoint.every_n_epochs is None
    assert ModelCheckpoint(every_n_epochs=0).every_n_epochs is None
