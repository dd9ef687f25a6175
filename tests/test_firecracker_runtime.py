"""The Firecracker runtime against real processes: the project's API simulator
always, and the real firecracker binary where this machine has one.

Every lifecycle test runs once per backend with the same runtime code; only
the guest differs (the real binary boots the tiny serial-marker guest).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent import process
from agent.config import binary_from_environment
from agent.host_paths import REFUSED, HostPathPolicy
from agent.hypervisors.errors import HypervisorApiError
from agent.hypervisors.firecracker_api import FirecrackerApi
from agent.hypervisors.unix_http import UnixHttpClient
from agent.runtimes.base import RuntimeFailure, RuntimeSettings, UnsupportedOperation
from agent.runtimes.firecracker import FirecrackerRuntime
from agent.runtimes.firecracker_config import (
    CMDLINE_CAPACITY,
    drive_ids,
    firecracker_cmdline_additions,
    instance_id,
    translate,
)
from agent.runtimes.firecracker_metrics import MetricsTotals
from agent.runtimes.readiness import READY_MARKER_OPTION
from agent.vm_dir import StateDir, VmDir
from tools.guests.images import GuestBuildError, TinyGuest, tiny_guest
from vmm import features
from vmm.agent.v1 import agent_pb2
from vmm.v1 import host_pb2, vm_pb2

MIB = 1024 * 1024
# Seconds the guest gets to answer Ctrl+Alt+Del. The tiny guest never does, so
# this bounds how long those tests wait before the kill.
SHORT_SHUTDOWN = 0.3
# Generous bound for things that normally take milliseconds; never asserted on.
PATIENCE = 10.0
# Put in the kernel args so the simulator's console shows it at InstanceStart.
BOOT_TOKEN = "vmm.test=fc-runtime"

NO_BINARY = ("no firecracker binary: set VMM_AGENT_FIRECRACKER_BINARY or put firecracker on "
             "PATH")


@dataclass(frozen=True)
class Backend:
    runtime: FirecrackerRuntime
    # A guest that keeps running through Ctrl+Alt+Del.
    kernel: Path
    # What the console shows once the guest runs.
    ready_marker: str
    # A guest that reboots on Ctrl+Alt+Del, so that Firecracker exits by itself.
    rebooting_kernel: Path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyGuest:
    try:
        return tiny_guest(tmp_path_factory.mktemp("guests"))
    except GuestBuildError as e:
        pytest.skip(f"cannot build the tiny guest: {e}")


# The tiny guest plus a keyboard: after its marker it polls the i8042 status port,
# and on the first scancode (Ctrl+Alt+Del) pulses the reset line (command 0xFE),
# which is how a Linux guest reboots under Firecracker and makes Firecracker exit.
_CTRL_ALT_DEL_GUEST = """\
    .code64
    .globl _start
    .text
_start:
    lea     marker(%rip), %rsi
    mov     $marker_len, %ecx
    mov     $0x3f8, %dx
1:  lodsb
    outb    %al, %dx
    loop    1b
2:  pause
    inb     $0x64, %al
    test    $1, %al
    jz      2b
    inb     $0x60, %al
    mov     $0xfe, %al
    outb    %al, $0x64
3:  hlt
    jmp     3b
    .section .rodata
marker:
    .ascii  "GUEST-READY ctrl-alt-del\\n"
    .set    marker_len, . - marker
