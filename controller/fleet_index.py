"""The schedulable fleet, indexed for exact best-fit placement.

Hosts are grouped by what their backend declares (its *class*: hosts with identical
declarations share one feasibility verdict per decision) and by allocatable size. Inside a
group the densest host that fits is the one with the least weighted free capacity, found by
walking buckets of free vCPUs from the smallest that fits, each bucket sorted by free memory,
and stopping once no later bucket can win. A decision costs a few bisections per group
however many hosts are full; nothing here does I/O.

Capacity held by placements that are being committed ("assumed") counts as used until the
commit lands or fails, so concurrent decisions do not hand out the same room twice.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from controller.scheduler import (
    Choice,
    Demand,
    HostView,
    NoPlacement,
    Room,
    bridges_for,
    demand_for,
)
from controller.validation import BackendFit, check_backend
from vmm import features
from vmm.v1 import host_pb2, vm_pb2


@dataclass(frozen=True)
class BackendClass:
    """One distinct backend declaration (name, simulated, capabilities) in the fleet."""

    backend: host_pb2.Backend
    # The declaration's deterministic encoding: what makes two classes one.
    key: bytes
    # Honours max_vcpu_count, so a hotplug-ready VM reserves its maximum there.
    honours_max_vcpus: bool

    @property
    def name(self) -> str:
        return self.backend.name

    def demand(self, config: vm_pb2.VmConfig, reserve_max: bool) -> Demand:
        return demand_for(config, reserve_max and self.honours_max_vcpus)


def backend_class(backend: host_pb2.Backend) -> BackendClass:
    honours = features.support_of(backend.capabilities,
                                  "cpu.max_vcpu_count").support == host_pb2.SUPPORT_FULL
    return BackendClass(backend, backend.SerializeToString(deterministic=True), honours)


class DensestFirst:
    """Twice the mean of CPU and memory utilisation once the VM is placed, as an exact
    fraction num/den that sorts the denser placement first. Comparisons cross-multiply:
    exact, and cheaper than Fraction's normalising."""

    __slots__ = ("den", "num")

    def __init__(self, host: HostView, free_vcpus: int, free_memory: int,
                 need: Demand) -> None:
        vcpus, memory = max(host.allocatable_vcpus, 1), max(host.allocatable_memory, 1)
        self.num = ((host.allocatable_vcpus - free_vcpus + need.vcpus) * memory
                    + (host.allocatable_memory - free_memory + need.memory) * vcpus)
        self.den = vcpus * memory

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, DensestFirst)
                and self.num * other.den == other.num * self.den)

    __hash__ = None  # type: ignore[assignment]

    def __lt__(self, other: DensestFirst) -> bool:
        return self.num * other.den > other.num * self.den


