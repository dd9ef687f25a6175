"""An asyncio client for the parts of etcd v3 the controller uses.

It speaks etcd's gRPC API through the trimmed protocol files in proto/vmm/etcd:
keys and prefixes, revision-guarded transactions, watches, leases and the
server-side election API.

Failure model. The client holds one channel per endpoint and sends every call
to the current one. When an endpoint cannot be reached the call moves on to the
next and is retried with backoff until `timeout` seconds have passed; then it
raises `EtcdUnavailable`. A write whose connection broke after it was sent may
or may not have been applied, so writes are retried only when they certainly
never reached a server; otherwise `EtcdUnavailable` says the outcome is
unknown and the caller re-reads. Watches, lease keepalives and election
observers reconnect on their own and resume where they left off.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import grpc
import grpc.aio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_delay
from tenacity.stop import stop_base
from tenacity.wait import wait_exponential_jitter

from vmm.etcd import election_pb2, election_pb2_grpc, kv_pb2, rpc_pb2, rpc_pb2_grpc

log = logging.getLogger(__name__)

# What a stream's read() returns once the server has closed it (missing from grpc-stubs).
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]

T = TypeVar("T")

# Keys per page when listing a prefix; all pages are read at one revision.
_PAGE_SIZE = 500
# Listings restarted because a compaction overtook their revision, before giving up.
_LISTING_ATTEMPTS = 3

_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # Come back quickly after an etcd restart; gRPC's default waits up to 2 minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Notice a dead peer under a long-lived watch. etcd refuses pings more often
    # than every 5 s (--grpc-keepalive-min-time) and pings without an open call.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]

# Pause between attempts: 50 ms doubling to 1 s, with jitter so that many
# controllers do not return to a restarted etcd in lockstep.
_BACKOFF = wait_exponential_jitter(multiplier=0.05, max=1.0, jitter=0.05)

# UNAVAILABLE details that prove the request never reached an etcd server (no
# connection), or was refused before being proposed to raft.
_NEVER_SENT_MARKERS = ("failed to connect to all addresses", "etcdserver: no leader")


# --- errors -------------------------------------------------------------------------------------


class EtcdError(Exception):
    """etcd refused a request, or answered in a way the client did not expect."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """No endpoint answered within the timeout, or a write's outcome is unknown."""


class WatchCompacted(EtcdError):
    """A watch could not resume: the revisions it had not seen yet were compacted away.

    The caller must list the prefix again and watch from that listing's revision + 1.
    """

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch revision compacted; oldest revision kept is {compact_revision}")
        self.compact_revision = compact_revision


class LeaseNotFound(EtcdError):
    """The lease does not exist: it expired, was revoked, or never existed."""


class NotLeader(EtcdError):
    """The election key given no longer holds leadership."""


# --- values ---------------------------------------------------------------------------------------


