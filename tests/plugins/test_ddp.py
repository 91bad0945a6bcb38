"""DistributedDataParallel: the batch sampler, loader sharding, launching and multi-process training on gloo.

The multi-process checks run in one two-process job (tests/jobs/ddp_checks.py),
started with the environment variables torchrun sets. The tests below assert on
what each rank of it reported. One more test lets the plugin start the
processes itself.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

import hookrt
from hookrt import _distributed as distributed
from hookrt.plugins.ddp import DistributedBatchSampler, DistributedDataParallel, _shard_loader

REPOSITORY = Path(__file__).resolve().parents[2]
JOBS = REPOSITORY / "tests" / "jobs"
#: Seconds the two-process job may take in all before it is killed.
JOB_TIMEOUT = 240
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def models(monkeypatch):
    """The shared module file, imported by name so that processes started by spawn can import it too."""
    monkeypatch.syspath_prepend(str(JOBS))
    import ddp_models

    return ddp_models


@pytest.fixture(autouse=True)
def _no_launcher_environment(monkeypatch):
    for variable in LAUNCHER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def shares(length, batch_size, replicas, drop_last=False, shuffle=True, epoch=0):
    """Return every rank's batches for one epoch."""
    result = []
    for rank in range(replicas):
        sampler = DistributedBatchSampler(length, batch_size, num_replicas=replicas, rank=rank, shuffle=shuffle,
                                          seed=7, drop_last=drop_last)
        sampler.set_epoch(epoch)
        result.append(list(sampler))
    return result


# ---------------------------------------------------------------------- DistributedBatchSampler


@settings(max_examples=300, deadline=None)
@given(length=st.integers(0, 60), batch_size=st.integers(1, 7), replicas=st.integers(1, 4), drop_last=st.booleans(),
       epoch=st.integers(0, 3))
def test_batch_sampler_shares_cover_data(length, batch_size, replicas, drop_last, epoch):
    every_rank = shares(length, batch_size, replicas, drop_last=drop_last, epoch=epoch)
    expected_batches = len(DistributedBatchSampler(length, batch_size, num_replicas=replicas, rank=0,
                                                   drop_last=drop_last))
    samples = [index for batches in every_rank for batch in batches for index in batch]

    assert [len(batches) for batches in every_rank] == [expected_batches] * replicas
    assert all(1 <= len(batch) <= batch_size for batches in every_rank for batch in batches)
    if drop_last:
        assert all(len(batch) == batch_size for batches in every_rank for batch in batches)
        assert len(set(samples)) == len(samples)
        assert len(samples) == expected_batches * batch_size * replicas
    else:
        assert set(samples) == set(range(length))
        if batch_size > 1 and length >= replicas:
            assert len(set(samples)) == len(samples)


def test_batch_sampler_matches_one_rank_global_batches():
    two_ranks = shares(24, 3, 2)
    one_rank = shares(24, 6, 1)[0]

    for step, global_batch in enumerate(one_rank):
        assert sorted(two_ranks[0][step] + two_ranks[1][step]) == sorted(global_batch)


def test_batch_sampler_uneven_share_splits_last_batch():
    every_rank = shares(9, 4, 2, shuffle=False)

    assert [len(batch) for batch in every_rank[0]] == [4, 1]
    assert [len(batch) for batch in every_rank[1]] == [3, 1]


def test_batch_sampler_reshuffles_per_epoch():
    first = shares(30, 5, 2, epoch=0)
    second = shares(30, 5, 2, epoch=1)
    again = shares(30, 5, 2, epoch=0)

    assert first != second
    assert first == again


def test_batch_sampler_rejects_bad_rank():
    with pytest.raises(hookrt.MisconfigurationError, match=r"need length >= 0, batch_size >= 1 and 0 <= rank"):
        DistributedBatchSampler(10, 2, num_replicas=2, rank=2)


# ---------------------------------------------------------------------- loader sharding


def test_shard_loader_keeps_loader_options():
    dataset = TensorDataset(torch.arange(10))
    collate = torch.utils.data.default_collate
    loader = DataLoader(dataset, batch_size=3, shuffle=True, drop_last=True, collate_fn=collate)

    sharded = _shard_loader(loader, "the training loader", seed=3)

    assert isinstance(sharded.batch_sampler, DistributedBatchSampler)
    assert sharded.batch_sampler.shuffle is True
    assert sharded.batch_sampler.drop_last is True
    assert sharded.batch_sampler.seed == 3
    assert sharded.collate_fn is collate
    assert len(sharded) == 3


