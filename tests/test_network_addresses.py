"""Fleet networks through the API, and their addresses under concurrency: two controller
replicas (separate processes on one etcd) creating VMs on one /24 at once never hand out an
address twice, and deleting the VMs gives every address back."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator

import grpc
import pytest

from controller.etcd import EtcdClient
from tools.fleet.cluster import Cluster, wait_until
from tools.fleet.hollow import HollowFleet, HollowFleetConfig, HostSize
from vmm.v1 import network_pb2, network_pb2_grpc, vm_pb2, vm_pb2_grpc

VMS = 200
BRIDGE = "br-pool"
POOL = network_pb2.Network(name="pool", bridge=BRIDGE, cidr="10.77.0.0/24", gateway="10.77.0.1",
                           mtu=1450)
MIB = 1 << 20


@pytest.fixture
def replicas(cluster: Cluster) -> Iterator[tuple[Cluster, str]]:
    _, address = cluster.add_controller("replica-2")
    yield cluster, address


def nic_config(network: str) -> vm_pb2.VmConfig:
    return vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=1), memory=vm_pb2.MemoryConfig(size_bytes=128 * MIB),
        boot=vm_pb2.BootConfig(kernel_path="/boot/vmlinux"),
        network=[vm_pb2.NetworkInterface(id="eth0", network=network)])


def test_network_definitions_are_checked_and_named_in_errors(cluster: Cluster) -> None:
    networks = network_pb2_grpc.NetworkServiceStub(cluster.channel)
    with pytest.raises(grpc.RpcError) as bad:
        networks.CreateNetwork(network_pb2.CreateNetworkRequest(network=network_pb2.Network(
            name="Bad_Name", bridge="br-toolong-for-linux", cidr="10.0.0.1/24",
            gateway="10.9.9.9")))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for field in ("network.name", "network.bridge", "network.cidr"):
        assert field in bad.value.details()
    assert networks.ListNetworks(network_pb2.ListNetworksRequest()).networks == []

    networks.CreateNetwork(network_pb2.CreateNetworkRequest(network=POOL))
    with pytest.raises(grpc.RpcError) as again:
        networks.CreateNetwork(network_pb2.CreateNetworkRequest(network=POOL))
    assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # A VM naming a network that does not exist is refused, naming the field.
    with pytest.raises(grpc.RpcError) as unknown:
        cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="lost", config=nic_config("nowhere")))
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.network[0].network" in unknown.value.details()
    odd = nic_config("pool")
    odd.network[0].mtu, odd.network[0].vlan = 10, 5000
    odd.network[0].ip_address = "10.77.0.9/24"  # another NIC's, perhaps: not the caller's pick
    with pytest.raises(grpc.RpcError) as out_of_range:
        cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="odd", config=odd))
    assert out_of_range.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for field in ("config.network[0].mtu", "config.network[0].vlan",
                  "config.network[0].ip_address"):
        assert field in out_of_range.value.details()
    # No host has the network's bridge: refused, and the address taken for it given back.
    with pytest.raises(grpc.RpcError) as nowhere:
        cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="far", config=nic_config("pool")))
    assert nowhere.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert BRIDGE in nowhere.value.details()
    assert networks.GetNetwork(network_pb2.GetNetworkRequest(
        name="pool")).network.allocated_addresses == 0


def test_two_replicas_hand_out_distinct_addresses_and_take_them_back(
        replicas: tuple[Cluster, str]) -> None:
    cluster, replica = replicas

    async def run() -> None:
        fleet_config = HollowFleetConfig(controller=cluster.address, hosts=2,
                                         sizes=[HostSize(256, 256 << 30)], bridges=[BRIDGE])
        async with HollowFleet(fleet_config) as fleet, \
                grpc.aio.insecure_channel(cluster.address) as first, \
                grpc.aio.insecure_channel(replica) as second:
            await fleet.wait_connected()
            stubs = [vm_pb2_grpc.VmServiceStub(c) for c in (first, second)]
            nets = [network_pb2_grpc.NetworkServiceStub(c) for c in (first, second)]
            await nets[0].CreateNetwork(network_pb2.CreateNetworkRequest(network=POOL))
            for net in nets:  # the replica learns of it through its etcd watch
                for _ in range(100):
                    try:
                        await net.GetNetwork(network_pb2.GetNetworkRequest(name="pool"))
                        break
                    except grpc.aio.AioRpcError:
                        await asyncio.sleep(0.05)

            async def create(i: int) -> str:
                vm_id = f"pool-{i:03d}"
                await stubs[i % 2].CreateVm(vm_pb2.CreateVmRequest(
                    vm_id=vm_id, config=nic_config("pool"), backend="firecracker"))
                info = await stubs[(i + 1) % 2].GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id=vm_id))
                nic = info.config.network[0]
                assert (nic.bridge, nic.mtu, nic.gateway) == (BRIDGE, 1450, "10.77.0.1")
                return nic.ip_address

            addresses = await asyncio.gather(*(create(i) for i in range(VMS)))
            assert len(set(addresses)) == VMS, "an address was handed out twice"
            subnet = ipaddress.IPv4Network(POOL.cidr)
            for address in addresses:
                interface = ipaddress.IPv4Interface(address)
                assert interface.network == subnet and str(interface.ip) != POOL.gateway
            async with EtcdClient([cluster.etcd.endpoint]) as etcd:
                held, _ = await etcd.get_prefix("/vmm/addresses/pool/")
                assert sorted(kv.key.rsplit("/", 1)[1] for kv in held) == sorted(
                    a.split("/")[0] for a in addresses)

                await asyncio.gather(*(stubs[i % 2].DeleteVm(vm_pb2.DeleteVmRequest(
                    vm_id=f"pool-{i:03d}", force=True)) for i in range(VMS)))
                for _ in range(200):
                    held, _ = await etcd.get_prefix("/vmm/addresses/pool/")
                    if not held:
                        break
                    await asyncio.sleep(0.1)
                assert held == [], f"{len(held)} addresses still held after delete"

    asyncio.run(run())
    networks = network_pb2_grpc.NetworkServiceStub(cluster.channel)
    wait_until(lambda: networks.GetNetwork(network_pb2.GetNetworkRequest(
        name="pool")).network.allocated_addresses == 0, 20, what="the mirror to see it")
    networks.DeleteNetwork(network_pb2.DeleteNetworkRequest(name="pool"))
    assert networks.ListNetworks(network_pb2.ListNetworksRequest()).networks == []