def _text(raw: bytes) -> str:
    # surrogateescape round-trips any key, even one another tool wrote in another encoding.
    return raw.decode("utf-8", "surrogateescape")


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def prefix_range_end(prefix: bytes) -> bytes:
    """The exclusive end of the key range that holds every key starting with `prefix`."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"  # etcd's spelling of "to the end of the keyspace"
    return stripped[:-1] + bytes([stripped[-1] + 1])


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_pb(cls, kv: kv_pb2.KeyValue) -> KeyValue:
        return cls(key=_text(kv.key), value=kv.value, create_revision=kv.create_revision,
                   mod_revision=kv.mod_revision, version=kv.version, lease=kv.lease)


class EventType(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True)
class WatchEvent:
    type: EventType
    # For a DELETE: the key, an empty value and the revision of the delete.
    kv: KeyValue
    # The key before this change, when the watch asked for it and the key existed.
    prev_kv: KeyValue | None
    revision: int

    @classmethod
    def from_pb(cls, event: kv_pb2.Event) -> WatchEvent:
        kind = EventType.DELETE if event.type == kv_pb2.Event.DELETE else EventType.PUT
        prev = KeyValue.from_pb(event.prev_kv) if event.HasField("prev_kv") else None
        return cls(kind, KeyValue.from_pb(event.kv), prev, event.kv.mod_revision)


@dataclass(frozen=True)
class LeaderKey:
    """Proof of leadership returned by `campaign`; pass it to `proclaim` and `resign`.

    `key` is deleted when leadership ends, and its create revision is `rev`: a
    transaction guarded by `Compare.create_revision(leader.key) == leader.rev`
    only applies while this leadership lasts.
    """

    name: str
    key: str
    rev: int
    lease: int

    @classmethod
    def from_pb(cls, leader: election_pb2.LeaderKey) -> LeaderKey:
        return cls(_text(leader.name), _text(leader.key), leader.rev, leader.lease)

    def to_pb(self) -> election_pb2.LeaderKey:
        return election_pb2.LeaderKey(name=_raw(self.name), key=_raw(self.key), rev=self.rev,
                                      lease=self.lease)


@dataclass(frozen=True)
class LeaseInfo:
    id: int
    # Seconds left before the lease expires.
    ttl: int
    granted_ttl: int
    keys: list[str]


class EtcdStatus(NamedTuple):
    version: str
    # raft member ID of the cluster's leader; 0 while there is none.
    leader_id: int
    revision: int


# --- transactions ---------------------------------------------------------------------------------


class Compare:
    """One guard of a transaction, built by comparing a key's field with a value.

        Compare.mod_revision(key) == 42      # unchanged since revision 42 (CAS)
        Compare.create_revision(key) == 0    # the key does not exist
        Compare.version(key) > 0             # the key exists
        Compare.value(key) == b"x"
    """

    __slots__ = ("pb",)

    def __init__(self, pb: rpc_pb2.Compare) -> None:
        self.pb = pb

    @staticmethod
    def version(key: str) -> CompareTarget:
        return CompareTarget(key, rpc_pb2.Compare.VERSION, "version")

    @staticmethod
    def create_revision(key: str) -> CompareTarget:
        return CompareTarget(key, rpc_pb2.Compare.CREATE, "create_revision")

    @staticmethod
    def mod_revision(key: str) -> CompareTarget:
        return CompareTarget(key, rpc_pb2.Compare.MOD, "mod_revision")

    @staticmethod
    def value(key: str) -> CompareTarget:
        return CompareTarget(key, rpc_pb2.Compare.VALUE, "value")

    @staticmethod
    def lease(key: str) -> CompareTarget:
        return CompareTarget(key, rpc_pb2.Compare.LEASE, "lease")

    @staticmethod
    def absent(key: str) -> Compare:
        """The key does not exist."""
        return Compare.create_revision(key) == 0

    def __repr__(self) -> str:
        return f"Compare({self.pb})"


class CompareTarget:
    """A key's field awaiting the comparison that turns it into a `Compare`."""

    __slots__ = ("_field", "_key", "_target")

    def __init__(self, key: str, target: int, field_name: str) -> None:
        self._key = key
        self._target = target
        self._field = field_name

    def _compare(self, result: int, operand: object) -> Compare:
        wants_bytes = self._field == "value"
        if wants_bytes != isinstance(operand, bytes) or isinstance(operand, bool):
            kind = "bytes" if wants_bytes else "an int"
            raise TypeError(f"{self._field} compares with {kind}, not {operand!r}")
        pb = rpc_pb2.Compare(result=result, target=self._target, key=_raw(self._key))  # type: ignore[arg-type]
        setattr(pb, self._field, operand)
        return Compare(pb)

    # The comparison operators build guards rather than answer questions.
    def __eq__(self, operand: object) -> Compare:  # type: ignore[override]
        return self._compare(rpc_pb2.Compare.EQUAL, operand)

    def __ne__(self, operand: object) -> Compare:  # type: ignore[override]
        return self._compare(rpc_pb2.Compare.NOT_EQUAL, operand)

    def __gt__(self, operand: object) -> Compare:
        return self._compare(rpc_pb2.Compare.GREATER, operand)

    def __lt__(self, operand: object) -> Compare:
        return self._compare(rpc_pb2.Compare.LESS, operand)

    __hash__ = None  # type: ignore[assignment]


class Op:
    """One operation of a transaction branch."""

    __slots__ = ("pb",)

    def __init__(self, pb: rpc_pb2.RequestOp) -> None:
        self.pb = pb

    @staticmethod
    def get(key: str) -> Op:
        return Op(rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=_raw(key))))

    @staticmethod
    def get_prefix(prefix: str) -> Op:
        raw = _raw(prefix)
        return Op(rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(
            key=raw, range_end=prefix_range_end(raw))))

    @staticmethod
    def put(key: str, value: bytes, lease: int = 0) -> Op:
        return Op(rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(
            key=_raw(key), value=value, lease=lease)))

    @staticmethod
    def delete(key: str) -> Op:
        return Op(rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=_raw(key))))

    @staticmethod
    def delete_prefix(prefix: str) -> Op:
        raw = _raw(prefix)
        return Op(rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(
            key=raw, range_end=prefix_range_end(raw))))

    def __repr__(self) -> str:
        return f"Op({self.pb})"


