"""One connected agent as the controller sees it: its stream's outbound queue, the
requests awaiting its replies, and what its heartbeats last said."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator

from controller.access import Caller
from controller.preflights import PassedPreflights
from vmm.agent.v1 import agent_pb2
from vmm.v1 import host_pb2, vm_pb2


class AgentSession:
    """One connected agent."""

    def __init__(self, host_id: str) -> None:
        # The session keeps no registration: the fleet holds what it declared.
        self.host_id = host_id
        self.outbound: asyncio.Queue[agent_pb2.ConnectResponse] = asyncio.Queue()
        self.replies: dict[str, asyncio.Queue[agent_pb2.Reply]] = {}
        self.connected_at = time.time()
        self.last_heartbeat = time.time()
        self.health = host_pb2.HOST_HEALTH_READY
        self.health_detail = ""
        self.metrics = host_pb2.HostMetrics()
        self.vm_metrics: dict[str, vm_pb2.VmMetrics] = {}
        # Whether the hub last saw it silent past the heartbeat timeout.
        self.silent = False
        # The etcd revision that wrote this session's alive key (0 before registration).
        self.alive_revision = 0
        # Who opened the stream; set when its credential is withdrawn (the stream ends).
        self.caller: Caller | None = None
        self.revoked = False
        # What its agent passed in preflight a moment ago (a new session asks afresh).
        self.preflights = PassedPreflights()
        self._ids = itertools.count(1)

    def send(self, message: agent_pb2.ConnectResponse) -> None:
        self.outbound.put_nowait(message)

    @contextlib.asynccontextmanager
    async def open_request(self, request: agent_pb2.Request
                           ) -> AsyncIterator[asyncio.Queue[agent_pb2.Reply]]:
        """Send a request; yields the queue its replies arrive on."""
        request.request_id = f"{self.host_id}-{next(self._ids)}"
        queue: asyncio.Queue[agent_pb2.Reply] = asyncio.Queue()
        self.replies[request.request_id] = queue
        try:
            self.send(agent_pb2.ConnectResponse(request=request))
            yield queue
        finally:
            self.replies.pop(request.request_id, None)

    async def call(self, request: agent_pb2.Request, timeout: float) -> agent_pb2.Reply:
        # asyncio.timeout, not wait_for: no task per call (this is on every create's path).
        async with self.open_request(request) as replies, asyncio.timeout(timeout):
            return await replies.get()

    def cancel(self, request_id: str) -> None:
        self.send(agent_pb2.ConnectResponse(request=agent_pb2.Request(
            cancel=agent_pb2.CancelRequest(request_id=request_id))))

    def abandon(self) -> None:
        """The stream ended: answer every request still waiting, retryably, rather than
        leave its caller to time out."""
        for queue in self.replies.values():
            queue.put_nowait(agent_pb2.Reply(
                error_code="UNAVAILABLE",
                error=f"host {self.host_id} disconnected before it answered; try again"))

    def deliver(self, reply: agent_pb2.Reply) -> None:
        queue = self.replies.get(reply.request_id)
        if queue is not None:
            queue.put_nowait(reply)
