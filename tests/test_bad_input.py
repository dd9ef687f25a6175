"""Bad input: the right status code, the field named in google.rpc.BadRequest, nothing written."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest

from tests.support.api import bad_fields, etcd_revision
from tests.support.invariants import read_fleet
from tools.fleet.cluster import Cluster, wait_until
from vmm.v1 import vm_pb2


def mutate(base: vm_pb2.VmConfig, change: Callable[[vm_pb2.VmConfig], object]) -> vm_pb2.VmConfig:
    config = vm_pb2.VmConfig()
    config.CopyFrom(base)
    change(config)
    return config


def add_disk(c: vm_pb2.VmConfig, **kw: object) -> None:
    disk = c.storage.add()
    disk.path = c.storage[0].path
    for k, v in kw.items():
        setattr(disk, k, v)


CASES: list[tuple[str, Callable[[vm_pb2.VmConfig], object], str]] = [
    ("missing cpu", lambda c: c.ClearField("cpu"), "config.cpu"),
    ("missing memory", lambda c: c.ClearField("memory"), "config.memory"),
    ("missing boot", lambda c: c.ClearField("boot"), "config.boot"),
    ("zero vcpus", lambda c: setattr(c.cpu, "vcpu_count", 0), "config.cpu.vcpu_count"),
    ("33 vcpus on firecracker", lambda c: setattr(c.cpu, "vcpu_count", 33),
     "config.cpu.vcpu_count"),
    ("zero memory", lambda c: setattr(c.memory, "size_bytes", 0), "config.memory.size_bytes"),
    ("negative memory", lambda c: setattr(c.memory, "size_bytes", -(1 << 30)),
     "config.memory.size_bytes"),
    ("negative max memory", lambda c: setattr(c.memory, "max_size_bytes", -1),
     "config.memory.max_size_bytes"),
    ("empty kernel path", lambda c: setattr(c.boot, "kernel_path", ""), "config.boot.kernel_path"),
    ("kernel not on the host", lambda c: setattr(c.boot, "kernel_path", "/nonexistent/vmlinux"),
     "config.boot.kernel_path"),
    ("duplicate storage ids",
     lambda c: (setattr(c.storage[0], "id", "d"), add_disk(c, id="d")), "config.storage[1].id"),
    ("two root devices", lambda c: add_disk(c, is_root_device=True),
     "config.storage[1].is_root_device"),
    ("malformed MAC", lambda c: c.network.add(id="n", tap_device="tap0", mac_address="52:54:zz"),
     "config.network[0].mac_address"),
]


@pytest.mark.parametrize(("name", "change", "field"), CASES, ids=[c[0] for c in CASES])
def test_bad_create_names_the_field_and_writes_nothing(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig], name: str,
        change: Callable[[vm_pb2.VmConfig], object], field: str) -> None:
    cluster.add_agent("h1", backends="firecracker")
    config = mutate(example("lambda-function"), change)
    before = etcd_revision(cluster)
    with pytest.raises(grpc.RpcError) as err:
        cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="bad", config=config))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert field in bad_fields(err.value), (bad_fields(err.value), err.value.details())
    assert field in err.value.details()
    assert etcd_revision(cluster) == before
    assert cluster.vms.ListVms(vm_pb2.ListVmsRequest()).total_count == 0


def test_firecracker_limit_error_names_the_backend(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster.add_agent("h1", backends="firecracker")
    config = mutate(example("lambda-function"), lambda c: setattr(c.cpu, "vcpu_count", 33))
    with pytest.raises(grpc.RpcError) as err:
        cluster.vms.CreateVm(vm_pb2.CreateVmRequest(config=config, backend="firecracker"))
    assert "firecracker" in err.value.details() and "1-32" in err.value.details()


def test_unknown_vm_and_reused_id(cluster: Cluster,
                                  example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster.add_agent("h1")
    for call in (lambda: cluster.vms.GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id="nope")),
                 lambda: cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="nope")),
                 lambda: cluster.vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id="nope"))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "nope" in err.value.details()
    cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="once", config=example("lambda-function")))
    # The agent's report may answer the call before its write lands: let it land.
    wait_until(lambda: asyncio.run(read_fleet([cluster.etcd.endpoint])).records["once"]
               .status.observed_generation == 1, what="the create's report in etcd")
    before = etcd_revision(cluster)
    with pytest.raises(grpc.RpcError) as err:
        cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="once", config=example("ci-runner")))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert etcd_revision(cluster) == before


def test_max_vcpu_count_is_ignored_on_firecracker_with_a_warning(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster.add_agent("h1", backends="firecracker")
    config = mutate(example("lambda-function"), lambda c: setattr(c.cpu, "max_vcpu_count", 4))
    created = cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="warn", config=config))
    assert created.placement.backend == "firecracker"
    assert any("max_vcpu_count" in w and "firecracker" in w for w in created.warnings)
