"""The VM's devices: the serial port the guest writes to, and the virtio devices' records."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

from tools.simulators.cloud_hypervisor.errors import VmFailure, os_error_text


class SerialPort:
    """Where the guest's serial output goes (a ConsoleTransport of Cloud Hypervisor)."""

    def __init__(self, mode: str, path: str | None) -> None:
        self._fd: int | None = None
        self._owned = False
        if mode == "File" and path is not None:
            # File::create: a new VM (and each reboot) starts with an empty file.
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            self._owned = True
        elif mode == "Tty":
            self._fd = sys.stdout.fileno()

    def write_line(self, line: str) -> None:
        if self._fd is not None:
            try:
                os.write(self._fd, (line + "\n").encode())
            except OSError:
                pass

    def close(self) -> None:
        if self._owned and self._fd is not None:
            os.close(self._fd)
        self._fd = None


def open_serial(config: dict[str, Any]) -> SerialPort:
    serial = config["serial"]
    try:
        return SerialPort(serial["mode"], serial.get("file"))
    except OSError as e:
        raise VmFailure("Error creating console devices", "Error creating console device",
                        os_error_text(e)) from e


QCOW_MAGIC = b"QFI\xfb"
VHDX_SIGNATURE = b"vhdxfile"
VHD_FOOTER = 512
# struct flock on x86_64: l_type, l_whence, l_start, l_len, l_pid (padded to 32 bytes).
FLOCK = "hhqqi4x"


def detect_image_type(fd: int) -> str:
    """block::detect_image_type: QCOW2 by its magic, a fixed VHD by its footer, VHDX by
    its signature, anything else raw."""
    head = os.pread(fd, 8, 0)
    if head[:4] == QCOW_MAGIC:
        return "Qcow2"
    size = os.fstat(fd).st_size
    if size >= VHD_FOOTER:
        footer = os.pread(fd, VHD_FOOTER, size - VHD_FOOTER)
        cookie, version, data_offset = struct.unpack_from(">8s4xIQ", footer, 0)
        (disk_type,) = struct.unpack_from(">I", footer, 60)
        if (cookie == b"conectix" and version == 0x00010000
                and data_offset == 0xFFFF_FFFF_FFFF_FFFF and disk_type == 2):
            return "FixedVhd"
    if head == VHDX_SIGNATURE:
        return "Vhdx"
    return "Raw"


# ImageType's Display, as the mismatch error prints it.
IMAGE_TYPE_NAMES = {"FixedVhd": "vhd", "Qcow2": "qcow2", "Raw": "raw", "Vhdx": "vhdx",
                    "Unknown": "unknown"}


class DiskImage:
    """An opened disk image and the advisory OFD lock Cloud Hypervisor takes on it at boot:
    a write lock for a writable disk, a read lock for a read-only one."""

    def __init__(self, path: str, fd: int, readonly: bool, image_type: str) -> None:
        self.path = path
        self.fd: int | None = fd
        self.readonly = readonly
        self.image_type = image_type

    @classmethod
    def open(cls, path: str, readonly: bool, specified: str) -> DiskImage:
        try:
            fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        except OSError as e:
            raise VmFailure("Cannot open disk path", f"I/O error (path={path} op=open)",
                            os_error_text(e)) from e
        detected = detect_image_type(fd)
        if specified not in ("Unknown", detected):
            os.close(fd)
            raise VmFailure(
                "Disk image type does not match expected type: specified = "
                f"{IMAGE_TYPE_NAMES[specified]}, detected = {IMAGE_TYPE_NAMES[detected]}")
        return cls(path, fd, readonly, detected)

    def lock(self) -> None:
        assert self.fd is not None
        kind = "Read" if self.readonly else "Write"
        request = struct.pack(FLOCK, fcntl.F_RDLCK if self.readonly else fcntl.F_WRLCK,
                              os.SEEK_SET, 0, 0, 0)
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, request)
        except OSError as e:
            cause = ("The file is already locked" if e.errno in (errno.EAGAIN, errno.EACCES)
                     else "The lock state could not be checked or set")
            raise VmFailure(f"Failed to get {kind} lock for disk image: {self.path}",
                            cause) from e

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class Device:
    id: str
    kind: str  # VirtioDeviceType's Display text: "block", "net", "rng", "console"
    slot: int
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def bdf(self) -> str:
        return f"0000:00:{self.slot:02x}.0"


def counters_for(kind: str) -> dict[str, int]:
    """The counters vm.counters reports for a device of this kind, all zero at first."""
    if kind == "block":
        return dict.fromkeys(
            ("read_bytes", "write_bytes", "read_ops", "write_ops", "read_latency_min",
             "read_latency_max", "read_latency_avg", "write_latency_min",
             "write_latency_max", "write_latency_avg"), 0)
    if kind == "net":
        return dict.fromkeys(("rx_bytes", "rx_frames", "tx_bytes", "tx_frames"), 0)
    return {}
