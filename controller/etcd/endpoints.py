"""The endpoints of an etcd cluster, and the failover and retries that get a call answered
by one of them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_delay
from tenacity.stop import stop_base
from tenacity.wait import wait_exponential_jitter

from controller.etcd.errors import EtcdError, EtcdUnavailable, LeaseNotFound, NotLeader
from vmm.etcd import election_pb2_grpc, rpc_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

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


class EndpointDown(Exception):
    """The current endpoint failed in a way that makes retrying elsewhere safe."""


class Endpoint:
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


def normalise_endpoint(endpoint: str) -> str:
    if endpoint.startswith("https://"):
        raise ValueError(f"{endpoint}: TLS endpoints are not supported yet")
    address = endpoint.removeprefix("http://").rstrip("/")
    if not address or ":" not in address:
        raise ValueError(f"{endpoint!r}: expected host:port")
    return address


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


class EndpointPool:
    """The endpoints in order, which one calls currently go to, and `call`, which moves
    on to the next one when the current one fails."""

    def __init__(self, addresses: Sequence[str], timeout: float) -> None:
        self.endpoints = [Endpoint(address) for address in addresses]
        # The client's timeout: a call's default budget, shared out among the endpoints
        # that do not connect.
        self.timeout = timeout
        self._current = 0

    @property
    def current(self) -> Endpoint:
        return self.endpoints[self._current]

    def fail_over(self, failed: Endpoint, reason: str) -> None:
        """Move on from `failed`, unless another call already did."""
        if len(self.endpoints) > 1 and self.current is failed:
            self._current = (self._current + 1) % len(self.endpoints)
            log.warning("etcd endpoint %s failed (%s); switching to %s",
                        failed.address, reason, self.current.address)

    async def close(self) -> None:
        await asyncio.gather(*(e.channel.close(grace=None) for e in self.endpoints))

    async def call(self, invoke: Callable[[Endpoint, float], Awaitable[T]], *,
                   idempotent: bool, budget: float | None = None,
                   long_running: bool = False) -> T:
        """Run `invoke(endpoint, seconds_left)` on a connected endpoint, failing over
        and retrying with backoff; raise EtcdUnavailable once `budget` seconds (default:
        the client's timeout) have gone by without success.

        A `long_running` call (a campaign) may rightly wait for a long time, so only the
        time spent failing counts against the budget, and each attempt gets a fresh one.
        """
        budget = total = self.timeout if budget is None else budget
        deadline = time.monotonic() + budget
        if not long_running:
            # Nearly every call succeeds at once: only one whose first attempt failed pays
            # for the retry loop (tenacity costs ~25 us a call, a tenth of an etcd write).
            try:
                return await self._attempt(invoke, deadline, idempotent)
            except EndpointDown:
                budget = max(deadline - time.monotonic(), 0.0)
        outage = _StopAfterOutage(budget) if long_running else None
        retrying = AsyncRetrying(
            stop=outage or stop_after_delay(budget),
            wait=_BACKOFF,
            retry=retry_if_exception_type(EndpointDown),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if outage is not None:
                        outage.attempt_started()
                        deadline = time.monotonic() + budget
                    return await self._attempt(invoke, deadline, idempotent)
        except EndpointDown as error:
            addresses = ", ".join(e.address for e in self.endpoints)
            raise EtcdUnavailable(
                f"no etcd endpoint of {addresses} answered within "
                f"{total:g}s (last error: {error})", grpc.StatusCode.UNAVAILABLE) from error
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _attempt(self, invoke: Callable[[Endpoint, float], Awaitable[T]],
                       deadline: float, idempotent: bool) -> T:
        """One try on the current endpoint; EndpointDown when another try may follow."""
        endpoint = await self._connected(deadline)
        try:
            return await invoke(endpoint, max(deadline - time.monotonic(), 0.001))
        except grpc.aio.AioRpcError as error:
            self.raise_unless_retryable(error, endpoint, idempotent)
            raise EndpointDown(_error_text(error)) from error
        except TimeoutError as error:
            # A stream that got no answer in time: only streams time out this way, and
            # they are all safe to retry.
            self.fail_over(endpoint, "no answer")
            raise EndpointDown(f"{endpoint.address}: no answer") from error

    async def _connected(self, deadline: float) -> Endpoint:
        """The current endpoint once connected; fails over when it does not connect.

        With several endpoints, one that is refusing connections is left at once and
        one that does not answer gets its share of the timeout.
        """
        endpoint = self.current
        several = len(self.endpoints) > 1
        wait = deadline - time.monotonic()
        if several:
            wait = min(wait, max(self.timeout / len(self.endpoints), 0.5))
        if await endpoint.wait_connected(wait, give_up_on_failure=several):
            return endpoint
        self.fail_over(endpoint, "cannot connect")
        raise EndpointDown(f"{endpoint.address}: cannot connect")

    def raise_unless_retryable(self, error: grpc.aio.AioRpcError, endpoint: Endpoint,
                               idempotent: bool) -> None:
        """Raise the EtcdError that `error` means, unless the call may safely be
        retried on another endpoint; then fail over and return."""
        code, details = error.code(), error.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            if idempotent or any(marker in details for marker in _NEVER_SENT_MARKERS):
                self.fail_over(endpoint, _error_text(error))
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
