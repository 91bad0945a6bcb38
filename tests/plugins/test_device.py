"""DevicePlacement, device selection from the flags, the flag-to-plugin mapping, and DataParallel."""

from __future__ import annotations

import collections
import dataclasses
import os
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt
from hookrt._config import TrainerConfig
from hookrt.plugins.ddp import DistributedDataParallel
from hookrt.plugins.device import (
    DevicePlacement,
    move_to_device,
    plugins_from_flags,
    requested_devices,
    select_device,
    set_cublas_workspace,
)
from hookrt.plugins.dp import DataParallel
from hookrt.plugins.precision import MixedPrecision

QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
META = torch.device("meta")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Pair(NamedTuple):
    inputs: torch.Tensor
    label: str


@dataclasses.dataclass
class Sample:
    features: torch.Tensor
    weight: float


@dataclasses.dataclass(frozen=True)
class FrozenSample:
    features: torch.Tensor


class Regressor(hookrt.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 1)
        self.batch_devices: list[str] = []

    def forward(self, x):
        return self.layer(x)

    def on_train_batch_start(self, batch, batch_idx):
        self.batch_devices.append(batch[0].device.type)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_loader(batches=3, pin_memory=False):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batches * 4, 3, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4, pin_memory=pin_memory)


def config(**flags):
    defaults = {"precision": "32-true", "accelerator": "cpu", "devices": "auto", "strategy": "auto", "num_nodes": 1}
    return SimpleNamespace(**{**defaults, **flags})


# ---------------------------------------------------------------------- move_to_device


def test_move_to_device_nested_containers():
    tensor = torch.ones(2)
    batch = {
        "list": [tensor, "text", 3],
        "tuple": (tensor, None),
        "pair": Pair(tensor, "label"),
        "ordered": collections.OrderedDict(a=tensor),
        "sample": Sample(tensor, 0.5),
        "frozen": FrozenSample(tensor),
    }

    moved = move_to_device(batch, META)

    assert moved["list"][0].device == META
    assert moved["list"][1:] == ["text", 3]
    assert type(moved["tuple"]) is tuple
    assert moved["tuple"][0].device == META
    assert type(moved["pair"]) is Pair
    assert moved["pair"].inputs.device == META
    assert moved["pair"].label == "label"
    assert type(moved["ordered"]) is collections.OrderedDict
    assert moved["ordered"]["a"].device == META
    assert type(moved["sample"]) is Sample
    assert moved["sample"].features.device == META
    assert moved["sample"].weight == 0.5
    assert moved["frozen"].features.device == META
    assert batch["sample"].features.device.type == "cpu"


def test_move_to_device_leaves_other_objects():
    marker = object()
    counts = collections.defaultdict(int, a=1)

    assert move_to_device(marker, META) is marker
    assert move_to_device("text", META) == "text"
    assert move_to_device(counts, META) == {"a": 1}


# ---------------------------------------------------------------------- device selection


def test_select_device_cpu():
    assert select_device("cpu") == torch.device("cpu")
    assert requested_devices("cpu", 3) == ("cpu", [0, 1, 2])
    assert requested_devices("cpu", "2") == ("cpu", [0, 1])
    assert requested_devices("cpu", "auto") == ("cpu", [0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_select_device_auto_without_gpu():
    assert select_device("auto") == torch.device("cpu")
    with pytest.raises(hookrt.MisconfigurationError, match=r"accelerator='cuda'\) found no CUDA device"):
        select_device("cuda")


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        (0, r"devices=0\) is not valid"),
        ([0, 0], r"lists a device twice"),
        ("many", r"devices='many'\) is not valid"),
        (True, r"devices=True\) is not valid"),
    ],
)
def test_requested_devices_rejects(devices, message):
    with pytest.raises(hookrt.MisconfigurationError, match=message):
        requested_devices("cpu", devices)


