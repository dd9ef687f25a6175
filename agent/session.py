"""The agent's stream to the controller: register, heartbeat, report, obey desired state.

The agent dials out; when the stream breaks it reconnects with capped exponential
backoff and registers again with everything it runs, so a restarted controller
(or agent) converges without losing anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import grpc
import psutil
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from agent.config import AgentConfig
from agent.console import ConsoleRelay
from agent.reconciler import Reconciler
from agent.runtimes.base import Runtime, RuntimeFailure
from vmm.agent.v1 import agent_pb2, agent_pb2_grpc
from vmm.v1 import host_pb2

log = logging.getLogger(__name__)
AGENT_VERSION = "0.1.0"


class StreamBroken(Exception):
    """The stream to the controller ended; reconnect."""


class ControllerSession:
    def __init__(self, config: AgentConfig, reconciler: Reconciler,
                 runtimes: dict[str, Runtime]) -> None:
        self.config = config
        self.reconciler = reconciler
        self.runtimes = runtimes
        self.console = ConsoleRelay(reconciler.state)
        self._outbound: asyncio.Queue[agent_pb2.ConnectRequest] | None = None
        self._requests: dict[str, asyncio.Task[None]] = {}
        self.connected = asyncio.Event()

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
            labels=cfg.label_map())

    async def run_forever(self) -> None:
        async for attempt in AsyncRetrying(
                wait=wait_exponential_jitter(initial=0.05, max=3.0),
                retry=retry_if_exception_type((grpc.aio.AioRpcError, StreamBroken, OSError))):
            with attempt:
                await self._run_once()

    async def _run_once(self) -> None:
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
                        self.connected.set()
                        log.info("connected to controller %s as host %s",
                                 self.config.controller, self.config.host_id)
                    self._handle(message, outbound)
            finally:
                self._outbound = None
                self.connected.clear()
                heartbeat.cancel()
                for task in self._requests.values():
                    task.cancel()
                self._requests.clear()
        raise StreamBroken("the controller closed the stream")

    def _channel(self) -> grpc.aio.Channel:
        cfg = self.config
        options = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_permit_without_calls", 1)]
        if not (cfg.tls_ca_file or cfg.tls_cert_file):
            return grpc.aio.insecure_channel(cfg.controller, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(cfg.tls_ca_file).read_bytes() if cfg.tls_ca_file else None,
            private_key=Path(cfg.tls_key_file).read_bytes() if cfg.tls_key_file else None,
            certificate_chain=Path(cfg.tls_cert_file).read_bytes() if cfg.tls_cert_file else None)
        return grpc.aio.secure_channel(cfg.controller, credentials, options=options)

    def _handle(self, message: agent_pb2.ConnectResponse,
                outbound: asyncio.Queue[agent_pb2.ConnectRequest]) -> None:
        kind = message.WhichOneof("message")
        if kind == "desired_state":
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
                                                    request.console_log.tail_lines)
                send(agent_pb2.Reply(console_log=agent_pb2.ConsoleLogResult(
                    text=text, truncated=truncated)))
            elif kind == "console_stream":
                async for chunk in self.console.follow(request.console_stream.vm_id,
                                                       request.console_stream.tail_lines):
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
        me = psutil.Process(os.getpid())
        psutil.cpu_percent()  # prime the counter
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            memory = psutil.virtual_memory()
            metrics = host_pb2.HostMetrics(
                cpu_usage_percent=psutil.cpu_percent(), memory_used_bytes=memory.used,
                memory_available_bytes=memory.available, load_average_1m=os.getloadavg()[0],
                agent_rss_bytes=me.memory_info().rss)
            with contextlib.suppress(Exception):
                vms = await self.reconciler.metrics()
                outbound.put_nowait(agent_pb2.ConnectRequest(heartbeat=agent_pb2.Heartbeat(
                    health=host_pb2.HOST_HEALTH_READY, metrics=metrics, vms=vms)))