"""


@pytest.fixture(scope="session")
def ctrl_alt_del_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("ctrl-alt-del-guest")
    (work / "guest.S").write_text(_CTRL_ALT_DEL_GUEST)
    for argv in (["gcc", "-c", "guest.S", "-o", "guest.o"],
                 ["ld", "-static", "-nostdlib", "-Ttext=0x1000000", "-e", "_start",
                  "guest.o", "-o", "guest.elf"]):
        try:
            done = subprocess.run(argv, cwd=work, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            pytest.skip(f"{argv[0]} is not installed: cannot build the Ctrl+Alt+Del guest")
        assert done.returncode == 0, done.stderr
    return work / "guest.elf"


def _settings(**overrides: Any) -> RuntimeSettings:
    return RuntimeSettings(**{"default_shutdown_timeout": SHORT_SHUTDOWN, **overrides})


@pytest.fixture(params=["simulator", "real"])
def backend(request: pytest.FixtureRequest, tiny: TinyGuest, tmp_path: Path,
            ctrl_alt_del_elf: Path) -> Backend:
    if request.param == "simulator":
        if importlib.util.find_spec("tools.simulators.firecracker") is None:
            pytest.skip("the Firecracker simulator tools/simulators/firecracker is not installed")
        runtime = FirecrackerRuntime.detect(_settings(force_simulator=True))
        assert runtime is not None and runtime.simulated
        rebooting = tmp_path / "vmlinux-i8042"
        # The simulator's stand-in for a Linux guest with the i8042 driver.
        rebooting.write_bytes(b"\x7fELF simulated kernel: i8042 reboot on Ctrl+Alt+Del\n")
        return Backend(runtime, tiny.elf64, BOOT_TOKEN, rebooting)
    binary = binary_from_environment("firecracker") or shutil.which("firecracker")
    if not binary:
        pytest.skip(NO_BINARY)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("firecracker needs read/write access to /dev/kvm, which this machine lacks")
    runtime = FirecrackerRuntime.detect(_settings(binary=binary))
    assert runtime is not None and not runtime.simulated
    return Backend(runtime, tiny.elf64, tiny.marker, ctrl_alt_del_elf)


@pytest.fixture
def state_dir() -> Iterator[StateDir]:
    # A short root, as an agent's state dir is: pytest's per-test paths leave little
    # of the 107 bytes a Unix socket path may have.
    root = Path(tempfile.mkdtemp(prefix="fc-rt-"))
    yield StateDir(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def vm(backend: Backend, state_dir: StateDir) -> AsyncIterator[VmDir]:
    vm_dir = state_dir.vm("vm-1")
    yield vm_dir
    await backend.runtime.destroy(vm_dir)


def desired_vm(kernel: Path, *, vcpus: int = 1, memory_bytes: int = 128 * MIB,
               storage: list[vm_pb2.StorageDevice] | None = None) -> agent_pb2.DesiredVm:
    return agent_pb2.DesiredVm(
        vm_id="vm-1",
        config=vm_pb2.VmConfig(
            cpu=vm_pb2.CpuConfig(vcpu_count=vcpus),
            memory=vm_pb2.MemoryConfig(size_bytes=memory_bytes),
            boot=vm_pb2.BootConfig(kernel_path=str(kernel),
                                   kernel_args=f"console=ttyS0 {BOOT_TOKEN}"),
            storage=storage or [],
        ),
    )


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll check until it holds; fail naming what was awaited."""
    deadline = asyncio.get_running_loop().time() + PATIENCE
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"still waiting for {what}")
        await asyncio.sleep(0.01)


async def console_shows(vm: VmDir, text: str) -> None:
    async def check() -> bool:
        return vm.console_log.exists() and text in vm.console_log.read_text(errors="replace")
    await eventually(check, f"{text!r} on the console")


def recorded_pid(vm: VmDir) -> int:
    pid = vm.load_runtime()["pid"]
    assert isinstance(pid, int)
    return pid


# ---- lifecycle, once per backend ----------------------------------------------------


async def test_create_leaves_a_configured_vm_that_has_not_started(
        backend: Backend, vm: VmDir) -> None:
    await backend.runtime.create(vm, desired_vm(backend.kernel))

    seen = await backend.runtime.observe(vm)
    assert seen.alive
    assert seen.state == vm_pb2.VM_STATE_CREATED
    assert seen.pid == recorded_pid(vm)
    assert seen.backend_info["simulated"] == str(backend.runtime.simulated).lower()
    assert seen.backend_info["api_socket"] == str(vm.api_socket)
    assert vm.api_socket.exists()


async def test_create_configures_every_device_through_the_api(
        backend: Backend, vm: VmDir, tmp_path: Path) -> None:
    root, data = tmp_path / "root.img", tmp_path / "data.img"
    for disk in (root, data):
        disk.write_bytes(bytes(MIB))
    storage = [
        vm_pb2.StorageDevice(path=str(root), is_root_device=True, read_only=True),
        vm_pb2.StorageDevice(path=str(data), options={
            "cache_type": "writeback", "io_engine": "sync", "rate_limit_bandwidth": "1048576"}),
    ]
    await backend.runtime.create(
        vm, desired_vm(backend.kernel, vcpus=2, memory_bytes=256 * MIB, storage=storage))

    async with UnixHttpClient(vm.api_socket) as http:
        config = (await http.request("GET", "/vm/config")).body
    assert config["machine-config"]["vcpu_count"] == 2
    assert config["machine-config"]["mem_size_mib"] == 256
    assert config["boot-source"]["kernel_image_path"] == str(backend.kernel)
    assert BOOT_TOKEN in config["boot-source"]["boot_args"]
    drives = {d["drive_id"]: d for d in config["drives"]}
    assert set(drives) == {"rootfs", "disk1"}
    assert drives["rootfs"]["is_root_device"] and drives["rootfs"]["is_read_only"]
    assert drives["disk1"]["path_on_host"] == str(data)
    assert drives["disk1"]["cache_type"] == "Writeback"
    assert drives["disk1"]["rate_limiter"]["bandwidth"]["size"] == 1048576


