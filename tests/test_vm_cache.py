"""The controller's VM cache on a real etcd: an agent's report is seen before its write is
durable, and never outlives a failed write or hides a newer record."""

from __future__ import annotations

import asyncio

from controller.etcd import EtcdClient
from controller.store import Store, StoredVm
from controller.vm_cache import VmCache
from vmm.store.v1 import records_pb2
from vmm.v1 import vm_pb2


async def stored_vm(store: Store, vm_id: str) -> StoredVm:
    record = records_pb2.VmRecord(vm_id=vm_id, host_id="h1", generation=1)
    await store.etcd.put(store.vm_key(vm_id), record.SerializeToString())
    got = await store.get_vm(vm_id)
    assert got is not None
    return got


def with_state(stored: StoredVm, state: vm_pb2.VmState.ValueType,
               revision: int | None = None) -> StoredVm:
    record = records_pb2.VmRecord()
    record.CopyFrom(stored.record)
    record.status.state = state
    record.status.observed_generation = record.generation
    return StoredVm(record, stored.revision if revision is None else revision)


async def started_cache(store: Store) -> VmCache:
    cache = VmCache(store)
    await cache.start()
    return cache


async def test_a_report_wakes_waiters_before_its_write(etcd_client: EtcdClient) -> None:
    store = Store(etcd_client)
    durable = await stored_vm(store, "r1")
    cache = await started_cache(store)
    try:
        waiter = asyncio.create_task(cache.wait_for(
            "r1", lambda s: s is not None and s.record.status.state == vm_pb2.VM_STATE_RUNNING,
            timeout=10))
        await asyncio.sleep(0)
        reported = with_state(durable, vm_pb2.VM_STATE_RUNNING)
        cache.note_report(reported)
        woke = await waiter
        assert woke is reported
        # Nothing was written: etcd still holds the record as it was.
        in_etcd = await store.get_vm("r1")
        assert in_etcd is not None and in_etcd.record.status.state == vm_pb2.VM_STATE_UNSPECIFIED
    finally:
        await cache.stop()


async def test_a_failed_write_takes_the_report_back(etcd_client: EtcdClient) -> None:
    store = Store(etcd_client)
    durable = await stored_vm(store, "r2")
    cache = await started_cache(store)
    try:
        reported = with_state(durable, vm_pb2.VM_STATE_RUNNING)
        cache.note_report(reported)
        cache.forget_report(reported, durable)
        assert cache.get("r2") is durable
    finally:
        await cache.stop()


async def test_a_report_never_hides_a_newer_record(etcd_client: EtcdClient) -> None:
    store = Store(etcd_client)
    old = await stored_vm(store, "r3")
    cache = await started_cache(store)
    try:
        def bump(r: records_pb2.VmRecord) -> None:
            r.generation += 1

        newer = await store.mutate_vm("r3", bump)
        assert newer is not None
        cache.note_write(newer)
        # A report built on the old revision arrives late: the cache keeps the newer record.
        cache.note_report(with_state(old, vm_pb2.VM_STATE_RUNNING))
        current = cache.get("r3")
        assert current is not None and current.revision == newer.revision
        assert current.record.generation == 2
        # And the durable write of a report replaces the report itself.
        reported = with_state(newer, vm_pb2.VM_STATE_RUNNING)
        cache.note_report(reported)
        written = await store.mutate_vm(
            "r3", lambda r: r.status.CopyFrom(reported.record.status), known=newer)
        assert written is not None
        cache.note_write(written)
        final = cache.get("r3")
        assert final is not None and final.revision == written.revision
        assert final.record.status.state == vm_pb2.VM_STATE_RUNNING
    finally:
        await cache.stop()
