"""vmm.v1.HostService: hosts, their capacity, health and backend capabilities."""

from __future__ import annotations

import grpc

from controller.api.operations import api_method
from controller.api.paging import fill_page, page_size, page_token, token_after
from controller.errors import ApiError, invalid_field
from controller.fleet import Fleet
from controller.networks import Networks
from vmm import features
from vmm.v1 import host_pb2, host_pb2_grpc


class HostService(host_pb2_grpc.HostServiceServicer):
    def __init__(self, fleet: Fleet, networks: Networks | None = None) -> None:
        self.fleet = fleet
        self.networks = networks

    def _with_networks(self, host: host_pb2.Host) -> host_pb2.Host:
        """Name the fleet networks whose bridge the host has."""
        if self.networks is not None:
            bridges = set(host.bridges)
            host.networks.extend(sorted(n.name for n in self.networks.networks.values()
                                        if n.bridge in bridges))
        return host

    @api_method
    async def ListHosts(self, request: host_pb2.ListHostsRequest,
                        context: grpc.aio.ServicerContext) -> host_pb2.ListHostsResponse:
        after = token_after("host", request.page_token)
        size = page_size(request.page_size)
        # One more than the page, to know whether another page follows.
        hosts, total = self.fleet.hosts_page(after, size + 1)
        if not request.include_capabilities:
            for host in hosts:
                for backend in host.backends:
                    backend.ClearField("capabilities")
        page, more = fill_page((self._with_networks(h) for h in hosts), size)
        token = page_token("host", page[-1].host_id) if more else ""
        return host_pb2.ListHostsResponse(hosts=page, next_page_token=token, total_count=total)

    @api_method
    async def GetHost(self, request: host_pb2.GetHostRequest,
                      context: grpc.aio.ServicerContext) -> host_pb2.GetHostResponse:
        if not request.host_id:
            raise invalid_field("host_id", "is required")
        host = self.fleet.get_host(request.host_id)
        if host is None:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"host {request.host_id!r} not found")
        return host_pb2.GetHostResponse(host=self._with_networks(host))

    @api_method
    async def GetBackendCapabilities(
        self, request: host_pb2.GetBackendCapabilitiesRequest, context: grpc.aio.ServicerContext
    ) -> host_pb2.GetBackendCapabilitiesResponse:
        if request.backend and request.backend not in features.BACKENDS:
            raise invalid_field("backend", f"{request.backend!r} is not one of "
                                f"{', '.join(features.BACKENDS)}")
        # One entry per distinct declaration in the fleet, not per host.
        found: dict[str, host_pb2.BackendCapabilities] = {}
        for declared in self.fleet.backend_declarations():
            if not request.backend or declared.name == request.backend:
                found.setdefault(declared.name, declared.capabilities)
        order = {name: i for i, name in enumerate(features.BACKENDS)}
        return host_pb2.GetBackendCapabilitiesResponse(
            backends=[found[n] for n in sorted(found, key=lambda n: order.get(n, 99))])
