"""What agents report of their VMs, written to etcd per host in batches
(controller.batches): a host's burst of reports (a registration, VMs created together)
costs a few transactions rather than one per VM.

A report that a change of its VM is likely to follow (a created VM's, before its boot)
waits a moment (LINGER) before its batch goes; a change made meanwhile takes the report
along in its own transaction (`claim`): one write instead of two, and the change does not
wait for the report's write to land first. Other reports go at once: until its write lands,
a report lives only in this replica, and a replica that dies takes it along (its agent
reports again to the next one).

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
# Seconds a report that a change is likely to follow waits for that change to take it along.
LINGER = 0.005


@dataclass(eq=False)  # one report is itself only: queues find it by identity
class Report:
    host_id: str
    vm_id: str
    # Applies the report to a copy of the record; False when it changes nothing.
    change: Callable[[records_pb2.VmRecord], bool]
    # The record as etcd held it when the report came (the cache's copy).
    known: StoredVm
    done: asyncio.Future[StoredVm | None]
    # Whether it waits for a change to take it along.
    lingers: bool = False


class StatusWrites:
    def __init__(self, store: Store, linger: float = LINGER) -> None:
        self.store = store
        self._prompt: KeyedBatches[Report] = KeyedBatches(self._write_batch, MAX_BATCH)
        self._lingering: KeyedBatches[Report] = KeyedBatches(self._write_batch, MAX_BATCH,
                                                             linger)
        # Reports not yet in a batch, by VM: those a change may still take along.
        self._waiting: dict[str, Report] = {}

    async def write(self, host_id: str, vm_id: str,
                    change: Callable[[records_pb2.VmRecord], bool],
                    known: StoredVm, linger: bool = False) -> StoredVm | None:
        """What store.mutate_vm(vm_id, change, known) does, in a batch with the host's other
        reports or in the transaction of a change that claims it (`linger`: after waiting
        LINGER for one). `change` may be called more than once (on a copy each time)."""
        report = Report(host_id, vm_id, change, known,
                        asyncio.get_running_loop().create_future(), linger)
        self._submit(report)
        return await asyncio.shield(report.done)

    def claim(self, vm_id: str) -> Report | None:
        """The VM's report, if it still waits for its batch: it is then the caller's to
        write along with its own change. The caller settles it with what it wrote
        (`settle`), or gives it back (`unclaim`) should its write fail."""
        report = self._waiting.pop(vm_id, None)
        if report is not None:
            self._batches_of(report).withdraw(report.host_id, report)
        return report

    def settle(self, report: Report, written: StoredVm | None) -> None:
        """The claimer's write carried the report; None: it wrote nothing, so the report
        is written on its own after all."""
        if written is None:
            self.unclaim(report)
        else:
            report.done.set_result(written)

    def unclaim(self, report: Report) -> None:
        """A claimed report whose change was not written: it is written at once."""
        report.lingers = False
        self._submit(report)

    def _submit(self, report: Report) -> None:
        self._waiting[report.vm_id] = report
        self._batches_of(report).submit(report.host_id, report)

    def _batches_of(self, report: Report) -> KeyedBatches[Report]:
        return self._lingering if report.lingers else self._prompt

    async def _write_batch(self, host_id: str, batch: list[Report]) -> None:
        for report in batch:  # written here from now on: no change can claim them
            del self._waiting[report.vm_id]
        if len(batch) == 1:  # nothing to share a transaction with
            report = batch[0]
            report.done.set_result(await self.store.mutate_vm(report.vm_id, report.change,
                                                              known=report.known))
            return
        updates: list[tuple[Report, records_pb2.VmRecord]] = []
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
