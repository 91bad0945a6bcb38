"""EarlyStopping with the real Trainer: patience, thresholds, non-finite values, missing metrics and state."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt
from hookrt import HookrtWarning, MisconfigurationError
from hookrt._rank import reset_warning_cache
from hookrt.plugins.early_stopping import EarlyStopping, EarlyStoppingReason

NAN = math.nan
QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}


@pytest.fixture(autouse=True)
def _fresh_warning_cache():
    """Let each test see the warnings that are given once per process."""
    reset_warning_cache()


def make_loader(samples: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(samples, 2, generator=generator),
                                    torch.randn(samples, 1, generator=generator)), batch_size=2)


class ScriptedModule(hookrt.LightningModule):
    """A linear regressor that logs ``scores[current_epoch]`` as ``val_score`` after each validation run.

    An epoch index past the end of ``scores`` reads the last score.
    """

    def __init__(self, scores, metric="val_score"):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(2, 1)
        self.scores = scores
        self.metric = metric
        #: The epoch of every validation run that was not sanity checking.
        self.validated_epochs: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.layer(x), y)

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.validated_epochs.append(self.current_epoch)
        self.log(self.metric, float(self.scores[min(self.current_epoch, len(self.scores) - 1)]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, stopper, scores, max_epochs=10, **flags):
    trainer = hookrt.Trainer(max_epochs=max_epochs, plugins=[stopper], default_root_dir=tmp_path, **QUIET, **flags)
    module = ScriptedModule(scores)
    trainer.fit(module, make_loader(4), make_loader(2))
    return trainer, module


def test_patience_counts_validation_runs(tmp_path):
    # Validation runs in epochs 2, 5 and 8 only. The run at epoch 2 sets the best value.
    # The runs at epochs 5 and 8 do not improve on it, so patience 2 runs out at epoch 8.
    scores = [9.0] * 2 + [1.0] * 6 + [1.2] * 10
    stopper = EarlyStopping("val_score", patience=2)
    trainer, module = fit(tmp_path, stopper, scores, max_epochs=20, check_val_every_n_epoch=3)

    assert module.validated_epochs == [2, 5, 8]
    assert stopper.stopped_epoch == 8
    assert stopper.wait_count == 2
    assert stopper.best_score == pytest.approx(1.0)
    assert stopper.stopping_reason is EarlyStoppingReason.PATIENCE_EXHAUSTED
    assert trainer.current_epoch == 9  # epoch 8 finished, then fit stopped


def test_improvement_resets_wait_count(tmp_path):
    stopper = EarlyStopping("val_score", patience=2)
    trainer, _ = fit(tmp_path, stopper, [1.0, 1.1, 0.9, 1.0, 1.0, 1.0], max_epochs=6)

    assert stopper.stopped_epoch == 4
    assert stopper.best_score == pytest.approx(0.9)
    assert trainer.current_epoch == 5


def test_min_delta_requires_a_larger_improvement(tmp_path):
    # 0.95 beats 1.0 by less than min_delta, so it counts as no improvement.
    stopper = EarlyStopping("val_score", patience=1, min_delta=0.1)
    fit(tmp_path, stopper, [1.0, 0.95, 0.5], max_epochs=3)

    assert stopper.stopped_epoch == 1
    assert stopper.best_score == pytest.approx(1.0)


def test_mode_max(tmp_path):
    stopper = EarlyStopping("val_score", mode="max", patience=1)
    fit(tmp_path, stopper, [0.1, 0.5, 0.4], max_epochs=5)

    assert stopper.stopped_epoch == 2
    assert stopper.best_score == pytest.approx(0.5)


def test_not_stopped_when_always_improving(tmp_path):
    stopper = EarlyStopping("val_score", patience=0)
    trainer, _ = fit(tmp_path, stopper, [1.0, 0.5, 0.25], max_epochs=3)

    # With patience 0, a sanity-check value counted as a check would have stopped epoch 0.
    assert stopper.stopping_reason is EarlyStoppingReason.NOT_STOPPED
    assert stopper.stopping_reason_message is None
    assert stopper.stopped_epoch == 0
    assert trainer.current_epoch == 3


def test_stopping_threshold(tmp_path, caplog):
    stopper = EarlyStopping("val_score", patience=10, stopping_threshold=0.1)
    with caplog.at_level(logging.INFO, logger="hookrt.plugins.early_stopping"):
        fit(tmp_path, stopper, [0.5, 0.1, 0.05, 0.01])

    assert stopper.stopped_epoch == 2
    assert stopper.stopping_reason is EarlyStoppingReason.STOPPING_THRESHOLD
    assert stopper.best_score == pytest.approx(0.05)
    expected = "EarlyStopping stops the run at epoch 2: 'val_score' = 0.05 is below the stopping_threshold 0.1."
    assert stopper.stopping_reason_message == expected
    assert expected in caplog.messages


def test_divergence_threshold_mode_max(tmp_path, caplog):
    stopper = EarlyStopping("val_score", mode="max", patience=10, divergence_threshold=0.2)
    with caplog.at_level(logging.INFO, logger="hookrt.plugins.early_stopping"):
        fit(tmp_path, stopper, [0.5, 0.3, 0.1, 0.6])

    assert stopper.stopped_epoch == 2
    assert stopper.stopping_reason is EarlyStoppingReason.DIVERGENCE
    assert "below the divergence_threshold 0.2" in stopper.stopping_reason_message
    assert stopper.stopping_reason_message in caplog.messages


def test_non_finite_stops(tmp_path):
    stopper = EarlyStopping("val_score", patience=10)
    trainer, _ = fit(tmp_path, stopper, [0.5, NAN, 0.1])

    assert stopper.stopped_epoch == 1
    assert stopper.stopping_reason is EarlyStoppingReason.NON_FINITE
    assert "'val_score' = nan is not finite" in stopper.stopping_reason_message
    assert stopper.best_score == pytest.approx(0.5)
    assert trainer.current_epoch == 2


def test_non_finite_allowed_without_check_finite(tmp_path):
    stopper = EarlyStopping("val_score", patience=2, check_finite=False)
    fit(tmp_path, stopper, [0.5, NAN, 0.4, NAN, NAN, 0.3], max_epochs=6)

    # NaN never improves: epochs 3 and 4 exhaust the patience of 2.
    assert stopper.stopping_reason is EarlyStoppingReason.PATIENCE_EXHAUSTED
    assert stopper.stopped_epoch == 4
    assert stopper.best_score == pytest.approx(0.4)


def test_min_epochs_delays_stop(tmp_path):
    stopper = EarlyStopping("val_score", patience=0)
    trainer, _ = fit(tmp_path, stopper, [1.0, 2.0], max_epochs=10, min_epochs=4)

    # Requested at epochs 1, 2 and 3, but min_epochs=4 delays the stop until epoch 3 has finished.
    assert stopper.stopped_epoch == 3
    assert trainer.current_epoch == 4


def test_strict_missing_metric_raises(tmp_path):
    stopper = EarlyStopping("val_acc")

    with pytest.raises(MisconfigurationError, match=r"EarlyStopping\(monitor='val_acc'\) found no metric 'val_acc' "
                                                    r"after validation\. Metrics available: 'loss', 'val_score'\."):
        fit(tmp_path, stopper, [0.5])


def test_non_strict_missing_metric_warns_once(tmp_path):
    stopper = EarlyStopping("val_acc", strict=False, patience=0)

    with pytest.warns(HookrtWarning, match=r"strict=False\) found no metric 'val_acc'") as record:
        trainer, _ = fit(tmp_path, stopper, [0.5], max_epochs=3)
    assert len(record) == 1
    assert stopper.wait_count == 0
    assert trainer.current_epoch == 3


def test_validate_does_not_check(tmp_path):
    stopper = EarlyStopping("val_score", patience=0)
    trainer, module = fit(tmp_path, stopper, [1.0], max_epochs=1)
    trainer.validate(module, make_loader(2))

    assert stopper.wait_count == 0
    assert stopper.stopping_reason is EarlyStoppingReason.NOT_STOPPED


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"mode": "lowest"}, r"EarlyStopping\(mode='lowest'\) is invalid: the valid modes are 'min' .* and 'max'"),
        ({"patience": -1}, r"EarlyStopping\(patience=-1\) is invalid"),
        ({"min_delta": -0.1}, r"EarlyStopping\(min_delta=-0.1\) is invalid: use a number >= 0"),
        ({"monitor": ""}, r"EarlyStopping\(monitor=''\) is invalid"),
    ],
)
def test_invalid_arguments(arguments, message):
    with pytest.raises(MisconfigurationError, match=message):
        EarlyStopping(**{"monitor": "val_loss", **arguments})


def test_state_key_from_monitor_and_mode():
    assert EarlyStopping("a").state_key != EarlyStopping("b").state_key
    assert EarlyStopping("a").state_key != EarlyStopping("a", mode="max").state_key
    assert EarlyStopping("a").state_key == EarlyStopping("a", patience=7).state_key


def test_state_dict_round_trip(tmp_path, caplog):
    stopper = EarlyStopping("val_score", patience=1)
    fit(tmp_path, stopper, [0.5, 0.7], max_epochs=3)
    state = stopper.state_dict()

    assert state == {
        "wait_count": 1,
        "stopped_epoch": 1,
        "best_score": torch.tensor(0.5),
        "patience": 1,
        "stopping_reason": "patience_exhausted",
    }
    restored = EarlyStopping("val_score", patience=4)
    with caplog.at_level(logging.INFO, logger="hookrt.plugins.early_stopping"):
        restored.load_state_dict(state)
    assert restored.wait_count == 1
    assert restored.stopped_epoch == 1
    assert torch.equal(restored.best_score, torch.tensor(0.5))
    assert restored.stopping_reason is EarlyStoppingReason.PATIENCE_EXHAUSTED
    assert restored.patience == 4
    assert "resumes with patience=4; the checkpoint had patience=1" in caplog.text
