"""The QEMU runtime against real qemu-system-x86_64 processes and real guests.

The tiny guest (a few instructions that print a marker) runs under KVM; the Linux
guest (Debian's cloud kernel and a busybox initramfs) runs wherever the runtime's
"auto" accelerator puts it: TCG on hosts whose KVM cannot run stock kernels.
Linux boots cost seconds, so only a few tests use it.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent import process
from agent.hypervisors.qmp import QmpClient, QmpError
from agent.process import ProcessRef
from agent.runtimes.base import RuntimeFailure, RuntimeSettings
from agent.runtimes.qemu.accel import (
    hardware_virtualization,
    is_linux_kernel,
    kvm_device_usable,
)
from agent.runtimes.qemu.runtime import QemuRuntime
from agent.vm_dir import StateDir, VmDir
from tools.guests.images import (
    LINUX_GUEST_HEARTBEAT,
    LinuxGuest,
    TinyGuest,
)
from vmm import features
from vmm.agent.v1 import agent_pb2
from vmm.v1 import vm_pb2

pytestmark = pytest.mark.qemu

MIB = 1024 * 1024


# ---- fixtures ---------------------------------------------------------------------------










@pytest.fixture
def runtime(qemu_binary: str) -> QemuRuntime:
    return QemuRuntime(qemu_binary, settings=RuntimeSettings(boot_timeout=60))


@pytest.fixture
def vm_factory() -> Iterator[Callable[[str], VmDir]]:
    """VM dirs in a state dir of this test's own: a VM's QMP socket is named by its id."""
    root = Path(tempfile.mkdtemp(prefix="qemu-rt-"))
    state = StateDir(root)
    made: list[VmDir] = []

    def make(vm_id: str) -> VmDir:
        vm = state.vm(vm_id)
        vm.create()
        made.append(vm)
        return vm

    yield make
    for vm in made:  # whatever a failed test left running
        ref = ProcessRef.from_dict(vm.load_runtime())
        if ref is not None:
            asyncio.run(process.kill(ref))
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def vm(vm_factory: Callable[[str], VmDir]) -> VmDir:
    return vm_factory("vm1")


def tiny_vm(tiny: TinyGuest, vm: VmDir, ready: bool = True, **boot_options: str
            ) -> agent_pb2.DesiredVm:
    options = {"ready_marker": tiny.marker} if ready else {}
    options.update(boot_options)
    return agent_pb2.DesiredVm(vm_id=vm.vm_id, config=vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=1),
        memory=vm_pb2.MemoryConfig(size_bytes=32 * MIB),
        boot=vm_pb2.BootConfig(kernel_path=str(tiny.pvh32), boot_options=options)))


def linux_vm(linux: LinuxGuest, vm: VmDir, **boot_options: str) -> agent_pb2.DesiredVm:
    return agent_pb2.DesiredVm(vm_id=vm.vm_id, config=vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=1),
        memory=vm_pb2.MemoryConfig(size_bytes=256 * MIB),
        boot=vm_pb2.BootConfig(kernel_path=str(linux.bzimage), initrd_path=str(linux.initramfs),
                               kernel_args=linux.cmdline,
                               boot_options={"ready_marker": linux.marker, **boot_options})))


def console(vm: VmDir) -> str:
    return vm.console_log.read_text(errors="replace")


def heartbeats(vm: VmDir) -> list[str]:
    return [line for line in console(vm).splitlines() if line.startswith(LINUX_GUEST_HEARTBEAT)]


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def pid_of(vm: VmDir) -> int:
    ref = ProcessRef.from_dict(vm.load_runtime())
    assert ref is not None
    return ref.pid


# ---- declarations -----------------------------------------------------------------------


def test_capabilities_declare_every_feature_once(runtime: QemuRuntime) -> None:
    caps = runtime.capabilities()
    assert caps.backend == features.QEMU
    assert sorted(f.name for f in caps.features) == sorted(f.key for f in features.FEATURES)
    hotplug = {f.name: f for f in caps.features if f.name.endswith("hotplug")}
    assert all("q35" in f.detail for f in hotplug.values())
    assert caps.limits.min_memory_bytes == 16 * MIB and caps.limits.max_vcpus == 255


def test_detect_finds_the_binary_and_reports_none_for_a_missing_one(qemu_binary: str) -> None:
    found = QemuRuntime.detect(RuntimeSettings())
    assert found is not None and found.binary == qemu_binary and not found.simulated
    assert found.version().count(".") == 2
    assert QemuRuntime.detect(RuntimeSettings(binary="/nonexistent/qemu-system-x86_64")) is None


def test_the_tiny_guest_is_not_a_linux_kernel_and_the_linux_guest_is(
        tiny: TinyGuest, linux: LinuxGuest) -> None:
    # What "auto" acceleration keys on where KVM cannot run stock kernels.
    assert not is_linux_kernel(tiny.pvh32) and not is_linux_kernel(tiny.elf64)
    assert is_linux_kernel(linux.vmlinux) and is_linux_kernel(linux.bzimage)


# ---- the tiny guest under KVM -----------------------------------------------------------


async def test_tiny_guest_boots_under_kvm_and_prints_its_marker(
        kvm: None, runtime: QemuRuntime, tiny: TinyGuest, vm: VmDir) -> None:
    desired = tiny_vm(tiny, vm)
    await runtime.create(vm, desired)
    created = await runtime.observe(vm)
    assert created.alive and created.state == vm_pb2.VM_STATE_CREATED
    assert created.backend_info["accel"] == "kvm"
    assert created.backend_info["machine"] == "microvm"
    assert tiny.marker not in console(vm)  # created means not started

    await runtime.boot(vm, desired)
    assert console(vm).count(tiny.marker) == 1
    running = await runtime.observe(vm)
    assert running.state == vm_pb2.VM_STATE_RUNNING and running.pid == created.pid


async def test_pause_and_resume(kvm: None, runtime: QemuRuntime, tiny: TinyGuest,
                                vm: VmDir) -> None:
    desired = tiny_vm(tiny, vm)
    await runtime.create(vm, desired)
    with pytest.raises(RuntimeFailure, match="not paused"):
        await runtime.resume(vm)  # nothing runs yet
    await runtime.boot(vm, desired)
    await runtime.pause(vm)
    await runtime.pause(vm)  # already paused: nothing to do
    assert (await runtime.observe(vm)).state == vm_pb2.VM_STATE_PAUSED
    with pytest.raises(RuntimeFailure, match="resume it"):
        await runtime.boot(vm, desired)
    await runtime.resume(vm)
    assert (await runtime.observe(vm)).state == vm_pb2.VM_STATE_RUNNING


async def test_reboot_boots_the_guest_again_in_the_same_process(
        kvm: None, runtime: QemuRuntime, tiny: TinyGuest, vm: VmDir) -> None:
    desired = tiny_vm(tiny, vm)
    await runtime.create(vm, desired)
    await runtime.boot(vm, desired)
    pid = pid_of(vm)
    await runtime.reboot(vm, desired, force=False)
    assert console(vm).count(tiny.marker) == 2
    observed = await runtime.observe(vm)
    assert observed.state == vm_pb2.VM_STATE_RUNNING and observed.pid == pid


async def test_shutdown_of_a_guest_that_ignores_the_power_button_quits_after_the_timeout(
        kvm: None, runtime: QemuRuntime, tiny: TinyGuest, vm: VmDir) -> None:
    desired = tiny_vm(tiny, vm)
    await runtime.create(vm, desired)
    await runtime.boot(vm, desired)
    ref = ProcessRef.from_dict(vm.load_runtime())
    assert ref is not None
    await runtime.shutdown(vm, force=False, timeout=0.3)
    assert not process.is_alive(ref)
    observed = await runtime.observe(vm)
    assert not observed.alive and observed.clean_exit
    assert "stopped by the agent" in observed.detail
    assert not vm.api_socket.exists()

    await runtime.boot(vm, desired)  # from SHUTDOWN: a fresh process
    assert pid_of(vm) != ref.pid
    assert (await runtime.observe(vm)).state == vm_pb2.VM_STATE_RUNNING


async def test_destroy_leaves_no_process_or_socket(
        kvm: None, runtime: QemuRuntime, tiny: TinyGuest, vm: VmDir) -> None:
    desired = tiny_vm(tiny, vm)
    await runtime.create(vm, desired)
    await runtime.boot(vm, desired)
    ref = ProcessRef.from_dict(vm.load_runtime())
    assert ref is not None and vm.api_socket.exists()
    await runtime.destroy(vm)
    assert not process.is_alive(ref)
    assert not vm.api_socket.exists()
    assert vm.load_runtime() == {}


async def test_a_fresh_runtime_adopts_the_running_vm(
        kvm: None, qemu_binary: str, runtime: QemuRuntime, tiny: TinyGuest, vm: VmDir) -> None:
    desired = tiny_vm(tiny, vm)
    await runtime.create(vm, desired)
    await runtime.boot(vm, desired)
    pid = pid_of(vm)

    adopter = QemuRuntime(qemu_binary)  # as after an agent restart: nothing in memory
    observed = await adopter.observe(vm)
    assert observed.alive and observed.pid == pid
    assert observed.state == vm_pb2.VM_STATE_RUNNING
    assert observed.backend_info["accel"] == "kvm"
    await adopter.pause(vm)
    assert (await runtime.observe(vm)).state == vm_pb2.VM_STATE_PAUSED


async def test_a_guest_that_never_becomes_ready_fails_with_the_console_tail(
        kvm: None, qemu_binary: str, tiny: TinyGuest, vm: VmDir) -> None:
    impatient = QemuRuntime(qemu_binary, settings=RuntimeSettings(boot_timeout=0.5))
    desired = tiny_vm(tiny, vm, ready=False, ready_marker="THIS-LINE-NEVER-COMES")
    await impatient.create(vm, desired)
    with pytest.raises(RuntimeFailure) as failure:
        await impatient.boot(vm, desired)
    assert failure.value.code == "DEADLINE_EXCEEDED"
    assert "THIS-LINE-NEVER-COMES" in failure.value.message
    assert tiny.marker in failure.value.message  # the console tail


async def test_qemu_that_cannot_start_reports_its_own_error_and_leaves_nothing(
        runtime: QemuRuntime, tiny: TinyGuest, vm: VmDir) -> None:
    desired = tiny_vm(tiny, vm, accel="tcg")
    desired.config.boot.initrd_path = str(vm.path / "missing-initrd")
    with pytest.raises(RuntimeFailure) as failure:
        await runtime.create(vm, desired)
    assert "missing-initrd" in failure.value.message  # QEMU's own words, from its stderr
    assert vm.load_runtime() == {} and not vm.api_socket.exists()


async def test_qmp_errors_carry_qemus_class_and_text(
        runtime: QemuRuntime, tiny: TinyGuest, vm: VmDir) -> None:
    await runtime.create(vm, tiny_vm(tiny, vm, accel="tcg"))
    async with QmpClient(vm.api_socket) as qmp:
        assert qmp.version.count(".") == 2
        with pytest.raises(QmpError) as missing:
            await qmp.execute("no-such-command")
        assert missing.value.error_class == "CommandNotFound"
        assert missing.value.code == "UNIMPLEMENTED"
        assert "no-such-command" in missing.value.desc
        with pytest.raises(QmpError) as bad:
            await qmp.execute("stop", {"bogus": 1})
        assert (bad.value.error_class, bad.value.desc) == (
            "GenericError", "Parameter 'bogus' is unexpected")
        # The session is still usable after refusals.
        assert (await qmp.execute("query-status"))["status"] == "prelaunch"


# ---- hotplug (q35) ----------------------------------------------------------------------


async def test_hotplug_needs_the_q35_machine(
        kvm: None, runtime: QemuRuntime, tiny: TinyGuest, vm: VmDir) -> None:
    desired = tiny_vm(tiny, vm)
    await runtime.create(vm, desired)
    await runtime.boot(vm, desired)
    with pytest.raises(RuntimeFailure, match="CPU Hotplug on qemu needs the q35 machine"):
        await runtime.hotplug(vm, agent_pb2.HotplugRequest(
            vm_id=vm.vm_id, resize=vm_pb2.ResizeVmRequest(vcpu_count=2)))


async def test_hotplug_adds_vcpus_memory_and_a_disk_on_q35(
        kvm: None, runtime: QemuRuntime, tiny: TinyGuest, vm: VmDir) -> None:
    disk = vm.path / "data.img"
    disk.write_bytes(b"\0" * MIB)
    desired = tiny_vm(tiny, vm)
    desired.config.cpu.max_vcpu_count = 4
    desired.config.memory.max_size_bytes = 256 * MIB
    await runtime.create(vm, desired)
    await runtime.boot(vm, desired)
    assert (await runtime.observe(vm)).backend_info["machine"] == "q35"

    config = await runtime.hotplug(vm, agent_pb2.HotplugRequest(
        vm_id=vm.vm_id, resize=vm_pb2.ResizeVmRequest(vcpu_count=3,
                                                      memory_size_bytes=96 * MIB)))
    assert (config.cpu.vcpu_count, config.memory.size_bytes) == (3, 96 * MIB)
    config = await runtime.hotplug(vm, agent_pb2.HotplugRequest(
        vm_id=vm.vm_id, attach_disk=vm_pb2.StorageDevice(id="data", path=str(disk),
                                                         read_only=True)))
    assert [d.id for d in config.storage] == ["data"]
    with pytest.raises(RuntimeFailure) as twice:
        await runtime.hotplug(vm, agent_pb2.HotplugRequest(
            vm_id=vm.vm_id, attach_disk=vm_pb2.StorageDevice(id="data", path=str(disk))))
    assert twice.value.code == "ALREADY_EXISTS"
    with pytest.raises(RuntimeFailure) as too_many:
        await runtime.hotplug(vm, agent_pb2.HotplugRequest(
            vm_id=vm.vm_id, resize=vm_pb2.ResizeVmRequest(vcpu_count=5)))
    assert too_many.value.code == "INVALID_ARGUMENT"

    async with QmpClient(vm.api_socket) as qmp:
        assert len(await qmp.execute("query-cpus-fast")) == 3
        memory = await qmp.execute("query-memory-size-summary")
        assert memory == {"base-memory": 32 * MIB, "plugged-memory": 64 * MIB}
        block = {b["qdev"]: b for b in await qmp.execute("query-block")}
        assert block["/machine/peripheral/disk-data/virtio-backend"]["inserted"]["ro"]
    # The running config survives an agent restart.
    assert (await QemuRuntime(runtime.binary).hotplug(vm, agent_pb2.HotplugRequest(
        vm_id=vm.vm_id, resize=vm_pb2.ResizeVmRequest(vcpu_count=4)))).storage[0].id == "data"
    # A reset keeps what was plugged in.
    await runtime.reboot(vm, desired, force=True)
    assert console(vm).count(tiny.marker) == 2
    async with QmpClient(vm.api_socket) as qmp:
        assert len(await qmp.execute("query-cpus-fast")) == 4


# ---- the Linux guest --------------------------------------------------------------------


async def test_linux_guest_pause_resume_and_graceful_shutdown(
        runtime: QemuRuntime, linux: LinuxGuest, vm: VmDir) -> None:
    desired = linux_vm(linux, vm)
    await runtime.create(vm, desired)
    await runtime.boot(vm, desired)
    assert linux.marker in console(vm)
    observed = await runtime.observe(vm)
    # Where the hardware cannot run a stock kernel under KVM, "auto" picks TCG.
    expected = "kvm" if kvm_device_usable() and hardware_virtualization() else "tcg"
    assert observed.backend_info["accel"] == expected
    await wait_until(lambda: len(heartbeats(vm)) >= 1, 20, "a first heartbeat")

    ref = ProcessRef.from_dict(vm.load_runtime())
    assert ref is not None
    await runtime.pause(vm)
    beats, cpu = len(heartbeats(vm)), process.cpu_seconds(ref)
    await asyncio.sleep(1.5)
    assert len(heartbeats(vm)) == beats, "the guest made progress while paused"
    assert process.cpu_seconds(ref) - cpu < 0.2, "QEMU kept burning CPU while paused"

    await runtime.resume(vm)
    await wait_until(lambda: len(heartbeats(vm)) > beats, 20, "a heartbeat after resume")
    metrics = await runtime.metrics(vm)
    assert metrics.memory_usage_bytes > 16 * MIB and metrics.uptime_seconds >= 1
    assert metrics.cpu_usage_percent > 0  # the vCPU threads' time, booting included

    await runtime.shutdown(vm, force=False, timeout=30)
    assert linux.poweroff_marker in console(vm)
    observed = await runtime.observe(vm)
    assert not observed.alive and observed.clean_exit


async def test_linux_guest_sees_devices_hotplugged_on_q35(
        runtime: QemuRuntime, linux: LinuxGuest, vm: VmDir) -> None:
    disk = vm.path / "data.img"
    disk.write_bytes(b"\0" * MIB)
    desired = linux_vm(linux, vm)
    desired.config.cpu.max_vcpu_count = 2
    desired.config.memory.max_size_bytes = 512 * MIB
    await runtime.create(vm, desired)
    await runtime.boot(vm, desired)

    def latest() -> str:
        beats = heartbeats(vm)
        return beats[-1] if beats else ""

    await wait_until(lambda: "disks=" in latest(), 20, "a heartbeat")
    assert "cpus=0 " in latest() and "vda" not in latest()
    await runtime.hotplug(vm, agent_pb2.HotplugRequest(
        vm_id=vm.vm_id, resize=vm_pb2.ResizeVmRequest(vcpu_count=2)))
    await runtime.hotplug(vm, agent_pb2.HotplugRequest(
        vm_id=vm.vm_id, attach_disk=vm_pb2.StorageDevice(id="data", path=str(disk))))
    await wait_until(lambda: "cpus=0-1 " in latest() and "vda" in latest(), 20,
                     "the guest to see the new vCPU and disk")
    config = await runtime.hotplug(vm, agent_pb2.HotplugRequest(vm_id=vm.vm_id,
                                                                detach_disk="data"))
    assert len(config.storage) == 0
    await wait_until(lambda: "vda" not in latest(), 20, "the disk to leave the guest")
    await runtime.shutdown(vm, force=True, timeout=0)
