"""The backend support matrix (spec: backend-support-matrix.md), row by row, on both backends.

Every row of the spec's feature tables (core operations, CPU, memory, storage, network,
console) is exercised through the public gRPC API on a real control plane (etcd, the
controller and an agent offering the Firecracker and Cloud Hypervisor simulators):

* supported: it happens. The VM's state changes and the hypervisor saw it: Firecracker
  logs every API request it serves (Info level) to the VM's hypervisor.log; Cloud
  Hypervisor's vm.info, read over the VM's API socket, shows the config it runs.
* not supported: the request is refused with the status code, the field (config) or the
  feature (operation) and the backend named, and nothing changes.
* ignored: the VM is created and the response carries a warning.

The expected support comes from the spec table below; each row first checks that the
backend declares that support (HostService.GetBackendCapabilities), then that the
behaviour through the API matches it. One control plane serves the whole module; each
test removes its VMs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import psutil
import pytest

from agent.hypervisors.cloud_hypervisor_api import CloudHypervisorApi, VmInfo
from agent.runtimes import runtime_class
from agent.runtimes.base import RuntimeSettings
from agent.vm_dir import VmDir
from tests.support.api import bad_fields, etcd_revision, wait_report_recorded
from tools.fleet.cluster import GIB, Cluster, wait_until
from tools.simulators.cloud_hypervisor.main import GUEST_DEBUG_ENV
from vmm import features
from vmm.v1 import host_pb2, vm_pb2

FC, CH = features.FIRECRACKER, features.CLOUD_HYPERVISOR
FULL, PARTIAL = host_pb2.SUPPORT_FULL, host_pb2.SUPPORT_PARTIAL
IGNORED, NONE = host_pb2.SUPPORT_IGNORED, host_pb2.SUPPORT_NONE
Support: TypeAlias = host_pb2.Support.ValueType
MIB = 1 << 20
HOST = "h1"
# The stand-in for an SR-IOV virtual function the network.sriov row passes through.
PCI_FUNCTION = "0000:3b:02.1"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

# The spec's matrix: feature key -> (Cloud Hypervisor, Firecracker), the spec's column order.
SPEC: dict[str, tuple[Support, Support]] = {
    "vm.create": (FULL, FULL),
    "vm.boot": (FULL, FULL),
    "vm.shutdown": (FULL, PARTIAL),  # Firecracker: force only (Ctrl+Alt+Del)
    "vm.pause_resume": (FULL, FULL),
    "vm.reboot": (FULL, PARTIAL),  # Firecracker: force only (Ctrl+Alt+Del)
    "vm.delete": (FULL, FULL),
    "cpu.vcpu_count": (FULL, FULL),
    "cpu.hotplug": (FULL, NONE),
    "cpu.max_vcpu_count": (FULL, IGNORED),
    "cpu.topology": (FULL, NONE),
    "cpu.affinity": (FULL, NONE),
    "memory.size": (FULL, FULL),
    "memory.hotplug": (FULL, NONE),
    "memory.hugepages": (FULL, NONE),
    "memory.numa": (FULL, NONE),
    "memory.sharing": (FULL, NONE),
    "storage.block": (FULL, FULL),
    "storage.read_only": (FULL, FULL),
    "storage.multiple": (FULL, FULL),
    "storage.hotplug": (FULL, NONE),
    "storage.advanced_io": (FULL, PARTIAL),  # Firecracker: basic
    "network.tap": (FULL, FULL),
    "network.mac": (FULL, FULL),
    "network.vhost_user": (FULL, NONE),
    "network.hotplug": (FULL, NONE),
    "network.sriov": (FULL, NONE),
    "console.serial": (FULL, FULL),
    "console.logging": (FULL, FULL),
    "debug.rich": (FULL, PARTIAL),  # Firecracker: minimal
    "debug.gdb": (FULL, PARTIAL),  # Firecracker: limited
}


@dataclass(frozen=True)
class SpecLimits:
    vcpus: tuple[int, int]
    memory: tuple[int, int | None]  # None: no upper limit ("1TB+")
    disks: int | None  # None: unlimited
    nics: int | None


# The spec's ranges: CH 1-448 vCPUs, 512 MiB - 1 TiB+, unlimited disks, multiple NICs;
# FC 1-32 vCPUs, 128 MiB - 32 GiB, "~10" disks, "single/few" NICs.
SPEC_LIMITS = {
    CH: SpecLimits(vcpus=(1, 448), memory=(512 * MIB, None), disks=None, nics=None),
    FC: SpecLimits(vcpus=(1, 32), memory=(128 * MIB, 32 * GIB), disks=10, nics=4),
}
# Counts used where a backend has no limit.
MANY_DISKS, MANY_NICS = 16, 6


def spec_support(key: str, backend: str) -> Support:
    cloud_hypervisor, firecracker = SPEC[key]
    return cloud_hypervisor if backend == CH else firecracker


# ---- the control plane --------------------------------------------------------------------


@pytest.fixture(scope="module")
def matrix_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("matrix"))
    # The devices the rows hand to VMs: loop devices stand for raw disks, a directory for a
    # PCI function (the simulators open neither); the agent's allowlist names both.
    (cluster.workdir / "pci" / PCI_FUNCTION).mkdir(parents=True)
    allowlist = f"/dev/loop*,{cluster.workdir / 'pci'}/*"
    try:
        cluster.start()
        # Room for the largest VMs the rows create (448 vCPUs, 1 TiB), one at a time.
        # The Cloud Hypervisor simulator acts as a build with guest_debug (--gdb).
        cluster.add_agent(HOST, vcpus=1024, memory=4096 * GIB, backends=f"{FC},{CH}",
                          env={GUEST_DEBUG_ENV: "1"},
                          extra=["--host-device-allowlist", allowlist])
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def declared(matrix_cluster: Cluster) -> dict[str, host_pb2.BackendCapabilities]:
    reply = matrix_cluster.hosts.GetBackendCapabilities(host_pb2.GetBackendCapabilitiesRequest())
    return {caps.backend: caps for caps in reply.backends}


@dataclass(frozen=True)
class FcRequest:
    method: str
    path: str
    body: dict[str, Any] | None


FC_REQUEST_LINE = re.compile(
    r'The API server received a (\w+) request on "([^"]+)"(?: with body "(.*)")?\.$')


class Plane:
    """The module's control plane as one test uses it; removes the test's VMs at the end."""

    def __init__(self, cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig],
                 files: Path) -> None:
        self.cluster = cluster
        self.vms = cluster.vms
        self.example = example
        self.files = files
        self.created: list[str] = []
        self.roots = 0

    # ---- configs

    def base(self) -> vm_pb2.VmConfig:
        """1 vCPU, 512 MiB (inside both backends' ranges), one writable root disk "root",
        a file of its own: two VMs never write one image."""
        config = self.example("serverless-function")
        config.storage[0].read_only = False
        config.storage[0].id = "root"
        self.roots += 1
        config.storage[0].path = self.disk_file(f"root-{self.roots}")
        return config

    def disk_file(self, name: str) -> str:
        path = self.files / "disks" / f"{name}.img"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(MIB)
        return str(path)

    def add_disks(self, config: vm_pb2.VmConfig, count: int) -> None:
        self.roots += 1
        for i in range(count):
            config.storage.add(id=f"d{i}", path=self.disk_file(f"d{self.roots}-{i}"))

    # ---- calls

    def create(self, vm_id: str, config: vm_pb2.VmConfig, backend: str = "",
               boot: bool = False) -> vm_pb2.CreateVmResponse:
        created = self.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id=vm_id, config=config,
                                                           backend=backend))
        self.created.append(vm_id)
        assert created.state == vm_pb2.VM_STATE_CREATED
        if backend:
            assert created.placement.backend == backend
        if boot:
            assert self.boot(vm_id).state == vm_pb2.VM_STATE_RUNNING
        return created

    def boot(self, vm_id: str) -> vm_pb2.BootVmResponse:
        return self.vms.BootVm(vm_pb2.BootVmRequest(vm_id=vm_id))

    def info(self, vm_id: str) -> vm_pb2.GetVmInfoResponse:
        return self.vms.GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id=vm_id))

    def allocated_vcpus(self) -> int:
        host = self.cluster.hosts.GetHost(host_pb2.GetHostRequest(host_id=HOST)).host
        return host.allocated.vcpus

    def refuse_create(self, vm_id: str, config: vm_pb2.VmConfig, backend: str,
                      field: str, *named: str) -> grpc.RpcError:
        """CreateVm is refused with INVALID_ARGUMENT naming field, the backend and `named`,
        and nothing is written."""
        before = etcd_revision(self.cluster)
        with pytest.raises(grpc.RpcError) as refused:
            self.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id=vm_id, config=config,
                                                     backend=backend))
        err = refused.value
        assert err.code() == INVALID, err.details()
        assert field in bad_fields(err), (bad_fields(err), err.details())
        for word in (field, backend, *named):
            assert word in err.details(), (word, err.details())
        assert etcd_revision(self.cluster) == before
        assert_unknown(self, vm_id)
        assert not self.vm_dir(vm_id).exists()
        return err

    def refuse_change(self, vm_id: str, call: Callable[[], object], feature_title: str,
                      backend: str) -> None:
        """A runtime change is refused with FAILED_PRECONDITION naming the feature and the
        backend; the stored VM and what the hypervisor was told stay as they were."""
        wait_report_recorded(self.cluster, vm_id)  # its last report's write is not the change
        before, seen_before = self.info(vm_id), self.hypervisor_view(vm_id, backend)
        with pytest.raises(grpc.RpcError) as refused:
            call()
        err = refused.value
        assert err.code() == PRECONDITION, err.details()
        assert feature_title in err.details() and backend in err.details(), err.details()
        after = self.info(vm_id)
        assert after.config == before.config
        assert (after.generation, after.state, after.modified_timestamp) == \
            (before.generation, before.state, before.modified_timestamp)
        assert self.hypervisor_view(vm_id, backend) == seen_before

    def remove_all(self) -> None:
        for vm_id in self.created:
            try:
                self.vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id=vm_id, force=True))
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise

    # ---- what the host and the hypervisor show

    def vm_dir(self, vm_id: str) -> Path:
        return self.cluster.workdir / f"agent-{HOST}" / "vms" / vm_id

    def console(self, vm_id: str) -> str:
        return (self.vm_dir(vm_id) / "console.log").read_text(errors="replace")

    def pid(self, vm_id: str) -> int:
        return int(json.loads((self.vm_dir(vm_id) / "runtime.json").read_text())["pid"])

    def fc_requests(self, vm_id: str) -> list[FcRequest]:
        """The API requests Firecracker logged, in order."""
        log = (self.vm_dir(vm_id) / "hypervisor.log").read_text(errors="replace")
        requests = []
        for line in log.splitlines():
            match = FC_REQUEST_LINE.search(line)
            if match:
                method, path, raw = match.groups()
                body = json.loads(json.loads(f'"{raw}"')) if raw is not None else None
                requests.append(FcRequest(method, path, body))
        return requests

    def fc_body(self, vm_id: str, path: str) -> dict[str, Any]:
        """The body of the last PUT on path."""
        bodies = [r.body for r in self.fc_requests(vm_id) if r.method == "Put" and r.path == path]
        assert bodies and bodies[-1] is not None, f"firecracker saw no PUT {path}"
        return bodies[-1]

    def fc_actions(self, vm_id: str) -> list[str]:
        return [r.body["action_type"] for r in self.fc_requests(vm_id)
                if r.path == "/actions" and r.body]

    def ch_info(self, vm_id: str) -> VmInfo:
        async def read() -> VmInfo:
            async with CloudHypervisorApi(VmDir(self.vm_dir(vm_id)).api_socket) as api:
                return await api.vm_info()

        return asyncio.run(read())

    def ch_config(self, vm_id: str) -> dict[str, Any]:
        return self.ch_info(vm_id).config

    def hypervisor_view(self, vm_id: str, backend: str) -> object:
        """What the hypervisor was told: Firecracker's changing requests (not its metrics
        flushes), or Cloud Hypervisor's VM config."""
        if backend == CH:
            return self.ch_config(vm_id)
        return [r for r in self.fc_requests(vm_id)
                if r.method != "Get" and r.body != {"action_type": "FlushMetrics"}]


