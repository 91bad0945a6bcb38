"""MixedPrecision: autocast in every step method, loss scaling, unscaling before clipping, skipped steps."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt
from hookrt.plugins.clipping import GradientClipping
from hookrt.plugins.precision import MixedPrecision

QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def make_loader(batches=4, batch_size=4):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batches * batch_size, 3, generator=generator)
    y = 3 * x.sum(dim=1, keepdim=True)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class Regressor(hookrt.LightningModule):
    def __init__(self, optimizer="sgd", scheduler=False):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 1)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.dtypes: dict[str, torch.dtype] = {}

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        prediction = self(x)
        self.dtypes["train"] = prediction.dtype
        return F.mse_loss(prediction.float(), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        prediction = self(x)
        self.dtypes["validate"] = prediction.dtype
        self.log("val_loss", F.mse_loss(prediction.float(), y))

    def configure_optimizers(self):
        if self.optimizer == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=0.1)
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
        if not self.scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class StepObserver(hookrt.Plugin):
    """Records the gradient norm between unscaling and clipping, after the step, and each step's weights."""

    def __init__(self, inject_inf_at=None):
        self.inject_inf_at = inject_inf_at
        self.norms_before_clip: list[float] = []
        self.norms_after_step: list[float] = []
        self.skipped: list[bool] = []
        self.weights_before: list[torch.Tensor] = []
        self.weights_after: list[torch.Tensor] = []

    @hookrt.on("after_backward")
    def inject(self, payload):
        if payload.trainer.batch_idx == self.inject_inf_at:
            payload.module.layer.weight.grad[0, 0] = float("inf")

    @hookrt.on("before_optimizer_step")
    def before(self, payload):
        self.norms_before_clip.append(grad_norm(payload.module))
        self.weights_before.append(payload.module.layer.weight.detach().clone())

    @hookrt.on("optimizer_step")
    def after(self, payload):
        self.norms_after_step.append(grad_norm(payload.module))
        self.skipped.append(payload.skipped)
        self.weights_after.append(payload.module.layer.weight.detach().clone())


def grad_norm(module):
    return float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in module.parameters()])))


def small_scaler():
    # A scale of 2**8 keeps the float16 gradients of this model finite, so only injected infs skip steps.
    return torch.amp.GradScaler("cpu", init_scale=2.0**8)


def test_bf16_runs_steps_under_autocast():
    module = Regressor()
    before = module.layer.weight.detach().clone()
    trainer = hookrt.Trainer(max_epochs=1, plugins=[MixedPrecision("bf16-mixed")], **QUIET)
    trainer.fit(module, make_loader(), make_loader(2))

    assert module.dtypes == {"train": torch.bfloat16, "validate": torch.bfloat16}
    assert not torch.equal(module.layer.weight, before)
    assert module.layer.weight.dtype == torch.float32
    assert torch.isfinite(trainer.callback_metrics["val_loss"])


def test_bf16_has_no_scaler_state():
    plugin = MixedPrecision("bf16")
    trainer = hookrt.Trainer(max_epochs=1, plugins=[plugin], **QUIET)
    trainer.fit(Regressor(), make_loader(2))

    assert plugin.scaler is None
    assert plugin.state_dict() == {}


def test_16_mixed_clips_unscaled_gradients():
    module = Regressor()
    first_x, first_y = next(iter(make_loader()))
    float32_copy = copy.deepcopy(module)
    F.mse_loss(float32_copy(first_x), first_y).backward()
    float32_norm = grad_norm(float32_copy)
    clipping = GradientClipping(0.5)
    observer = StepObserver()
    trainer = hookrt.Trainer(max_epochs=1, plugins=[MixedPrecision("16-mixed", scaler=small_scaler()), clipping,
                                                   observer], **QUIET)
    trainer.fit(module, make_loader())

    assert module.dtypes["train"] == torch.float16
    assert observer.skipped == [False] * 4
    assert observer.norms_before_clip[0] == pytest.approx(float32_norm, rel=1e-2)
    assert float(clipping.last_norm) == pytest.approx(observer.norms_before_clip[-1], rel=1e-6)
    assert all(norm > 0.5 for norm in observer.norms_before_clip)
    assert all(norm == pytest.approx(0.5, rel=1e-4) for norm in observer.norms_after_step)


