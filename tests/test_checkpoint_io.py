"""Tests for hookrt._checkpoint_io: atomic saves, safe loads, the weights-only check, RNG and module state."""

from __future__ import annotations

import argparse
import collections
import enum
import errno
import logging
import os
import pickle
import random
import struct
import types
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import hookrt
from hookrt._checkpoint_io import (
    FORMAT_VERSION,
    MARKER_KEY,
    CheckpointLoadError,
    capture_rng_state,
    check_loadable,
    checkpoint_marker,
    hparams_to_plain,
    load_checkpoint,
    load_module_state,
    restore_rng_state,
    save_atomic,
)
from hookrt._errors import CheckpointError


def small_checkpoint(value: float = 1.0) -> dict[str, Any]:
    return {
        MARKER_KEY: checkpoint_marker(),
        "state_dict": {"weight": torch.full((2, 3), value), "bias": torch.zeros(2)},
        "epoch": 3,
        "plugins": {"EarlyStopping": {"wait_count": 1, "best_score": torch.tensor(0.5)}},
    }


def assert_same_checkpoint(loaded: dict[str, Any], expected: dict[str, Any]) -> None:
    assert loaded[MARKER_KEY] == expected[MARKER_KEY]
    assert loaded["epoch"] == expected["epoch"]
    for key, tensor in expected["state_dict"].items():
        assert torch.equal(loaded["state_dict"][key], tensor)


def roundtrip_weights_only(value: object, tmp_path: Path) -> object:
    file = tmp_path / "roundtrip.pt"
    torch.save(value, file)
    return torch.load(file, weights_only=True)


class Color(str, enum.Enum):
    RED = "red"


class SubTensor(torch.Tensor):
    pass


class Opaque:
    pass


Pair = collections.namedtuple("Pair", "a b")


def patience(epoch: int) -> int:
    return epoch


ALLOWED_VALUES = {
    "tensor": torch.arange(3),
    "parameter": torch.nn.Parameter(torch.zeros(2)),
    "int": 7,
    "float": 0.5,
    "bool": True,
    "str": "text",
    "bytes": b"\x00\x01",
    "none": None,
    "size": torch.Size([2, 3]),
    "dtype": torch.bfloat16,
    "device": torch.device("cpu"),
    "dict": {"a": 1, 2: "b", 1.5: None, False: 0, None: 1, ("x", 1): 2},
    "ordered_dict": collections.OrderedDict(a=torch.ones(1)),
    "list": [1, [2.0, "three"]],
    "tuple": (1, (None, b"x")),
    "set": {1, "a", (2, 3)},
}

REJECTED_VALUES = {
    "numpy_array": (np.zeros(2), "numpy.ndarray", "torch.from_numpy"),
    "numpy_float64": (np.float64(1.0), "numpy.float64", r"value\.item\(\)"),
    "numpy_int64": (np.int64(1), "numpy.int64", r"value\.item\(\)"),
    "namespace": (argparse.Namespace(lr=0.1), "argparse.Namespace", r"vars\(namespace\)"),
    "path": (Path("runs/a"), r"pathlib\S*Path", r"str\(path\)"),
    "function": (patience, "function 'patience'", "store its name"),
    "object": (Opaque(), "Opaque", "store its fields"),
    "str_enum": (Color.RED, "Color", r"store its \.value"),
    "named_tuple": (Pair(1, 2), "Pair", r"_asdict\(\)"),
    "defaultdict": (collections.defaultdict(int), "collections.defaultdict", r"dict\(value\)"),
    "frozenset": (frozenset({1}), "frozenset", "plain list"),
    "tensor_subclass": (torch.zeros(2).as_subclass(SubTensor), "SubTensor", "as_subclass"),
    "module": (torch.nn.Linear(1, 1), "torch.nn.modules.linear.Linear", r"value\.state_dict\(\)"),
}


# --- check_loadable ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALLOWED_VALUES))
def test_check_loadable_accepts_allowed_type(name: str, tmp_path: Path) -> None:
    value = ALLOWED_VALUES[name]
    check_loadable({"value": value})

    loaded = roundtrip_weights_only({"value": value}, tmp_path)
    assert isinstance(loaded, dict)
    assert type(loaded["value"]) is type(value)