@pytest.fixture
def plane(matrix_cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig],
          tmp_path: Path) -> Iterator[Plane]:
    p = Plane(matrix_cluster, example, tmp_path)
    try:
        yield p
    finally:
        p.remove_all()






def assert_unknown(p: Plane, vm_id: str) -> None:
    with pytest.raises(grpc.RpcError) as gone:
        p.info(vm_id)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert vm_id not in {v.vm_id for v in p.vms.ListVms(vm_pb2.ListVmsRequest()).vms}


def process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def boots(console: str) -> int:
    return console.count("Command line:")


# ---- the rows -------------------------------------------------------------------------------

Check = Callable[[Plane, str, Support], None]
CHECKS: dict[str, Check] = {}


def row(key: str) -> Callable[[Check], Check]:
    def register(check: Check) -> Check:
        CHECKS[key] = check
        return check

    return register


# -- Core VM operations


@row("vm.create")
def vm_create(p: Plane, backend: str, support: Support) -> None:
    config = p.base()
    config.network.add(id="eth0", tap_device="tap-create", mac_address="52:54:00:00:00:01")
    created = p.create("create", config, backend)
    assert not created.warnings
    assert p.info("create").state == vm_pb2.VM_STATE_CREATED
    root = config.storage[0].path
    if backend == FC:
        assert p.fc_body("create", "/machine-config")["vcpu_count"] == 1
        assert p.fc_body("create", "/machine-config")["mem_size_mib"] == 512
        assert p.fc_body("create", "/boot-source")["kernel_image_path"] == config.boot.kernel_path
        assert p.fc_body("create", "/drives/root")["path_on_host"] == root
        assert p.fc_body("create", "/network-interfaces/eth0")["host_dev_name"] == "tap-create"
        assert "InstanceStart" not in p.fc_actions("create")
    else:
        info = p.ch_info("create")
        assert info.state == "Created"
        assert info.config["cpus"]["boot_vcpus"] == 1
        assert info.config["memory"]["size"] == 512 * MIB
        assert info.config["payload"]["kernel"] == config.boot.kernel_path
        assert [d["path"] for d in info.config["disks"]] == [root]
        assert [n["tap"] for n in info.config["net"]] == ["tap-create"]


