"""A prefix of etcd mirrored in memory: one listing, then a watch from its revision.

The owner gets a callback per key that appears, changes or disappears. A watch that falls
behind compaction lists the prefix again and reports only what differs, so the mirror
converges on etcd whatever it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from controller.etcd.client import EtcdClient
from controller.etcd.errors import WatchCompacted
from controller.etcd.values import EventType, KeyValue

log = logging.getLogger(__name__)


class PrefixMirror:
    def __init__(self, etcd: EtcdClient, prefix: str, *,
                 on_put: Callable[[str, KeyValue], None],
                 on_delete: Callable[[str], None]) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self._on_put = on_put
        self._on_delete = on_delete
        # Key (without the prefix) -> mod_revision last delivered.
        self._seen: dict[str, int] = {}
        self.revision = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._load()
        self._task = asyncio.create_task(self._watch_forever(), name=f"mirror {self.prefix}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _load(self) -> None:
        kvs, revision = await self.etcd.get_prefix(self.prefix)
        fresh = {kv.key.removeprefix(self.prefix): kv for kv in kvs}
        for name in set(self._seen) - set(fresh):
            del self._seen[name]
            self._on_delete(name)
        for name, kv in fresh.items():
            if self._seen.get(name) != kv.mod_revision:
                self._seen[name] = kv.mod_revision
                self._on_put(name, kv)
        self.revision = revision

    async def _watch_forever(self) -> None:
        relist = False
        while True:
            try:
                if relist:
                    await self._load()
                    relist = False
                async for event in self.etcd.watch_prefix(self.prefix,
                                                          start_revision=self.revision + 1):
                    name = event.kv.key.removeprefix(self.prefix)
                    if event.type == EventType.DELETE:
                        if self._seen.pop(name, None) is not None:
                            self._on_delete(name)
                    else:
                        self._seen[name] = event.kv.mod_revision
                        self._on_put(name, event.kv)
                    self.revision = max(self.revision, event.revision)
            except WatchCompacted:
                log.warning("watch of %s fell behind compaction; listing it again", self.prefix)
                relist = True
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("watch of %s failed; retrying", self.prefix)
                await asyncio.sleep(0.5)