class ShapeGroup:
    """Ready hosts that offer the same backend classes and bridges (fleet networks) and
    have the same allocatable size.

    Within the group, higher utilisation after placement means a smaller weight
    M * free_vcpus + C * free_memory, which integers compare exactly. by_weight lists the
    hosts by (weight, host_id): the first few entries at or above the weight of the demand
    itself usually hold the answer. When none of them fits, buckets[free_vcpus] (sorted by
    (free_memory, host_id), keys listing the non-empty ones in order) find it without
    looking at the full hosts.
    """

    __slots__ = ("bridges", "buckets", "by_weight", "class_ids", "keys", "memory", "vcpus")

    # Entries of by_weight tried before walking the buckets.
    SCAN = 8

    def __init__(self, class_ids: tuple[int, ...], vcpus: int, memory: int,
                 bridges: frozenset[str] = frozenset()) -> None:
        self.class_ids = class_ids
        self.bridges = bridges
        self.vcpus = max(vcpus, 1)
        self.memory = max(memory, 1)
        self.keys: list[int] = []
        self.buckets: dict[int, list[tuple[int, str]]] = {}
        self.by_weight: list[tuple[int, str, int, int]] = []

    def weight(self, free_vcpus: int, free_memory: int) -> int:
        return self.memory * free_vcpus + self.vcpus * free_memory

    def add(self, free_vcpus: int, free_memory: int, host_id: str) -> None:
        bucket = self.buckets.get(free_vcpus)
        if bucket is None:
            bucket = self.buckets[free_vcpus] = []
            bisect.insort(self.keys, free_vcpus)
        bisect.insort(bucket, (free_memory, host_id))
        bisect.insort(self.by_weight,
                      (self.weight(free_vcpus, free_memory), host_id, free_vcpus, free_memory))

    def discard(self, free_vcpus: int, free_memory: int, host_id: str) -> None:
        bucket = self.buckets[free_vcpus]
        del bucket[bisect.bisect_left(bucket, (free_memory, host_id))]
        entry = (self.weight(free_vcpus, free_memory), host_id, free_vcpus, free_memory)
        del self.by_weight[bisect.bisect_left(self.by_weight, entry)]
        if not bucket:
            del self.buckets[free_vcpus]
            del self.keys[bisect.bisect_left(self.keys, free_vcpus)]

    def __bool__(self) -> bool:
        return bool(self.keys)

    def best_fit(self, need: Demand) -> tuple[int, int, str] | None:
        """(free_vcpus, free_memory, host_id) of the densest host with room for need."""
        # No host that fits weighs less than one left with exactly the demand free: skip
        # those (the full hosts of a packed fleet) and try the next few in weight order.
        start = bisect.bisect_left(self.by_weight, (self.weight(need.vcpus, need.memory),))
        for _, host_id, free_vcpus, free_memory in self.by_weight[start:start + self.SCAN]:
            if free_vcpus >= need.vcpus and free_memory >= need.memory:
                return free_vcpus, free_memory, host_id
        vcpus_weight, memory_weight, buckets = self.memory, self.vcpus, self.buckets
        floor = memory_weight * need.memory  # the memory term of any host that fits
        best: tuple[int, str] | None = None
        best_slot: tuple[int, int, str] | None = None
        keys = self.keys
        for i in range(bisect.bisect_left(keys, need.vcpus), len(keys)):
            free_vcpus = keys[i]
            if best is not None and vcpus_weight * free_vcpus + floor > best[0]:
                break  # every later bucket weighs more, even at the least memory that fits
            bucket = buckets[free_vcpus]
            j = bisect.bisect_left(bucket, (need.memory, ""))
            if j == len(bucket):
                continue
            free_memory, host_id = bucket[j]
            weight = (vcpus_weight * free_vcpus + memory_weight * free_memory, host_id)
            if best is None or weight < best:
                best, best_slot = weight, (free_vcpus, free_memory, host_id)
        return best_slot

    def roomiest(self) -> tuple[int, int, str] | None:
        """(free_memory, free_vcpus, host_id) of the host with the most free memory, then
        vCPUs, then the smallest id."""
        best: tuple[int, int, str] | None = None
        for free_vcpus in self.keys:
            bucket = self.buckets[free_vcpus]
            free_memory = bucket[-1][0]
            host_id = bucket[bisect.bisect_left(bucket, (free_memory, ""))][1]
            if (best is None or (free_memory, free_vcpus) > best[:2]
                    or ((free_memory, free_vcpus) == best[:2] and host_id < best[2])):
                best = (free_memory, free_vcpus, host_id)
        return best


@dataclass
class _Entry:
    view: HostView
    class_ids: tuple[int, ...]
    # The host's bridges that placement can ask for: those its group is keyed by.
    bridges: frozenset[str]
    reserved_vcpus: int = 0
    reserved_memory: int = 0
    # (free_vcpus, free_memory) under which the host sits in its groups; None if absent.
    slot: tuple[int, int] | None = None

    @property
    def free(self) -> tuple[int, int]:
        return (self.view.free_vcpus - self.reserved_vcpus,
                self.view.free_memory - self.reserved_memory)

    def best_fit(self, need: Demand) -> tuple[int, int, str] | None:
        """This host, as a group of one (a request that names its host)."""
        free_vcpus, free_memory = self.free
        if free_vcpus >= need.vcpus and free_memory >= need.memory:
            return free_vcpus, free_memory, self.view.host_id
        return None


