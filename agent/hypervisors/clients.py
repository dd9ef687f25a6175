"""Long-lived API clients, one per hypervisor process, for the calls made over and over.

Metrics are sampled from every VM every few seconds; opening a client (and a connection)
per sample costs more than the sample. A ClientCache keeps one client per API socket,
bound to the pid it was opened for: a new process on the same socket gets a new client,
and a client is closed when its VM goes away or its connection fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Generic, Protocol, TypeVar


class Closable(Protocol):
    async def aclose(self) -> None: ...


C = TypeVar("C", bound=Closable)

# Seconds a metrics call may take on a kept client before it counts as failed.
METRICS_TIMEOUT = 5.0


class ClientCache(Generic[C]):
    """One open client per API socket, reused until discarded."""

    def __init__(self, factory: Callable[[Path], C]) -> None:
        self._factory = factory
        self._clients: dict[Path, tuple[int, C]] = {}

    def __len__(self) -> int:
        return len(self._clients)

    async def get(self, socket_path: Path, pid: int) -> C:
        entry = self._clients.get(socket_path)
        if entry is not None:
            if entry[0] == pid:
                return entry[1]
            await self.discard(socket_path)
        client = self._factory(socket_path)
        self._clients[socket_path] = (pid, client)
        return client

    async def discard(self, socket_path: Path) -> None:
        """Close the socket's client, if there is one."""
        entry = self._clients.pop(socket_path, None)
        if entry is not None:
            with contextlib.suppress(Exception):
                await entry[1].aclose()

    async def aclose(self) -> None:
        for socket_path in list(self._clients):
            await self.discard(socket_path)
