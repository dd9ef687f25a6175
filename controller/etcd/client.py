"""The etcd client: keys, transactions, watches, leases and election over one pool of
endpoints."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio

from controller.etcd.endpoints import Endpoint, EndpointDown, EndpointPool, normalise_endpoint
from controller.etcd.errors import EtcdError, LeaseNotFound, WatchCompacted
from controller.etcd.keepalive import LeaseKeepAlive
from controller.etcd.txn import Compare, Op, TxnResult, op_result
from controller.etcd.values import (
    EtcdStatus,
    KeyValue,
    LeaderKey,
    LeaseInfo,
    WatchEvent,
    decode_key,
    encode_key,
    prefix_range_end,
)
from vmm.etcd import election_pb2, rpc_pb2

# What a stream's read() returns once the server has closed it (missing from grpc-stubs).
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]

T = TypeVar("T")

# Keys per page when listing a prefix; all pages are read at one revision.
_PAGE_SIZE = 500
# Listings restarted because a compaction overtook their revision, before giving up.
_LISTING_ATTEMPTS = 3


class EtcdClient:
    """A connection to an etcd v3 cluster through any of its client endpoints.

        async with EtcdClient(["127.0.0.1:2379"]) as etcd:
            revision = await etcd.put("/vmm/vms/a", b"...")
    """

    def __init__(self, endpoints: list[str], timeout: float = 5.0) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.endpoints = [normalise_endpoint(e) for e in endpoints]
        self.timeout = timeout
        self._pool: EndpointPool | None = None

    # lifecycle

    async def connect(self) -> None:
        """Open a channel per endpoint and wait until one of them answers.

        Raises EtcdUnavailable when none does within the timeout.
        """
        if self._pool is None:
            self._pool = EndpointPool(self.endpoints, self.timeout)
        await self.status()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def __aenter__(self) -> EtcdClient:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # keys

    async def get(self, key: str) -> KeyValue | None:
        """The key, or None when it does not exist."""
        request = rpc_pb2.RangeRequest(key=encode_key(key))
        response = await self._call(lambda ep, t: ep.kv.Range(request, timeout=t),
                                    idempotent=True)
        return KeyValue.from_pb(response.kvs[0]) if response.kvs else None

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under `prefix` in key order, and the revision they were read at.

        Watching from that revision + 1 sees every change after this listing.
        """
        raw = encode_key(prefix)
        end = prefix_range_end(raw)
        for _ in range(_LISTING_ATTEMPTS - 1):
            try:
                return await self._read_pages(raw, end)
            except EtcdError as error:
                # A compaction overtook the pinned revision between two pages: start over.
                if "required revision has been compacted" not in str(error):
                    raise
        return await self._read_pages(raw, end)

    async def _read_pages(self, start: bytes, end: bytes) -> tuple[list[KeyValue], int]:
        kvs: list[KeyValue] = []
        revision = 0
        while True:
            request = rpc_pb2.RangeRequest(key=start, range_end=end, limit=_PAGE_SIZE,
                                           revision=revision)
            response = await self._call(self._range_on(request), idempotent=True)
            revision = revision or response.header.revision
            kvs.extend(KeyValue.from_pb(kv) for kv in response.kvs)
            if not response.more:
                return kvs, revision
            start = response.kvs[-1].key + b"\0"

    @staticmethod
    def _range_on(request: rpc_pb2.RangeRequest
                  ) -> Callable[[Endpoint, float], Awaitable[rpc_pb2.RangeResponse]]:
        async def range_on(endpoint: Endpoint, seconds_left: float) -> rpc_pb2.RangeResponse:
            response: rpc_pb2.RangeResponse = await endpoint.kv.Range(request,
                                                                      timeout=seconds_left)
            return response
        return range_on

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write the key; returns the revision of the write."""
        request = rpc_pb2.PutRequest(key=encode_key(key), value=value, lease=lease)
        response = await self._call(lambda ep, t: ep.kv.Put(request, timeout=t),
                                    idempotent=False)
        return int(response.header.revision)

    async def delete(self, key: str) -> bool:
        """Delete the key; False when it did not exist."""
        request = rpc_pb2.DeleteRangeRequest(key=encode_key(key))
        response = await self._call(lambda ep, t: ep.kv.DeleteRange(request, timeout=t),
                                    idempotent=False)
        return bool(response.deleted)

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under `prefix`; returns how many there were."""
        raw = encode_key(prefix)
        request = rpc_pb2.DeleteRangeRequest(key=raw, range_end=prefix_range_end(raw))
        response = await self._call(lambda ep, t: ep.kv.DeleteRange(request, timeout=t),
                                    idempotent=False)
        return int(response.deleted)

    async def compact(self, revision: int) -> None:
        """Discard the history before `revision` (watches cannot start earlier)."""
        request = rpc_pb2.CompactionRequest(revision=revision, physical=True)
        await self._call(lambda ep, t: ep.kv.Compact(request, timeout=t), idempotent=False)

    # transactions

    async def txn(self, compares: Sequence[Compare], success: Sequence[Op],
                  failure: Sequence[Op] = ()) -> TxnResult:
        """Run `success` if every compare holds, else `failure`, as one atomic step."""
        request = rpc_pb2.TxnRequest(compare=[c.pb for c in compares],
                                     success=[o.pb for o in success],
                                     failure=[o.pb for o in failure])
        response = await self._call(lambda ep, t: ep.kv.Txn(request, timeout=t),
                                    idempotent=False)
        return TxnResult(response.succeeded, response.header.revision,
                         [op_result(r) for r in response.responses])

    async def create(self, key: str, value: bytes, lease: int = 0) -> int | None:
        """Write the key only if it does not exist; its revision, or None if it existed."""
        return await self.compare_and_swap(key, value, 0, lease)

    async def compare_and_swap(self, key: str, value: bytes, mod_revision: int,
                               lease: int = 0) -> int | None:
        """Write the key only if it was last modified at `mod_revision` (0: absent).

        Returns the revision of the write, or None when someone else got there first.
        """
        result = await self.txn([Compare.mod_revision(key) == mod_revision],
                                [Op.put(key, value, lease)])
        return result.revision if result.succeeded else None

    async def compare_and_delete(self, key: str, mod_revision: int) -> bool:
        """Delete the key only if it was last modified at `mod_revision`."""
        result = await self.txn([Compare.mod_revision(key) == mod_revision], [Op.delete(key)])
        return result.succeeded

    # watches

    async def watch_prefix(self, prefix: str, start_revision: int | None = None, *,
                           prev_kv: bool = False) -> AsyncGenerator[WatchEvent, None]:
        """Every change under `prefix`, from `start_revision` on (default: from now).

        Survives endpoint failures and etcd restarts: it reconnects and resumes after
        the last event delivered, so no event is lost or repeated. Raises
        WatchCompacted when the revision to resume from is no longer kept, and
        EtcdUnavailable when no endpoint comes back within the timeout.
        """
        raw = encode_key(prefix)
        async for event in self._watch(raw, prefix_range_end(raw), start_revision, prev_kv):
            yield event

    async def watch(self, key: str, start_revision: int | None = None, *,
                    prev_kv: bool = False) -> AsyncGenerator[WatchEvent, None]:
        """Like `watch_prefix`, for a single key."""
        async for event in self._watch(encode_key(key), b"", start_revision, prev_kv):
            yield event

    async def _watch(self, key: bytes, range_end: bytes, start_revision: int | None,
                     prev_kv: bool) -> AsyncGenerator[WatchEvent, None]:
        # 0 asks etcd for "after the current revision"; the created response tells which.
        next_revision = start_revision or 0
        while True:
            create = rpc_pb2.WatchCreateRequest(key=key, range_end=range_end,
                                                start_revision=next_revision,
                                                progress_notify=True, prev_kv=prev_kv)
            endpoint, call, created = await self._open_watch(create)
            if next_revision == 0:
                next_revision = created.header.revision + 1
            try:
                while True:
                    response = await call.read()
                    if response is _EOF:
                        break  # the server ended the stream: resume on a new one
                    if response.compact_revision:
                        raise WatchCompacted(response.compact_revision)
                    if response.canceled:
                        raise EtcdError(f"etcd cancelled the watch: {response.cancel_reason}")
                    if not response.events:
                        # Progress notification: nothing we watch changed up to here.
                        next_revision = max(next_revision, response.header.revision + 1)
                        continue
                    for pb in response.events:
                        event = WatchEvent.from_pb(pb)
                        next_revision = event.revision + 1
                        yield event
            except grpc.aio.AioRpcError as error:
                self._raise_unless_retryable(error, endpoint, idempotent=True)
            finally:
                call.cancel()

    async def _open_watch(self, create: rpc_pb2.WatchCreateRequest
                          ) -> tuple[Endpoint, Any, rpc_pb2.WatchResponse]:
        async def open_on(endpoint: Endpoint, seconds_left: float
                          ) -> tuple[Endpoint, Any, rpc_pb2.WatchResponse]:
            call = endpoint.watch.Watch()
            try:
                await call.write(rpc_pb2.WatchRequest(create_request=create))
                created = await asyncio.wait_for(call.read(), seconds_left)
            except BaseException:
                call.cancel()
                raise
            if created is _EOF or not created.created:
                call.cancel()
                raise EndpointDown(f"{endpoint.address}: watch was not created")
            return endpoint, call, created

        return await self._call(open_on, idempotent=True)

    # leases

    async def lease_grant(self, ttl: int) -> int:
        """A new lease that expires `ttl` seconds after its last keepalive; its ID."""
        request = rpc_pb2.LeaseGrantRequest(ttl=ttl)
        response = await self._call(lambda ep, t: ep.lease.LeaseGrant(request, timeout=t),
                                    idempotent=False)
        if response.error:
            raise EtcdError(f"lease grant refused: {response.error}")
        return int(response.id)

    async def lease_revoke(self, lease_id: int) -> None:
        """Revoke the lease, deleting its keys. A lease that is already gone is fine."""
        request = rpc_pb2.LeaseRevokeRequest(id=lease_id)
        with contextlib.suppress(LeaseNotFound):
            await self._call(lambda ep, t: ep.lease.LeaseRevoke(request, timeout=t),
                             idempotent=True)

    async def lease_time_to_live(self, lease_id: int, *, keys: bool = False) -> LeaseInfo | None:
        """The lease's remaining time to live, or None when it no longer exists."""
        request = rpc_pb2.LeaseTimeToLiveRequest(id=lease_id, keys=keys)
        response = await self._call(lambda ep, t: ep.lease.LeaseTimeToLive(request, timeout=t),
                                    idempotent=True)
        if response.ttl < 0:
            return None
        return LeaseInfo(response.id, response.ttl, response.granted_ttl,
                         [decode_key(k) for k in response.keys])

    def keepalive(self, lease_id: int) -> LeaseKeepAlive:
        """Keeps an existing lease alive while entered: `async with etcd.keepalive(id):`."""
        return LeaseKeepAlive(self, lease_id=lease_id)

    def lease(self, ttl: int) -> LeaseKeepAlive:
        """A lease granted on entry, kept alive while entered and revoked on exit."""
        return LeaseKeepAlive(self, grant_ttl=ttl)

    async def _keepalive_once(self, lease_id: int, budget: float) -> int:
        """Refresh the lease once; its new TTL, or 0 when it no longer exists.

        Each refresh is one exchange on a short-lived LeaseKeepAlive stream, so it
        fails over and retries like any other call, within `budget` seconds.
        """
        request = rpc_pb2.LeaseKeepAliveRequest(id=lease_id)

        async def refresh_on(endpoint: Endpoint, seconds_left: float) -> int:
            call = endpoint.lease.LeaseKeepAlive()
            try:
                await call.write(request)
                response = await asyncio.wait_for(call.read(), seconds_left)
            finally:
                call.cancel()
            if response is _EOF:
                raise EndpointDown(f"{endpoint.address}: keepalive stream closed")
            return max(int(response.ttl), 0)

        return await self._call(refresh_on, idempotent=True, budget=budget)

    # election

    async def campaign(self, name: str, value: bytes, lease: int) -> LeaderKey:
        """Wait until elected leader of `name`, then announce `value`.

        Leadership ends when `lease` ends (keep it alive with `keepalive`), or on
        `resign`. Cancelling the wait withdraws the candidacy. Raises LeaseNotFound
        when the lease is gone.
        """
        request = election_pb2.CampaignRequest(name=encode_key(name), lease=lease, value=value)
        # No deadline: the call returns when this candidate is elected.
        response = await self._call(lambda ep, _: ep.election.Campaign(request),
                                    idempotent=True, long_running=True)
        return LeaderKey.from_pb(response.leader)

    async def proclaim(self, leader: LeaderKey, value: bytes) -> None:
        """Announce a new value as the leader. Raises NotLeader if leadership was lost."""
        request = election_pb2.ProclaimRequest(leader=leader.to_pb(), value=value)
        await self._call(lambda ep, t: ep.election.Proclaim(request, timeout=t),
                         idempotent=True)

    async def resign(self, leader: LeaderKey) -> None:
        """Give up leadership so that the next campaigner takes over."""
        request = election_pb2.ResignRequest(leader=leader.to_pb())
        await self._call(lambda ep, t: ep.election.Resign(request, timeout=t),
                         idempotent=True)

    async def leader(self, name: str) -> KeyValue | None:
        """The current leader's key and announced value, or None when nobody leads."""
        request = election_pb2.LeaderRequest(name=encode_key(name))
        try:
            response = await self._call(lambda ep, t: ep.election.Leader(request, timeout=t),
                                        idempotent=True)
        except EtcdError as error:
            if "election: no leader" in str(error):
                return None
            raise
        return KeyValue.from_pb(response.kv)

    async def observe(self, name: str) -> AsyncGenerator[KeyValue, None]:
        """The leader's key and value now (if there is a leader) and after every change.

        Survives endpoint failures like `watch_prefix`; a reconnect does not repeat
        the leader already delivered.
        """
        request = election_pb2.LeaderRequest(name=encode_key(name))
        last_seen: tuple[str, int] | None = None
        while True:
            endpoint, call = await self._open_observe(request)
            try:
                async for response in call:
                    kv = KeyValue.from_pb(response.kv)
                    if (kv.key, kv.mod_revision) != last_seen:
                        last_seen = (kv.key, kv.mod_revision)
                        yield kv
            except grpc.aio.AioRpcError as error:
                self._raise_unless_retryable(error, endpoint, idempotent=True)
            finally:
                call.cancel()

    async def _open_observe(self, request: election_pb2.LeaderRequest
                            ) -> tuple[Endpoint, Any]:
        async def open_on(endpoint: Endpoint, seconds_left: float) -> tuple[Endpoint, Any]:
            # Observe says nothing until there is a leader; a Leader call first proves
            # that this endpoint answers, so a dead one is left within the timeout.
            try:
                await endpoint.election.Leader(request, timeout=seconds_left)
            except grpc.aio.AioRpcError as error:
                if "election: no leader" not in (error.details() or ""):
                    raise
            return endpoint, endpoint.election.Observe(request)

        return await self._call(open_on, idempotent=True)

    # health

    async def status(self) -> EtcdStatus:
        """Version, raft leader and current revision of the member that answered."""
        request = rpc_pb2.StatusRequest()
        response = await self._call(lambda ep, t: ep.maintenance.Status(request, timeout=t),
                                    idempotent=True)
        return EtcdStatus(response.version, response.leader, response.header.revision)

    # calls, through the endpoint pool

    async def _call(self, invoke: Callable[[Endpoint, float], Awaitable[T]], *,
                    idempotent: bool, budget: float | None = None,
                    long_running: bool = False) -> T:
        """Run `invoke(endpoint, seconds_left)` with failover and retries (EndpointPool.call)."""
        return await self._require_pool().call(invoke, idempotent=idempotent, budget=budget,
                                               long_running=long_running)

    def _raise_unless_retryable(self, error: grpc.aio.AioRpcError, endpoint: Endpoint,
                                idempotent: bool) -> None:
        """Raise the EtcdError that a stream's `error` means, unless the stream may be
        reopened on another endpoint (EndpointPool.raise_unless_retryable)."""
        self._require_pool().raise_unless_retryable(error, endpoint, idempotent)

    def _require_pool(self) -> EndpointPool:
        if self._pool is None:
            raise RuntimeError("EtcdClient is not connected: call connect() first")
        return self._pool