async def test_boot_runs_the_guest(backend: Backend, vm: VmDir) -> None:
    desired = desired_vm(backend.kernel)
    await backend.runtime.create(vm, desired)
    await backend.runtime.boot(vm, desired)

    assert (await backend.runtime.observe(vm)).state == vm_pb2.VM_STATE_RUNNING
    await console_shows(vm, backend.ready_marker)
    # Booting a running VM again changes nothing.
    pid = recorded_pid(vm)
    await backend.runtime.boot(vm, desired)
    assert recorded_pid(vm) == pid


async def test_boot_waits_for_the_configured_ready_marker(backend: Backend, vm: VmDir) -> None:
    desired = desired_vm(backend.kernel)
    desired.config.boot.boot_options[READY_MARKER_OPTION] = backend.ready_marker

    await backend.runtime.boot(vm, desired)

    assert backend.ready_marker in vm.console_log.read_text(errors="replace")


async def test_boot_fails_when_the_ready_marker_never_comes(
        backend: Backend, vm: VmDir) -> None:
    runtime = FirecrackerRuntime(backend.runtime.binary, backend.runtime.simulated,
                                 _settings(boot_timeout=0.3), command=backend.runtime.command)
    desired = desired_vm(backend.kernel)
    desired.config.boot.boot_options[READY_MARKER_OPTION] = "A MARKER NO GUEST PRINTS"

    with pytest.raises(RuntimeFailure) as failed:
        await runtime.boot(vm, desired)

    assert failed.value.code == "DEADLINE_EXCEEDED"
    assert "A MARKER NO GUEST PRINTS" in failed.value.message


async def test_boot_without_create_starts_and_configures_a_process(
        backend: Backend, vm: VmDir) -> None:
    await backend.runtime.boot(vm, desired_vm(backend.kernel))

    seen = await backend.runtime.observe(vm)
    assert seen.alive and seen.state == vm_pb2.VM_STATE_RUNNING


async def test_pause_and_resume(backend: Backend, vm: VmDir) -> None:
    desired = desired_vm(backend.kernel)
    await backend.runtime.boot(vm, desired)

    await backend.runtime.pause(vm)
    assert (await backend.runtime.observe(vm)).state == vm_pb2.VM_STATE_PAUSED
    await backend.runtime.resume(vm)
    assert (await backend.runtime.observe(vm)).state == vm_pb2.VM_STATE_RUNNING


async def test_shutdown_kills_a_guest_that_ignores_ctrl_alt_del(
        backend: Backend, vm: VmDir) -> None:
    await backend.runtime.boot(vm, desired_vm(backend.kernel))
    await console_shows(vm, backend.ready_marker)
    pid = recorded_pid(vm)

    await backend.runtime.shutdown(vm, force=False, timeout=SHORT_SHUTDOWN)

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not vm.api_socket.exists()
    seen = await backend.runtime.observe(vm)
    assert not seen.alive
    assert seen.clean_exit  # the agent stopped it on request: not a crash
    assert str(pid) in seen.detail


async def test_shutdown_lets_a_rebooting_guest_take_firecracker_down(
        backend: Backend, vm: VmDir) -> None:
    await backend.runtime.boot(vm, desired_vm(backend.rebooting_kernel))

    # Far longer than the guest needs: the process must end by itself, not by the kill.
    await backend.runtime.shutdown(vm, force=False, timeout=PATIENCE)

    assert not vm.api_socket.exists()

    async def exited_cleanly() -> bool:
        return "status 0" in (await backend.runtime.observe(vm)).detail
    await eventually(exited_cleanly, "the hypervisor's own exit with status 0")


