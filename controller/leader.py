"""Leader election among controller replicas, and the work only the leader does.

Any replica serves the API (every write is a revision-checked transaction); one
elected leader runs fleet-wide housekeeping, so that it is done once:

- a VM marked for deletion whose host has been gone longer than `forget_after` (the
  fencing timeout) is forgotten: its record deleted, its resources given back. Until
  then they stay reserved, since the VM may still run there; the agent removes the VM
  itself when it reconnects and finds it no longer desired.
- an address taken for a NIC that no VM has, long after it was taken (its create died
  before storing the VM), is given back (controller.networks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from controller.etcd import EtcdError
from controller.fleet import Fleet
from controller.networks import Networks
from controller.store import Store
from controller.vm_cache import VmCache

log = logging.getLogger(__name__)
ELECTION = "controller-leader"


class Leadership:
    def __init__(self, store: Store, fleet: Fleet, cache: VmCache, identity: str,
                 lease_ttl: int = 5, interval: float = 2.0, forget_after: float = 60.0,
                 networks: Networks | None = None) -> None:
        self.store = store
        self.cache = cache
        self.fleet = fleet
        self.identity = identity
        self.lease_ttl = lease_ttl
        self.interval = interval
        self.forget_after = forget_after
        self.networks = networks
        self.is_leader = False
        # host id -> when this leader first saw it down.
        self._down_since: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def election(self) -> str:
        return self.store.prefix + ELECTION

    def start(self) -> None:
        self._task = asyncio.create_task(self._run_forever(), name="leadership")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run_forever(self) -> None:
        while True:
            try:
                await self._serve_one_term()
            except asyncio.CancelledError:
                raise
            except (EtcdError, OSError) as exc:
                log.warning("leadership lost or not won: %s", exc)
                await asyncio.sleep(1.0)

    async def _serve_one_term(self) -> None:
        async with self.store.etcd.lease(self.lease_ttl) as lease:
            leader = await self.store.etcd.campaign(self.election, self.identity.encode(),
                                                    lease.id)
            self.is_leader = True
            log.info("this controller (%s) is the leader", self.identity)
            try:
                lost = asyncio.create_task(lease.wait_lost())
                while not lost.done():
                    await self.housekeeping()
                    await asyncio.wait({lost}, timeout=self.interval)
            finally:
                self.is_leader = False
                with contextlib.suppress(EtcdError, OSError):
                    await self.store.etcd.resign(leader)

    async def housekeeping(self) -> None:
        """Finish the deletions whose host stayed away past the fencing timeout (reading the
        cache's records marked for deletion only, never the whole fleet), and give back the
        addresses left behind."""
        if self.networks is not None:
            self.networks.prune()
            await self.networks.reclaim_left_behind()
        alive = self.fleet.alive_hosts()
        now = time.monotonic()
        for host in list(self._down_since):
            if host in alive or self.fleet.host_connected(host):
                del self._down_since[host]
        for vm_id in list(self.cache.deleting):
            stored = self.cache.get(vm_id)
            if stored is None or self.fleet.host_connected(stored.record.host_id):
                continue
            record = stored.record
            since = self._down_since.setdefault(record.host_id, now)
            if now - since >= self.forget_after:
                if await self.store.delete_vm(record.vm_id, expected=stored):
                    log.info("forgot vm %s: deleted while its host %s stayed away past the "
                             "fencing timeout", record.vm_id, record.host_id,
                             extra={"vm_id": record.vm_id})

    async def current_leader(self) -> str:
        kv = await self.store.etcd.leader(self.election)
        return kv.value.decode() if kv else ""
