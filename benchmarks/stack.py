"""Per-step time of hookrt, PyTorch Lightning and PyTorch Ignite against a plain loop, minimal and full stacks.

Run by ``python -m benchmarks`` in a subprocess whose environment pins the
thread counts; it can also run alone::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python -m benchmarks.stack --workload mlp --json out.json

Every contender trains the same model from the same initial weights on the
same batches with SGD (lr 0.01) and cross entropy, for one epoch. Contenders
run in interleaved rounds whose order rotates, after one short warm-up run
each. A run records the wall-clock and thread CPU time (`time.thread_time`)
from the framework's train-start event to its train-end event, the time of
the whole ``fit``/``run`` call, the steps taken and the final weights.

The framework packages are imported only by the contenders that use them, so
`benchmarks.memory` can run one contender per process and compare their peaks.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import io
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._timing import RegionClock, run_interleaved

LEARNING_RATE = 0.01
BATCH_SIZE = 32
#: Steps of the warm-up run each contender makes before the timed rounds.
WARMUP_STEPS = 50
#: Optimizer steps between two writes to the loggers in the full stacks, as Trainer(log_every_n_steps=50).
LOG_EVERY = 50
#: Loggers through which Lightning prints its device and set-up lines.
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


# ---------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """A model and its data: ``build_model()`` and ``build_loader(steps)`` give one epoch of ``steps`` batches."""

    name: str
    description: str
    build_model: Callable[[], nn.Module]
    build_loader: Callable[[int], DataLoader[Any]]


def build_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def build_mlp_loader(steps: int) -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(steps * BATCH_SIZE, 32, generator=generator)
    targets = torch.randint(0, 4, (steps * BATCH_SIZE,), generator=generator)
    return DataLoader(TensorDataset(inputs, targets), batch_size=BATCH_SIZE, shuffle=False)


def workload(name: str) -> Workload:
    """Return the workload called ``name``: ``"mlp"`` or ``"digits"``."""
    if name == "mlp":
        return Workload("mlp", "MLP 32-32-4 with ReLU on random inputs, batches of 32 from an in-memory "
                               "TensorDataset", build_mlp, build_mlp_loader)
    if name == "digits":
        from benchmarks import digits_cnn

        return Workload("digits", digits_cnn.DESCRIPTION, digits_cnn.build_cnn, digits_cnn.build_loader)
    raise ValueError(f"unknown workload {name!r}; use 'mlp' or 'digits'")


# ---------------------------------------------------------------------- runs


@dataclass
class RunResult:
    """Timings and outcome of one training run."""

    loop_seconds: float
    loop_cpu_seconds: float
    call_seconds: float
    steps: int
    #: Largest absolute difference of the final weights from the plain loop's, filled in by `measure`.
    weight_difference: float = 0.0


def fresh_model(work: Workload, initial_state: dict[str, torch.Tensor]) -> nn.Module:
    model = work.build_model()
    model.load_state_dict(initial_state)
    return model


def prepare_timing() -> None:
    """Bring every run to the same starting point: one torch thread, no garbage left from the last run."""
    torch.set_num_threads(1)
    gc.collect()


class TerminalDevnull(io.TextIOWrapper):
    """A text stream to os.devnull that reports being a terminal, so progress bars redraw as on a screen."""

    def __init__(self) -> None:
        super().__init__(open(os.devnull, "wb"), encoding="utf-8")  # noqa: SIM115 - closed with the wrapper

    def isatty(self) -> bool:
        return True


@contextlib.contextmanager
def output_to_devnull() -> Iterator[None]:
    """Send stdout and stderr to os.devnull, where the Lightning and Ignite progress bars write."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        yield


# ---------------------------------------------------------------------- plain PyTorch


