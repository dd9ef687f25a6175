"""A minimal controller end of `AgentService/Connect` that records what one agent sends.

A real gRPC server on loopback, for measuring and testing the agent by itself: it takes
the agent's registration, sends what the caller queues (HeartbeatSettings, a desired
state, ...) and keeps every heartbeat with its arrival time and size. It stores nothing
and never changes the agent's VMs unless told to.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from vmm.agent.v1 import agent_pb2, agent_pb2_grpc


@dataclass
class ReceivedBeat:
    at: float  # time.monotonic() on arrival
    size: int  # serialized bytes of the Heartbeat message
    heartbeat: agent_pb2.Heartbeat


@dataclass
class AgentPeer(agent_pb2_grpc.AgentServiceServicer):
    """Serves one agent stream at a time."""

    # Sent right after each registration, in order.
    on_register: list[agent_pb2.ConnectResponse] = field(default_factory=list)
    registrations: list[agent_pb2.Register] = field(default_factory=list)
    beats: list[ReceivedBeat] = field(default_factory=list)
    statuses: list[agent_pb2.VmStatus] = field(default_factory=list)
    port: int = 0
    _outbound: asyncio.Queue[agent_pb2.ConnectResponse] | None = None
    _server: grpc.aio.Server | None = None
    _changed: asyncio.Condition | None = None

    async def start(self, host: str = "127.0.0.1") -> str:
        self._changed = asyncio.Condition()
        self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        agent_pb2_grpc.add_AgentServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port(f"{host}:0")
        await self._server.start()
        return f"{host}:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0.5)

    def send(self, message: agent_pb2.ConnectResponse) -> None:
        """Send to the connected agent (queued until one is)."""
        if self._outbound is None:
            self._outbound = asyncio.Queue()
        self._outbound.put_nowait(message)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until predicate() is true; checked whenever the agent sends something."""
        assert self._changed is not None
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    async def Connect(self, request_iterator: AsyncIterator[agent_pb2.ConnectRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[
                          agent_pb2.ConnectResponse]:
        if self._outbound is None:
            self._outbound = asyncio.Queue()
        outbound = self._outbound
        reader = asyncio.create_task(self._read(request_iterator))
        try:
            while not reader.done():
                getter = asyncio.ensure_future(outbound.get())
                done, _ = await asyncio.wait({getter, reader},
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                else:
                    getter.cancel()
        finally:
            reader.cancel()

    async def _read(self, requests: AsyncIterator[agent_pb2.ConnectRequest]) -> None:
        async for message in requests:
            kind = message.WhichOneof("message")
            if kind == "register":
                self.registrations.append(message.register)
                for response in self.on_register:
                    self.send(response)
            elif kind == "heartbeat":
                self.beats.append(ReceivedBeat(time.monotonic(), message.heartbeat.ByteSize(),
                                               message.heartbeat))
            elif kind == "vm_status":
                self.statuses.append(message.vm_status)
            assert self._changed is not None
            async with self._changed:
                self._changed.notify_all()
