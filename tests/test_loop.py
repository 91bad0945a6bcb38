"""The fit loop: event order, counts, accumulation, stopping and validation scheduling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import hookrt
from hookrt import Event

QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def make_loader(batches: int, batch_size: int = 4, features: int = 3, seed: int = 0, shuffle: bool = False):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * batch_size, features, generator=generator)
    y = torch.randn(batches * batch_size, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


class Regressor(hookrt.LightningModule):
    def __init__(self, lr: float = 0.1, validate: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 1)
        self.lr = lr

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def record_events(trainer: hookrt.Trainer) -> list[str]:
    events: list[str] = []
    for event in Event:
        trainer.bus.subscribe(event, lambda payload, name=event.value: events.append(name), order=10_000)
    return events


def train_batch(step: bool) -> list[str]:
    middle = ["before_optimizer_step", "optimizer_step"] if step else []
    return ["on_batch_start", "before_backward", "after_backward", *middle, "on_batch_end"]


def validation(batches: int) -> list[str]:
    return [
        "on_validation_start",
        *["on_validation_batch_start", "on_validation_batch_end"] * batches,
        "on_validation_end",
    ]


def test_fit_event_order_golden():
    # 2 epochs of 5 batches, accumulation 2, validation at half and end of epoch, one sanity batch.
    # Windows are [0, 1], [2, 3] and the short final window [4]; the half-epoch point is after 2 batches.
    trainer = hookrt.Trainer(
        max_epochs=2, accumulate_grad_batches=2, val_check_interval=0.5, num_sanity_val_steps=1, **QUIET
    )
    events = record_events(trainer)
    trainer.fit(Regressor(), make_loader(5), make_loader(2))

    epoch = [
        "on_epoch_start",
        *train_batch(False),
        *train_batch(True),
        *validation(2),
        *train_batch(False),
        *train_batch(True),
        *train_batch(True),
        *validation(2),
        "on_epoch_end",
    ]
    expected = [
        "setup",
        "on_fit_start",
        "on_sanity_check_start",
        *validation(1),
        "on_sanity_check_end",
        "on_train_start",
        *epoch,
        *epoch,
        "on_train_end",
        "on_fit_end",
        "teardown",
    ]
    assert events == expected
    assert trainer.global_step == 6


@pytest.mark.parametrize(
    ("batches", "accumulate", "epochs", "val_batches"),
    [(5, 1, 1, 2), (7, 3, 2, 1), (4, 4, 3, 3), (6, 2, 2, 0)],
)
def test_event_counts_match_formula(batches, accumulate, epochs, val_batches):
    trainer = hookrt.Trainer(
        max_epochs=epochs, accumulate_grad_batches=accumulate, num_sanity_val_steps=0, **QUIET
    )
    events = record_events(trainer)
    val_loader = make_loader(val_batches) if val_batches else None
    trainer.fit(Regressor(), make_loader(batches), val_loader)

    steps_per_epoch = math.ceil(batches / accumulate)
    validations = epochs if val_batches else 0
    expected = {
        "setup": 1,
        "on_fit_start": 1,
        "on_train_start": 1,
        "on_epoch_start": epochs,
        "on_batch_start": epochs * batches,
        "before_backward": epochs * batches,
        "after_backward": epochs * batches,
        "before_optimizer_step": epochs * steps_per_epoch,
        "optimizer_step": epochs * steps_per_epoch,
        "on_batch_end": epochs * batches,
        "on_validation_start": validations,
        "on_validation_batch_start": validations * val_batches,
        "on_validation_batch_end": validations * val_batches,
        "on_validation_end": validations,
        "on_epoch_end": epochs,
        "on_train_end": 1,
        "on_fit_end": 1,
        "teardown": 1,
    }
    counts = {name: events.count(name) for name in expected}
    assert counts == expected
    assert trainer.global_step == epochs * steps_per_epoch


def test_accumulation_short_final_window_equals_concatenation():
    # 3 batches with accumulation 2: the last window holds one batch and gets the full weight.
    loader = make_loader(3, batch_size=4)
    model = Regressor(lr=0.5)
    trainer = hookrt.Trainer(max_epochs=1, accumulate_grad_batches=2, num_sanity_val_steps=0, **QUIET)
    trainer.fit(model, loader)

    torch.manual_seed(0)
    reference = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    batches = list(loader)
    for window in (batches[0:2], batches[2:3]):
        x = torch.cat([b[0] for b in window])
        y = torch.cat([b[1] for b in window])
        optimizer.zero_grad()
        F.mse_loss(reference(x), y).backward()
        optimizer.step()
    assert torch.allclose(model.layer.weight, reference.weight, atol=1e-6)
    assert torch.allclose(model.layer.bias, reference.bias, atol=1e-6)
    assert trainer.global_step == 2


def test_accumulation_does_not_leak_across_epochs():
    grads_at_window_start = []

    class Probe(hookrt.Plugin):
        @hookrt.on("on_batch_start")
        def check(self, payload):
            if payload.batch_idx == 0:
                grads_at_window_start.append(payload.module.layer.weight.grad)

    trainer = hookrt.Trainer(
        max_epochs=3, accumulate_grad_batches=4, num_sanity_val_steps=0, plugins=[Probe()], **QUIET
    )
    trainer.fit(Regressor(), make_loader(5))
    assert grads_at_window_start == [None, None, None]
    assert trainer.global_step == 6


class TwoOptimizers(Regressor):
    def __init__(self):
        super().__init__()
        self.other = torch.nn.Linear(3, 1)
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx, optimizer_idx):
        self.seen.append(optimizer_idx)
        x, y = batch
        layer = self.layer if optimizer_idx == 0 else self.other
        return F.mse_loss(layer(x), y)

    def configure_optimizers(self):
        return [torch.optim.SGD(self.layer.parameters(), lr=0.1), torch.optim.SGD(self.other.parameters(), lr=0.1)]


def test_global_step_counts_each_optimizer():
    model = TwoOptimizers()
    trainer = hookrt.Trainer(max_epochs=1, num_sanity_val_steps=0, **QUIET)
    trainer.fit(model, make_loader(3))
    assert trainer.global_step == 6
    assert model.seen == [0, 1, 0, 1, 0, 1]


def test_step_scheduler_steps_once_per_step():
    class Scheduled(Regressor):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    model = Scheduled()
    trainer = hookrt.Trainer(max_epochs=2, accumulate_grad_batches=2, num_sanity_val_steps=0, **QUIET)
    trainer.fit(model, make_loader(4))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert trainer.global_step == 4
    assert scheduler.last_epoch == 4
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5**4)


def test_epoch_scheduler_with_frequency():
    class Scheduled(Regressor):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
            return [optimizer], [{"scheduler": scheduler, "interval": "epoch", "frequency": 2}]

    trainer = hookrt.Trainer(max_epochs=5, num_sanity_val_steps=0, **QUIET)
    trainer.fit(Scheduled(), make_loader(2))
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2


def test_plateau_scheduler_reads_monitored_metric():
    class Plateau(Regressor):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", torch.tensor(1.0))

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.1)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss"}}

    trainer = hookrt.Trainer(max_epochs=3, num_sanity_val_steps=0, **QUIET)
    trainer.fit(Plateau(), make_loader(2), make_loader(1))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)


def test_plateau_scheduler_missing_metric_names_available():
    class Plateau(Regressor):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_acc"}}

    trainer = hookrt.Trainer(max_epochs=1, num_sanity_val_steps=0, **QUIET)
    with pytest.raises(hookrt.MisconfigurationError, match=r"monitors 'val_acc', which was not logged\. Logged"):
        trainer.fit(Plateau(), make_loader(2))


def test_lbfgs_closure_counts_match_function_evaluations():
    calls = {"forward": 0, "backward": 0, "before_step": 0, "batch_start": 0}

    class Counting(Regressor):
        def training_step(self, batch, batch_idx):
            calls["forward"] += 1
            return super().training_step(batch, batch_idx)

        def on_after_backward(self):
            calls["backward"] += 1

        def on_before_optimizer_step(self, optimizer):
            calls["before_step"] += 1

        def on_train_batch_start(self, batch, batch_idx):
            calls["batch_start"] += 1

        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=5)

    trainer = hookrt.Trainer(max_epochs=1, num_sanity_val_steps=0, **QUIET)
    trainer.fit(Counting(), make_loader(3))
    evaluations = trainer.optimizers[0].state[trainer.optimizers[0].param_groups[0]["params"][0]]["func_evals"]
    assert calls["forward"] == evaluations
    assert calls["backward"] == evaluations
    assert calls["forward"] > 3
    assert calls["before_step"] == 3
    assert calls["batch_start"] == 3


class StepRecorder(Regressor):
    """Regressor whose optimizer records whether each ``step`` call received a closure."""

    def __init__(self, optimizer_class: type = torch.optim.Adam):
        super().__init__()
        self.optimizer_class = optimizer_class
        self.closures: list[bool] = []

    def configure_optimizers(self):
        optimizer = self.optimizer_class(self.parameters(), lr=0.05)
        # torch passes the optimizer itself as the first of ``args``, so a closure is a second one or a keyword.
        optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: self.closures.append(len(args) > 1 or "closure" in kwargs)
        )
        return optimizer


def fit_weights(module: hookrt.LightningModule) -> torch.Tensor:
    trainer = hookrt.Trainer(max_epochs=2, num_sanity_val_steps=0, **QUIET)
    trainer.fit(module, make_loader(4))
    return torch.cat([parameter.detach().flatten() for parameter in module.parameters()])


def test_builtin_optimizer_steps_without_closure(monkeypatch):
    direct = StepRecorder()
    direct_weights = fit_weights(direct)
    monkeypatch.setattr("hookrt._step._SINGLE_EVALUATION_OPTIMIZERS", frozenset())
    wrapped = StepRecorder()
    wrapped_weights = fit_weights(wrapped)

    assert direct.closures == [False] * 8
    assert wrapped.closures == [True] * 8
    assert torch.equal(direct_weights, wrapped_weights)


def test_optimizer_subclass_steps_with_closure():
    class CustomAdam(torch.optim.Adam):
        pass

    module = StepRecorder(CustomAdam)
    fit_weights(module)

    assert module.closures == [True] * 8


def test_weighted_epoch_metric():
    class Logging(Regressor):
        def training_step(self, batch, batch_idx):
            x, _ = batch
            self.log("size", float(x.shape[0]), on_step=False, on_epoch=True)
            return super().training_step(batch, batch_idx)

    x = torch.randn(10, 3)
    y = torch.randn(10, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # sizes 4, 4, 2
    trainer = hookrt.Trainer(max_epochs=1, num_sanity_val_steps=0, **QUIET)
    trainer.fit(Logging(), loader)
    expected = (4 * 4 + 4 * 4 + 2 * 2) / 10
    assert trainer.callback_metrics["size"].item() == pytest.approx(expected)


class Stream(IterableDataset):
    def __init__(self, count: int):
        self.count = count

    def __iter__(self):
        generator = torch.Generator().manual_seed(1)
        for _ in range(self.count):
            yield torch.randn(3, generator=generator), torch.randn(1, generator=generator)


def test_iterable_loader_without_length_validates_at_epoch_end():
    trainer = hookrt.Trainer(max_epochs=2, num_sanity_val_steps=0, accumulate_grad_batches=2, **QUIET)
    events = record_events(trainer)
    trainer.fit(Regressor(), DataLoader(Stream(12), batch_size=4), make_loader(1))
    assert math.isinf(trainer.num_training_batches)
    assert events.count("on_validation_start") == 2
    # 3 batches per epoch, accumulation 2: windows [0, 1] and the short [2].
    assert trainer.global_step == 4


def test_fractional_interval_without_length_is_rejected():
    trainer = hookrt.Trainer(max_epochs=1, val_check_interval=0.5, **QUIET)
    with pytest.raises(hookrt.MisconfigurationError, match=r"val_check_interval=0\.5\) is a fraction of an epoch"):
        trainer.fit(Regressor(), DataLoader(Stream(8), batch_size=4), make_loader(1))


class EpochRecorder(torch.utils.data.Sampler):
    def __init__(self, size: int):
        self.size = size
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        return iter(range(self.size))

    def __len__(self):
        return self.size


class BatchEpochRecorder(torch.utils.data.BatchSampler):
    def __init__(self, sampler, batch_size):
        super().__init__(sampler, batch_size, drop_last=False)
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


def test_set_epoch_called_on_sampler_and_batch_sampler():
    dataset = TensorDataset(torch.randn(8, 3), torch.randn(8, 1))
    sampler = EpochRecorder(8)
    batch_sampler = BatchEpochRecorder(sampler, 4)
    loader = DataLoader(dataset, batch_sampler=batch_sampler)
    trainer = hookrt.Trainer(max_epochs=3, num_sanity_val_steps=0, **QUIET)
    trainer.fit(Regressor(), loader)
    assert sampler.epochs == [0, 1, 2]
    assert batch_sampler.epochs == [0, 1, 2]


def test_legacy_warmup_optimizer_step_trains():
    class WarmUp(Regressor):
        def optimizer_step(self, epoch_nb, batch_nb, optimizer, optimizer_i, second_order_closure=None):
            scale = min(1.0, float(self.trainer.global_step + 1) / 4.0)
            for group in optimizer.param_groups:
                group["lr"] = scale * 0.1
            optimizer.step()
            optimizer.zero_grad()

    model = WarmUp()
    before = model.layer.weight.detach().clone()
    trainer = hookrt.Trainer(max_epochs=1, num_sanity_val_steps=0, **QUIET)
    trainer.fit(model, make_loader(6))
    assert not torch.equal(before, model.layer.weight)
    assert trainer.global_step == 6
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1)


def test_override_without_closure_call_is_an_error():
    class Forgetful(Regressor):
        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_idx=0, closure=None):
            optimizer.step()

    trainer = hookrt.Trainer(max_epochs=1, num_sanity_val_steps=0, **QUIET)
    with pytest.raises(hookrt.MisconfigurationError, match=r"optimizer_step returned without running the closure"):
        trainer.fit(Forgetful(), make_loader(2))


def test_max_steps_stops_mid_epoch():
    trainer = hookrt.Trainer(max_epochs=10, max_steps=7, num_sanity_val_steps=0, **QUIET)
    trainer.fit(Regressor(), make_loader(5))
    assert trainer.global_step == 7
    # The second epoch stopped after 2 of its 5 batches, so it stays the current, unfinished epoch.
    assert trainer.current_epoch == 1


def test_should_stop_ends_after_current_batch():
    class Stopper(hookrt.Plugin):
        @hookrt.on("on_batch_end")
        def stop(self, payload):
            if payload.trainer.global_step == 3:
                payload.trainer.should_stop = True

    trainer = hookrt.Trainer(max_epochs=5, num_sanity_val_steps=0, plugins=[Stopper()], **QUIET)
    trainer.fit(Regressor(), make_loader(5))
    assert trainer.global_step == 3


def test_min_epochs_overrides_early_stop_request():
    class Stopper(hookrt.Plugin):
        @hookrt.on("on_epoch_end")
        def stop(self, payload):
            payload.trainer.should_stop = True

    trainer = hookrt.Trainer(max_epochs=5, min_epochs=3, num_sanity_val_steps=0, plugins=[Stopper()], **QUIET)
    trainer.fit(Regressor(), make_loader(2))
    assert trainer.current_epoch == 3


def test_cancel_batch_skips_batch_end():
    ended = []

    class Skipper(hookrt.Plugin):
        @hookrt.on("on_batch_start")
        def skip(self, payload):
            if payload.batch_idx == 1:
                raise hookrt.CancelBatch

        @hookrt.on("on_batch_end")
        def seen(self, payload):
            ended.append(payload.batch_idx)

    trainer = hookrt.Trainer(max_epochs=1, num_sanity_val_steps=0, plugins=[Skipper()], **QUIET)
    trainer.fit(Regressor(), make_loader(4))
    assert ended == [0, 2, 3]
    assert trainer.global_step == 3



def test_cancel_batch_from_batch_end_explains():
    class LateSkipper(hookrt.Plugin):
        @hookrt.on("on_batch_end")
        def skip(self, payload):
            raise hookrt.CancelBatch

    trainer = hookrt.Trainer(max_epochs=1, num_sanity_val_steps=0, plugins=[LateSkipper()], **QUIET)
    with pytest.raises(hookrt.MisconfigurationError, match=r"hookrt\.CancelBatch was raised by a handler of "
                                                           r"on_batch_end, after the batch had run, so there is "
                                                           r"nothing left to skip\. Raise it from on_batch_start"):
        trainer.fit(Regressor(), make_loader(2))

def test_cancel_epoch_still_ends_epoch():
    events = []

    class Canceller(hookrt.Plugin):
        @hookrt.on("on_batch_start")
        def cancel(self, payload):
            if payload.batch_idx == 2:
                raise hookrt.CancelEpoch

        @hookrt.on("on_epoch_end")
        def ended(self, payload):
            events.append(payload.epoch)

    trainer = hookrt.Trainer(max_epochs=2, num_sanity_val_steps=0, plugins=[Canceller()], **QUIET)
    trainer.fit(Regressor(), make_loader(5))
    assert events == [0, 1]
    assert trainer.global_step == 4


def test_legacy_minus_one_from_on_batch_start_ends_epoch_with_warning():
    class Legacy(Regressor):
        def on_batch_start(self, batch):
            if self.trainer.batch_idx == 1:
                return -1
            return None

    trainer = hookrt.Trainer(max_epochs=1, num_sanity_val_steps=0, **QUIET)
    with pytest.warns(DeprecationWarning, match=r"Returning -1 from on_batch_start .* Raise hookrt\.CancelEpoch"):
        trainer.fit(Legacy(), make_loader(4))
    assert trainer.global_step == 1


def test_limit_train_batches_fraction_and_count():
    trainer = hookrt.Trainer(max_epochs=1, limit_train_batches=0.5, num_sanity_val_steps=0, **QUIET)
    trainer.fit(Regressor(), make_loader(6))
    assert trainer.global_step == 3
    trainer = hookrt.Trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0, **QUIET)
    trainer.fit(Regressor(), make_loader(6))
    assert trainer.global_step == 2


def test_check_val_every_n_epoch():
    trainer = hookrt.Trainer(max_epochs=6, check_val_every_n_epoch=3, num_sanity_val_steps=0, **QUIET)
    events = record_events(trainer)
    trainer.fit(Regressor(), make_loader(2), make_loader(1))
    assert events.count("on_validation_start") == 2


def test_val_check_interval_batch_count():
    trainer = hookrt.Trainer(max_epochs=1, val_check_interval=2, num_sanity_val_steps=0, **QUIET)
    events = record_events(trainer)
    trainer.fit(Regressor(), make_loader(5), make_loader(1))
    assert events.count("on_validation_start") == 2


def test_fast_dev_run_runs_one_batch():
    trainer = hookrt.Trainer(fast_dev_run=True, **QUIET)
    events = record_events(trainer)
    trainer.fit(Regressor(), make_loader(5), make_loader(3))
    assert trainer.global_step == 1
    assert events.count("on_validation_batch_start") == 1
    assert "on_sanity_check_start" not in events


def test_sanity_check_marks_payloads_and_discards_metrics():
    flags = []

    class Logged(Regressor):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", super().validation_step(batch, batch_idx))

    class Watcher(hookrt.Plugin):
        @hookrt.on("on_validation_end")
        def watch(self, payload):
            flags.append((payload.sanity_checking, payload.trainer.sanity_checking))

    trainer = hookrt.Trainer(max_epochs=1, num_sanity_val_steps=1, plugins=[Watcher()], **QUIET)
    trainer.fit(Logged(), make_loader(2), make_loader(2))
    assert flags == [(True, True), (False, False)]


def test_estimated_stepping_batches():
    trainer = hookrt.Trainer(max_epochs=3, accumulate_grad_batches=2, num_sanity_val_steps=0, **QUIET)
    trainer.fit(Regressor(), make_loader(5))
    assert trainer.estimated_stepping_batches == 9
    assert trainer.num_training_batches == 5


class StopAt(hookrt.Plugin):
    def __init__(self, epoch: int, batch_idx: int):
        self.at = (epoch, batch_idx)

    @hookrt.on("on_batch_end")
    def stop(self, payload):
        if (payload.trainer.current_epoch, payload.batch_idx) == self.at:
            payload.trainer.should_stop = True


class SaveAtEpochEnd(hookrt.Plugin):
    def __init__(self, path):
        self.path = path

    @hookrt.on("on_epoch_end")
    def save(self, payload):
        payload.trainer.save_checkpoint(self.path)


def test_stop_mid_epoch_leaves_epoch_open(tmp_path):
    path = tmp_path / "stopped.ckpt"
    torch.manual_seed(0)
    reference = Regressor()
    hookrt.Trainer(max_epochs=3, accumulate_grad_batches=3, num_sanity_val_steps=0, **QUIET).fit(
        reference, make_loader(10, shuffle=True)
    )

    torch.manual_seed(0)
    trainer = hookrt.Trainer(
        max_epochs=3, accumulate_grad_batches=3, num_sanity_val_steps=0,
        plugins=[StopAt(1, 5), SaveAtEpochEnd(path)], **QUIET,
    )
    trainer.fit(Regressor(), make_loader(10, shuffle=True))
    progress = torch.load(path, weights_only=True)["loops"]["progress"]
    assert trainer.current_epoch == 1
    assert progress["epoch_closed"] is False
    assert progress["batches_done"] == 6

    torch.manual_seed(0)
    resumed = Regressor()
    trainer = hookrt.Trainer(max_epochs=3, accumulate_grad_batches=3, num_sanity_val_steps=0, **QUIET)
    trainer.fit(resumed, make_loader(10, shuffle=True), ckpt_path=path)
    assert trainer.global_step == 12
    assert torch.equal(resumed.layer.weight, reference.layer.weight)


def test_resume_finished_run_skips_sanity_check(tmp_path):
    path = tmp_path / "end.ckpt"
    trainer = hookrt.Trainer(max_epochs=2, num_sanity_val_steps=0, plugins=[SaveAtEpochEnd(path)], **QUIET)
    trainer.fit(Regressor(), make_loader(2), make_loader(1))

    trainer = hookrt.Trainer(max_epochs=2, num_sanity_val_steps=2, **QUIET)
    events = record_events(trainer)
    trainer.fit(Regressor(), make_loader(2), make_loader(1), ckpt_path=path)
    assert "on_sanity_check_start" not in events
    assert "on_train_start" not in events
    assert trainer.global_step == 4
