"""Scrape-time gauges of the controller's in-memory state, for /metrics.

Computed from memory on each scrape, never from etcd: hosts by health and heartbeat lag
from the agent sessions of this controller, VMs by state and backend from the VM cache,
per-host allocation from the fleet's in-memory index. One scrape is O(hosts), holds
no lock and does no I/O. It may run in a thread beside the event loop that changes that
state: each container is first copied whole (one C-level call under the GIL), then read.

Series: per host, four allocation gauges and one heartbeat lag gauge, so 10,000 hosts
make some 50,000 series, well within what one Prometheus scrapes. Every replica sees every
VM and every host's allocation, so across replicas aggregate those with max by (...);
hosts by health and heartbeat lag count only the hosts connected to the replica scraped,
so those sum across replicas.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple, Protocol, TypeVar

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.agent_session import AgentSession
from controller.telemetry import state_label
from vmm.v1 import host_pb2, vm_pb2

# Emitted even when no host or VM is in them, so that dashboards show zeros, not gaps.
HOST_HEALTHS = (host_pb2.HOST_HEALTH_READY, host_pb2.HOST_HEALTH_DEGRADED)
VM_STATES = tuple(v for v in vm_pb2.VmState.values() if v != vm_pb2.VM_STATE_UNSPECIFIED)


T = TypeVar("T")


def snapshot(copy: Callable[[], list[T]]) -> list[T]:
    """copy(), retried should the owner change the container during the copy (possible only
    if a garbage collection ran Python code in the middle of it)."""
    for _ in range(10):
        try:
            return copy()
        except RuntimeError:
            continue
    return []


def health_label(health: host_pb2.HostHealth.ValueType) -> str:
    """READY for HOST_HEALTH_READY."""
    return host_pb2.HostHealth.Name(health).removeprefix("HOST_HEALTH_")


class HostAllocation(NamedTuple):
    host_id: str
    allocated_vcpus: int
    allocated_memory: int
    allocatable_vcpus: int
    allocatable_memory: int


class AllocationSource(Protocol):
    """What the collector needs of the fleet: each known host's allocation, from memory."""

    def host_allocations(self) -> Iterable[HostAllocation]: ...


class _View(Protocol):
    host_id: str
    allocated_vcpus: int
    allocated_memory: int
    allocatable_vcpus: int
    allocatable_memory: int


class _Index(Protocol):
    def views(self) -> Iterable[_View]: ...


class FleetAllocations:
    """Allocations read from the fleet's in-memory index (controller.fleet_index.FleetIndex)
    when the fleet keeps one as `index`; none otherwise: the collector reads no etcd."""

    def __init__(self, fleet: object) -> None:
        self.fleet = fleet

    def host_allocations(self) -> Iterator[HostAllocation]:
        index: _Index | None = getattr(self.fleet, "index", None)
        if index is None:
            return
        for view in snapshot(lambda: list(index.views())):
            yield HostAllocation(view.host_id, view.allocated_vcpus, view.allocated_memory,
                                 view.allocatable_vcpus, view.allocatable_memory)


class _Sessions(Protocol):
    @property
    def sessions(self) -> Mapping[str, AgentSession]: ...


class _Vms(Protocol):
    @property
    def by_state(self) -> Mapping[tuple[vm_pb2.VmState.ValueType, str], int]: ...


class ControllerCollector(Collector):
    """The fleet as this controller holds it in memory, as Prometheus gauges."""

    def __init__(self, hub: _Sessions, cache: _Vms, allocations: AllocationSource,
                 heartbeat_timeout: float) -> None:
        self.hub = hub
        self.cache = cache
        self.allocations = allocations
        # Connected but silent this long: DEGRADED, as Fleet reports such a host (unless
        # the hub says how long, see _hosts).
        self.heartbeat_timeout = heartbeat_timeout

    @classmethod
    def for_fleet(cls, hub: _Sessions, cache: _Vms, fleet: object) -> ControllerCollector:
        return cls(hub, cache, FleetAllocations(fleet),
                   float(getattr(fleet, "heartbeat_timeout", 15.0)))

    def describe(self) -> Iterable[Metric]:
        # No samples here: the registry checks names with this, without a scrape.
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        self._hosts(*families[:2])
        self._vms(families[2])
        self._allocations(*families[3:])
        return families

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("vmm_hosts", "Hosts connected to this controller, by health",
                              labels=["health"]),
            GaugeMetricFamily("vmm_host_heartbeat_lag_seconds",
                              "Seconds since the last heartbeat of each host connected to "
                              "this controller", labels=["host_id"], unit="seconds"),
            GaugeMetricFamily("vmm_vms", "VMs by observed state and backend",
                              labels=["state", "backend"]),
            GaugeMetricFamily("vmm_host_allocated_vcpus", "vCPUs reserved by the host's VMs",
                              labels=["host_id"]),
            GaugeMetricFamily("vmm_host_allocatable_vcpus",
                              "vCPUs the host offers (capacity times overcommit)",
                              labels=["host_id"]),
            GaugeMetricFamily("vmm_host_allocated_memory_bytes",
                              "Memory reserved by the host's VMs", labels=["host_id"],
                              unit="bytes"),
            GaugeMetricFamily("vmm_host_allocatable_memory_bytes",
                              "Memory the host offers (capacity times overcommit, in whole "
                              "128 MiB units)",
                              labels=["host_id"], unit="bytes"),
        ]

    def _hosts(self, hosts: GaugeMetricFamily, lag: GaugeMetricFamily) -> None:
        now = time.time()
        # The hub's own, stretched with the heartbeat interval, where it keeps one.
        timeout = float(getattr(self.hub, "heartbeat_timeout", self.heartbeat_timeout))
        by_health: Counter[host_pb2.HostHealth.ValueType] = Counter(
            dict.fromkeys(HOST_HEALTHS, 0))
        for host_id, session in snapshot(lambda: list(self.hub.sessions.items())):
            silent = max(now - session.last_heartbeat, 0.0)
            health = session.health
            if silent > timeout:
                health = host_pb2.HOST_HEALTH_DEGRADED
            by_health[health] += 1
            lag.add_metric([host_id], silent)
        for reported, count in sorted(by_health.items()):
            hosts.add_metric([health_label(reported)], count)

    def _vms(self, vms: GaugeMetricFamily) -> None:
        counts: Counter[tuple[vm_pb2.VmState.ValueType, str]] = Counter(
            dict(snapshot(lambda: list(self.cache.by_state.items()))))
        for backend in {backend for _, backend in counts}:
            for state in VM_STATES:
                counts.setdefault((state, backend), 0)
        for (observed, backend), count in sorted(counts.items()):
            vms.add_metric([state_label(observed), backend], count)

    def _allocations(self, vcpus: GaugeMetricFamily, vcpus_limit: GaugeMetricFamily,
                     memory: GaugeMetricFamily, memory_limit: GaugeMetricFamily) -> None:
        for host in self.allocations.host_allocations():
            labels = [host.host_id]
            vcpus.add_metric(labels, host.allocated_vcpus)
            vcpus_limit.add_metric(labels, host.allocatable_vcpus)
            memory.add_metric(labels, host.allocated_memory)
            memory_limit.add_metric(labels, host.allocatable_memory)