async def test_forced_shutdown_of_a_created_vm(backend: Backend, vm: VmDir) -> None:
    await backend.runtime.create(vm, desired_vm(backend.kernel))

    await backend.runtime.shutdown(vm, force=True, timeout=PATIENCE)

    assert not vm.api_socket.exists()
    assert not (await backend.runtime.observe(vm)).alive


async def test_boot_after_shutdown_starts_a_fresh_process(backend: Backend, vm: VmDir) -> None:
    desired = desired_vm(backend.kernel)
    await backend.runtime.boot(vm, desired)
    first = recorded_pid(vm)
    await backend.runtime.shutdown(vm, force=True, timeout=0)

    await backend.runtime.boot(vm, desired)

    seen = await backend.runtime.observe(vm)
    assert seen.state == vm_pb2.VM_STATE_RUNNING
    assert seen.pid != first


async def test_reboot_runs_the_guest_in_a_new_process(backend: Backend, vm: VmDir) -> None:
    desired = desired_vm(backend.rebooting_kernel)
    await backend.runtime.boot(vm, desired)
    first = recorded_pid(vm)

    await backend.runtime.reboot(vm, desired, force=False)

    seen = await backend.runtime.observe(vm)
    assert seen.alive and seen.state == vm_pb2.VM_STATE_RUNNING
    assert seen.pid != first
    assert not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE


async def test_destroy_leaves_no_process_and_no_socket(backend: Backend, vm: VmDir) -> None:
    await backend.runtime.boot(vm, desired_vm(backend.kernel))
    ref = backend.runtime.load_process(vm)
    assert ref is not None

    await backend.runtime.destroy(vm)

    assert not process.is_alive(ref)
    assert not vm.api_socket.exists()
    assert not vm.runtime_file.exists()


async def test_observe_reports_a_killed_process(backend: Backend, vm: VmDir) -> None:
    await backend.runtime.boot(vm, desired_vm(backend.kernel))
    pid = recorded_pid(vm)

    os.kill(pid, signal.SIGKILL)

    async def gone() -> bool:
        return not (await backend.runtime.observe(vm)).alive
    await eventually(gone, "the killed process to be seen as gone")
    seen = await backend.runtime.observe(vm)
    assert not seen.clean_exit
    assert seen.pid == pid
    assert f"process {pid}" in seen.detail


async def test_invalid_config_surfaces_firecrackers_fault_message(
        backend: Backend, vm: VmDir) -> None:
    with pytest.raises(HypervisorApiError) as refused:
        await backend.runtime.create(vm, desired_vm(backend.kernel, vcpus=33))

    assert refused.value.message == (
        "firecracker refused PUT /machine-config: Machine config error: The number of vCPUs "
        "must be greater than 0, less than 32 and must be 1 or an even number if SMT is "
        "enabled.")
    # Nothing is left behind by the failed create.
    assert backend.runtime.live_process(vm) is None
    assert not vm.api_socket.exists()


async def test_a_missing_kernel_is_refused_by_firecracker(backend: Backend, vm: VmDir,
                                                          tmp_path: Path) -> None:
    with pytest.raises(HypervisorApiError, match=r"refused PUT /boot-source: .*kernel"):
        await backend.runtime.create(vm, desired_vm(tmp_path / "no-such-kernel"))


async def test_a_new_runtime_adopts_a_running_vm_without_touching_it(
        backend: Backend, vm: VmDir) -> None:
    await backend.runtime.boot(vm, desired_vm(backend.kernel))
    await backend.runtime.pause(vm)
    recorded = vm.runtime_file.read_bytes()

    # What an agent restart does: a new runtime object reads the same VM directory.
    adopter = FirecrackerRuntime(backend.runtime.binary, backend.runtime.simulated,
                                 backend.runtime.settings, command=backend.runtime.command)
    seen = await adopter.observe(vm)

    assert seen.alive
    assert seen.pid == recorded_pid(vm)
    assert seen.state == vm_pb2.VM_STATE_PAUSED
    assert vm.runtime_file.read_bytes() == recorded
    assert (await backend.runtime.observe(vm)).state == vm_pb2.VM_STATE_PAUSED


