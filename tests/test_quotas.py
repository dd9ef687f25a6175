"""Namespace quotas: refusals name the quota, and two replicas creating at once never
overcommit one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from controller.etcd import EtcdClient
from tests.conftest import FAKE_KERNEL
from tools.fleet.cluster import Cluster, channel_with_token
from vmm.store.v1 import records_pb2
from vmm.v1 import vm_pb2, vm_pb2_grpc

ADMIN = "t-admin"
ACCESS = f"""
[[agents]]
host_id = "h1"
token = "t-h1"

[[clients]]
name = "admin"
role = "admin"
namespaces = ["*"]
token = "{ADMIN}"

[namespaces.count]
max_vms = 3

[namespaces.cpu]
max_vcpus = 2

[namespaces.mem]
max_memory_bytes = 268435456
"""


@pytest.fixture(scope="module")
def quota_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str]]:
    tmp_path = tmp_path_factory.mktemp("quotas")
    access = tmp_path / "access.toml"
    access.write_text(ACCESS)
    c = Cluster(tmp_path)
    c.token = ADMIN
    c.controller.argv += ["--access-file", str(access)]
    try:
        c.start()
        _, second = c.add_controller("replica-b", ["--access-file", str(access)])
        c.add_agent("h1", vcpus=32, memory=64 << 30, extra=["--token", "t-h1"])
        yield c, second
    finally:
        c.close()


def request(tmp_path: Path, vm_id: str, namespace: str, vcpus: int = 1,
            memory: int = 128 << 20) -> vm_pb2.CreateVmRequest:
    kernel = tmp_path / "vmlinux"
    if not kernel.exists():
        kernel.write_bytes(FAKE_KERNEL)
    return vm_pb2.CreateVmRequest(vm_id=vm_id, namespace=namespace, config=vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=vcpus), memory=vm_pb2.MemoryConfig(size_bytes=memory),
        boot=vm_pb2.BootConfig(kernel_path=str(kernel))))


def refusal(stub: vm_pb2_grpc.VmServiceStub, req: vm_pb2.CreateVmRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateVm(req, timeout=30)
    return err.value


def usage_record(cluster: Cluster, namespace: str) -> records_pb2.Allocation:
    async def read() -> records_pb2.Allocation:
        async with EtcdClient([cluster.etcd.endpoint]) as etcd:
            kv = await etcd.get(f"/vmm/usage/{namespace}")
            assert kv is not None, f"no usage record for {namespace}"
            return records_pb2.Allocation.FromString(kv.value)

    return asyncio.run(read())


def test_quota_refusals_name_the_quota(quota_cluster: tuple[Cluster, str],
                                       tmp_path: Path) -> None:
    cluster, _ = quota_cluster
    vms = cluster.vms
    vms.CreateVm(request(tmp_path, "cpu-1", "cpu", vcpus=2), timeout=30)
    error = refusal(vms, request(tmp_path, "cpu-2", "cpu", vcpus=1))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "namespace 'cpu' quota max_vcpus is 2" in error.details()
    error = refusal(vms, request(tmp_path, "mem-1", "mem", memory=512 << 20))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "quota max_memory_bytes is 256 MiB" in error.details()
    # Refused creates stored nothing; a namespace without a quota is not limited.
    listed = vms.ListVms(vm_pb2.ListVmsRequest(namespace="*"))
    assert sorted(v.vm_id for v in listed.vms) == ["cpu-1"]
    vms.CreateVm(request(tmp_path, "free-1", "free", vcpus=4), timeout=30)
    # Deleting gives the quota back.
    vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id="cpu-1", force=True), timeout=30)
    assert usage_record(cluster, "cpu").allocated.vcpus == 0
    vms.CreateVm(request(tmp_path, "cpu-2", "cpu", vcpus=1), timeout=30)


def test_two_replicas_creating_at_once_stay_within_the_quota(
        quota_cluster: tuple[Cluster, str], tmp_path: Path) -> None:
    cluster, second = quota_cluster
    with channel_with_token(second, ADMIN) as other:
        stubs = [cluster.vms, vm_pb2_grpc.VmServiceStub(other)]

        def create(i: int) -> grpc.StatusCode:
            try:
                stubs[i % 2].CreateVm(request(tmp_path, f"count-{i}", "count"), timeout=60)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                assert "namespace 'count' quota max_vms is 3" in exc.details()
                return exc.code()  # type: ignore[no-any-return]
            return grpc.StatusCode.OK

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(create, range(8)))
    assert codes.count(grpc.StatusCode.OK) == 3, codes
    listed = cluster.vms.ListVms(vm_pb2.ListVmsRequest(namespace="count"))
    assert listed.total_count == 3
    usage = usage_record(cluster, "count")
    assert usage.vm_count == 3
    assert usage.allocated.vcpus == 3