@row("vm.boot")
def vm_boot(p: Plane, backend: str, support: Support) -> None:
    config = p.base()
    p.create("boot", config, backend)
    assert boots(p.console("boot")) == 0
    assert p.boot("boot").state == vm_pb2.VM_STATE_RUNNING
    assert p.info("boot").state == vm_pb2.VM_STATE_RUNNING
    assert f"Command line: {config.boot.kernel_args}" in p.console("boot")
    if backend == FC:
        assert "InstanceStart" in p.fc_actions("boot")
    else:
        assert p.ch_info("boot").state == "Running"


@row("vm.shutdown")
def vm_shutdown(p: Plane, backend: str, support: Support) -> None:
    p.create("stop", p.base(), backend, boot=True)
    pid = p.pid("stop")
    down = p.vms.ShutdownVm(vm_pb2.ShutdownVmRequest(vm_id="stop", timeout_seconds=20))
    assert down.state == vm_pb2.VM_STATE_SHUTDOWN
    assert p.info("stop").state == vm_pb2.VM_STATE_SHUTDOWN
    if support == FULL:
        # Graceful: the guest saw the ACPI power button and powered itself off; the VMM
        # stays, holding the VM's config for the next boot.
        assert "reboot: Power down" in p.console("stop")
        assert p.ch_info("stop").state == "Created"
        assert not process_gone(pid)
    else:
        # Force only: Ctrl+Alt+Del, which the guest answers by restarting, and Firecracker
        # exits with it.
        assert support == PARTIAL
        assert "SendCtrlAltDel" in p.fc_actions("stop")
        assert "reboot: Restarting system" in p.console("stop")
        wait_until(lambda: process_gone(pid), what="firecracker to exit")


