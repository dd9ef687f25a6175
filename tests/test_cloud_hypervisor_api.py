"""Cloud Hypervisor through the public API: the spec's examples, hotplug, graceful shutdown,
cross-backend migration and agent restarts, on a real control plane driving the Cloud
Hypervisor simulator (and the Firecracker one where the two must differ).

What the hypervisor runs is read from its own API (vm.info over the VM's socket), never
from the control plane's records alone.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.hypervisors.cloud_hypervisor_api import CloudHypervisorApi, VmInfo
from agent.vm_dir import VmDir
from tests.support.api import bad_fields
from tools.fleet.cluster import GIB, Cluster, wait_until
from vmm import features
from vmm.v1 import vm_pb2

CH_HOST, FC_HOST = "ch-host", "fc-host"
S = vm_pb2
EXAMPLES = ("production-workload", "web-application", "database-server")
POWER_DOWN_LINE = "reboot: Power down"  # what a Linux guest prints as it powers off


@pytest.fixture(scope="module")
def ch_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("ch-api"))
    try:
        cluster.start()
        add_ch_agent(cluster)
        cluster.add_agent(FC_HOST, vcpus=16, memory=16 * GIB, backends=features.FIRECRACKER)
        yield cluster
    finally:
        cluster.close()


def add_ch_agent(cluster: Cluster) -> None:
    # Room for the database-server example's hotplug ceiling: 32 vCPUs, 64 GiB.
    cluster.add_agent(CH_HOST, vcpus=128, memory=256 * GIB, backends=features.CLOUD_HYPERVISOR)


class Vms:
    """The VMs one test creates on a cluster; removed at the end of the test."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.api = cluster.vms
        self.created: list[str] = []

    def create(self, vm_id: str, config: vm_pb2.VmConfig, backend: str = "",
               boot: bool = True) -> vm_pb2.CreateVmResponse:
        created = self.api.CreateVm(vm_pb2.CreateVmRequest(vm_id=vm_id, config=config,
                                                           backend=backend))
        self.created.append(vm_id)
        if boot:
            assert self.api.BootVm(vm_pb2.BootVmRequest(vm_id=vm_id)).state == \
                S.VM_STATE_RUNNING
        return created

    def info(self, vm_id: str) -> vm_pb2.GetVmInfoResponse:
        return self.api.GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id=vm_id))

    def vm_dir(self, vm_id: str) -> Path:
        return self.cluster.workdir / f"agent-{self.info(vm_id).placement.host_id}" / "vms" / vm_id

    def console(self, vm_id: str) -> str:
        return (self.vm_dir(vm_id) / "console.log").read_text(errors="replace")

    def pid(self, vm_id: str) -> int:
        return int(json.loads((self.vm_dir(vm_id) / "runtime.json").read_text())["pid"])

    def hypervisor(self, vm_id: str) -> VmInfo:
        """Cloud Hypervisor's own vm.info for the VM."""
        socket_path = VmDir(self.vm_dir(vm_id)).api_socket

        async def read() -> VmInfo:
            async with CloudHypervisorApi(socket_path) as api:
                return await api.vm_info()

        return asyncio.run(read())

    def running(self, vm_id: str) -> dict[str, Any]:
        return self.hypervisor(vm_id).config

    def remove_all(self) -> None:
        for vm_id in self.created:
            try:
                self.api.DeleteVm(vm_pb2.DeleteVmRequest(vm_id=vm_id, force=True))
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise


@pytest.fixture
def vms(ch_cluster: Cluster) -> Iterator[Vms]:
    v = Vms(ch_cluster)
    try:
        yield v
    finally:
        v.remove_all()




def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


