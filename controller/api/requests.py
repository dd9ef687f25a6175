"""Idempotency keys (AIP-155): a call that carries a `request_id` is carried out once, and
a retry with the same key gets the first answer.

Answers live in etcd (`requests/<method>/<caller>/<request_id>`), so every replica replays
them, on a lease that bounds their retention: a replica grants one lease of `retention`
seconds and puts its answers on it for half that time before it grants the next, so an
answer is kept between half the retention and the whole of it, for one lease grant per
half-retention.
Only successful answers are kept: a call that failed may be retried for real. Concurrent
calls with one key on one replica wait for the first; the first answer written wins.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf.message import Message

from controller.auth import current_caller
from controller.errors import invalid_field
from controller.etcd import Compare, Op
from controller.store import Store
from vmm.store.v1 import records_pb2

# An hour, as AIP-155 suggests at least.
DEFAULT_RETENTION = 3600.0
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

Response = TypeVar("Response", bound=Message)


class RequestLog:
    def __init__(self, store: Store, retention: float = DEFAULT_RETENTION) -> None:
        self.store = store
        self.retention = max(2.0, retention)
        self.prefix = store.prefix + "requests/"
        self._lease: tuple[int, float] | None = None  # (id, time.monotonic() of its grant)
        self._lease_lock = asyncio.Lock()
        self._in_flight: dict[str, asyncio.Event] = {}

    async def once(self, method: str, request: Message, response_type: type[Response],
                   run: Callable[[], Awaitable[Response]]) -> Response:
        """run()'s answer, or the stored answer of an earlier call with the same key."""
        request_id: str = getattr(request, "request_id", "")
        if not request_id:
            return await run()
        if not REQUEST_ID.match(request_id):
            raise invalid_field("request_id", "must be 1 to 64 characters of [A-Za-z0-9._-], "
                                f"got {request_id!r}")
        # Keys are the caller's own: another caller's identical key replays nothing.
        caller = hashlib.sha256(current_caller().describe().encode()).hexdigest()[:16]
        key = f"{self.prefix}{method}/{caller}/{request_id}"
        fingerprint = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
        while (earlier := self._in_flight.get(key)) is not None:
            await earlier.wait()
        if (answer := await self._stored(key, fingerprint, response_type)) is not None:
            return answer
        done = self._in_flight[key] = asyncio.Event()
        try:
            response = await run()
            record = records_pb2.RequestRecord(fingerprint=fingerprint,
                                               response=response.SerializeToString())
            result = await self.store.etcd.txn(
                compares=[Compare.absent(key)],
                success=[Op.put(key, record.SerializeToString(), await self._current_lease())],
                failure=[])
            if not result.succeeded:  # another replica answered first: its answer stands
                return await self._stored(key, fingerprint, response_type) or response
            return response
        finally:
            del self._in_flight[key]
            done.set()

    async def _stored(self, key: str, fingerprint: str,
                      response_type: type[Response]) -> Response | None:
        kv = await self.store.etcd.get(key)
        if kv is None:
            return None
        record = records_pb2.RequestRecord.FromString(kv.value)
        if record.fingerprint != fingerprint:
            raise invalid_field("request_id", "was already used for a different request")
        return response_type.FromString(record.response)

    async def _current_lease(self) -> int:
        async with self._lease_lock:
            now = time.monotonic()
            if self._lease is None or now - self._lease[1] > self.retention / 2:
                self._lease = (await self.store.etcd.lease_grant(int(self.retention)), now)
            return self._lease[0]
