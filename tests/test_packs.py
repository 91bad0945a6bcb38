"""Drop-in plugin packs: the example and rich packs found by name after pip installed them, and broken packs."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt
from hookrt import cli
from hookrt._registry import available_plugins, plugin_entries, resolve_plugin

QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}

SPIKY_SOURCE = '''
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt


class Spiky(hookrt.LightningModule):
    """A module whose loss is constant except at batch 4, where it is 100 times larger."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        return loss * 100 if batch_idx == 4 else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        x = torch.ones(16, 2)
        return DataLoader(TensorDataset(x, torch.zeros(16, 1)), batch_size=2)
'''


def require_distribution(name: str) -> None:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{name} is not installed; install the packs with "
                    "`pip install -e plugins/example -e plugins/rich` to run this test")


class SpikeAt(hookrt.LightningModule):
    """A linear model with a learning rate of 0, so its loss is the same on every batch but ``spike_batch``."""

    def __init__(self, spike_batch: int, batches: int = 12):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 4)
        self.head = torch.nn.Linear(4, 1)
        self.spike_batch = spike_batch
        self.batches = batches

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.head(self.layer(x)), y)
        return {"loss": loss * 100 if batch_idx == self.spike_batch else loss}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self.head(self.layer(x)), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        x = torch.ones(self.batches * 2, 3)
        return DataLoader(TensorDataset(x, torch.zeros(self.batches * 2, 1)), batch_size=2)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(4, 3), torch.zeros(4, 1)), batch_size=2)


@pytest.fixture
def spiky_file(tmp_path: Path) -> str:
    path = tmp_path / "spiky.py"
    path.write_text(SPIKY_SOURCE)
    return f"{path}:Spiky"


def cli_quiet(tmp_path: Path) -> list[str]:
    return [
        "--max-epochs", "1", "--logger", "false", "--enable-checkpointing", "false",
        "--enable-progress-bar", "false", "--enable-model-summary", "false",
        "--default-root-dir", str(tmp_path / "runs"),
    ]


# ---------------------------------------------------------------------- example pack


def test_example_pack_by_name(caplog):
    require_distribution("hookrt-example-pack")
    trainer = hookrt.Trainer(max_epochs=1, plugins=["example"], **QUIET)
    caplog.set_level(logging.WARNING, logger="hookrt_example_pack")

    trainer.fit(SpikeAt(spike_batch=11))

    from hookrt_example_pack import LossSpike, LossSpikeDetector

    detector = next(plugin for plugin in trainer.plugins if isinstance(plugin, LossSpikeDetector))
    assert len(detector.spikes) == 1
    spike = detector.spikes[0]
    assert spike.step == 12
    assert spike.loss == pytest.approx(100 * spike.mean)
    assert isinstance(spike, LossSpike)
    messages = [record.getMessage() for record in caplog.records if record.name == "hookrt_example_pack"]
    assert len(messages) == 1
    assert messages[0].startswith("Loss spike at global step 12: loss ")
    assert "100.0 times the running mean" in messages[0]


def test_example_pack_warmup_hides_early_spike():
    require_distribution("hookrt-example-pack")
    trainer = hookrt.Trainer(max_epochs=1, plugins=["example"], **QUIET)

    trainer.fit(SpikeAt(spike_batch=5))

    detector = next(plugin for plugin in trainer.plugins if type(plugin).__name__ == "LossSpikeDetector")
    assert detector.spikes == []  # the default warmup of 10 losses has not passed at batch 5


def test_example_pack_stops_from_cli(spiky_file, tmp_path, capsys):
    require_distribution("hookrt-example-pack")
    arguments = ["fit", spiky_file, "--plugin", "example:factor=2.0,warmup=2,stop=True", *cli_quiet(tmp_path)]

    assert cli.main(arguments) == 0

    # Batch 4 spikes and stop=True ends fit after it: 5 optimizer steps of the 8 in the epoch.
    assert ", 5 steps, " in capsys.readouterr().out.splitlines()[-1]


def test_example_pack_state_survives_checkpoint(tmp_path):
    require_distribution("hookrt-example-pack")
    from hookrt_example_pack import LossSpikeDetector

    trainer = hookrt.Trainer(max_epochs=1, plugins=[LossSpikeDetector(factor=2.0, window=4, warmup=2)], **QUIET)
    trainer.fit(SpikeAt(spike_batch=6))
    detector = next(plugin for plugin in trainer.plugins if isinstance(plugin, LossSpikeDetector))
    path = tmp_path / "state.pt"
    torch.save(detector.state_dict(), path)

    restored = LossSpikeDetector(factor=2.0, window=4, warmup=2)
    restored.load_state_dict(torch.load(path, weights_only=True))

    assert restored.state_dict() == detector.state_dict()
    assert restored.spikes == detector.spikes
    assert len(restored.state_dict()["losses"]) == 4
    assert restored.state_key == "LossSpikeDetector(factor=2, window=4)"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"factor": 1}, r"LossSpikeDetector\(factor=1\) is invalid: factor must be a number > 1"),
        ({"window": 0}, r"LossSpikeDetector\(window=0\) is invalid: window must be an int >= 1"),
        ({"window": 5, "warmup": 6}, r"LossSpikeDetector\(warmup=6\) is invalid: warmup must be an int between 1 "
                                     r"and window \(5\)"),
    ],
)
def test_example_pack_rejects_bad_options(options, message):
    require_distribution("hookrt-example-pack")

    with pytest.raises(hookrt.MisconfigurationError, match=message):
        resolve_plugin("example", options)


# ---------------------------------------------------------------------- rich pack


def test_rich_progress_from_cli(spiky_file, tmp_path, capsys):
    require_distribution("hookrt-rich")

    assert cli.main(["fit", spiky_file, "--plugin", "rich_progress", *cli_quiet(tmp_path)]) == 0

    # capsys is not a terminal, so the bar prints one line per epoch instead of redrawing.
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Epoch ")]
    assert len(lines) == 1
    assert lines[0].startswith("Epoch 1: 8/8 batches, loss=")
    assert "train_loss" not in lines[0]  # logged without prog_bar=True


def test_rich_progress_on_terminal():
    require_distribution("hookrt-rich")
    from rich.console import Console

    stream = io.StringIO()
    bar = resolve_plugin("rich_progress", {"console": Console(file=stream, force_terminal=True, width=120)})
    trainer = hookrt.Trainer(max_epochs=2, plugins=[bar], **QUIET)

    trainer.fit(SpikeAt(spike_batch=-1, batches=4))

    text = stream.getvalue()
    assert bar.interactive
    assert "Epoch 2" in text
    assert "4/4" in text
    assert "Sanity checking" in text
    assert bar._progress is None  # the live display stopped at teardown


def test_rich_summary_by_name():
    require_distribution("hookrt-rich")
    from rich.console import Console

    stream = io.StringIO()
    summary = resolve_plugin("rich_summary", {"max_depth": -1, "console": Console(file=stream, width=120)})
    trainer = hookrt.Trainer(max_epochs=1, plugins=[summary], **QUIET)

    trainer.fit(SpikeAt(spike_batch=-1, batches=2))

    text = stream.getvalue()
    assert "SpikeAt summary" in text
    rows = {line.split("│")[2].strip(): line for line in text.splitlines() if line.count("│") == 5}
    assert rows["layer"].split("│")[4].strip() == "16"  # Linear(3, 4): 12 weights and 4 biases
    assert rows["head"].split("│")[4].strip() == "5"
    assert rows["Total params"].split("│")[4].strip() == "21"
    assert summary.summary.total_parameters == 21


def test_rich_plugins_reject_bad_options():
    require_distribution("hookrt-rich")

    with pytest.raises(hookrt.MisconfigurationError, match=r"RichProgressBar\(refresh_rate=-1\) is invalid"):
        resolve_plugin("rich_progress", {"refresh_rate": -1})
    with pytest.raises(hookrt.MisconfigurationError, match=r"RichModelSummary\(max_depth=-2\) is invalid"):
        resolve_plugin("rich_summary", {"max_depth": -2})


# ---------------------------------------------------------------------- broken packs


@pytest.fixture
def broken_pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Install, as pip would, a pack named 'broken' whose module raises when imported."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "hookrt_broken_pack_for_test.py").write_text('raise RuntimeError("pack import failed")\n')
    info = site / "hookrt_broken_pack-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hookrt-broken-pack\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[hookrt.plugins]\nbroken = hookrt_broken_pack_for_test:Thing\n")
    monkeypatch.syspath_prepend(str(site))
    return site


def test_broken_pack_skipped_by_available_plugins(broken_pack, caplog):
    caplog.set_level(logging.WARNING, logger="hookrt._registry")

    plugins = available_plugins()

    assert "broken" not in plugins
    assert "model_checkpoint" in plugins
    assert [record.getMessage() for record in caplog.records] == [
        "Plugin pack 'broken' (hookrt-broken-pack) failed to load and is skipped: RuntimeError: pack import "
        "failed. Reinstall or fix the pack."
    ]
    assert ("broken", "hookrt-broken-pack") in [(entry.name, entry.source) for entry in plugin_entries()]


def test_broken_pack_named_in_resolve_error(broken_pack):
    message = r"Plugin 'broken' \(hookrt-broken-pack\) failed to load: RuntimeError: pack import failed\."

    with pytest.raises(hookrt.PluginError, match=message):
        resolve_plugin("broken")
    with pytest.raises(hookrt.PluginError, match=message):
        hookrt.Trainer(plugins=["broken"], **QUIET)


def test_broken_pack_listed_by_cli(broken_pack, capsys):
    code = cli.main(["plugins"])

    captured = capsys.readouterr()
    assert code == 1
    rows = {line.split()[0]: line for line in captured.out.splitlines()}
    assert rows["broken"].split()[1:3] == ["hookrt-broken-pack", "hookrt_broken_pack_for_test:Thing"]
    assert rows["broken"].endswith("failed to load: RuntimeError: pack import failed")
    assert "model_checkpoint" in rows
    assert captured.err == (
        "hookrt plugins: error: 1 plugin pack(s) failed to load and are skipped: broken. Reinstall or fix them.\n"
    )


@pytest.mark.slow
def test_broken_pack_does_not_break_import(broken_pack):
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(broken_pack), *sys.path]))
    probe = "import hookrt; from hookrt._registry import available_plugins; print(sorted(available_plugins()))"

    completed = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True,
                               timeout=120, check=False)

    assert completed.returncode == 0, completed.stderr
    assert "'model_checkpoint'" in completed.stdout
    assert "'broken'" not in completed.stdout
    # With no logging set up, Python's last-resort handler still prints the warning to stderr.
    assert "Plugin pack 'broken' (hookrt-broken-pack) failed to load and is skipped" in completed.stderr


def test_pack_name_shadowed_by_builtin(tmp_path, monkeypatch, capsys):
    site = tmp_path / "site"
    site.mkdir()
    info = site / "hookrt_shadow_pack-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hookrt-shadow-pack\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[hookrt.plugins]\nprogress_bar = hookrt_shadow_pack_missing:Bar\n")
    monkeypatch.syspath_prepend(str(site))

    plugin = resolve_plugin("progress_bar")
    code = cli.main(["plugins"])

    assert type(plugin).__module__ == "hookrt.plugins.progress"
    assert code == 0  # the shadowed entry is never loaded, so its missing module is no failure
    shadowed = [line for line in capsys.readouterr().out.splitlines() if "hookrt-shadow-pack" in line]
    assert len(shadowed) == 1
    assert shadowed[0].endswith("not used: shadowed by 'progress_bar' from built-in")


def test_example_pack_reports_nan_loss(caplog):
    require_distribution("hookrt-example-pack")
    from hookrt_example_pack import LossSpikeDetector

    class NanAt(SpikeAt):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)["loss"]
            # Adding a NaN constant leaves the gradients finite, so only batch 3 reports NaN.
            return loss + torch.tensor(float("nan")) if batch_idx == 3 else loss

    detector = LossSpikeDetector(warmup=2)
    trainer = hookrt.Trainer(max_epochs=1, plugins=[detector], **QUIET)
    caplog.set_level(logging.WARNING, logger="hookrt_example_pack")

    trainer.fit(NanAt(spike_batch=-1, batches=6))

    assert [spike.step for spike in detector.spikes] == [4]
    assert len(detector.state_dict()["losses"]) == 5  # the NaN loss stays out of the running mean
    assert [record.getMessage() for record in caplog.records] == [
        "Loss spike at global step 4: loss is nan, not a finite number."
    ]
