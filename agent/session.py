"""The agent's stream to the controller: register, heartbeat, report, obey desired state.

The agent dials out; when the stream breaks it reconnects after a random wait that grows
exponentially up to a cap (full jitter, so a fleet of agents reconnecting after a
controller restart spreads out) and registers again with everything it runs, so a
restarted controller (or agent) converges without losing anything.

`controller` names the replicas: a comma-separated list of addresses, tried in turn from
the first (each failure moves to the next), or one gRPC target such as
`dns:///controllers.internal:50051`, whose resolver returns every replica.

Heartbeats go out on a fixed schedule: the configured interval until the controller sends
its HeartbeatSettings, then the controller's. A beat never waits for the hypervisors: it
carries the host's metrics and the per-VM metrics sampled since the previous beat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import grpc
import psutil
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from agent.config import AgentConfig
from agent.console import ConsoleRelay
from agent.metrics import AgentTelemetry, MetricsSampler
from agent.reconciler import Reconciler
from agent.runtimes.base import Runtime, RuntimeFailure
from vmm.agent.v1 import agent_pb2, agent_pb2_grpc
from vmm.v1 import host_pb2

log = logging.getLogger(__name__)
AGENT_VERSION = "0.1.0"


# The first reconnect waits up to this long; each failed attempt doubles the bound.
RECONNECT_BACKOFF_INITIAL = 0.5
_RECONNECT_ERRORS = (grpc.aio.AioRpcError, OSError)


class StreamBroken(Exception):
    """The stream to the controller ended before it was established; reconnect."""


class SessionEnded(Exception):
    """An established stream ended; reconnect, with the backoff starting over."""


class ControllerSession:
    def __init__(self, config: AgentConfig, reconciler: Reconciler,
                 runtimes: dict[str, Runtime], sampler: MetricsSampler | None = None,
                 telemetry: AgentTelemetry | None = None) -> None:
        self.config = config
        self.reconciler = reconciler
        self.runtimes = runtimes
        self.sampler = sampler
        self.telemetry = telemetry
        self.console = ConsoleRelay(reconciler.state)
        self._outbound: asyncio.Queue[agent_pb2.ConnectRequest] | None = None
        self._requests: dict[str, asyncio.Task[None]] = {}
        self.connected = asyncio.Event()
        # The controller's HeartbeatSettings on the current stream, if it sent any.
        self.heartbeat_settings: agent_pb2.HeartbeatSettings | None = None
        self._settings_changed = asyncio.Event()
        self.heartbeats_sent = 0
        self._was_connected = False
        self.targets = controller_targets(config.controller)
        # The first replica is the preferred one; the others are where it fails over to.
        self._target = 0

    @property
    def controller(self) -> str:
        """The replica address this agent dials now."""
        return self.targets[self._target]
        # The host's bridges as of the last registration.
        self.bridges: list[str] = []

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between heartbeats: the controller's setting, else the configured one."""
        if self.heartbeat_settings is not None and self.heartbeat_settings.interval_seconds > 0:
            return self.heartbeat_settings.interval_seconds
        return self.config.heartbeat_interval

    def report(self, status: agent_pb2.VmStatus) -> None:
        """Queue a VM status for the controller (dropped while disconnected: the next
        registration carries every VM's status anyway)."""
        if self._outbound is not None:
            self._outbound.put_nowait(agent_pb2.ConnectRequest(vm_status=status))

    def registration(self) -> agent_pb2.Register:
        cfg = self.config
        vcpus = cfg.vcpus or psutil.cpu_count() or 1
        memory = cfg.memory_bytes or psutil.virtual_memory().total
        return agent_pb2.Register(
            host_id=cfg.host_id, hostname=socket.gethostname(),
            capacity=host_pb2.Resources(vcpus=vcpus, memory_bytes=memory),
            cpu_overcommit_ratio=cfg.cpu_overcommit_ratio,
            memory_overcommit_ratio=cfg.memory_overcommit_ratio,
            backends=[r.describe() for r in self.runtimes.values()],
            vms=list(self.reconciler.status.values()), agent_version=AGENT_VERSION,
            labels=cfg.label_map(), bridges=self.bridges)

    def backoff(self) -> wait_random_exponential:
        """Random waits in [0, min(cap, initial * 2^(attempt-1))]."""
        return wait_random_exponential(multiplier=RECONNECT_BACKOFF_INITIAL,
                                       max=max(RECONNECT_BACKOFF_INITIAL,
                                               self.config.reconnect_backoff_max))

    async def run_forever(self) -> None:
        while True:
            try:
                async for attempt in AsyncRetrying(
                        wait=self.backoff(), reraise=True,
                        retry=retry_if_exception_type((*_RECONNECT_ERRORS, StreamBroken))):
                    with attempt:
                        await self._run_once()
            except SessionEnded as exc:
                # It was connected: the backoff starts over, after a first random wait so
                # that the agents of a restarted controller do not all come back at once.
                log.info("stream to the controller ended: %s", exc)
                await asyncio.sleep(random.uniform(0, RECONNECT_BACKOFF_INITIAL))

    async def _run_once(self) -> None:
        self._was_connected = False
        try:
            await self._stream()
        except _RECONNECT_ERRORS as exc:
            self._next_target()
            if not self._was_connected:
                raise
            raise SessionEnded(_describe(exc)) from exc
        self._next_target()
        if not self._was_connected:
            raise StreamBroken("the controller closed the stream")
        raise SessionEnded("the controller closed the stream")

    def _next_target(self) -> None:
        """The next attempt dials the next replica."""
        self._target = (self._target + 1) % len(self.targets)

    async def _stream(self) -> None:
        self.heartbeat_settings = None  # each controller (re)states its own
        if self.reconciler.network is not None:
            self.bridges = await self.reconciler.network.bridges()
        outbound: asyncio.Queue[agent_pb2.ConnectRequest] = asyncio.Queue()
        outbound.put_nowait(agent_pb2.ConnectRequest(register=self.registration()))

        async def requests() -> AsyncIterator[agent_pb2.ConnectRequest]:
            while True:
                yield await outbound.get()

        async with self._channel() as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            metadata = (("authorization", f"Bearer {self.config.token}"),) \
                if self.config.token else None
            call = stub.Connect(requests(), metadata=metadata)
            self._outbound = outbound
            heartbeat = asyncio.create_task(self._heartbeat(outbound))
            try:
                async for message in call:
                    if not self.connected.is_set():
                        self._was_connected = True
                        self.connected.set()
                        log.info("connected to controller %s as host %s",
                                 self.controller, self.config.host_id)
                    self._handle(message, outbound)
            finally:
                self._outbound = None
                self.connected.clear()
                heartbeat.cancel()
                for task in self._requests.values():
                    task.cancel()
                self._requests.clear()

    def _channel(self) -> grpc.aio.Channel:
        cfg = self.config
        options = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_permit_without_calls", 1)]
        if not (cfg.tls_ca_file or cfg.tls_cert_file):
            return grpc.aio.insecure_channel(self.controller, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(cfg.tls_ca_file).read_bytes() if cfg.tls_ca_file else None,
            private_key=Path(cfg.tls_key_file).read_bytes() if cfg.tls_key_file else None,
            certificate_chain=Path(cfg.tls_cert_file).read_bytes() if cfg.tls_cert_file else None)
        return grpc.aio.secure_channel(self.controller, credentials, options=options)

    def _handle(self, message: agent_pb2.ConnectResponse,
                outbound: asyncio.Queue[agent_pb2.ConnectRequest]) -> None:
        kind = message.WhichOneof("message")
        if kind == "heartbeat_settings":
            self._apply_heartbeat_settings(message.heartbeat_settings)
        elif kind == "desired_state":
            self.reconciler.set_desired_state(list(message.desired_state.vms))
        elif kind == "desired_vm":
            self.reconciler.set_desired(message.desired_vm)
        elif kind == "remove_vm":
            self.reconciler.remove(message.remove_vm.vm_id, message.remove_vm.force)
        elif kind == "request":
            request = message.request
            if request.HasField("cancel"):
                task = self._requests.pop(request.cancel.request_id, None)
                if task:
                    task.cancel()
                return
            task = asyncio.create_task(self._serve(request, outbound))
            self._requests[request.request_id] = task
            task.add_done_callback(partial(self._forget_request, request.request_id))

    def _apply_heartbeat_settings(self, settings: agent_pb2.HeartbeatSettings) -> None:
        before = self.heartbeat_interval
        kept = agent_pb2.HeartbeatSettings()
        kept.CopyFrom(settings)
        self.heartbeat_settings = kept
        if settings.timeout_seconds and self.heartbeat_interval >= settings.timeout_seconds:
            log.warning("the controller's heartbeat interval %.3gs is not below its timeout "
                        "%.3gs", self.heartbeat_interval, settings.timeout_seconds)
        if self.heartbeat_interval != before:
            log.info("heartbeat interval is now %.3gs (from the controller)",
                     self.heartbeat_interval)
            self._settings_changed.set()

    def _forget_request(self, request_id: str, _task: object) -> None:
        self._requests.pop(request_id, None)

    async def _serve(self, request: agent_pb2.Request,
                     outbound: asyncio.Queue[agent_pb2.ConnectRequest]) -> None:
        def send(reply: agent_pb2.Reply) -> None:
            reply.request_id = request.request_id
            outbound.put_nowait(agent_pb2.ConnectRequest(reply=reply))

        kind = request.WhichOneof("kind")
        try:
            if kind == "preflight":
                send(agent_pb2.Reply(violations=self.reconciler.preflight(request.preflight)))
            elif kind == "hotplug":
                send(agent_pb2.Reply(hotplug=await self.reconciler.hotplug(request.hotplug)))
            elif kind == "console_log":
                text, truncated = self.console.tail(request.console_log.vm_id,
                                                    request.console_log.tail_lines,
                                                    request.console_log.source)
                send(agent_pb2.Reply(console_log=agent_pb2.ConsoleLogResult(
                    text=text, truncated=truncated)))
            elif kind == "console_stream":
                async for chunk in self.console.follow(request.console_stream.vm_id,
                                                       request.console_stream.tail_lines,
                                                       request.console_stream.source):
                    send(agent_pb2.Reply(console_chunk=agent_pb2.ConsoleChunk(data=chunk),
                                         more=True))
                send(agent_pb2.Reply())
            else:
                send(agent_pb2.Reply(error_code="UNIMPLEMENTED",
                                     error=f"request {kind!r} is not known to this agent"))
        except RuntimeFailure as exc:
            send(agent_pb2.Reply(error_code=exc.code, error=exc.message))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("request %s failed", kind)
            send(agent_pb2.Reply(error_code="INTERNAL", error=f"{type(exc).__name__}: {exc}"))

    async def _heartbeat(self, outbound: asyncio.Queue[agent_pb2.ConnectRequest]) -> None:
        """One beat every heartbeat_interval, on a fixed schedule: a late beat does not
        push the later ones back, and beats missed entirely are not made up for."""
        me = psutil.Process(os.getpid())
        psutil.cpu_percent()  # prime the counter
        loop = asyncio.get_running_loop()
        last = loop.time()
        due = last + self.heartbeat_interval
        while True:
            self._settings_changed.clear()
            if self.telemetry is not None:
                self.telemetry.heartbeat_interval.set(self.heartbeat_interval)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, due - loop.time())):
                    await self._settings_changed.wait()
                # A new interval: the next beat is one new interval after the last one.
                due = max(loop.time(), last + self.heartbeat_interval)
                continue
            now = loop.time()
            beat = self._beat(me)
            outbound.put_nowait(agent_pb2.ConnectRequest(heartbeat=beat))
            self.heartbeats_sent += 1
            if self.telemetry is not None:
                self.telemetry.heartbeat_sent(now - due, len(beat.vms), beat.ByteSize())
            last = now
            due += self.heartbeat_interval
            if due <= now:
                due = now + self.heartbeat_interval

    def _beat(self, me: psutil.Process) -> agent_pb2.Heartbeat:
        memory = psutil.virtual_memory()
        metrics = host_pb2.HostMetrics(
            cpu_usage_percent=psutil.cpu_percent(), memory_used_bytes=memory.used,
            memory_available_bytes=memory.available, load_average_1m=os.getloadavg()[0],
            agent_rss_bytes=me.memory_info().rss)
        vms = self.sampler.take_fresh() if self.sampler is not None else []
        return agent_pb2.Heartbeat(health=host_pb2.HOST_HEALTH_READY, metrics=metrics, vms=vms)


def controller_targets(spec: str) -> list[str]:
    """The replica addresses in a `controller` setting (at least one)."""
    targets = [part.strip() for part in spec.split(",") if part.strip()]
    if not targets:
        raise ValueError("controller: no address given")
    return targets


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__