@row("vm.pause_resume")
def vm_pause_resume(p: Plane, backend: str, support: Support) -> None:
    p.create("pause", p.base(), backend, boot=True)
    paused = p.vms.PauseVm(vm_pb2.PauseVmRequest(vm_id="pause"))
    assert paused.state == vm_pb2.VM_STATE_PAUSED
    assert p.info("pause").state == vm_pb2.VM_STATE_PAUSED
    if backend == FC:
        assert {"state": "Paused"} in [r.body for r in p.fc_requests("pause")
                                       if r.method == "Patch" and r.path == "/vm"]
    else:
        assert p.ch_info("pause").state == "Paused"
    resumed = p.vms.ResumeVm(vm_pb2.ResumeVmRequest(vm_id="pause"))
    assert resumed.state == vm_pb2.VM_STATE_RUNNING
    if backend == FC:
        assert [r.body for r in p.fc_requests("pause") if r.method == "Patch"][-1] == \
            {"state": "Resumed"}
    else:
        assert p.ch_info("pause").state == "Running"


@row("vm.reboot")
def vm_reboot(p: Plane, backend: str, support: Support) -> None:
    p.create("reboot", p.base(), backend, boot=True)
    pid = p.pid("reboot")
    rebooted = p.vms.RebootVm(vm_pb2.RebootVmRequest(vm_id="reboot"))
    assert rebooted.state == vm_pb2.VM_STATE_RUNNING
    assert boots(p.console("reboot")) == 2
    if support == FULL:
        # An in-place reset by the VMM: the same process runs the rebooted guest.
        assert p.pid("reboot") == pid
        assert p.ch_info("reboot").state == "Running"
    else:
        # Ctrl+Alt+Del ends the Firecracker process; a fresh one boots the guest again.
        assert support == PARTIAL
        assert "reboot: Restarting system" in p.console("reboot")
        assert p.pid("reboot") != pid and process_gone(pid)
        assert "InstanceStart" in p.fc_actions("reboot")


@row("vm.delete")
def vm_delete(p: Plane, backend: str, support: Support) -> None:
    p.create("delete", p.base(), backend, boot=True)
    pid = p.pid("delete")
    assert p.vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id="delete", force=True)).success
    assert_unknown(p, "delete")
    assert not p.vm_dir("delete").exists()
    assert not VmDir(p.vm_dir("delete")).api_socket.exists()
    wait_until(lambda: process_gone(pid), what="the hypervisor to exit")


# -- CPU


@row("cpu.vcpu_count")
def cpu_vcpu_count(p: Plane, backend: str, support: Support) -> None:
    low, high = SPEC_LIMITS[backend].vcpus
    over = p.base()
    over.cpu.vcpu_count = high + 1
    p.refuse_create("vcpus-over", over, backend, "config.cpu.vcpu_count", f"{low}-{high}")
    top = p.base()
    top.cpu.vcpu_count = high
    p.create("vcpus-max", top, backend, boot=True)
    if backend == FC:
        assert p.fc_body("vcpus-max", "/machine-config")["vcpu_count"] == high
    else:
        assert p.ch_config("vcpus-max")["cpus"]["boot_vcpus"] == high


@row("cpu.hotplug")
def cpu_hotplug(p: Plane, backend: str, support: Support) -> None:
    config = p.base()
    config.cpu.max_vcpu_count = 2
    p.create("cpu-hotplug", config, backend, boot=True)
    resize = vm_pb2.ResizeVmRequest(vm_id="cpu-hotplug", vcpu_count=2)
    if support == NONE:
        p.refuse_change("cpu-hotplug", lambda: p.vms.ResizeVm(resize), "CPU Hotplug", backend)
        return
    resized = p.vms.ResizeVm(resize)
    assert resized.vcpu_count == 2 and resized.state == vm_pb2.VM_STATE_RUNNING
    assert p.ch_config("cpu-hotplug")["cpus"]["boot_vcpus"] == 2
    assert p.info("cpu-hotplug").config.cpu.vcpu_count == 2


@row("cpu.max_vcpu_count")
def cpu_max_vcpu_count(p: Plane, backend: str, support: Support) -> None:
    config = p.base()
    config.cpu.max_vcpu_count = 4
    before = p.allocated_vcpus()
    created = p.create("max-vcpus", config, backend)
    if support == IGNORED:
        assert [w for w in created.warnings if "config.cpu.max_vcpu_count" in w
                and f"ignored by {backend}" in w], created.warnings
        # Nothing is reserved for a hotplug that cannot happen, nor told to the hypervisor.
        assert p.allocated_vcpus() - before == 1
        assert p.fc_body("max-vcpus", "/machine-config")["vcpu_count"] == 1
    else:
        assert not created.warnings
        assert p.allocated_vcpus() - before == 4  # the hotplug ceiling is reserved
        cpus = p.ch_config("max-vcpus")["cpus"]
        assert (cpus["boot_vcpus"], cpus["max_vcpus"]) == (1, 4)