@pytest.mark.parametrize("name", sorted(REJECTED_VALUES))
def test_check_loadable_rejects_type(name: str, tmp_path: Path) -> None:
    value, type_name, fix = REJECTED_VALUES[name]
    with pytest.raises(CheckpointError, match=rf"checkpoint\['value'\] is .*{type_name}.*{fix}"):
        check_loadable({"value": value})

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        roundtrip_weights_only({"value": value}, tmp_path)


def test_check_loadable_names_key_path_and_plugin() -> None:
    checkpoint = small_checkpoint()
    checkpoint["plugins"]["EarlyStopping"]["patience_fn"] = patience
    owners = {"plugins/EarlyStopping": "EarlyStopping"}

    with pytest.raises(CheckpointError) as caught:
        check_loadable(checkpoint, owners=owners)

    message = str(caught.value)
    assert "checkpoint['plugins']['EarlyStopping']['patience_fn'] (state of plugin 'EarlyStopping')" in message
    assert "function 'patience'" in message
    assert "Store numpy arrays as tensors, Paths as str, Namespaces as dict." in message


def test_check_loadable_owner_by_top_key() -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint\['hparams'\]\['root'\] \(state of plugin 'module'\)"):
        check_loadable({"hparams": {"root": Path("data")}}, owners={"hparams": "module"})


def test_check_loadable_without_owner_names_no_plugin() -> None:
    with pytest.raises(CheckpointError) as caught:
        check_loadable({"plugins": {"Other": {"x": np.ones(1)}}}, owners={"plugins/EarlyStopping": "EarlyStopping"})
    assert "state of plugin" not in str(caught.value)


def test_check_loadable_rejects_bad_key(tmp_path: Path) -> None:
    value = {"scores": {Path("a.ckpt"): 0.5}}
    with pytest.raises(CheckpointError, match=r"checkpoint\['scores'\] has the key .*a\.ckpt.*pathlib"):
        check_loadable(value)

    with pytest.raises(pickle.UnpicklingError):
        roundtrip_weights_only(value, tmp_path)


def test_check_loadable_paths_in_sequences() -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint\['history'\]\[2\]\[0\] is numpy\.float32"):
        check_loadable({"history": [1.0, 2.0, (np.float32(3.0),)]})
    with pytest.raises(CheckpointError, match=r"checkpoint\['tags'\]\[<set member>\] is"):
        check_loadable({"tags": {"a", Pair(1, 2)}})


def test_check_loadable_lists_problems_in_order() -> None:
    value = {"first": np.zeros(1), "second": {"inner": Path("x")}, "third": np.int8(1)}
    with pytest.raises(CheckpointError) as caught:
        check_loadable(value)

    message = str(caught.value)
    assert message.index("['first']") < message.index("['second']['inner']") < message.index("['third']")


def test_check_loadable_caps_listed_problems() -> None:
    value = {f"key{index}": np.float32(index) for index in range(25)}
    with pytest.raises(CheckpointError, match=r"\.\.\. and 15 more"):
        check_loadable(value)


def test_check_loadable_shared_and_cyclic_containers(tmp_path: Path) -> None:
    shared = {"w": torch.ones(1)}
    cyclic: list[object] = [1]
    cyclic.append(cyclic)
    value = {"a": shared, "b": shared, "loop": cyclic}

    check_loadable(value)

    loaded = roundtrip_weights_only(value, tmp_path)
    assert isinstance(loaded, dict)
    assert loaded["loop"][1] is loaded["loop"]


def test_check_loadable_rejected_root() -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint is numpy\.ndarray"):
        check_loadable(np.zeros(1))


def test_check_loadable_large_state_dict() -> None:
    model = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(3)))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()

    check_loadable({"state_dict": model.state_dict(), "optimizer": optimizer.state_dict()})


# --- save_atomic --------------------------------------------------------------------------------------


def test_save_then_load_roundtrip(tmp_path: Path) -> None:
    checkpoint = small_checkpoint()
    path = tmp_path / "epoch=0.ckpt"

    save_atomic(checkpoint, path)

    loaded = load_checkpoint(path)
    assert_same_checkpoint(loaded, checkpoint)
    assert loaded[MARKER_KEY] == {"format_version": FORMAT_VERSION, "hookrt_version": hookrt.__version__}
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["epoch=0.ckpt"]