def test_shard_loader_sequential_stays_in_order():
    loader = DataLoader(TensorDataset(torch.arange(7)), batch_size=3)

    sharded = _shard_loader(loader, "the training loader", seed=0)

    assert [batch[0].tolist() for batch in sharded] == [[0, 1, 2], [3, 4, 5], [6]]


def test_shard_loader_leaves_custom_sampler():
    dataset = TensorDataset(torch.arange(8))
    loader = DataLoader(dataset, batch_size=2, sampler=WeightedRandomSampler([1.0] * 8, 8))

    with pytest.warns(hookrt.HookrtWarning, match=r"did not shard the training loader: it has its own sampler"):
        sharded = _shard_loader(loader, "the training loader", seed=0)

    assert sharded is loader


def test_shard_loader_leaves_plain_iterables():
    batches = [torch.zeros(2), torch.ones(2)]

    with pytest.warns(hookrt.HookrtWarning, match=r"cannot shard the training loader: it is a list"):
        assert _shard_loader(batches, "the training loader", seed=0) is batches


# ---------------------------------------------------------------------- one process, no launcher


def counting_allreduce(state, bucket):
    state["calls"] += 1
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def test_one_process_ddp_matches_plain_fit(models):
    counter = {"calls": 0}
    plugin = DistributedDataParallel(timeout=30, comm_hook=counting_allreduce, comm_hook_state=counter)
    module = models.Regressor(momentum=0.9)
    trainer = hookrt.Trainer(max_epochs=2, accumulate_grad_batches=2, plugins=[plugin], **models.QUIET)
    trainer.fit(module, models.indexed_loader(20, 4))
    reference = models.Regressor(momentum=0.9)
    reference_trainer = hookrt.Trainer(max_epochs=2, accumulate_grad_batches=2, **models.QUIET)
    reference_trainer.fit(reference, models.indexed_loader(20, 4))

    assert torch.allclose(models.weights(module), models.weights(reference), atol=1e-6)
    assert counter["calls"] == trainer.global_step == 6
    assert plugin.ddp_module is None
    assert not distributed.is_initialized()


def test_user_created_group_left_at_exit(monkeypatch, models):
    from torch.distributed import HashStore

    registered = []
    monkeypatch.setattr(distributed, "_leave_registered", False)
    monkeypatch.setattr(distributed.atexit, "register", registered.append)
    dist.init_process_group("gloo", store=HashStore(), rank=0, world_size=1)
    try:
        trainer = hookrt.Trainer(max_epochs=1, plugins=[DistributedDataParallel()], **models.QUIET)
        trainer.fit(models.Regressor(), models.indexed_loader(8, 4))
    finally:
        dist.destroy_process_group()

    assert registered == [distributed.leave_process_group]


def test_sync_batchnorm_needs_cuda(models):
    plugin = DistributedDataParallel(sync_batchnorm=True)
    trainer = hookrt.Trainer(max_epochs=1, plugins=[plugin], **models.QUIET)

    with pytest.raises(hookrt.MisconfigurationError, match=r"sync_batchnorm=True\) needs CUDA modules"):
        trainer.fit(models.Regressor(), models.indexed_loader(8, 4))
    assert not distributed.is_initialized()


def test_needs_launch_follows_devices_and_environment(monkeypatch, models):
    plugin = DistributedDataParallel()
    one = hookrt.Trainer(devices=1, plugins=[plugin], **models.QUIET)
    two = hookrt.Trainer(devices=2, plugins=[DistributedDataParallel()], **models.QUIET)

    assert plugin.needs_launch(one) is False
    assert two.strategy.needs_launch(two) is True
    for variable, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(variable, value)
    assert two.strategy.needs_launch(two) is False


def test_several_nodes_need_launcher(models):
    trainer = hookrt.Trainer(devices=2, num_nodes=2, plugins=[DistributedDataParallel()], **models.QUIET)

    with pytest.raises(hookrt.MisconfigurationError, match=r"num_nodes=2\) needs a launcher on every machine"):
        trainer.fit(models.Regressor(), models.indexed_loader(8, 4))


