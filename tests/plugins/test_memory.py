from __future__ import annotations

import logging
import os
import sys
import types

import pytest
import torch

import hookrt
from hookrt.plugins import memory as memory_module
from hookrt.plugins.csv_logger import CSVLogger
from hookrt.plugins.memory import MemoryProbe, cuda_memory, host_memory

needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc, which only Linux has")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_proc
def test_host_memory_reports_rss_and_peak():
    before = host_memory()
    block = bytearray(64 * 1024 * 1024)
    block[::4096] = b"\x01" * len(block[::4096])  # touch every page so it becomes resident
    after = host_memory()

    assert set(before) == {"memory/host/rss_mib", "memory/host/peak_rss_mib"}
    assert after["memory/host/rss_mib"] >= before["memory/host/rss_mib"] + 32
    assert after["memory/host/peak_rss_mib"] >= after["memory/host/rss_mib"] - 1
    del block


@needs_proc
def test_samples_every_n_steps(make_trainer, run_fit):
    trainer = make_trainer(max_epochs=2, num_training_batches=4, log_every_n_steps=100)
    trainer.register(CSVLogger())
    probe = MemoryProbe(every_n_steps=3)
    trainer.register(probe)

    run_fit(trainer)

    steps = [step for metrics, step in trainer.log_calls if "memory/host/rss_mib" in metrics]
    assert steps == [3, 6]
    sample = next(metrics for metrics, _ in trainer.log_calls if "memory/host/rss_mib" in metrics)
    assert sample["memory/host/rss_mib"] > 0


@needs_proc
def test_samples_when_steps_jump_past_multiple(make_trainer, run_fit):
    optimizers = [torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1) for _ in range(2)]
    trainer = make_trainer(max_epochs=1, num_training_batches=4, log_every_n_steps=100, optimizers=optimizers)
    trainer.register(CSVLogger())
    trainer.register(MemoryProbe(every_n_steps=3))

    run_fit(trainer)

    # global_step after each batch: 2, 4, 6, 8; 4 and 6 each pass a multiple of 3.
    steps = [step for metrics, step in trainer.log_calls if "memory/host/rss_mib" in metrics]
    assert steps == [4, 6]


@needs_proc
def test_summary_logged_at_fit_end(make_trainer, run_fit, caplog):
    trainer = make_trainer(max_epochs=1)
    trainer.register(CSVLogger())
    probe = MemoryProbe(every_n_steps=1)
    trainer.register(probe)

    with caplog.at_level(logging.INFO, logger="hookrt.plugins.memory"):
        run_fit(trainer)

    sampled = [metrics["memory/host/rss_mib"] for metrics, _ in trainer.log_calls if "memory/host/rss_mib" in metrics]
    assert probe.summary["memory/host/rss_mib"] >= max(sampled)
    assert probe.summary["memory/host/peak_rss_mib"] > 0
    messages = [record.getMessage() for record in caplog.records if record.levelno == logging.INFO]
    assert len(messages) == 1
    assert messages[0].startswith("Peak memory over the run:")
    assert "memory/host/peak_rss_mib" in messages[0]


def test_cpu_module_reads_no_cuda_device(make_trainer, run_fit):
    trainer = make_trainer(max_epochs=1)
    trainer.register(CSVLogger())
    probe = MemoryProbe(every_n_steps=1)
    trainer.register(probe)

    run_fit(trainer)

    assert not any(name.startswith("memory/cuda") for name in probe.summary)



def test_cuda_availability_queried_once_per_fit(make_trainer, run_fit, monkeypatch):
    # The query costs tens of microseconds on a machine without a GPU, so the probe makes it when fit
    # starts and not at each sample.
    queries: list[bool] = []
    available = torch.cuda.is_available

    def counting() -> bool:
        queries.append(True)
        return available()

    monkeypatch.setattr(torch.cuda, "is_available", counting)
    trainer = make_trainer(max_epochs=2, num_training_batches=4)
    trainer.register(CSVLogger())
    trainer.register(MemoryProbe(every_n_steps=1))

    run_fit(trainer)

    samples = [step for metrics, step in trainer.log_calls if "memory/host/rss_mib" in metrics]
    assert len(samples) == 8
    assert len(queries) == 1



class FailingModule(hookrt.LightningModule):
    cuda_index = 0

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        raise RuntimeError("training failed")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_failed_fit_leaves_no_devices_behind(tmp_path, monkeypatch):
    # The CUDA calls are replaced, so the test runs without a GPU: each module names its own device.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memory_module, "_cuda_devices", lambda module: [torch.device("cuda", module.cuda_index)])
    monkeypatch.setattr(memory_module, "cuda_memory", lambda device: {f"memory/cuda{device.index}/allocated_mib": 1.0})
    probe = MemoryProbe()
    trainer = hookrt.Trainer(max_epochs=1, plugins=[probe], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                             default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="training failed"):
        trainer.fit(FailingModule(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2))))

    other = types.SimpleNamespace(cuda_index=1)
    assert "memory/cuda1/allocated_mib" in probe.sample(other)
    assert "memory/cuda0/allocated_mib" not in probe.sample(other)

@needs_cuda
def test_cuda_statistics_per_device(make_trainer, run_fit):
    module = torch.nn.Linear(256, 256).cuda()
    trainer = make_trainer(max_epochs=1, num_training_batches=2, log_every_n_steps=100)
    trainer.module = module
    trainer.bus.module = module
    trainer.register(CSVLogger())
    probe = MemoryProbe(every_n_steps=1)
    trainer.register(probe)

    run_fit(trainer)

    index = module.weight.device.index
    prefix = f"memory/cuda{index}"
    assert probe.summary[f"{prefix}/allocated_mib"] >= 256 * 257 * 4 / 2**20
    assert probe.summary[f"{prefix}/reserved_mib"] >= probe.summary[f"{prefix}/allocated_mib"]
    assert probe.summary[f"{prefix}/max_allocated_mib"] >= probe.summary[f"{prefix}/allocated_mib"]
    logged = [metrics for metrics, _ in trainer.log_calls if f"{prefix}/allocated_mib" in metrics]
    assert len(logged) == 2


@needs_cuda
def test_cuda_memory_matches_allocator():
    device = torch.device("cuda", torch.cuda.current_device())
    block = torch.empty(1024, 1024, device=device)
    values = cuda_memory(device)

    assert values[f"memory/cuda{device.index}/allocated_mib"] == torch.cuda.memory_allocated(device) / 2**20
    assert values[f"memory/cuda{device.index}/allocated_mib"] >= 4
    del block


@pytest.mark.skipif(sys.platform != "linux", reason="the units of ru_maxrss checked here are Linux's")
def test_peak_rss_in_mib_on_linux():
    import resource

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    assert host_memory()["memory/host/peak_rss_mib"] == pytest.approx(peak_kib / 1024, rel=0.05)


@pytest.mark.parametrize("value", [0, -5, 2.5, True])
def test_invalid_every_n_steps_raises(value):
    with pytest.raises(hookrt.MisconfigurationError, match=r"every_n_steps must be a positive int"):
        MemoryProbe(every_n_steps=value)
