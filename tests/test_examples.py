"""The example scripts run end to end and leave what they promise: scores, checkpoints and TensorBoard files.

Each test loads a script from ``examples/`` by path, calls its ``main`` with a
short run under ``tmp_path`` and reads back the checkpoint (with
``torch.load(weights_only=True)``), the TensorBoard event files and the
printed summary. The MNIST example reads IDX files written here, so nothing
is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import re
import struct
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from event_files import read_events

import hookrt

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/{name}.py`` as the module ``hookrt_example_{name}``."""
    module_name = f"hookrt_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_seed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo the environment variables that seed_everything in each example's main sets."""
    monkeypatch.setenv("HOOKRT_GLOBAL_SEED", "0")
    monkeypatch.setenv("HOOKRT_SEED_WORKERS", "0")


# ---------------------------------------------------------------------- reading what a run left


def summary_tags(root: Path) -> set[str]:
    """Return the tags of every summary value that the default TensorBoard logger wrote under ``root``."""
    log_dir = root / "hookrt_logs" / "version_0"
    return {value.tag for record in read_events(log_dir) for value in record.summary.value}


def load_checkpoint_safely(path: Path | str) -> dict[str, Any]:
    """Load a checkpoint the way the contract promises it loads: no code from the file runs."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(checkpoint, dict)
    return checkpoint


def printed_path(output: str, label: str) -> Path:
    """Return the path printed on the line ``{label}: PATH``."""
    match = re.search(rf"^{re.escape(label)}: (\S+)", output, flags=re.MULTILINE)
    assert match is not None, f"no '{label}:' line in the output:\n{output}"
    return Path(match.group(1))


# ---------------------------------------------------------------------- digits


def test_digits_splits_partition_dataset():
    digits = load_example("digits")
    from sklearn.datasets import load_digits

    train, val, test = digits.load_splits(seed=0)

    assert (len(train), len(val), len(test)) == (1257, 270, 270)
    assert train.tensors[0].shape[1:] == (1, 8, 8)
    assert float(train.tensors[0].min()) >= 0.0
    assert float(train.tensors[0].max()) <= 1.0
    # Every image lands in exactly one split: the three together are the dataset, row for row.
    images = torch.cat([split.tensors[0] for split in (train, val, test)]).flatten(1) * digits.MAX_PIXEL
    labels = torch.cat([split.tensors[1] for split in (train, val, test)])
    rows = sorted(map(tuple, torch.cat([images, labels[:, None].float()], dim=1).tolist()))
    full = load_digits()
    expected = sorted(map(tuple, np.column_stack([full.data, full.target]).astype(float).tolist()))
    assert rows == expected


def test_digits_split_depends_on_seed():
    digits = load_example("digits")

    first = digits.load_splits(seed=0)[2].tensors[0]

    assert torch.equal(first, digits.load_splits(seed=0)[2].tensors[0])
    assert not torch.equal(first, digits.load_splits(seed=1)[2].tensors[0])


def test_digits_module_without_arguments():
    digits = load_example("digits")
    module = digits.DigitsModule()

    images, labels = next(iter(module.train_dataloader()))
    assert images.shape == (64, 1, 8, 8)
    assert module(images).shape == (64, 10)
    assert sum(len(loader.dataset) for loader in (module.train_dataloader(), module.val_dataloader(),
                                                  module.test_dataloader())) == 1797


def test_digits_one_epoch_outputs(tmp_path, capsys):
    digits = load_example("digits")

    metrics = digits.main(["--max-epochs", "1", "--default-root-dir", str(tmp_path), "--quiet", "--lr", "0.004"])

    assert set(metrics) == {"test_loss", "test_acc"}
    assert 0.0 <= metrics["test_acc"] <= 1.0
    output = capsys.readouterr().out
    assert f"test accuracy: {metrics['test_acc']:.2%}" in output
    best = printed_path(output, "best checkpoint")
    assert best.parent == tmp_path / "checkpoints"
    assert best.name.startswith("digits-0-")
    checkpoint = load_checkpoint_safely(best)
    assert checkpoint["epoch"] == 0
    assert checkpoint["hyper_parameters"]["batch_size"] == 64
    assert "classifier.4.weight" in checkpoint["state_dict"]
    assert printed_path(output, "TensorBoard logs") == tmp_path / "hookrt_logs" / "version_0"
    assert {"train_loss", "val_loss", "val_acc", "test_acc"} <= summary_tags(tmp_path)

    # The saved hyperparameters rebuild the module with the weights of the file.
    module = digits.DigitsModule.load_from_checkpoint(best)
    assert module.hparams.lr == pytest.approx(0.004)
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, checkpoint["state_dict"][name]), name


@pytest.mark.slow
def test_digits_reaches_95_percent(tmp_path, capsys):
    digits = load_example("digits")

    metrics = digits.main(["--default-root-dir", str(tmp_path), "--quiet"])

    assert metrics["test_acc"] >= 0.95
    assert "trained" in capsys.readouterr().out


# ---------------------------------------------------------------------- MNIST in the 0.5 style

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, three dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, one dimension


def write_mnist_split(raw: Path, split: str, count: int, rng: np.random.Generator) -> None:
    """Write ``count`` 28x28 records as ``{split}-images-idx3-ubyte`` and ``{split}-labels-idx1-ubyte``.

    Label k is a bright bar in row band k on a dark, noisy background, so the
    images differ by class. The header fields are big-endian uint32, as in MNIST.
    """
    labels = (np.arange(count) % 10).astype(np.uint8)
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(count, 28, 28), dtype=np.uint8)
    for image, label in zip(images, labels, strict=True):
        image[2 + 2 * label:4 + 2 * label, 4:24] = 255
    (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", IDX_IMAGES_MAGIC, count, 28, 28)
                                                     + images.tobytes())
    (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", IDX_LABELS_MAGIC, count) + labels.tobytes())


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    """A data folder holding a small MNIST in the layout torchvision reads: ``MNIST/raw/*-ubyte``."""
    pytest.importorskip("torchvision")
    data_dir = tmp_path / "data"
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(3)
    write_mnist_split(raw, "train", 400, rng)
    write_mnist_split(raw, "t10k", 100, rng)
    return data_dir


def test_mnist_local_files_detected(tmp_path, mnist_dir):
    mnist = load_example("mnist")

    assert mnist.mnist_is_local(str(mnist_dir))
    assert not mnist.mnist_is_local(str(tmp_path / "empty"))


def test_mnist_legacy_module_trains(tmp_path, mnist_dir, capsys):
    mnist = load_example("mnist")
    root = tmp_path / "run"

    metrics = mnist.main(["--data-dir", str(mnist_dir), "--max-epochs", "2", "--default-root-dir", str(root),
                          "--quiet"])

    # Two epochs on the synthetic bars are enough to separate them well.
    assert metrics["test_acc"] >= 0.8
    assert metrics["test_loss"] > 0
    output = capsys.readouterr().out
    assert f"test accuracy: {metrics['test_acc']:.2%}" in output
    best = printed_path(output, "best checkpoint")
    checkpoint = load_checkpoint_safely(best)
    assert checkpoint["hyper_parameters"]["data_dir"] == str(mnist_dir)
    assert checkpoint["state_dict"]["hidden.weight"].shape == (128, 28 * 28)
    assert {"train_loss", "val_loss", "val_acc", "test_acc"} <= summary_tags(root)
    assert os.listdir(mnist_dir / "MNIST") == ["raw"]  # read in place: nothing downloaded or unpacked


def test_mnist_rebuilds_from_hparams(tmp_path, mnist_dir, capsys):
    mnist = load_example("mnist")
    root = tmp_path / "run"
    mnist.main(["--data-dir", str(mnist_dir), "--max-epochs", "1", "--default-root-dir", str(root), "--quiet",
                "--hidden-dim", "32"])
    best = printed_path(capsys.readouterr().out, "best checkpoint")

    module = mnist.MNISTClassifier.load_from_checkpoint(best)

    assert module.hparams.hidden_dim == 32
    assert module.hidden.out_features == 32


# ---------------------------------------------------------------------- GAN


def test_gan_scores_on_known_points():
    gan = load_example("gan")
    centres = gan.mode_centres()

    assert gan.score_points(centres.repeat(10, 1)) == (1.0, 8)
    assert gan.score_points(centres[:1].repeat(80, 1)) == (1.0, 1)
    assert gan.score_points(torch.zeros(16, 2)) == (0.0, 0)


def test_gan_two_optimizers_step(tmp_path, capsys):
    gan = load_example("gan")

    scores = gan.main(["--max-epochs", "1", "--num-samples", "1024", "--default-root-dir", str(tmp_path), "--quiet"])

    assert set(scores) == {"val_precision", "val_modes"}
    assert 0.0 <= scores["val_precision"] <= 1.0
    assert scores["val_modes"] in {float(count) for count in range(9)}
    output = capsys.readouterr().out
    checkpoint = load_checkpoint_safely(printed_path(output, "best checkpoint"))
    batches = 1024 // 64
    # Each batch steps the generator and then the discriminator, and each step counts.
    assert checkpoint["global_step"] == 2 * batches
    assert len(checkpoint["optimizer_states"]) == 2
    assert {"g_loss", "d_loss", "val_modes", "generated_radius"} <= summary_tags(tmp_path)


# ---------------------------------------------------------------------- truncated BPTT


def test_tbptt_splits_and_beats_naive_forecast(tmp_path, capsys):
    tbptt = load_example("tbptt")

    scores = tbptt.main(["--max-epochs", "1", "--default-root-dir", str(tmp_path), "--quiet"])

    # One epoch already forecasts better than repeating the last noisy input.
    assert scores["val_mse"] < scores["naive_mse"]
    output = capsys.readouterr().out
    chunks = tbptt.SEQUENCE_LENGTH // 25
    batches = 256 // 32
    assert f"optimizer steps: {batches * chunks} ({chunks} per batch)" in output
    checkpoint = load_checkpoint_safely(printed_path(output, "best checkpoint"))
    assert checkpoint["global_step"] == batches * chunks
    assert {"train_mse", "val_mse", "naive_mse"} <= summary_tags(tmp_path)


def test_tbptt_hiddens_carried_between_chunks(tmp_path):
    tbptt = load_example("tbptt")
    received: list[tuple[int, int, bool, bool]] = []

    class Recording(tbptt.SineForecaster):
        def training_step(self, batch, batch_idx, hiddens):
            received.append((batch_idx, batch[0].shape[1], hiddens is None,
                             hiddens is not None and hiddens.requires_grad))
            return super().training_step(batch, batch_idx, hiddens)

    trainer = hookrt.Trainer(max_epochs=1, default_root_dir=str(tmp_path), truncated_bptt_steps=50,
                             limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Recording())

    per_batch = tbptt.SEQUENCE_LENGTH // 50
    expected_chunks = [(batch_idx, 50) for batch_idx in range(2) for _ in range(per_batch)]
    assert [(index, length) for index, length, _, _ in received] == expected_chunks
    assert [fresh for _, _, fresh, _ in received] == [True, False, False, False] * 2
    assert not any(requires_grad for _, _, _, requires_grad in received)


# ---------------------------------------------------------------------- a plugin written from scratch


def test_custom_plugins_report_and_checkpoint(tmp_path, capsys):
    example = load_example("custom_plugin")

    results = example.main(["--max-epochs", "2", "--default-root-dir", str(tmp_path), "--every-n-steps", "8"])

    assert results["max_grad_norm"] > 0
    assert results["step_time_ms"] > 0
    output = capsys.readouterr().out
    # The printed bus table puts the monitor before clipping, so the monitor measures unclipped gradients.
    assert output.index("GradientNormMonitor.measure") < output.index("GradientClipping.clip")
    assert "StepTimer.time_step" in output
    tags = summary_tags(tmp_path)
    assert {"grad_norm/optimizer_0", "step_time_ms", "val_loss"} <= tags
    steps = sorted(record.step for record in read_events(tmp_path / "hookrt_logs" / "version_0")
                   for value in record.summary.value if value.tag == "grad_norm/optimizer_0")
    assert steps == list(range(8, 2 * 32 + 1, 8))
    (path,) = (tmp_path / "checkpoints").glob("*.ckpt")
    checkpoint = load_checkpoint_safely(path)
    assert checkpoint["plugins"]["GradientNormMonitor"] == {"max_norm": pytest.approx(results["max_grad_norm"])}


def test_custom_monitor_failure_keeps_training(tmp_path, caplog):
    example = load_example("custom_plugin")

    class Broken(example.GradientNormMonitor):
        name = "BrokenMonitor"

        @hookrt.on("before_optimizer_step")
        def measure(self, payload):
            raise RuntimeError("broken monitor")

    trainer = hookrt.Trainer(max_epochs=1, default_root_dir=str(tmp_path), plugins=[Broken(every_n_steps=1)],
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_train_batches=3, num_sanity_val_steps=0)

    trainer.fit(example.Regressor())

    assert trainer.global_step == 3
    assert "'BrokenMonitor' failed in handler" in caplog.text
