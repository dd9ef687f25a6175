"""Snapshot files of the Firecracker simulator.

The state file starts with Firecracker's real header (the x86_64 magic number and
the snapshot data format version, 8.0.0 for v1.14.2, bincode-encoded), so that
`--describe-snapshot` and header errors behave as with the real binary. The
rest is the simulator's own JSON state (the VM configuration and the guest's
properties), which only the simulator can load. The memory file is sparse and
as large as the guest memory, like Firecracker's.
"""

from __future__ import annotations

import json
import struct
from typing import Any

MAGIC = 0x0710_1984_8664_0000
FORMAT_VERSION = "8.0.0"
PAYLOAD_TAG = b"firecracker-sim microvm state\n"
# bincode's allocation limit while decoding a state file (10 MiB).
DECODE_LIMIT = 10 * 1024 * 1024
MIB = 1024 * 1024


class SnapshotFormatError(Exception):
    """crate::snapshot::SnapshotError, with its Display text."""


def _header() -> bytes:
    version = FORMAT_VERSION.encode()
    return struct.pack("<QQ", MAGIC, len(version)) + version


def write_state(path: str, state: dict[str, Any]) -> None:
    """Create or truncate the state file; OSError when it cannot be opened."""
    with open(path, "wb") as f:
        f.write(_header() + PAYLOAD_TAG + json.dumps(state).encode())


def write_memory(path: str, mem_size_mib: int) -> None:
    with open(path, "wb") as f:
        f.truncate(mem_size_mib * MIB)


def _unexpected_end(need: int, have: int) -> SnapshotFormatError:
    return SnapshotFormatError(
        f"An error occured during bincode decoding: UnexpectedEnd {{ additional: {need - have} }}")


def format_version(data: bytes) -> tuple[str, bytes]:
    """The header's version and what follows it; SnapshotFormatError on a bad header."""
    if len(data) < 16:
        raise _unexpected_end(8 if len(data) < 8 else 16, len(data))
    magic, length = struct.unpack_from("<QQ", data)
    if length > DECODE_LIMIT:
        raise SnapshotFormatError("An error occured during bincode decoding: LimitExceeded")
    if len(data) < 16 + length:
        raise _unexpected_end(16 + length, len(data))
    version = data[16:16 + length].decode("utf-8", "replace")
    if magic != MAGIC:
        raise SnapshotFormatError(f"Magic value does not match arch: {magic}")
    major, _, rest = version.partition(".")
    minor = rest.partition(".")[0]
    if major != FORMAT_VERSION.split(".")[0] or not minor.isdigit() or int(minor) > 0:
        raise SnapshotFormatError(f"Invalid data version: {version}")
    return version, data[16 + length:]


def read_state(path: str) -> dict[str, Any]:
    """OSError when the file cannot be opened, SnapshotFormatError when it is not ours."""
    with open(path, "rb") as f:
        data = f.read()
    _, payload = format_version(data)
    if not payload.startswith(PAYLOAD_TAG):
        raise SnapshotFormatError("CRC64 validation failed")
    try:
        state = json.loads(payload[len(PAYLOAD_TAG):])
    except ValueError:
        raise SnapshotFormatError("CRC64 validation failed") from None
    if not isinstance(state, dict):
        raise SnapshotFormatError("CRC64 validation failed")
    return state


def describe(path: str) -> str:
    """--describe-snapshot: the data format version, e.g. v8.0.0."""
    with open(path, "rb") as f:
        version, _ = format_version(f.read(16 + 64))
    return f"v{version}"
