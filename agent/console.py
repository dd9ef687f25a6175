"""Read a VM's serial console or its hypervisor's log: the last N lines, or follow it as
it grows. The two are separate files, so neither ever carries the other's lines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from agent.runtimes.base import RuntimeFailure
from agent.vm_dir import StateDir
from vmm.v1 import vm_pb2

# The most a tail returns; older output is left out and `truncated` says so.
MAX_TAIL_BYTES = 1024 * 1024
FOLLOW_POLL_SECONDS = 0.1


class ConsoleRelay:
    def __init__(self, state: StateDir) -> None:
        self.state = state

    def _path(self, vm_id: str, source: vm_pb2.ConsoleSource.ValueType) -> Path:
        vm = self.state.vm(vm_id)
        if not vm.exists():
            raise RuntimeFailure(f"vm {vm_id} is not on this host", "NOT_FOUND")
        if source == vm_pb2.CONSOLE_SOURCE_HYPERVISOR:
            return vm.hypervisor_log
        return vm.console_log

    def tail(self, vm_id: str, lines: int,
             source: vm_pb2.ConsoleSource.ValueType = vm_pb2.CONSOLE_SOURCE_SERIAL
             ) -> tuple[str, bool]:
        path = self._path(vm_id, source)
        try:
            with open(path, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                f.seek(max(0, size - MAX_TAIL_BYTES))
                data = f.read()
        except FileNotFoundError:
            return "", False
        truncated = size > MAX_TAIL_BYTES
        text = data.decode("utf-8", "replace")
        if lines > 0:
            all_lines = text.splitlines(keepends=True)
            truncated = truncated or len(all_lines) > lines
            text = "".join(all_lines[-lines:])
        return text, truncated

    async def follow(self, vm_id: str, lines: int,
                     source: vm_pb2.ConsoleSource.ValueType = vm_pb2.CONSOLE_SOURCE_SERIAL
                     ) -> AsyncIterator[bytes]:
        """History (last `lines` lines), then new output as it arrives, until cancelled."""
        path = self._path(vm_id, source)
        text, _ = self.tail(vm_id, lines, source) if lines > 0 else ("", False)
        if text:
            yield text.encode()
        try:
            offset = path.stat().st_size
        except FileNotFoundError:
            offset = 0
        while True:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size < offset:  # the log was replaced
                offset = 0
            if size > offset:
                chunk = await asyncio.to_thread(_read_range, path, offset, size - offset)
                offset += len(chunk)
                yield chunk
            await asyncio.sleep(FOLLOW_POLL_SECONDS)


def _read_range(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)