@dataclass(frozen=True)
class GetResult:
    kvs: list[KeyValue]


@dataclass(frozen=True)
class PutResult:
    pass


@dataclass(frozen=True)
class DeleteResult:
    deleted: int


OpResult = GetResult | PutResult | DeleteResult


@dataclass(frozen=True)
class TxnResult:
    # Whether every compare held, so the success branch ran.
    succeeded: bool
    # The store's revision after the transaction.
    revision: int
    # One result per operation of the branch that ran, in order.
    responses: list[OpResult] = field(default_factory=list)


def _op_result(response: rpc_pb2.ResponseOp) -> OpResult:
    kind = response.WhichOneof("response")
    if kind == "response_range":
        return GetResult([KeyValue.from_pb(kv) for kv in response.response_range.kvs])
    if kind == "response_delete_range":
        return DeleteResult(response.response_delete_range.deleted)
    return PutResult()


# --- connections ----------------------------------------------------------------------------------


class _EndpointDown(Exception):
    """The current endpoint failed in a way that makes retrying elsewhere safe."""


class _Endpoint:
    """One etcd client URL: its channel and the service stubs on it."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        # The generated stubs are untyped; requests and responses are typed where used.
        self.kv: Any = rpc_pb2_grpc.KVStub(self.channel)
        self.watch: Any = rpc_pb2_grpc.WatchStub(self.channel)
        self.lease: Any = rpc_pb2_grpc.LeaseStub(self.channel)
        self.maintenance: Any = rpc_pb2_grpc.MaintenanceStub(self.channel)
        self.election: Any = election_pb2_grpc.ElectionStub(self.channel)

    async def wait_connected(self, within: float, *, give_up_on_failure: bool) -> bool:
        """Wait until the channel is connected; False after `within` seconds, or on the
        first failed attempt when `give_up_on_failure` (there are other endpoints to try)."""
        deadline = time.monotonic() + within
        state = self.channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            if state == grpc.ChannelConnectivity.SHUTDOWN:
                return False
            if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE and give_up_on_failure:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self.channel.wait_for_state_change(state), remaining)
            except TimeoutError:
                return False
            state = self.channel.get_state(try_to_connect=True)
        return True


def _normalise_endpoint(endpoint: str) -> str:
    if endpoint.startswith("https://"):
        raise ValueError(f"{endpoint}: TLS endpoints are not supported yet")
    address = endpoint.removeprefix("http://").rstrip("/")
    if not address or ":" not in address:
        raise ValueError(f"{endpoint!r}: expected host:port")
    return address


class _EndpointPool:
    """The endpoints in order, and which one calls currently go to."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self.endpoints = [_Endpoint(address) for address in addresses]
        self._current = 0

    @property
    def current(self) -> _Endpoint:
        return self.endpoints[self._current]

    def fail_over(self, failed: _Endpoint, reason: str) -> None:
        """Move on from `failed`, unless another call already did."""
        if len(self.endpoints) > 1 and self.current is failed:
            self._current = (self._current + 1) % len(self.endpoints)
            log.warning("etcd endpoint %s failed (%s); switching to %s",
                        failed.address, reason, self.current.address)

    async def close(self) -> None:
        await asyncio.gather(*(e.channel.close(grace=None) for e in self.endpoints))


class _StopAfterOutage(stop_base):
    """Stop condition for calls that may rightly run for a long time (a campaign
    waits until elected): give up once attempts have kept failing for `budget`
    seconds, counted from the first failure rather than from the first attempt.
    An attempt that ran longer than the budget before failing starts a new count."""

    def __init__(self, budget: float) -> None:
        self._budget = budget
        self._failing_since: float | None = None
        self._attempt_started = time.monotonic()

    def attempt_started(self) -> None:
        self._attempt_started = time.monotonic()

    def __call__(self, retry_state: RetryCallState) -> bool:
        now = time.monotonic()
        if self._failing_since is None or now - self._attempt_started > self._budget:
            self._failing_since = now
        return now - self._failing_since >= self._budget


