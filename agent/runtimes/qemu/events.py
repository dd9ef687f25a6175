"""QEMU's QMP events, written by QEMU itself to a file in the VM's directory.

A second QMP monitor sits on a `pipe` chardev whose two ends are regular files:
QEMU reads `qmp-events.in` (the capabilities negotiation, written before start, so
that the monitor sends events at all) and appends its greeting, the answer and every
event to `qmp-events.out`. No connection is held, so nothing competes with the
runtime's own QMP sessions, and the agent notices an event with one stat per pass.
"""

from __future__ import annotations

import json
from pathlib import Path

from agent.appended import read_appended
from agent.vm_dir import VmDir

_NEGOTIATION = json.dumps({"execute": "qmp_capabilities"}) + "\n"
GUEST_PANICKED = "GUEST_PANICKED"


def base_path(vm: VmDir) -> Path:
    """The chardev's path: QEMU adds .in and .out."""
    return vm.path / "qmp-events"


def files(vm: VmDir) -> list[Path]:
    """The files QEMU opens: it reads .in and writes .out."""
    return [base_path(vm).with_suffix(".in"), base_path(vm).with_suffix(".out")]


def prepare(vm: VmDir) -> None:
    """Fresh files for a new process: the negotiation in, nothing out."""
    base = base_path(vm)
    base.with_suffix(".in").write_text(_NEGOTIATION)
    base.with_suffix(".out").write_bytes(b"")


class EventLog:
    """Reads each VM's event file incrementally."""

    def __init__(self) -> None:
        self._read: dict[Path, tuple[int, bool]] = {}

    def guest_panicked(self, vm: VmDir) -> bool:
        """Whether QEMU reported GUEST_PANICKED since the process started."""
        out = base_path(vm).with_suffix(".out")
        offset, panicked = self._read.get(out, (0, False))
        if panicked:
            return True
        # Only whole lines: the rest is read again next time.
        appended = read_appended(out, offset, b"\n")
        if appended is None:
            return False
        complete, offset = appended
        panicked = any(_event_name(line) == GUEST_PANICKED for line in complete.splitlines())
        self._read[out] = (offset, panicked)
        return panicked

    def forget(self, vm: VmDir) -> None:
        self._read.pop(base_path(vm).with_suffix(".out"), None)


def _event_name(line: bytes) -> str:
    try:
        message = json.loads(line)
    except ValueError:
        return ""
    return str(message.get("event", "")) if isinstance(message, dict) else ""