# ---- the spec's Cloud Hypervisor examples ------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLES)
def test_spec_example_runs_on_cloud_hypervisor(
        vms: Vms, example: Callable[[str], vm_pb2.VmConfig], name: str) -> None:
    config = example(name)
    # No backend named: every example sets max_vcpu_count for hotplug, which only
    # Cloud Hypervisor honours.
    created = vms.create(name, config)
    assert created.placement.backend == features.CLOUD_HYPERVISOR
    assert not created.warnings
    assert vms.info(name).state == S.VM_STATE_RUNNING
    info = vms.hypervisor(name)
    assert info.state == "Running"
    cpus, memory = info.config["cpus"], info.config["memory"]
    assert (cpus["boot_vcpus"], cpus["max_vcpus"]) == (config.cpu.vcpu_count,
                                                       config.cpu.max_vcpu_count)
    assert memory["size"] == config.memory.size_bytes
    assert [d["path"] for d in info.config["disks"]] == [d.path for d in config.storage]
    assert [(n["id"], n["tap"]) for n in info.config["net"]] == \
        [(n.id, n.tap_device) for n in config.network]
    for nic in config.network:
        if nic.mac_address:
            assert {n["id"]: n["mac"] for n in info.config["net"]}[nic.id] == nic.mac_address
    assert f"Command line: {config.boot.kernel_args}" in vms.console(name)


# ---- CPU hotplug ------------------------------------------------------------------------


