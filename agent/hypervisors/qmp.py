"""A small asyncio client of QEMU's machine protocol (QMP) over a Unix socket.

QMP is line-delimited JSON. The server greets with {"QMP": {...}}, accepts
commands only after `qmp_capabilities`, answers each {"execute", "arguments",
"id"} with {"return"} or {"error": {"class", "desc"}} carrying the same id, and
interleaves asynchronous {"event"} messages. A refusal raises QmpError (a
HypervisorApiError) with QEMU's error class and text verbatim; a socket that
does not answer raises RuntimeFailure (UNAVAILABLE).

QEMU serves one client per QMP socket at a time, so callers hold a connection
only for the few commands of one operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from agent.hypervisors.errors import HypervisorApiError, RuntimeFailure

# query-qmp-schema and friends answer in one line of several hundred KiB.
_LINE_LIMIT = 16 * 1024 * 1024

# QMP error class -> the gRPC status code name a caller gets.
_ERROR_CODES = {
    "CommandNotFound": "UNIMPLEMENTED",
    "DeviceNotFound": "NOT_FOUND",
    "DeviceNotActive": "FAILED_PRECONDITION",
    "KVMMissingCap": "FAILED_PRECONDITION",
}


class QmpError(HypervisorApiError):
    """QEMU refused a command: `error_class` and `desc` are QEMU's own."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QEMU refused {command}: {desc} ({error_class})",
                         _ERROR_CODES.get(error_class, "FAILED_PRECONDITION"))
        self.command = command
        self.error_class = error_class
        self.desc = desc


@dataclass(frozen=True)
class QmpEvent:
    name: str
    data: dict[str, Any] = field(default_factory=dict)
    # Seconds since the epoch, as QEMU stamped it.
    timestamp: float = 0.0


class QmpClient:
    """One QMP session: `async with QmpClient(path) as qmp: await qmp.execute("stop")`."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        # Seconds to wait for the connection, the greeting and each answer.
        self.timeout = timeout
        self.greeting: dict[str, Any] = {}
        self.events: asyncio.Queue[QmpEvent] = asyncio.Queue()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._read_task: asyncio.Task[None] | None = None
        self._closed_reason: str | None = None

    async def __aenter__(self) -> QmpClient:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    @property
    def version(self) -> str:
        """QEMU's version from the greeting, e.g. "7.2.22"."""
        v = self.greeting.get("version", {}).get("qemu", {})
        return f"{v.get('major', 0)}.{v.get('minor', 0)}.{v.get('micro', 0)}" if v else ""

    async def connect(self) -> None:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.path), limit=_LINE_LIMIT), self.timeout)
            # A busy QMP socket (another client connected) accepts but does not greet.
            greeting = await asyncio.wait_for(self._read_message(), self.timeout)
        except (OSError, TimeoutError, ValueError) as e:
            await self.close()
            raise RuntimeFailure(f"QMP socket {self.path} did not answer: "
                                 f"{_describe(e)}", "UNAVAILABLE") from e
        if greeting is None or "QMP" not in greeting:
            await self.close()
            raise RuntimeFailure(f"QMP socket {self.path} sent no greeting", "UNAVAILABLE")
        self.greeting = greeting["QMP"]
        self._read_task = asyncio.create_task(self._read_loop(), name=f"qmp-read-{self.path}")
        await self.execute("qmp_capabilities")

    async def close(self) -> None:
        if self._read_task is not None:
            self._read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._read_task
            self._read_task = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None
        self._fail_pending("QMP connection closed")

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        """Run one command; its "return" value, or QmpError."""
        if self._writer is None or self._closed_reason is not None:
            raise RuntimeFailure(f"QMP {command}: {self._closed_reason or 'not connected'}",
                                 "UNAVAILABLE")
        request_id = f"vmm-{next(self._ids)}"
        message: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            message["arguments"] = arguments
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        try:
            self._writer.write(json.dumps(message).encode() + b"\n")
            await self._writer.drain()
            reply = await asyncio.wait_for(answer, timeout or self.timeout)
        except TimeoutError as e:
            raise RuntimeFailure(f"QMP {command}: no answer within {timeout or self.timeout}s",
                                 "UNAVAILABLE") from e
        except OSError as e:
            raise RuntimeFailure(f"QMP {command}: {_describe(e)}", "UNAVAILABLE") from e
        finally:
            self._pending.pop(request_id, None)
        if "error" in reply:
            error = reply["error"]
            raise QmpError(command, str(error.get("class", "GenericError")),
                           str(error.get("desc", "")))
        return reply.get("return")

    async def quit(self) -> None:
        """Ask QEMU to exit. It may close the socket before it answers; either is success."""
        try:
            await self.execute("quit")
        except RuntimeFailure as e:
            if isinstance(e, QmpError):
                raise

    async def wait_event(self, name: str, timeout: float) -> QmpEvent:
        """The next event called name (earlier events of other names are dropped)."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.events.get()
                if event.name == name:
                    return event

    # ---- reading --------------------------------------------------------------------

    async def _read_message(self) -> dict[str, Any] | None:
        assert self._reader is not None
        while True:
            line = await self._reader.readline()
            if not line:
                return None
            if line.strip():
                message = json.loads(line)
                return message if isinstance(message, dict) else {}

    async def _read_loop(self) -> None:
        try:
            while (message := await self._read_message()) is not None:
                self._dispatch(message)
            self._fail_pending("QEMU closed the QMP connection")
        except (OSError, ValueError) as e:
            self._fail_pending(f"QMP connection failed: {_describe(e)}")

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "event" in message:
            stamp = message.get("timestamp", {})
            self.events.put_nowait(QmpEvent(
                name=str(message["event"]), data=message.get("data") or {},
                timestamp=stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1e6))
            return
        answer = self._pending.get(str(message.get("id")))
        if answer is not None and not answer.done():
            answer.set_result(message)

    def _fail_pending(self, reason: str) -> None:
        self._closed_reason = self._closed_reason or reason
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(RuntimeFailure(reason, "UNAVAILABLE"))
        self._pending.clear()


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__
