"""Host liveness as one controller replica holds it.

`ReplicaLease` is the replica's single etcd lease: the alive keys of all the hosts
connected to this replica are attached to it, and one background task keeps it alive.
When the replica dies the lease runs out and every one of those keys goes with it. When
etcd says the lease is gone (a long partition, say), a new one is granted and the
holder re-attaches the alive keys of the hosts still connected.

`HeartbeatPolicy` is the heartbeat interval the replica asks of its agents: the base
interval while the fleet is small, stretched so that the heartbeats of all connected
hosts stay under a rate; the timeout after which a silent host is DEGRADED keeps its
ratio to the interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from controller.etcd import EtcdClient, EtcdError, LeaseKeepAlive

log = logging.getLogger(__name__)

# A host is given at least this many heartbeat intervals before it counts as silent.
BEATS_PER_TIMEOUT = 3.0
# Re-granting a lost lease backs off between these bounds (seconds) while etcd refuses.
_REGRANT_BACKOFF = (0.2, 5.0)


class ReplicaLease:
    """One etcd lease for the replica, re-granted whenever it is lost.

    `on_regranted(new_id)` runs after every re-grant (not after the first grant): the
    holder re-puts there whatever it keeps on the lease.
    """

    def __init__(self, etcd: EtcdClient, ttl: int,
                 on_regranted: Callable[[int], Awaitable[None]] | None = None) -> None:
        self._etcd = etcd
        self._ttl = ttl
        self._on_regranted = on_regranted
        self._keepalive: LeaseKeepAlive | None = None
        self._ready = asyncio.Event()
        self._invalid = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.grants = 0

    @property
    def ttl(self) -> int:
        return self._ttl

    @property
    def id(self) -> int | None:
        """The current lease, or None while none is held."""
        keepalive = self._keepalive
        if keepalive is None or keepalive.lost or self._invalid.is_set():
            return None
        return keepalive.id

    def is_current(self, lease_id: int) -> bool:
        return self.id == lease_id

    async def current(self) -> int:
        """The current lease; waits while it is being re-granted."""
        while True:
            lease_id = self.id
            if lease_id is not None:
                return lease_id
            self._ready.clear()
            await self._ready.wait()

    def invalidate(self, lease_id: int) -> None:
        """etcd refused `lease_id` (it no longer exists): grant a new one now."""
        if self._keepalive is not None and self._keepalive.id == lease_id:
            self._invalid.set()

    async def start(self) -> None:
        """Grant the lease (raises EtcdUnavailable when etcd cannot be reached) and keep it."""
        self._keepalive = await self._grant()
        self._ready.set()
        self._task = asyncio.create_task(self._supervise(), name="replica-lease")

    async def stop(self) -> None:
        """Stop keeping the lease and revoke it: every key on it goes at once."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        keepalive, self._keepalive = self._keepalive, None
        if keepalive is not None:
            await keepalive.stop()

    async def _grant(self) -> LeaseKeepAlive:
        keepalive = await LeaseKeepAlive(self._etcd, grant_ttl=self._ttl).start()
        self.grants += 1
        log.info("replica lease %x granted (ttl %ds)", keepalive.id, self._ttl)
        return keepalive

    async def _supervise(self) -> None:
        while True:
            keepalive = self._keepalive
            assert keepalive is not None
            lost = asyncio.create_task(keepalive.wait_lost())
            invalid = asyncio.create_task(self._invalid.wait())
            try:
                await asyncio.wait({lost, invalid}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
                invalid.cancel()
            log.warning("replica lease %x lost; granting a new one", keepalive.id)
            # Whatever is left of the old lease must not outlive the new one's keys.
            with contextlib.suppress(EtcdError):
                await keepalive.stop()
                await self._etcd.lease_revoke(keepalive.id)
            self._keepalive = await self._regrant()
            self._invalid.clear()
            self._ready.set()
            if self._on_regranted is not None:
                try:
                    await self._on_regranted(self._keepalive.id)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("restoring the keys of lease %x failed", self._keepalive.id)

    async def _regrant(self) -> LeaseKeepAlive:
        delay = _REGRANT_BACKOFF[0]
        while True:
            try:
                return await self._grant()
            except EtcdError as error:
                log.warning("granting the replica lease failed (%s); retrying in %.1fs",
                            error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _REGRANT_BACKOFF[1])


class HeartbeatPolicy:
    """The heartbeat interval and timeout one replica asks of its agents."""

    def __init__(self, base_interval: float, base_timeout: float, max_rate: float,
                 hysteresis: float = 0.25) -> None:
        if base_interval <= 0 or max_rate <= 0:
            raise ValueError("heartbeat interval and rate must be positive")
        # At least BEATS_PER_TIMEOUT beats fit in the timeout, whatever the two settings say.
        self.base_interval = min(base_interval, base_timeout / BEATS_PER_TIMEOUT) \
            if base_timeout > 0 else base_interval
        self.base_timeout = base_timeout
        self.max_rate = max_rate
        self.hysteresis = hysteresis
        # The timeout keeps its ratio to the interval as both stretch.
        self.timeout_ratio = max(base_timeout / self.base_interval, BEATS_PER_TIMEOUT)
        self.interval = self.base_interval
        # After the timeout shrinks, agents still on the old interval get the old timeout
        # until then (time.monotonic()).
        self._previous_timeout = 0.0
        self._previous_until = 0.0

    def wanted_interval(self, hosts: int) -> float:
        return max(self.base_interval, hosts / self.max_rate)

    @property
    def advertised_timeout(self) -> float:
        """The timeout sent to agents along with the interval."""
        return max(self.base_timeout, self.interval * self.timeout_ratio)

    def timeout(self, now: float | None = None) -> float:
        """How long a connected host may stay silent before it counts as DEGRADED."""
        now = time.monotonic() if now is None else now
        if now < self._previous_until:
            return max(self.advertised_timeout, self._previous_timeout)
        return self.advertised_timeout

    def update(self, hosts: int, now: float | None = None) -> bool:
        """Retune for `hosts` connected hosts; True when the interval changed (by more than
        the hysteresis), so every agent must be told."""
        wanted = self.wanted_interval(hosts)
        if abs(wanted - self.interval) <= self.hysteresis * self.interval:
            return False
        now = time.monotonic() if now is None else now
        old_timeout = self.advertised_timeout
        self.interval = wanted
        if self.advertised_timeout < old_timeout:
            self._previous_timeout = max(old_timeout, self.timeout(now))
            self._previous_until = now + old_timeout
        return True