def test_16_mixed_skips_step_with_inf_gradient():
    module = Regressor(scheduler=True)
    observer = StepObserver(inject_inf_at=2)
    plugin = MixedPrecision("16-mixed", scaler=small_scaler())
    trainer = hookrt.Trainer(max_epochs=1, plugins=[plugin, observer], **QUIET)
    trainer.fit(module, make_loader())

    assert observer.skipped == [False, False, True, False]
    assert torch.equal(observer.weights_after[2], observer.weights_before[2])
    assert not torch.equal(observer.weights_after[3], observer.weights_before[3])
    assert trainer.global_step == 4
    assert plugin.scaler.get_scale() == 2.0**7
    # StepLR halves the rate on each applied step: 3 of the 4 steps were applied.
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**3)


def test_16_mixed_rejects_closure_optimizer():
    trainer = hookrt.Trainer(max_epochs=1, plugins=[MixedPrecision("16-mixed")], **QUIET)

    with pytest.raises(hookrt.MisconfigurationError,
                       match=r"cannot step LBFGS \(optimizer 0\): its step\(\) requires a closure.*bf16-mixed"):
        trainer.fit(Regressor(optimizer="lbfgs"), make_loader())


def test_bf16_allows_closure_optimizer():
    module = Regressor(optimizer="lbfgs")
    trainer = hookrt.Trainer(max_epochs=1, plugins=[MixedPrecision("bf16-mixed")], **QUIET)
    trainer.fit(module, make_loader(2))

    assert trainer.global_step == 2


def test_scaler_state_round_trips_checkpoint(tmp_path):
    plugin = MixedPrecision("16-mixed", scaler=small_scaler())
    observer = StepObserver(inject_inf_at=1)
    trainer = hookrt.Trainer(max_epochs=1, plugins=[plugin, observer], **QUIET)
    trainer.fit(Regressor(), make_loader())
    path = tmp_path / "mixed.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["plugins"]["MixedPrecision"]["scaler"]

    resumed = MixedPrecision("16-mixed")
    scales: list[float] = []
    trainer = hookrt.Trainer(max_epochs=2, plugins=[resumed], **QUIET)
    trainer.bus.subscribe("on_train_start", lambda payload: scales.append(resumed.scaler.get_scale()))
    trainer.fit(Regressor(), make_loader(), ckpt_path=path)

    assert saved["scale"] == 2.0**7
    assert scales == [2.0**7]


class ManualRegressor(Regressor):
    automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        optimizer.step()
        return loss


def test_16_mixed_manual_optimization():
    module = ManualRegressor()
    before = module.layer.weight.detach().clone()
    plugin = MixedPrecision("16-mixed", scaler=small_scaler())
    trainer = hookrt.Trainer(max_epochs=1, plugins=[plugin], **QUIET)
    trainer.fit(module, make_loader())

    assert trainer.global_step == 4
    assert not torch.equal(module.layer.weight, before)
    assert "step" not in vars(trainer.optimizers[0])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"precision": "32-true"}, r"precision='32-true'\) is not valid: use 'bf16-mixed' or '16-mixed'"),
        ({"precision": "fp8"}, r"precision='fp8'\) is not valid"),
        ({"precision": "bf16-mixed", "scaler": torch.amp.GradScaler("cpu")}, r"only '16-mixed' scales the loss"),
    ],
)
def test_precision_arguments_checked(arguments, message):
    with pytest.raises(hookrt.MisconfigurationError, match=message):
        MixedPrecision(**arguments)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_16_mixed_on_cuda():
    from hookrt.plugins.device import DevicePlacement

    module = Regressor()
    observer = StepObserver(inject_inf_at=1)
    plugin = MixedPrecision("16-mixed")
    trainer = hookrt.Trainer(max_epochs=1, plugins=[DevicePlacement("cuda"), plugin, observer], **QUIET)
    trainer.fit(module, make_loader(batches=8))

    assert module.dtypes["train"] == torch.float16
    assert plugin.device_type == "cuda"
    assert True in observer.skipped
    assert trainer.global_step == 8