def test_set_cublas_workspace_keeps_user_value(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    set_cublas_workspace()

    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    set_cublas_workspace()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


# ---------------------------------------------------------------------- flags to plugins


def test_flags_single_cpu_add_nothing():
    assert plugins_from_flags(config(), []) == []


def test_flags_precision_adds_mixed_precision():
    added = plugins_from_flags(config(precision="bf16-mixed"), [])

    assert len(added) == 1
    assert isinstance(added[0], MixedPrecision)
    assert added[0].device_type == "cpu"


def test_flags_several_cpu_devices_add_ddp():
    added = plugins_from_flags(config(devices=2), [])

    assert len(added) == 1
    assert isinstance(added[0], DistributedDataParallel)
    assert added[0].num_processes == 2


def test_flags_keep_user_strategy_and_precision():
    user = [DistributedDataParallel(num_processes=3), MixedPrecision("16-mixed")]

    assert plugins_from_flags(config(devices=2, strategy="ddp", precision="16-mixed"), user) == []


def test_flags_strategy_instance_used():
    strategy = DistributedDataParallel(num_processes=2)

    assert plugins_from_flags(config(strategy=strategy), []) == [strategy]


def test_flags_real_config_accepted():
    flags = dict(max_epochs=None, min_epochs=None, max_steps=-1, min_steps=None, max_time=None, logger=False,
                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                 enable_signal_handler=True, default_root_dir=None, accumulate_grad_batches=1, gradient_clip_val=None,
                 gradient_clip_algorithm="norm", val_check_interval=1.0, check_val_every_n_epoch=1,
                 num_sanity_val_steps=2, limit_train_batches=1.0, limit_val_batches=1.0, limit_test_batches=1.0,
                 limit_predict_batches=1.0, fast_dev_run=False, truncated_bptt_steps=None, log_every_n_steps=50,
                 precision="16", accelerator="cpu", devices=1, num_nodes=1, strategy="ddp", deterministic=False,
                 detect_anomaly=False)

    added = plugins_from_flags(TrainerConfig.from_flags(**flags), [])

    assert [type(plugin) for plugin in added] == [DistributedDataParallel, MixedPrecision]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"strategy": "single_device", "devices": 2}, r"strategy='single_device'\) conflicts with 2 device"),
        ({"strategy": "dp"}, r"strategy='dp'\) needs CUDA GPUs on one machine"),
        ({"strategy": 3}, r"strategy=3\) is not valid"),
    ],
)
def test_flags_conflicts_rejected(flags, message):
    with pytest.raises(hookrt.MisconfigurationError, match=message):
        plugins_from_flags(config(**flags), [])


# ---------------------------------------------------------------------- placement in a run


def test_placement_on_cpu_trains_and_predicts():
    module = Regressor()
    placement = DevicePlacement("cpu")
    trainer = hookrt.Trainer(max_epochs=1, plugins=[placement], **QUIET)
    trainer.fit(module, make_loader(), make_loader(1))
    predictions = trainer.predict(module, make_loader(2))

    assert placement.device == torch.device("cpu")
    assert module.batch_devices == ["cpu"] * 3
    assert len(predictions) == 2


def test_data_parallel_warns_without_two_gpus():
    module = Regressor()
    trainer = hookrt.Trainer(max_epochs=1, plugins=[DataParallel()], **QUIET)

    with pytest.warns(hookrt.HookrtWarning, match=r"DataParallel found \d+ CUDA device\(s\).*needs two or more GPUs"):
        trainer.fit(module, make_loader())

    assert trainer.global_step == 3


@needs_cuda
@pytest.mark.cuda
def test_placement_on_cuda_moves_module_and_batches():
    module = Regressor()
    trainer = hookrt.Trainer(max_epochs=1, plugins=[DevicePlacement(accelerator="cuda")], deterministic=True,
                             **QUIET)
    trainer.fit(module, make_loader(pin_memory=True), make_loader(1))
    predictions = trainer.predict(module, make_loader(1))

    assert module.device.type == "cuda"
    assert module.batch_devices == ["cuda"] * 3
    assert predictions[0].device.type == "cuda"


@needs_cuda
@pytest.mark.cuda
def test_move_pinned_batch_to_cuda():
    batch = [torch.arange(4.0).pin_memory()]

    moved = move_to_device(batch, torch.device("cuda", 0))
    torch.cuda.synchronize()

    assert moved[0].device.type == "cuda"
    assert moved[0].cpu().tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_data_parallel_splits_batches():
    module = Regressor()
    trainer = hookrt.Trainer(max_epochs=1, plugins=[DevicePlacement("cuda:0"), DataParallel()], **QUIET)
    trainer.fit(module, make_loader())

    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["loss"])