@row("cpu.topology")
def cpu_topology(p: Plane, backend: str, support: Support) -> None:
    config = p.base()
    config.cpu.vcpu_count = 4
    config.cpu.topology.sockets, config.cpu.topology.cores_per_socket = 2, 2
    config.cpu.topology.threads_per_core = 1
    if support == NONE:
        p.refuse_create("topology", config, backend, "config.cpu.topology", "CPU Topology")
        return
    p.create("topology", config, backend, boot=True)
    assert p.ch_config("topology")["cpus"]["topology"] == {
        "threads_per_core": 1, "cores_per_die": 2, "dies_per_package": 1, "packages": 2}


@row("cpu.affinity")
def cpu_affinity(p: Plane, backend: str, support: Support) -> None:
    config = p.base()
    config.cpu.vcpu_count = 2
    config.cpu.features[features.CPU_AFFINITY_KEY] = "0-1"
    if support == NONE:
        p.refuse_create("affinity", config, backend, "config.cpu.features[affinity]",
                        "CPU Affinity")
        return
    p.create("affinity", config, backend, boot=True)
    assert p.ch_config("affinity")["cpus"]["affinity"] == [
        {"vcpu": 0, "host_cpus": [0, 1]}, {"vcpu": 1, "host_cpus": [0, 1]}]


# -- Memory


@row("memory.size")
def memory_size(p: Plane, backend: str, support: Support) -> None:
    low, high = SPEC_LIMITS[backend].memory
    below = p.base()
    below.memory.size_bytes = low // 2
    p.refuse_create("mem-below", below, backend, "config.memory.size_bytes")
    if high is not None:
        above = p.base()
        above.memory.size_bytes = high + GIB
        p.refuse_create("mem-above", above, backend, "config.memory.size_bytes")
    for vm_id, size in (("mem-low", low), ("mem-high", high or 1024 * GIB)):
        config = p.base()
        config.memory.size_bytes = size
        p.create(vm_id, config, backend, boot=True)
        if backend == FC:
            assert p.fc_body(vm_id, "/machine-config")["mem_size_mib"] == size // MIB
        else:
            assert p.ch_config(vm_id)["memory"]["size"] == size


@row("memory.hotplug")
def memory_hotplug(p: Plane, backend: str, support: Support) -> None:
    config = p.base()
    config.memory.hotplug_enabled = True
    config.memory.max_size_bytes = GIB
    resize = vm_pb2.ResizeVmRequest(vm_id="mem-hotplug", memory_size_bytes=GIB)
    if support == NONE:
        p.refuse_create("mem-hotplug", config, backend, "config.memory.hotplug_enabled",
                        "Memory Hotplug")
        p.create("mem-hotplug", p.base(), backend, boot=True)
        p.refuse_change("mem-hotplug", lambda: p.vms.ResizeVm(resize), "Memory Hotplug",
                        backend)
        return
    p.create("mem-hotplug", config, backend, boot=True)
    resized = p.vms.ResizeVm(resize)
    assert resized.memory_size_bytes == GIB
    info = p.ch_info("mem-hotplug")
    assert info.config["memory"]["size"] == GIB and info.memory_actual_size == GIB
    assert p.info("mem-hotplug").config.memory.size_bytes == GIB


def memory_backing(key: str, value: str, title: str, vm_id: str,
                   seen: Callable[[dict[str, Any]], None]) -> Check:
    """A row selected by memory.backing[key]: refused, or in the VM's memory config."""

    def check(p: Plane, backend: str, support: Support) -> None:
        config = p.base()
        config.cpu.vcpu_count = 2
        config.memory.backing[key] = value
        if support == NONE:
            p.refuse_create(vm_id, config, backend, f"config.memory.backing[{key}]", title)
            return
        p.create(vm_id, config, backend, boot=True)
        seen(p.ch_config(vm_id))

    return check


def hugepages_seen(config: dict[str, Any]) -> None:
    assert config["memory"]["hugepages"] is True
    assert config["memory"]["hugepage_size"] == 2 * MIB


def numa_seen(config: dict[str, Any]) -> None:
    assert [(n["guest_numa_id"], n["cpus"]) for n in config["numa"]] == [(0, [0]), (1, [1])]
    assert [z["size"] for z in config["memory"]["zones"]] == [256 * MIB, 256 * MIB]


def shared_seen(config: dict[str, Any]) -> None:
    assert config["memory"]["shared"] is True


row("memory.hugepages")(memory_backing(features.HUGEPAGES_KEY, "2M", "Hugepages", "hugepages",
                                       hugepages_seen))
row("memory.numa")(memory_backing(features.NUMA_KEY, "2", "NUMA", "numa", numa_seen))
row("memory.sharing")(memory_backing(features.SHARED_KEY, "true", "Memory Sharing", "shared",
                                     shared_seen))


# -- Storage


@row("storage.block")
def storage_block(p: Plane, backend: str, support: Support) -> None:
    config = p.base()
    p.create("block", config, backend, boot=True)
    if backend == FC:
        drive = p.fc_body("block", "/drives/root")
        assert (drive["path_on_host"], drive["is_root_device"]) == (config.storage[0].path, True)
    else:
        assert [d["path"] for d in p.ch_config("block")["disks"]] == [config.storage[0].path]


