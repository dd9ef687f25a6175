"""The fleet's durable state in etcd: key layout and the transactions that change it.

Keys (under a configurable prefix, "/vmm/" by default):
    vms/<vm_id>          VmRecord: desired state, placement, last observed status
    hosts/<host_id>      HostRecord: what the agent registered
    allocations/<host>   Allocation: resources held by the VMs placed on the host
    networks/<name>      a fleet network (controller.networks)
    addresses/<net>/<ip> the NIC holding a fleet network's address (controller.networks);
                         deleted with its VM
    alive/<host_id>      empty value on the lease of the controller replica the host's agent
                         is connected to (one lease per replica); present while connected
    usage/<namespace>    Allocation: resources held by the VMs of a namespace with a quota;
                         creates there compare it, deletes give back to it

Every write that can race compares a revision: nothing is last-writer-wins by accident.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from controller.access import DEFAULT_NAMESPACE
from controller.etcd import Compare, EtcdClient, GetResult, KeyValue, Op
from vmm.common import failpoints
from vmm.store.v1 import records_pb2
from vmm.v1 import host_pb2

# How often a read-modify-write is retried when another writer got there first.
MAX_CAS_ATTEMPTS = 50


class ConflictError(Exception):
    """A compare-and-swap kept losing to other writers."""


@dataclass(frozen=True)
class StoredVm:
    record: records_pb2.VmRecord
    revision: int


@dataclass(frozen=True)
class StoredAllocation:
    allocation: records_pb2.Allocation
    # mod_revision of the key; 0 when the host has no allocation yet.
    revision: int


@dataclass(frozen=True)
class CreateResult:
    created: bool
    # The revision of the transaction (the new VMs' mod_revision when created).
    revision: int
    # The host's allocation after it: the new one when created, else the current one.
    allocation: StoredAllocation
    # When not created: the VMs that exist already.
    existing: set[str] = field(default_factory=set)
    # When not created: whether a namespace's usage changed since it was read.
    usage_changed: bool = False


def now() -> int:
    return int(time.time())


def released(held: records_pb2.Allocation,
             reserved: host_pb2.Resources) -> records_pb2.Allocation:
    """An allocation (or usage) after one VM holding `reserved` is gone."""
    return records_pb2.Allocation(
        allocated=host_pb2.Resources(
            vcpus=max(0, held.allocated.vcpus - reserved.vcpus),
            memory_bytes=max(0, held.allocated.memory_bytes - reserved.memory_bytes)),
        vm_count=max(0, held.vm_count - 1))


class Store:
    def __init__(self, etcd: EtcdClient, prefix: str = "/vmm/") -> None:
        self.etcd = etcd
        self.prefix = prefix.rstrip("/") + "/"
        self.vm_prefix = self.prefix + "vms/"
        self.host_prefix = self.prefix + "hosts/"
        self.alloc_prefix = self.prefix + "allocations/"
        self.alive_prefix = self.prefix + "alive/"
        self.address_prefix = self.prefix + "addresses/"
        self.usage_prefix = self.prefix + "usage/"

    def vm_key(self, vm_id: str) -> str:
        return self.vm_prefix + vm_id

    def alloc_key(self, host_id: str) -> str:
        return self.alloc_prefix + host_id

    def address_key(self, network: str, ip: str) -> str:
        return f"{self.address_prefix}{network}/{ip}"

    def address_keys(self, record: records_pb2.VmRecord) -> list[str]:
        """The address keys the VM's NICs hold (see controller.networks)."""
        return [self.address_key(nic.network, nic.ip_address.split("/")[0])
                for nic in record.config.network if nic.network and nic.ip_address]

    # ---- VMs ----------------------------------------------------------------------

    @staticmethod
    def decode_vm(kv: KeyValue) -> StoredVm:
        return StoredVm(records_pb2.VmRecord.FromString(kv.value), kv.mod_revision)

    async def get_vm(self, vm_id: str) -> StoredVm | None:
        kv = await self.etcd.get(self.vm_key(vm_id))
        return self.decode_vm(kv) if kv else None

    async def list_vms(self) -> tuple[list[StoredVm], int]:
        kvs, revision = await self.etcd.get_prefix(self.vm_prefix)
        return [self.decode_vm(kv) for kv in kvs], revision

    async def create_vms(self, host_id: str, records: list[records_pb2.VmRecord],
                         allocation: StoredAllocation,
                         new_allocation: records_pb2.Allocation,
                         usage: dict[str, tuple[StoredAllocation, records_pb2.Allocation]]
                         | None = None) -> CreateResult:
        """Store new VMs on one host and the host's new allocation atomically, if none of the
        VMs exists yet and the allocation is still the one the decisions were made on; with
        `usage`, also each namespace's new usage, if it is still the one read."""
        alloc_key = self.alloc_key(host_id)
        vm_keys = [self.vm_key(r.vm_id) for r in records]
        usage = usage or {}
        usage_keys = {self.usage_key(ns): pair for ns, pair in usage.items()}
        result = await self.etcd.txn(
            compares=[Compare.mod_revision(alloc_key) == allocation.revision,
                      *(Compare.create_revision(key) == 0 for key in vm_keys),
                      *(Compare.mod_revision(key) == old.revision
                        for key, (old, _) in usage_keys.items())],
            success=[Op.put(alloc_key, new_allocation.SerializeToString()),
                     *(Op.put(key, r.SerializeToString()) for key, r in zip(vm_keys, records,
                                                                           strict=True)),
                     *(Op.put(key, new.SerializeToString())
                       for key, (_, new) in usage_keys.items())],
            failure=[Op.get(alloc_key), *(Op.get(key) for key in vm_keys),
                     *(Op.get(key) for key in usage_keys)],
        )
        if result.succeeded:
            return CreateResult(True, result.revision,
                                StoredAllocation(new_allocation, result.revision))
        found = [r.kvs[0] if isinstance(r, GetResult) and r.kvs else None
                 for r in result.responses]
        current = found[0]
        usage_found = found[1 + len(vm_keys):]
        usage_changed = any((kv.mod_revision if kv else 0) != old.revision
                            for kv, (old, _) in zip(usage_found, usage_keys.values(),
                                                    strict=True))
        return CreateResult(
            False, result.revision,
            StoredAllocation(records_pb2.Allocation.FromString(current.value),
                             current.mod_revision) if current else StoredAllocation(
                records_pb2.Allocation(allocated=host_pb2.Resources()), 0),
            existing={r.vm_id for r, kv in zip(records, found[1:1 + len(vm_keys)], strict=True)
                      if kv},
            usage_changed=usage_changed)

    async def mutate_vm(self, vm_id: str,
                        change: Callable[[records_pb2.VmRecord], bool | None],
                        known: StoredVm | None = None,
                        also: Sequence[Op] = ()) -> StoredVm | None:
        """Read-modify-write a VM record with CAS on its mod_revision.

        `change` edits the record in place; returning False means "no write needed".
        `known` (a cached copy) saves the first read: if it is stale, the compare fails and
        the failed transaction brings the current record back. `also` are writes that commit
        with the change, and only with it. Returns the stored result, or None when the VM
        does not exist.
        """
        key = self.vm_key(vm_id)
        current = known if known is not None else await self.get_vm(vm_id)
        for _ in range(MAX_CAS_ATTEMPTS):
            if current is None:
                return None
            record = records_pb2.VmRecord()
            record.CopyFrom(current.record)
            if change(record) is False:
                return current
            record.modified_timestamp = now()
            result = await self.etcd.txn(
                compares=[Compare.mod_revision(key) == current.revision],
                success=[Op.put(key, record.SerializeToString()), *also],
                failure=[Op.get(key)],
            )
            if result.succeeded:
                return StoredVm(record, result.revision)
            found = result.responses[0] if result.responses else None
            current = (self.decode_vm(found.kvs[0])
                       if isinstance(found, GetResult) and found.kvs else None)
        raise ConflictError(f"vm {vm_id!r} kept changing under concurrent writers")

    async def update_vms(self, updates: list[tuple[StoredVm, records_pb2.VmRecord]]
                         ) -> int | None:
        """Write new records of several VMs in one transaction, if every one is still at the
        revision it was read at: the revision written, or None when one of them changed."""
        stamp = now()
        for _, record in updates:
            record.modified_timestamp = stamp
        result = await self.etcd.txn(
            compares=[Compare.mod_revision(self.vm_key(old.record.vm_id)) == old.revision
                      for old, _ in updates],
            success=[Op.put(self.vm_key(record.vm_id), record.SerializeToString())
                     for _, record in updates],
            failure=[])
        return result.revision if result.succeeded else None

    async def delete_vm(self, vm_id: str, expected: StoredVm | None = None) -> bool:
        """Delete a VM record and give its resources back to its host, atomically."""
        for _ in range(MAX_CAS_ATTEMPTS):
            current = await self.get_vm(vm_id)
            if current is None:
                return False
            if expected is not None and current.revision != expected.revision:
                return False
            rec = current.record
            alloc = await self.get_allocation(rec.host_id)
            usage_key = self.usage_key(rec.namespace or DEFAULT_NAMESPACE)
            usage = await self.get_usage(rec.namespace or DEFAULT_NAMESPACE)
            key, alloc_key = self.vm_key(vm_id), self.alloc_key(rec.host_id)
            ops = [Op.delete(key), Op.put(alloc_key, released(alloc.allocation, rec.reserved)
                                          .SerializeToString()),
                   *(Op.delete(k) for k in self.address_keys(rec))]
            if usage is not None:
                ops.append(Op.put(usage_key, released(usage.allocation, rec.reserved)
                                  .SerializeToString()))
            result = await self.etcd.txn(
                compares=[Compare.mod_revision(key) == current.revision,
                          Compare.mod_revision(alloc_key) == alloc.revision,
                          # A namespace's usage, when it has one, gives the VM back too.
                          Compare.mod_revision(usage_key) == (usage.revision if usage else 0)],
                success=ops, failure=[],
            )
            if result.succeeded:
                failpoints.hit("controller.vm.deleted", vm_id)
                return True
        raise ConflictError(f"deleting vm {vm_id!r} kept racing other writers")

    # ---- namespace usage -----------------------------------------------------------

    def usage_key(self, namespace: str) -> str:
        return self.usage_prefix + namespace

    async def get_usage(self, namespace: str) -> StoredAllocation | None:
        """What the VMs of a namespace with a quota hold; None when it is not counted."""
        kv = await self.etcd.get(self.usage_key(namespace))
        if kv is None:
            return None
        return StoredAllocation(records_pb2.Allocation.FromString(kv.value), kv.mod_revision)

    async def counted_namespaces(self) -> set[str]:
        kvs, _ = await self.etcd.get_prefix(self.usage_prefix)
        return {kv.key.removeprefix(self.usage_prefix) for kv in kvs}

    async def forget_usage(self, namespace: str) -> None:
        """Stop counting a namespace (its quota was removed)."""
        await self.etcd.delete(self.usage_key(namespace))

    # ---- hosts and allocations ----------------------------------------------------

    async def put_host(self, record: records_pb2.HostRecord) -> None:
        await self.etcd.put(self.host_prefix + record.host_id, record.SerializeToString())

    async def get_host(self, host_id: str) -> records_pb2.HostRecord | None:
        kv = await self.etcd.get(self.host_prefix + host_id)
        return records_pb2.HostRecord.FromString(kv.value) if kv else None

    async def list_hosts(self) -> list[records_pb2.HostRecord]:
        kvs, _ = await self.etcd.get_prefix(self.host_prefix)
        return [records_pb2.HostRecord.FromString(kv.value) for kv in kvs]

    async def get_allocation(self, host_id: str) -> StoredAllocation:
        kv = await self.etcd.get(self.alloc_key(host_id))
        if kv is None:
            return StoredAllocation(records_pb2.Allocation(allocated=host_pb2.Resources()), 0)
        return StoredAllocation(records_pb2.Allocation.FromString(kv.value), kv.mod_revision)

    async def list_allocations(self) -> dict[str, StoredAllocation]:
        kvs, _ = await self.etcd.get_prefix(self.alloc_prefix)
        return {
            kv.key.removeprefix(self.alloc_prefix):
                StoredAllocation(records_pb2.Allocation.FromString(kv.value), kv.mod_revision)
            for kv in kvs
        }

    def alive_key(self, host_id: str) -> str:
        return self.alive_prefix + host_id

    async def mark_alive(self, host_id: str, lease: int,
                         record: records_pb2.HostRecord | None = None) -> int:
        """Put the host's alive key on `lease` (and its record, when given) in one write.

        The newest registration wins: the key moves to this lease from whichever lease
        held it. Returns the revision of the write; raises LeaseNotFound when the lease
        is gone.
        """
        ops = [Op.put(self.alive_key(host_id), b"", lease)]
        if record is not None:
            ops.append(Op.put(self.host_prefix + record.host_id, record.SerializeToString()))
        result = await self.etcd.txn(compares=[], success=ops, failure=[])
        return result.revision

    async def restore_alive(self, host_id: str, lease: int) -> int | None:
        """Put the alive key on `lease` unless the key exists (another replica holds the
        host now). For a replica whose lease was lost: the revision of the write, or None
        when the key was there."""
        key = self.alive_key(host_id)
        result = await self.etcd.txn(compares=[Compare.absent(key)],
                                     success=[Op.put(key, b"", lease)], failure=[])
        return result.revision if result.succeeded else None

    async def clear_alive(self, host_id: str, revision: int) -> bool:
        """Delete the alive key if it is still the one written at `revision`: a host that
        has registered again meanwhile (with this replica or another) keeps its key."""
        key = self.alive_key(host_id)
        result = await self.etcd.txn(compares=[Compare.mod_revision(key) == revision],
                                     success=[Op.delete(key)], failure=[])
        return result.succeeded

    async def alive_hosts(self) -> set[str]:
        kvs, _ = await self.etcd.get_prefix(self.alive_prefix)
        return {kv.key.removeprefix(self.alive_prefix) for kv in kvs}
