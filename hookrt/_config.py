"""The Trainer's flags, checked and normalised once, when the Trainer is built."""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Any

from hookrt._errors import MisconfigurationError

__all__ = ["TrainerConfig", "parse_max_time"]

_PRECISIONS = {
    "32-true": "32-true",
    "32": "32-true",
    32: "32-true",
    "bf16-mixed": "bf16-mixed",
    "bf16": "bf16-mixed",
    "16-mixed": "16-mixed",
    "16": "16-mixed",
    16: "16-mixed",
}
_ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
_STRATEGIES = ("auto", "single_device", "dp", "ddp", "ddp_spawn")


def _fail(flag: str, value: Any, expected: str) -> MisconfigurationError:
    return MisconfigurationError(f"Trainer({flag}={value!r}) is not valid: {flag} must be {expected}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(flag: str, value: Any, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise _fail(flag, value, f"an int >= {minimum}")
    return int(value)


def _check_bool(flag: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(flag, value, "True or False")
    return value


def _check_limit(flag: str, value: Any) -> int | float:
    if _is_int(value) and value >= 0:
        return int(value)
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return value
    raise _fail(flag, value, "a fraction between 0.0 and 1.0 or a batch count (int >= 0)")


def parse_max_time(value: Any) -> float | None:
    """Return ``max_time`` in seconds from a timedelta, a dict, ``"DD:HH:MM:SS"`` or a number of seconds."""
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, dict):
        try:
            return datetime.timedelta(**value).total_seconds()
        except TypeError:
            raise _fail("max_time", value, "a dict of timedelta arguments such as {'hours': 1}") from None
    if isinstance(value, str):
        parts = value.split(":")
        if len(parts) == 4 and all(part.isdigit() for part in parts):
            days, hours, minutes, seconds = (int(part) for part in parts)
            return datetime.timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds).total_seconds()
        raise _fail("max_time", value, "a 'DD:HH:MM:SS' string, a timedelta, a dict or seconds")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise _fail("max_time", value, "a 'DD:HH:MM:SS' string, a timedelta, a dict or a positive number of seconds")


