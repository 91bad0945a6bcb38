"""Checkpoint files: atomic writes, safe loads, and the values a checkpoint may contain.

A hookrt checkpoint is one dict written by `torch.save` and read back with
`torch.load(weights_only=True)`, which never runs code from the file. That
loader accepts only tensors, Python scalars, strings, bytes, a few torch types
and plain containers of them, so `check_loadable` rejects everything else at
save time, when the key path and the owning plugin can still be named.

Every checkpoint carries a marker under `MARKER_KEY` with the file format
version, so a load can tell a hookrt checkpoint from any other torch file.
"""

from __future__ import annotations

import argparse
import enum
import errno
import logging
import os
import pickle
import random
import re
import secrets
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePath
from typing import Any, Literal, cast

import numpy as np
import torch
from torch.nn.parameter import is_lazy

from hookrt._errors import CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "MARKER_KEY",
    "CheckpointLoadError",
    "LoadFailure",
    "capture_rng_state",
    "check_loadable",
    "checkpoint_marker",
    "hparams_to_plain",
    "load_checkpoint",
    "load_module_state",
    "restore_rng_state",
    "save_atomic",
]

log = logging.getLogger(__name__)

#: Version of the checkpoint layout that this hookrt writes, and the newest one that it reads.
FORMAT_VERSION: int = 1

#: Top-level key of the marker dict {"format_version": int, "hookrt_version": str}.
MARKER_KEY = "hookrt"

#: Failure kinds that `CheckpointLoadError.reason` reports.
LoadFailure = Literal["missing", "not_hookrt", "truncated", "newer_format", "unsafe"]

_SAFE_VALUE_HINT = "Store numpy arrays as tensors, Paths as str, Namespaces as dict."
_ALLOWED_SUMMARY = (
    "A checkpoint may contain only tensors, int, float, bool, str, bytes, None, torch.Size, torch.dtype, "
    "torch.device, and dicts, lists, tuples and sets of these."
)
_LEAF_TYPES: frozenset[type] = frozenset(
    {torch.Tensor, torch.nn.Parameter, int, float, bool, str, bytes, type(None), torch.Size, torch.dtype, torch.device}
)
_KEY_ATOM_TYPES: frozenset[type] = frozenset({str, int, float, bool, type(None)})
_CONTAINER_TYPES: frozenset[type] = frozenset({dict, OrderedDict, list, tuple, set})
_MAX_LISTED = 10

# The first bytes of a file written by torch.save(..., _use_new_zipfile_serialization=False):
# a protocol-2 pickle of torch's legacy magic number.
_LEGACY_TORCH_HEADER = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]
_ZIP_HEADER = b"PK\x03\x04"
# Pickle opcodes that import or call objects. The weights-only unpickler reports them as "Unsupported operand".
_CODE_OPCODES = frozenset(b"io\x82\x83\x84\x92\x93")


class CheckpointLoadError(CheckpointError):
    """A checkpoint file that `load_checkpoint` could not read.

    Attributes:
        path: the file that was requested.
        reason: which of the known failures it is.
    """

    def __init__(self, message: str, *, path: str, reason: LoadFailure) -> None:
        super().__init__(message)
        #: The file that was requested.
        self.path = path
        #: One of "missing", "not_hookrt", "truncated", "newer_format", "unsafe".
        self.reason: LoadFailure = reason


def checkpoint_marker() -> dict[str, Any]:
    """Return the marker dict that identifies a hookrt checkpoint."""
    import hookrt  # imported here because hookrt/__init__ may import this module

    return {"format_version": FORMAT_VERSION, "hookrt_version": hookrt.__version__}


# --- the weights-only check -------------------------------------------------------------------------


class _InSet:
    def __repr__(self) -> str:
        return "<set member>"


_IN_SET = _InSet()


def _is_allowed_key(key: object) -> bool:
    if type(key) in _KEY_ATOM_TYPES:
        return True
    return type(key) is tuple and all(_is_allowed_key(item) for item in key)


def _type_name(value: object) -> str:
    kind = type(value)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    label = getattr(value, "__qualname__", None)
    if callable(value) and isinstance(label, str):
        return f"{name} {label!r}"
    return name