@row("storage.read_only")
def storage_read_only(p: Plane, backend: str, support: Support) -> None:
    config = p.base()
    config.storage.add(id="ro", path=p.disk_file("ro"), read_only=True)
    p.create("read-only", config, backend, boot=True)
    if backend == FC:
        assert p.fc_body("read-only", "/drives/ro")["is_read_only"] is True
        assert p.fc_body("read-only", "/drives/root")["is_read_only"] is False
    else:
        disks = {d["id"]: d["readonly"] for d in p.ch_config("read-only")["disks"]}
        assert disks == {"root": False, "ro": True}


@row("storage.multiple")
def storage_multiple(p: Plane, backend: str, support: Support) -> None:
    limit = SPEC_LIMITS[backend].disks
    if limit is not None:
        over = p.base()
        p.add_disks(over, limit)  # one beyond the limit, with the root disk
        p.refuse_create("disks-over", over, backend, "config.storage", f"limit of {limit}")
    count = limit or MANY_DISKS
    config = p.base()
    p.add_disks(config, count - 1)
    p.create("disks", config, backend, boot=True)
    if backend == FC:
        drives = {r.path for r in p.fc_requests("disks") if r.path.startswith("/drives/")}
        assert len(drives) == count
    else:
        assert len(p.ch_config("disks")["disks"]) == count


@row("storage.hotplug")
def storage_hotplug(p: Plane, backend: str, support: Support) -> None:
    p.create("disk-hotplug", p.base(), backend, boot=True)
    disk = vm_pb2.StorageDevice(id="hot", path=p.disk_file("hot"))
    attach = vm_pb2.AttachDiskRequest(vm_id="disk-hotplug", device=disk)
    if support == NONE:
        p.refuse_change("disk-hotplug", lambda: p.vms.AttachDisk(attach), "Disk Hotplug",
                        backend)
        detach = vm_pb2.DetachDiskRequest(vm_id="disk-hotplug", device_id="root")
        p.refuse_change("disk-hotplug", lambda: p.vms.DetachDisk(detach), "Disk Hotplug",
                        backend)
        return
    assert p.vms.AttachDisk(attach).state == vm_pb2.VM_STATE_RUNNING
    assert "hot" in {d["id"] for d in p.ch_config("disk-hotplug")["disks"]}
    assert [d.id for d in p.info("disk-hotplug").config.storage] == ["root", "hot"]
    p.vms.DetachDisk(vm_pb2.DetachDiskRequest(vm_id="disk-hotplug", device_id="hot"))
    assert [d["id"] for d in p.ch_config("disk-hotplug")["disks"]] == ["root"]
    assert [d.id for d in p.info("disk-hotplug").config.storage] == ["root"]


@row("storage.advanced_io")
def storage_advanced_io(p: Plane, backend: str, support: Support) -> None:
    if support == PARTIAL:
        # Basic: cache mode, I/O engine and rate limits; queue tuning is refused.
        tuned = p.base()
        tuned.storage[0].options["num_queues"] = "2"
        p.refuse_create("io", tuned, backend, "config.storage[0].options[num_queues]")
        config = p.base()
        config.storage[0].options.update({"cache_type": "writeback", "io_engine": "sync",
                                          "rate_limit_bandwidth": "1048576"})
        p.create("io", config, backend, boot=True)
        drive = p.fc_body("io", "/drives/root")
        assert (drive["cache_type"], drive["io_engine"]) == ("Writeback", "Sync")
        assert drive["rate_limiter"]["bandwidth"]["size"] == 1048576
        return
    config = p.base()
    config.cpu.vcpu_count = 2  # Cloud Hypervisor wants no more queues than vCPUs
    config.storage[0].options.update({"io_engine": "sync", "direct": "true", "num_queues": "2",
                                      "queue_size": "64", "rate_limit_ops": "100"})
    p.create("io", config, backend, boot=True)
    disk = p.ch_config("io")["disks"][0]
    assert disk["disable_io_uring"] is True and disk["disable_aio"] is True
    assert disk["direct"] is True
    assert (disk["num_queues"], disk["queue_size"]) == (2, 64)
    assert disk["rate_limiter_config"]["ops"]["size"] == 100


# -- Network


def with_nics(config: vm_pb2.VmConfig, count: int) -> vm_pb2.VmConfig:
    for i in range(count):
        config.network.add(id=f"eth{i}", tap_device=f"tap-m{i}")
    return config


@row("network.tap")
def network_tap(p: Plane, backend: str, support: Support) -> None:
    limit = SPEC_LIMITS[backend].nics
    if limit is not None:
        p.refuse_create("nics-over", with_nics(p.base(), limit + 1), backend, "config.network",
                        f"limit of {limit}")
    count = limit or MANY_NICS
    p.create("nics", with_nics(p.base(), count), backend, boot=True)
    taps = [f"tap-m{i}" for i in range(count)]
    if backend == FC:
        assert [p.fc_body("nics", f"/network-interfaces/eth{i}")["host_dev_name"]
                for i in range(count)] == taps
    else:
        assert [n["tap"] for n in p.ch_config("nics")["net"]] == taps


