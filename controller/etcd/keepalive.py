"""Keeping an etcd lease alive from a background task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from types import TracebackType
from typing import TYPE_CHECKING

from controller.etcd.errors import EtcdUnavailable, LeaseNotFound

if TYPE_CHECKING:
    from controller.etcd.client import EtcdClient

log = logging.getLogger(__name__)


class LeaseKeepAlive:
    """Keeps a lease alive from a background task over the LeaseKeepAlive stream.

    It refreshes the lease every third of its TTL, across endpoint failures. The
    lease counts as lost when etcd says it is gone, or when no refresh has
    landed for a whole TTL (etcd will expire it, if it has not already): then
    `lost` turns true and `wait_lost()` returns. Whoever holds something by the
    lease (leadership, a registration) must stop acting on it at that point.
    """

    def __init__(self, client: EtcdClient, *, lease_id: int | None = None,
                 grant_ttl: int | None = None) -> None:
        if (lease_id is None) == (grant_ttl is None):
            raise ValueError("give either an existing lease_id or a grant_ttl")
        self._client = client
        self._id = lease_id
        self._grant_ttl = grant_ttl
        self._revoke_on_stop = grant_ttl is not None
        self._expires_at = 0.0
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def id(self) -> int:
        if self._id is None:
            raise RuntimeError("the lease is granted by start()")
        return self._id

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    async def wait_lost(self) -> None:
        await self._lost.wait()

    async def start(self) -> LeaseKeepAlive:
        """Grant the lease if asked to, refresh it once, and keep refreshing it.

        Raises LeaseNotFound when an existing lease has already expired.
        """
        if self._task is not None:
            return self
        if self._id is None:
            assert self._grant_ttl is not None
            self._id = await self._client.lease_grant(self._grant_ttl)
        sent_at = time.monotonic()
        ttl = await self._client._keepalive_once(self._id, self._client.timeout)
        if ttl == 0:
            raise LeaseNotFound(f"lease {self._id:x} does not exist")
        self._expires_at = sent_at + ttl
        self._task = asyncio.create_task(self._run(ttl), name=f"etcd-keepalive-{self._id:x}")
        return self

    async def stop(self) -> None:
        """Stop refreshing; revoke the lease if this object granted it."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._revoke_on_stop and self._id is not None and not self.lost:
            try:
                await self._client.lease_revoke(self._id)
            except EtcdUnavailable as error:
                log.warning("could not revoke lease %x; it expires on its own: %s",
                            self._id, error)

    async def __aenter__(self) -> LeaseKeepAlive:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    def _mark_lost(self, why: str) -> None:
        log.warning("etcd lease %x lost: %s", self.id, why)
        self._lost.set()

    async def _run(self, ttl: int) -> None:
        try:
            while True:
                await asyncio.sleep(max(ttl / 3, 0.1))
                seconds_left = self._expires_at - time.monotonic()
                if seconds_left <= 0:
                    self._mark_lost("no keepalive reached etcd within its TTL")
                    return
                sent_at = time.monotonic()
                try:
                    ttl = await self._client._keepalive_once(self.id, seconds_left)
                except EtcdUnavailable as error:
                    self._mark_lost(f"no etcd endpoint answered within its TTL ({error})")
                    return
                if ttl == 0:
                    self._mark_lost("etcd says it expired or was revoked")
                    return
                # Counted from before the request: the server renewed it after that.
                self._expires_at = sent_at + ttl
        except Exception as error:
            # Whatever broke, the holder must learn that the lease is no longer kept.
            self._mark_lost(f"keepalive failed: {error!r}")