def run_plain(work: Workload, loader: DataLoader[Any], initial_state: dict[str, torch.Tensor], root: Path,
              weights: list[dict[str, torch.Tensor]]) -> RunResult:
    model = fresh_model(work, initial_state)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    model.train()
    steps = 0
    clock = RegionClock()
    prepare_timing()
    clock.start()
    for inputs, targets in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        steps += 1
    clock.end()
    weights.append(model.state_dict())
    return RunResult(clock.seconds, clock.cpu_seconds, clock.seconds, steps)


def run_plain_closure(work: Workload, loader: DataLoader[Any], initial_state: dict[str, torch.Tensor], root: Path,
                      weights: list[dict[str, torch.Tensor]]) -> RunResult:
    model = fresh_model(work, initial_state)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    model.train()
    steps = 0
    clock = RegionClock()
    prepare_timing()
    clock.start()
    for inputs, targets in loader:

        def closure(inputs: torch.Tensor = inputs, targets: torch.Tensor = targets) -> torch.Tensor:
            loss = F.cross_entropy(model(inputs), targets)
            loss.backward()
            return loss

        optimizer.step(closure)
        optimizer.zero_grad()
        steps += 1
    clock.end()
    weights.append(model.state_dict())
    return RunResult(clock.seconds, clock.cpu_seconds, clock.seconds, steps)


# ---------------------------------------------------------------------- hookrt

_classes: dict[str, type] = {}


def hookrt_classes() -> tuple[type, type]:
    """Define the hookrt module and clock plugin once, on first use, so hookrt is imported only when needed."""
    if "hookrt" not in _classes:
        import hookrt

        class HookrtModule(hookrt.LightningModule):
            def __init__(self, net: nn.Module, log_loss: bool) -> None:
                super().__init__()
                self.net = net
                self.log_loss = log_loss

            def forward(self, inputs: torch.Tensor) -> torch.Tensor:
                return self.net(inputs)

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                inputs, targets = batch
                loss = F.cross_entropy(self.net(inputs), targets)
                if self.log_loss:
                    self.log("train_loss", loss)
                return loss

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return torch.optim.SGD(self.parameters(), lr=LEARNING_RATE)

        class HookrtClock(hookrt.Plugin):
            def __init__(self, clock: RegionClock) -> None:
                self.clock = clock

            @hookrt.on("on_train_start")
            def started(self, payload: Any) -> None:
                self.clock.start()

            @hookrt.on("on_train_end")
            def ended(self, payload: Any) -> None:
                self.clock.end()

        _classes["hookrt"] = HookrtModule
        _classes["hookrt_clock"] = HookrtClock
    return _classes["hookrt"], _classes["hookrt_clock"]


def hookrt_runner(full: bool, terminal_bar: bool = False) -> Callable[..., RunResult]:
    def run(work: Workload, loader: DataLoader[Any], initial_state: dict[str, torch.Tensor], root: Path,
            weights: list[dict[str, torch.Tensor]]) -> RunResult:
        import hookrt

        module_class, clock_class = hookrt_classes()
        module = module_class(fresh_model(work, initial_state), log_loss=full)
        clock = RegionClock()
        flags: dict[str, Any] = dict(max_epochs=1, num_sanity_val_steps=0, accelerator="cpu", devices=1,
                                     default_root_dir=str(root), log_every_n_steps=LOG_EVERY)
        with contextlib.ExitStack() as stack:
            if full:
                from hookrt.plugins import LearningRateMonitor, MemoryProbe, ProgressBar

                stream = TerminalDevnull() if terminal_bar else open(os.devnull, "w")  # noqa: SIM115
                stack.callback(stream.close)
                # The defaults stay on: TensorBoard logger, ModelCheckpoint per epoch, model summary, signals.
                plugins = [ProgressBar(file=stream), LearningRateMonitor(), MemoryProbe(every_n_steps=LOG_EVERY),
                           clock_class(clock)]
                trainer = hookrt.Trainer(plugins=plugins, **flags)
            else:
                trainer = hookrt.Trainer(plugins=[clock_class(clock)], logger=False, enable_checkpointing=False,
                                         enable_progress_bar=False, enable_model_summary=False,
                                         enable_signal_handler=False, **flags)
            call = RegionClock()
            prepare_timing()
            call.start()
            trainer.fit(module, loader)
            call.end()
        weights.append(module.net.state_dict())
        return RunResult(clock.seconds, clock.cpu_seconds, call.seconds, trainer.global_step)

    return run


