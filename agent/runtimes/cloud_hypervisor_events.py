"""Cloud Hypervisor's event monitor file, read for its pvpanic device's reports.

Started with `--event-monitor path=FILE`, Cloud Hypervisor writes each event as a
pretty-printed JSON object followed by a blank line; its pvpanic device turns a guest
kernel panic into {"source": "guest", "event": "panic"}. The VM keeps running (the
guest hangs), so this file is the only sign. Read incrementally: one stat per check.
"""

from __future__ import annotations

import json
from pathlib import Path

from agent.appended import read_appended
from agent.vm_dir import VmDir

_SEPARATOR = b"\n\n"


def event_file(vm: VmDir) -> Path:
    return vm.path / "events.json"


class EventMonitor:
    def __init__(self) -> None:
        self._read: dict[Path, tuple[int, bool]] = {}

    def guest_panicked(self, vm: VmDir) -> bool:
        path = event_file(vm)
        offset, panicked = self._read.get(path, (0, False))
        if panicked:
            return True
        appended = read_appended(path, offset, _SEPARATOR)
        if appended is None:
            return False
        complete, offset = appended
        panicked = any(_is_guest_panic(block) for block in complete.split(_SEPARATOR))
        self._read[path] = (offset, panicked)
        return panicked

    def booting(self, vm: VmDir) -> None:
        """The guest starts again in the same process: only later events count."""
        self.guest_panicked(vm)
        offset, _ = self._read.get(event_file(vm), (0, False))
        self._read[event_file(vm)] = (offset, False)

    def forget(self, vm: VmDir) -> None:
        self._read.pop(event_file(vm), None)


def _is_guest_panic(block: bytes) -> bool:
    try:
        event = json.loads(block)
    except ValueError:
        return False
    return isinstance(event, dict) and event.get("source") == "guest" \
        and event.get("event") == "panic"