@dataclass
class TrainerConfig:
    """The Trainer's flags after checking; see ``Trainer`` for what each means."""

    max_epochs: int
    min_epochs: int
    max_steps: int
    min_steps: int
    max_time: float | None
    accumulate_grad_batches: int
    gradient_clip_val: float | None
    gradient_clip_algorithm: str
    val_check_interval: int | float
    check_val_every_n_epoch: int | None
    num_sanity_val_steps: int
    limit_train_batches: int | float
    limit_val_batches: int | float
    limit_test_batches: int | float
    limit_predict_batches: int | float
    fast_dev_run: int
    truncated_bptt_steps: int | None
    log_every_n_steps: int
    precision: str
    accelerator: str
    devices: Any
    num_nodes: int
    strategy: Any
    deterministic: bool
    detect_anomaly: bool
    default_root_dir: str
    enable_checkpointing: bool
    logger: Any
    enable_progress_bar: bool
    enable_model_summary: bool
    enable_signal_handler: bool

    @classmethod
    def from_flags(cls, **flags: Any) -> TrainerConfig:  # noqa: C901 - one check per flag, in order
        """Check every flag and return the normalised config.

        Raises:
            MisconfigurationError: a flag has an invalid value, or two flags conflict.
        """
        fast_dev_run = flags["fast_dev_run"]
        if fast_dev_run is True:
            fast_dev_run = 1
        elif fast_dev_run is False:
            fast_dev_run = 0
        fast_dev_run = _check_int("fast_dev_run", fast_dev_run, 0)

        max_steps = flags["max_steps"]
        if not _is_int(max_steps) or max_steps < -1:
            raise _fail("max_steps", max_steps, "-1 (no limit) or an int >= 0")
        max_epochs = flags["max_epochs"]
        if max_epochs is None:
            max_epochs = 1000 if max_steps == -1 and flags["max_time"] is None else -1
        if not _is_int(max_epochs) or max_epochs < -1:
            raise _fail("max_epochs", max_epochs, "None, -1 (no limit) or an int >= 0")
        min_epochs = flags["min_epochs"] or 0
        min_epochs = _check_int("min_epochs", min_epochs, 0)
        if max_epochs != -1 and min_epochs > max_epochs:
            raise MisconfigurationError(
                f"Trainer(min_epochs={min_epochs}, max_epochs={max_epochs}) conflict: min_epochs must not exceed "
                "max_epochs. Raise max_epochs or lower min_epochs."
            )
        min_steps = _check_int("min_steps", flags["min_steps"] or 0, 0)
        if max_steps != -1 and min_steps > max_steps:
            raise MisconfigurationError(
                f"Trainer(min_steps={min_steps}, max_steps={max_steps}) conflict: min_steps must not exceed "
                "max_steps. Raise max_steps or lower min_steps."
            )

        clip = flags["gradient_clip_val"]
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0):
            raise _fail("gradient_clip_val", clip, "None or a number >= 0")
        algorithm = flags["gradient_clip_algorithm"]
        if algorithm not in ("norm", "value"):
            raise _fail("gradient_clip_algorithm", algorithm, "'norm' or 'value'")

        interval = flags["val_check_interval"]
        if _is_int(interval):
            interval = _check_int("val_check_interval", interval, 1)
        elif not (isinstance(interval, float) and 0.0 < interval <= 1.0):
            raise _fail("val_check_interval", interval, "a fraction in (0.0, 1.0] or a batch count (int >= 1)")
        every_n = flags["check_val_every_n_epoch"]
        if every_n is not None:
            every_n = _check_int("check_val_every_n_epoch", every_n, 1)

        sanity = flags["num_sanity_val_steps"]
        sanity = _check_int("num_sanity_val_steps", sanity, -1)
        tbptt = flags["truncated_bptt_steps"]
        if tbptt is not None:
            tbptt = _check_int("truncated_bptt_steps", tbptt, 1)

        precision = _PRECISIONS.get(flags["precision"])
        if precision is None:
            raise _fail("precision", flags["precision"], "one of '32-true', 'bf16-mixed', '16-mixed'")
        accelerator = flags["accelerator"]
        if accelerator not in _ACCELERATORS:
            raise _fail("accelerator", accelerator, f"one of {', '.join(map(repr, _ACCELERATORS))}")
        strategy = flags["strategy"]
        if isinstance(strategy, str) and strategy not in _STRATEGIES:
            raise _fail("strategy", strategy, f"one of {', '.join(map(repr, _STRATEGIES))} or a strategy plugin")

        limits = {
            name: _check_limit(name, flags[name])
            for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")
        }
        if fast_dev_run:
            limits = dict.fromkeys(limits, fast_dev_run)
            max_epochs, max_steps, sanity = 1, -1, 0
            interval = 1.0
            every_n = 1

        root = flags["default_root_dir"]
        if root is not None and not isinstance(root, (str, os.PathLike)):
            raise _fail("default_root_dir", root, "None or a folder path (str or os.PathLike)")
        root = os.path.abspath(os.fspath(root)) if root is not None else os.getcwd()
        return cls(
            max_epochs=max_epochs,
            min_epochs=min_epochs,
            max_steps=max_steps,
            min_steps=min_steps,
            max_time=parse_max_time(flags["max_time"]),
            accumulate_grad_batches=_check_int("accumulate_grad_batches", flags["accumulate_grad_batches"], 1),
            gradient_clip_val=float(clip) if clip else None,
            gradient_clip_algorithm=algorithm,
            val_check_interval=interval,
            check_val_every_n_epoch=every_n,
            num_sanity_val_steps=sanity,
            fast_dev_run=fast_dev_run,
            truncated_bptt_steps=tbptt,
            log_every_n_steps=_check_int("log_every_n_steps", flags["log_every_n_steps"], 1),
            precision=precision,
            accelerator=accelerator,
            devices=flags["devices"],
            num_nodes=_check_int("num_nodes", flags["num_nodes"], 1),
            strategy=strategy,
            deterministic=_check_bool("deterministic", flags["deterministic"]),
            detect_anomaly=_check_bool("detect_anomaly", flags["detect_anomaly"]),
            default_root_dir=root,
            enable_checkpointing=(
                _check_bool("enable_checkpointing", flags["enable_checkpointing"]) and not fast_dev_run
            ),
            logger=flags["logger"] if not fast_dev_run else False,
            enable_progress_bar=_check_bool("enable_progress_bar", flags["enable_progress_bar"]),
            enable_model_summary=_check_bool("enable_model_summary", flags["enable_model_summary"]),
            enable_signal_handler=_check_bool("enable_signal_handler", flags["enable_signal_handler"]),
            **limits,
        )

    def check_val_interval_fits(self, length: float) -> None:
        """Raise when a batch-count ``val_check_interval`` exceeds an epoch of ``length`` batches.

        Raises:
            MisconfigurationError: validation would never run.
        """
        interval = self.val_check_interval
        if isinstance(interval, int) and not math.isinf(length) and interval > length:
            raise MisconfigurationError(
                f"Trainer(val_check_interval={interval}) is larger than the {int(length)} training batches of an "
                f"epoch (after limit_train_batches), so validation would never run. Use a batch count of at most "
                f"{int(length)}, or a fraction of the epoch such as 1.0."
            )

    def val_points(self, length: float) -> set[int] | None:
        """Return the batch counts after which validation runs in an epoch of ``length`` batches.

        A fraction f of the epoch validates after int(k * f * length) batches for
        k = 1 .. floor(1/f); when 1/f is a whole number the last point is the
        epoch end. A batch count n validates after every n batches. Returns None
        for an unknown length, where the caller checks counts as they come.

        Raises:
            MisconfigurationError: a fraction below 1.0 with a loader that has no length.
        """
        interval = self.val_check_interval
        if math.isinf(length):
            if isinstance(interval, float) and interval < 1.0:
                raise MisconfigurationError(
                    f"Trainer(val_check_interval={interval}) is a fraction of an epoch, but the training loader "
                    "has no length. Give a batch count instead, e.g. val_check_interval=1000."
                )
            return None
        total = int(length)
        if isinstance(interval, int):
            return set(range(interval, total + 1, interval))
        repeats = math.floor(1.0 / interval + 1e-9)
        points = {max(1, int(k * interval * total)) for k in range(1, repeats + 1)}
        if abs(repeats * interval - 1.0) < 1e-9:
            points.discard(max(1, int(repeats * interval * total)))
            points.add(total)
        return {point for point in points if point <= total}
