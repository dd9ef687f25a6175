"""The Cloud Hypervisor runtime against real processes: the project's API simulator
always, and the real cloud-hypervisor binary where this machine has one.

Every lifecycle test runs once per backend with the same runtime code; only the
guest differs (the real binary boots the project's Linux guest, which powers off
on the ACPI power button).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent import process
from agent.config import binary_from_environment
from agent.hypervisors.cloud_hypervisor_api import (
    CloudHypervisorApi,
    CloudHypervisorApiError,
    VmInfo,
)
from agent.hypervisors.errors import HypervisorApiError
from agent.runtimes.base import RuntimeFailure, RuntimeSettings
from agent.runtimes.cloud_hypervisor import CloudHypervisorRuntime
from agent.runtimes.cloud_hypervisor_capabilities import (
    cloud_hypervisor_capabilities,
    help_text,
    simulator_path,
)
from agent.runtimes.cloud_hypervisor_config import (
    MAX_REQUEST_BYTES,
    request_bytes,
    running_config,
    translate_config,
)
from agent.runtimes.readiness import READY_MARKER_OPTION
from agent.vm_dir import StateDir, VmDir
from vmm import features
from vmm.agent.v1 import agent_pb2
from vmm.v1 import host_pb2, vm_pb2

MIB = 1 << 20
GIB = 1 << 30
# Seconds a guest that ignores the power button gets before it is stopped.
SHORT_SHUTDOWN = 0.3
# Generous bound for things that normally take milliseconds; never asserted on.
PATIENCE = 10.0
NO_BINARY = ("no real cloud-hypervisor binary: set VMM_AGENT_CLOUD_HYPERVISOR_BINARY or "
             "put cloud-hypervisor on PATH")


@dataclass(frozen=True)
class Backend:
    runtime: CloudHypervisorRuntime
    kernel: Path
    initramfs: Path | None
    cmdline: str
    # The console line that tells the guest is up (once per boot).
    ready_marker: str
    # The console line the guest prints when it powers off.
    poweroff_marker: str


def _settings(**overrides: Any) -> RuntimeSettings:
    return RuntimeSettings(**{"default_shutdown_timeout": SHORT_SHUTDOWN, **overrides})


def _real_backend(tmp_path_factory: pytest.TempPathFactory) -> Backend:
    binary = binary_from_environment("cloud-hypervisor") or shutil.which("cloud-hypervisor")
    if not binary:
        pytest.skip(NO_BINARY)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("cloud-hypervisor needs read/write access to /dev/kvm, which this "
                    "machine lacks")
    from tools.guests.images import GuestBuildError, linux_guest

    try:
        guest = linux_guest(tmp_path_factory.mktemp("guests"))
    except GuestBuildError as e:
        pytest.skip(f"cannot build the Linux guest for cloud-hypervisor: {e}")
    runtime = CloudHypervisorRuntime.detect(_settings(binary=binary))
    assert runtime is not None and not runtime.simulated
    return Backend(runtime, guest.vmlinux, guest.initramfs, guest.cmdline, guest.marker,
                   guest.poweroff_marker)


@pytest.fixture(params=["simulator", "real"])
def backend(request: pytest.FixtureRequest, tmp_path: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Backend:
    if request.param == "real":
        return _real_backend(tmp_path_factory)
    if simulator_path() is None:
        pytest.skip("the cloud-hypervisor-sim console script is not installed (pip install -e .)")
    runtime = CloudHypervisorRuntime.detect(_settings(force_simulator=True))
    assert runtime is not None and runtime.simulated
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF stand-in kernel for the simulator\n")
    return Backend(runtime, kernel, None, "console=ttyS0", "GUEST-READY", "reboot: Power down")


@pytest.fixture
def state_dir(tmp_path: Path) -> StateDir:
    return StateDir(tmp_path / "state")


@pytest.fixture
async def vm(backend: Backend, state_dir: StateDir) -> AsyncIterator[VmDir]:
    vm_dir = state_dir.vm("vm-1")
    yield vm_dir
    await backend.runtime.destroy(vm_dir)


@pytest.fixture
def root_disk(tmp_path: Path) -> Path:
    disk = tmp_path / "root.img"
    disk.write_bytes(b"ROOT" + bytes(MIB - 4))
    return disk


def desired_vm(backend: Backend, *, vcpus: int = 1, max_vcpus: int = 0,
               memory: int = 512 * MIB, max_memory: int = 0, extra_args: str = "",
               storage: list[vm_pb2.StorageDevice] | None = None,
               network: list[vm_pb2.NetworkInterface] | None = None) -> agent_pb2.DesiredVm:
    boot = vm_pb2.BootConfig(kernel_path=str(backend.kernel),
                             kernel_args=f"{backend.cmdline} {extra_args}".strip(),
                             boot_options={READY_MARKER_OPTION: backend.ready_marker})
    if backend.initramfs is not None:
        boot.initrd_path = str(backend.initramfs)
    return agent_pb2.DesiredVm(vm_id="vm-1", config=vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=vcpus, max_vcpu_count=max_vcpus),
        memory=vm_pb2.MemoryConfig(size_bytes=memory, hotplug_enabled=max_memory > memory,
                                   max_size_bytes=max_memory),
        boot=boot, storage=storage or [], network=network or []))


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + PATIENCE
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"still waiting for {what}")
        await asyncio.sleep(0.02)


def console(vm: VmDir) -> str:
    return vm.console_log.read_text(errors="replace") if vm.console_log.exists() else ""


def recorded_pid(vm: VmDir) -> int:
    pid = vm.load_runtime()["pid"]
    assert isinstance(pid, int)
    return pid


async def vmm_view(vm: VmDir) -> VmInfo:
    async with CloudHypervisorApi(vm.api_socket) as api:
        return await api.vm_info()


async def state_of(backend: Backend, vm: VmDir) -> int:
    return (await backend.runtime.observe(vm)).state


def hotplug(**change: Any) -> agent_pb2.HotplugRequest:
    return agent_pb2.HotplugRequest(vm_id="vm-1", **change)


# ---- lifecycle, once per backend -------------------------------------------------------


async def test_create_sends_the_whole_config_without_booting(
        backend: Backend, vm: VmDir, root_disk: Path) -> None:
    desired = desired_vm(
        backend, vcpus=2, max_vcpus=4, memory=512 * MIB, max_memory=GIB,
        storage=[vm_pb2.StorageDevice(id="root", path=str(root_disk), read_only=True,
                                      options={"rate_limit_ops": "500"})],
        network=[vm_pb2.NetworkInterface(id="eth0", tap_device="vmmtap0",
                                         mac_address="52:54:00:ab:cd:ef")])
    await backend.runtime.create(vm, desired)

    seen = await backend.runtime.observe(vm)
    assert (seen.alive, seen.state, seen.pid) == (True, vm_pb2.VM_STATE_CREATED, recorded_pid(vm))
    assert seen.backend_info["simulated"] == str(backend.runtime.simulated).lower()
    config = (await vmm_view(vm)).config
    assert config["cpus"]["boot_vcpus"] == 2 and config["cpus"]["max_vcpus"] == 4
    assert config["memory"]["size"] == 512 * MIB
    assert config["memory"]["hotplug_size"] == GIB - 512 * MIB
    assert config["payload"]["kernel"] == str(backend.kernel)
    assert config["payload"]["cmdline"] == desired.config.boot.kernel_args
    [disk] = config["disks"]
    assert (disk["id"], disk["path"], disk["readonly"]) == ("root", str(root_disk), True)
    assert disk["rate_limiter_config"]["ops"] == {"size": 500, "refill_time": 1000}
    [nic] = config["net"]
    assert (nic["id"], nic["tap"], nic["mac"]) == ("eth0", "vmmtap0", "52:54:00:ab:cd:ef")
    assert config["serial"]["mode"] == "Tty" and config["console"]["mode"] == "Off"
    assert config["rng"]["src"] == "/dev/urandom"


async def test_boot_waits_for_the_guest(backend: Backend, vm: VmDir) -> None:
    desired = desired_vm(backend)
    await backend.runtime.create(vm, desired)
    await backend.runtime.boot(vm, desired)

    assert await state_of(backend, vm) == vm_pb2.VM_STATE_RUNNING
    assert backend.ready_marker in console(vm)
    # Booting a running VM again changes nothing.
    pid = recorded_pid(vm)
    await backend.runtime.boot(vm, desired)
    assert recorded_pid(vm) == pid
    assert console(vm).count(backend.ready_marker) == 1


async def test_boot_without_create_starts_a_vmm(backend: Backend, vm: VmDir) -> None:
    await backend.runtime.boot(vm, desired_vm(backend))
    assert await state_of(backend, vm) == vm_pb2.VM_STATE_RUNNING


async def test_pause_and_resume(backend: Backend, vm: VmDir) -> None:
    await backend.runtime.boot(vm, desired_vm(backend))
    await backend.runtime.pause(vm)
    assert await state_of(backend, vm) == vm_pb2.VM_STATE_PAUSED
    await backend.runtime.pause(vm)  # already paused: nothing to do
    await backend.runtime.resume(vm)
    assert await state_of(backend, vm) == vm_pb2.VM_STATE_RUNNING
    await backend.runtime.resume(vm)


async def test_graceful_shutdown_within_the_timeout(backend: Backend, vm: VmDir) -> None:
    await backend.runtime.boot(vm, desired_vm(backend))
    await backend.runtime.shutdown(vm, force=False, timeout=PATIENCE)

    assert await state_of(backend, vm) == vm_pb2.VM_STATE_SHUTDOWN
    # The guest powered itself off; the VMM stays for the next boot.
    assert backend.poweroff_marker in console(vm)
    assert (await backend.runtime.observe(vm)).alive


async def test_shutdown_stops_a_guest_that_ignores_the_power_button(
        backend: Backend, vm: VmDir) -> None:
    # Without ACPI the guest cannot see the power button.
    await backend.runtime.boot(vm, desired_vm(backend, extra_args="acpi=off"))
    await backend.runtime.shutdown(vm, force=False, timeout=SHORT_SHUTDOWN)

    assert await state_of(backend, vm) == vm_pb2.VM_STATE_SHUTDOWN
    assert backend.poweroff_marker not in console(vm)


async def test_forced_shutdown_skips_the_power_button(backend: Backend, vm: VmDir) -> None:
    await backend.runtime.boot(vm, desired_vm(backend))
    await backend.runtime.shutdown(vm, force=True, timeout=PATIENCE)
    assert await state_of(backend, vm) == vm_pb2.VM_STATE_SHUTDOWN
    assert backend.poweroff_marker not in console(vm)


async def test_shutdown_of_a_paused_vm(backend: Backend, vm: VmDir) -> None:
    await backend.runtime.boot(vm, desired_vm(backend))
    await backend.runtime.pause(vm)
    await backend.runtime.shutdown(vm, force=False, timeout=PATIENCE)
    assert await state_of(backend, vm) == vm_pb2.VM_STATE_SHUTDOWN


async def test_boot_after_shutdown_reuses_the_vmm(backend: Backend, vm: VmDir) -> None:
    desired = desired_vm(backend)
    await backend.runtime.boot(vm, desired)
    pid = recorded_pid(vm)
    await backend.runtime.shutdown(vm, force=True, timeout=0)
    await backend.runtime.boot(vm, desired)

    assert await state_of(backend, vm) == vm_pb2.VM_STATE_RUNNING
    assert recorded_pid(vm) == pid
    assert console(vm).count(backend.ready_marker) == 2


async def test_reboot_boots_the_guest_again(backend: Backend, vm: VmDir) -> None:
    desired = desired_vm(backend)
    await backend.runtime.boot(vm, desired)
    await backend.runtime.reboot(vm, desired, force=False)

    assert await state_of(backend, vm) == vm_pb2.VM_STATE_RUNNING
    # The console keeps both boots.
    assert console(vm).count(backend.ready_marker) == 2


async def test_reboot_of_a_stopped_vm_boots_it(backend: Backend, vm: VmDir) -> None:
    desired = desired_vm(backend)
    await backend.runtime.create(vm, desired)
    await backend.runtime.reboot(vm, desired, force=True)
    assert await state_of(backend, vm) == vm_pb2.VM_STATE_RUNNING


async def test_a_failed_boot_succeeds_on_retry_once_its_cause_is_gone(
        backend: Backend, vm: VmDir, tmp_path: Path) -> None:
    # Cloud Hypervisor keeps a VM whose boot failed after it was built ("Created") and
    # refuses every later vm.boot with "VM is already created" unless it is dropped.
    kernel = tmp_path / "kernel-installed-later"
    desired = desired_vm(backend)
    desired.config.boot.kernel_path = str(kernel)
    await backend.runtime.create(vm, desired)
    with pytest.raises(CloudHypervisorApiError) as failed:
        await backend.runtime.boot(vm, desired)
    assert "Cannot open kernel file" in failed.value.chain
    assert await state_of(backend, vm) == vm_pb2.VM_STATE_CREATED
    kernel.write_bytes(backend.kernel.read_bytes())
    await backend.runtime.boot(vm, desired)
    assert await state_of(backend, vm) == vm_pb2.VM_STATE_RUNNING


def _hold_write_lock(path: Path) -> int:
    """An OFD write lock on path, as another VMM booted on that image holds it."""
    import fcntl
    import struct

    fd = os.open(path, os.O_RDWR)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
    return fd


async def test_shutdown_drops_a_vm_whose_boot_failed(backend: Backend, vm: VmDir,
                                                    root_disk: Path) -> None:
    desired = desired_vm(backend, storage=[vm_pb2.StorageDevice(path=str(root_disk))])
    holder = _hold_write_lock(root_disk)
    try:
        with pytest.raises(CloudHypervisorApiError) as failed:
            await backend.runtime.boot(vm, desired)
        assert "Error locking disk images: Another instance likely holds a lock" in (
            failed.value.chain)
        await backend.runtime.shutdown(vm, force=True, timeout=0)
        assert not (await vmm_view(vm)).built
    finally:
        os.close(holder)
    await backend.runtime.boot(vm, desired)
    assert await state_of(backend, vm) == vm_pb2.VM_STATE_RUNNING


def qcow2_image(path: Path, size: int) -> Path:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        pytest.skip("needs qemu-img (Debian package qemu-utils) to make a qcow2 image")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    return path


async def test_disk_images_of_any_type_boot_and_attach(backend: Backend, vm: VmDir,
                                                       tmp_path: Path) -> None:
    root = qcow2_image(tmp_path / "root.qcow2", MIB)
    await backend.runtime.boot(vm, desired_vm(backend, storage=[
        vm_pb2.StorageDevice(path=str(root), is_root_device=True)]))
    extra = qcow2_image(tmp_path / "extra.qcow2", MIB)
    config = await backend.runtime.hotplug(
        vm, hotplug(attach_disk=vm_pb2.StorageDevice(path=str(extra))))
    assert [d.path for d in config.storage] == [str(root), str(extra)]
    assert [d["image_type"] for d in (await vmm_view(vm)).devices("disks")] == ["Qcow2"] * 2


async def test_destroy_leaves_no_process_and_no_socket(backend: Backend, vm: VmDir) -> None:
    await backend.runtime.boot(vm, desired_vm(backend))
    ref = backend.runtime.load_process(vm)
    assert ref is not None

    await backend.runtime.destroy(vm)

    assert not process.is_alive(ref)
    assert not vm.api_socket.exists()
    assert not vm.runtime_file.exists()
    seen = await backend.runtime.observe(vm)
    assert not seen.alive


async def test_observe_reports_a_killed_vmm(backend: Backend, vm: VmDir) -> None:
    await backend.runtime.boot(vm, desired_vm(backend))
    pid = recorded_pid(vm)
    os.kill(pid, signal.SIGKILL)

    async def seen_killed() -> bool:
        # The agent learns the exit status a moment after the process is gone.
        seen = await backend.runtime.observe(vm)
        return not seen.alive and "SIGKILL" in seen.detail

    await eventually(seen_killed, "the killed VMM to be seen as killed")
    seen = await backend.runtime.observe(vm)
    assert (seen.alive, seen.pid, seen.state) == (False, pid, vm_pb2.VM_STATE_UNSPECIFIED)


async def test_a_fresh_runtime_adopts_a_running_vm(backend: Backend, vm: VmDir) -> None:
    await backend.runtime.boot(vm, desired_vm(backend))
    pid = recorded_pid(vm)

    adopter = CloudHypervisorRuntime(backend.runtime.binary, backend.runtime.simulated,
                                     backend.runtime.settings)
    seen = await adopter.observe(vm)
    assert (seen.alive, seen.state, seen.pid) == (True, vm_pb2.VM_STATE_RUNNING, pid)
    await adopter.pause(vm)
    assert await state_of(backend, vm) == vm_pb2.VM_STATE_PAUSED
    await adopter.shutdown(vm, force=True, timeout=0)
    assert (await adopter.observe(vm)).state == vm_pb2.VM_STATE_SHUTDOWN
    await adopter.destroy(vm)
    assert not vm.api_socket.exists()


async def test_hypervisor_errors_carry_cloud_hypervisors_chain(
        backend: Backend, vm: VmDir, tmp_path: Path) -> None:
    desired = desired_vm(backend)
    desired.config.boot.kernel_path = str(tmp_path / "no-such-kernel")
    # Cloud Hypervisor opens the kernel at vm.boot, so create succeeds.
    await backend.runtime.create(vm, desired)
    with pytest.raises(HypervisorApiError) as refused:
        await backend.runtime.boot(vm, desired)
    assert isinstance(refused.value, CloudHypervisorApiError)
    assert refused.value.chain[:3] == ["Error from API", "The VM could not boot",
                                       "Cannot open kernel file"]
    assert "Error from API: The VM could not boot: Cannot open kernel file" in str(refused.value)
    assert await state_of(backend, vm) == vm_pb2.VM_STATE_CREATED


async def test_an_untranslatable_config_is_refused_before_any_process_starts(
        backend: Backend, vm: VmDir) -> None:
    desired = desired_vm(backend, vcpus=4, max_vcpus=2)
    with pytest.raises(RuntimeFailure) as refused:
        await backend.runtime.create(vm, desired)
    assert refused.value.code == "INVALID_ARGUMENT"
    assert "config.cpu.max_vcpu_count" in refused.value.message
    assert not vm.runtime_file.exists()


async def test_metrics_of_a_running_vm(backend: Backend, vm: VmDir, root_disk: Path) -> None:
    desired = desired_vm(backend, storage=[vm_pb2.StorageDevice(path=str(root_disk))],
                         network=[vm_pb2.NetworkInterface(tap_device="vmmtap1")])
    await backend.runtime.boot(vm, desired)

    async def disk_read() -> bool:
        return (await backend.runtime.metrics(vm)).storage_stats.bytes_read > 0

    await eventually(disk_read, "the guest to read its disk")
    metrics = await backend.runtime.metrics(vm)
    assert metrics.memory_usage_bytes > 0
    assert metrics.storage_stats.read_operations > 0
    assert metrics.cpu_usage_percent >= 0
    assert metrics.HasField("network_stats")


async def test_metrics_of_a_vm_that_has_not_booted(backend: Backend, vm: VmDir) -> None:
    await backend.runtime.create(vm, desired_vm(backend))
    metrics = await backend.runtime.metrics(vm)
    assert metrics.memory_usage_bytes > 0
    assert metrics.storage_stats.bytes_read == 0 and metrics.uptime_seconds == 0


# ---- hotplug ---------------------------------------------------------------------------


async def test_resize_vcpus_up_to_max_vcpu_count(backend: Backend, vm: VmDir) -> None:
    await backend.runtime.boot(vm, desired_vm(backend, vcpus=8, max_vcpus=16))

    config = await backend.runtime.hotplug(
        vm, hotplug(resize=vm_pb2.ResizeVmRequest(vm_id="vm-1", vcpu_count=16)))
    assert config.cpu.vcpu_count == 16
    assert (await vmm_view(vm)).config["cpus"]["boot_vcpus"] == 16

    with pytest.raises(RuntimeFailure) as refused:
        await backend.runtime.hotplug(
            vm, hotplug(resize=vm_pb2.ResizeVmRequest(vm_id="vm-1", vcpu_count=17)))
    assert refused.value.code == "INVALID_ARGUMENT"
    assert "max_vcpu_count" in refused.value.message
    assert (await vmm_view(vm)).config["cpus"]["boot_vcpus"] == 16


async def test_resize_memory_up_to_max_size(backend: Backend, vm: VmDir) -> None:
    await backend.runtime.boot(vm, desired_vm(backend, memory=512 * MIB, max_memory=GIB))

    config = await backend.runtime.hotplug(
        vm, hotplug(resize=vm_pb2.ResizeVmRequest(vm_id="vm-1", memory_size_bytes=768 * MIB)))
    assert config.memory.size_bytes == 768 * MIB
    assert (await vmm_view(vm)).memory_actual_size == 768 * MIB

    for size, words in ((2 * GIB, "max_size_bytes"), (512 * MIB, "only grow")):
        with pytest.raises(RuntimeFailure) as refused:
            await backend.runtime.hotplug(
                vm, hotplug(resize=vm_pb2.ResizeVmRequest(vm_id="vm-1", memory_size_bytes=size)))
        assert words in refused.value.message


async def test_resize_memory_without_hotplug_is_refused(backend: Backend, vm: VmDir) -> None:
    await backend.runtime.boot(vm, desired_vm(backend))
    with pytest.raises(RuntimeFailure) as refused:
        await backend.runtime.hotplug(
            vm, hotplug(resize=vm_pb2.ResizeVmRequest(vm_id="vm-1", memory_size_bytes=GIB)))
    assert "hotplug_enabled" in refused.value.message


async def test_attach_and_detach_a_disk_and_a_nic(backend: Backend, vm: VmDir, root_disk: Path,
                                                  tmp_path: Path) -> None:
    data = tmp_path / "data.img"
    data.write_bytes(bytes(MIB))
    await backend.runtime.boot(vm, desired_vm(
        backend, storage=[vm_pb2.StorageDevice(path=str(root_disk), is_root_device=True)]))

    config = await backend.runtime.hotplug(
        vm, hotplug(attach_disk=vm_pb2.StorageDevice(path=str(data), read_only=True)))
    [root, added] = config.storage
    assert root.is_root_device and root.id
    assert (added.path, added.read_only) == (str(data), True)
    assert added.id in {d["id"] for d in (await vmm_view(vm)).devices("disks")}

    config = await backend.runtime.hotplug(
        vm, hotplug(attach_nic=vm_pb2.NetworkInterface(id="extra", tap_device="vmmtap2")))
    assert [n.id for n in config.network] == ["extra"]
    assert [n["tap"] for n in (await vmm_view(vm)).devices("net")] == ["vmmtap2"]

    config = await backend.runtime.hotplug(vm, hotplug(detach_disk=added.id))
    assert [d.id for d in config.storage] == [root.id]
    config = await backend.runtime.hotplug(vm, hotplug(detach_nic="extra"))
    assert list(config.network) == []
    assert (await vmm_view(vm)).devices("net") == []

    with pytest.raises(RuntimeFailure) as refused:
        await backend.runtime.hotplug(vm, hotplug(detach_disk="nope"))
    assert refused.value.code == "NOT_FOUND"
    # A NIC's id is not a disk's.
    with pytest.raises(RuntimeFailure):
        await backend.runtime.hotplug(vm, hotplug(detach_nic=root.id))


async def test_hotplug_needs_a_running_vmm(backend: Backend, vm: VmDir, root_disk: Path) -> None:
    with pytest.raises(RuntimeFailure) as refused:
        await backend.runtime.hotplug(
            vm, hotplug(attach_disk=vm_pb2.StorageDevice(path=str(root_disk))))
    assert refused.value.code == "FAILED_PRECONDITION"


# ---- the API client's view of Cloud Hypervisor's answers ---------------------------------


async def test_api_errors_keep_the_status_and_chain(backend: Backend, vm: VmDir) -> None:
    await backend.runtime.create(vm, desired_vm(backend))
    async with CloudHypervisorApi(vm.api_socket) as api:
        await api.delete_vm()
        with pytest.raises(CloudHypervisorApiError) as missing:
            await api.vm_info()
        assert missing.value.vm_not_created
        assert missing.value.chain == ["Error from API", "The VM info is not available",
                                       "VM is not created"]
        with pytest.raises(CloudHypervisorApiError) as not_running:
            await api.pause_vm()
        assert (not_running.value.status, not_running.value.code) == (500, "FAILED_PRECONDITION")
        ping = await api.ping()
        assert ping.pid == recorded_pid(vm)


# ---- declarations and translation (no process) -------------------------------------------


def test_capabilities_declare_the_whole_matrix() -> None:
    caps = cloud_hypervisor_capabilities()
    names = [f.name for f in caps.features]
    assert sorted(names) == sorted(f.key for f in features.FEATURES)
    assert len(names) == len(set(names))
    assert all(f.support == host_pb2.SUPPORT_FULL for f in caps.features)
    assert caps.backend == features.CLOUD_HYPERVISOR
    limits = caps.limits
    assert (limits.min_vcpus, limits.max_vcpus) == (1, 448)
    assert limits.min_memory_bytes == 512 * MIB
    assert (limits.max_memory_bytes, limits.max_disks, limits.max_nics) == (0, 0, 0)


def test_translation_of_cpu_and_memory_features() -> None:
    config = vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=4, max_vcpu_count=8,
                             topology=vm_pb2.CpuTopology(sockets=2, threads_per_core=2),
                             features={"affinity": "0-1,3"}),
        memory=vm_pb2.MemoryConfig(size_bytes=2 * GIB,
                                   backing={"hugepages": "2M", "shared": "true"}),
        boot=vm_pb2.BootConfig(kernel_path="/k", initrd_path="/i", kernel_args="quiet"))
    translated, violations = translate_config(config)
    assert violations == []
    assert translated["cpus"]["topology"] == {"threads_per_core": 2, "cores_per_die": 2,
                                              "dies_per_package": 1, "packages": 2}
    affinity = translated["cpus"]["affinity"]
    assert [a["vcpu"] for a in affinity] == list(range(8))
    assert affinity[0]["host_cpus"] == [0, 1, 3]
    memory = translated["memory"]
    assert (memory["hugepages"], memory["hugepage_size"], memory["shared"]) == (True, 2 * MIB,
                                                                                True)
    assert "hotplug_size" not in memory
    assert translated["payload"] == {"kernel": "/k", "initramfs": "/i", "cmdline": "quiet"}


def test_translation_of_numa_nodes() -> None:
    config = vm_pb2.VmConfig(cpu=vm_pb2.CpuConfig(vcpu_count=4),
                             memory=vm_pb2.MemoryConfig(size_bytes=GIB,
                                                        backing={"numa_nodes": "2"}),
                             boot=vm_pb2.BootConfig(kernel_path="/k"))
    translated, violations = translate_config(config)
    assert violations == []
    assert translated["memory"]["size"] == 0
    assert [(z["id"], z["size"]) for z in translated["memory"]["zones"]] == [
        ("mem0", GIB // 2), ("mem1", GIB // 2)]
    assert translated["numa"] == [
        {"guest_numa_id": 0, "cpus": [0, 1], "memory_zones": ["mem0"]},
        {"guest_numa_id": 1, "cpus": [2, 3], "memory_zones": ["mem1"]}]


def test_translation_of_devices() -> None:
    config = vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=2), memory=vm_pb2.MemoryConfig(size_bytes=GIB),
        boot=vm_pb2.BootConfig(kernel_path="/k"),
        storage=[vm_pb2.StorageDevice(path="/d.qcow2", options={
            "image_type": "qcow2", "io_engine": "sync", "direct": "true", "num_queues": "2",
            "rate_limit_bandwidth": "1048576"})],
        network=[
            vm_pb2.NetworkInterface(id="fast", interface_type="vhost-user",
                                    options={"vhost_socket": "/run/dpdk.sock"}),
            vm_pb2.NetworkInterface(id="vf", interface_type="sriov",
                                    options={"vfio_path": "/sys/bus/pci/devices/0000:3b:02.1"}),
            vm_pb2.NetworkInterface(tap_device="tap9", options={"mtu": "9000"}),
        ])
    translated, violations = translate_config(config)
    assert violations == []
    [disk] = translated["disks"]
    assert disk["image_type"] == "Qcow2" and disk["direct"] is True
    # A disk that names no type gets none: Cloud Hypervisor detects it from the image.
    config.storage[0].options.pop("image_type")
    assert "image_type" not in translate_config(config)[0]["disks"][0]
    assert disk["disable_io_uring"] is True and disk["disable_aio"] is True
    assert disk["num_queues"] == 2
    assert disk["rate_limiter_config"] == {"bandwidth": {"size": 1048576, "refill_time": 1000}}
    vhost, tap = translated["net"]
    assert (vhost["vhost_user"], vhost["vhost_socket"], vhost["vhost_mode"]) == (
        True, "/run/dpdk.sock", "Client")
    assert "tap" not in vhost
    assert (tap["tap"], tap["mtu"]) == ("tap9", 9000)
    assert translated["devices"] == [{"path": "/sys/bus/pci/devices/0000:3b:02.1", "id": "vf"}]
    # vhost-user back-ends need the guest's memory shared.
    assert translated["memory"]["shared"] is True


def test_preflight_names_what_cloud_hypervisor_cannot_do(tmp_path: Path) -> None:
    runtime = CloudHypervisorRuntime("cloud-hypervisor", False, RuntimeSettings())
    config = vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=4, max_vcpu_count=2,
                             features={"affinity": "three"}),
        memory=vm_pb2.MemoryConfig(size_bytes=GIB, backing={"hugepages": "4K"}),
        boot=vm_pb2.BootConfig(kernel_path=str(tmp_path / "absent")),
        storage=[vm_pb2.StorageDevice(id="x", path=str(tmp_path / "absent.img"),
                                      options={"io_engine": "spdk"})],
        network=[vm_pb2.NetworkInterface(id="x", interface_type="vhost-user")])
    fields = {v.field for v in runtime.preflight("vm-1", config)}
    # The absent files are the agent's host path policy's to refuse (test_host_paths.py).
    assert fields == {
        "config.cpu.max_vcpu_count", "config.cpu.features[affinity]",
        "config.memory.backing[hugepages]", "config.storage[0].options[io_engine]",
        "config.network[0].options[vhost_socket]", "config.network[0].id",
    }


def test_running_config_takes_the_vmms_devices_and_keeps_ours() -> None:
    recorded = vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=2, max_vcpu_count=4),
        memory=vm_pb2.MemoryConfig(size_bytes=GIB),
        storage=[vm_pb2.StorageDevice(path="/root.img", is_root_device=True,
                                      options={"direct": "true"})],
        network=[vm_pb2.NetworkInterface(id="eth0", tap_device="tap0"),
                 vm_pb2.NetworkInterface(interface_type="sriov",
                                         options={"vfio_path": "/sys/bus/pci/devices/x"})])
    info = VmInfo(state="Running", memory_actual_size=GIB, device_tree={}, config={
        "cpus": {"boot_vcpus": 3, "max_vcpus": 4},
        "memory": {"size": 2 * GIB},
        "disks": [{"id": "_disk0", "path": "/root.img", "readonly": False},
                  {"id": "_disk2", "path": "/hot.img", "readonly": True}],
        "net": [{"id": "eth0", "tap": "tap0", "mac": "52:54:00:00:00:01"}],
        "devices": [{"id": "_device3", "path": "/sys/bus/pci/devices/x"}],
    })
    config = running_config(recorded, info)
    assert (config.cpu.vcpu_count, config.cpu.max_vcpu_count) == (3, 4)
    assert config.memory.size_bytes == 2 * GIB
    root, hot = config.storage
    assert (root.id, root.is_root_device, dict(root.options)) == ("_disk0", True,
                                                                  {"direct": "true"})
    assert (hot.id, hot.path, hot.read_only) == ("_disk2", "/hot.img", True)
    eth0, vf = config.network
    assert eth0.id == "eth0"
    assert (vf.id, vf.interface_type) == ("_device3", "sriov")


def test_detect() -> None:
    simulated = CloudHypervisorRuntime.detect(RuntimeSettings(force_simulator=True))
    if simulated is None:
        pytest.skip("the cloud-hypervisor-sim console script is not installed")
    assert simulated.simulated and simulated.name == "cloud-hypervisor"
    assert simulated.version() == "v53.0"
    configured = CloudHypervisorRuntime.detect(RuntimeSettings(binary=simulated.binary))
    assert configured is not None and not configured.simulated
    assert configured.binary == simulated.binary
    # A configured binary that is missing is no runtime at all, not the simulator.
    assert CloudHypervisorRuntime.detect(
        RuntimeSettings(binary="/nonexistent/cloud-hypervisor")) is None
    backend = simulated.describe()
    assert backend.simulated and backend.capabilities.backend == "cloud-hypervisor"


def test_what_cloud_hypervisor_refuses_at_boot_is_refused_at_create() -> None:
    config = vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=2), memory=vm_pb2.MemoryConfig(size_bytes=GIB),
        boot=vm_pb2.BootConfig(kernel_path="/k"),
        storage=[
            vm_pb2.StorageDevice(path="/a.img", options={"queue_size": "2",
                                                          "serial": "s" * 21}),
            vm_pb2.StorageDevice(interface_type="vhost-user", options={
                "vhost_socket": "/run/blk.sock", "rate_limit_ops": "100"}),
            vm_pb2.StorageDevice(path="/b.img", options={"rate_limit_burst": "5",
                                                          "num_queues": "3"}),
        ],
        network=[
            vm_pb2.NetworkInterface(tap_device="t0", options={"num_queues": "1", "mtu": "1279"}),
            vm_pb2.NetworkInterface(tap_device="t1", options={"num_queues": "6"}),
            vm_pb2.NetworkInterface(tap_device="t2", options={"num_queues": "4", "mtu": "1280",
                                                              "queue_size": "256"}),
        ])
    fields = {v.field for v in translate_config(config)[1]}
    assert fields == {
        "config.storage[0].options[queue_size]", "config.storage[0].options[serial]",
        "config.storage[1].options[rate_limit_ops]",
        "config.storage[2].options[rate_limit_burst]", "config.storage[2].options[num_queues]",
        "config.network[0].options[num_queues]", "config.network[0].options[mtu]",
        "config.network[1].options[num_queues]",
    }


def test_vm_create_never_exceeds_the_api_request_limit() -> None:
    def pinned(vcpus: int, host_cpus: str) -> vm_pb2.VmConfig:
        return vm_pb2.VmConfig(
            cpu=vm_pb2.CpuConfig(vcpu_count=vcpus, features={"affinity": host_cpus}),
            memory=vm_pb2.MemoryConfig(size_bytes=GIB), boot=vm_pb2.BootConfig(kernel_path="/k"))

    # The declared maximum, pinned as the capability detail says, fits.
    fits, violations = translate_config(pinned(448, "0-31"))
    assert violations == [] and request_bytes(fits) <= MAX_REQUEST_BYTES
    [violation] = translate_config(pinned(448, "0-63"))[1]
    assert violation.field == "config.cpu.features[affinity]"
    assert "51200" in violation.description and "448 vCPUs" in violation.description


async def test_the_simulated_release_build_offers_no_gdb(
        monkeypatch: pytest.MonkeyPatch) -> None:
    simulated = CloudHypervisorRuntime.detect(RuntimeSettings(force_simulator=True))
    if simulated is None:
        pytest.skip("the cloud-hypervisor-sim console script is not installed")

    def gdb_support() -> int:
        help_text.cache_clear()
        return features.support_of(simulated.capabilities(), "debug.gdb").support

    monkeypatch.delenv("CLOUD_HYPERVISOR_SIM_GUEST_DEBUG", raising=False)
    assert gdb_support() == host_pb2.SUPPORT_NONE
    monkeypatch.setenv("CLOUD_HYPERVISOR_SIM_GUEST_DEBUG", "1")
    assert gdb_support() == host_pb2.SUPPORT_FULL
    help_text.cache_clear()


async def test_a_pending_vcpu_removal_is_explained(backend: Backend, vm: VmDir) -> None:
    # A guest without ACPI CPU hotplug never ejects removed vCPUs.
    await backend.runtime.boot(vm, desired_vm(backend, vcpus=2, max_vcpus=4,
                                              extra_args="acpi=off"))
    await backend.runtime.hotplug(vm, hotplug(resize=vm_pb2.ResizeVmRequest(vcpu_count=1)))
    with pytest.raises(RuntimeFailure) as refused:
        await backend.runtime.hotplug(vm, hotplug(resize=vm_pb2.ResizeVmRequest(vcpu_count=3)))
    assert refused.value.code == "FAILED_PRECONDITION"
    assert "vCPU removal pending" in refused.value.message


async def test_the_hypervisor_log_keeps_info_lines_and_the_previous_run(
        backend: Backend, vm: VmDir) -> None:
    await backend.runtime.create(vm, desired_vm(backend))
    argv = psutil.Process(recorded_pid(vm)).cmdline()
    assert "-v" in argv  # info: API errors are logged there
    await backend.runtime.destroy(vm)
    first_run = vm.hypervisor_log.read_text()
    await backend.runtime.create(vm, desired_vm(backend))
    assert vm.hypervisor_log.with_name(vm.hypervisor_log.name + ".1").read_text() == first_run