def test_save_adds_missing_marker(tmp_path: Path) -> None:
    checkpoint = {"epoch": 1}
    save_atomic(checkpoint, str(tmp_path / "a.ckpt"))

    assert checkpoint == {"epoch": 1}
    assert load_checkpoint(tmp_path / "a.ckpt")[MARKER_KEY]["format_version"] == FORMAT_VERSION


def test_save_rejects_invalid_marker(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"'hookrt' key contains 'yes', not a marker dict"):
        save_atomic({MARKER_KEY: "yes"}, tmp_path / "a.ckpt")
    assert not list(tmp_path.iterdir())


def test_save_creates_parent_folders(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "version_0" / "last.ckpt"
    save_atomic(small_checkpoint(), path)
    assert load_checkpoint(path)["epoch"] == 3


def test_save_rejects_unloadable_value(tmp_path: Path) -> None:
    checkpoint = small_checkpoint()
    checkpoint["plugins"]["EarlyStopping"]["args"] = argparse.Namespace(patience=3)
    path = tmp_path / "a.ckpt"

    with pytest.raises(CheckpointError, match=r"\['EarlyStopping'\]\['args'\] \(state of plugin 'EarlyStopping'\)"):
        save_atomic(checkpoint, path, owners={"plugins/EarlyStopping": "EarlyStopping"})
    assert not list(tmp_path.iterdir())


def fail_write(obj: object, file: Any, *args: object, **kwargs: object) -> None:
    file.write(b"PK\x03\x04 partial data")
    raise OSError(errno.ENOSPC, "No space left on device")


def fail_fsync(fd: int) -> None:
    raise OSError(errno.EIO, "Input/output error")


def fail_replace(src: object, dst: object) -> None:
    raise OSError(errno.EACCES, "Permission denied")


@pytest.mark.parametrize(
    ("target", "name", "replacement", "cause"),
    [
        (torch, "save", fail_write, "No space left on device.*The disk is full"),
        (os, "fsync", fail_fsync, "Input/output error"),
        (os, "replace", fail_replace, "Permission denied.*Check that the folder is writable"),
    ],
    ids=["write", "fsync", "replace"],
)
def test_failed_save_keeps_previous_file(
    target: object, name: str, replacement: object, cause: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.ckpt"
    previous = small_checkpoint(1.0)
    save_atomic(previous, path)
    monkeypatch.setattr(target, name, replacement)

    with pytest.raises(CheckpointError, match=rf"Could not save the checkpoint '.*last\.ckpt': .*{cause}") as caught:
        save_atomic(small_checkpoint(2.0), path)
    monkeypatch.undo()

    assert isinstance(caught.value.__cause__, OSError)
    assert "previous file at that path, if any, is unchanged" in str(caught.value)
    assert_same_checkpoint(load_checkpoint(path), previous)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["last.ckpt"]


def test_interrupted_save_removes_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(obj: object, file: Any, *args: object, **kwargs: object) -> None:
        file.write(b"PK\x03\x04")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_atomic(small_checkpoint(), tmp_path / "a.ckpt")
    assert not list(tmp_path.iterdir())


def test_save_removes_stale_temp_files(tmp_path: Path) -> None:
    save_atomic(small_checkpoint(), tmp_path / "elsewhere" / "full.ckpt")
    full = (tmp_path / "elsewhere" / "full.ckpt").read_bytes()
    data = full[: len(full) // 2]
    stale = [tmp_path / ".last.ckpt.tmp-99999-deadbeef", tmp_path / f".last.ckpt.tmp-{os.getpid()}-0a1b"]
    unrelated = [tmp_path / ".other.ckpt.tmp-99999-deadbeef", tmp_path / "last.ckpt.tmp-1-ab", tmp_path / "notes.txt"]
    for file in stale + unrelated:
        file.write_bytes(data)

    save_atomic(small_checkpoint(), tmp_path / "last.ckpt")

    remaining = sorted(entry.name for entry in tmp_path.iterdir())
    assert remaining == sorted(["elsewhere", "last.ckpt", *(file.name for file in unrelated)])


# --- load_checkpoint ----------------------------------------------------------------------------------


def test_load_missing_file_lists_checkpoints(tmp_path: Path) -> None:
    save_atomic(small_checkpoint(), tmp_path / "epoch=1.ckpt")
    save_atomic(small_checkpoint(), tmp_path / "last.ckpt")

    with pytest.raises(CheckpointLoadError, match=r"No checkpoint at '.*epoch=7\.ckpt': it does not exist") as caught:
        load_checkpoint(tmp_path / "epoch=7.ckpt")

    assert caught.value.reason == "missing"
    assert "Check the path" in str(caught.value)
    assert "contains: epoch=1.ckpt, last.ckpt." in str(caught.value)


def test_load_missing_file_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointLoadError, match=r"it does not exist, and '.*' contains no \*\.ckpt files") as caught:
        load_checkpoint(tmp_path / "last.ckpt")
    assert caught.value.reason == "missing"


def test_load_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointLoadError, match=r"the folder '.*nowhere' does not exist"):
        load_checkpoint(tmp_path / "nowhere" / "last.ckpt")


def test_load_folder_instead_of_file(tmp_path: Path) -> None:
    save_atomic(small_checkpoint(), tmp_path / "last.ckpt")
    with pytest.raises(
        CheckpointLoadError, match=r"it is a folder, not a file. Check the path; .* contains: last\.ckpt"
    ):
        load_checkpoint(tmp_path)


PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


@pytest.mark.parametrize(
    ("content", "start"),
    [
        (b"epoch,loss\n0,0.5\n", "b'epoch,lo'"),
        (PNG_HEADER + bytes(64), r"b'\\x89PNG"),
        (pickle.dumps({"epoch": 1}), r"b'\\x80"),
    ],
    ids=["text", "png", "plain_pickle"],
)
def test_load_file_not_from_torch_save(content: bytes, start: str, tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)

    with pytest.raises(
        CheckpointLoadError, match=rf"was not written by torch\.save \(it starts with {start}"
    ) as caught:
        load_checkpoint(path)
    assert caught.value.reason == "not_hookrt"
    assert "not a hookrt checkpoint" in str(caught.value)


def test_load_zip_not_from_torch_save(tmp_path: Path) -> None:
    path = tmp_path / "bundle.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")

    with pytest.raises(CheckpointLoadError, match="is a zip archive but was not written by torch.save") as caught:
        load_checkpoint(path)
    assert caught.value.reason == "not_hookrt"


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_load_plain_state_dict(zip_format: bool, tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path, _use_new_zipfile_serialization=zip_format)

    with pytest.raises(CheckpointLoadError, match=r"no 'hookrt' marker.*plain state_dict") as caught:
        load_checkpoint(path)
    assert caught.value.reason == "not_hookrt"
    assert r"module.load_state_dict(torch.load(path))" in str(caught.value)


