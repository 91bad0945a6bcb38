"""The hookrt command line: fit, describe, events, plugins, generated flags and one-line errors."""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
from pathlib import Path

import pytest

import hookrt
from hookrt import cli
from hookrt._cli_options import FLAG_HELP, parse_options, trainer_flags
from hookrt._config import TrainerConfig

MODEL_SOURCE = '''
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt


class Net(hookrt.LightningModule):
    def __init__(self, lr=0.1, hidden=4, tag="plain"):
        super().__init__()
        print(f"built Net with lr={lr!r} hidden={hidden!r} tag={tag!r}")
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.body(x), y)
        self.log("train_loss", loss)
        return loss

    def on_train_start(self):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(8, 3, generator=generator)
        return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4)


class Helper:
    pass
'''

RECORDER_SOURCE = '''
import hookrt


class Recorder(hookrt.Plugin):
    """Append the index of every training batch to a file."""

    def __init__(self, path, prefix="batch"):
        self.path = path
        self.prefix = prefix

    @hookrt.on("on_batch_end")
    def _record(self, payload):
        with open(self.path, "a") as stream:
            stream.write(f"{self.prefix} {payload.batch_idx}\\n")
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder outside the repository with a model file and a sibling module that nothing may import."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "model.py").write_text(MODEL_SOURCE)
    (folder / "cli_sibling_helper.py").write_text("VALUE = 1\n")
    return folder


@pytest.fixture
def quiet(tmp_path: Path) -> list[str]:
    return [
        "--max-epochs", "1", "--logger", "false", "--enable-checkpointing", "false",
        "--enable-progress-bar", "false", "--enable-model-summary", "false",
        "--default-root-dir", str(tmp_path / "runs"),
    ]


@pytest.fixture
def recorded_flags(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """Record the flags every Trainer built during the test was given."""
    calls: list[dict[str, object]] = []
    original = TrainerConfig.from_flags.__func__  # type: ignore[attr-defined]

    def from_flags(cls, **flags):
        calls.append(flags)
        return original(cls, **flags)

    monkeypatch.setattr(TrainerConfig, "from_flags", classmethod(from_flags))
    return calls


@pytest.fixture
def recorder_pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Install a plugin pack named 'recorder' the way pip leaves one: a module plus a dist-info folder."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "cli_recorder_pack.py").write_text(RECORDER_SOURCE)
    info = site / "cli_recorder_pack-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cli-recorder-pack\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[hookrt.plugins]\nrecorder = cli_recorder_pack:Recorder\n")
    monkeypatch.syspath_prepend(str(site))
    return site


# ---------------------------------------------------------------------- fit


def test_fit_trains_and_prints_summary(project, quiet, capsys):
    assert cli.main(["fit", f"{project / 'model.py'}:Net", *quiet]) == 0

    out = capsys.readouterr().out
    assert "built Net with lr=0.1 hidden=4 tag='plain'" in out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("fit finished: Net, 1 epoch, 2 steps, ")
    assert "train_loss=" in summary


def test_fit_init_values_are_literals(project, quiet, capsys):
    arguments = ["fit", f"{project / 'model.py'}:Net", "--init", "lr=0.5,hidden=3", "--init", "tag=wide", *quiet]

    assert cli.main(arguments) == 0

    assert "built Net with lr=0.5 hidden=3 tag='wide'" in capsys.readouterr().out


def test_fit_plugin_with_options(project, quiet, recorder_pack, tmp_path, capsys):
    log_file = tmp_path / "batches.txt"
    arguments = ["fit", f"{project / 'model.py'}:Net", "--plugin", f"recorder:path='{log_file}',prefix=seen", *quiet]

    assert cli.main(arguments) == 0

    assert log_file.read_text().splitlines() == ["seen 0", "seen 1"]


def test_fit_dotted_module(tmp_path, quiet, monkeypatch, capsys):
    package = tmp_path / "site" / "cli_dotted_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(MODEL_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    assert cli.main(["fit", "cli_dotted_pkg.models:Net", *quiet]) == 0

    assert "fit finished: Net, 1 epoch, 2 steps" in capsys.readouterr().out


# ---------------------------------------------------------------------- generated Trainer flags


def test_flags_reach_trainer_with_types(project, recorded_flags, capsys):
    arguments = [
        "describe", "--fast-dev-run", f"{project / 'model.py'}:Net",
        "--limit-train-batches", "3", "--limit-val-batches", "0.5", "--max-epochs", "none",
        "--no-enable-checkpointing", "--enable-progress-bar", "false", "--enable-model-summary",
        "--logger", "false", "--gradient-clip-val", "0.5", "--max-time", "{'hours': 1}",
        "--default-root-dir", str(project / "runs"),
    ]

    assert cli.main(arguments) == 0

    flags = recorded_flags[-1]
    assert flags["fast_dev_run"] is True
    assert flags["limit_train_batches"] == 3 and isinstance(flags["limit_train_batches"], int)
    assert flags["limit_val_batches"] == 0.5
    assert flags["max_epochs"] is None
    assert flags["enable_checkpointing"] is False
    assert flags["enable_progress_bar"] is False
    assert flags["enable_model_summary"] is True
    assert flags["logger"] is False
    assert flags["gradient_clip_val"] == 0.5
    assert flags["max_time"] == {"hours": 1}
    assert flags["max_steps"] == -1  # not given: the Trainer's own default


def test_flag_optional_value_takes_int(project, recorded_flags, capsys):
    assert cli.main(["describe", f"{project / 'model.py'}:Net", "--fast-dev-run", "3"]) == 0

    assert recorded_flags[-1]["fast_dev_run"] == 3


def test_help_covers_every_trainer_parameter(capsys):
    parameters = [name for name in inspect.signature(hookrt.Trainer.__init__).parameters
                  if name not in ("self", "plugins", "callbacks")]

    for command in ("fit", "describe"):
        assert cli.main([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        for name in parameters:
            assert f"--{name.replace('_', '-')} " in text, name
        assert "--plugin NAME[:KEY=VALUE,...]" in text
        assert "hookrt adds nothing to sys.path" in text
        assert text.count("Default:") >= len(parameters) + 4


def test_help_text_written_for_every_flag():
    parameters = {flag.parameter for flag in trainer_flags()}

    assert parameters - set(FLAG_HELP) == set(), "add these Trainer parameters to hookrt._cli_options.FLAG_HELP"
    assert set(FLAG_HELP) - parameters == set(), "remove these names from hookrt._cli_options.FLAG_HELP"


def test_top_level_help_and_version(capsys):
    assert cli.main([]) == 2
    assert "fit" in capsys.readouterr().err

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hookrt {hookrt.__version__}"


# ---------------------------------------------------------------------- describe, events, plugins


def test_describe_prints_handler_order(project, capsys):
    assert cli.main(["describe", f"{project / 'model.py'}:Net", "--logger", "false"]) == 0

    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].startswith("Handler order for Net (plugins: ")  # after the line Net's constructor prints
    start = lines.index("on_train_start")
    assert lines[start + 1].split() == ["1.", "module", "Net.on_train_start", "order=-1000"]
    assert "fit finished" not in out


def test_events_lists_catalog(capsys):
    assert cli.main(["events"]) == 0

    out = capsys.readouterr().out
    assert "[around optimizer_step] module.optimizer_step(..., closure)" in out
    assert "``" not in out
    events_part, _, points_part = out.partition("Wrapper points")
    # Table rows are indented by two spaces; the lines of the event tree above them by four or more.
    events = {line.split()[0]: line.split() for line in events_part.splitlines() if re.match(r"  \S", line)}
    for event in hookrt.Event:
        assert event.value in events, event
        assert events[event.value][1] == event.payload_type.__name__
    assert events["on_batch_end"][2:5] == ["batch,", "batch_idx,", "outputs"]
    assert "on_train_batch_end" in events["on_batch_end"]
    assert events["optimizer_step"][1] == "OptimizerStepPayload"
    points = {line.split()[0]: line.split() for line in points_part.splitlines() if re.match(r"  \S", line)}
    for point in hookrt.WrapPoint:
        assert point.value in points
    assert points["forward"][1:] == ["ForwardPayload", "stage,", "call,", "args"]
    assert points["optimizer_step"][1:] == ["OptimizerPayload", "optimizer,", "optimizer_idx"]


def test_plugins_lists_builtins_and_packs(recorder_pack, capsys):
    assert cli.main(["plugins"]) == 0

    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert rows["model_checkpoint"].split()[1:3] == ["built-in", "hookrt.plugins.checkpoint:ModelCheckpoint"]
    assert rows["recorder"].split()[1:3] == ["cli-recorder-pack", "cli_recorder_pack:Recorder"]
    assert rows["recorder"].endswith("Append the index of every training batch to a file.")


# ---------------------------------------------------------------------- wrong input


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["fit", "{model}:Net", "--max-epoch", "1"],
         "hookrt fit: error: unknown option '--max-epoch'. Did you mean '--max-epochs'? "
         "Run 'hookrt fit --help' to list the options."),
        (["fit", "{model}:Nte"], "hookrt fit: error: {model} has no class 'Nte'. Did you mean 'Net'?"),
        (["fit", "{model}:Helper"],
         "hookrt fit: error: 'Helper' in {model} is not a hookrt.LightningModule subclass. Did you mean 'Net'?"),
        (["fit", "{model}:Net", "--plugin", "progres_bar"],
         "hookrt fit: error: no plugin named 'progres_bar' is installed. Did you mean 'progress_bar'? "
         "Run 'hookrt plugins' to list the installed ones."),
        (["describe", "{folder}/modle.py:Net"],
         "hookrt describe: error: file not found: {folder}/modle.py. Did you mean '{folder}/model.py'?"),
        (["fit", "{model}"],
         "hookrt fit: error: invalid target '{model}': expected FILE.py:Class or package.module:Class."),
        (["fit", "no_such_package_for_cli_test.models:Net"],
         "hookrt fit: error: no module named 'no_such_package_for_cli_test' on sys.path. Give a FILE.py:Class "
         "path, install the package, or put its folder on PYTHONPATH."),
        (["fit", "{model}:Net", "--init", "lrr=0.2"],
         "hookrt fit: error: Net() cannot be built from --init: unknown argument 'lrr'. Did you mean 'lr'? "
         "Its parameters: lr, hidden, tag."),
        (["fit", "{model}:Net", "--init", "0.2"],
         "hookrt fit: error: invalid option '0.2' in --init 0.2: expected KEY=VALUE with KEY a Python name"),
        (["fit", "{model}:Net", "--max-epochs", "two"],
         "hookrt fit: error: argument --max-epochs: invalid value 'two': expected an int or none"),
        (["fit", "{model}:Net", "--enable-checkpointing=maybe"],
         "hookrt fit: error: argument --enable-checkpointing: invalid value 'maybe': expected true or false"),
        (["fti", "{model}:Net"],
         "hookrt: error: unknown command 'fti'. Did you mean 'fit'? Commands: fit, describe, events, plugins."),
        (["fit", "{model}:Net", "extra"],
         "hookrt fit: error: unexpected argument 'extra'. Run 'hookrt fit --help' for the usage."),
    ],
    ids=["flag", "class", "not-module", "plugin", "file", "no-class", "dotted", "init-key", "init-form",
         "flag-value", "bool-value", "command", "extra"],
)
def test_wrong_input_one_line(project, capsys, arguments, message):
    values = {"model": project / "model.py", "folder": project}

    code = cli.main([argument.format(**values) for argument in arguments])

    captured = capsys.readouterr()
    assert code == 2
    assert captured.err == message.format(**values) + "\n"
    assert "Traceback" not in captured.out + captured.err


def test_hookrt_error_one_line(project, quiet, capsys):
    code = cli.main(["fit", f"{project / 'model.py'}:Net", *quiet, "--precision", "64"])

    captured = capsys.readouterr()
    assert code == 1
    assert captured.err == (
        "error: Trainer(precision=64) is not valid: precision must be one of '32-true', 'bf16-mixed', '16-mixed'.\n"
    )
    assert "Traceback" not in captured.out + captured.err


def test_hookrt_error_traceback_flag(project, quiet):
    arguments = ["fit", f"{project / 'model.py'}:Net", *quiet, "--precision", "64", "--traceback"]

    with pytest.raises(hookrt.MisconfigurationError, match=r"Trainer\(precision=64\) is not valid"):
        cli.main(arguments)


def test_plugin_option_error_one_line(project, quiet, recorder_pack, capsys):
    code = cli.main(["fit", f"{project / 'model.py'}:Net", *quiet, "--plugin", "recorder:pth=1"])

    assert code == 1
    assert capsys.readouterr().err == (
        "error: Invalid options for plugin 'recorder': unknown option 'pth'. Did you mean 'path'? "
        "Its parameters are: path, prefix.\n"
    )


def test_plugin_missing_option_one_line(project, quiet, recorder_pack, capsys):
    code = cli.main(["fit", f"{project / 'model.py'}:Net", *quiet, "--plugin", "recorder"])

    assert code == 1
    assert capsys.readouterr().err == (
        "error: Invalid options for plugin 'recorder': missing a required argument: 'path'. "
        "Its parameters are: path, prefix.\n"
    )


# ---------------------------------------------------------------------- importing a file


def test_file_import_adds_nothing_else(project, quiet, capsys):
    before_modules = set(sys.modules)
    before_path = list(sys.path)

    assert cli.main(["fit", f"{project / 'model.py'}:Net", *quiet]) == 0

    new = set(sys.modules) - before_modules
    from_project = sorted(
        name for name in new if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(project))
    )
    assert len(from_project) == 1
    assert from_project[0].startswith("_hookrt_cli_model_")
    assert "model" not in new
    assert "cli_sibling_helper" not in sys.modules
    assert sys.path == before_path


def test_file_cannot_import_siblings(project, quiet):
    (project / "uses_sibling.py").write_text(
        textwrap.dedent(
            """
            import cli_sibling_helper

            from model import Net
            """
        )
    )

    with pytest.raises(ModuleNotFoundError, match="cli_sibling_helper"):
        cli.main(["fit", f"{project / 'uses_sibling.py'}:Net", *quiet])
    assert "cli_sibling_helper" not in sys.modules


# ---------------------------------------------------------------------- option parsing


def test_parse_options_literals():
    options = parse_options("a=1, b=[1, 2],c='x,y',d=true,e=text,f=None,g=2.5", "--plugin p")

    assert options == {"a": 1, "b": [1, 2], "c": "x,y", "d": True, "e": "text", "f": None, "g": 2.5}


def test_closed_pipe_ends_quietly():
    import subprocess
    import sys

    script = "import sys; from hookrt.cli import main; sys.exit(main(['events']))"
    process = subprocess.run(
        f"{sys.executable} -c \"{script}\" | head -n 1", shell=True, capture_output=True, text=True, timeout=60
    )
    assert process.stdout.strip()
    assert "Traceback" not in process.stderr
    assert "BrokenPipeError" not in process.stderr


SIGNALLING_SOURCE = MODEL_SOURCE + '''

class Signalling(Net):
    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)
        return super().training_step(batch, batch_idx)
'''


def test_fit_stopped_by_signal_exits_with_signal_status(tmp_path, quiet, capsys):
    import signal

    (tmp_path / "signalling.py").write_text(SIGNALLING_SOURCE)
    status = cli.main(["fit", f"{tmp_path / 'signalling.py'}:Signalling", *quiet])
    assert status == 128 + signal.SIGTERM
    assert "stopped by signal 15; checkpoint: " in capsys.readouterr().err

    checkpoint = tmp_path / "runs" / "signal.ckpt"
    status = cli.main(["fit", f"{tmp_path / 'signalling.py'}:Signalling", *quiet, "--ckpt-path", str(checkpoint)])
    assert status == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("fit finished: Signalling, 1 epoch, 2 steps")


def test_file_target_with_spawned_processes_is_rejected(project, quiet, capsys):
    status = cli.main(["fit", f"{project / 'model.py'}:Net", *quiet, "--devices", "2", "--accelerator", "cpu"])
    assert status == 2
    error = capsys.readouterr().err
    assert "is a file path, but this run starts several processes" in error
    assert f"PYTHONPATH={project} hookrt fit model:Net" in error
