"""Time the per-step overhead of hookrt against a plain PyTorch loop, PyTorch Lightning and PyTorch Ignite.

Run it from the repository root::

    python -m benchmarks.overhead [--quick] [--rounds N] [--profile]

Every contender trains the same model on the same data in the same process.
The model is an MLP 32-32-4 with ReLU, trained with cross entropy and SGD at
lr 0.01. One run is one epoch of 2000 batches of 32 from an in-memory
``TensorDataset`` (``--quick``: 300 batches), with ``torch.set_num_threads(1)``,
and every run starts from the same initial weights. The contenders run in
interleaved rounds whose order rotates, after one warm-up run each. The main
table gives the median wall-clock time per step, its range over the rounds
and its ratio to the plain loop's median.

Two regions are timed per run, and the output names the calls that each covers:

- the loop: from just before the loader's iterator is created to just after
  the last step, measured by the framework's own start and end events. Its
  wall-clock time is the main figure. Its CPU time (``time.thread_time``)
  is shown too, because it varies less when other processes share the machine.
- the whole call: ``fit`` or ``run`` including the framework's per-call
  set-up, but not the construction of the trainer, model or optimizer.

Lightning and Ignite are optional (the ``bench`` extra). A contender whose
package is missing is listed as not installed. ``--profile`` runs hookrt once
under cProfile and prints the functions with the most own time. The script
prints figures and never fails on a ratio. It raises only when a contender
did not take the expected number of steps, because the comparison would then
be wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.metadata
import logging
import platform
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt
from benchmarks._timing import (
    RegionClock,
    Summary,
    cpu_model,
    git_commit,
    load_average,
    logical_cpus,
    markdown_table,
    profile_call,
    run_interleaved,
)

FEATURES = 32
HIDDEN = 32
CLASSES = 4
BATCH_SIZE = 32
LEARNING_RATE = 0.01
FULL_STEPS = 2000
QUICK_STEPS = 300
FULL_ROUNDS = 7
MIN_ROUNDS = 5
WARMUP_STEPS = 100
#: Largest difference from the plain loop's final weights that still counts as the same training.
WEIGHT_TOLERANCE = 1e-4

#: Loggers through which Lightning prints its device and set-up lines.
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


def build_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def build_loader(steps: int) -> DataLoader[Any]:
    """Return a loader of ``steps`` batches, drawn once from a fixed generator."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(steps * BATCH_SIZE, FEATURES, generator=generator)
    targets = torch.randint(0, CLASSES, (steps * BATCH_SIZE,), generator=generator)
    return DataLoader(TensorDataset(inputs, targets), batch_size=BATCH_SIZE, shuffle=False)


@dataclass
class RunResult:
    """Timings, step count and final weights of one training run."""

    loop_seconds: float
    loop_cpu_seconds: float
    call_seconds: float
    steps: int
    weights: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Contender:
    """One way of training the model, with a description of what its timings cover."""

    name: str
    package: str | None
    loop_region: str
    call_region: str
    run: Callable[[DataLoader[Any], dict[str, torch.Tensor]], RunResult]


def fresh_mlp(initial_state: dict[str, torch.Tensor]) -> nn.Sequential:
    model = build_mlp()
    model.load_state_dict(initial_state)
    return model


def final_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def prepare_timing() -> None:
    """Bring every run to the same starting point: one torch thread, no garbage left from the last run."""
    torch.set_num_threads(1)
    gc.collect()


# ---------------------------------------------------------------------- plain PyTorch


def run_plain(loader: DataLoader[Any], initial_state: dict[str, torch.Tensor]) -> RunResult:
    model = fresh_mlp(initial_state)
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
    return RunResult(clock.seconds, clock.cpu_seconds, clock.seconds, steps, final_weights(model))


# ---------------------------------------------------------------------- hookrt


class HookrtMLP(hookrt.LightningModule):
    def __init__(self, net: nn.Sequential) -> None:
        super().__init__()
        self.net = net

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        return F.cross_entropy(self.net(inputs), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LEARNING_RATE)


class HookrtClock(hookrt.Plugin):
    """Plugin that starts a `RegionClock` on ``on_train_start`` and stops it on ``on_train_end``."""

    def __init__(self) -> None:
        self.clock = RegionClock()

    @hookrt.on("on_train_start")
    def started(self, payload: Any) -> None:
        self.clock.start()

    @hookrt.on("on_train_end")
    def ended(self, payload: Any) -> None:
        self.clock.end()


