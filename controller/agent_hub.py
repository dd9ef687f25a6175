"""The controller's side of the agent protocol: one session per connected host.

Desired state flows down from the VM cache (so writes from any controller replica
reach the host); observed state flows up and is written to the VM records.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator

import grpc

from controller.etcd import EtcdUnavailable
from controller.store import Store, now
from controller.telemetry import Telemetry
from controller.vm_cache import VmCache, VmChange
from vmm.agent.v1 import agent_pb2, agent_pb2_grpc
from vmm.store.v1 import records_pb2
from vmm.v1 import host_pb2, vm_pb2

log = logging.getLogger(__name__)

# Status fields worth a write to etcd when they change (metrics are kept in memory).
_DURABLE_STATUS_FIELDS = ("observed_generation", "state", "reason", "error", "error_code", "pid",
                          "backend", "reboot_epoch", "removed")


def desired_message(record: records_pb2.VmRecord) -> agent_pb2.ConnectResponse:
    """What the agent must make true for one VM record."""
    if record.deleting:
        return agent_pb2.ConnectResponse(
            remove_vm=agent_pb2.RemoveVm(vm_id=record.vm_id, force=record.force_delete))
    return agent_pb2.ConnectResponse(desired_vm=desired_vm(record))


def desired_vm(record: records_pb2.VmRecord) -> agent_pb2.DesiredVm:
    return agent_pb2.DesiredVm(
        vm_id=record.vm_id, generation=record.generation, config=record.config,
        backend=record.backend, power_state=record.desired_state, shutdown=record.shutdown,
        reboot_epoch=record.reboot_epoch, force_reboot=record.force_reboot)


def durable_status(status: agent_pb2.VmStatus) -> agent_pb2.VmStatus:
    kept = agent_pb2.VmStatus()
    kept.CopyFrom(status)
    kept.ClearField("metrics")
    kept.ClearField("config")
    return kept


class AgentSession:
    """One connected agent."""

    def __init__(self, host_id: str, register: agent_pb2.Register) -> None:
        self.host_id = host_id
        self.register = register
        self.outbound: asyncio.Queue[agent_pb2.ConnectResponse] = asyncio.Queue()
        self.replies: dict[str, asyncio.Queue[agent_pb2.Reply]] = {}
        self.connected_at = time.time()
        self.last_heartbeat = time.time()
        self.health = host_pb2.HOST_HEALTH_READY
        self.health_detail = ""
        self.metrics = host_pb2.HostMetrics()
        self.vm_metrics: dict[str, vm_pb2.VmMetrics] = {}
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
        async with self.open_request(request) as replies:
            return await asyncio.wait_for(replies.get(), timeout)

    def cancel(self, request_id: str) -> None:
        self.send(agent_pb2.ConnectResponse(request=agent_pb2.Request(
            cancel=agent_pb2.CancelRequest(request_id=request_id))))

    def deliver(self, reply: agent_pb2.Reply) -> None:
        queue = self.replies.get(reply.request_id)
        if queue is not None:
            queue.put_nowait(reply)


class AgentHub(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, store: Store, cache: VmCache, telemetry: Telemetry,
                 host_lease_ttl: int = 10) -> None:
        self.store = store
        self.cache = cache
        self.telemetry = telemetry
        self.host_lease_ttl = host_lease_ttl
        self.sessions: dict[str, AgentSession] = {}
        # host id -> time.monotonic() of its last disconnect from this controller.
        self.departed: dict[str, float] = {}
        self._dispatcher: asyncio.Task[None] | None = None
        self._status_locks: dict[str, asyncio.Lock] = {}

    async def start(self) -> None:
        self._dispatcher = asyncio.create_task(self._dispatch_forever(), name="desired-dispatch")

    async def stop(self) -> None:
        if self._dispatcher:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher

    # ---- desired state, down ------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        async with self.cache.subscribe() as changes:
            while True:
                change = await changes.get()
                self._dispatch(change)

    def _dispatch(self, change: VmChange) -> None:
        if change.current is None:
            prev = change.previous
            if prev is not None and (session := self.sessions.get(prev.record.host_id)):
                session.send(agent_pb2.ConnectResponse(
                    remove_vm=agent_pb2.RemoveVm(vm_id=change.vm_id, force=True)))
            return
        record = change.current.record
        prev_rec = change.previous.record if change.previous else None
        # Status-only writes need not go back down.
        if prev_rec is not None and prev_rec.generation == record.generation \
                and prev_rec.deleting == record.deleting:
            return
        session = self.sessions.get(record.host_id)
        if session is not None:
            session.send(desired_message(record))

    # ---- the stream -----------------------------------------------------------------

    async def Connect(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:  # type: ignore[override]
        first = await context.read()
        if first is grpc.aio.EOF or not first.HasField("register"):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "the first message on the stream must be register")
        register = first.register
        if not register.host_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "register.host_id is required")
        host_id = register.host_id
        session = AgentSession(host_id, register)
        old = self.sessions.get(host_id)
        if old is not None:
            log.warning("host %s reconnected; replacing its previous session", host_id)
            old.send(agent_pb2.ConnectResponse())  # wakes the old writer; it will notice
        self.sessions[host_id] = session
        try:
            async with self.store.etcd.lease(self.host_lease_ttl) as lease:
                await self._register(session, lease.id)
                reader = asyncio.create_task(self._read(session, context))
                writer = asyncio.create_task(self._write(session, context))
                lost = asyncio.create_task(lease.wait_lost())
                done, pending = await asyncio.wait(
                    {reader, writer, lost}, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                for task in done:
                    if task is not lost and not task.cancelled() and task.exception():
                        log.info("agent stream of host %s ended: %s", host_id, task.exception())
        except EtcdUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"etcd is unreachable: {exc}")
        finally:
            if self.sessions.get(host_id) is session:
                del self.sessions[host_id]
                self.departed[host_id] = time.monotonic()
            log.info("host %s disconnected", host_id)

    async def _register(self, session: AgentSession, lease_id: int) -> None:
        reg = session.register
        existing = await self.store.get_host(reg.host_id)
        record = records_pb2.HostRecord(
            host_id=reg.host_id, hostname=reg.hostname, capacity=reg.capacity,
            cpu_overcommit_ratio=reg.cpu_overcommit_ratio or 1.0,
            memory_overcommit_ratio=reg.memory_overcommit_ratio or 1.0,
            backends=reg.backends, labels=reg.labels, agent_version=reg.agent_version,
            registered_timestamp=existing.registered_timestamp if existing else now())
        await self.store.put_host(record)
        await self.store.mark_alive(reg.host_id, lease_id)
        for status in reg.vms:
            await self.apply_status(session, status)
        desired = [desired_vm(s.record) for s in list(self.cache.vms.values())
                   if s.record.host_id == reg.host_id and not s.record.deleting]
        session.send(agent_pb2.ConnectResponse(desired_state=agent_pb2.DesiredState(vms=desired)))
        log.info("host %s registered: %d backends, %d VMs reported, %d desired", reg.host_id,
                 len(reg.backends), len(reg.vms), len(desired))

    async def _write(self, session: AgentSession, context: grpc.aio.ServicerContext) -> None:
        while True:
            message = await session.outbound.get()
            if self.sessions.get(session.host_id) is not session:
                return
            if message.WhichOneof("message") is None:
                continue
            await context.write(message)

    async def _read(self, session: AgentSession, context: grpc.aio.ServicerContext) -> None:
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                return
            kind = message.WhichOneof("message")
            if kind == "heartbeat":
                self._heartbeat(session, message.heartbeat)
            elif kind == "vm_status":
                await self.apply_status(session, message.vm_status)
            elif kind == "reply":
                session.deliver(message.reply)

    def _heartbeat(self, session: AgentSession, beat: agent_pb2.Heartbeat) -> None:
        session.last_heartbeat = time.time()
        session.health = beat.health or host_pb2.HOST_HEALTH_READY
        session.health_detail = beat.health_detail
        session.metrics = beat.metrics
        for status in beat.vms:
            session.vm_metrics[status.vm_id] = status.metrics

    # ---- observed state, up ---------------------------------------------------------

    async def apply_status(self, session: AgentSession, status: agent_pb2.VmStatus) -> None:
        """Record what an agent reports about one of its VMs."""
        if status.removed:
            session.vm_metrics.pop(status.vm_id, None)
        elif status.HasField("metrics"):
            session.vm_metrics[status.vm_id] = status.metrics
        lock = self._status_locks.setdefault(status.vm_id, asyncio.Lock())
        async with lock:
            cached = self.cache.get(status.vm_id)
            if cached is None or cached.record.host_id != session.host_id:
                return  # not ours (any more): the desired set makes the agent remove it
            if status.removed:
                if cached.record.deleting:
                    await self.store.delete_vm(status.vm_id)
                    self.telemetry.vm_deleted(cached.record)
                    # Anyone still waiting on this lock finds the VM gone and returns.
                    self._status_locks.pop(status.vm_id, None)
                return
            new = durable_status(status)

            def change(record: records_pb2.VmRecord) -> bool:
                if record.host_id != session.host_id:
                    return False
                if all(getattr(record.status, f) == getattr(new, f)
                       for f in _DURABLE_STATUS_FIELDS) \
                        and dict(record.status.backend_info) == dict(new.backend_info):
                    return False
                old_state = record.status.state
                record.status.CopyFrom(new)
                if old_state != new.state:
                    self.telemetry.vm_state_changed(old_state, new.state)
                return True

            stored = await self.store.mutate_vm(status.vm_id, change)
            if stored is not None:
                self.cache.note_write(stored)

    def host_of(self, host_id: str) -> AgentSession | None:
        return self.sessions.get(host_id)
