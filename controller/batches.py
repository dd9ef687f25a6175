"""Group commit per key: work queued under one key (a host) is handed over in batches.

While one batch of a key is being processed, later items of that key wait and go together
in the next, so a burst costs one etcd transaction per batch rather than one per item, and
no key waits for another key's batch. With a linger, a key's first batch waits that long
for company before it goes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar


class Waiting(Protocol):
    """An item with the future its submitter awaits."""

    @property
    def done(self) -> asyncio.Future[Any]: ...


T = TypeVar("T", bound=Waiting)


class KeyedBatches(Generic[T]):
    def __init__(self, process: Callable[[str, list[T]], Awaitable[None]],
                 max_batch: int, linger: float = 0.0) -> None:
        # process(key, batch) settles each item's future (or requeues it, see requeue).
        self._process = process
        self._max_batch = max_batch
        self._linger = linger
        self._queues: dict[str, list[T]] = {}
        self._flushing: dict[str, asyncio.Task[None]] = {}

    def submit(self, key: str, item: T) -> None:
        self._queues.setdefault(key, []).append(item)
        if key not in self._flushing:
            self._flushing[key] = asyncio.create_task(self._flush(key), name=f"batch {key}")

    def withdraw(self, key: str, item: T) -> None:
        """Take a queued item back out: it goes in no batch (one being processed keeps it)."""
        queue = self._queues.get(key)
        if queue and item in queue:
            queue.remove(item)

    def requeue(self, key: str, items: list[T]) -> None:
        """Put items back at the front of the key's queue, for the next batch (called from
        process, while the key is being flushed)."""
        self._queues[key] = items + self._queues.get(key, [])

    async def _flush(self, key: str) -> None:
        try:
            if self._linger > 0:
                await asyncio.sleep(self._linger)
            while queue := self._queues.get(key):
                batch, self._queues[key] = queue[:self._max_batch], queue[self._max_batch:]
                try:
                    await self._process(key, batch)
                except Exception as err:
                    for item in batch:
                        if not item.done.done():
                            item.done.set_exception(err)
        finally:
            self._queues.pop(key, None)
            del self._flushing[key]
