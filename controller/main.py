"""The controller process: gRPC API + agent endpoint + health, over etcd."""

from __future__ import annotations

# First, before anything loads grpc: it reads its I/O setting once, when it loads.
from vmm.common.grpc_io import prefer_poll_based_io

prefer_poll_based_io()

import asyncio
import contextlib
import logging
import signal
import socket

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from controller import config as config_module
from controller import gc_policy
from controller.access import Access, AccessFile, AccessFileError
from controller.agent_hub import AgentHub
from controller.api.host_service import HostService
from controller.api.network_service import NetworkService
from controller.api.operations import VmServiceSettings
from controller.api.service import VmService
from controller.auth import AuthInterceptor, server_credentials
from controller.config import ControllerConfig
from controller.etcd import EtcdClient, EtcdError, EtcdUnavailable
from controller.fleet import Fleet
from controller.health_http import HealthEndpoint
from controller.leader import Leadership
from controller.metrics import ControllerCollector
from controller.networks import Networks
from controller.reflection import enable_reflection
from controller.store import Store
from controller.telemetry import Telemetry, TracingInterceptor
from controller.vm_cache import VmCache
from controller.wire import DecodeGuard
from vmm.agent.v1 import agent_pb2, agent_pb2_grpc
from vmm.common.logs import setup_logging
from vmm.v1 import host_pb2, host_pb2_grpc, network_pb2, network_pb2_grpc, vm_pb2, vm_pb2_grpc

log = logging.getLogger("vmm.controller")

SERVICE_NAMES = (
    vm_pb2.DESCRIPTOR.services_by_name["VmService"].full_name,
    host_pb2.DESCRIPTOR.services_by_name["HostService"].full_name,
    network_pb2.DESCRIPTOR.services_by_name["NetworkService"].full_name,
    agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
)


