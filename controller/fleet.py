"""The fleet as the controller sees it: hosts, their backends, capacity, allocation and health.

Everything is held in memory, loaded once from etcd and kept current by watches of the host,
allocation and alive prefixes, so neither placement nor a host listing reads etcd. Readiness
also depends on this replica's own agent sessions: the agent hub reports each session that
opens, closes, goes silent or changes health (AgentHub.on_host_change -> refresh).
"""

from __future__ import annotations

import bisect
import time

from controller.agent_hub import AgentHub
from controller.etcd import KeyValue
from controller.etcd.mirror import PrefixMirror
from controller.fleet_index import FleetIndex
from controller.scheduler import HostView
from controller.store import Store, StoredAllocation
from vmm.store.v1 import records_pb2
from vmm.v1 import host_pb2

# Allocatable memory is counted in whole units of this size. Hosts of one model report
# MemTotal a few MiB apart (kernel build, firmware, crash kernel), and the scheduler keeps one
# group per distinct size (controller.fleet_index): counted exactly, a fleet of one model
# would be a fleet of thousands of sizes, and every decision would search each of them.
MEMORY_UNIT = 128 << 20


def allocatable(record: records_pb2.HostRecord) -> host_pb2.Resources:
    """What the host offers VMs: its capacity times the overcommit ratios, memory rounded
    down to whole MEMORY_UNITs."""
    cpu_ratio = record.cpu_overcommit_ratio or 1.0
    mem_ratio = record.memory_overcommit_ratio or 1.0
    memory = int(record.capacity.memory_bytes * mem_ratio)
    return host_pb2.Resources(vcpus=int(record.capacity.vcpus * cpu_ratio),
                              memory_bytes=memory - memory % MEMORY_UNIT)


EMPTY_ALLOCATION = StoredAllocation(records_pb2.Allocation(allocated=host_pb2.Resources()), 0)