def test_load_foreign_checkpoint_with_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "other.ckpt"
    torch.save({"epoch": 2, "state_dict": {"w": torch.ones(1)}}, path)

    with pytest.raises(CheckpointLoadError, match=r"torch\.load\(path\)\['state_dict'\]"):
        load_checkpoint(path)


def test_load_invalid_marker(tmp_path: Path) -> None:
    path = tmp_path / "odd.ckpt"
    torch.save({MARKER_KEY: {"format_version": "1"}}, path)

    with pytest.raises(CheckpointLoadError, match="has an invalid 'hookrt' marker") as caught:
        load_checkpoint(path)
    assert caught.value.reason == "not_hookrt"


@pytest.mark.parametrize("fraction", [0.0, 0.0002, 0.1, 0.5, 0.99])
def test_load_truncated_checkpoint(fraction: float, tmp_path: Path) -> None:
    full = tmp_path / "full.ckpt"
    save_atomic(small_checkpoint(), full)
    data = full.read_bytes()
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[: int(len(data) * fraction)])

    with pytest.raises(CheckpointLoadError, match=r"truncated or corrupt .*interrupted.*Use an earlier") as caught:
        load_checkpoint(path)
    assert caught.value.reason == "truncated"


def test_load_truncated_legacy_file(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(50)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:200])

    with pytest.raises(CheckpointLoadError, match="truncated or corrupt") as caught:
        load_checkpoint(path)
    assert caught.value.reason == "truncated"


