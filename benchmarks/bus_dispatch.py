"""Time one emit on the hookrt bus against blinker and against calling the handlers directly.

Run it from the repository root::

    python -m benchmarks.bus_dispatch [--quick]

Every case runs the same number of iterations per round. Rounds are
interleaved, and the case order rotates each round, so that a slow moment on
the machine hits all cases alike. The table shows the median and the min..max
over rounds; "net" subtracts the median cost of the empty timing loop. The
script prints its figures and never fails on them.

The cases:

- ``emit, N subscribers``: ``bus.emit("on_batch_end", batch=..., batch_idx=..., outputs=...)``
  with N no-op handlers. It builds the payload on every emit, except with 0
  subscribers, where the bus returns before building anything.
- ``emit, 0 subscribers, no fields``: ``bus.emit("on_train_start")``, which
  leaves out the cost of passing keyword arguments.
- ``blinker send, N receivers``: ``signal.send(payload)`` on a ``blinker.Signal``
  with the same N functions connected with ``weak=False``; the payload is built
  once, outside the loop, which favours blinker.
- ``direct loop over 5 handlers`` and ``direct no-op call``: the handlers called
  by a plain ``for`` loop, and one call of a no-op function, with a prebuilt payload.
- ``no-op function taking **fields``: a plain function with the signature of
  ``emit`` that returns at once, called like the 0-subscriber emit. It is the
  floor for any ``emit(event, **fields)`` in CPython, because a call that
  collects keyword arguments into a dict cannot take the interpreter's fast path.

The goals are stated as ratios of medians: emit with 0 subscribers at most
2x a direct no-op call (shown with and without fields), and blinker send with
5 receivers at least 5x emit with 5 subscribers.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable

import blinker

from hookrt import Bus
from hookrt._events import BatchEndPayload

EVENT = "on_batch_end"
EVENT_WITHOUT_FIELDS = "on_train_start"
FULL_ITERATIONS = 200_000
QUICK_ITERATIONS = 20_000
MIN_ROUNDS = 5


def make_handlers(count: int) -> list[Callable[[object], None]]:
    """Return ``count`` distinct no-op functions that take one argument."""
    handlers = []
    for _ in range(count):

        def handler(payload: object) -> None:
            pass

        handlers.append(handler)
    return handlers


def time_empty_loop(iterations: int) -> int:
    start = time.perf_counter_ns()
    for _ in range(iterations):
        pass
    return time.perf_counter_ns() - start


def emit_timer(subscribers: int) -> Callable[[int], int]:
    bus = Bus()
    for handler in make_handlers(subscribers):
        bus.subscribe(EVENT, handler)
    emit = bus.emit
    batch = object()

    def run(iterations: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(iterations):
            emit(EVENT, batch=batch, batch_idx=0, outputs=None)
        return time.perf_counter_ns() - start

    return run


def emit_without_fields_timer() -> Callable[[int], int]:
    emit = Bus().emit

    def run(iterations: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(iterations):
            emit(EVENT_WITHOUT_FIELDS)
        return time.perf_counter_ns() - start

    return run


def blinker_timer(receivers: int) -> Callable[[int], int]:
    signal = blinker.Signal()
    for handler in make_handlers(receivers):
        signal.connect(handler, weak=False)
    send = signal.send
    payload = BatchEndPayload(None, None, batch=object(), batch_idx=0, outputs=None)

    def run(iterations: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(iterations):
            send(payload)
        return time.perf_counter_ns() - start

    return run


def direct_loop_timer(count: int) -> Callable[[int], int]:
    handlers = tuple(make_handlers(count))
    payload = BatchEndPayload(None, None, batch=object(), batch_idx=0, outputs=None)

    def run(iterations: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(iterations):
            for handler in handlers:
                handler(payload)
        return time.perf_counter_ns() - start

    return run


def keyword_call_timer() -> Callable[[int], int]:
    def emit_nothing(event: str, /, **fields: object) -> None:
        return None

    batch = object()

    def run(iterations: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(iterations):
            emit_nothing(EVENT, batch=batch, batch_idx=0, outputs=None)
        return time.perf_counter_ns() - start

    return run


def direct_call_timer() -> Callable[[int], int]:
    (handler,) = make_handlers(1)
    payload = BatchEndPayload(None, None, batch=object(), batch_idx=0, outputs=None)

    def run(iterations: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(iterations):
            handler(payload)
        return time.perf_counter_ns() - start

    return run


CASES: dict[str, Callable[[], Callable[[int], int]]] = {
    "empty loop (overhead)": lambda: time_empty_loop,
    "emit, 0 subscribers, no fields": emit_without_fields_timer,
    "emit, 0 subscribers": lambda: emit_timer(0),
    "emit, 1 subscriber": lambda: emit_timer(1),
    "emit, 5 subscribers": lambda: emit_timer(5),
    "blinker send, 1 receiver": lambda: blinker_timer(1),
    "blinker send, 5 receivers": lambda: blinker_timer(5),
    "direct loop over 5 handlers": lambda: direct_loop_timer(5),
    "direct no-op call": direct_call_timer,
    "no-op function taking **fields": keyword_call_timer,
}

# (name, numerator case, denominator case, goal text, goal check on the ratio)
RATIOS: list[tuple[str, str, str, str, Callable[[float], bool]]] = [
    ("emit(0) / direct no-op call", "emit, 0 subscribers", "direct no-op call", "<= 2x", lambda r: r <= 2.0),
    (
        "same, emit without fields",
        "emit, 0 subscribers, no fields",
        "direct no-op call",
        "<= 2x",
        lambda r: r <= 2.0,
    ),
    ("blinker send(5) / emit(5)", "blinker send, 5 receivers", "emit, 5 subscribers", ">= 5x", lambda r: r >= 5.0),
    ("blinker send(1) / emit(1)", "blinker send, 1 receiver", "emit, 1 subscriber", "", lambda r: True),
]


def measure(iterations: int, rounds: int) -> dict[str, list[float]]:
    """Return, per case, the ns per iteration of each round."""
    timers = {name: build() for name, build in CASES.items()}
    for run in timers.values():
        run(max(iterations // 10, 1))  # warm-up, so the interpreter has specialized the bytecode
    names = list(timers)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(timers[name](iterations) / iterations)
    return samples


def print_report(samples: dict[str, list[float]], iterations: int, rounds: int) -> None:
    medians = {name: statistics.median(values) for name, values in samples.items()}
    overhead = medians["empty loop (overhead)"]
    print(f"hookrt bus dispatch, {rounds} interleaved rounds of {iterations:,} iterations per case")
    print(f"Python {platform.python_version()} ({platform.python_implementation()}), blinker {_blinker_version()}")
    print()
    width = max(len(name) for name in samples)
    print(f"{'case':<{width}}  {'ns/emit':>9}  {'min..max':>17}  {'net ns':>8}")
    for name, values in samples.items():
        spread = f"{min(values):.1f}..{max(values):.1f}"
        net = "" if name.startswith("empty loop") else f"{medians[name] - overhead:.1f}"
        print(f"{name:<{width}}  {medians[name]:>9.1f}  {spread:>17}  {net:>8}")
    print()
    print("net ns = median minus the median of the empty loop.")
    print()
    print(f"{'ratio':<30}  {'per call':>8}  {'net':>8}  goal")
    for label, numerator, denominator, goal, check in RATIOS:
        ratio = medians[numerator] / medians[denominator]
        net_ratio = (medians[numerator] - overhead) / (medians[denominator] - overhead)
        verdict = ""
        if goal:
            verdict = "(met)" if check(ratio) else "(not met)"
        print(f"{label:<30}  {ratio:>7.2f}x  {net_ratio:>7.2f}x  {goal} {verdict}".rstrip())
    if "torch" in sys.modules:
        print("\nNote: torch was imported while this ran.")


def _blinker_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("blinker")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ITERATIONS:,} iterations per round")
    parser.add_argument("--rounds", type=int, default=7, help=f"interleaved rounds (at least {MIN_ROUNDS})")
    parser.add_argument("--iterations", type=int, default=None, help="iterations per case per round")
    args = parser.parse_args(argv)
    iterations = args.iterations or (QUICK_ITERATIONS if args.quick else FULL_ITERATIONS)
    rounds = max(args.rounds, MIN_ROUNDS)
    print_report(measure(iterations, rounds), iterations, rounds)


if __name__ == "__main__":
    main()
