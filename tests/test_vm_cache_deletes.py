"""The VM cache against a real etcd: a replica's own write that its watch has already seen
deleted never brings the VM back."""

from __future__ import annotations

from controller.etcd import EtcdClient
from controller.store import Store
from controller.vm_cache import VmCache
from vmm.store.v1 import records_pb2
from vmm.v1 import host_pb2


async def test_a_write_overtaken_by_the_deletion_does_not_resurrect_the_vm(
        etcd_client: EtcdClient) -> None:
    store = Store(etcd_client)
    cache = VmCache(store)
    await cache.start()
    try:
        record = records_pb2.VmRecord(vm_id="vm-1", host_id="h1", generation=1,
                                      reserved=host_pb2.Resources(vcpus=1))
        created = await store.create_vms("h1", [record], await store.get_allocation("h1"),
                                         records_pb2.Allocation(vm_count=1))
        assert created.created

        def bump(r: records_pb2.VmRecord) -> None:
            r.generation += 1

        written = await store.mutate_vm("vm-1", bump)
        assert written is not None
        # Another replica deletes the VM; this replica's watch applies the deletion ...
        assert await store.delete_vm("vm-1")
        await cache.wait_for("vm-1", lambda s: s is None, 10)
        # ... before this replica notes its own, earlier write.
        cache.note_write(written)
        assert cache.get("vm-1") is None
        assert cache.on_host("h1") == []
        # A VM created again under that id is seen.
        again = await store.create_vms("h1", [record], await store.get_allocation("h1"),
                                       records_pb2.Allocation(vm_count=1))
        assert again.created
        seen = await cache.wait_for("vm-1", lambda s: s is not None, 10)
        assert seen is not None and seen.revision == again.revision
    finally:
        await cache.stop()