# ---------------------------------------------------------------------- PyTorch Lightning


def lightning_package() -> Any:
    for name in ("lightning.pytorch", "pytorch_lightning"):
        if importlib.util.find_spec(name.split(".")[0]) is not None:
            try:
                return importlib.import_module(name)
            except ImportError:
                continue
    return None


def lightning_classes(lightning: Any) -> tuple[type, type]:
    if "lightning" not in _classes:

        class LightningModel(lightning.LightningModule):  # type: ignore[misc,name-defined]
            def __init__(self, net: nn.Module, log_loss: bool) -> None:
                super().__init__()
                self.net = net
                self.log_loss = log_loss

            def forward(self, inputs: torch.Tensor) -> torch.Tensor:
                return self.net(inputs)

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                inputs, targets = batch
                loss = F.cross_entropy(self.net(inputs), targets)
                if self.log_loss:
                    self.log("train_loss", loss)
                return loss

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return torch.optim.SGD(self.parameters(), lr=LEARNING_RATE)

        class LightningClock(lightning.Callback):  # type: ignore[misc,name-defined]
            def __init__(self, clock: RegionClock) -> None:
                self.clock = clock

            def on_train_start(self, trainer: Any, pl_module: Any) -> None:
                self.clock.start()

            def on_train_end(self, trainer: Any, pl_module: Any) -> None:
                self.clock.end()

        _classes["lightning"] = LightningModel
        _classes["lightning_clock"] = LightningClock
    return _classes["lightning"], _classes["lightning_clock"]


def psutil_installed() -> bool:
    return importlib.util.find_spec("psutil") is not None


def lightning_runner(full: bool) -> Callable[..., RunResult]:
    def run(work: Workload, loader: DataLoader[Any], initial_state: dict[str, torch.Tensor], root: Path,
            weights: list[dict[str, torch.Tensor]]) -> RunResult:
        lightning = lightning_package()
        for name in LIGHTNING_LOGGERS:  # Lightning sets these levels when it is first imported
            logging.getLogger(name).setLevel(logging.ERROR)
        module_class, clock_class = lightning_classes(lightning)
        module = module_class(fresh_model(work, initial_state), log_loss=full)
        clock = RegionClock()
        flags: dict[str, Any] = dict(max_epochs=1, num_sanity_val_steps=0, accelerator="cpu", devices=1,
                                     default_root_dir=str(root), log_every_n_steps=LOG_EVERY)
        callbacks: list[Any] = [clock_class(clock)]
        if full:
            callbacks += [lightning.callbacks.ModelCheckpoint(dirpath=str(root / "checkpoints")),
                          lightning.callbacks.TQDMProgressBar(), lightning.callbacks.LearningRateMonitor()]
            if psutil_installed():
                callbacks.append(lightning.callbacks.DeviceStatsMonitor())
            settings = dict(logger=lightning.loggers.TensorBoardLogger(save_dir=str(root)))
        else:
            settings = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        call = RegionClock()
        with output_to_devnull():
            trainer = lightning.Trainer(callbacks=callbacks, **settings, **flags)
            prepare_timing()
            call.start()
            trainer.fit(module, loader)
            call.end()
        weights.append(module.net.state_dict())
        return RunResult(clock.seconds, clock.cpu_seconds, call.seconds, trainer.global_step)

    return run


# ---------------------------------------------------------------------- PyTorch Ignite