def _fix_for(value: object) -> str:
    if isinstance(value, np.ndarray):
        return "store it as a tensor: torch.from_numpy(array)"
    if isinstance(value, np.generic):
        return "store it as a Python number: value.item()"
    if isinstance(value, argparse.Namespace):
        return "store it as a dict: vars(namespace)"
    if isinstance(value, PurePath):
        return "store it as a string: str(path)"
    if isinstance(value, enum.Enum):
        return "store its .value"
    if isinstance(value, torch.Tensor):
        return "store a plain tensor: value.as_subclass(torch.Tensor)"
    if callable(getattr(value, "state_dict", None)) and not isinstance(value, type):
        return "store value.state_dict() instead"
    if callable(value):
        return "store its name or settings and rebuild it when the state is loaded"
    if isinstance(value, tuple):
        return "store tuple(value), or value._asdict() for a named tuple"
    if isinstance(value, Mapping):
        return "store dict(value)"
    if isinstance(value, (list, set, frozenset)):
        return "store it as a plain list, tuple or set"
    return "store its fields as tensors, numbers and strings"


def _join_capped(items: list[str]) -> str:
    rest = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + rest


def _format_path(root: str, path: tuple[object, ...]) -> str:
    return root + "".join(f"[{key!r}]" for key in path)


def _find_unloadable(root: object) -> Iterator[tuple[tuple[object, ...], str]]:
    """Yield (key path, problem) for each value or key that the weights-only loader rejects.

    The walk is iterative, visits each container once (shared or cyclic references
    are fine, as pickle memoizes them) and reports problems in insertion order.
    """
    if type(root) in _LEAF_TYPES:
        return
    seen: set[int] = set()
    stack: list[tuple[object, tuple[object, ...]]] = [(root, ())]
    while stack:
        value, path = stack.pop()
        kind = type(value)
        if kind not in _CONTAINER_TYPES:
            yield path, f"is {_type_name(value)}; {_fix_for(value)}"
            continue
        if id(value) in seen:
            continue
        seen.add(id(value))

        children: list[tuple[object, tuple[object, ...]]] = []
        if kind is dict or kind is OrderedDict:
            for key, item in cast("dict[object, object]", value).items():
                if not _is_allowed_key(key):
                    yield path, f"has the key {key!r} of type {_type_name(key)}; {_fix_for(key)}"
                if type(item) not in _LEAF_TYPES:
                    children.append((item, (*path, key)))
        else:
            for index, item in enumerate(cast("list[object]", value)):
                if type(item) not in _LEAF_TYPES:
                    children.append((item, (*path, _IN_SET if kind is set else index)))
        stack.extend(reversed(children))


def _owner_of(path: tuple[object, ...], owners: Mapping[str, str]) -> str | None:
    if len(path) >= 2 and f"{path[0]}/{path[1]}" in owners:
        return owners[f"{path[0]}/{path[1]}"]
    if path and str(path[0]) in owners:
        return owners[str(path[0])]
    return None


def check_loadable(obj: object, *, owners: Mapping[str, str] | None = None) -> None:
    """Raise if `torch.load(weights_only=True)` could not load `obj` back.

    The check walks the object without serializing it. Types are compared
    exactly, because the weights-only loader also rejects subclasses such as
    numpy.float64, str enums, named tuples and defaultdict.

    Args:
        obj: the checkpoint (or any part of it) about to be saved.
        owners: maps "topkey/subkey" (or "topkey") of the checkpoint to the name of
            the plugin that produced that part, for example
            {"plugins/EarlyStopping": "EarlyStopping"}; the error then names the plugin.

    Raises:
        CheckpointError: listing each rejected key path with the type found there,
            the owning plugin when known, and how to store it instead.
    """
    problems = list(_find_unloadable(obj))
    if not problems:
        return
    lines = []
    for path, problem in problems[:_MAX_LISTED]:
        owner = _owner_of(path, owners or {})
        origin = f" (state of plugin {owner!r})" if owner else ""
        lines.append(f"  {_format_path('checkpoint', path)}{origin} {problem}")
    if len(problems) > _MAX_LISTED:
        lines.append(f"  ... and {len(problems) - _MAX_LISTED} more")
    raise CheckpointError(
        "The checkpoint contains values that torch.load(weights_only=True) cannot load:\n"
        + "\n".join(lines)
        + f"\n{_SAFE_VALUE_HINT} {_ALLOWED_SUMMARY}"
    )


