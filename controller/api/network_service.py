"""vmm.v1.NetworkService: the fleet's named networks, served from memory."""

from __future__ import annotations

import grpc

from controller.api.operations import api_method
from controller.api.paging import fill_page, page_size, page_token, token_after
from controller.errors import ApiError, failed_precondition, invalid, invalid_field
from controller.fleet import Fleet
from controller.networks import Networks, check_network
from vmm.v1 import network_pb2, network_pb2_grpc


class NetworkService(network_pb2_grpc.NetworkServiceServicer):
    def __init__(self, networks: Networks, fleet: Fleet) -> None:
        self.networks = networks
        self.fleet = fleet

    def _describe(self, network: network_pb2.Network) -> network_pb2.Network:
        return self.networks.describe(network,
                                      self.fleet.index.hosts_with_bridge(network.bridge))

    def _get(self, name: str) -> network_pb2.Network:
        if not name:
            raise invalid_field("name", "is required")
        network = self.networks.get(name)
        if network is None:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"network {name!r} not found")
        return network

    @api_method
    async def CreateNetwork(self, request: network_pb2.CreateNetworkRequest,
                            context: grpc.aio.ServicerContext
                            ) -> network_pb2.CreateNetworkResponse:
        violations = check_network(request.network)
        if violations:
            raise invalid(violations)
        if not await self.networks.create(request.network):
            raise ApiError(grpc.StatusCode.ALREADY_EXISTS,
                           f"network {request.network.name!r} already exists")
        return network_pb2.CreateNetworkResponse(network=self._describe(request.network))

    @api_method
    async def GetNetwork(self, request: network_pb2.GetNetworkRequest,
                         context: grpc.aio.ServicerContext) -> network_pb2.GetNetworkResponse:
        return network_pb2.GetNetworkResponse(network=self._describe(self._get(request.name)))

    @api_method
    async def ListNetworks(self, request: network_pb2.ListNetworksRequest,
                           context: grpc.aio.ServicerContext
                           ) -> network_pb2.ListNetworksResponse:
        after = token_after("network", request.page_token)
        names = sorted(n for n in self.networks.networks if n > after)
        page, more = fill_page((self._describe(self.networks.networks[n]) for n in names),
                               page_size(request.page_size))
        return network_pb2.ListNetworksResponse(
            networks=page, next_page_token=page_token("network", page[-1].name) if more else "")

    @api_method
    async def DeleteNetwork(self, request: network_pb2.DeleteNetworkRequest,
                            context: grpc.aio.ServicerContext
                            ) -> network_pb2.DeleteNetworkResponse:
        network = self._get(request.name)
        held = len(self.networks.taken.get(network.name, ()))
        if held:
            raise failed_precondition(f"network {network.name!r} still has {held} addresses "
                                      "held by VM NICs; delete those VMs or NICs first")
        await self.networks.delete(network.name)
        return network_pb2.DeleteNetworkResponse(success=True)