def ignite_runner(full: bool) -> Callable[..., RunResult]:
    def run(work: Workload, loader: DataLoader[Any], initial_state: dict[str, torch.Tensor], root: Path,
            weights: list[dict[str, torch.Tensor]]) -> RunResult:
        from ignite.engine import Events, create_supervised_trainer

        model = fresh_model(work, initial_state)
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
        trainer = create_supervised_trainer(model, optimizer, F.cross_entropy, device="cpu")
        clock = RegionClock()
        trainer.add_event_handler(Events.STARTED, clock.start)
        trainer.add_event_handler(Events.COMPLETED, clock.end)
        closers: list[Any] = []
        if full:
            from ignite.handlers import ModelCheckpoint, ProgressBar
            from ignite.handlers.tensorboard_logger import TensorboardLogger

            ProgressBar().attach(trainer, output_transform=lambda loss: {"loss": loss})
            board = TensorboardLogger(log_dir=str(root / "tensorboard"))
            board.attach_output_handler(trainer, event_name=Events.ITERATION_COMPLETED(every=LOG_EVERY),
                                        tag="training", output_transform=lambda loss: {"loss": loss})
            board.attach_opt_params_handler(trainer, event_name=Events.ITERATION_STARTED(every=LOG_EVERY),
                                            optimizer=optimizer)
            closers.append(board.close)
            saver = ModelCheckpoint(str(root / "checkpoints"), filename_prefix="model", n_saved=1, require_empty=False)
            trainer.add_event_handler(Events.EPOCH_COMPLETED, saver, {"model": model, "optimizer": optimizer})
        call = RegionClock()
        with output_to_devnull():
            prepare_timing()
            call.start()
            trainer.run(loader, max_epochs=1)
            call.end()
        for close in closers:
            close()
        weights.append(model.state_dict())
        return RunResult(clock.seconds, clock.cpu_seconds, call.seconds, trainer.state.iteration)

    return run


# ---------------------------------------------------------------------- contenders


@dataclass(frozen=True)
class Contender:
    """One way of training the workload, with the package it needs and what its run contains."""

    key: str
    label: str
    #: The package that must be importable: None for plain PyTorch.
    package: str | None
    stack: str
    run: Callable[..., RunResult]


FULL_HOOKRT = ("TensorBoardLogger (the default logger), ModelCheckpoint at the epoch end (the default), "
               "ProgressBar to os.devnull (not a terminal: one line per epoch), LearningRateMonitor, "
               "MemoryProbe(every_n_steps=50), ModelSummary and SignalHandler (defaults); the module logs its loss")

CONTENDERS = (
    Contender("plain", "plain PyTorch", None, "`zero_grad`, forward, `backward`, `step`", run_plain),
    Contender("plain-closure", "plain PyTorch, closure step", None,
              "`optimizer.step(closure)` with forward and backward in the closure, then `zero_grad`",
              run_plain_closure),
    Contender("hookrt", "hookrt, minimal", "hookrt",
              "every default off (logger, checkpointing, progress bar, summary, signal handler)",
              hookrt_runner(full=False)),
    Contender("hookrt-full", "hookrt, full default stack", "hookrt", FULL_HOOKRT, hookrt_runner(full=True)),
    Contender("hookrt-full-tty", "hookrt, full stack, terminal bar", "hookrt",
              "as the full stack, but the bar's stream reports a terminal, so tqdm redraws after every batch",
              hookrt_runner(full=True, terminal_bar=True)),
    Contender("lightning", "Lightning, minimal", "lightning",
              "logger, checkpointing, progress bar and model summary off", lightning_runner(full=False)),
    Contender("lightning-full", "Lightning, full stack", "lightning",
              "TensorBoardLogger, ModelCheckpoint, TQDMProgressBar (refresh_rate=1, output to os.devnull), "
              "LearningRateMonitor, DeviceStatsMonitor (only with psutil installed), model summary; "
              "the module logs its loss", lightning_runner(full=True)),
    Contender("ignite", "Ignite, minimal", "ignite",
              "`create_supervised_trainer`, whose step calls `loss.item()`", ignite_runner(full=False)),
    Contender("ignite-full", "Ignite, full stack", "ignite",
              "ProgressBar (output to os.devnull), TensorboardLogger with the loss and the learning rate every "
              "50 iterations, ModelCheckpoint at the epoch end; no memory probe (Ignite has none)",
              ignite_runner(full=True)),
)