def _error_text(error: grpc.aio.AioRpcError) -> str:
    return f"{error.code().name}: {error.details()}"


# --- the client -----------------------------------------------------------------------------------


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
        self.endpoints = [_normalise_endpoint(e) for e in endpoints]
        self.timeout = timeout
        self._pool: _EndpointPool | None = None

    # lifecycle

    async def connect(self) -> None:
        """Open a channel per endpoint and wait until one of them answers.

        Raises EtcdUnavailable when none does within the timeout.
        """
        if self._pool is None:
            self._pool = _EndpointPool(self.endpoints)
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
        request = rpc_pb2.RangeRequest(key=_raw(key))
        response = await self._call(lambda ep, t: ep.kv.Range(request, timeout=t),
                                    idempotent=True)
        return KeyValue.from_pb(response.kvs[0]) if response.kvs else None

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under `prefix` in key order, and the revision they were read at.

        Watching from that revision + 1 sees every change after this listing.
        """
        raw = _raw(prefix)
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
                  ) -> Callable[[_Endpoint, float], Awaitable[rpc_pb2.RangeResponse]]:
        async def range_on(endpoint: _Endpoint, seconds_left: float) -> rpc_pb2.RangeResponse:
            response: rpc_pb2.RangeResponse = await endpoint.kv.Range(request,
                                                                      timeout=seconds_left)
            return response
        return range_on

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write the key; returns the revision of the write."""
        request = rpc_pb2.PutRequest(key=_raw(key), value=value, lease=lease)
        response = await self._call(lambda ep, t: ep.kv.Put(request, timeout=t),
                                    idempotent=False)
        return int(response.header.revision)

    async def delete(self, key: str) -> bool:
        """Delete the key; False when it did not exist."""
        request = rpc_pb2.DeleteRangeRequest(key=_raw(key))
        response = await self._call(lambda ep, t: ep.kv.DeleteRange(request, timeout=t),
                                    idempotent=False)
        return bool(response.deleted)

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under `prefix`; returns how many there were."""
        raw = _raw(prefix)
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
                         [_op_result(r) for r in response.responses])

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
        raw = _raw(prefix)
        async for event in self._watch(raw, prefix_range_end(raw), start_revision, prev_kv):
            yield event

    async def watch(self, key: str, start_revision: int | None = None, *,
                    prev_kv: bool = False) -> AsyncGenerator[WatchEvent, None]:
        """Like `watch_prefix`, for a single key."""
        async for event in self._watch(_raw(key), b"", start_revision, prev_kv):
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
                          ) -> tuple[_Endpoint, Any, rpc_pb2.WatchResponse]:
        async def open_on(endpoint: _Endpoint, seconds_left: float
                          ) -> tuple[_Endpoint, Any, rpc_pb2.WatchResponse]:
            call = endpoint.watch.Watch()
            try:
                await call.write(rpc_pb2.WatchRequest(create_request=create))
                created = await asyncio.wait_for(call.read(), seconds_left)
            except BaseException:
                call.cancel()
                raise
            if created is _EOF or not created.created:
                call.cancel()
                raise _EndpointDown(f"{endpoint.address}: watch was not created")
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
                         [_text(k) for k in response.keys])

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

        async def refresh_on(endpoint: _Endpoint, seconds_left: float) -> int:
            call = endpoint.lease.LeaseKeepAlive()
            try:
                await call.write(request)
                response = await asyncio.wait_for(call.read(), seconds_left)
            finally:
                call.cancel()
            if response is _EOF:
                raise _EndpointDown(f"{endpoint.address}: keepalive stream closed")
            return max(int(response.ttl), 0)

        return await self._call(refresh_on, idempotent=True, budget=budget)

    # election

    async def campaign(self, name: str, value: bytes, lease: int) -> LeaderKey:
        """Wait until elected leader of `name`, then announce `value`.

        Leadership ends when `lease` ends (keep it alive with `keepalive`), or on
        `resign`. Cancelling the wait withdraws the candidacy. Raises LeaseNotFound
        when the lease is gone.
        """
        request = election_pb2.CampaignRequest(name=_raw(name), lease=lease, value=value)
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
        request = election_pb2.LeaderRequest(name=_raw(name))
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
        request = election_pb2.LeaderRequest(name=_raw(name))
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
                            ) -> tuple[_Endpoint, Any]:
        async def open_on(endpoint: _Endpoint, seconds_left: float) -> tuple[_Endpoint, Any]:
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

    # the retry machinery

    async def _call(self, invoke: Callable[[_Endpoint, float], Awaitable[T]], *,
                    idempotent: bool, budget: float | None = None,
                    long_running: bool = False) -> T:
        """Run `invoke(endpoint, seconds_left)` on a connected endpoint, failing over
        and retrying with backoff; raise EtcdUnavailable once `budget` seconds (default:
        the client's timeout) have gone by without success.

        A `long_running` call (a campaign) may rightly wait for a long time, so only the
        time spent failing counts against the budget, and each attempt gets a fresh one.
        """
        pool = self._require_pool()
        budget = self.timeout if budget is None else budget
        outage = _StopAfterOutage(budget) if long_running else None
        retrying = AsyncRetrying(
            stop=outage or stop_after_delay(budget),
            wait=_BACKOFF,
            retry=retry_if_exception_type(_EndpointDown),
            reraise=True,
        )
        deadline = time.monotonic() + budget
        try:
            async for attempt in retrying:
                with attempt:
                    if outage is not None:
                        outage.attempt_started()
                        deadline = time.monotonic() + budget
                    endpoint = await self._connected(pool, deadline)
                    try:
                        return await invoke(endpoint, max(deadline - time.monotonic(), 0.001))
                    except grpc.aio.AioRpcError as error:
                        self._raise_unless_retryable(error, endpoint, idempotent)
                        raise _EndpointDown(_error_text(error)) from error
                    except TimeoutError as error:
                        # A stream that got no answer in time: only streams time out
                        # this way, and they are all safe to retry.
                        pool.fail_over(endpoint, "no answer")
                        raise _EndpointDown(f"{endpoint.address}: no answer") from error
        except _EndpointDown as error:
            raise EtcdUnavailable(
                f"no etcd endpoint of {', '.join(self.endpoints)} answered within "
                f"{budget:g}s (last error: {error})", grpc.StatusCode.UNAVAILABLE) from error
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _connected(self, pool: _EndpointPool, deadline: float) -> _Endpoint:
        """The current endpoint once connected; fails over when it does not connect.

        With several endpoints, one that is refusing connections is left at once and
        one that does not answer gets its share of the timeout.
        """
        endpoint = pool.current
        several = len(pool.endpoints) > 1
        wait = deadline - time.monotonic()
        if several:
            wait = min(wait, max(self.timeout / len(pool.endpoints), 0.5))
        if await endpoint.wait_connected(wait, give_up_on_failure=several):
            return endpoint
        pool.fail_over(endpoint, "cannot connect")
        raise _EndpointDown(f"{endpoint.address}: cannot connect")

    def _raise_unless_retryable(self, error: grpc.aio.AioRpcError, endpoint: _Endpoint,
                                idempotent: bool) -> None:
        """Raise the EtcdError that `error` means, unless the call may safely be
        retried on another endpoint; then fail over and return."""
        code, details = error.code(), error.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            if idempotent or any(marker in details for marker in _NEVER_SENT_MARKERS):
                self._require_pool().fail_over(endpoint, _error_text(error))
                return
            raise EtcdUnavailable(
                f"etcd connection lost during a write; it may or may not have been applied "
                f"({_error_text(error)})", code) from error
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise EtcdUnavailable(f"etcd did not answer in time ({_error_text(error)})",
                                  code) from error
        if "requested lease not found" in details:
            raise LeaseNotFound(details, code) from error
        if "election: not leader" in details:
            raise NotLeader(details, code) from error
        raise EtcdError(_error_text(error), code) from error

    def _require_pool(self) -> _EndpointPool:
        if self._pool is None:
            raise RuntimeError("EtcdClient is not connected: call connect() first")
        return self._pool


# --- lease keepalive ------------------------------------------------------------------------------


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


__all__ = [
    "Compare",
    "CompareTarget",
    "DeleteResult",
    "EtcdClient",
    "EtcdError",
    "EtcdStatus",
    "EtcdUnavailable",
    "EventType",
    "GetResult",
    "KeyValue",
    "LeaderKey",
    "LeaseInfo",
    "LeaseKeepAlive",
    "LeaseNotFound",
    "NotLeader",
    "Op",
    "OpResult",
    "PutResult",
    "TxnResult",
    "WatchCompacted",
    "WatchEvent",
    "prefix_range_end",
]
