"""The content of a checkpoint, and how a trainer writes and restores it.

The file layer (atomic writes, safe loading, RNG capture) is in
`hookrt._checkpoint_io`; this module decides the content.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import logging
from typing import TYPE_CHECKING, Any

import torch

from hookrt._checkpoint_io import (
    capture_rng_state,
    checkpoint_marker,
    hparams_to_plain,
    load_checkpoint,
    load_module_state,
    save_atomic,
)
from hookrt._errors import CheckpointError, MisconfigurationError
from hookrt._events import Event

if TYPE_CHECKING:
    from hookrt._module import LightningModule
    from hookrt._trainer import Trainer

__all__ = ["build_module_from_checkpoint", "find_checkpoint", "restore_checkpoint", "write_checkpoint"]

logger = logging.getLogger(__name__)


def _progress_state(trainer: Trainer) -> dict[str, Any]:
    progress = trainer._progress
    return {
        "current_epoch": progress.current_epoch,
        "global_step": progress.global_step,
        "batches_done": progress.batches_done,
        "val_done_at": progress.val_done_at,
        "epoch_closed": progress.epoch_closed,
        "optimizer_steps": list(progress.optimizer_steps),
        "epoch_rng": progress.epoch_rng,
    }


def _partial_gradients(trainer: Trainer) -> dict[str, Any] | None:
    """Return the gradients of an open accumulation window, or None when no window is open."""
    step = getattr(trainer, "_batch_step", None)
    if step is None or not any(step.contributions):
        return None
    module = trainer.lightning_module
    gradients = {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}
    return {"contributions": list(step.contributions), "gradients": gradients}


def build_checkpoint(trainer: Trainer) -> tuple[dict[str, Any], dict[str, str]]:
    """Return the checkpoint dict of the trainer's current state and the owner of each plugin state."""
    module = trainer.lightning_module
    plugin_states: dict[str, Any] = {}
    owners: dict[str, str] = {}
    for plugin in trainer.bus.plugins:
        state = plugin.state_dict()
        if state:
            plugin_states[plugin.state_key] = state
            owners[f"plugins/{plugin.state_key}"] = plugin.name
    checkpoint: dict[str, Any] = {
        "hookrt": checkpoint_marker(),
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "module_class": f"{type(module).__module__}.{type(module).__qualname__}",
        "state_dict": module.state_dict(),
        "hyper_parameters": hparams_to_plain(dict(module.hparams)),
        "optimizer_states": [optimizer.state_dict() for optimizer in trainer.optimizers],
        "optimizer_classes": [type(optimizer).__name__ for optimizer in trainer.optimizers],
        "lr_schedulers": [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
        "loops": {"progress": _progress_state(trainer), "metrics": trainer._metrics.state_dict()},
        "rng": capture_rng_state(),
        "bus": trainer.bus.state_dict(),
        "plugins": plugin_states,
    }
    partial = _partial_gradients(trainer)
    if partial is not None:
        checkpoint["partial_gradients"] = partial
    payload = trainer.bus.emit(Event.SAVE_CHECKPOINT, checkpoint=checkpoint)
    if payload is not None:
        checkpoint = payload.checkpoint  # type: ignore[attr-defined]
    return checkpoint, owners


def _rank_state(trainer: Trainer) -> dict[str, Any]:
    """Return what differs between the ranks of a distributed run: RNG states and an open window's gradients."""
    partial = _partial_gradients(trainer)
    if partial is not None:
        partial["gradients"] = {name: gradient.cpu() for name, gradient in partial["gradients"].items()}
    epoch_rng = trainer._progress.epoch_rng
    return {"rng": capture_rng_state(), "epoch_rng": epoch_rng.cpu() if epoch_rng is not None else None,
            "partial_gradients": partial}


def _step_only_storages(trainer: Trainer) -> set[tuple[int, int]]:
    """Return ``(data_ptr, nbytes)`` of the CPU storages of the parameters and optimizer states.

    Only optimizer steps change them, so an asynchronous save during fit may
    copy them while the next batch runs (see `hookrt._async_save`).
    """
    tensors: list[torch.Tensor] = list(trainer.lightning_module.parameters())
    for optimizer in trainer.optimizers:
        for state in optimizer.state.values():
            tensors.extend(value for value in state.values() if isinstance(value, torch.Tensor))
    keys = set()
    for tensor in tensors:
        if tensor.device.type == "cpu" and tensor.layout is torch.strided:
            storage = tensor.untyped_storage()
            keys.add((storage.data_ptr(), storage.nbytes()))
    return keys


def write_checkpoint(trainer: Trainer, path: str, *, asynchronous: bool = False) -> None:
    """Write the trainer's state to ``path`` atomically; only the global rank 0 process writes.

    Under ``torch.distributed`` this is a collective call that every rank must
    make: each rank's RNG state (and open accumulation window) is gathered
    into the checkpoint under ``"rank_states"``, and every rank waits at a
    barrier until rank 0 has finished writing, so none reads a partial file.
    With ``asynchronous``, rank 0 copies the state (see `hookrt._async_save`)
    and writes the file from a background thread, so the barrier waits only
    for the copy.
    """
    from hookrt import _distributed as distributed

    several = distributed.world_size() > 1
    rank_states = distributed.all_gather_object(_rank_state(trainer)) if several else None
    try:
        if trainer.is_global_zero:
            checkpoint, owners = build_checkpoint(trainer)
            if rank_states is not None:
                checkpoint["rank_states"] = rank_states
            if asynchronous:
                from hookrt._async_save import writer_for

                deferrable = _step_only_storages(trainer) if trainer._running == "fit" else None
                writer_for(trainer).submit(checkpoint, path, owners=owners, deferrable=deferrable, bus=trainer.bus)
            else:
                save_atomic(checkpoint, path, owners=owners)
            logger.info("%s checkpoint %s (epoch %d, step %d)", "Writing" if asynchronous else "Saved", path,
                        trainer.current_epoch, trainer.global_step)
    finally:
        if several:
            distributed.barrier()


def restore_checkpoint(trainer: Trainer, path: str, *, training: bool) -> dict[str, Any]:
    """Load ``path`` into the trainer's module; with ``training``, also the optimizers, loops, RNG and plugins.

    Raises:
        CheckpointError: the file cannot be read, or its state does not fit the module.
    """
    checkpoint = load_checkpoint(path)
    module = trainer.lightning_module
    load_module_state(module, checkpoint["state_dict"])
    if training:
        _restore_training_state(trainer, checkpoint, path)
    trainer.bus.emit(Event.LOAD_CHECKPOINT, checkpoint=checkpoint)
    logger.info("Restored checkpoint %s (epoch %s, step %s)", path, checkpoint.get("epoch"),
                checkpoint.get("global_step"))
    return checkpoint


def _restore_training_state(trainer: Trainer, checkpoint: dict[str, Any], path: str) -> None:
    optimizer_states = checkpoint.get("optimizer_states", [])
    if len(optimizer_states) != len(trainer.optimizers):
        raise CheckpointError(
            f"Checkpoint {path} contains {len(optimizer_states)} optimizer state(s), but configure_optimizers() "
            f"returned {len(trainer.optimizers)}. Resume with the same optimizer set-up it was saved with."
        )
    saved_classes = checkpoint.get("optimizer_classes", [])
    for index, (optimizer, state) in enumerate(zip(trainer.optimizers, optimizer_states, strict=True)):
        _check_optimizer_fits(optimizer, state, saved_classes[index] if index < len(saved_classes) else None,
                              index, path)
        optimizer.load_state_dict(state)
    for config, state in zip(trainer.lr_scheduler_configs, checkpoint.get("lr_schedulers", []), strict=False):
        config.scheduler.load_state_dict(state)

    loops = checkpoint.get("loops", {})
    saved = loops.get("progress", {})
    progress = trainer._progress
    progress.current_epoch = int(saved.get("current_epoch", checkpoint.get("epoch", 0)))
    progress.global_step = int(saved.get("global_step", checkpoint.get("global_step", 0)))
    progress.batches_done = int(saved.get("batches_done", 0))
    progress.val_done_at = int(saved.get("val_done_at", -1))
    progress.epoch_closed = bool(saved.get("epoch_closed", True))
    progress.optimizer_steps = list(saved.get("optimizer_steps", [0] * len(trainer.optimizers)))
    progress.epoch_rng = saved.get("epoch_rng")
    trainer._metrics.load_state_dict(loops.get("metrics", {}))
    trainer._pending_rng = checkpoint.get("rng")
    trainer.bus.load_state_dict(checkpoint.get("bus", {}))

    states = checkpoint.get("plugins", {})
    for plugin in trainer.bus.plugins:
        if plugin.state_key in states:
            plugin.load_state_dict(states[plugin.state_key])
    unused = sorted(set(states) - {plugin.state_key for plugin in trainer.bus.plugins})
    if unused:
        logger.info("Checkpoint %s contains state for plugins that are not registered now: %s", path,
                    ", ".join(unused))
    trainer._pending_gradients = checkpoint.get("partial_gradients")
    _restore_rank_state(trainer, checkpoint, path)


def _restore_rank_state(trainer: Trainer, checkpoint: dict[str, Any], path: str) -> None:
    """Take this rank's own RNG states and open window from a checkpoint written by a distributed run."""
    from hookrt import _distributed as distributed

    states = checkpoint.get("rank_states")
    if not states:
        return
    world_size = distributed.world_size()
    if len(states) != world_size:
        logger.warning(
            "Checkpoint %s was written by %d processes and is resumed by %d; every process takes the RNG state "
            "of rank 0, so the resumed run will not repeat the random draws of an uninterrupted one.", path,
            len(states), world_size,
        )
        return
    state = states[distributed.rank()]
    trainer._pending_rng = state["rng"]
    trainer._progress.epoch_rng = state["epoch_rng"]
    trainer._pending_gradients = state["partial_gradients"]


def _check_optimizer_fits(optimizer: Any, state: dict[str, Any], saved_class: str | None, index: int,
                          path: str) -> None:
    """Raise when a saved optimizer state belongs to another kind of optimizer.

    torch would load it and then fail at the first step on a missing hyperparameter.
    """
    saved_keys = {key for group in state.get("param_groups", []) for key in group if key != "params"}
    current_keys = {key for group in optimizer.param_groups for key in group if key != "params"}
    current_class = type(optimizer).__name__
    if (saved_class is not None and saved_class != current_class) or (saved_keys and saved_keys != current_keys):
        saved = saved_class or f"an optimizer with options {sorted(saved_keys)}"
        raise CheckpointError(
            f"Checkpoint {path} contains the state of {saved} for optimizer {index}, but configure_optimizers() now "
            f"returns {current_class}. Resume with the optimizer the checkpoint was written with, or load only the "
            "weights: Model.load_from_checkpoint(path), then fit without ckpt_path."
        )


def apply_partial_gradients(trainer: Trainer) -> None:
    """Put back the gradients of an accumulation window that was open when the checkpoint was written."""
    partial = getattr(trainer, "_pending_gradients", None)
    step = getattr(trainer, "_batch_step", None)
    if partial is None or step is None:
        return
    parameters = dict(trainer.lightning_module.named_parameters())
    for name, gradient in partial["gradients"].items():
        if name in parameters:
            parameters[name].grad = gradient.to(parameters[name].device)
    step.contributions = list(partial["contributions"])
    trainer._pending_gradients = None


def find_checkpoint(trainer: Trainer, which: str, stage: str) -> str:
    """Return the path of the ``"best"`` or ``"last"`` checkpoint that a ModelCheckpoint plugin wrote.

    Raises:
        MisconfigurationError: no ModelCheckpoint is registered, or it has written no such file.
    """
    attribute = "best_model_path" if which == "best" else "last_model_path"
    for plugin in trainer.bus.plugins:
        path = getattr(plugin, attribute, None)
        if isinstance(path, str) and path:
            return path
    raise MisconfigurationError(
        f"trainer.{stage}(ckpt_path={which!r}) found no {which} checkpoint: no ModelCheckpoint plugin has written "
        f"one yet. Fit with checkpointing on first{' and save_last=True' if which == 'last' else ''}, or pass "
        "a file path."
    )


def build_module_from_checkpoint(
    cls: type[LightningModule], path: Any, map_location: Any, strict: bool, overrides: dict[str, Any]
) -> Any:
    """Construct ``cls`` from the checkpoint's hyperparameters (plus ``overrides``) and load its weights."""
    checkpoint = load_checkpoint(path, map_location=map_location)
    arguments = {**checkpoint.get("hyper_parameters", {}), **overrides}
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    names = [parameter.name for parameter in parameters]
    takes_any = any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters)
    if names == ["hparams"] and "hparams" not in arguments:
        module = cls(argparse.Namespace(**arguments))
    else:
        unknown = sorted(set(overrides) - set(names)) if not takes_any else []
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise MisconfigurationError(
                f"{cls.__name__}.load_from_checkpoint got {', '.join(map(repr, unknown))}, which "
                f"{cls.__name__}.__init__ does not take.{hint} Its arguments are: {', '.join(names) or 'none'}."
            )
        accepted = arguments if takes_any else {key: value for key, value in arguments.items() if key in names}
        try:
            module = cls(**accepted)
        except TypeError as exc:
            raise CheckpointError(
                f"Could not build {cls.__name__} from the hyperparameters saved in {path}: {exc}. Pass the missing "
                f"constructor arguments as keywords: {cls.__name__}.load_from_checkpoint(path, name=value)."
            ) from exc
    load_module_state(module, checkpoint["state_dict"], strict=strict)
    module.on_load_checkpoint(checkpoint)
    return module