CONTENDERS_BY_KEY = {contender.key: contender for contender in CONTENDERS}


def is_installed(contender: Contender) -> bool:
    if contender.package is None:
        return True
    if contender.package == "lightning":
        return any(importlib.util.find_spec(name) is not None for name in ("lightning", "pytorch_lightning"))
    return importlib.util.find_spec(contender.package) is not None


@contextlib.contextmanager
def quiet_frameworks() -> Iterator[None]:
    """Silence the frameworks' set-up lines and advisory warnings (DataLoader workers, deprecations)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        levels = {name: logging.getLogger(name).level for name in LIGHTNING_LOGGERS}
        for name in LIGHTNING_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        logging.getLogger("hookrt").setLevel(logging.WARNING)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def initial_state(work: Workload) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {key: value.detach().clone() for key, value in work.build_model().state_dict().items()}


def checked_run(contender: Contender, work: Workload, loader: DataLoader[Any], state: dict[str, torch.Tensor],
                steps: int, weights: list[dict[str, torch.Tensor]]) -> RunResult:
    """Run once in a fresh temporary folder; raise when the run did not take ``steps`` optimizer steps."""
    with tempfile.TemporaryDirectory(prefix="hookrt-bench-") as root:
        result = contender.run(work, loader, state, Path(root), weights)
    if result.steps != steps:
        raise RuntimeError(f"{contender.label} took {result.steps} optimizer steps instead of {steps}, so its "
                           "timing is not comparable. Check how the contender is configured.")
    return result


def measure(work: Workload, contenders: list[Contender], steps: int, rounds: int) -> dict[str, list[RunResult]]:
    """Warm every contender up once, run the interleaved rounds, and compare final weights with the plain loop's."""
    state = initial_state(work)
    loader = work.build_loader(steps)
    warmup_loader = work.build_loader(min(WARMUP_STEPS, steps))
    weights: dict[str, list[dict[str, torch.Tensor]]] = {contender.key: [] for contender in contenders}
    for contender in contenders:
        checked_run(contender, work, warmup_loader, state, min(WARMUP_STEPS, steps), [])

    def runner(contender: Contender) -> Callable[[], RunResult]:
        return lambda: checked_run(contender, work, loader, state, steps, weights[contender.key])

    results = run_interleaved({contender.key: runner(contender) for contender in contenders}, rounds)
    reference = weights["plain"][0] if "plain" in weights else None
    for key, runs in results.items():
        if reference is not None:
            final = weights[key][0]
            difference = max(float((final[name] - reference[name]).abs().max()) for name in reference)
            for result in runs:
                result.weight_difference = difference
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="mlp", choices=("mlp", "digits"))
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps (batches) per run")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--contenders", default=",".join(CONTENDERS_BY_KEY),
                        help="comma-separated keys: " + ", ".join(CONTENDERS_BY_KEY))
    parser.add_argument("--json", type=Path, required=True, help="file to write the results to")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = workload(args.workload)
    wanted = [CONTENDERS_BY_KEY[key] for key in args.contenders.split(",") if key]
    contenders = [contender for contender in wanted if is_installed(contender)]
    results: dict[str, list[RunResult]] = {}
    if any(contender.key != "plain" for contender in contenders):
        with quiet_frameworks():
            results = measure(work, contenders, args.steps, args.rounds)
    report = {
        "workload": args.workload,
        "description": work.description,
        "steps": args.steps,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "thread_variables": {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        "missing": [contender.key for contender in wanted if not is_installed(contender)],
        "contenders": {contender.key: {"label": contender.label, "package": contender.package,
                                       "stack": contender.stack} for contender in wanted},
        "psutil": psutil_installed(),
        "results": {key: [asdict(result) for result in runs] for key, runs in results.items()},
    }
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