# --- atomic save --------------------------------------------------------------------------------------


def _temp_prefix(final_name: str) -> str:
    return f".{final_name}.tmp-"


def _os_error_in(exc: BaseException) -> OSError | None:
    """Return the OSError that ``exc`` is or was raised from, or None.

    torch.save reports a failed write of its file object as a RuntimeError
    about its zip writer, with the OSError only in ``__context__``.
    """
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    return cause if isinstance(cause, OSError) else None


def _explain_os_error(exc: BaseException) -> str:
    cause = _os_error_in(exc)
    if cause is None:
        return ""
    if cause.errno == errno.ENOSPC:
        return " The disk is full: free space or save to another folder."
    if cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return " Check that the folder is writable."
    if cause.errno in (errno.EEXIST, errno.ENOTDIR):
        return " A part of the folder path is a file, not a folder: save to another folder."
    return ""


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except NotADirectoryError:
        return  # a part of the folder path is a file, so the temporary file was never created
    except OSError as exc:
        log.warning("Could not remove the temporary checkpoint file %s: %s", path, exc)


def _fsync_folder(folder: Path) -> None:
    # Makes the rename durable. Windows cannot open a folder, and some file systems
    # reject fsync on one, but the file itself is already synced then.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as exc:
        log.debug("Skipping fsync of folder %s: %s", folder, exc)
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        log.debug("fsync of folder %s failed: %s", folder, exc)
    finally:
        os.close(fd)


def _remove_stale_temp_files(folder: Path, final_name: str) -> None:
    pattern = re.compile(re.escape(_temp_prefix(final_name)) + r"\d+-[0-9a-f]+")
    try:
        stale = [entry for entry in folder.iterdir() if pattern.fullmatch(entry.name)]
    except OSError as exc:
        log.warning("Could not list %s to remove temporary files of interrupted saves: %s", folder, exc)
        return
    for entry in stale:
        log.info("Removing %s, left by an interrupted save of %s", entry, final_name)
        _remove_quietly(entry)


def _check_marker(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    if MARKER_KEY not in checkpoint:
        return {MARKER_KEY: checkpoint_marker(), **checkpoint}
    marker = checkpoint[MARKER_KEY]
    if not isinstance(marker, dict) or type(marker.get("format_version")) is not int:
        raise CheckpointError(
            f"The checkpoint's {MARKER_KEY!r} key contains {marker!r}, not a marker dict with an int "
            "'format_version'; leave that key out (save_atomic adds it) or use checkpoint_marker()."
        )
    return checkpoint


def save_atomic(
    checkpoint: Mapping[str, Any], path: str | os.PathLike[str], *, owners: Mapping[str, str] | None = None
) -> None:
    """Write `checkpoint` to `path` so that the file under `path` is always complete.

    The data goes to a temporary file `.{name}.tmp-{pid}-{random}` in the same
    folder, which is flushed, fsynced and renamed over `path`; then the folder is
    fsynced. Missing parent folders are created. The marker is added when the
    checkpoint lacks one (the given dict is not changed). After a successful
    save, temporary files of earlier interrupted saves of `path` are removed, so
    two processes must not save to one path at the same time.

    Args:
        checkpoint: the dict to save.
        path: the final file name.
        owners: passed to `check_loadable`, so that its error names the plugin.

    Raises:
        CheckpointError: if a value cannot be loaded back (see `check_loadable`), the
            marker is invalid, or the write failed. On a failed write the temporary
            file is removed, the previous file under `path` is unchanged, and the
            cause is chained.
    """
    checkpoint = _check_marker(checkpoint)
    check_loadable(checkpoint, owners=owners)

    final = Path(path)
    temp = final.parent / f"{_temp_prefix(final.name)}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(temp, "xb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, final)
    except BaseException as exc:
        _remove_quietly(temp)
        if not isinstance(exc, Exception):
            raise
        raise CheckpointError(
            f"Could not save the checkpoint {str(final)!r}: {_os_error_in(exc) or exc}. "
            f"The previous file at that path, if any, is unchanged.{_explain_os_error(exc)}"
        ) from exc

    _fsync_folder(final.parent)
    _remove_stale_temp_files(final.parent, final.name)


