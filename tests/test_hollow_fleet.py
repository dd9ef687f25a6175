"""Hollow agents against real controllers and a real etcd: they register, VMs placed on them
reach the states asked for, and concurrent creates through two replicas account for every
vCPU and byte on every host."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable

import grpc
import pytest

from controller.etcd import EtcdClient
from controller.fleet import allocatable
from controller.store import Store
from tools.fleet.cluster import Cluster
from tools.fleet.hollow import (
    HollowFleet,
    HollowFleetConfig,
    list_hosts,
    parse_sizes,
    ready_count,
)
from vmm.store.v1 import records_pb2
from vmm.v1 import host_pb2, host_pb2_grpc, vm_pb2, vm_pb2_grpc

# Any path does: a hollow host checks no files.
KERNEL = "/var/lib/vmm/hollow/vmlinux"
MIB = 1 << 20


def small_config(vcpus: int = 1, memory_mib: int = 128) -> vm_pb2.VmConfig:
    config = vm_pb2.VmConfig()
    config.cpu.vcpu_count = vcpus
    config.memory.size_bytes = memory_mib * MIB
    config.boot.kernel_path = KERNEL
    return config


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def wait_ready(address: str, hosts: int, timeout: float = 30.0) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = host_pb2_grpc.HostServiceStub(channel)

        async def all_ready() -> bool:
            return await ready_count(stub, "hollow-") >= hosts

        await eventually(all_ready, timeout, f"{hosts} hollow hosts READY on {address}")


async def test_hollow_hosts_register_and_run_vms(cluster: Cluster) -> None:
    fleet_config = HollowFleetConfig(controller=cluster.address, hosts=10,
                                     agents_per_channel=4)
    async with HollowFleet(fleet_config) as fleet:
        await fleet.wait_connected(30)
        await wait_ready(cluster.address, 10)
        # The controller told every agent its heartbeat settings.
        assert all(a.heartbeat_timeout > 0 and a.heartbeat_interval > 0 for a in fleet.agents)
        async with grpc.aio.insecure_channel(cluster.address) as channel:
            hosts = host_pb2_grpc.HostServiceStub(channel)
            host = (await hosts.GetHost(host_pb2.GetHostRequest(host_id="hollow-00001"))).host
            assert host.capacity.vcpus == 64
            assert {b.name for b in host.backends} == {"firecracker", "cloud-hypervisor", "qemu"}
            assert all(b.simulated for b in host.backends)

            vms = vm_pb2_grpc.VmServiceStub(channel)
            created = await vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="hollow-vm",
                                                                config=small_config()))
            assert created.state == vm_pb2.VM_STATE_CREATED
            assert created.placement.host_id.startswith("hollow-")
            assert created.placement.simulated
            booted = await vms.BootVm(vm_pb2.BootVmRequest(vm_id="hollow-vm"))
            assert booted.state == vm_pb2.VM_STATE_RUNNING
            info = await vms.GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id="hollow-vm"))
            assert info.state == vm_pb2.VM_STATE_RUNNING
            paused = await vms.PauseVm(vm_pb2.PauseVmRequest(vm_id="hollow-vm"))
            assert paused.state == vm_pb2.VM_STATE_PAUSED
            stopped = await vms.ShutdownVm(vm_pb2.ShutdownVmRequest(vm_id="hollow-vm",
                                                                    force=True))
            assert stopped.state == vm_pb2.VM_STATE_SHUTDOWN
            await vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id="hollow-vm", force=True))

            async def gone() -> bool:
                listed = await vms.ListVms(vm_pb2.ListVmsRequest())
                return listed.total_count == 0

            await eventually(gone, 20, "the VM to be deleted")
        agent = next(a for a in fleet.agents if a.host_id == created.placement.host_id)
        assert "hollow-vm" not in agent.desired and "hollow-vm" not in agent.status


async def read_fleet(endpoint: str) -> tuple[list[records_pb2.VmRecord],
                                             dict[str, records_pb2.Allocation],
                                             dict[str, records_pb2.HostRecord]]:
    async with EtcdClient([endpoint]) as etcd:
        store = Store(etcd)
        vms, _ = await store.list_vms()
        allocations = await store.list_allocations()
        hosts = await store.list_hosts()
    return ([v.record for v in vms], {h: a.allocation for h, a in allocations.items()},
            {h.host_id: h for h in hosts})


async def test_two_replicas_place_concurrent_creates_without_losing_capacity(
        cluster: Cluster) -> None:
    _, address_b = cluster.add_controller("replica-b")
    # vCPUs x GiB, cycled over the hosts: fewer vCPUs than the creates ask for in all, so the
    # last creates find the fleet full.
    sizes = ["2x2", "4x6", "8x12", "12x16"]
    half = 50
    fleet_a = HollowFleet(HollowFleetConfig(controller=cluster.address, hosts=half,
                                            sizes=parse_sizes(",".join(sizes))))
    fleet_b = HollowFleet(HollowFleetConfig(controller=address_b, hosts=half,
                                            first_index=half + 1,
                                            sizes=parse_sizes(",".join(sizes))))
    rng = random.Random(20261201)
    shapes = {f"c-{i:03d}": (rng.randint(1, 4), rng.choice([128, 256, 512, 1024, 2048, 4096]))
              for i in range(500)}
    async with fleet_a, fleet_b:
        await asyncio.gather(fleet_a.wait_connected(30), fleet_b.wait_connected(30))
        await wait_ready(cluster.address, 2 * half)
        await wait_ready(address_b, 2 * half)

        channels = [grpc.aio.insecure_channel(cluster.address),
                    grpc.aio.insecure_channel(address_b)]
        outcomes: dict[str, str] = {}
        try:
            async def create(n: int, vm_id: str) -> None:
                vcpus, memory = shapes[vm_id]
                stub = vm_pb2_grpc.VmServiceStub(channels[n % 2])
                try:
                    await stub.CreateVm(vm_pb2.CreateVmRequest(
                        vm_id=vm_id, config=small_config(vcpus, memory)), timeout=50)
                    outcomes[vm_id] = "OK"
                except grpc.aio.AioRpcError as exc:
                    outcomes[vm_id] = exc.code().name

            await asyncio.gather(*(create(n, vm_id) for n, vm_id in enumerate(shapes)))
        finally:
            await asyncio.gather(*(c.close() for c in channels))

        codes = Counter(outcomes.values())
        print(f"create outcomes: {dict(codes)}")
        if codes["ABORTED"]:
            pytest.fail(f"placement gave up with ABORTED under contention between two "
                        f"replicas: {dict(codes)}")
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, dict(codes)
        created = {vm_id for vm_id, code in outcomes.items() if code == "OK"}
        assert created, dict(codes)

        records, allocations, hosts = await read_fleet(cluster.etcd.endpoint)
        # Nothing lost, nothing duplicated, nothing extra.
        assert sorted(r.vm_id for r in records) == sorted(created)

        held: dict[str, list[records_pb2.VmRecord]] = defaultdict(list)
        for record in records:
            vcpus, memory = shapes[record.vm_id]
            assert (record.reserved.vcpus, record.reserved.memory_bytes) == (vcpus, memory * MIB)
            assert record.host_id in hosts
            held[record.host_id].append(record)
        for host_id, host in hosts.items():
            alloc = allocations.get(host_id, records_pb2.Allocation())
            mine = held.get(host_id, [])
            want_vcpus = sum(r.reserved.vcpus for r in mine)
            want_memory = sum(r.reserved.memory_bytes for r in mine)
            assert (alloc.allocated.vcpus, alloc.allocated.memory_bytes, alloc.vm_count) == \
                (want_vcpus, want_memory, len(mine)), host_id
            limit = allocatable(host)
            assert want_vcpus <= limit.vcpus and want_memory <= limit.memory_bytes, host_id

        # A create was refused only when no host had room for it; allocations only grew
        # since, so none has room now.
        free = [(allocatable(h).vcpus - sum(r.reserved.vcpus for r in held.get(i, [])),
                 allocatable(h).memory_bytes - sum(r.reserved.memory_bytes
                                                   for r in held.get(i, [])))
                for i, h in hosts.items()]
        for vm_id, code in outcomes.items():
            if code == "RESOURCE_EXHAUSTED":
                vcpus, memory = shapes[vm_id]
                assert not any(v >= vcpus and m >= memory * MIB for v, m in free), \
                    f"{vm_id} ({vcpus} vCPUs, {memory} MiB) was refused but fits"

        # Each hollow agent was told of exactly the VMs placed on its host, whichever replica
        # placed them.
        by_agent = {a.host_id: a for a in [*fleet_a.agents, *fleet_b.agents]}

        async def delivered() -> bool:
            return all(set(by_agent[h].desired) == {r.vm_id for r in held.get(h, [])}
                       for h in by_agent)

        await eventually(delivered, 20, "every VM's desired state on its hollow host")

        # The HostService of either replica reports the same allocations.
        for address in (cluster.address, address_b):
            async with grpc.aio.insecure_channel(address) as channel:
                stub = host_pb2_grpc.HostServiceStub(channel)

                async def agrees(stub: host_pb2_grpc.HostServiceStub = stub) -> bool:
                    listed = {h.host_id: h for h in await list_hosts(stub)}
                    return all(
                        listed[h].allocated.vcpus == sum(r.reserved.vcpus
                                                         for r in held.get(h, []))
                        and listed[h].allocated.memory_bytes == sum(
                            r.reserved.memory_bytes for r in held.get(h, []))
                        for h in hosts)

                await eventually(agrees, 10, f"HostService allocations on {address}")


async def test_hollow_hosts_present_their_agent_tokens(cluster: Cluster) -> None:
    hosts = ["hollow-00001", "hollow-00002", "hollow-00003"]
    access = cluster.workdir / "access.toml"
    access.write_text("".join(f'[[agents]]\nhost_id = "{h}"\ntoken = "secret-{h}"\n\n'
                              for h in hosts)
                      + '[[clients]]\nname = "ops"\nrole = "viewer"\ntoken = "ops-secret"\n')
    cluster.restart_controller_with(["--access-file", str(access)])
    with_tokens = HollowFleet(HollowFleetConfig(controller=cluster.address, hosts=3,
                                                host_tokens={h: f"secret-{h}" for h in hosts}))
    without = HollowFleet(HollowFleetConfig(controller=cluster.address, hosts=2,
                                            prefix="tokenless-"))
    # The client's token is no agent's credential.
    client_token = HollowFleet(HollowFleetConfig(controller=cluster.address, hosts=1,
                                                 prefix="client-", token="ops-secret"))
    async with with_tokens, without, client_token:
        await with_tokens.wait_connected(30)
        await asyncio.sleep(1.0)  # the others keep retrying, refused each time
        assert without.connected_count() == 0
        assert client_token.connected_count() == 0
        async with grpc.aio.insecure_channel(cluster.address) as channel:
            stub = host_pb2_grpc.HostServiceStub(channel)
            metadata = (("authorization", "Bearer ops-secret"),)
            listed = await stub.ListHosts(host_pb2.ListHostsRequest(), metadata=metadata)
        assert sorted(h.host_id for h in listed.hosts) == hosts