def test_resize_within_max_vcpu_count_and_refusal_beyond_it(
        vms: Vms, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    vms.create("resize", example("production-workload"))  # 8 vCPUs, max 16
    before = vms.info("resize")

    beyond = refused(lambda: vms.api.ResizeVm(vm_pb2.ResizeVmRequest(vm_id="resize",
                                                                     vcpu_count=17)))
    assert beyond.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_vcpu_count" in beyond.details() and "17" in beyond.details()
    assert "vcpu_count" in bad_fields(beyond)
    after = vms.info("resize")
    assert after.config == before.config and after.generation == before.generation
    assert vms.running("resize")["cpus"]["boot_vcpus"] == 8

    resized = vms.api.ResizeVm(vm_pb2.ResizeVmRequest(vm_id="resize", vcpu_count=16))
    assert (resized.success, resized.vcpu_count, resized.state) == (True, 16, S.VM_STATE_RUNNING)
    assert vms.running("resize")["cpus"]["boot_vcpus"] == 16
    # The stored desired config follows the change.
    info = vms.info("resize")
    assert (info.config.cpu.vcpu_count, info.config.cpu.max_vcpu_count) == (16, 16)
    assert info.state == S.VM_STATE_RUNNING
    listed = {v.vm_id: v for v in vms.api.ListVms(vm_pb2.ListVmsRequest()).vms}
    assert listed["resize"].vcpu_count == 16

    again = refused(lambda: vms.api.ResizeVm(vm_pb2.ResizeVmRequest(vm_id="resize",
                                                                    vcpu_count=17)))
    assert again.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert vms.running("resize")["cpus"]["boot_vcpus"] == 16
    assert vms.info("resize").config.cpu.vcpu_count == 16


# ---- device hotplug ---------------------------------------------------------------------


def test_a_hot_added_disk_may_not_share_an_image_one_of_them_writes(
        vms: Vms, example: Callable[[str], vm_pb2.VmConfig], tmp_path: Path) -> None:
    """AttachDisk refuses what CreateVm refuses: an image another disk of the VM, or
    another VM on the host, would share with a writer. Nothing changes."""
    vms.create("writer", example("production-workload"))
    config = example("production-workload")
    for i, disk in enumerate(config.storage):  # images of its own
        disk.path = str(tmp_path / f"other-{i}.img")
        Path(disk.path).write_bytes(b"\0" * 4096)
    vms.create("other", config)
    theirs = vms.info("writer").config.storage[0]
    own = vms.info("other").config.storage[0]
    before = [d.id for d in vms.info("other").config.storage]
    for path, read_only, named in ((theirs.path, True, "'writer'"),
                                   (own.path, False, "config.storage[0]")):
        err = refused(lambda p=path, r=read_only: vms.api.AttachDisk(vm_pb2.AttachDiskRequest(
            vm_id="other", device=vm_pb2.StorageDevice(id="shared", path=p, read_only=r))))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "device.path" in err.details() and named in err.details()
    assert [d.id for d in vms.info("other").config.storage] == before
    assert "shared" not in {d["id"] for d in vms.running("other")["disks"]}
    # Read-only beside read-only is fine.
    image = tmp_path / "shared.img"
    image.write_bytes(b"\0" * 4096)
    for vm_id in ("writer", "other"):
        assert vms.api.AttachDisk(vm_pb2.AttachDiskRequest(vm_id=vm_id, device=vm_pb2.StorageDevice(
            id="shared", path=str(image), read_only=True))).success
    # Two attaches of one writable image at once, to two VMs: one of them gets it.
    contested = tmp_path / "contested.img"
    contested.write_bytes(b"\0" * 4096)

    def attach(vm_id: str) -> grpc.StatusCode:
        try:
            vms.api.AttachDisk(vm_pb2.AttachDiskRequest(vm_id=vm_id, device=vm_pb2.StorageDevice(
                id="contested", path=str(contested))))
        except grpc.RpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(2) as pool:
        outcomes = sorted(pool.map(attach, ["writer", "other"]), key=str)
    assert outcomes == sorted([grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT], key=str)
    holders = [vm_id for vm_id in ("writer", "other")
               if "contested" in {d.id for d in vms.info(vm_id).config.storage}]
    assert len(holders) == 1


def test_attach_and_detach_disk_and_nic_on_a_running_vm(
        vms: Vms, example: Callable[[str], vm_pb2.VmConfig], tmp_path: Path) -> None:
    vms.create("hotplug", example("production-workload"))
    extra = tmp_path / "extra.img"
    extra.write_bytes(b"\0" * 4096)

    attached = vms.api.AttachDisk(vm_pb2.AttachDiskRequest(
        vm_id="hotplug", device=vm_pb2.StorageDevice(id="extra", path=str(extra))))
    assert attached.success and attached.state == S.VM_STATE_RUNNING
    disks = {d["id"]: d["path"] for d in vms.running("hotplug")["disks"]}
    assert disks["extra"] == str(extra) and len(disks) == 3
    assert "extra" in [d.id for d in vms.info("hotplug").config.storage]

    nic = vm_pb2.NetworkInterface(id="extra-nic", tap_device="tap-extra",
                                  mac_address="52:54:00:12:34:56")
    assert vms.api.AttachNetworkInterface(vm_pb2.AttachNetworkInterfaceRequest(
        vm_id="hotplug", interface=nic)).success
    nets = {n["id"]: n for n in vms.running("hotplug")["net"]}
    assert (nets["extra-nic"]["tap"], nets["extra-nic"]["mac"]) == ("tap-extra",
                                                                    "52:54:00:12:34:56")
    assert [n.id for n in vms.info("hotplug").config.network] == ["mgmt", "data", "extra-nic"]

    assert vms.api.DetachDisk(vm_pb2.DetachDiskRequest(vm_id="hotplug",
                                                       device_id="extra")).success
    assert "extra" not in {d["id"] for d in vms.running("hotplug")["disks"]}
    assert "extra" not in [d.id for d in vms.info("hotplug").config.storage]
    # A NIC the VM booted with comes out as well as a hot-added one.
    for nic_id in ("extra-nic", "data"):
        assert vms.api.DetachNetworkInterface(vm_pb2.DetachNetworkInterfaceRequest(
            vm_id="hotplug", interface_id=nic_id)).success
    assert [n["id"] for n in vms.running("hotplug")["net"]] == ["mgmt"]
    assert [n.id for n in vms.info("hotplug").config.network] == ["mgmt"]
    assert vms.info("hotplug").state == S.VM_STATE_RUNNING


def test_the_same_changes_on_firecracker_are_refused_and_change_nothing(
        vms: Vms, example: Callable[[str], vm_pb2.VmConfig], tmp_path: Path) -> None:
    config = example("lambda-function")
    config.storage[0].id = "rootfs"
    config.network.add(id="eth0", tap_device="tap-fc0")
    created = vms.create("fc", config, backend=features.FIRECRACKER)
    assert created.placement.host_id == FC_HOST
    extra = tmp_path / "extra.img"
    extra.write_bytes(b"\0" * 4096)
    before = vms.info("fc")
    calls: list[tuple[str, Callable[[], object]]] = [
        ("CPU Hotplug", lambda: vms.api.ResizeVm(vm_pb2.ResizeVmRequest(
            vm_id="fc", vcpu_count=2))),
        ("Memory Hotplug", lambda: vms.api.ResizeVm(vm_pb2.ResizeVmRequest(
            vm_id="fc", memory_size_bytes=GIB))),
        ("Disk Hotplug", lambda: vms.api.AttachDisk(vm_pb2.AttachDiskRequest(
            vm_id="fc", device=vm_pb2.StorageDevice(id="extra", path=str(extra))))),
        ("Disk Hotplug", lambda: vms.api.DetachDisk(vm_pb2.DetachDiskRequest(
            vm_id="fc", device_id="rootfs"))),
        ("Network Hotplug", lambda: vms.api.AttachNetworkInterface(
            vm_pb2.AttachNetworkInterfaceRequest(
                vm_id="fc", interface=vm_pb2.NetworkInterface(id="eth1", tap_device="tap-fc1")))),
        ("Network Hotplug", lambda: vms.api.DetachNetworkInterface(
            vm_pb2.DetachNetworkInterfaceRequest(vm_id="fc", interface_id="eth0"))),
    ]
    for feature_title, call in calls:
        err = refused(call)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert feature_title in err.details() and "firecracker" in err.details(), err.details()
    after = vms.info("fc")
    assert after.config == before.config
    assert (after.generation, after.state) == (before.generation, S.VM_STATE_RUNNING)


# ---- graceful shutdown ------------------------------------------------------------------


def test_guest_that_answers_the_power_button_stops_before_the_timeout(
        vms: Vms, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    vms.create("acpi", example("web-application"))
    pid = vms.pid("acpi")
    timeout = 30
    started = time.monotonic()
    down = vms.api.ShutdownVm(vm_pb2.ShutdownVmRequest(vm_id="acpi", timeout_seconds=timeout))
    elapsed = time.monotonic() - started
    assert down.state == S.VM_STATE_SHUTDOWN
    assert vms.info("acpi").state == S.VM_STATE_SHUTDOWN
    # The guest powered itself off: the graceful path, not the timeout.
    assert POWER_DOWN_LINE in vms.console("acpi")
    assert elapsed < timeout
    # The VMM (started with --no-shutdown) keeps the VM's config for the next boot.
    assert vms.pid("acpi") == pid and vms.hypervisor("acpi").state == "Created"
    assert vms.api.BootVm(vm_pb2.BootVmRequest(vm_id="acpi")).state == S.VM_STATE_RUNNING


def test_guest_that_ignores_the_power_button_is_stopped_after_the_timeout(
        vms: Vms, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    config = example("web-application")
    config.boot.kernel_args += " acpi=off"  # no ACPI in the guest: the button goes unheard
    vms.create("no-acpi", config)
    timeout = 2
    started = time.monotonic()
    down = vms.api.ShutdownVm(vm_pb2.ShutdownVmRequest(vm_id="no-acpi",
                                                       timeout_seconds=timeout))
    elapsed = time.monotonic() - started
    assert down.state == S.VM_STATE_SHUTDOWN
    assert vms.info("no-acpi").state == S.VM_STATE_SHUTDOWN
    # Stopped by the VMM once the guest had its time: the forced path.
    assert elapsed >= timeout
    assert POWER_DOWN_LINE not in vms.console("no-acpi")
    assert vms.hypervisor("no-acpi").state == "Created"


# ---- migration ----------------------------------------------------------------------------


def test_migrating_to_another_backend_is_refused_with_the_way_to_switch(
        vms: Vms, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    vms.create("stay", example("web-application"))
    pid = vms.pid("stay")
    err = refused(lambda: vms.api.MigrateVm(vm_pb2.MigrateVmRequest(
        vm_id="stay", target_backend=features.FIRECRACKER)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.details()
    assert "cannot be migrated between backends" in details
    assert "create a new VM" in details
    assert "cloud-hypervisor" in details and "firecracker" in details
    info = vms.info("stay")
    assert (info.state, info.placement.backend) == (S.VM_STATE_RUNNING,
                                                    features.CLOUD_HYPERVISOR)
    assert vms.pid("stay") == pid


# ---- agent restart --------------------------------------------------------------------------


@pytest.fixture
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A control plane of the test's own (its agent gets killed), in a short directory:
    API socket paths must stay within the 107 bytes a Unix socket address holds."""
    cluster = Cluster(tmp_path_factory.mktemp("restart"))
    try:
        cluster.start()
        add_ch_agent(cluster)
        yield cluster
    finally:
        cluster.close()


def test_resized_vm_keeps_its_size_across_an_agent_restart(
        own_cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster = own_cluster
    vms = Vms(cluster)
    vms.create("kept", example("production-workload"))
    vms.api.ResizeVm(vm_pb2.ResizeVmRequest(vm_id="kept", vcpu_count=12))
    pid = vms.pid("kept")

    agent = cluster.agents[CH_HOST]
    agent.signal(signal.SIGKILL)
    wait_until(lambda: vms.info("kept").state == S.VM_STATE_UNKNOWN, what="host down")
    agent.start()
    cluster.wait_host_ready(CH_HOST)
    wait_until(lambda: vms.info("kept").state == S.VM_STATE_RUNNING,
               what="the adopted VM reported RUNNING")

    info = vms.info("kept")
    assert info.config.cpu.vcpu_count == 12
    listed = {v.vm_id: v for v in vms.api.ListVms(vm_pb2.ListVmsRequest()).vms}
    assert listed["kept"].vcpu_count == 12
    # Adopted, not recreated: the same VMM runs the resized guest.
    assert vms.pid("kept") == pid
    assert vms.running("kept")["cpus"]["boot_vcpus"] == 12
    # And it is still driven: the next resize goes through.
    assert vms.api.ResizeVm(vm_pb2.ResizeVmRequest(vm_id="kept", vcpu_count=16)).vcpu_count == 16
    assert vms.running("kept")["cpus"]["boot_vcpus"] == 16


# ---- disk images shared between VMs ------------------------------------------------------


def test_two_vms_are_never_given_one_writable_image(
        vms: Vms, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    first = example("web-application")
    vms.create("writer", first, boot=False)
    second = example("web-application")  # the same two writable images
    second.ClearField("network")
    with pytest.raises(grpc.RpcError) as refused:
        vms.create("second-writer", second, boot=False)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(refused.value) == ["config.storage[0].path", "config.storage[1].path"]
    assert "VM 'writer'" in refused.value.details()
    # A read-only user of a written image is refused too; read-only users share one.
    reader = example("web-application")
    reader.ClearField("network")
    del reader.storage[1]
    reader.storage[0].read_only = True
    with pytest.raises(grpc.RpcError) as refused:
        vms.create("reader", reader, boot=False)
    assert bad_fields(refused.value) == ["config.storage[0].path"]
    vms.create("ci-1", example("ci-runner"), boot=False)
    vms.create("ci-2", example("ci-runner"), boot=False)