# --- safe load -----------------------------------------------------------------------------------------


def _missing_file_message(path: Path) -> str:
    folder = path if path.is_dir() else path.parent
    status = "is a folder, not a file" if path.is_dir() else "does not exist"
    if not folder.is_dir():
        return f"No checkpoint at {str(path)!r}: the folder {str(folder)!r} does not exist. Check the path."
    found = sorted(entry.name for entry in folder.glob("*.ckpt"))
    where = f"No checkpoint at {str(path)!r}: it {status}"
    if not found:
        return f"{where}, and {str(folder)!r} contains no *.ckpt files. Check the path."
    return f"{where}. Check the path; {str(folder)!r} contains: {_join_capped(found)}."


def _truncated(path: str, detail: str) -> CheckpointLoadError:
    return CheckpointLoadError(
        f"The checkpoint {path!r} is truncated or corrupt ({detail}), probably because a write was "
        "interrupted. Use an earlier checkpoint.",
        path=path,
        reason="truncated",
    )


def _check_container(path: str) -> None:
    """Raise unless `path` looks like a complete file written by torch.save."""
    with open(path, "rb") as file:
        head = file.read(len(_LEGACY_TORCH_HEADER))
    if not head:
        raise _truncated(path, "the file is empty")
    if head.startswith(_ZIP_HEADER):
        if not zipfile.is_zipfile(path):
            raise _truncated(path, "its zip archive has no end-of-archive record")
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if not any(name.endswith("/data.pkl") for name in names):
            raise CheckpointLoadError(
                f"{path!r} is a zip archive but was not written by torch.save, so it is not a hookrt checkpoint.",
                path=path,
                reason="not_hookrt",
            )
    elif not _LEGACY_TORCH_HEADER.startswith(head):
        raise CheckpointLoadError(
            f"{path!r} was not written by torch.save (it starts with {head[:8]!r}), so it is not a hookrt "
            "checkpoint. Check the path.",
            path=path,
            reason="not_hookrt",
        )


def _unsafe_or_corrupt(path: str, exc: pickle.UnpicklingError) -> CheckpointLoadError:
    text = f"{exc} {exc.__context__ or ''}"
    operand = re.search(r"Unsupported operand (\d+)", text)
    if operand and int(operand.group(1)) not in _CODE_OPCODES:
        return _truncated(path, f"its pickle data has the invalid opcode {operand.group(1)}")
    found = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", text)
    explanation = "loading it would execute code"
    if found:
        explanation = f"it refers to {found.group(1)}, and {explanation}"
    return CheckpointLoadError(
        f"torch.load(weights_only=True) rejected {path!r}: {explanation}. hookrt never loads such files. Only if "
        "you trust its source, load it yourself with torch.load(path, weights_only=False) and save what you "
        "need as tensors, numbers and strings.",
        path=path,
        reason="unsafe",
    )


