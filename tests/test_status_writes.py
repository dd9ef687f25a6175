"""Agents' reports written per host in batches, against a real etcd: a burst shares
transactions, and a VM changed by another writer meanwhile still gets its report, on a
fresh copy, without losing the other writer's change."""

from __future__ import annotations

import asyncio

from controller.etcd import EtcdClient
from controller.status_writes import Report, StatusWrites
from controller.store import Store, StoredVm
from vmm.store.v1 import records_pb2
from vmm.v1 import host_pb2, vm_pb2

RUNNING = vm_pb2.VM_STATE_RUNNING


async def created(store: Store, host_id: str, count: int) -> list[StoredVm]:
    records = [records_pb2.VmRecord(vm_id=f"{host_id}-vm-{i}", host_id=host_id, generation=1,
                                    reserved=host_pb2.Resources(vcpus=1))
               for i in range(count)]
    result = await store.create_vms(host_id, records, await store.get_allocation(host_id),
                                    records_pb2.Allocation(vm_count=count))
    assert result.created
    return [StoredVm(record, result.revision) for record in records]


def to_running(record: records_pb2.VmRecord) -> bool:
    if record.status.state == RUNNING:
        return False
    record.status.state = RUNNING
    record.status.observed_generation = record.generation
    return True


async def report_running(writes: StatusWrites, vms: list[StoredVm]) -> list[StoredVm]:
    """Every VM's report at once, as a host's burst arrives; what each write left."""
    written = await asyncio.gather(*(writes.write("h1", s.record.vm_id, to_running, s)
                                     for s in vms))
    assert all(s is not None for s in written)
    return [s for s in written if s is not None]


async def test_a_burst_of_reports_shares_transactions(etcd_client: EtcdClient) -> None:
    store = Store(etcd_client)
    vms = await created(store, "h1", 40)
    writes = StatusWrites(store)
    written = await report_running(writes, vms)
    revisions = {s.revision for s in written}
    # Reports that queue while the host's batch is forming go in one transaction (the
    # first may go alone if its batch started before the others queued).
    assert len(revisions) <= 2, revisions
    for stored in written:
        found = await store.get_vm(stored.record.vm_id)
        assert found is not None and found.record.status.state == RUNNING
        assert found.revision == stored.revision


async def test_a_vm_changed_meanwhile_gets_its_report_on_a_fresh_copy(
        etcd_client: EtcdClient) -> None:
    store = Store(etcd_client)
    vms = await created(store, "h1", 3)
    # Another replica bumps vm-1's generation after this replica's cache read it.

    def bump(record: records_pb2.VmRecord) -> None:
        record.generation += 1

    assert await store.mutate_vm("h1-vm-1", bump) is not None
    writes = StatusWrites(store)
    first = asyncio.ensure_future(writes.write("h1", "h1-vm-0", to_running, vms[0]))
    rest = [writes.write("h1", s.record.vm_id, to_running, s) for s in vms[1:]]
    written = await asyncio.gather(first, *rest)
    assert all(s is not None for s in written)
    for vm_id, generation in (("h1-vm-0", 1), ("h1-vm-1", 2), ("h1-vm-2", 1)):
        found = await store.get_vm(vm_id)
        assert found is not None
        assert found.record.status.state == RUNNING, vm_id
        assert found.record.generation == generation, vm_id  # the other change kept


async def test_a_report_that_changes_nothing_writes_nothing(etcd_client: EtcdClient) -> None:
    store = Store(etcd_client)
    vms = await created(store, "h1", 2)
    writes = StatusWrites(store)
    first = await report_running(writes, vms)
    again = await report_running(writes, first)
    assert [s.revision for s in again] == [s.revision for s in first]


def booted(record: records_pb2.VmRecord) -> None:
    record.desired_state = RUNNING
    record.generation += 1


async def claimed(store: Store) -> tuple[StatusWrites, StoredVm,
                                         asyncio.Future[StoredVm | None], Report]:
    """A VM's report, lingering, claimed as a change of the VM would: (the writes, the VM,
    the reporter's pending write, the report)."""
    (vm,) = await created(store, "h1", 1)
    writes = StatusWrites(store)
    reporting = asyncio.ensure_future(writes.write("h1", vm.record.vm_id, to_running, vm,
                                                   linger=True))
    await asyncio.sleep(0)  # the report is queued, its batch lingers
    report = writes.claim(vm.record.vm_id)
    assert report is not None
    return writes, vm, reporting, report


async def test_a_change_takes_a_waiting_report_along(etcd_client: EtcdClient) -> None:
    store = Store(etcd_client)
    writes, vm, reporting, report = await claimed(store)
    assert writes.claim(vm.record.vm_id) is None  # one claimer only

    def both(record: records_pb2.VmRecord) -> None:
        report.change(record)
        booted(record)

    written = await store.mutate_vm(vm.record.vm_id, both, known=report.known)
    writes.settle(report, written)
    assert await reporting == written  # the reporter learns what the change wrote
    await asyncio.sleep(0.05)  # well past the linger: the batch writes nothing of its own
    found = await store.get_vm(vm.record.vm_id)
    assert found is not None and written is not None
    assert found.revision == written.revision
    assert found.record.status.state == RUNNING and found.record.generation == 2


async def test_a_report_given_back_is_written_alone(etcd_client: EtcdClient) -> None:
    store = Store(etcd_client)
    writes, vm, reporting, report = await claimed(store)
    writes.unclaim(report)  # the change that claimed it failed
    stored = await reporting
    assert stored is not None and stored.record.status.state == RUNNING
    found = await store.get_vm(vm.record.vm_id)
    assert found is not None and found.record.status.state == RUNNING
    assert found.record.generation == 1


async def test_a_report_that_need_not_linger_is_written_at_once(etcd_client: EtcdClient) -> None:
    store = Store(etcd_client)
    (vm,) = await created(store, "h1", 1)
    writes = StatusWrites(store, linger=60)  # were it to linger, this test would hang
    stored = await writes.write("h1", vm.record.vm_id, to_running, vm)
    assert stored is not None and stored.record.status.state == RUNNING


async def test_a_report_its_batch_took_cannot_be_claimed(etcd_client: EtcdClient) -> None:
    store = Store(etcd_client)
    (vm,) = await created(store, "h1", 1)
    writes = StatusWrites(store)
    reporting = asyncio.ensure_future(writes.write("h1", vm.record.vm_id, to_running, vm))
    for _ in range(3):  # the write starts, its batch's flush starts and takes the report
        await asyncio.sleep(0)
    assert writes.claim(vm.record.vm_id) is None
    stored = await reporting
    assert stored is not None and stored.record.status.state == RUNNING
