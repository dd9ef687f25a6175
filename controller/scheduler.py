"""Placement by density: the fullest host that still fits wins (bin-packing).

Pure functions over a snapshot of the fleet; the caller commits the choice with
an etcd transaction that fails if the host's allocation changed meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controller.errors import Violation
from controller.validation import BackendFit, check_backend, human_bytes
from vmm.v1 import host_pb2, vm_pb2


@dataclass(frozen=True)
class HostView:
    """What the scheduler knows of one host."""

    host_id: str
    ready: bool
    backends: dict[str, host_pb2.Backend]
    allocatable_vcpus: int
    allocatable_memory: int
    allocated_vcpus: int
    allocated_memory: int
    # etcd mod_revision of the host's allocation key (0 if absent): the CAS guard.
    allocation_revision: int = 0
    vm_count: int = 0
    # Bridges its agent can attach NICs to: the fleet networks it offers.
    bridges: frozenset[str] = frozenset()

    @property
    def free_vcpus(self) -> int:
        return self.allocatable_vcpus - self.allocated_vcpus

    @property
    def free_memory(self) -> int:
        return self.allocatable_memory - self.allocated_memory

    def utilisation_after(self, vcpus: int, memory: int) -> float:
        """Mean of CPU and memory utilisation once the VM is placed (higher = denser)."""
        cpu = (self.allocated_vcpus + vcpus) / max(self.allocatable_vcpus, 1)
        mem = (self.allocated_memory + memory) / max(self.allocatable_memory, 1)
        return (cpu + mem) / 2


@dataclass(frozen=True)
class Demand:
    """The resources a VM holds on its host."""

    vcpus: int
    memory: int

    def describe(self) -> str:
        return f"{self.vcpus} vCPUs and {human_bytes(self.memory)}"


@dataclass(frozen=True)
class Choice:
    host: HostView
    backend: host_pb2.Backend
    fit: BackendFit
    # What the VM holds on the host under this backend.
    demand: Demand


@dataclass(frozen=True)
class Room:
    """A host's free capacity, as RESOURCE_EXHAUSTED reports it."""

    host_id: str
    free_vcpus: int
    free_memory: int


@dataclass
class NoPlacement:
    """Why nothing was chosen: config problems per backend, or no room."""

    # Backend -> why it cannot run the config at all (empty when some backend can).
    backend_violations: dict[str, list[Violation]] = field(default_factory=dict)
    # Hosts that could run the config but lack room, with their free capacity.
    full_hosts: list[HostView] = field(default_factory=list)
    offered_backends: set[str] = field(default_factory=set)
    # The host with the most free memory (then vCPUs) among those that could run it.
    roomiest: Room | None = None
    # What was asked: the named backend's demand, else the boot size.
    demand: Demand = Demand(0, 0)
    # The bridges of the config's networks, when no ready host has all of them.
    missing_bridges: frozenset[str] = frozenset()


def bridges_for(config: vm_pb2.VmConfig) -> frozenset[str]:
    """The bridges a host needs for the config's fleet networks."""
    return frozenset(nic.bridge for nic in config.network if nic.network and nic.bridge)


def demand_for(config: vm_pb2.VmConfig, reserve_max: bool) -> Demand:
    """What placement counts for a config. With reserve_max, hotplug-ready VMs reserve
    their maximum (the spec's "hotplug preparation"); otherwise their boot size."""
    vcpus, memory = config.cpu.vcpu_count, config.memory.size_bytes
    if reserve_max:
        vcpus = max(vcpus, config.cpu.max_vcpu_count)
        memory = max(memory, config.memory.max_size_bytes)
    return Demand(vcpus, memory)


def place(config: vm_pb2.VmConfig, hosts: list[HostView], backend: str = "",
          host_id: str = "", preference: tuple[str, ...] = (),
          demand_of: dict[str, Demand] | None = None) -> Choice | NoPlacement:
    """Pick (host, backend) for a config.

    demand_of gives the demand per backend (a backend that ignores max_vcpu_count
    does not reserve it); preference orders backends when density ties.
    """
    demand_of = demand_of or {}
    why = NoPlacement()
    candidates: list[tuple[float, tuple[bool, int], Choice]] = []
    fits: dict[str, BackendFit] = {}
    for host in hosts:
        if not host.ready or (host_id and host.host_id != host_id):
            continue
        for name, offered in host.backends.items():
            if backend and name != backend:
                continue
            why.offered_backends.add(name)
            fit = fits.get(name) or check_backend(config, offered.capabilities)
            fits[name] = fit
            if not fit.ok:
                why.backend_violations[name] = fit.violations
                continue
            need = demand_of.get(name) or demand_for(config, reserve_max=False)
            if need.vcpus > host.free_vcpus or need.memory > host.free_memory:
                if host not in why.full_hosts:
                    why.full_hosts.append(host)
                continue
            rank = preference.index(name) if name in preference else len(preference)
            candidates.append((host.utilisation_after(need.vcpus, need.memory),
                               (offered.simulated, rank), Choice(host, offered, fit, need)))
    if not candidates:
        if any(f.ok for f in fits.values()):
            why.backend_violations.clear()
        return why
    if not backend and any(not c[2].fit.warnings for c in candidates):
        # Unless the caller named a backend, one that honours every field the config sets
        # (max_vcpu_count for hotplug, say) wins over one that would ignore some.
        candidates = [c for c in candidates if not c[2].fit.warnings]
    # Densest first; among equals a real hypervisor before a simulator, then the
    # preferred backend, then the stable host id.
    candidates.sort(key=lambda c: (-c[0], c[1], c[2].host.host_id))
    return candidates[0][2]


def best_free(hosts: list[HostView]) -> HostView | None:
    """The host with the most free capacity, for RESOURCE_EXHAUSTED messages."""
    if not hosts:
        return None
    return max(hosts, key=lambda h: (h.free_memory, h.free_vcpus))