def _not_hookrt_message(path: str, obj: object) -> str:
    message = f"{path!r} was written by torch.save but is not a hookrt checkpoint: it has no {MARKER_KEY!r} marker."
    if isinstance(obj, Mapping) and obj and all(isinstance(value, torch.Tensor) for value in obj.values()):
        return message + " It looks like a plain state_dict: load it with module.load_state_dict(torch.load(path))."
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return message + " Load its weights with module.load_state_dict(torch.load(path)['state_dict'])."
    return message


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a hookrt checkpoint with `torch.load(weights_only=True)`, which runs no code from the file.

    NOTE: classes or functions that the process registered with
    `torch.serialization.add_safe_globals` are accepted too, because torch applies that allowlist.

    Args:
        path: the checkpoint file.
        map_location: passed to `torch.load`; tensors go to the CPU by default.

    Returns:
        The checkpoint dict, marker included.

    Raises:
        CheckpointLoadError: with `reason` "missing", "not_hookrt", "truncated",
            "newer_format" or "unsafe", and a message saying what to do.
        CheckpointError: for any other failure of `torch.load`, with the cause chained.
    """
    location = os.fspath(path)
    if not os.path.isfile(location):
        raise CheckpointLoadError(_missing_file_message(Path(location)), path=location, reason="missing")
    try:
        _check_container(location)
        obj = torch.load(location, map_location=map_location, weights_only=True)
    except CheckpointLoadError:
        raise
    except pickle.UnpicklingError as exc:
        raise _unsafe_or_corrupt(location, exc) from exc
    except (EOFError, IndexError, KeyError, ValueError, struct.error, zipfile.BadZipFile) as exc:
        # The file passed the container check, so a malformed pickle stream means corrupt data.
        raise _truncated(location, f"{type(exc).__name__}: {exc}") from exc
    except RuntimeError as exc:
        if re.search(r"PytorchStreamReader|unexpected EOF|corrupt", str(exc)):
            raise _truncated(location, str(exc).split(". ")[0]) from exc
        raise CheckpointError(f"Could not load the checkpoint {location!r}: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"Could not read the checkpoint {location!r}: {exc}") from exc

    if not isinstance(obj, dict) or MARKER_KEY not in obj:
        raise CheckpointLoadError(_not_hookrt_message(location, obj), path=location, reason="not_hookrt")
    marker = obj[MARKER_KEY]
    version = marker.get("format_version") if isinstance(marker, dict) else None
    if type(version) is not int or version < 1:
        raise CheckpointLoadError(
            f"{location!r} has an invalid {MARKER_KEY!r} marker {marker!r}, so it is not a hookrt checkpoint.",
            path=location,
            reason="not_hookrt",
        )
    if version > FORMAT_VERSION:
        written_by = marker.get("hookrt_version", "an unknown version")
        raise CheckpointLoadError(
            f"The checkpoint {location!r} has format version {version} (written by hookrt {written_by}), but this "
            f"hookrt reads format versions up to {FORMAT_VERSION}. Upgrade hookrt to load it.",
            path=location,
            reason="newer_format",
        )
    return obj


# --- RNG state -------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Return the state of torch's CPU and CUDA generators, numpy's global RNG and `random`.

    Only tensors, numbers and strings are used, so the dict passes `check_loadable`.
    The "cuda" list is empty when CUDA is not available.
    """
    algorithm, key, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "algorithm": str(algorithm),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(python_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set all generators to a state returned by `capture_rng_state`.

    CUDA states are restored for as many devices as both the state and this
    machine have; a mismatch is logged as a warning.

    Raises:
        CheckpointError: if a part of the state is missing or invalid.
    """
    try:
        # Read every part before setting any generator, so an invalid state changes none of them.
        torch_state = state["torch"].cpu()
        cuda_states = [device_state.cpu() for device_state in state.get("cuda", [])]
        numpy_part = state["numpy"]
        numpy_state = (
            numpy_part["algorithm"],
            numpy_part["key"].cpu().numpy().astype(np.uint32),
            numpy_part["pos"],
            numpy_part["has_gauss"],
            numpy_part["cached_gaussian"],
        )
        python_part = state["python"]
        python_state = (python_part["version"], tuple(python_part["state"].tolist()), python_part["gauss_next"])

        np.random.set_state(numpy_state)
        random.setstate(python_state)
        torch.set_rng_state(torch_state)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(
            f"The RNG state in the checkpoint is invalid ({type(exc).__name__}: {exc}). It must be a dict "
            "made by capture_rng_state()."
        ) from exc

    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda_states and len(cuda_states) != devices:
        log.warning(
            "The checkpoint has CUDA RNG states for %d devices but this process sees %d CUDA devices; "
            "restoring %d of them.",
            len(cuda_states),
            devices,
            min(devices, len(cuda_states)),
        )
    for index in range(min(devices, len(cuda_states))):
        torch.cuda.set_rng_state(cuda_states[index], index)


# --- module state ----------------------------------------------------------------------------------------


def _listed(title: str, keys: list[str]) -> str:
    return f"{len(keys)} {title}: {_join_capped(keys)}"


def load_module_state(module: torch.nn.Module, state_dict: Mapping[str, Any], *, strict: bool = True) -> None:
    """Load `state_dict` into `module`, or raise before changing anything if it does not fit.

    Args:
        module: the model to load into.
        state_dict: the saved `module.state_dict()`.
        strict: when False, missing and unexpected keys are skipped (and logged);
            shape mismatches are always an error.

    Raises:
        CheckpointError: listing missing keys, unexpected keys and shape mismatches.
    """
    if MARKER_KEY in state_dict:
        raise CheckpointError(
            f"load_module_state() got a whole checkpoint instead of a state_dict; pass checkpoint['state_dict'] "
            f"to load it into {type(module).__name__}."
        )
    expected = module.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = []
    for key, target in expected.items():
        saved = state_dict.get(key)
        if isinstance(saved, torch.Tensor) and isinstance(target, torch.Tensor) and not is_lazy(target):
            if saved.shape != target.shape:
                mismatched.append(f"{key} (checkpoint {tuple(saved.shape)}, module {tuple(target.shape)})")

    problems = [_listed("shape mismatches", mismatched)] if mismatched else []
    if strict and missing:
        problems.append(_listed("missing keys", missing))
    if strict and unexpected:
        problems.append(_listed("unexpected keys", unexpected))
    if problems:
        advice = "To load only the keys that match, pass strict=False."
        if mismatched:
            advice = "Shapes must match even with strict=False."
        raise CheckpointError(
            f"The saved state_dict does not fit {type(module).__name__}: " + "; ".join(problems) + ". "
            f"The checkpoint was probably written for a different model. {advice}"
        )

    if missing or unexpected:
        log.info(
            "Loading %s non-strictly: skipped %d missing and %d unexpected keys",
            type(module).__name__,
            len(missing),
            len(unexpected),
        )
    try:
        module.load_state_dict(state_dict, strict=strict)
    except RuntimeError as exc:
        raise CheckpointError(f"Could not load the state_dict into {type(module).__name__}: {exc}") from exc


# --- hyperparameters ---------------------------------------------------------------------------------------


def _plain_value(value: object, where: str) -> Any:
    kind = type(value)
    if kind in _LEAF_TYPES:
        return value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, np.ndarray) and value.dtype != np.object_:
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic) and type(value.item()) in _LEAF_TYPES:
        return value.item()
    if isinstance(value, (argparse.Namespace, Mapping)):
        return _plain_dict(value, where)
    if kind in (list, tuple, set):
        items = [_plain_value(item, f"{where}[{index}]") for index, item in enumerate(cast("list[object]", value))]
        return kind(items)
    raise CheckpointError(
        f"Hyperparameter {where} is {_type_name(value)}, which a checkpoint cannot contain; {_fix_for(value)}. "
        f"{_SAFE_VALUE_HINT}"
    )


def _plain_dict(obj: object, where: str) -> dict[Any, Any]:
    items = vars(obj) if isinstance(obj, argparse.Namespace) else obj
    if not isinstance(items, Mapping):
        raise CheckpointError(
            f"Hyperparameters must be a dict, a Mapping or an argparse.Namespace, not {_type_name(obj)}."
        )
    plain = {}
    for key, value in items.items():
        if not _is_allowed_key(key):
            raise CheckpointError(f"Hyperparameter key {key!r} in {where} is {_type_name(key)}; use str keys.")
        plain[key] = _plain_value(value, f"{where}[{key!r}]")
    return plain


def hparams_to_plain(obj: object) -> dict[Any, Any]:
    """Convert hyperparameters to a plain dict that `check_loadable` accepts.

    Paths become str, numpy scalars Python numbers, numpy arrays tensors, and
    nested Namespaces and Mappings dicts; lists, tuples and sets keep their type.

    Args:
        obj: a dict, any Mapping, or an argparse.Namespace.

    Raises:
        CheckpointError: naming the key and type of any other object; nothing is
            turned into a string silently.
    """
    return _plain_dict(obj, "hparams")
