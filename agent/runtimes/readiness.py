"""Guest readiness: wait for a marker line on the VM's serial console.

A VM config may name a readiness marker in `boot.boot_options["ready_marker"]`:
text the guest prints on its serial console once it is up (for example the
last line of its init). Runtimes that support it wait, after starting the
guest, until that text appears in the console log written since the start,
and fail with the console's last lines when it does not appear in time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

from agent.runtimes.base import GuestNotReady, console_tail
from agent.vm_dir import VmDir

READY_MARKER_OPTION = "ready_marker"

# A small guest prints its marker milliseconds after its start, a full Linux seconds after:
# the first look comes at once, the next ones ever later, then every 20 ms.
_FIRST_POLL_SECONDS = 0.001
_POLL_SECONDS = 0.02


def ready_marker(boot_options: Mapping[str, str]) -> str:
    """The configured marker, or "" when the config names none."""
    return boot_options.get(READY_MARKER_OPTION, "")


def console_offset(vm: VmDir) -> int:
    """The console log's current size: pass it as since_offset before starting a guest."""
    try:
        return vm.console_log.stat().st_size
    except FileNotFoundError:
        return 0


async def wait_for_console_marker(vm: VmDir, marker: str, timeout: float,
                                  since_offset: int = 0,
                                  alive: Callable[[], bool] | None = None) -> None:
    """Return once marker appears in the console log after since_offset.

    Raises GuestNotReady (DEADLINE_EXCEEDED) with the console tail when timeout
    seconds pass first, and at once (GuestNotReady, FAILED_PRECONDITION) when `alive` says the
    hypervisor process has gone.
    """
    needle = marker.encode()
    deadline = time.monotonic() + timeout
    offset = since_offset
    # The end of the previous read, so a marker split across two reads is found.
    carry = b""
    delay = _FIRST_POLL_SECONDS
    while True:
        chunk = _read_from(vm, offset)
        offset += len(chunk)
        if needle in carry + chunk:
            return
        carry = (carry + chunk)[-max(len(needle) - 1, 0):] if needle else b""
        if alive is not None and not alive():
            # The process may have written the marker just before it exited.
            if needle in carry + _read_from(vm, offset):
                return
            raise GuestNotReady(
                f"VM {vm.vm_id} stopped before its guest printed {marker!r}"
                f"{_tail_suffix(vm)}")
        if time.monotonic() >= deadline:
            raise GuestNotReady(
                f"VM {vm.vm_id}: the guest did not print {marker!r} within {timeout:g}s"
                f"{_tail_suffix(vm)}", "DEADLINE_EXCEEDED")
        await asyncio.sleep(delay)
        delay = min(delay * 2, _POLL_SECONDS)


def _read_from(vm: VmDir, offset: int) -> bytes:
    try:
        with open(vm.console_log, "rb") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        return b""


def _tail_suffix(vm: VmDir) -> str:
    tail = console_tail(vm, lines=15)
    return f"; console tail:\n{tail}" if tail else "; the console is empty"
