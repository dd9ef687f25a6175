"""Notice a guest kernel panic from the guest's serial console.

Linux prints "Kernel panic - not syncing: <why>" on its console in every panic, whether
or not the guest has a pvpanic driver (a kernel that cannot mount its root file system
panics before it could load one). The agent scans each running VM's new console output
for that line; runtimes add what the hypervisor itself reports (QEMU's and Cloud
Hypervisor's pvpanic device, Firecracker's exit on the reboot that `panic=1` asks for).

Only output since the guest's last boot counts: the console log is appended to across
boots, so the offset of each boot is kept in the VM's directory and a restarted agent
scans from there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.vm_dir import VmDir

PANIC_REASON = "guest kernel panic"
_PANIC_LINE = re.compile(rb"Kernel panic - not syncing:? ?([^\r\n]*)")
# A panic line split across two scans is still found: each scan re-reads this much.
_OVERLAP = 256
# The most one scan reads; a guest that floods its console is scanned at its end.
_MAX_SCAN = 1024 * 1024


@dataclass
class _Scan:
    boot: int  # where the guest's last boot began in the console log
    scanned: int  # how far the log has been read since
    reason: str | None = None  # the panic found, if one was


class PanicScanner:
    """Per VM, the console output since the guest's last boot, scanned incrementally."""

    def __init__(self) -> None:
        self._scans: dict[str, _Scan] = {}

    def booting(self, vm: VmDir) -> None:
        """The guest starts (again) now: only output from here on counts."""
        offset = _console_size(vm)
        vm.save_console_boot_offset(offset)
        self._scans[vm.vm_id] = _Scan(offset, offset)

    def booted(self, vm: VmDir) -> bool:
        """Whether the guest was started since its VM was created (by any agent run)."""
        return vm.vm_id in self._scans or vm.console_boot_file.exists()

    def forget(self, vm_id: str) -> None:
        self._scans.pop(vm_id, None)

    def scan(self, vm: VmDir) -> str | None:
        """The failure reason when the guest has panicked since its last boot, else None.
        Cheap when nothing was written since the last call (one stat)."""
        state = self._scans.get(vm.vm_id)
        if state is None:
            # A guest booted before boots were recorded: only output from now on counts.
            boot = vm.load_console_boot_offset() if vm.console_boot_file.exists() \
                else _console_size(vm)
            state = self._scans[vm.vm_id] = _Scan(boot, boot)
        if state.reason is not None:
            return state.reason
        size = _console_size(vm)
        if size < state.scanned:  # the log was replaced
            state.boot = state.scanned = 0
        if size == state.scanned:
            return None
        start = max(state.boot, state.scanned - _OVERLAP, size - _MAX_SCAN)
        try:
            with open(vm.console_log, "rb") as f:
                f.seek(start)
                data = f.read(size - start)
        except OSError:
            return None
        state.scanned = size
        found = _PANIC_LINE.search(data)
        if found is not None:
            detail = found[1].decode("utf-8", "replace").strip()
            state.reason = f"{PANIC_REASON}: {detail}" if detail else PANIC_REASON
        return state.reason


def _console_size(vm: VmDir) -> int:
    try:
        return vm.console_log.stat().st_size
    except OSError:
        return 0
