"""The VM cache against a real etcd: a replica's own write that its watch has already seen
deleted never brings the VM back; an agent's report shows while its write is in flight and
is gone again should that write fail."""

from __future__ import annotations

import asyncio

from controller.etcd import EtcdClient
from controller.store import CreateResult, Store
from controller.vm_cache import VmCache
from vmm.agent.v1 import agent_pb2
from vmm.store.v1 import records_pb2
from vmm.v1 import host_pb2, vm_pb2


async def create_one(store: Store, vm_id: str) -> CreateResult:
    """A VM of one vCPU on host h1, committed as a placement commits it."""
    record = records_pb2.VmRecord(vm_id=vm_id, host_id="h1", generation=1,
                                  reserved=host_pb2.Resources(vcpus=1))
    created = await store.create_vms("h1", [record], await store.get_allocation("h1"),
                                     records_pb2.Allocation(vm_count=1))
    assert created.created
    return created


async def test_a_write_overtaken_by_the_deletion_does_not_resurrect_the_vm(
        etcd_client: EtcdClient) -> None:
    store = Store(etcd_client)
    cache = VmCache(store)
    await cache.start()
    try:
        await create_one(store, "vm-1")

        def bump(r: records_pb2.VmRecord) -> None:
            r.generation += 1

        written = await store.mutate_vm("vm-1", bump)
        assert written is not None
        # The watch has brought the write (else "gone" below could mean "not seen yet").
        await cache.wait_for("vm-1", lambda s: s is not None and s.revision >= written.revision,
                             10)
        # Another replica deletes the VM; this replica's watch applies the deletion ...
        assert await store.delete_vm("vm-1")
        await cache.wait_for("vm-1", lambda s: s is None, 10)
        # ... before this replica notes its own, earlier write.
        cache.note_write(written)
        assert cache.get("vm-1") is None
        assert cache.on_host("h1") == []
        # A VM created again under that id is seen.
        again = await create_one(store, "vm-1")
        seen = await cache.wait_for("vm-1", lambda s: s is not None, 10)
        assert seen is not None and seen.revision == again.revision
    finally:
        await cache.stop()


async def test_a_report_shows_before_its_write_and_only_until_the_write_is_over(
        etcd_client: EtcdClient) -> None:
    store = Store(etcd_client)
    cache = VmCache(store)
    await cache.start()
    try:
        await create_one(store, "vm-2")
        durable = await cache.wait_for("vm-2", lambda s: s is not None, 10)
        assert durable is not None
        waiting = asyncio.create_task(cache.wait_for(
            "vm-2", lambda s: s is not None and s.record.status.observed_generation == 1, 10))
        await asyncio.sleep(0)
        report = agent_pb2.VmStatus(vm_id="vm-2", observed_generation=1, state=2)
        cache.note_report("vm-2", report)
        woken = await asyncio.wait_for(waiting, 1)
        assert woken is not None and woken.record.status == report
        # Shown at the revision etcd holds, so a write guarded by it still sees a change.
        assert woken.revision == durable.revision
        assert cache.on_host("h1")[0].record.status == report
        # A change waits for the write: here it fails, and the report is dropped with it.
        recorded = asyncio.create_task(cache.recorded("vm-2", 10))
        await asyncio.sleep(0.05)
        assert not recorded.done()
        cache.report_recorded("vm-2")
        after = await asyncio.wait_for(recorded, 1)
        assert after is not None and after.record.status.observed_generation == 0
        assert after.revision == durable.revision
        # A write that lands replaces the report with what etcd holds.
        cache.note_report("vm-2", report)

        def report_it(r: records_pb2.VmRecord) -> None:
            r.status.CopyFrom(report)

        written = await store.mutate_vm("vm-2", report_it, known=durable)
        assert written is not None
        cache.note_write(written)
        cache.report_recorded("vm-2")
        now = cache.get("vm-2")
        assert now is not None and now.revision == written.revision
        assert now.record.status == report
        # A report of a VM the cache does not hold shows nothing and holds nothing up.
        cache.note_report("vm-9", report)
        assert cache.get("vm-9") is None
        assert await cache.recorded("vm-9", 0.01) is None
    finally:
        await cache.stop()



async def test_vms_by_state_follow_what_the_cache_shows(etcd_client: EtcdClient) -> None:
    """The counts /metrics reports without a pass over every VM: each VM counted once, in
    the state the cache shows (a report in flight included), and not once it is gone."""
    store = Store(etcd_client)
    cache = VmCache(store)
    await cache.start()
    try:
        for vm_id in ("vm-a", "vm-b"):
            await create_one(store, vm_id)
            await cache.wait_for(vm_id, lambda s: s is not None, 10)
        unspecified = (vm_pb2.VM_STATE_UNSPECIFIED, "")
        assert cache.by_state == {unspecified: 2}
        running = agent_pb2.VmStatus(vm_id="vm-a", observed_generation=1,
                                     state=vm_pb2.VM_STATE_RUNNING)
        cache.note_report("vm-a", running)
        assert cache.by_state == {unspecified: 1, (vm_pb2.VM_STATE_RUNNING, ""): 1}
        cache.report_recorded("vm-a")  # its write failed: shown as etcd holds it again
        assert cache.by_state == {unspecified: 2}
        assert await store.delete_vm("vm-b")
        await cache.wait_for("vm-b", lambda s: s is None, 10)
        assert cache.by_state == {unspecified: 1}
        expected: dict[tuple[int, str], int] = {}
        for stored in cache.vms.values():
            key = (stored.record.status.state, stored.record.backend)
            expected[key] = expected.get(key, 0) + 1
        assert cache.by_state == expected
    finally:
        await cache.stop()