class Controller:
    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.etcd = EtcdClient(config.etcd_endpoints)
        self.store = Store(self.etcd, config.etcd_prefix)
        self.cache = VmCache(self.store)
        self.telemetry = Telemetry(exporter=config.telemetry_exporter)
        self.hub = AgentHub(
            self.store, self.cache, self.telemetry, config.host_lease_ttl,
            heartbeat_interval=config.heartbeat_interval,
            heartbeat_timeout=config.heartbeat_timeout,
            max_heartbeat_rate=config.max_heartbeat_rate,
            max_concurrent_registrations=config.max_concurrent_registrations,
            removal_retry_interval=config.removal_retry_interval)
        self.fleet = Fleet(self.store, self.hub)
        self.hub.on_host_change = self.fleet.refresh
        self.networks = Networks(self.store, self.cache,
                                 on_bridges=self.fleet.index.track_bridges)
        self.vms = VmService(self.store, self.cache, self.hub, self.fleet, self.telemetry,
                             VmServiceSettings(
                                 operation_timeout=config.operation_timeout,
                                 reserve_hotplug_maximum=config.reserve_hotplug_maximum,
                                 backend_preference=tuple(config.backend_preference),
                                 request_id_retention=config.request_id_retention),
                             self.networks, access=self._access)
        self.leadership = Leadership(
            self.store, self.fleet, self.cache,
            config.identity or f"{socket.gethostname()}:{config.listen}",
            forget_after=config.forget_deleted_after, networks=self.networks)
        self.health = health.aio.HealthServicer()
        self.telemetry.register_collector(
            ControllerCollector.for_fleet(self.hub, self.cache, self.fleet))
        self.http = HealthEndpoint(self.etcd.status, self.fleet.index.ready_backends,
                                   metrics=self.telemetry.registry)
        try:
            self.access = AccessFile(config.access_file) if config.access_file else None
        except (OSError, AccessFileError) as exc:
            raise SystemExit(f"cannot use access_file: {exc}") from None
        if self.access is None:
            log.warning("no access_file: every caller is an admin and may speak for any host")
        interceptors: list[grpc.aio.ServerInterceptor] = [
            DecodeGuard(), AuthInterceptor(self._access)]
        if self.telemetry.tracing:
            interceptors.append(TracingInterceptor(self.telemetry.tracer))
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[("grpc.keepalive_time_ms", 10_000),
                     ("grpc.keepalive_permit_without_calls", 1),
                     ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                     ("grpc.max_receive_message_length", config.max_request_bytes)])
        self._alive_task: asyncio.Task[None] | None = None
        self._gc_task: asyncio.Task[None] | None = None
        self.agent_port = 0
        self._background: set[asyncio.Task[None]] = set()

    def _access(self) -> Access | None:
        return self.access.current if self.access else None

    def _on_access_change(self, access: Access) -> None:
        self.hub.drop_withdrawn(access)
        task = asyncio.create_task(self._forget_unlimited_usage(access), name="forget-usage")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _forget_unlimited_usage(self, access: Access) -> None:
        """Stop counting the namespaces that no longer have a quota: should one get a quota
        again, its usage is counted afresh from its VMs then."""
        try:
            for namespace in await self.store.counted_namespaces() - set(access.quotas):
                await self.store.forget_usage(namespace)
                log.info("namespace %s has no quota any more; its usage is not counted", namespace)
        except EtcdError as exc:
            log.warning("could not drop the usage records of namespaces without quota: %s", exc)

    def _add_port(self, address: str, client_ca_file: str) -> int:
        if not self.config.tls_cert_file:
            return self.server.add_insecure_port(address)
        return self.server.add_secure_port(address, server_credentials(
            self.config.tls_cert_file, self.config.tls_key_file, client_ca_file))

    async def start(self) -> int:
        await self.etcd.connect()
        await self.cache.start()
        await self.fleet.start()
        await self.networks.start()
        await self.hub.start()
        vm_pb2_grpc.add_VmServiceServicer_to_server(self.vms, self.server)
        host_pb2_grpc.add_HostServiceServicer_to_server(
            HostService(self.fleet, self.networks), self.server)
        network_pb2_grpc.add_NetworkServiceServicer_to_server(
            NetworkService(self.networks, self.fleet), self.server)
        agent_pb2_grpc.add_AgentServiceServicer_to_server(self.hub, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection((*SERVICE_NAMES, health.SERVICE_NAME), self.server)
        port = self._add_port(self.config.listen, self.config.tls_client_ca_file)
        if self.config.agent_listen:
            self.agent_port = self._add_port(self.config.agent_listen,
                                             self.config.tls_agent_ca_file)
        elif self.config.tls_agent_ca_file:
            raise SystemExit("tls_agent_ca_file needs agent_listen: the port agents use")
        if self.access is not None:
            await self._forget_unlimited_usage(self.access.current)
            self.access.on_change = self._on_access_change
            self.access.start()
        await self.server.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.http_listen:
            await self.http.start(self.config.http_listen)
        self._alive_task = asyncio.create_task(self._watch_etcd_health())
        self._gc_task = asyncio.create_task(gc_policy.keep_frozen(lambda: len(self.hub.sessions)))
        self.leadership.start()
        log.info("controller listening on %s%s (etcd %s)", self.config.listen,
                 f", agents on {self.config.agent_listen}" if self.config.agent_listen else "",
                 ",".join(self.config.etcd_endpoints))
        return port

    async def _watch_etcd_health(self) -> None:
        """Flip the gRPC health status with etcd's reachability; refresh host liveness."""
        serving = True
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.etcd.status()
                ok = True
            except EtcdUnavailable:
                ok = False
            if ok != serving:
                serving = ok
                status = (health_pb2.HealthCheckResponse.SERVING if ok
                          else health_pb2.HealthCheckResponse.NOT_SERVING)
                for name in ("", *SERVICE_NAMES):
                    await self.health.set(name, status)
                log.warning("etcd %s", "reachable again" if ok else "unreachable")

    async def stop(self) -> None:
        for task in (self._alive_task, self._gc_task):
            if task:
                task.cancel()
        if self.access is not None:
            await self.access.stop()
        await self.leadership.stop()
        await self.server.stop(grace=2.0)
        await self.http.stop()
        await self.hub.stop()
        await self.fleet.stop()
        await self.networks.stop()
        await self.cache.stop()
        await self.etcd.close()
        self.telemetry.shutdown()


async def serve(config: ControllerConfig) -> None:
    controller = Controller(config)
    await controller.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if controller.access is not None:
        loop.add_signal_handler(signal.SIGHUP, controller.access.reload, True)
    await stop.wait()
    log.info("controller stopping")
    with contextlib.suppress(Exception):
        await controller.stop()


def main(argv: list[str] | None = None) -> None:
    config = config_module.load(argv)
    setup_logging(config.log_level, "controller")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
