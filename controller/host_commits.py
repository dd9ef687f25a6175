"""This replica's placements, committed per host in order and in batches.

A placement decided in memory waits here for its host's turn. While one transaction for a
host is in flight, later placements on that host queue up and go together in the next one,
each checked against the allocation the previous one left. No decision waits for another
host's commit, and the transaction's revision compare still guards against other replicas.
A VM of a namespace with a quota is checked against the namespace's usage, read when its
batch is committed and compared in the same transaction (controller.quotas).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from controller.access import Quota
from controller.batches import KeyedBatches
from controller.errors import ApiError
from controller.fleet import Fleet
from controller.quotas import counted_from_cache, over_quota, plus
from controller.scheduler import Demand
from controller.store import Store, StoredAllocation, StoredVm
from controller.vm_cache import VmCache, namespace_of
from vmm.store.v1 import records_pb2
from vmm.v1 import host_pb2

log = logging.getLogger(__name__)

# VMs per transaction: etcd refuses more than 128 operations in one branch by default.
MAX_BATCH = 64


@dataclass
class _Pending:
    record: records_pb2.VmRecord
    demand: Demand
    # The stored VM; None when the host's room went elsewhere (decide again).
    done: asyncio.Future[StoredVm | None]


class HostCommits:
    def __init__(self, store: Store, fleet: Fleet, cache: VmCache,
                 quota_of: Callable[[str], Quota | None]) -> None:
        self.store = store
        self.fleet = fleet
        self.cache = cache
        self.quota_of = quota_of
        self._batches: KeyedBatches[_Pending] = KeyedBatches(self._commit_batch, MAX_BATCH)

    async def commit(self, record: records_pb2.VmRecord, demand: Demand) -> StoredVm | None:
        """Store the VM on record.host_id with demand added to the host's allocation."""
        pending = _Pending(record, demand, asyncio.get_running_loop().create_future())
        self._batches.submit(record.host_id, pending)
        return await asyncio.shield(pending.done)

    async def _usage(self, batch: list[_Pending]) -> dict[str, tuple[Quota, StoredAllocation]]:
        """The quota and current usage of each namespace of the batch that has a quota."""
        found: dict[str, tuple[Quota, StoredAllocation]] = {}
        for namespace in {namespace_of(p.record) for p in batch}:
            quota = self.quota_of(namespace)
            if quota is not None:
                usage = await self.store.get_usage(namespace)
                found[namespace] = (quota, usage or counted_from_cache(self.cache, namespace))
        return found

    async def _commit_batch(self, host_id: str, batch: list[_Pending]) -> None:
        usage = await self._usage(batch)
        running = {ns: stored.allocation for ns, (_, stored) in usage.items()}
        base = self.fleet.allocation(host_id)
        view = self.fleet.index.get(host_id)
        allocated = base.allocation.allocated
        vcpus, memory = allocated.vcpus, allocated.memory_bytes
        taken: list[_Pending] = []
        # Two creates of one id (a client's retry racing its first try) cannot share a
        # transaction: the second waits for the next, where it finds the first's VM.
        ids: set[str] = set()
        later: list[_Pending] = []
        for pending in batch:
            if pending.record.vm_id in ids:
                later.append(pending)
                continue
            fits = view is not None and (vcpus + pending.demand.vcpus <= view.allocatable_vcpus
                                         and memory + pending.demand.memory
                                         <= view.allocatable_memory)
            if not fits:
                pending.done.set_result(None)  # another replica's VMs took the room
                continue
            namespace = namespace_of(pending.record)
            if namespace in usage:
                reserved = pending.record.reserved
                refusal = over_quota(namespace, usage[namespace][0], running[namespace],
                                     reserved)
                if refusal is not None:
                    pending.done.set_exception(refusal)
                    continue
                running[namespace] = plus(running[namespace], reserved)
            vcpus += pending.demand.vcpus
            memory += pending.demand.memory
            taken.append(pending)
            ids.add(pending.record.vm_id)
        if later:
            self._batches.requeue(host_id, later)
        if not taken:
            return
        new_allocation = records_pb2.Allocation(
            allocated=host_pb2.Resources(vcpus=vcpus, memory_bytes=memory),
            vm_count=base.allocation.vm_count + len(taken))
        changed = {namespace_of(p.record) for p in taken} & set(usage)
        result = await self.store.create_vms(
            host_id, [p.record for p in taken], base, new_allocation,
            {ns: (usage[ns][1], running[ns]) for ns in changed})
        self.fleet.note_allocation(host_id, result.allocation)
        for pending in taken:
            if result.created:
                pending.done.set_result(StoredVm(pending.record, result.revision))
            elif pending.record.vm_id in result.existing:
                pending.done.set_exception(ApiError(
                    grpc.StatusCode.ALREADY_EXISTS, f"vm {pending.record.vm_id!r} already exists"))
            else:
                pending.done.set_result(None)
        if len(taken) > 1:
            log.debug("committed %d VMs on host %s in one transaction", len(taken), host_id)
