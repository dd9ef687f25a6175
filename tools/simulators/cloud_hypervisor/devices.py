"""The VM's devices: the serial port the guest writes to, and the virtio devices' records."""

from __future__ import annotations

import os
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