async def test_metrics_of_a_running_vm(backend: Backend, vm: VmDir) -> None:
    await backend.runtime.boot(vm, desired_vm(backend.kernel))

    metrics = await backend.runtime.metrics(vm)

    assert metrics.memory_usage_bytes > 0
    assert metrics.cpu_usage_percent >= 0
    # FlushMetrics made Firecracker write at least one JSON line.
    lines = vm.metrics_file.read_text().splitlines()
    assert lines and "utc_timestamp_ms" in json.loads(lines[-1])


async def test_version_is_the_binarys(backend: Backend, vm: VmDir) -> None:
    version = backend.runtime.version()
    if backend.runtime.simulated:
        assert version == "simulator"
        return
    await backend.runtime.create(vm, desired_vm(backend.kernel))
    async with FirecrackerApi(vm.api_socket) as api:
        assert version == await api.version()


# ---- backend-independent behaviour --------------------------------------------------


def _runtime_without_binary() -> FirecrackerRuntime:
    return FirecrackerRuntime("/nonexistent/firecracker", False, _settings())


async def test_memory_that_is_not_whole_mib_is_refused_before_any_process_starts(
        state_dir: StateDir, tmp_path: Path) -> None:
    vm = state_dir.vm("vm-odd")
    with pytest.raises(RuntimeFailure) as refused:
        await _runtime_without_binary().create(
            vm, desired_vm(tmp_path / "kernel", memory_bytes=128 * MIB + 1))

    assert refused.value.code == "INVALID_ARGUMENT"
    assert "config.memory.size_bytes" in refused.value.message
    assert "whole MiB" in refused.value.message
    assert not vm.runtime_file.exists()


def test_preflight_names_options_firecracker_cannot_honour(tmp_path: Path) -> None:
    config = desired_vm(tmp_path / "missing-kernel").config
    config.storage.add(path=str(tmp_path / "d.img"), options={"num_queues": "4"})
    config.storage.add(path=str(tmp_path / "e.img"), options={"rate_limit_ops": "many"})

    violations = {v.field: v.description
                  for v in _runtime_without_binary().preflight("vm-1", config)}

    # Missing files are the agent's host path policy's to refuse (tests/test_host_paths.py).
    assert "config.boot.kernel_path" not in violations
    assert "num_queues" in violations["config.storage[0].options[num_queues]"]
    assert "positive whole number" in violations["config.storage[1].options[rate_limit_ops]"]


def test_preflight_refuses_a_kernel_that_is_a_directory(tmp_path: Path) -> None:
    # Firecracker accepts a directory at PUT /boot-source and fails only at InstanceStart:
    # the agent's host path policy lets only regular files through.
    config = desired_vm(tmp_path).config
    [violation] = HostPathPolicy.of([str(tmp_path)]).check(config)
    assert violation.field == "config.boot.kernel_path"
    assert violation.description == REFUSED


async def test_boot_args_are_refused_beyond_what_firecracker_can_hold(
        backend: Backend, vm: VmDir, tmp_path: Path) -> None:
    disk = tmp_path / "root.img"
    disk.write_bytes(bytes(MIB))
    desired = desired_vm(backend.kernel, storage=[
        vm_pb2.StorageDevice(path=str(disk), is_root_device=True),
        vm_pb2.StorageDevice(path=str(disk), read_only=True)])
    room = CMDLINE_CAPACITY - 1 - firecracker_cmdline_additions(desired.config)
    boot = desired.config.boot
    boot.kernel_args = boot.kernel_args.ljust(room + 1, "x")
    [violation] = backend.runtime.preflight("vm-1", desired.config)
    assert violation.field == "config.boot.kernel_args"
    assert f"leaves {room}" in violation.description
    # The longest args that fit boot, on the real binary too.
    boot.kernel_args = boot.kernel_args[:room]
    assert backend.runtime.preflight("vm-1", desired.config) == []
    await backend.runtime.boot(vm, desired)
    assert (await backend.runtime.observe(vm)).state == vm_pb2.VM_STATE_RUNNING


def test_device_ids_are_derived_when_empty() -> None:
    storage = [vm_pb2.StorageDevice(path="/a", is_root_device=True),
               vm_pb2.StorageDevice(path="/b"),
               vm_pb2.StorageDevice(id="scratch", path="/c")]
    assert drive_ids(storage) == ["rootfs", "disk1", "scratch"]

    config = vm_pb2.VmConfig(
        memory=vm_pb2.MemoryConfig(size_bytes=128 * MIB),
        network=[vm_pb2.NetworkInterface(tap_device="tap0", mac_address="06:00:00:00:00:01",
                                         options={"rate_limit_ops": "1000"})])
    nic = translate(config).nics[0]
    assert nic.to_json() == {
        "iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01",
        "rx_rate_limiter": {"ops": {"size": 1000, "refill_time": 1000}},
        "tx_rate_limiter": {"ops": {"size": 1000, "refill_time": 1000}},
    }