class Fleet:
    def __init__(self, store: Store, hub: AgentHub) -> None:
        self.store = store
        self.hub = hub
        self.index = FleetIndex()
        # Host records without their backends, which `backends` holds as the index's
        # shared declarations: a fleet of identical hosts holds each declaration once.
        self.records: dict[str, records_pb2.HostRecord] = {}
        self.backends: dict[str, tuple[host_pb2.Backend, ...]] = {}
        self._sorted_ids: list[str] = []
        self.allocations: dict[str, StoredAllocation] = {}
        # Hosts with an alive key (connected to some replica), and when we learnt it.
        self._alive: dict[str, float] = {}
        self._mirrors = [
            PrefixMirror(store.etcd, store.host_prefix, on_put=self._host_put,
                         on_delete=self._host_gone),
            PrefixMirror(store.etcd, store.alloc_prefix, on_put=self._allocation_put,
                         on_delete=self._allocation_gone),
            PrefixMirror(store.etcd, store.alive_prefix, on_put=self._alive_put,
                         on_delete=self._alive_gone),
        ]

    async def start(self) -> None:
        for mirror in self._mirrors:
            await mirror.start()

    async def stop(self) -> None:
        for mirror in self._mirrors:
            await mirror.stop()

    # ---- kept current by watches, own writes and sessions -----------------------------

    def _host_put(self, host_id: str, kv: KeyValue) -> None:
        if host_id not in self.records:
            bisect.insort(self._sorted_ids, host_id)
        record = records_pb2.HostRecord.FromString(kv.value)
        self.backends[host_id] = self.index.shared(record.backends)
        record.ClearField("backends")
        self.records[host_id] = record
        self.refresh(host_id)

    def _host_gone(self, host_id: str) -> None:
        if self.records.pop(host_id, None) is not None:
            del self._sorted_ids[bisect.bisect_left(self._sorted_ids, host_id)]
            del self.backends[host_id]
        self.refresh(host_id)

    def _allocation_put(self, host_id: str, kv: KeyValue) -> None:
        self.note_allocation(host_id, StoredAllocation(
            records_pb2.Allocation.FromString(kv.value), kv.mod_revision))

    def _allocation_gone(self, host_id: str) -> None:
        self.allocations.pop(host_id, None)
        self.refresh(host_id)

    def _alive_put(self, host_id: str, _kv: KeyValue) -> None:
        self._alive[host_id] = time.monotonic()
        self.refresh(host_id)

    def _alive_gone(self, host_id: str) -> None:
        self._alive.pop(host_id, None)
        self.refresh(host_id)

    def note_allocation(self, host_id: str, stored: StoredAllocation) -> None:
        """A host's allocation as of stored.revision: from the watch, or our own commit
        (read-your-writes); whichever is older is ignored."""
        known = self.allocations.get(host_id)
        if known is None or known.revision < stored.revision:
            self.allocations[host_id] = stored
            self.refresh(host_id)

    def allocation(self, host_id: str) -> StoredAllocation:
        return self.allocations.get(host_id, EMPTY_ALLOCATION)

    def refresh(self, host_id: str) -> None:
        """Bring the index's view of one host up to date (record, allocation, readiness)."""
        record = self.records.get(host_id)
        if record is None:
            self.index.remove(host_id)
            return
        self.index.upsert(self.view(record, self.backends[host_id],
                                    self.allocations.get(host_id), self.schedulable(host_id)))

    # ---- reading -------------------------------------------------------------------------

    def host_connected(self, host_id: str) -> bool:
        if host_id in self.hub.sessions:
            return True
        # Alive per etcd (a session on another replica), unless it left us since then.
        seen = self._alive.get(host_id)
        return seen is not None and self.hub.departed.get(host_id, 0) < seen

    def alive_hosts(self) -> set[str]:
        return set(self._alive)

    def schedulable(self, host_id: str) -> bool:
        session = self.hub.host_of(host_id)
        if session is not None:
            return self.hub.health_of(session)[0] == host_pb2.HOST_HEALTH_READY
        return self.host_connected(host_id)

    @staticmethod
    def view(record: records_pb2.HostRecord, backends: tuple[host_pb2.Backend, ...],
             alloc: StoredAllocation | None, ready: bool) -> HostView:
        limit = allocatable(record)
        allocated = alloc.allocation.allocated if alloc else host_pb2.Resources()
        return HostView(
            host_id=record.host_id, ready=ready,
            backends={b.name: b for b in backends},
            allocatable_vcpus=limit.vcpus, allocatable_memory=limit.memory_bytes,
            allocated_vcpus=allocated.vcpus, allocated_memory=allocated.memory_bytes,
            allocation_revision=alloc.revision if alloc else 0,
            vm_count=alloc.allocation.vm_count if alloc else 0,
            bridges=frozenset(record.bridges))

    def capabilities(self, host_id: str, backend: str) -> host_pb2.BackendCapabilities | None:
        for b in self.backends.get(host_id, ()):
            if b.name == backend:
                return b.capabilities
        return None

    def get_host(self, host_id: str) -> host_pb2.Host | None:
        return self.host_message(host_id) if host_id in self.records else None

    def backend_declarations(self) -> list[host_pb2.Backend]:
        """Each distinct backend declaration in the fleet, once."""
        return [cls.backend for cls in self.index.classes()]

    def hosts_page(self, after: str, limit: int) -> tuple[list[host_pb2.Host], int]:
        """Hosts with an id above `after`, in id order, at most `limit`; and how many there are."""
        start = bisect.bisect_right(self._sorted_ids, after)
        page = self._sorted_ids[start:start + limit]
        return [self.host_message(host_id) for host_id in page], len(self._sorted_ids)

    def host_message(self, host_id: str) -> host_pb2.Host:
        record = self.records[host_id]
        alloc = self.allocations.get(host_id)
        session = self.hub.host_of(host_id)
        host = host_pb2.Host(
            host_id=record.host_id, hostname=record.hostname, capacity=record.capacity,
            allocatable=allocatable(record),
            allocated=alloc.allocation.allocated if alloc else host_pb2.Resources(),
            cpu_overcommit_ratio=record.cpu_overcommit_ratio,
            memory_overcommit_ratio=record.memory_overcommit_ratio,
            backends=self.backends[host_id],
            vm_count=alloc.allocation.vm_count if alloc else 0,
            registered_timestamp=record.registered_timestamp, labels=record.labels,
            agent_version=record.agent_version, bridges=record.bridges)
        if session is not None:
            # Connected, but an agent that stopped reporting is DEGRADED: do not trust it.
            host.health, host.health_detail = self.hub.health_of(session)
            host.last_heartbeat_timestamp = int(session.last_heartbeat)
            host.metrics.CopyFrom(session.metrics)
        elif self.host_connected(host_id):
            host.health = host_pb2.HOST_HEALTH_READY
            host.health_detail = "connected to another controller"
        else:
            host.health = host_pb2.HOST_HEALTH_DOWN
            host.health_detail = "agent not connected"
        return host