@row("network.mac")
def network_mac(p: Plane, backend: str, support: Support) -> None:
    config = p.base()
    config.network.add(id="eth0", tap_device="tap-mac", mac_address="52:54:00:ab:cd:01")
    p.create("mac", config, backend, boot=True)
    if backend == FC:
        assert p.fc_body("mac", "/network-interfaces/eth0")["guest_mac"] == "52:54:00:ab:cd:01"
    else:
        assert p.ch_config("mac")["net"][0]["mac"] == "52:54:00:ab:cd:01"


@row("network.vhost_user")
def network_vhost_user(p: Plane, backend: str, support: Support) -> None:
    config = p.base()
    socket_path = str(p.files / "vhost-net.sock")
    config.network.add(id="vu0", interface_type="vhost-user",
                       options={"vhost_socket": socket_path})
    if support == NONE:
        p.refuse_create("vhost", config, backend, "config.network[0].interface_type",
                        "vhost-user")
        return
    p.create("vhost", config, backend, boot=True)
    seen = p.ch_config("vhost")
    assert (seen["net"][0]["vhost_user"], seen["net"][0]["vhost_socket"]) == (True, socket_path)
    assert seen["memory"]["shared"] is True  # the back-end maps guest memory


@row("network.hotplug")
def network_hotplug(p: Plane, backend: str, support: Support) -> None:
    p.create("nic-hotplug", with_nics(p.base(), 1), backend, boot=True)
    nic = vm_pb2.NetworkInterface(id="hot0", tap_device="tap-hot")
    attach = vm_pb2.AttachNetworkInterfaceRequest(vm_id="nic-hotplug", interface=nic)
    if support == NONE:
        p.refuse_change("nic-hotplug", lambda: p.vms.AttachNetworkInterface(attach),
                        "Network Hotplug", backend)
        detach = vm_pb2.DetachNetworkInterfaceRequest(vm_id="nic-hotplug", interface_id="eth0")
        p.refuse_change("nic-hotplug", lambda: p.vms.DetachNetworkInterface(detach),
                        "Network Hotplug", backend)
        return
    assert p.vms.AttachNetworkInterface(attach).state == vm_pb2.VM_STATE_RUNNING
    assert [n["tap"] for n in p.ch_config("nic-hotplug")["net"]] == ["tap-m0", "tap-hot"]
    assert [n.id for n in p.info("nic-hotplug").config.network] == ["eth0", "hot0"]
    p.vms.DetachNetworkInterface(vm_pb2.DetachNetworkInterfaceRequest(
        vm_id="nic-hotplug", interface_id="hot0"))
    assert [n["id"] for n in p.ch_config("nic-hotplug")["net"]] == ["eth0"]
    assert [n.id for n in p.info("nic-hotplug").config.network] == ["eth0"]


@row("network.sriov")
def network_sriov(p: Plane, backend: str, support: Support) -> None:
    config = p.base()
    function = str(p.cluster.workdir / "pci" / PCI_FUNCTION)
    config.network.add(id="vf0", interface_type="sriov", options={"vfio_path": function})
    if support == NONE:
        p.refuse_create("sriov", config, backend, "config.network[0].interface_type", "SR-IOV")
        return
    p.create("sriov", config, backend, boot=True)
    assert p.ch_config("sriov")["devices"] == [{"path": function, "id": "vf0"}]


# -- Console and debugging


@row("console.serial")
def console_serial(p: Plane, backend: str, support: Support) -> None:
    config = p.base()
    p.create("serial", config, backend, boot=True)
    text = p.vms.GetConsoleLog(vm_pb2.GetConsoleLogRequest(vm_id="serial")).text
    assert f"Command line: {config.boot.kernel_args}" in text
    assert "GUEST-READY" in text


@row("console.logging")
def console_logging(p: Plane, backend: str, support: Support) -> None:
    p.create("console-file", p.base(), backend, boot=True)
    p.vms.ShutdownVm(vm_pb2.ShutdownVmRequest(vm_id="console-file", force=True))
    p.boot("console-file")
    # One file on the host keeps the guest's output across boots.
    wait_until(lambda: p.console("console-file").count("GUEST-READY") == 2,
               what="the second boot's output in console.log")
    assert boots(p.console("console-file")) == 2


@row("debug.rich")
def debug_rich(p: Plane, backend: str, support: Support) -> None:
    p.create("debug", p.base(), backend, boot=True)
    if support == FULL:
        # Device counters reach the API: the guest read its root disk's first sectors.
        def disk_reads() -> bool:
            info = p.info("debug")
            return info.metrics.storage_stats.bytes_read >= 4096
        wait_until(disk_reads, what="vm.counters in GetVmInfo metrics")
        assert p.info("debug").backend_info["hypervisor_state"] == "Running"
        return
    # Minimal: the hypervisor's own request log and its version.
    assert support == PARTIAL
    assert "InstanceStart" in p.fc_actions("debug")
    assert p.info("debug").backend_info["firecracker_version"]