def build_hookrt_trainer(root: str, plugins: list[hookrt.Plugin]) -> hookrt.Trainer:
    return hookrt.Trainer(
        max_epochs=1,
        plugins=plugins,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_signal_handler=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
    )


def run_hookrt(loader: DataLoader[Any], initial_state: dict[str, torch.Tensor]) -> RunResult:
    module = HookrtMLP(fresh_mlp(initial_state))
    timer = HookrtClock()
    with tempfile.TemporaryDirectory() as root:
        trainer = build_hookrt_trainer(root, [timer])
        call = RegionClock()
        prepare_timing()
        call.start()
        trainer.fit(module, loader)
        call.end()
    loop = timer.clock
    return RunResult(loop.seconds, loop.cpu_seconds, call.seconds, trainer.global_step, final_weights(module.net))


# ---------------------------------------------------------------------- PyTorch Lightning


def import_first(*names: str) -> ModuleType | None:
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def lightning_package() -> ModuleType | None:
    return import_first("lightning.pytorch", "pytorch_lightning")


def run_lightning(loader: DataLoader[Any], initial_state: dict[str, torch.Tensor]) -> RunResult:
    lightning = lightning_package()
    assert lightning is not None  # the contender is listed only when the import works
    module_class, clock_class = lightning_classes(lightning)
    module = module_class(fresh_mlp(initial_state))
    clock = RegionClock()
    callback = clock_class(clock)
    with tempfile.TemporaryDirectory() as root:
        trainer = lightning.Trainer(
            max_epochs=1,
            callbacks=[callback],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            accelerator="cpu",
            devices=1,
            default_root_dir=root,
        )
        call = RegionClock()
        prepare_timing()
        call.start()
        trainer.fit(module, loader)
        call.end()
    return RunResult(clock.seconds, clock.cpu_seconds, call.seconds, trainer.global_step, final_weights(module.net))


_lightning_classes: dict[str, type] = {}


def lightning_classes(lightning: ModuleType) -> tuple[type, type]:
    """Define the Lightning module and clock callback once, on the package that was found."""
    if not _lightning_classes:

        class LightningMLP(lightning.LightningModule):  # type: ignore[name-defined,misc]
            def __init__(self, net: nn.Sequential) -> None:
                super().__init__()
                self.net = net

            def forward(self, inputs: torch.Tensor) -> torch.Tensor:
                return self.net(inputs)

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                inputs, targets = batch
                return F.cross_entropy(self.net(inputs), targets)

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return torch.optim.SGD(self.parameters(), lr=LEARNING_RATE)

        class LightningClock(lightning.Callback):  # type: ignore[name-defined,misc]
            def __init__(self, clock: RegionClock) -> None:
                self.clock = clock

            def on_train_start(self, trainer: Any, pl_module: Any) -> None:
                self.clock.start()

            def on_train_end(self, trainer: Any, pl_module: Any) -> None:
                self.clock.end()

        _lightning_classes.update(module=LightningMLP, clock=LightningClock)
    return _lightning_classes["module"], _lightning_classes["clock"]


# ---------------------------------------------------------------------- PyTorch Ignite


def run_ignite(loader: DataLoader[Any], initial_state: dict[str, torch.Tensor]) -> RunResult:
    from ignite.engine import Events, create_supervised_trainer

    model = fresh_mlp(initial_state)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    trainer = create_supervised_trainer(model, optimizer, F.cross_entropy, device="cpu")
    clock = RegionClock()
    trainer.add_event_handler(Events.STARTED, clock.start)
    trainer.add_event_handler(Events.COMPLETED, clock.end)
    call = RegionClock()
    prepare_timing()
    call.start()
    trainer.run(loader, max_epochs=1)
    call.end()
    return RunResult(clock.seconds, clock.cpu_seconds, call.seconds, trainer.state.iteration, final_weights(model))


# ---------------------------------------------------------------------- contenders

