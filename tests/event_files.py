"""Reading TensorBoard event files back in tests, without the tensorboard package."""

from __future__ import annotations

import glob
import os
import struct

from tensorboardX.proto import event_pb2


def read_events(log_dir: str | os.PathLike[str]) -> list[event_pb2.Event]:
    """Parse every event file in ``log_dir``, in file-name order."""
    events = []
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        events.extend(read_events_of_file(path))
    return events


def read_events_of_file(path: str) -> list[event_pb2.Event]:
    """Parse one event file from the TFRecord framing, in write order.

    Each record is a little-endian uint64 length, a 4-byte CRC of the length,
    the serialized Event and a 4-byte CRC of the data. The CRCs are not checked.
    """
    events = []
    with open(path, "rb") as file:
        data = file.read()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        offset += 12
        events.append(event_pb2.Event.FromString(data[offset : offset + length]))
        offset += length + 4
    return events