class FleetIndex:
    """Hosts by class and shape, kept current by the caller; answers place() from memory."""

    def __init__(self) -> None:
        self._hosts: dict[str, _Entry] = {}
        # Classes and groups last as long as some host is in them: a fleet that rolls
        # through builds and host sizes keeps only those it has now.
        self._class_ids: dict[bytes, int] = {}
        self._classes: dict[int, BackendClass] = {}
        self._next_class_id = 0
        # id() of each class's own declaration message -> its class id. The class holds the
        # message, and its entry goes with the class, so an id found here is that message.
        self._by_object: dict[int, int] = {}
        # (classes offered, allocatable vCPUs, memory, bridges) -> the ready hosts of that kind.
        self._groups: dict[tuple[tuple[int, ...], int, int, frozenset[str]], ShapeGroup] = {}
        # class id -> ready hosts offering it, and hosts offering it at all.
        self._ready_count: dict[int, int] = {}
        self._members: dict[int, int] = {}
        # The bridges placement can ask for (fleet networks'); None: every bridge. A host's
        # other bridges (Docker names one br-<id> per network, different on every host)
        # must not make a group of each host.
        self._tracked_bridges: frozenset[str] | None = None
        # Bridge -> hosts in the index that have it, whether tracked or not.
        self._bridge_hosts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._hosts)

    def get(self, host_id: str) -> HostView | None:
        entry = self._hosts.get(host_id)
        return entry.view if entry else None

    def views(self) -> Iterable[HostView]:
        return (entry.view for entry in self._hosts.values())

    def hosts_with_bridge(self, bridge: str) -> int:
        return self._bridge_hosts.get(bridge, 0)

    @property
    def group_count(self) -> int:
        """Groups of hosts the index searches per decision: one per kind and size of host."""
        return len(self._groups)

    def ready_backends(self) -> list[str]:
        """The backends some ready host offers, as the health page names them."""
        return sorted({cls.name + (" (simulated)" if cls.backend.simulated else "")
                       for i, cls in self._classes.items() if self._ready_count[i]})

    def classes(self) -> list[BackendClass]:
        """The backend declarations the hosts in the index offer."""
        return list(self._classes.values())

    # ---- keeping it current ----------------------------------------------------------

    def upsert(self, view: HostView) -> None:
        """Add a host or replace what is known of it (record, allocation, readiness)."""
        entry = self._hosts.get(view.host_id)
        if entry is not None:
            self._unslot(entry)
            self._count_members(entry, -1)
            before = entry.class_ids
            if view.bridges != entry.view.bridges:  # seldom: most refreshes are allocations
                self._count_bridges(entry.view.bridges, -1)
                self._count_bridges(view.bridges, 1)
                entry.bridges = self._tracked(view.bridges)
            entry.view = view
            entry.class_ids = self._class_ids_of(view)
            self._count_members(entry, 1)
            self._forget_unused(before)
        else:
            entry = self._hosts[view.host_id] = _Entry(view, self._class_ids_of(view),
                                                       self._tracked(view.bridges))
            self._count_members(entry, 1)
            self._count_bridges(view.bridges, 1)
        self._slot(entry)

    def track_bridges(self, bridges: frozenset[str]) -> None:
        """Group hosts by these bridges only, those of the fleet networks. A change regroups
        every host: networks come and go rarely, placements all the time."""
        if bridges == self._tracked_bridges:
            return
        for entry in self._hosts.values():
            self._unslot(entry)
        self._tracked_bridges = bridges
        for entry in self._hosts.values():
            entry.bridges = self._tracked(entry.view.bridges)
            self._slot(entry)

    def _tracked(self, bridges: frozenset[str]) -> frozenset[str]:
        tracked = self._tracked_bridges
        return bridges if tracked is None else bridges & tracked

    def remove(self, host_id: str) -> None:
        entry = self._hosts.pop(host_id, None)
        if entry is not None:
            self._unslot(entry)
            self._count_members(entry, -1)
            self._forget_unused(entry.class_ids)
            self._count_bridges(entry.view.bridges, -1)

    def _count_members(self, entry: _Entry, sign: int) -> None:
        for class_id in entry.class_ids:
            self._members[class_id] += sign

    def _count_bridges(self, bridges: frozenset[str], sign: int) -> None:
        for bridge in bridges:
            count = self._bridge_hosts.get(bridge, 0) + sign
            if count:
                self._bridge_hosts[bridge] = count
            else:
                del self._bridge_hosts[bridge]

    def _forget_unused(self, class_ids: Iterable[int]) -> None:
        """Drop the classes among class_ids that no host offers any more."""
        for class_id in class_ids:
            if self._members.get(class_id) == 0:
                cls = self._classes.pop(class_id)
                del self._class_ids[cls.key], self._by_object[id(cls.backend)]
                del self._members[class_id], self._ready_count[class_id]

    def reserve(self, host_id: str, demand: Demand, sign: int = 1) -> None:
        """Count demand as used on the host until unreserve(); a commit in flight."""
        entry = self._hosts.get(host_id)
        if entry is None:
            return
        self._unslot(entry)
        entry.reserved_vcpus += sign * demand.vcpus
        entry.reserved_memory += sign * demand.memory
        self._slot(entry)

    def unreserve(self, host_id: str, demand: Demand) -> None:
        self.reserve(host_id, demand, sign=-1)

    def shared(self, backends: Iterable[host_pb2.Backend]) -> tuple[host_pb2.Backend, ...]:
        """The index's own copy of each declaration. Hosts that declare the same backends
        (a fleet runs a handful of builds) then hold one message of a few kilobytes between
        them rather than one each, and refreshing such a host encodes nothing."""
        return tuple(self._classes[self._class_id(backend)].backend for backend in backends)

    def _class_id(self, backend: host_pb2.Backend) -> int:
        class_id = self._by_object.get(id(backend))
        if class_id is not None:
            return class_id
        cls = backend_class(backend)
        class_id = self._class_ids.get(cls.key)
        if class_id is None:
            # A copy: holding the caller's message would keep the record around it alive.
            own = host_pb2.Backend()
            own.CopyFrom(backend)
            class_id = self._class_ids[cls.key] = self._next_class_id
            self._next_class_id += 1
            self._classes[class_id] = BackendClass(own, cls.key, cls.honours_max_vcpus)
            self._by_object[id(own)] = class_id
            self._ready_count[class_id] = 0
            self._members[class_id] = 0
        return class_id

    def _class_ids_of(self, view: HostView) -> tuple[int, ...]:
        return tuple(sorted(self._class_id(backend) for backend in view.backends.values()))

    @staticmethod
    def _group_key(entry: _Entry) -> tuple[tuple[int, ...], int, int, frozenset[str]]:
        return (entry.class_ids, entry.view.allocatable_vcpus, entry.view.allocatable_memory,
                entry.bridges)

    def _slot(self, entry: _Entry) -> None:
        if not entry.view.ready:
            return
        entry.slot = entry.free
        key = self._group_key(entry)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = ShapeGroup(*key)
        group.add(*entry.slot, entry.view.host_id)
        for class_id in entry.class_ids:
            self._ready_count[class_id] += 1

    def _unslot(self, entry: _Entry) -> None:
        if entry.slot is None:
            return
        key = self._group_key(entry)
        group = self._groups[key]
        group.discard(*entry.slot, entry.view.host_id)
        if not group:
            del self._groups[key]
        for class_id in entry.class_ids:
            self._ready_count[class_id] -= 1
        entry.slot = None

    # ---- deciding ----------------------------------------------------------------------

    def place(self, config: vm_pb2.VmConfig, backend: str = "", host_id: str = "",
              preference: tuple[str, ...] = (), reserve_max: bool = True
              ) -> Choice | NoPlacement:
        """The densest (host, backend) with room for the config, or why there is none.

        Ties go to a real hypervisor before a simulator, then to the preferred backend, then
        to the smallest host id. Unless the caller names a backend, one that honours every
        field the config sets wins over one that would ignore some.
        """
        named = self._hosts.get(host_id) if host_id else None
        if host_id and (named is None or named.slot is None):
            return NoPlacement(demand=demand_for(config, False))
        bridges = bridges_for(config)
        if bridges and not (bridges <= named.view.bridges if named else any(
                bridges <= group.bridges for group in self._groups.values())):
            return NoPlacement(demand=demand_for(config, False), missing_bridges=bridges)
        used = features.features_used(config)  # the same for every class
        boot = demand_for(config, False)
        reserved = demand_for(config, True) if reserve_max else boot
        offered: set[str] = set()
        verdicts: dict[int, BackendFit] = {}
        # Per backend name, the refusing class with the smallest key speaks for it.
        refusals: dict[str, tuple[bytes, BackendFit]] = {}
        # Distinct demand -> the classes that can run the config and would hold that much.
        wanting: dict[Demand, list[int]] = {}
        # Class -> how it orders among choices on one host: (ignores fields, simulated, rank,
        # name: backends the preference leaves unranked go by name).
        order: dict[int, tuple[bool, bool, int, str]] = {}
        for class_id in named.class_ids if named else self._classes:
            cls = self._classes[class_id]
            if (backend and cls.name != backend) or not self._ready_count[class_id]:
                continue
            offered.add(cls.name)
            fit = verdicts[class_id] = check_backend(config, cls.backend.capabilities,
                                                     used=used)
            if not fit.ok:
                if cls.name not in refusals or cls.key < refusals[cls.name][0]:
                    refusals[cls.name] = (cls.key, fit)
                continue
            rank = preference.index(cls.name) if cls.name in preference else len(preference)
            order[class_id] = (bool(fit.warnings) and not backend, cls.backend.simulated, rank,
                               cls.name)
            wanting.setdefault(reserved if cls.honours_max_vcpus else boot, []).append(class_id)
        best = self._best(wanting, order, named, bridges)
        if best is not None:
            need, host, class_id = best
            return Choice(host, self._classes[class_id].backend, verdicts[class_id], need)
        why = NoPlacement(demand=boot, offered_backends=offered)
        if not order:
            why.backend_violations = {name: fit.violations for name, (_, fit) in refusals.items()}
        why.roomiest = self._roomiest(list(order), named, bridges)
        asked = min((self._classes[cid] for cid in order if self._classes[cid].name == backend),
                    key=lambda cls: cls.key, default=None)
        if asked:
            why.demand = reserved if asked.honours_max_vcpus else boot
        return why

    def _best(self, wanting: dict[Demand, list[int]],
              order: dict[int, tuple[bool, bool, int, str]],
              named: _Entry | None, bridges: frozenset[str]
              ) -> tuple[Demand, HostView, int] | None:
        """(demand, host, class) of the winning choice: per group that has the bridges, one
        search for each distinct demand of the classes it offers; on the host found, the
        class that orders first."""
        searches: Iterable[tuple[tuple[int, ...], Callable[[Demand], tuple[int, int, str] | None]]]
        if named is not None:
            searches = ((named.class_ids, named.best_fit),)
        else:
            searches = ((group.class_ids, group.best_fit) for group in self._groups.values()
                        if bridges <= group.bridges)
        best: tuple[bool, DensestFirst, bool, int, str, str] | None = None
        winner: tuple[Demand, HostView, int] | None = None
        for class_ids, best_fit in searches:
            for need, classes in wanting.items():
                offering = [c for c in classes if c in class_ids]
                if not offering:
                    continue
                hit = best_fit(need)
                if hit is None:
                    continue
                class_id = min(offering, key=order.__getitem__)
                ignores, simulated, rank, name = order[class_id]
                host = self._hosts[hit[2]].view
                key = (ignores, DensestFirst(host, hit[0], hit[1], need), simulated, rank,
                       host.host_id, name)
                if best is None or key < best:
                    best, winner = key, (need, host, class_id)
        return winner

    def _roomiest(self, class_ids: list[int], named: _Entry | None,
                  bridges: frozenset[str]) -> Room | None:
        if not class_ids:
            return None
        if named is not None:
            return Room(named.view.host_id, *named.free)
        wanted = set(class_ids)
        best: tuple[int, int, str] | None = None
        for group in self._groups.values():
            if wanted.isdisjoint(group.class_ids) or not bridges <= group.bridges:
                continue
            top = group.roomiest()
            if top is not None and (best is None or top[:2] > best[:2]
                                    or (top[:2] == best[:2] and top[2] < best[2])):
                best = top
        return Room(best[2], best[1], best[0]) if best else None