CONTENDERS = (
    Contender(
        "plain PyTorch",
        None,
        "`for inputs, targets in loader:` zero_grad, forward, cross_entropy, backward, step",
        "the same loop",
        run_plain,
    ),
    Contender(
        "hookrt",
        "hookrt",
        "`on_train_start` to `on_train_end` inside `Trainer.fit`",
        "`trainer.fit(module, loader)`; `Trainer(...)` built beforehand",
        run_hookrt,
    ),
    Contender(
        "PyTorch Lightning",
        "lightning",
        "`Callback.on_train_start` to `Callback.on_train_end` inside `Trainer.fit`",
        "`trainer.fit(module, loader)`; `Trainer(...)` built beforehand",
        run_lightning,
    ),
    Contender(
        "PyTorch Ignite",
        "ignite",
        "`Events.STARTED` to `Events.COMPLETED` inside `Engine.run`; its default step also calls `loss.item()`",
        "`trainer.run(loader, max_epochs=1)`; `create_supervised_trainer(...)` built beforehand",
        run_ignite,
    ),
)


def is_installed(contender: Contender) -> bool:
    if contender.package is None or contender.package == "hookrt":
        return True
    if contender.package == "lightning":
        return lightning_package() is not None
    return import_first(contender.package) is not None


def package_version(contender: Contender) -> str:
    if contender.package is None:
        return f"torch {torch.__version__}"
    if contender.package == "hookrt":
        return f"hookrt {hookrt.__version__}"
    if contender.package == "lightning":
        package = lightning_package()
        distribution = "lightning" if package is not None and package.__name__.startswith("lightning") \
            else "pytorch-lightning"
    else:
        distribution = "pytorch-ignite"
    try:
        return f"{distribution} {importlib.metadata.version(distribution)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{distribution} (version unknown)"


@contextlib.contextmanager
def quiet_frameworks() -> Iterator[None]:
    """Silence Lightning's set-up lines and its warnings (advice about DataLoader workers, deprecations)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", module=r"(pytorch_lightning|lightning|lightning_fabric)(\.|$)")
        # Lightning sets its loggers' levels when it is imported, so it is imported before they are changed.
        lightning_package()
        levels = {name: logging.getLogger(name).level for name in LIGHTNING_LOGGERS}
        for name in LIGHTNING_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


# ---------------------------------------------------------------------- measuring and reporting


def measure(contenders: list[Contender], steps: int, rounds: int) -> dict[str, list[RunResult]]:
    """Warm every contender up once, then run the interleaved rounds; check each run's step count."""
    torch.manual_seed(0)
    initial_state = final_weights(build_mlp())
    loader = build_loader(steps)
    warmup_loader = build_loader(min(WARMUP_STEPS, steps))

    def checked(contender: Contender) -> Callable[[], RunResult]:
        def run_once() -> RunResult:
            result = contender.run(loader, initial_state)
            if result.steps != steps:
                raise RuntimeError(
                    f"{contender.name} took {result.steps} optimizer steps instead of {steps}, so its timing is not "
                    "comparable. Check how the contender is configured."
                )
            return result

        return run_once

    for contender in contenders:
        contender.run(warmup_loader, initial_state)
    return run_interleaved({contender.name: checked(contender) for contender in contenders}, rounds)


def max_weight_difference(result: RunResult, reference: RunResult) -> float:
    return max(float((result.weights[key] - reference.weights[key]).abs().max()) for key in reference.weights)


def environment_lines(steps: int, rounds: int, loads: tuple[str, str]) -> list[str]:
    return [
        f"- model: MLP {FEATURES}-{HIDDEN}-{CLASSES} with ReLU, cross entropy, SGD lr {LEARNING_RATE}; "
        f"{steps} steps = one epoch of {steps} batches of {BATCH_SIZE} from an in-memory TensorDataset",
        f"- rounds: {rounds}, interleaved (the order rotates each round), after one warm-up run of "
        f"{min(WARMUP_STEPS, steps)} steps per contender",
        f"- torch {torch.__version__}, torch threads {torch.get_num_threads()} (set with torch.set_num_threads), "
        f"Python {platform.python_version()}",
        f"- CPU: {cpu_model()} ({logical_cpus()} logical CPUs available)",
        f"- load average (1 min) before / after the rounds: {loads[0]} / {loads[1]}; other processes on the "
        "machine add to the spread",
        f"- commit: {git_commit()}",
    ]


def format_summary(summary: Summary) -> tuple[str, str]:
    return f"{summary.median:.1f}", f"{summary.minimum:.1f}..{summary.maximum:.1f}"


def summarize(results: dict[str, list[RunResult]], field: str, steps: int) -> dict[str, Summary]:
    """Return, per contender, the median and range of one RunResult field in µs per step."""
    return {
        name: Summary.of([getattr(result, field) for result in runs]).scaled(1e6 / steps)
        for name, runs in results.items()
    }