def test_duplicate_device_ids_are_refused() -> None:
    config = vm_pb2.VmConfig(storage=[vm_pb2.StorageDevice(path="/a", is_root_device=True),
                                      vm_pb2.StorageDevice(id="rootfs", path="/b")])
    with pytest.raises(RuntimeFailure, match=r"config.storage\[1\].id: device id 'rootfs'"):
        translate(config)


def test_instance_ids_fit_firecrackers_rules() -> None:
    assert instance_id("web_01.prod") == "web-01-prod"
    assert len(instance_id("x" * 100)) == 64


def test_capabilities_declare_every_feature_once() -> None:
    caps = _runtime_without_binary().capabilities()

    declared = [f.name for f in caps.features]
    assert sorted(declared) == sorted(f.key for f in features.FEATURES)
    by_key = {f.name: f for f in caps.features}
    assert by_key["vm.shutdown"].support == host_pb2.SUPPORT_PARTIAL
    assert by_key["vm.shutdown"].detail == "Ctrl+Alt+Del (force only)"
    assert by_key["vm.reboot"].support == host_pb2.SUPPORT_PARTIAL
    assert by_key["cpu.max_vcpu_count"].support == host_pb2.SUPPORT_IGNORED
    assert by_key["cpu.max_vcpu_count"].detail == "ignored - no hotplug support"
    assert by_key["cpu.hotplug"].support == host_pb2.SUPPORT_NONE
    assert by_key["vm.pause_resume"].support == host_pb2.SUPPORT_FULL
    assert caps.backend == "firecracker"
    assert (caps.limits.min_vcpus, caps.limits.max_vcpus) == (1, 32)
    assert (caps.limits.min_memory_bytes, caps.limits.max_memory_bytes) == (128 * MIB, 32 << 30)
    assert (caps.limits.max_disks, caps.limits.max_nics) == (10, 4)


async def test_hotplug_is_refused(state_dir: StateDir) -> None:
    request = agent_pb2.HotplugRequest(vm_id="vm-1", resize=vm_pb2.ResizeVmRequest(vcpu_count=4))
    with pytest.raises(UnsupportedOperation, match="CPU Hotplug is not supported by firecracker"):
        await _runtime_without_binary().hotplug(state_dir.vm("vm-1"), request)
    disk = agent_pb2.HotplugRequest(vm_id="vm-1", attach_disk=vm_pb2.StorageDevice(path="/x"))
    with pytest.raises(UnsupportedOperation, match="Disk Hotplug"):
        await _runtime_without_binary().hotplug(state_dir.vm("vm-1"), disk)


def test_detect_honours_a_configured_binary_that_is_missing() -> None:
    assert FirecrackerRuntime.detect(_settings(binary="/nonexistent/firecracker")) is None


def test_metrics_totals_sum_the_deltas_of_every_complete_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"

    def line(read_bytes: int, rx_bytes: int) -> str:
        return json.dumps({"block": {"read_bytes": read_bytes, "write_bytes": 1,
                                     "read_count": 2, "write_count": 3},
                           "net": {"rx_bytes_count": rx_bytes, "tx_bytes_count": 4,
                                   "rx_packets_count": 5, "tx_packets_count": 6}}) + "\n"

    path.write_text(line(100, 10) + line(50, 5))
    totals = MetricsTotals(path)
    totals.update()
    assert totals.storage_stats() == vm_pb2.StorageStats(
        bytes_read=150, bytes_written=2, read_operations=4, write_operations=6)
    assert totals.network_stats().bytes_received == 15

    # A line still being written counts only once it is complete.
    with open(path, "a") as f:
        f.write(line(7, 0)[:20])
    totals.update()
    assert totals.storage_stats().bytes_read == 150
    with open(path, "a") as f:
        f.write(line(7, 0)[20:])
    totals.update()
    assert totals.storage_stats().bytes_read == 157

    # A new process truncates the file: totals start again.
    path.write_text(line(1, 1))
    totals.update()
    assert totals.storage_stats().bytes_read == 1
