"""Reading what a hypervisor appended to one of its files since the last look."""

from __future__ import annotations

from pathlib import Path


def read_appended(path: Path, offset: int, separator: bytes) -> tuple[bytes, int] | None:
    """The whole records (each ending in separator) appended to path since offset, and the
    offset to read from next time; a record still being written is left for then. A file
    shorter than offset was started afresh by a new process and is read from its start.
    None when nothing was appended or the file cannot be read."""
    try:
        size = path.stat().st_size
        if size < offset:
            offset = 0
        if size == offset:
            return None
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size - offset)
    except OSError:
        return None
    end = data.rfind(separator)
    complete = data[:end + len(separator)] if end >= 0 else b""
    return complete, offset + len(complete)
