"""An in-memory mirror of the VM records in etcd, kept current by a prefix watch.

Reads (GetVmInfo, ListVms) are served from it; WatchVms streams and RPCs waiting
for an agent's report subscribe to it. Every controller replica has its own,
so a change written by any replica reaches all of them.

A waiter is woken by its own VM's changes only, and as soon as either the watch or
this replica's own committed write (note_write) brings them: a write etcd has
acknowledged is durable, so it need not wait for its echo on a watch that carries
every VM's changes.

An agent's report wakes them even sooner: the cache shows it while the write recording it
is in flight (note_report). What the agent reports is what etcd is about to hold; should the
write fail, the agent's stream ends and it reports again when it reconnects.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from controller.access import DEFAULT_NAMESPACE
from controller.etcd import EventType, WatchCompacted
from controller.store import Store, StoredVm
from vmm.agent.v1 import agent_pb2
from vmm.store.v1 import records_pb2
from vmm.v1 import vm_pb2

log = logging.getLogger(__name__)
# Deletions remembered against writes they overtook; a write in flight is one etcd round
# trip old, so the most recent few thousand are plenty.
MAX_TOMBSTONES = 4096


@dataclass(frozen=True)
class VmChange:
    vm_id: str
    # None when the VM was deleted.
    current: StoredVm | None
    previous: StoredVm | None
    revision: int


class VmCache:
    def __init__(self, store: Store) -> None:
        self.store = store
        # The freshest record of each VM: watch events plus this replica's own writes.
        self.vms: dict[str, StoredVm] = {}
        # host id -> ids of the VMs in `vms` placed on it, kept current with `vms`.
        self.by_host: dict[str, set[str]] = {}
        # namespace -> ids of the VMs in `vms` of that namespace, kept current with `vms`.
        self.by_namespace: dict[str, set[str]] = {}
        # (host id, disk path) -> {vm id: writable?} for every disk of the VMs in `vms`:
        # who uses an image on a host, found without a scan.
        self.disk_users: dict[tuple[str, str], dict[str, bool]] = {}
        # The ids of `vms` in order, for paged listings.
        self.sorted_ids: list[str] = []
        # (observed state, backend) -> how many VMs `vms` shows so: what /metrics reports,
        # without a pass over every VM.
        self.by_state: Counter[tuple[vm_pb2.VmState.ValueType, str]] = Counter()
        # The ids of the cached records marked for deletion.
        self.deleting: set[str] = set()
        # vm id -> revision of its deletion, for the most recent deletions the watch applied:
        # a write of this replica's that the deletion overtook must not bring the VM back.
        self._deleted: dict[str, int] = {}
        # vm id -> (the status its agent reported, the record as etcd holds it) while the
        # write recording the report is in flight: `vms` shows the one over the other.
        self._reported: dict[str, tuple[agent_pb2.VmStatus, StoredVm]] = {}
        # Each VM as the watch last delivered it: what a change is a change *from*.
        self._watched: dict[str, StoredVm] = {}
        self.revision = 0
        self._subscribers: set[asyncio.Queue[VmChange]] = set()
        # vm id -> the events of the wait_for calls waiting on a change of that VM.
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        await self._load()
        self._task = asyncio.create_task(self._watch_forever(), name="vm-cache-watch")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _load(self) -> None:
        stored, revision = await self.store.list_vms()
        fresh = {s.record.vm_id: s for s in stored}
        gone = set(self._watched) - set(fresh)
        for vm_id in gone:
            await self._apply(VmChange(vm_id, None, self._watched.get(vm_id), revision))
        for vm_id, s in fresh.items():
            if vm_id not in self._watched or self._watched[vm_id].revision != s.revision:
                await self._apply(VmChange(vm_id, s, self._watched.get(vm_id), s.revision))
        self.revision = revision
        self._ready.set()

    async def _watch_forever(self) -> None:
        while True:
            try:
                async for event in self.store.etcd.watch_prefix(
                        self.store.vm_prefix, start_revision=self.revision + 1):
                    vm_id = event.kv.key.removeprefix(self.store.vm_prefix)
                    previous = self._watched.get(vm_id)
                    if event.type == EventType.DELETE:
                        change = VmChange(vm_id, None, previous, event.revision)
                    else:
                        change = VmChange(vm_id, self.store.decode_vm(event.kv), previous,
                                          event.revision)
                    await self._apply(change)
            except WatchCompacted:
                log.warning("vm watch fell behind compaction; reloading from etcd")
                await self._load()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("vm watch failed; retrying")
                await asyncio.sleep(0.5)

    def note_write(self, stored: StoredVm) -> None:
        """Apply our own committed write at once (read-your-writes) if the watch has not
        yet, and wake whoever waits on that VM."""
        vm_id = stored.record.vm_id
        cached = self.vms.get(vm_id)
        if cached is None and stored.revision <= self._deleted.get(vm_id, 0):
            return  # the watch has already applied a later delete: do not bring it back
        if cached is None or cached.revision < stored.revision:
            self._store(vm_id, stored)
            self._wake(vm_id)

    def note_report(self, vm_id: str, status: agent_pb2.VmStatus) -> None:
        """Show an agent's report of a VM now, before the write recording it commits, and
        wake whoever waits on that VM. One report per VM at a time (the hub's VM lock)."""
        if (cached := self.vms.get(vm_id)) is None:
            return
        self._reported[vm_id] = (status, cached)
        self._show(vm_id, _reported_over(cached, status))
        self._wake(vm_id)

    def report_recorded(self, vm_id: str) -> None:
        """The write of the VM's report is over (note_write has its result, if any): the
        cache holds what etcd holds again, without the report should the write have failed."""
        if (entry := self._reported.pop(vm_id, None)) is None:
            return
        if vm_id in self.vms:
            self._show(vm_id, entry[1])
        self._wake(vm_id)

    async def recorded(self, vm_id: str, timeout: float) -> StoredVm | None:
        """The VM's record once no report of it is being written. A change guarded by the
        record's revision would otherwise lose the race to that write and go round again."""
        return await self.wait_for(vm_id, lambda _: vm_id not in self._reported, timeout)

    async def _apply(self, change: VmChange) -> None:
        cached = self.vms.get(change.vm_id)
        if change.current is None:
            self._store(change.vm_id, None)
            self._watched.pop(change.vm_id, None)
            self._deleted[change.vm_id] = change.revision
            if len(self._deleted) > MAX_TOMBSTONES:
                del self._deleted[next(iter(self._deleted))]
        else:
            self._watched[change.vm_id] = change.current
            self._deleted.pop(change.vm_id, None)
        if change.current is not None and (
                cached is None or cached.revision <= change.current.revision):
            self._store(change.vm_id, change.current)
        self.revision = max(self.revision, change.revision)
        for queue in list(self._subscribers):
            queue.put_nowait(change)
        self._wake(change.vm_id)

    def _wake(self, vm_id: str) -> None:
        for event in self._waiters.get(vm_id, ()):
            event.set()

    def _store(self, vm_id: str, stored: StoredVm | None) -> None:
        """Set (or, given None, drop) the cached record and keep `by_host` in step."""
        old = self.vms.get(vm_id)
        old_host = old.record.host_id if old is not None else None
        new_host = stored.record.host_id if stored is not None else None
        if stored is None:
            self._show(vm_id, None)
        elif (entry := self._reported.get(vm_id)) is None:
            self._show(vm_id, stored)
        else:
            self._reported[vm_id] = (entry[0], stored)
            self._show(vm_id, _reported_over(stored, entry[0]))
        if stored is not None and stored.record.deleting:
            self.deleting.add(vm_id)
        else:
            self.deleting.discard(vm_id)
        self._index_disks(vm_id, old, stored)
        if old is None and stored is not None:
            bisect.insort(self.sorted_ids, vm_id)
        elif old is not None and stored is None:
            del self.sorted_ids[bisect.bisect_left(self.sorted_ids, vm_id)]
        _move(self.by_host, vm_id, old_host, new_host)
        _move(self.by_namespace, vm_id, namespace_of(old.record) if old else None,
              namespace_of(stored.record) if stored else None)

    def _show(self, vm_id: str, stored: StoredVm | None) -> None:
        """Make `vms` show stored for the VM (None: drop it), keeping `by_state` in step."""
        old = self.vms.pop(vm_id, None) if stored is None else self.vms.get(vm_id)
        if old is not None:
            key = (old.record.status.state, old.record.backend)
            self.by_state[key] -= 1
            if not self.by_state[key]:
                del self.by_state[key]
        if stored is not None:
            self.vms[vm_id] = stored
            self.by_state[stored.record.status.state, stored.record.backend] += 1

    def _index_disks(self, vm_id: str, old: StoredVm | None, new: StoredVm | None) -> None:
        for stored, keep in ((old, False), (new, True)):
            if stored is None:
                continue
            host = stored.record.host_id
            for disk in stored.record.config.storage:
                key = (host, disk.path)
                if keep:
                    self.disk_users.setdefault(key, {})[vm_id] = not disk.read_only
                elif (users := self.disk_users.get(key)) is not None:
                    users.pop(vm_id, None)
                    if not users:
                        del self.disk_users[key]

    def users_of_disk(self, host_id: str, path: str) -> dict[str, bool]:
        """The VMs on a host that use the disk image at path: vm id -> writable?"""
        return self.disk_users.get((host_id, path), {})

    def get(self, vm_id: str) -> StoredVm | None:
        return self.vms.get(vm_id)

    def after(self, vm_id: str) -> Iterator[StoredVm]:
        """The cached records with an id above vm_id, in id order."""
        ids = self.sorted_ids
        for i in range(bisect.bisect_right(ids, vm_id), len(ids)):
            yield self.vms[ids[i]]

    def in_namespace(self, namespace: str) -> list[StoredVm]:
        """The cached records of one namespace's VMs: O(its VMs)."""
        return [self.vms[vm_id] for vm_id in self.by_namespace.get(namespace, ())]

    def on_host(self, host_id: str) -> list[StoredVm]:
        """The cached records of the VMs placed on one host: O(its VMs), not O(all VMs)."""
        return [self.vms[vm_id] for vm_id in self.by_host.get(host_id, ())]

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[VmChange]]:
        queue: asyncio.Queue[VmChange] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    async def wait_for(self, vm_id: str, predicate: Callable[[StoredVm | None], bool],
                       timeout: float) -> StoredVm | None:
        """Wait until predicate(cached record) holds; raises TimeoutError after timeout.
        O(1) per change of other VMs: only this VM's changes wake it."""
        if predicate(self.vms.get(vm_id)):
            return self.vms.get(vm_id)
        event = asyncio.Event()
        waiters = self._waiters.setdefault(vm_id, set())
        waiters.add(event)
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self.vms.get(vm_id)):
                    await event.wait()
                    event.clear()
        finally:
            waiters.discard(event)
            if not waiters and self._waiters.get(vm_id) is waiters:
                del self._waiters[vm_id]
        return self.vms.get(vm_id)


def _reported_over(stored: StoredVm, status: agent_pb2.VmStatus) -> StoredVm:
    """The record with a reported status in place of its own, at the same revision: a write
    guarded by that revision still fails if the record changed since."""
    record = records_pb2.VmRecord()
    record.CopyFrom(stored.record)
    record.status.CopyFrom(status)
    return StoredVm(record, stored.revision)


def namespace_of(record: records_pb2.VmRecord) -> str:
    return record.namespace or DEFAULT_NAMESPACE


def _move(index: dict[str, set[str]], vm_id: str, old: str | None, new: str | None) -> None:
    """Keep a key -> VM ids index in step with one VM's change of key."""
    if old == new:
        return
    if old is not None and (ids := index.get(old)) is not None:
        ids.discard(vm_id)
        if not ids:
            del index[old]
    if new is not None:
        index.setdefault(new, set()).add(vm_id)
