"""What agents report of their VMs, written to etcd per host in batches
(controller.batches): a host's burst of reports (a registration, VMs created together)
costs a few transactions rather than one per VM.

Each VM's write is guarded by the revision the cache knows it at. A batch whose guard fails
(another writer changed one of its VMs meanwhile) is written again VM by VM, each a
read-modify-write of its own. The caller holds the VM's lock, so one VM has at most one
report in flight and a batch never holds a VM twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from controller.batches import KeyedBatches
from controller.store import Store, StoredVm
from vmm.store.v1 import records_pb2

# VMs per transaction: etcd refuses more than 128 operations in one branch by default.
MAX_BATCH = 64


@dataclass
class _Report:
    vm_id: str
    change: Callable[[records_pb2.VmRecord], bool]
    known: StoredVm
    done: asyncio.Future[StoredVm | None]


class StatusWrites:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._batches: KeyedBatches[_Report] = KeyedBatches(self._write_batch, MAX_BATCH)

    async def write(self, host_id: str, vm_id: str,
                    change: Callable[[records_pb2.VmRecord], bool],
                    known: StoredVm) -> StoredVm | None:
        """What store.mutate_vm(vm_id, change, known) does, in a batch with the host's other
        reports. `change` may be called more than once (on a copy each time)."""
        report = _Report(vm_id, change, known, asyncio.get_running_loop().create_future())
        self._batches.submit(host_id, report)
        return await asyncio.shield(report.done)

    async def _write_batch(self, host_id: str, batch: list[_Report]) -> None:
        if len(batch) == 1:  # nothing to share a transaction with
            report = batch[0]
            report.done.set_result(await self.store.mutate_vm(report.vm_id, report.change,
                                                              known=report.known))
            return
        updates: list[tuple[_Report, records_pb2.VmRecord]] = []
        for report in batch:
            record = records_pb2.VmRecord()
            record.CopyFrom(report.known.record)
            if report.change(record) is False:
                report.done.set_result(report.known)
            else:
                updates.append((report, record))
        if not updates:
            return
        revision = await self.store.update_vms([(r.known, record) for r, record in updates])
        if revision is not None:
            for report, record in updates:
                report.done.set_result(StoredVm(record, revision))
            return
        written = await asyncio.gather(*(self.store.mutate_vm(r.vm_id, r.change)
                                         for r, _ in updates), return_exceptions=True)
        for (report, _), result in zip(updates, written, strict=True):
            if isinstance(result, BaseException):
                report.done.set_exception(result)
            else:
                report.done.set_result(result)
