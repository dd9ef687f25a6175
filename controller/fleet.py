"""The fleet as the controller sees it: hosts, their backends, capacity and health."""

from __future__ import annotations

import time

from controller.agent_hub import AgentHub
from controller.scheduler import HostView
from controller.store import Store, StoredAllocation
from vmm.store.v1 import records_pb2
from vmm.v1 import host_pb2


def allocatable(record: records_pb2.HostRecord) -> host_pb2.Resources:
    cpu_ratio = record.cpu_overcommit_ratio or 1.0
    mem_ratio = record.memory_overcommit_ratio or 1.0
    return host_pb2.Resources(vcpus=int(record.capacity.vcpus * cpu_ratio),
                              memory_bytes=int(record.capacity.memory_bytes * mem_ratio))


class Fleet:
    def __init__(self, store: Store, hub: AgentHub, heartbeat_timeout: float = 15.0) -> None:
        self.store = store
        self.hub = hub
        # A connected agent silent this long is DEGRADED, and placement skips its host.
        self.heartbeat_timeout = heartbeat_timeout
        # Hosts whose alive key was seen recently (sessions on other replicas).
        self._alive: set[str] = set()
        self._alive_read = 0.0

    def host_connected(self, host_id: str) -> bool:
        if host_id in self.hub.sessions:
            return True
        # Alive per etcd (a session on another replica), unless it left us since that read.
        return host_id in self._alive and self.hub.departed.get(host_id, 0) < self._alive_read

    async def refresh_alive(self) -> set[str]:
        self._alive = await self.store.alive_hosts()
        self._alive_read = time.monotonic()
        return self._alive

    async def host_views(self) -> list[HostView]:
        records = await self.store.list_hosts()
        allocations = await self.store.list_allocations()
        alive = await self.refresh_alive()
        return [self.view(r, allocations.get(r.host_id), self._schedulable(r.host_id, alive))
                for r in records]

    def _schedulable(self, host_id: str, alive: set[str]) -> bool:
        session = self.hub.host_of(host_id)
        if session is not None:
            return (time.time() - session.last_heartbeat <= self.heartbeat_timeout
                    and session.health == host_pb2.HOST_HEALTH_READY)
        return host_id in alive

    @staticmethod
    def view(record: records_pb2.HostRecord, alloc: StoredAllocation | None,
             ready: bool) -> HostView:
        limit = allocatable(record)
        allocated = alloc.allocation.allocated if alloc else host_pb2.Resources()
        return HostView(
            host_id=record.host_id, ready=ready,
            backends={b.name: b for b in record.backends},
            allocatable_vcpus=limit.vcpus, allocatable_memory=limit.memory_bytes,
            allocated_vcpus=allocated.vcpus, allocated_memory=allocated.memory_bytes,
            allocation_revision=alloc.revision if alloc else 0,
            vm_count=alloc.allocation.vm_count if alloc else 0)

    async def capabilities(self, host_id: str, backend: str
                           ) -> host_pb2.BackendCapabilities | None:
        session = self.hub.host_of(host_id)
        backends = session.register.backends if session else (
            (await self.store.get_host(host_id) or records_pb2.HostRecord()).backends)
        for b in backends:
            if b.name == backend:
                return b.capabilities
        return None

    async def hosts(self) -> list[host_pb2.Host]:
        records = await self.store.list_hosts()
        allocations = await self.store.list_allocations()
        alive = await self.refresh_alive()
        return [self.host_message(r, allocations.get(r.host_id), r.host_id in alive)
                for r in records]

    async def hosts_page(self, after: str, limit: int) -> tuple[list[host_pb2.Host], int]:
        """Hosts with an id above `after`, in id order, at most `limit`; and how many there are."""
        records = sorted(await self.store.list_hosts(), key=lambda r: r.host_id)
        allocations = await self.store.list_allocations()
        alive = await self.refresh_alive()
        page = [r for r in records if r.host_id > after][:limit]
        return ([self.host_message(r, allocations.get(r.host_id), r.host_id in alive)
                 for r in page], len(records))

    def host_message(self, record: records_pb2.HostRecord, alloc: StoredAllocation | None,
                     alive: bool) -> host_pb2.Host:
        session = self.hub.host_of(record.host_id)
        host = host_pb2.Host(
            host_id=record.host_id, hostname=record.hostname, capacity=record.capacity,
            allocatable=allocatable(record),
            allocated=alloc.allocation.allocated if alloc else host_pb2.Resources(),
            cpu_overcommit_ratio=record.cpu_overcommit_ratio,
            memory_overcommit_ratio=record.memory_overcommit_ratio, backends=record.backends,
            vm_count=alloc.allocation.vm_count if alloc else 0,
            registered_timestamp=record.registered_timestamp, labels=record.labels,
            agent_version=record.agent_version)
        if session is not None:
            host.health = session.health
            host.health_detail = session.health_detail
            silent = time.time() - session.last_heartbeat
            if silent > self.heartbeat_timeout:
                # Connected, but the agent has stopped reporting: do not trust it.
                host.health = host_pb2.HOST_HEALTH_DEGRADED
                host.health_detail = f"no heartbeat for {silent:.0f}s"
            host.last_heartbeat_timestamp = int(session.last_heartbeat)
            host.metrics.CopyFrom(session.metrics)
        elif alive:
            host.health = host_pb2.HOST_HEALTH_READY
            host.health_detail = "connected to another controller"
        else:
            host.health = host_pb2.HOST_HEALTH_DOWN
            host.health_detail = "agent not connected"
        return host