@row("debug.gdb")
def debug_gdb(p: Plane, backend: str, support: Support) -> None:
    config = p.base()
    gdb_socket = str(p.files / "gdb.sock")
    config.boot.boot_options[features.GDB_KEY] = gdb_socket
    if support == FULL:
        p.create("gdb", config, backend, boot=True)
        argv = psutil.Process(p.pid("gdb")).cmdline()
        assert argv[argv.index("--gdb") + 1] == f"path={gdb_socket}"
        return
    # Limited: only a Firecracker built with gdb support takes gdb_socket_path; a stock
    # build (as simulated here) refuses it, and the create leaves nothing behind.
    assert support == PARTIAL
    with pytest.raises(grpc.RpcError) as refused:
        p.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="gdb", config=config, backend=backend))
    assert "gdb_socket_path" in refused.value.details()
    assert backend in refused.value.details()
    assert_unknown(p, "gdb")
    wait_until(lambda: not p.vm_dir("gdb").exists(), what="the VM's directory removed")


MATRIX = [(key, backend) for key in SPEC for backend in (FC, CH)]


def test_every_feature_is_a_spec_row_with_a_check() -> None:
    assert list(SPEC) == [f.key for f in features.FEATURES]
    assert set(CHECKS) == set(SPEC)


@pytest.mark.parametrize(("key", "backend"), MATRIX, ids=[f"{k}-{b}" for k, b in MATRIX])
def test_support_matrix_row(plane: Plane, declared: dict[str, host_pb2.BackendCapabilities],
                            key: str, backend: str) -> None:
    expected = spec_support(key, backend)
    decl = features.support_of(declared[backend], key)
    assert decl.support == expected, (key, backend, decl)
    CHECKS[key](plane, backend, expected)


def unbound_loop_device() -> str | None:
    """A raw block device that holds nothing: a loop device with no backing file."""
    for device in sorted(Path("/dev").glob("loop[0-9]*")):
        sysfs = Path("/sys/block") / device.name
        if device.is_block_device() and sysfs.is_dir() and not (sysfs / "loop").exists() \
                and os.access(device, os.R_OK):
            return str(device)
    return None


@pytest.mark.parametrize("backend", [FC, CH])
def test_raw_block_device_is_a_disk(plane: Plane, backend: str) -> None:
    """The "Raw" half of the Block Devices row: a host block device as a (read-only) disk."""
    device = unbound_loop_device()
    if device is None:
        pytest.skip("needs a readable loop block device with no backing file (/dev/loopN) "
                    "to stand for a raw disk")
    config = plane.base()
    config.storage.add(id="raw", path=device, read_only=True)
    plane.create("raw", config, backend, boot=True)
    if backend == FC:
        assert plane.fc_body("raw", "/drives/raw")["path_on_host"] == device
    else:
        assert {d["id"]: d["path"] for d in plane.ch_config("raw")["disks"]}["raw"] == device


# ---- declarations and placement ------------------------------------------------------------


def test_capabilities_are_what_the_agents_declared(matrix_cluster: Cluster) -> None:
    own = {b: runtime_class(b)(binary="", simulated=False, settings=RuntimeSettings())
           .capabilities() for b in (FC, CH)}
    reply = matrix_cluster.hosts.GetBackendCapabilities(host_pb2.GetBackendCapabilitiesRequest())
    assert list(reply.backends) == [own[FC], own[CH]]
    only = matrix_cluster.hosts.GetBackendCapabilities(
        host_pb2.GetBackendCapabilitiesRequest(backend=CH))
    assert list(only.backends) == [own[CH]]
    host = matrix_cluster.hosts.GetHost(host_pb2.GetHostRequest(host_id=HOST)).host
    assert {b.name: b.capabilities for b in host.backends} == own


def needs_nothing(config: vm_pb2.VmConfig) -> None:
    pass


def needs_cpu_hotplug(config: vm_pb2.VmConfig) -> None:
    config.cpu.max_vcpu_count = 4


def needs_many_vcpus(config: vm_pb2.VmConfig) -> None:
    config.cpu.vcpu_count = 33


def needs_hugepages(config: vm_pb2.VmConfig) -> None:
    config.memory.backing[features.HUGEPAGES_KEY] = "2M"


def needs_numa(config: vm_pb2.VmConfig) -> None:
    config.cpu.vcpu_count = 2
    config.memory.backing[features.NUMA_KEY] = "2"


PLACEMENTS = [
    ("plain config", needs_nothing, FC),  # the default preference, for contrast
    ("max_vcpu_count above vcpu_count", needs_cpu_hotplug, CH),
    ("33 vCPUs", needs_many_vcpus, CH),
    ("hugepages", needs_hugepages, CH),
    ("NUMA", needs_numa, CH),
]


@pytest.mark.parametrize(("name", "change", "backend"), PLACEMENTS,
                         ids=[p[0] for p in PLACEMENTS])
def test_unnamed_backend_is_one_that_honours_the_config(
        plane: Plane, name: str, change: Callable[[vm_pb2.VmConfig], None],
        backend: str) -> None:
    config = plane.base()
    change(config)
    created = plane.create("placed", config)
    assert created.placement.backend == backend
    assert not created.warnings


def test_naming_firecracker_for_max_vcpu_count_gives_the_ignored_warning(plane: Plane) -> None:
    config = plane.base()
    needs_cpu_hotplug(config)
    created = plane.create("named", config, backend=FC)
    assert created.placement.backend == FC
    assert created.warnings == [
        "config.cpu.max_vcpu_count is ignored by firecracker: ignored - no hotplug support"]
