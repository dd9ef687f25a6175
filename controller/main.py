"""The controller process: gRPC API + agent endpoint + health, over etcd."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from controller import config as config_module
from controller.agent_hub import AgentHub
from controller.api.host_service import HostService
from controller.api.network_service import NetworkService
from controller.api.operations import VmServiceSettings
from controller.api.service import VmService
from controller.auth import TokenInterceptor, load_tokens, server_credentials
from controller.config import ControllerConfig
from controller.etcd import EtcdClient, EtcdUnavailable
from controller.fleet import Fleet
from controller.health_http import HealthEndpoint
from controller.leader import Leadership
from controller.metrics import ControllerCollector
from controller.networks import Networks
from controller.reflection import enable_reflection
from controller.store import Store
from controller.telemetry import Telemetry, TracingInterceptor
from controller.vm_cache import VmCache
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
            max_concurrent_registrations=config.max_concurrent_registrations)
        self.fleet = Fleet(self.store, self.hub)
        self.hub.on_host_change = self.fleet.refresh
        self.networks = Networks(self.store)
        self.vms = VmService(self.store, self.cache, self.hub, self.fleet, self.telemetry,
                             VmServiceSettings(
                                 operation_timeout=config.operation_timeout,
                                 reserve_hotplug_maximum=config.reserve_hotplug_maximum,
                                 backend_preference=tuple(config.backend_preference)),
                             self.networks)
        self.leadership = Leadership(
            self.store, self.fleet, config.identity or f"{socket.gethostname()}:{config.listen}",
            forget_after=config.forget_deleted_after)
        self.health = health.aio.HealthServicer()
        self.telemetry.register_collector(
            ControllerCollector.for_fleet(self.hub, self.cache, self.fleet))
        self.http = HealthEndpoint(self.etcd.status, self._backends,
                                   metrics=self.telemetry.registry)
        interceptors: list[grpc.aio.ServerInterceptor] = [
            TracingInterceptor(self.telemetry.tracer)] if self.telemetry.tracing else []
        tokens = load_tokens(config.auth_tokens, config.auth_tokens_file)
        if tokens:
            interceptors.insert(0, TokenInterceptor(tokens))
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[("grpc.keepalive_time_ms", 10_000),
                     ("grpc.keepalive_permit_without_calls", 1),
                     ("grpc.http2.min_ping_interval_without_data_ms", 5_000)])
        self._alive_task: asyncio.Task[None] | None = None

    def _backends(self) -> list[str]:
        names = {b.name + (" (simulated)" if b.simulated else "")
                 for s in self.hub.sessions.values() for b in s.register.backends}
        return sorted(names)

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
        if self.config.tls_cert_file:
            port = self.server.add_secure_port(self.config.listen, server_credentials(
                self.config.tls_cert_file, self.config.tls_key_file,
                self.config.tls_client_ca_file))
        else:
            port = self.server.add_insecure_port(self.config.listen)
        await self.server.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.http_listen:
            await self.http.start(self.config.http_listen)
        self._alive_task = asyncio.create_task(self._watch_etcd_health())
        self.leadership.start()
        log.info("controller listening on %s (etcd %s)", self.config.listen,
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
        if self._alive_task:
            self._alive_task.cancel()
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
