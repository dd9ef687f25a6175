"""Fleet networks and the addresses their NICs hold, mirrored from etcd.

Keys (under the store's prefix):
    networks/<name>            vmm.v1.Network as defined (output fields cleared)
    addresses/<name>/<ip>      "<vm_id>/<nic_id>": the NIC holding that address

An address is taken by a transaction that creates its key only if it is absent and only
while the network exists, so two replicas can never hand out the same address: the loser's
compare fails and it tries the next free one. Each replica picks from memory (the mirrored
keys plus its own commits in flight), starting at a random place, so concurrent replicas
seldom even collide. A VM's addresses are deleted in the transaction that deletes the VM
(`Store.delete_vm`).

An address is taken before its VM (or its hot-added NIC) is stored: a controller killed in
between leaves it taken by nobody. Each replica notes the addresses whose NIC is on no VM
it knows; one still on none after ORPHAN_GRACE is left behind, and the leader gives it back
(`reclaim_left_behind`), with a compare that neither the address nor the VM changed since.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import re
import time
from collections.abc import Callable, Iterable

from controller.errors import Violation
from controller.etcd import Compare, GetResult, KeyValue, Op
from controller.etcd.mirror import PrefixMirror
from controller.store import Store
from controller.vm_cache import VmCache
from vmm.v1 import network_pb2, vm_pb2

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
BRIDGE_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
# Candidates tried before giving up on a network that keeps changing under us.
MAX_ALLOCATION_ATTEMPTS = 64
# Seconds an address may be held for a NIC no stored VM has before it counts as left behind:
# far longer than a create or a hot-add takes from taking it to storing the VM.
ORPHAN_GRACE = 120.0
# Left-behind addresses given back per housekeeping pass.
RECLAIM_BATCH = 64


class NetworkFull(Exception):
    """No address of the network is free."""


def check_network(network: network_pb2.Network, prefix: str = "network") -> list[Violation]:
    out: list[Violation] = []
    if not NAME_PATTERN.match(network.name):
        out.append(Violation(f"{prefix}.name", f"{network.name!r} must be 1-63 lower-case "
                                                "letters, digits or '-', not starting or "
                                                "ending with '-'"))
    if not BRIDGE_PATTERN.match(network.bridge):
        out.append(Violation(f"{prefix}.bridge", f"{network.bridge!r} is not a Linux "
                                                  "interface name (1-15 characters)"))
    try:
        subnet = ipaddress.IPv4Network(network.cidr, strict=True)
    except ValueError as e:
        out.append(Violation(f"{prefix}.cidr", f"{network.cidr!r} is not an IPv4 subnet: {e}"))
        subnet = None
    if subnet is not None and subnet.num_addresses < 4:
        out.append(Violation(f"{prefix}.cidr", "needs room for two hosts at least (/30)"))
    if network.gateway:
        try:
            gateway = ipaddress.IPv4Address(network.gateway)
        except ValueError:
            out.append(Violation(f"{prefix}.gateway",
                                 f"{network.gateway!r} is not an IPv4 address"))
        else:
            if subnet is not None and (gateway not in subnet or gateway in (
                    subnet.network_address, subnet.broadcast_address)):
                out.append(Violation(f"{prefix}.gateway",
                                     f"{gateway} is not a host address of {subnet}"))
    if not 0 <= network.mtu <= 65535 or 0 < network.mtu < 68:
        out.append(Violation(f"{prefix}.mtu", "must be 0 (the bridge's) or 68-65535"))
    if not 0 <= network.vlan <= 4094:
        out.append(Violation(f"{prefix}.vlan", "must be 0 (none) or 1-4094"))
    return out


class Networks:
    """This replica's view of the fleet's networks and their taken addresses."""

    def __init__(self, store: Store, cache: VmCache | None = None,
                 orphan_grace: float = ORPHAN_GRACE,
                 on_bridges: Callable[[frozenset[str]], None] | None = None) -> None:
        self.store = store
        # Told the networks' bridges whenever they change (the scheduler groups by them).
        self.on_bridges = on_bridges
        # The VMs, to tell an address in use from one left behind; None tracks nothing.
        self.cache = cache
        self.orphan_grace = orphan_grace
        # Address keys (network/ip) held for a NIC on no VM known here: owner, mod_revision
        # and when first seen, oldest first; and those still so after the grace.
        self._unconfirmed: dict[str, tuple[str, int, float]] = {}
        self.left_behind: dict[str, tuple[str, int]] = {}
        self.etcd = store.etcd
        self.prefix = store.prefix + "networks/"
        self.networks: dict[str, network_pb2.Network] = {}
        # Network -> taken addresses (as integers), from etcd and this replica's commits.
        self.taken: dict[str, set[int]] = {}
        self._cursor: dict[str, int] = {}
        self._mirrors = [
            PrefixMirror(self.etcd, self.prefix, on_put=self._network_put,
                         on_delete=self._network_deleted),
            PrefixMirror(self.etcd, store.address_prefix, on_put=self._address_put,
                         on_delete=self._address_deleted)]

    async def start(self) -> None:
        for mirror in self._mirrors:
            await mirror.start()
        self._tell_bridges()  # no network at all is news too: no bridge to group hosts by

    async def stop(self) -> None:
        for mirror in self._mirrors:
            await mirror.stop()

    # ---- the mirror ---------------------------------------------------------------

    def _network_put(self, name: str, kv: KeyValue) -> None:
        self.networks[name] = network_pb2.Network.FromString(kv.value)
        self.taken.setdefault(name, set())
        self._tell_bridges()

    def _network_deleted(self, name: str) -> None:
        self.networks.pop(name, None)
        self._tell_bridges()

    def _tell_bridges(self) -> None:
        if self.on_bridges is not None:
            self.on_bridges(frozenset(n.bridge for n in self.networks.values()))

    @staticmethod
    def _split(key: str) -> tuple[str, int] | None:
        name, _, ip = key.partition("/")
        try:
            return name, int(ipaddress.IPv4Address(ip))
        except ValueError:
            return None

    def _address_put(self, key: str, kv: KeyValue) -> None:
        parsed = self._split(key)
        if parsed:
            self.taken.setdefault(parsed[0], set()).add(parsed[1])
        self._unconfirmed.pop(key, None)
        self.left_behind.pop(key, None)
        owner = kv.value.decode(errors="replace")
        if self.cache is not None and not self._held(key, owner):
            self._unconfirmed[key] = (owner, kv.mod_revision, time.monotonic())

    def _address_deleted(self, key: str) -> None:
        parsed = self._split(key)
        if parsed:
            self.taken.get(parsed[0], set()).discard(parsed[1])
        self._unconfirmed.pop(key, None)
        self.left_behind.pop(key, None)

    # ---- addresses left behind ------------------------------------------------------

    def _held(self, key: str, owner: str) -> bool:
        """Whether one of the owner's VM's NICs has this address, as the cache knows it."""
        assert self.cache is not None
        stored = self.cache.get(owner.partition("/")[0])
        name, _, ip = key.partition("/")
        return stored is not None and any(
            nic.network == name and nic.ip_address.split("/")[0] == ip
            for nic in stored.record.config.network)

    def prune(self) -> None:
        """Forget the noted addresses their VM now holds; those past the grace that none
        holds are left behind."""
        if self.cache is None:
            return
        now = time.monotonic()
        while self._unconfirmed:
            key, (owner, revision, seen) = next(iter(self._unconfirmed.items()))
            if now - seen < self.orphan_grace:
                return
            del self._unconfirmed[key]
            if not self._held(key, owner):
                self.left_behind[key] = (owner, revision)

    async def reclaim_left_behind(self) -> int:
        """Give back addresses left behind, a batch at a time (the leader's housekeeping).
        Each goes only if neither it nor its owner's VM record changed since it was judged."""
        assert self.cache is not None
        reclaimed = 0
        for key, (owner, revision) in list(self.left_behind.items())[:RECLAIM_BATCH]:
            del self.left_behind[key]
            vm_id = owner.partition("/")[0]
            if self._held(key, owner):
                continue
            stored = self.cache.get(vm_id)
            vm_key = self.store.vm_key(vm_id)
            address_key = self.store.address_prefix + key
            result = await self.etcd.txn(
                compares=[Compare.mod_revision(address_key) == revision,
                          Compare.absent(vm_key) if stored is None
                          else Compare.mod_revision(vm_key) == stored.revision],
                success=[Op.delete(address_key)], failure=[])
            if result.succeeded:
                reclaimed += 1
                self._address_deleted(key)
                log.info("gave back address %s: held for %s, which no VM has", key, owner)
            elif self.cache.get(vm_id) is not None:
                # The VM changed meanwhile: judge the address again after another grace.
                self._unconfirmed[key] = (owner, revision, time.monotonic())
        return reclaimed

    # ---- networks -----------------------------------------------------------------

    def get(self, name: str) -> network_pb2.Network | None:
        return self.networks.get(name)

    def describe(self, network: network_pb2.Network, host_count: int = 0
                 ) -> network_pb2.Network:
        """The network with what this replica counts of it: addresses held, and (given)
        hosts that have its bridge."""
        out = network_pb2.Network()
        out.CopyFrom(network)
        out.allocated_addresses = len(self.taken.get(network.name, ()))
        out.host_count = host_count
        return out

    async def create(self, network: network_pb2.Network) -> bool:
        """Store a new network; False when one of that name exists."""
        stored = network_pb2.Network()
        stored.CopyFrom(network)
        stored.ClearField("allocated_addresses")
        stored.ClearField("host_count")
        key = self.prefix + network.name
        result = await self.etcd.txn(compares=[Compare.absent(key)],
                                     success=[Op.put(key, stored.SerializeToString())],
                                     failure=[])
        if result.succeeded:
            self._network_put(network.name, KeyValue(key, stored.SerializeToString(),
                                                     result.revision, result.revision, 1, 0))
        return result.succeeded

    async def delete(self, name: str) -> None:
        await self.etcd.delete(self.prefix + name)
        self._network_deleted(name)

    # ---- addresses ----------------------------------------------------------------

    def _candidates(self, name: str, subnet: ipaddress.IPv4Network,
                    reserved: set[int]) -> Iterable[int]:
        """Free host addresses from this replica's cursor on, wrapping once."""
        first, last = int(subnet.network_address) + 1, int(subnet.broadcast_address) - 1
        size = last - first + 1
        start = self._cursor.setdefault(name, random.randrange(size))
        taken = self.taken.setdefault(name, set())
        for step in range(size):
            offset = (start + step) % size
            value = first + offset
            if value not in taken and value not in reserved:
                self._cursor[name] = (offset + 1) % size
                yield value

    async def allocate(self, name: str, owner: str) -> ipaddress.IPv4Interface:
        """Take a free address of the network for owner ("<vm_id>/<nic_id>")."""
        self.prune()
        network = self.networks[name]
        subnet = ipaddress.IPv4Network(network.cidr)
        reserved = {int(ipaddress.IPv4Address(network.gateway))} if network.gateway else set()
        network_key = self.prefix + name
        for attempt, value in enumerate(self._candidates(name, subnet, reserved)):
            if attempt >= MAX_ALLOCATION_ATTEMPTS:
                break
            address = ipaddress.IPv4Address(value)
            key = self.store.address_key(name, str(address))
            # Taken at once, so concurrent allocations here never try the same one.
            self.taken[name].add(value)
            try:
                result = await self.etcd.txn(
                    compares=[Compare.absent(key), Compare.version(network_key) > 0],
                    success=[Op.put(key, owner.encode())], failure=[Op.get(network_key)])
            except BaseException:
                self.taken[name].discard(value)
                raise
            if result.succeeded:
                return ipaddress.IPv4Interface(f"{address}/{subnet.prefixlen}")
            found = result.responses[0] if result.responses else None
            if not (isinstance(found, GetResult) and found.kvs):
                self.taken[name].discard(value)
                raise KeyError(name)  # the network was deleted meanwhile
        raise NetworkFull(f"network {name} ({network.cidr}) has no free address")

    async def release(self, nics: Iterable[vm_pb2.NetworkInterface]) -> None:
        """Give back addresses taken for NICs that were never stored with a VM."""
        ops = []
        for nic in nics:
            if nic.network and nic.ip_address:
                ip = nic.ip_address.split("/")[0]
                ops.append(Op.delete(self.store.address_key(nic.network, ip)))
                parsed = self._split(f"{nic.network}/{ip}")
                if parsed:
                    self.taken.get(parsed[0], set()).discard(parsed[1])
        if ops:
            await self.etcd.txn(compares=[], success=ops, failure=[])

    async def attach(self, vm_id: str, config: vm_pb2.VmConfig,
                     field_prefix: str = "config.network") -> list[Violation]:
        """Fill in each network NIC of config (bridge, MTU, VLAN, gateway) and give it an
        address. On violations nothing stays allocated."""
        violations: list[Violation] = []
        taken: list[vm_pb2.NetworkInterface] = []
        try:
            for i, nic in enumerate(config.network):
                if not nic.network:
                    continue
                violation = await self.attach_nic(vm_id, nic, f"eth{i}",
                                                  f"{field_prefix}[{i}].network")
                if violation:
                    violations.append(violation)
                else:
                    taken.append(nic)
        except BaseException:
            await self.release(taken)
            raise
        if violations:
            await self.release(taken)
        return violations

    async def attach_nic(self, vm_id: str, nic: vm_pb2.NetworkInterface, default_id: str,
                         field: str) -> Violation | None:
        network = self.networks.get(nic.network)
        if network is None:
            return Violation(field, f"no network named {nic.network!r}")
        try:
            address = await self.allocate(nic.network, f"{vm_id}/{nic.id or default_id}")
        except KeyError:
            return Violation(field, f"no network named {nic.network!r}")
        except NetworkFull as e:
            return Violation(field, str(e))
        nic.bridge = network.bridge
        nic.mtu = network.mtu
        nic.vlan = network.vlan
        nic.gateway = network.gateway
        nic.ip_address = str(address)
        return None
