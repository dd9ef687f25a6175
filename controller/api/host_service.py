"""vmm.v1.HostService: hosts, their capacity, health and backend capabilities."""

from __future__ import annotations

import grpc

from controller.api.operations import api_method
from controller.errors import ApiError, invalid_field
from controller.fleet import Fleet
from vmm import features
from vmm.v1 import host_pb2, host_pb2_grpc


class HostService(host_pb2_grpc.HostServiceServicer):
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    @api_method
    async def ListHosts(self, request: host_pb2.ListHostsRequest,
                        context: grpc.aio.ServicerContext) -> host_pb2.ListHostsResponse:
        return host_pb2.ListHostsResponse(hosts=await self.fleet.hosts())

    @api_method
    async def GetHost(self, request: host_pb2.GetHostRequest,
                      context: grpc.aio.ServicerContext) -> host_pb2.GetHostResponse:
        if not request.host_id:
            raise invalid_field("host_id", "is required")
        for host in await self.fleet.hosts():
            if host.host_id == request.host_id:
                return host_pb2.GetHostResponse(host=host)
        raise ApiError(grpc.StatusCode.NOT_FOUND, f"host {request.host_id!r} not found")

    @api_method
    async def GetBackendCapabilities(
        self, request: host_pb2.GetBackendCapabilitiesRequest, context: grpc.aio.ServicerContext
    ) -> host_pb2.GetBackendCapabilitiesResponse:
        if request.backend and request.backend not in features.BACKENDS:
            raise invalid_field("backend", f"{request.backend!r} is not one of "
                                f"{', '.join(features.BACKENDS)}")
        found: dict[str, host_pb2.BackendCapabilities] = {}
        for host in await self.fleet.hosts():
            for backend in host.backends:
                if not request.backend or backend.name == request.backend:
                    found.setdefault(backend.name, backend.capabilities)
        order = {name: i for i, name in enumerate(features.BACKENDS)}
        return host_pb2.GetBackendCapabilitiesResponse(
            backends=[found[n] for n in sorted(found, key=lambda n: order.get(n, 99))])