def replace_pickle(source: Path, target: Path, data_pkl: bytes) -> None:
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as rewritten:
        for info in original.infolist():
            content = data_pkl if info.filename.endswith("/data.pkl") else original.read(info.filename)
            rewritten.writestr(info.filename, content)


def test_load_garbage_pickle_is_corrupt(tmp_path: Path) -> None:
    save_atomic(small_checkpoint(), tmp_path / "good.ckpt")
    replace_pickle(tmp_path / "good.ckpt", tmp_path / "bad.ckpt", b"\xff\xfe\xfd")

    with pytest.raises(CheckpointLoadError, match="invalid opcode 255") as caught:
        load_checkpoint(tmp_path / "bad.ckpt")
    assert caught.value.reason == "truncated"


def test_load_newer_format(tmp_path: Path) -> None:
    path = tmp_path / "future.ckpt"
    checkpoint = small_checkpoint()
    checkpoint[MARKER_KEY] = {"format_version": FORMAT_VERSION + 1, "hookrt_version": "9.0.0"}
    save_atomic(checkpoint, path)

    with pytest.raises(
        CheckpointLoadError,
        match=rf"format version {FORMAT_VERSION + 1} \(written by hookrt 9\.0\.0\), but this hookrt reads "
        rf"format versions up to {FORMAT_VERSION}\. Upgrade hookrt",
    ) as caught:
        load_checkpoint(path)
    assert caught.value.reason == "newer_format"


def test_load_map_location(tmp_path: Path) -> None:
    save_atomic(small_checkpoint(), tmp_path / "a.ckpt")
    loaded = load_checkpoint(tmp_path / "a.ckpt", map_location="meta")
    assert loaded["state_dict"]["weight"].device.type == "meta"


