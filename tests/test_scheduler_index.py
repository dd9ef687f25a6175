"""The indexed scheduler decides exactly as brute force does, on thousands of random fleets."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.runtimes.cloud_hypervisor_capabilities import cloud_hypervisor_capabilities
from agent.runtimes.firecracker import LIMITS as FC_LIMITS
from agent.runtimes.firecracker import SUPPORT_MATRIX as FC_MATRIX
from controller.fleet import MEMORY_UNIT, allocatable
from controller.fleet_index import FleetIndex
from controller.scheduler import Choice, Demand, HostView, NoPlacement
from tests.support.reference_scheduler import reference_place
from vmm import features
from vmm.store.v1 import records_pb2
from vmm.v1 import host_pb2, vm_pb2

GIB = 1 << 30
MIB = 1 << 20


def firecracker(version: str, max_vcpus: int, simulated: bool) -> host_pb2.Backend:
    limits = host_pb2.BackendLimits()
    limits.CopyFrom(FC_LIMITS)
    limits.max_vcpus = max_vcpus
    caps = host_pb2.BackendCapabilities(
        backend=features.FIRECRACKER, limits=limits,
        features=[features.feature(k, s, d) for k, s, d in FC_MATRIX])
    return host_pb2.Backend(name=features.FIRECRACKER, simulated=simulated, version=version,
                            capabilities=caps)


def cloud_hypervisor(version: str, max_vcpus: int, simulated: bool) -> host_pb2.Backend:
    caps = cloud_hypervisor_capabilities()
    caps.limits.max_vcpus = max_vcpus
    return host_pb2.Backend(name=features.CLOUD_HYPERVISOR, simulated=simulated,
                            version=version, capabilities=caps)


# Backends that differ in version, limits and being simulated: several classes per name.
BACKENDS = [
    firecracker("1.14.2", 32, False), firecracker("1.14.2", 32, True),
    firecracker("1.10.0", 8, False), cloud_hypervisor("53.0", 448, False),
    cloud_hypervisor("53.0", 448, True), cloud_hypervisor("48.0", 16, False),
]
# Host bridges of fleet networks: each host has a random subset.
BRIDGES = ["br-mgmt", "br-data", "br-storage"]
SHAPES = [(16, 32 * GIB), (32, 64 * GIB), (64, 256 * GIB), (8, 8 * GIB)]


def random_host(rnd: random.Random, host_id: str, fullness: float) -> HostView:
    vcpus, memory = rnd.choice(SHAPES) if rnd.random() < 0.8 else (
        rnd.randint(1, 96), rnd.randint(1, 384) * GIB)
    backends = {b.name: b for b in rnd.sample(BACKENDS, rnd.randint(1, 3))}
    used_vcpus = min(vcpus, int(vcpus * fullness * rnd.random() * 2))
    used_memory = min(memory, int(memory * fullness * rnd.random() * 2) // MIB * MIB)
    if rnd.random() < 0.05:
        used_vcpus += 2  # overcommitted past a capacity that shrank
    bridges = frozenset(b for b in BRIDGES if rnd.random() < 0.6)
    return HostView(host_id=host_id, ready=rnd.random() < 0.9, backends=backends,
                    allocatable_vcpus=vcpus, allocatable_memory=memory,
                    allocated_vcpus=used_vcpus, allocated_memory=used_memory, bridges=bridges)


def random_config(rnd: random.Random) -> vm_pb2.VmConfig:
    config = vm_pb2.VmConfig()
    config.cpu.vcpu_count = rnd.choice([1, 1, 2, 4, 8, 12, 24, 40])
    config.memory.size_bytes = rnd.choice([128, 512, 1024, 2048, 8192, 65536]) * MIB
    if rnd.random() < 0.3:
        config.cpu.max_vcpu_count = config.cpu.vcpu_count * rnd.choice([1, 2, 4])
    if rnd.random() < 0.1:
        config.memory.backing["hugepages"] = "2M"
    for bridge in BRIDGES:
        if rnd.random() < 0.25:
            config.network.add(id=f"n-{bridge}", network=bridge.removeprefix("br-"),
                               bridge=bridge)
    return config


def same_decision(got: Choice | NoPlacement, want: Choice | NoPlacement) -> None:
    if isinstance(want, Choice):
        assert isinstance(got, Choice), got
        assert (got.host.host_id, got.backend, got.demand, got.fit.warnings) == (
            want.host.host_id, want.backend, want.demand, want.fit.warnings)
        return
    assert isinstance(got, NoPlacement), got
    assert got.offered_backends == want.offered_backends
    assert got.backend_violations == want.backend_violations
    assert got.roomiest == want.roomiest
    assert got.demand == want.demand
    assert got.missing_bridges == want.missing_bridges


def decide_both(rnd: random.Random, hosts: list[HostView], index: FleetIndex) -> None:
    for _ in range(8):
        config = random_config(rnd)
        backend = rnd.choice(["", "", features.FIRECRACKER, features.CLOUD_HYPERVISOR])
        host_id = rnd.choice(hosts).host_id if hosts and rnd.random() < 0.1 else ""
        preference = tuple(rnd.sample([features.FIRECRACKER, features.CLOUD_HYPERVISOR], 2))
        reserve_max = rnd.random() < 0.7
        same_decision(
            index.place(config, backend, host_id, preference, reserve_max),
            reference_place(config, hosts, backend, host_id, preference, reserve_max))


@settings(max_examples=400, deadline=None)
@given(seed=st.integers(0, 2**32), size=st.integers(0, 40),
       fullness=st.sampled_from([0.1, 0.5, 0.9, 0.99]))
def test_same_decisions_as_brute_force(seed: int, size: int, fullness: float) -> None:
    rnd = random.Random(seed)
    hosts = [random_host(rnd, f"h{i:03d}", fullness) for i in range(size)]
    index = FleetIndex()
    for host in rnd.sample(hosts, len(hosts)):
        index.upsert(host)
    decide_both(rnd, hosts, index)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32), fullness=st.sampled_from([0.3, 0.9]))
def test_updates_reservations_and_removals_keep_the_index_exact(seed: int,
                                                                fullness: float) -> None:
    """Hosts change, leave and hold reservations; the index still decides as brute force
    does on what is true at the end (a reservation counts as allocated)."""
    rnd = random.Random(seed)
    index = FleetIndex()
    truth: dict[str, HostView] = {}
    reserved: dict[str, list[Demand]] = {}
    for step in range(60):
        host_id = f"h{rnd.randint(0, 14):02d}"
        action = rnd.random()
        if action < 0.5:
            view = random_host(rnd, host_id, fullness)
            truth[host_id] = view
            index.upsert(view)
        elif action < 0.6:
            truth.pop(host_id, None)
            reserved.pop(host_id, None)
            index.remove(host_id)
        elif action < 0.85 and host_id in truth:
            demand = Demand(rnd.randint(1, 4), rnd.randint(1, 8) * GIB)
            reserved.setdefault(host_id, []).append(demand)
            index.reserve(host_id, demand)
        elif reserved.get(host_id):
            index.unreserve(host_id, reserved[host_id].pop())
        if step % 10 == 9:
            hosts = [with_reservations(v, reserved.get(h, [])) for h, v in sorted(truth.items())]
            decide_both(rnd, hosts, index)
            for bridge in BRIDGES:  # what a network's host_count reports
                assert index.hosts_with_bridge(bridge) == sum(bridge in v.bridges
                                                              for v in truth.values())


def with_reservations(view: HostView, demands: list[Demand]) -> HostView:
    return HostView(host_id=view.host_id, ready=view.ready, backends=view.backends,
                    allocatable_vcpus=view.allocatable_vcpus,
                    allocatable_memory=view.allocatable_memory,
                    allocated_vcpus=view.allocated_vcpus + sum(d.vcpus for d in demands),
                    allocated_memory=view.allocated_memory + sum(d.memory for d in demands),
                    bridges=view.bridges)


def test_full_fleet_names_the_roomiest_host() -> None:
    index = FleetIndex()
    backend = BACKENDS[0]
    for i, free in enumerate([1, 3, 2]):
        index.upsert(HostView(host_id=f"h{i}", ready=True, backends={backend.name: backend},
                              allocatable_vcpus=8, allocatable_memory=8 * GIB,
                              allocated_vcpus=8 - free, allocated_memory=(8 - free) * GIB))
    config = vm_pb2.VmConfig()
    config.cpu.vcpu_count, config.memory.size_bytes = 4, 4 * GIB
    why = index.place(config)
    assert isinstance(why, NoPlacement)
    assert why.roomiest is not None
    assert (why.roomiest.host_id, why.roomiest.free_vcpus) == ("h1", 3)
    assert why.demand == Demand(4, 4 * GIB)


def test_a_backend_class_is_its_declaration_not_its_name() -> None:
    """Two Firecracker versions with other limits: each host gets its own verdict."""
    index = FleetIndex()
    small, large = BACKENDS[2], BACKENDS[0]  # max 8 vCPUs vs 32
    for host_id, backend, used in (("a-small", small, 0), ("b-large", large, 4)):
        index.upsert(HostView(host_id=host_id, ready=True, backends={backend.name: backend},
                              allocatable_vcpus=64, allocatable_memory=64 * GIB,
                              allocated_vcpus=used, allocated_memory=used * GIB))
    config = vm_pb2.VmConfig()
    config.cpu.vcpu_count, config.memory.size_bytes = 12, GIB
    choice = index.place(config)
    assert isinstance(choice, Choice) and choice.host.host_id == "b-large"


def test_a_fleet_rolling_through_builds_keeps_only_what_it_runs_now() -> None:
    """Every host upgraded build by build and resized: the index forgets each declaration
    and size once no host has it, and decides on what is left."""
    index = FleetIndex()
    for build in range(30):
        backend = firecracker(f"1.{build}.0", 32, False)
        for i in range(10):
            index.upsert(HostView(host_id=f"h{i}", ready=True,
                                  backends={backend.name: backend}, allocatable_vcpus=16,
                                  allocatable_memory=(32 + build) * GIB,
                                  allocated_vcpus=i, allocated_memory=i * GIB))
    assert [cls.backend.version for cls in index.classes()] == ["1.29.0"]
    assert index.group_count == 1
    config = vm_pb2.VmConfig()
    config.cpu.vcpu_count, config.memory.size_bytes = 2, GIB
    choice = index.place(config)
    assert isinstance(choice, Choice) and choice.host.host_id == "h9"
    assert choice.backend.version == "1.29.0"
    for i in range(10):
        index.remove(f"h{i}")
    assert index.classes() == [] and index.group_count == 0
    assert isinstance(index.place(config), NoPlacement)


def test_hosts_of_one_model_are_one_size_whatever_memtotal_says() -> None:
    """MemTotal a few MiB apart (kernel, firmware) is one allocatable size: one group for
    the scheduler to search, not one per host."""
    rnd = random.Random(3)
    index = FleetIndex()
    backend = BACKENDS[0]
    sizes = set()
    for i in range(500):
        record = records_pb2.HostRecord(
            host_id=f"h{i:03d}", memory_overcommit_ratio=1.0,
            capacity=host_pb2.Resources(vcpus=64, memory_bytes=256 * GIB - 60 * MIB
                                        + rnd.randint(0, 4096) * 4096))
        limit = allocatable(record)
        assert limit.memory_bytes % MEMORY_UNIT == 0
        assert 0 <= record.capacity.memory_bytes - limit.memory_bytes < MEMORY_UNIT
        sizes.add(limit.memory_bytes)
        index.upsert(HostView(host_id=record.host_id, ready=True,
                              backends={backend.name: backend},
                              allocatable_vcpus=limit.vcpus,
                              allocatable_memory=limit.memory_bytes,
                              allocated_vcpus=0, allocated_memory=0))
    assert sizes == {256 * GIB - MEMORY_UNIT}
    assert index.group_count == 1


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_bridges_no_network_uses_make_no_groups(seed: int) -> None:
    """Hosts with bridges of their own (Docker makes a br-<id> per network, different on
    each host) are grouped by the fleet networks' bridges alone, and decided on as brute
    force does; a network added later regroups them."""
    rnd = random.Random(seed)
    backend = BACKENDS[0]
    hosts = []
    for i in range(40):
        view = random_host(rnd, f"h{i:03d}", 0.5)
        hosts.append(HostView(
            host_id=view.host_id, ready=True, backends={backend.name: backend},
            allocatable_vcpus=16, allocatable_memory=32 * GIB,
            allocated_vcpus=view.allocated_vcpus % 16,
            allocated_memory=view.allocated_memory % (32 * GIB),
            bridges=view.bridges | {f"br-{rnd.getrandbits(48):012x}", "docker0"}))
    index = FleetIndex()
    index.track_bridges(frozenset(BRIDGES[:2]))
    for host in hosts:
        index.upsert(host)
    assert index.group_count <= 4  # one per subset of the two networks' bridges
    for bridge in [*BRIDGES, "docker0"]:
        assert index.hosts_with_bridge(bridge) == sum(bridge in h.bridges for h in hosts)
    for _ in range(8):
        config = random_config(rnd)
        del config.network[:]
        for bridge in rnd.sample(BRIDGES[:2], rnd.randint(0, 2)):
            config.network.add(id=f"n-{bridge}", network=bridge.removeprefix("br-"),
                               bridge=bridge)
        same_decision(index.place(config), reference_place(config, hosts))
    index.track_bridges(frozenset(BRIDGES))
    assert index.group_count <= 8
    decide_both(rnd, hosts, index)