class Unpicklable(hookrt.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.transform = lambda x: x


def test_unpicklable_module_is_named(models):
    trainer = hookrt.Trainer(devices=2, plugins=[DistributedDataParallel()], **models.QUIET)

    with pytest.raises(hookrt.MisconfigurationError,
                       match=r"the module Unpicklable cannot be pickled .*torchrun --nproc-per-node=2"):
        trainer.fit(Unpicklable(), models.indexed_loader(8, 4))


def test_unpicklable_loader_is_named(models):
    loader = DataLoader(models.indexed_dataset(8), batch_size=4, collate_fn=lambda items: items)
    trainer = hookrt.Trainer(devices=2, plugins=[DistributedDataParallel()], **models.QUIET)

    with pytest.raises(hookrt.MisconfigurationError,
                       match=r"the argument train_dataloaders=DataLoader cannot be pickled"):
        trainer.fit(models.Regressor(), loader)


def test_all_gather_without_group_returns_input(models):
    module = models.Regressor()
    data = {"value": torch.tensor([1.0, 2.0])}

    assert module.all_gather(data) is data


# ---------------------------------------------------------------------- two processes


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Run tests/jobs/ddp_checks.py as two gloo processes; return each rank's report."""
    output = tmp_path_factory.mktemp("ddp_job")
    port = distributed.find_free_port()
    environment = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), environment.get("PYTHONPATH")]))
    processes = []
    for rank in range(2):
        # PYTHONFAULTHANDLER: a rank that dies by a signal prints every thread's Python stack into its log.
        variables = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONFAULTHANDLER": "1"}
        processes.append(subprocess.Popen(
            [sys.executable, str(JOBS / "ddp_checks.py"), str(output)], env={**environment, **variables},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    logs = []
    try:
        for process in processes:
            logs.append(process.communicate(timeout=JOB_TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        pytest.fail(f"the DDP job did not finish within {JOB_TIMEOUT} s")
    for rank, process in enumerate(processes):
        if process.returncode != 0:
            pytest.fail(f"rank {rank} of the DDP job exited with {process.returncode}:\n{logs[rank][-4000:]}")
    reports = []
    for rank in range(2):
        report = json.loads((output / f"rank{rank}.json").read_text())
        report["exit"] = json.loads((output / f"rank{rank}-exit.json").read_text())
        reports.append(report)
    return reports


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_matches_one_process_run(job):
    for report in job:
        assert report["weights"]["max_difference"] < 1e-6
        assert report["weights"]["changed"] > 0.1
        assert report["weights"]["steps"] == report["weights"]["reference_steps"] == 4


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_replicas_stay_equal(job):
    assert job[0]["weights"]["ranks_equal"] is True


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_allreduces_once_per_step(job):
    # 4 batches per rank and epoch with accumulate_grad_batches=3: windows [3, 1], so 2 steps per epoch.
    for report in job:
        assert report["weights"]["allreduce_calls"] == report["weights"]["steps"] == 4


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_shares_disjoint_and_complete(job):
    for case in job[0]["sampling"]:
        if case["drop_last"]:
            continue
        for epoch in case["epochs"]:
            label = f"length {case['length']}, batch size {case['batch_size']}"
            assert epoch["repeated"] == 0, label
            assert epoch["missing"] == [], label
            assert len(set(epoch["batches_per_rank"])) == 1, label
            assert epoch["largest_batch"] <= case["batch_size"], label


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_drop_last_kept(job):
    case = next(case for case in job[0]["sampling"] if case["drop_last"])

    for epoch in case["epochs"]:
        assert epoch["batches_per_rank"] == [2, 2]
        assert epoch["repeated"] == 0
        assert len(epoch["missing"]) == case["length"] - 2 * 2 * case["batch_size"]


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_shuffle_kept(job):
    for case in job[0]["sampling"]:
        first, second = case["epochs"]
        assert first["order"] != second["order"]
        assert first["order"] != sorted(first["order"])


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_sync_dist_and_all_gather(job):
    for rank, report in enumerate(job):
        assert report["sync"]["rank_mean"] == 0.5
        assert report["sync"]["rank_max"] == 1.0
        assert report["sync"]["gathered"] == [[0, 10], [1, 11]]
        assert report["sync"]["world_size"] == 2
        assert report["sync"]["is_global_zero"] is (rank == 0)


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_only_rank_zero_writes(job):
    written = job[0]["files"]["files"]

    assert any(name.startswith("checkpoints/") and name.endswith(".ckpt") for name in written)
    assert any(name.endswith("metrics.csv") for name in written)
    assert job[1]["files"]["files"] == []


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_interrupted_run_resumes_exactly(job):
    for report in job:
        assert report["resume"]["rank_states"] == 2
        assert report["resume"]["visible_after_save"] is True
        assert report["resume"]["resumed_steps"] == report["resume"]["steps"]
        assert report["resume"]["max_difference"] == 0.0


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_signal_on_one_rank_stops_both(job):
    rank_zero, rank_one = (report["signal"] for report in job)

    assert rank_one["received"] == signal.SIGTERM
    assert rank_zero["received"] == signal.SIGTERM
    # Rank 1 records the signal during batch 2. The ranks exchange it after batch 2 without waiting and read
    # the result after batch 3, so both stop there.
    assert rank_zero["steps"] == rank_one["steps"] == 4
    assert rank_zero["epoch"] == rank_one["epoch"] == 0
    assert rank_zero["checkpoint"] == rank_one["checkpoint"]
    assert rank_zero["checkpoint_exists"] and rank_one["checkpoint_exists"]


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_stop_on_one_rank_stops_both(job):
    rank_zero, rank_one = (report["stop"] for report in job)

    # 40 samples in batches of 4 on 2 ranks: 5 steps an epoch. A request after batch 2 is agreed one batch
    # later, so both ranks stop after batch 3.
    assert rank_zero["mid_epoch"] == rank_one["mid_epoch"] == {"steps": 4, "epoch": 0}
    assert rank_zero["epoch_end"] == rank_one["epoch_end"] == {"steps": 10, "epoch": 2}


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_group_destroyed_before_interpreter_exit(job):
    # A group left to interpreter finalization can abort a finished run with SIGABRT (see leave_process_group).
    for report in job:
        assert report["exit"]["group_alive"] is False


def test_launch_names_class_missing_in_started_process():
    from hookrt import _launch

    # What a started process receives for a class defined inside the caller's `if __name__ == "__main__":`.
    job_bytes = b"c__main__\nDefinedUnderMainGuard\n."

    with pytest.raises(hookrt.MisconfigurationError, match=r"define them at the top level of an importable file"):
        _launch._load_job(job_bytes)


def test_launch_raises_first_recorded_error(tmp_path):
    from hookrt import _launch

    _launch._write_error(ValueError("bad batch on rank 1"), 1, str(tmp_path))
    _launch._write_error(RuntimeError("Connection closed by peer"), 0, str(tmp_path))
    # Rank 1 failed first; rank 0 failed a second later, when its all-reduce lost its peer.
    os.utime(tmp_path / "error-rank00001.pkl", ns=(1_000_000_000, 1_000_000_000))
    os.utime(tmp_path / "error-rank00000.pkl", ns=(2_000_000_000, 2_000_000_000))

    error = _launch._first_recorded_error(str(tmp_path))

    assert isinstance(error, ValueError)
    assert str(error) == "bad batch on rank 1"


@pytest.mark.slow
@pytest.mark.distributed
def test_spawned_fit_raises_failing_rank_error(models):
    # Rank 0 fails too, later, with a connection error in its all-reduce; the caller gets rank 1's own error.
    plugin = DistributedDataParallel(timeout=60, launch_timeout=JOB_TIMEOUT)
    trainer = hookrt.Trainer(max_epochs=1, devices=2, plugins=[plugin], **models.QUIET)

    with pytest.raises(ValueError, match="bad batch 1 on rank 1"):
        trainer.fit(models.FailsOnRankOne(), models.indexed_loader(16, 4))


@pytest.mark.slow
@pytest.mark.distributed
def test_spawned_fit_returns_rank_zero_results(models):
    module = models.Regressor(momentum=0.9)
    plugin = DistributedDataParallel(timeout=60, launch_timeout=JOB_TIMEOUT)
    trainer = hookrt.Trainer(max_epochs=2, devices=2, plugins=[plugin], **models.QUIET)
    trainer.fit(module, models.indexed_loader(32, 4, shuffle=True))
    reference = models.Regressor(momentum=0.9)
    sampler = DistributedBatchSampler(32, 8, num_replicas=1, rank=0, shuffle=True, seed=0)
    reference_trainer = hookrt.Trainer(max_epochs=2, **models.QUIET)
    reference_trainer.fit(reference, DataLoader(models.indexed_dataset(32), batch_sampler=sampler))

    assert torch.allclose(models.weights(module), models.weights(reference), atol=1e-6)
    assert trainer.global_step == 8
    assert trainer.current_epoch == 2
    assert math.isfinite(float(trainer.callback_metrics["train_loss"]))
    assert not dist.is_initialized()


# ---------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs for nccl")
def test_nccl_fit_on_two_gpus(models):
    module = models.Regressor(momentum=0.9)
    plugin = DistributedDataParallel(timeout=60, launch_timeout=JOB_TIMEOUT, sync_batchnorm=True)
    trainer = hookrt.Trainer(max_epochs=2, accelerator="cuda", devices=2, plugins=[plugin], **models.QUIET)
    from hookrt.plugins.device import DevicePlacement

    trainer.bus.register(DevicePlacement(accelerator="cuda", devices=2))
    trainer.fit(module, models.indexed_loader(32, 4, shuffle=True))

    assert trainer.global_step == 8
    assert module.layer.weight.device.type == "cpu"
