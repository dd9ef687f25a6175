"""Several controller replicas on one etcd: any replica serves the API, one leads."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
from collections.abc import Callable

import grpc
import pytest

from controller.etcd import EtcdClient
from tools.fleet.cluster import Cluster, wait_until
from vmm.v1 import vm_pb2, vm_pb2_grpc

ELECTION = "/vmm/controller-leader"


def leader(cluster: Cluster) -> str:
    async def read() -> str:
        async with EtcdClient([cluster.etcd.endpoint]) as client:
            kv = await client.leader(ELECTION)
            return kv.value.decode() if kv else ""

    return asyncio.run(read())


def test_one_replica_leads_and_another_takes_over(cluster: Cluster) -> None:
    replica, _ = cluster.add_controller("replica-b")
    first = wait_until(lambda: leader(cluster), what="a leader")
    assert first in ("controller", "replica-b")
    if first == "controller":
        cluster.controller.signal(signal.SIGKILL)
    else:
        replica.signal(signal.SIGKILL)
    other = "replica-b" if first == "controller" else "controller"
    # The dead leader's lease runs out; the survivor's campaign then wins.
    assert wait_until(lambda: leader(cluster) == other, timeout=30, what="a new leader")


def test_any_replica_serves_the_api(cluster: Cluster,
                                    example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster.add_agent("h1")  # connected to the first controller
    _, address = cluster.add_controller("replica-b")
    created = cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="shared",
                                                          config=example("ci-runner")))
    assert created.state == vm_pb2.VM_STATE_CREATED
    with grpc.insecure_channel(address) as channel:
        other = vm_pb2_grpc.VmServiceStub(channel)
        seen = wait_until(lambda: {v.vm_id for v in other.ListVms(vm_pb2.ListVmsRequest()).vms},
                          what="the VM listed by the other replica")
        assert seen == {"shared"}
        # The write lands in etcd; the replica holding h1's stream carries it to the agent,
        # and this replica sees the agent's report through its own watch.
        booted = other.BootVm(vm_pb2.BootVmRequest(vm_id="shared"))
        assert booted.state == vm_pb2.VM_STATE_RUNNING
    info = cluster.vms.GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id="shared"))
    assert info.state == vm_pb2.VM_STATE_RUNNING


def test_leader_forgets_a_deletion_whose_host_never_returns(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster.restart_controller_with(["--forget-deleted-after", "1", "--operation-timeout", "2"])
    agent = cluster.add_agent("h1")
    cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="orphan", config=example("ci-runner")))
    agent.signal(signal.SIGSTOP)  # frozen: it never confirms the removal
    try:
        with pytest.raises(grpc.RpcError) as err:
            cluster.vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id="orphan", force=True))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        agent.signal(signal.SIGKILL)
    wait_until(lambda: cluster.vms.ListVms(vm_pb2.ListVmsRequest()).total_count == 0,
               timeout=30, what="the deletion to be completed by the leader")


def test_the_same_id_created_on_two_replicas_at_once_exists_once(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    """Neither replica may have the other's record cached yet: the create transaction's
    guard decides, and the loser (asking for another config: a retry of the same create
    would get the same VM) hears ALREADY_EXISTS, not a second VM."""
    cluster.add_agent("h1", vcpus=64, memory=64 << 30)
    _, address = cluster.add_controller("replica-b")
    with grpc.insecure_channel(address) as channel:
        stubs = [cluster.vms, vm_pb2_grpc.VmServiceStub(channel)]
        wait_until(lambda: stubs[1].ListVms(vm_pb2.ListVmsRequest()) is not None,
                   what="the second replica serving")

        def create(vm_id: str, stub: vm_pb2_grpc.VmServiceStub) -> grpc.StatusCode:
            try:
                name = "ci-runner" if stub is stubs[0] else "lambda-function"
                stub.CreateVm(vm_pb2.CreateVmRequest(vm_id=vm_id, config=example(name)))
                return grpc.StatusCode.OK
            except grpc.RpcError as err:
                return err.code()

        ids = [f"twice-{i}" for i in range(6)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
            outcomes = {vm_id: sorted(pool.map(lambda s, v=vm_id: create(v, s), stubs),
                                      key=lambda c: c.value[0]) for vm_id in ids}
    for vm_id, codes in outcomes.items():
        assert codes == [grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS], (vm_id, codes)
    listed = [v.vm_id for v in cluster.vms.ListVms(vm_pb2.ListVmsRequest()).vms]
    assert sorted(listed) == ids