class TouchOnLoad:
    """Pickles as a call of Path.touch, so unpickling it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


class MkdirOnLoad:
    """Pickles as a call of os.mkdir, so unpickling it creates the folder `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (os.mkdir, (str(self.marker),))


def payload_checkpoint(kind: str, placement: str, marker: Path) -> dict[str, Any]:
    payload = TouchOnLoad(marker) if kind == "touch" else MkdirOnLoad(marker)
    checkpoint = small_checkpoint()
    if placement == "top":
        checkpoint["extra"] = payload
    else:
        checkpoint["plugins"]["EarlyStopping"]["patience_fn"] = payload
    return checkpoint


@pytest.mark.parametrize("placement", ["top", "plugin"])
@pytest.mark.parametrize(("kind", "refused"), [("touch", "getattr"), ("mkdir", os.mkdir.__module__ + ".mkdir")])
def test_load_rejects_code_payload(kind: str, refused: str, placement: str, tmp_path: Path) -> None:
    # An unsafe load of the same payload really creates its marker, so the payload is live.
    probe = tmp_path / "probe.ckpt"
    torch.save(payload_checkpoint(kind, placement, tmp_path / "probe_marker"), probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe_marker").exists()

    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    torch.save(payload_checkpoint(kind, placement, marker), path)

    with pytest.raises(CheckpointLoadError, match=rf"rejected '.*evil\.ckpt': it refers to {refused}") as caught:
        load_checkpoint(path)

    assert caught.value.reason == "unsafe"
    assert "loading it would execute code. hookrt never loads such files" in str(caught.value)
    assert not marker.exists()


def test_load_rejects_inst_opcode(tmp_path: Path) -> None:
    # Protocol 0's INST opcode calls module.name(*args). Here it would create the folder `marker`.
    marker = tmp_path / "marker"
    argument = str(marker).encode()
    payload = b"(X" + struct.pack("<I", len(argument)) + argument + b"i" + os.mkdir.__module__.encode() + b"\nmkdir\n."
    save_atomic(small_checkpoint(), tmp_path / "good.ckpt")
    replace_pickle(tmp_path / "good.ckpt", tmp_path / "evil.ckpt", payload)

    with pytest.raises(CheckpointLoadError, match="loading it would execute code") as caught:
        load_checkpoint(tmp_path / "evil.ckpt")

    assert caught.value.reason == "unsafe"
    assert not marker.exists()


# --- RNG state ----------------------------------------------------------------------------------------


def draw_all() -> tuple[torch.Tensor, list[float], list[float]]:
    return (
        torch.rand(4),
        [*np.random.rand(3).tolist(), float(np.random.standard_normal())],
        [random.random(), random.gauss(0.0, 1.0), random.randrange(1000)],
    )


def assert_same_draws(first: tuple[torch.Tensor, list[float], list[float]], second: tuple[Any, ...]) -> None:
    assert torch.equal(first[0], second[0])
    assert first[1] == second[1]
    assert first[2] == second[2]


def test_rng_restore_repeats_draws() -> None:
    # One normal draw each leaves a cached Gaussian in numpy and in random, so those parts are exercised too.
    np.random.standard_normal()
    random.gauss(0.0, 1.0)
    state = capture_rng_state()
    first = draw_all()

    restore_rng_state(state)

    assert_same_draws(first, draw_all())


def test_rng_state_survives_weights_only_load(tmp_path: Path) -> None:
    state = capture_rng_state()
    first = draw_all()

    check_loadable(state)
    loaded = roundtrip_weights_only(state, tmp_path)
    assert isinstance(loaded, dict)
    restore_rng_state(loaded)

    assert_same_draws(first, draw_all())


def test_rng_state_contains_no_numpy_objects() -> None:
    state = capture_rng_state()
    assert state["numpy"]["algorithm"] == "MT19937"
    assert state["numpy"]["key"].dtype == torch.int64
    assert state["numpy"]["key"].shape == (624,)
    assert state["python"]["state"].shape == (625,)
    assert type(state["numpy"]["pos"]) is int
    if not torch.cuda.is_available():
        assert state["cuda"] == []


class FakeCuda:
    def __init__(self, devices: int) -> None:
        self.devices = devices
        self.restored: list[tuple[int, torch.Tensor]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.devices)
        monkeypatch.setattr(
            torch.cuda,
            "get_rng_state_all",
            lambda: [torch.full((8,), i, dtype=torch.uint8) for i in range(self.devices)],
        )
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: self.restored.append((device, state)))


def test_rng_cuda_states_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeCuda(devices=2)
    fake.install(monkeypatch)

    state = capture_rng_state()
    restore_rng_state(state)

    assert len(state["cuda"]) == 2
    assert [device for device, _ in fake.restored] == [0, 1]
    assert torch.equal(fake.restored[1][1], torch.full((8,), 1, dtype=torch.uint8))


def test_rng_cuda_device_count_mismatch(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    FakeCuda(devices=2).install(monkeypatch)
    state = capture_rng_state()
    fewer = FakeCuda(devices=1)
    fewer.install(monkeypatch)

    with caplog.at_level(logging.WARNING, logger="hookrt._checkpoint_io"):
        restore_rng_state(state)

    assert [device for device, _ in fewer.restored] == [0]
    assert "CUDA RNG states for 2 devices but this process sees 1 CUDA devices; restoring 1" in caplog.text


def test_rng_invalid_state_changes_nothing() -> None:
    state = capture_rng_state()
    del state["python"]
    before = random.getstate()

    with pytest.raises(CheckpointError, match=r"RNG state in the checkpoint is invalid \(KeyError: 'python'\)"):
        restore_rng_state(state)
    assert random.getstate() == before


# --- load_module_state --------------------------------------------------------------------------------


class TwoLayer(torch.nn.Module):
    def __init__(self, hidden: int = 3) -> None:
        super().__init__()
        self.first = torch.nn.Linear(2, hidden)
        self.second = torch.nn.Linear(hidden, 1)


def make_model(hidden: int = 3) -> TwoLayer:
    return TwoLayer(hidden)


def test_load_module_state_strict() -> None:
    source, target = make_model(), make_model()
    load_module_state(target, source.state_dict())
    assert torch.equal(target.first.weight, source.first.weight)


def test_load_module_state_missing_and_unexpected() -> None:
    state = make_model().state_dict()
    del state["second.bias"]
    state["head.weight"] = torch.zeros(1)
    target = make_model()
    before = target.first.weight.clone()

    with pytest.raises(CheckpointError) as caught:
        load_module_state(target, state)

    message = str(caught.value)
    assert "1 missing keys: second.bias" in message
    assert "1 unexpected keys: head.weight" in message
    assert "probably written for a different model" in message
    assert "pass strict=False" in message
    assert torch.equal(target.first.weight, before)


def test_load_module_state_caps_listed_keys() -> None:
    state = {f"layer{index}.weight": torch.zeros(1) for index in range(14)}
    with pytest.raises(CheckpointError, match=r"14 unexpected keys: layer0\.weight, .*layer9\.weight and 4 more"):
        load_module_state(make_model(), state)


def test_load_module_state_shape_mismatch() -> None:
    target = make_model(hidden=3)
    before = target.second.bias.clone()

    with pytest.raises(CheckpointError, match=r"first\.weight \(checkpoint \(4, 2\), module \(3, 2\)\)") as caught:
        load_module_state(target, make_model(hidden=4).state_dict(), strict=False)

    assert "Shapes must match even with strict=False" in str(caught.value)
    assert torch.equal(target.second.bias, before)


def test_load_module_state_non_strict_skips_keys(caplog: pytest.LogCaptureFixture) -> None:
    source = make_model()
    state = source.state_dict()
    del state["second.bias"]
    state["extra"] = torch.zeros(1)
    target = make_model()

    with caplog.at_level(logging.INFO, logger="hookrt._checkpoint_io"):
        load_module_state(target, state, strict=False)

    assert torch.equal(target.second.weight, source.second.weight)
    assert "skipped 1 missing and 1 unexpected keys" in caplog.text


def test_load_module_state_whole_checkpoint() -> None:
    with pytest.raises(CheckpointError, match=r"got a whole checkpoint .* pass checkpoint\['state_dict'\]"):
        load_module_state(make_model(), small_checkpoint())


# --- hparams_to_plain ---------------------------------------------------------------------------------


def test_hparams_to_plain_converts_values() -> None:
    hparams = {
        "root": Path("data") / "mnist",
        "lr": np.float32(0.5),
        "layers": np.int64(3),
        "use_bn": np.bool_(True),
        "mean": np.array([0.5, 0.25]),
        "optim": argparse.Namespace(betas=(0.9, 0.99), name="adam", dirs=[Path("a")]),
        "tags": {"x", "y"},
        "scale": torch.tensor(2.0),
        "seed": None,
    }

    plain = hparams_to_plain(hparams)

    assert plain["root"] == str(Path("data") / "mnist")
    assert type(plain["lr"]) is float
    assert plain["lr"] == 0.5
    assert type(plain["layers"]) is int
    assert plain["use_bn"] is True
    assert torch.equal(plain["mean"], torch.tensor([0.5, 0.25], dtype=torch.float64))
    assert plain["optim"] == {"betas": (0.9, 0.99), "name": "adam", "dirs": ["a"]}
    assert plain["tags"] == {"x", "y"}
    check_loadable(plain)


def test_hparams_to_plain_from_namespace_and_mapping() -> None:
    assert hparams_to_plain(argparse.Namespace(epochs=5)) == {"epochs": 5}
    assert hparams_to_plain(types.MappingProxyType({"epochs": 5})) == {"epochs": 5}


def test_hparams_to_plain_array_copy() -> None:
    array = np.zeros(2)
    plain = hparams_to_plain({"a": array})
    array[0] = 1.0
    assert plain["a"][0].item() == 0.0


def test_hparams_to_plain_rejects_objects() -> None:
    with pytest.raises(CheckpointError, match=r"Hyperparameter hparams\['model'\]\['act'\] is .*Opaque"):
        hparams_to_plain({"model": {"act": Opaque()}})
    with pytest.raises(CheckpointError, match=r"hparams\['steps'\]\[1\] is function 'patience'"):
        hparams_to_plain({"steps": [1, patience]})
    with pytest.raises(CheckpointError, match=r"hparams\['mode'\] is .*Color.*store its \.value"):
        hparams_to_plain({"mode": Color.RED})


def test_hparams_to_plain_rejects_bad_input() -> None:
    with pytest.raises(CheckpointError, match="Hyperparameters must be a dict, a Mapping or an argparse.Namespace"):
        hparams_to_plain([("lr", 0.1)])
    with pytest.raises(CheckpointError, match=r"Hyperparameter key .* is pathlib\S*Path; use str keys"):
        hparams_to_plain({Path("a"): 1})
