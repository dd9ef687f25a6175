"""Idempotency keys (AIP-155): a call that carries a `request_id` is carried out once, and
a retry with the same key gets the first answer.

Answers live in etcd (`requests/<method>/<caller>/<request_id>`), so every replica replays
them, on a lease that bounds their retention: a replica grants one lease of `retention`
seconds and puts its answers on it for half that time before it grants the next, so an
answer is kept between half the retention and the whole of it, for one lease grant per
half-retention.
Only successful answers are kept: a call that failed may be retried for real. Concurrent
calls with one key on one replica wait for the first; the first answer written wins.
A call whose change commits before its answer is known (DeleteVm marks the VM, then waits
for its host) writes a pending mark in the change's transaction, so a retry after a crash or
a lost answer tells "this call already removed it" from "it never existed".
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from controller.auth import current_caller
from controller.errors import ApiError, invalid_field
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
                   run: Callable[[], Awaitable[Response]],
                   when_gone: Response | None = None) -> Response:
        """run()'s answer, or the stored answer of an earlier call with the same key.

        `when_gone` is the answer for a retry whose earlier try left a pending mark (see
        `pending_mark`) and whose VM is no longer there: that earlier try removed it.
        """
        request_id: str = getattr(request, "request_id", "")
        if not request_id:
            return await run()
        key, fingerprint = self._key(method, request)
        while (earlier := self._in_flight.get(key)) is not None:
            await earlier.wait()
        stored = await self._stored(key, fingerprint)
        if stored is not None and not stored.pending:
            return response_type.FromString(stored.response)
        done = self._in_flight[key] = asyncio.Event()
        try:
            try:
                response = await run()
            except ApiError as e:
                if (e.code != grpc.StatusCode.NOT_FOUND or when_gone is None
                        or stored is None):
                    raise
                response = when_gone
            return await self._keep(key, fingerprint, response, response_type,
                                    marked=when_gone is not None)
        finally:
            del self._in_flight[key]
            done.set()

    async def pending_mark(self, method: str, request: Message) -> list[Op]:
        """The write that marks a call with a request_id as having committed its change, to
        go in the transaction of that change; none for a call without one."""
        if not getattr(request, "request_id", ""):
            return []
        key, fingerprint = self._key(method, request)
        mark = records_pb2.RequestRecord(fingerprint=fingerprint, pending=True)
        return [Op.put(key, mark.SerializeToString(), await self._current_lease())]

    def _key(self, method: str, request: Message) -> tuple[str, str]:
        request_id: str = getattr(request, "request_id", "")
        if not REQUEST_ID.match(request_id):
            raise invalid_field("request_id", "must be 1 to 64 characters of [A-Za-z0-9._-], "
                                f"got {request_id!r}")
        # Keys are the caller's own: another caller's identical key replays nothing.
        caller = hashlib.sha256(current_caller().describe().encode()).hexdigest()[:16]
        fingerprint = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
        return f"{self.prefix}{method}/{caller}/{request_id}", fingerprint

    async def _keep(self, key: str, fingerprint: str, response: Response,
                    response_type: type[Response], marked: bool) -> Response:
        """Store the answer over nothing or over this call's pending mark (tried first when
        the call is one that marks: `marked`); an answer another replica stored first
        stands."""
        answer = records_pb2.RequestRecord(fingerprint=fingerprint,
                                           response=response.SerializeToString())
        pending = records_pb2.RequestRecord(fingerprint=fingerprint, pending=True)
        put = Op.put(key, answer.SerializeToString(), await self._current_lease())
        guards = [Compare.absent(key), Compare.value(key) == pending.SerializeToString()]
        for guard in reversed(guards) if marked else guards:
            result = await self.store.etcd.txn(compares=[guard], success=[put], failure=[])
            if result.succeeded:
                return response
        stored = await self._stored(key, fingerprint)
        if stored is None or stored.pending:  # the key's lease lapsed meanwhile
            return response
        return response_type.FromString(stored.response)

    async def _stored(self, key: str, fingerprint: str) -> records_pb2.RequestRecord | None:
        kv = await self.store.etcd.get(key)
        if kv is None:
            return None
        record = records_pb2.RequestRecord.FromString(kv.value)
        if record.fingerprint != fingerprint:
            raise invalid_field("request_id", "was already used for a different request")
        return record

    async def _current_lease(self) -> int:
        async with self._lease_lock:
            now = time.monotonic()
            if self._lease is None or now - self._lease[1] > self.retention / 2:
                self._lease = (await self.store.etcd.lease_grant(int(self.retention)), now)
            return self._lease[0]
