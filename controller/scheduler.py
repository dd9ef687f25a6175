"""What placement speaks: hosts as the scheduler sees them, a VM's demand, the choice made
or why none could be.

Placement is by density (the fullest host that still fits wins); `fleet_index.py` makes the
choice from memory, and the caller commits it with an etcd transaction that fails if the
host's allocation changed meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controller.errors import Violation
from controller.validation import BackendFit, human_bytes
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