def print_report(contenders: list[Contender], missing: list[Contender], results: dict[str, list[RunResult]],
                 steps: int, rounds: int, loads: tuple[str, str]) -> None:
    loop = summarize(results, "loop_seconds", steps)
    cpu = summarize(results, "loop_cpu_seconds", steps)
    call = summarize(results, "call_seconds", steps)
    baseline = CONTENDERS[0].name
    reference = results[baseline][0]

    def ratio(summaries: dict[str, Summary], name: str) -> str:
        return f"{summaries[name].median / summaries[baseline].median:.2f}x"

    print("# Training-loop overhead per step\n")
    print("\n".join(environment_lines(steps, rounds, loads)))
    print("- versions: " + ", ".join(package_version(contender) for contender in contenders))
    print("\n## Wall-clock time of the loop\n")
    rows = []
    for contender in contenders:
        median, spread = format_summary(loop[contender.name])
        rows.append([contender.name, median, spread, ratio(loop, contender.name)])
    rows += [[contender.name, "not installed", "", ""] for contender in missing]
    print(markdown_table(["contender", "µs/step (median)", "min..max", "ratio to plain"], rows,
                         [False, True, True, True]))

    print("\n## Other views of the same runs\n")
    rows = []
    for contender in contenders:
        difference = max_weight_difference(results[contender.name][0], reference)
        rows.append([
            contender.name,
            format_summary(cpu[contender.name])[0],
            ratio(cpu, contender.name),
            format_summary(call[contender.name])[0],
            ratio(call, contender.name),
            f"{difference:.1e}" + ("" if difference <= WEIGHT_TOLERANCE else " (differs)"),
        ])
    headers = ["contender", "loop CPU µs/step (median)", "CPU ratio", "whole call µs/step (median)",
               "whole call ratio", "max weight diff vs plain"]
    print(markdown_table(headers, rows, [False, True, True, True, True, True]))

    print("\nWhat is timed:\n")
    for contender in contenders:
        print(f"- {contender.name}: loop = {contender.loop_region}; whole call = {contender.call_region}.")
    print(
        "\nRatios divide medians. Loop CPU time is the CPU time of the training thread over the same region "
        "(torch runs one thread), so it leaves out time spent waiting for a core. The weight difference "
        "compares each contender's final weights after the first round with the plain loop's: all start "
        "from the same weights and see the same batches."
    )


def print_profile(steps: int, limit: int = 25) -> None:
    """Profile one hookrt fit with cProfile; print the top functions by own time, overall and in hookrt."""
    torch.manual_seed(0)
    initial_state = final_weights(build_mlp())
    run_hookrt(build_loader(min(WARMUP_STEPS, steps)), initial_state)
    loader = build_loader(steps)
    module = HookrtMLP(fresh_mlp(initial_state))
    with tempfile.TemporaryDirectory() as root:
        trainer = build_hookrt_trainer(root, [])
        prepare_timing()
        report = profile_call(lambda: trainer.fit(module, loader), limit, (None, r"hookrt[/\\]_"))
    print(f"\n# cProfile of `trainer.fit` over {steps} steps, top {limit} by own time: all, then hookrt's own\n")
    print(report)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_STEPS} steps per run and {MIN_ROUNDS} rounds unless --rounds is given")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"interleaved rounds (default {FULL_ROUNDS}, or {MIN_ROUNDS} with --quick; "
                             f"at least {MIN_ROUNDS})")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (batches) per run")
    parser.add_argument("--profile", action="store_true",
                        help="also run hookrt once under cProfile and print the top functions by own time")
    args = parser.parse_args(argv)
    steps = args.steps or (QUICK_STEPS if args.quick else FULL_STEPS)
    rounds = max(args.rounds or (MIN_ROUNDS if args.quick else FULL_ROUNDS), MIN_ROUNDS)

    torch.set_num_threads(1)
    with quiet_frameworks():
        contenders = [contender for contender in CONTENDERS if is_installed(contender)]
        missing = [contender for contender in CONTENDERS if not is_installed(contender)]
        load_before = load_average()
        results = measure(contenders, steps, rounds)
        load_after = load_average()
        print_report(contenders, missing, results, steps, rounds, (load_before, load_after))
        if args.profile:
            print_profile(steps)


if __name__ == "__main__":
    main()
