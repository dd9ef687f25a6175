"""Real guests through the whole system: etcd, the controller and a QEMU agent as separate
processes, and guests that print what they do on their serial console.

The Linux guest (Debian's cloud kernel, a busybox initramfs printing a readiness marker
and a heartbeat line every second) shows that each lifecycle call really reaches the
guest: progress stops while paused, the guest powers itself off on a graceful shutdown,
a reboot boots it again. The tiny guest (a few instructions printing a marker) boots
under KVM in milliseconds and serves where any guest will do. Everything the tests see
comes through the public API: GetConsoleLog, StreamConsole, GetVmInfo.

Linux boots take seconds where the runtime has to emulate the CPU (TCG), so there are few.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from agent.runtimes.qemu.accel import hardware_virtualization, kvm_device_usable
from agent.vm_dir import StateDir, VmDir
from tools.fleet.cluster import GIB, Cluster, wait_until
from tools.guests.images import (
    TINY_GUEST_PVPANIC_MARKER,
    LinuxGuest,
    TinyGuest,
)
from vmm.v1 import vm_pb2

pytestmark = pytest.mark.qemu

S = vm_pb2
MIB = 1 << 20
HOST = "qemu-host"
# Generous: a Linux boot under TCG on a loaded two-core machine.
OPERATION_TIMEOUT = 60.0
# QEMU's CPU time over PAUSE_WATCH_SECONDS with its guest paused: only its main loop
# wakes (answering the agent's QMP queries). Emulating the idle Linux guest costs about
# 0.1 s in that time under TCG, so the bound tells a stopped vCPU from an idle one.
PAUSE_WATCH_SECONDS = 1.5
PAUSED_CPU_SECONDS_BOUND = 0.05
# A timeout the never-ready guest runs into quickly.
SHORT_BOOT_TIMEOUT = 2.0


# ---- fixtures ---------------------------------------------------------------------------










@pytest.fixture
def qemu_cluster(qemu_binary: str) -> Iterator[Cluster]:
    """etcd and the controller; each test adds its QEMU agent with the flags it needs.

    The work dir is short on purpose: QMP sockets live under the agent's state dir, and a
    Unix socket path must stay under 108 bytes (pytest's tmp_path can be longer)."""
    workdir = Path(tempfile.mkdtemp(prefix="vmm-guests-"))
    cluster = Cluster(workdir, operation_timeout=OPERATION_TIMEOUT)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(workdir, ignore_errors=True)


def add_qemu_agent(cluster: Cluster, *flags: str) -> StateDir:
    cluster.add_agent(HOST, vcpus=4, memory=4 * GIB, backends="qemu", extra=list(flags))
    return StateDir(cluster.workdir / f"agent-{HOST}")


# ---- configs and reads through the API --------------------------------------------------


def linux_config(linux: LinuxGuest) -> vm_pb2.VmConfig:
    return vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=1),
        memory=vm_pb2.MemoryConfig(size_bytes=256 * MIB),
        boot=vm_pb2.BootConfig(kernel_path=str(linux.bzimage), initrd_path=str(linux.initramfs),
                               kernel_args=linux.cmdline,
                               boot_options={"ready_marker": linux.marker}))


def tiny_config(tiny: TinyGuest, ready_marker: str) -> vm_pb2.VmConfig:
    return vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=1),
        memory=vm_pb2.MemoryConfig(size_bytes=32 * MIB),
        boot=vm_pb2.BootConfig(kernel_path=str(tiny.pvh32),
                               boot_options={"ready_marker": ready_marker}))


def create_and_boot(cluster: Cluster, vm_id: str, config: vm_pb2.VmConfig) -> None:
    created = cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id=vm_id, config=config,
                                                          backend="qemu"))
    assert created.state == S.VM_STATE_CREATED
    assert created.placement.backend == "qemu" and not created.placement.simulated
    booted = cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id=vm_id))
    assert booted.state == S.VM_STATE_RUNNING


def info(cluster: Cluster, vm_id: str) -> vm_pb2.GetVmInfoResponse:
    return cluster.vms.GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id=vm_id))


def console(cluster: Cluster, vm_id: str) -> str:
    return cluster.vms.GetConsoleLog(vm_pb2.GetConsoleLogRequest(vm_id=vm_id)).text


def heartbeats(text: str, linux: LinuxGuest) -> list[int]:
    """The counters of the guest's complete heartbeat lines, in order (the serial port
    writes a byte at a time, so a read can end inside a line)."""
    return [int(n) for n in re.findall(rf"^{re.escape(linux.heartbeat)} (\d+) [^\n]*\n", text,
                                       re.MULTILINE)]


def qemu_pid(cluster: Cluster, vm_id: str) -> int:
    pid = int(info(cluster, vm_id).backend_info["pid"])
    assert psutil.Process(pid).name().startswith("qemu-system")
    return pid


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def stream_until(cluster: Cluster, vm_id: str, enough: Callable[[str], bool]) -> str:
    """Follow the console (new output only) until what arrived is `enough`."""
    stream = cluster.vms.StreamConsole(vm_pb2.StreamConsoleRequest(vm_id=vm_id, tail_lines=0),
                                       timeout=30)
    received = ""
    try:
        for chunk in stream:
            received += chunk.data.decode(errors="replace")
            if enough(received):
                return received
    finally:
        stream.cancel()
    raise AssertionError(f"the console stream ended early, after {received!r}")


def delete_leaves_nothing(cluster: Cluster, state: StateDir, vm_id: str, pid: int) -> None:
    """DeleteVm, then: no such VM, no QEMU process, no VM dir, no QMP socket."""
    vm = VmDir(state.vms_root / vm_id)
    assert cluster.vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id=vm_id, force=True)).success
    with pytest.raises(grpc.RpcError) as gone:
        info(cluster, vm_id)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert process_gone(pid), f"qemu process {pid} outlived the delete"
    assert not vm.path.exists(), f"{vm.path} is left behind"
    assert not vm.api_socket.exists(), f"{vm.api_socket} is left behind"
    assert list(state.vms_root.iterdir()) == []
    assert not any(vm.api_socket.parent.iterdir())


# ---- the Linux guest --------------------------------------------------------------------


def test_linux_guest_runs_pauses_resumes_and_reboots_through_the_control_plane(
        qemu_cluster: Cluster, linux: LinuxGuest) -> None:
    state = add_qemu_agent(qemu_cluster)
    create_and_boot(qemu_cluster, "linux-1", linux_config(linux))
    assert linux.marker in console(qemu_cluster, "linux-1")

    vm_info = info(qemu_cluster, "linux-1")
    # Where the host's KVM cannot run a stock kernel (no vmx/svm), the agent emulates.
    expected_accel = "kvm" if kvm_device_usable() and hardware_virtualization() else "tcg"
    assert vm_info.backend_info["accel"] == expected_accel
    assert vm_info.backend_info["accel_reason"]
    assert vm_info.backend_info["qmp_status"] == "running"
    pid = qemu_pid(qemu_cluster, "linux-1")

    # The stream carries what the guest prints from now on: two heartbeats in a row.
    streamed = stream_until(qemu_cluster, "linux-1",
                            lambda text: len(heartbeats(text, linux)) >= 2)
    first, second = heartbeats(streamed, linux)[:2]
    assert second == first + 1
    assert linux.marker not in streamed  # no history was asked for

    paused = qemu_cluster.vms.PauseVm(vm_pb2.PauseVmRequest(vm_id="linux-1"))
    assert paused.state == S.VM_STATE_PAUSED
    assert info(qemu_cluster, "linux-1").backend_info["qmp_status"] == "paused"
    beats_before, cpu_before = heartbeats(console(qemu_cluster, "linux-1"), linux), \
        cpu_seconds(pid)
    time.sleep(PAUSE_WATCH_SECONDS)
    assert heartbeats(console(qemu_cluster, "linux-1"), linux) == beats_before, \
        "the guest printed heartbeats while paused"
    used = cpu_seconds(pid) - cpu_before
    assert used < PAUSED_CPU_SECONDS_BOUND, f"QEMU used {used:.2f}s of CPU while paused"

    resumed = qemu_cluster.vms.ResumeVm(vm_pb2.ResumeVmRequest(vm_id="linux-1"))
    assert resumed.state == S.VM_STATE_RUNNING
    wait_until(lambda: max(heartbeats(console(qemu_cluster, "linux-1"), linux))
               > max(beats_before), 20, what="a heartbeat after resume")

    rebooted = qemu_cluster.vms.RebootVm(vm_pb2.RebootVmRequest(vm_id="linux-1"))
    assert rebooted.state == S.VM_STATE_RUNNING
    assert console(qemu_cluster, "linux-1").count(linux.marker) == 2
    # QEMU resets the machine in place: the same process runs the second boot.
    assert qemu_pid(qemu_cluster, "linux-1") == pid
    # A fresh guest: its heartbeat counter starts again after the second marker.
    wait_until(lambda: heartbeats(console(qemu_cluster, "linux-1")
                                  .rsplit(linux.marker, 1)[1], linux)[:1] == [1],
               20, what="the first heartbeat of the second boot")

    delete_leaves_nothing(qemu_cluster, state, "linux-1", pid)


def test_linux_guest_powers_itself_off_on_graceful_shutdown_and_boots_again(
        qemu_cluster: Cluster, linux: LinuxGuest) -> None:
    state = add_qemu_agent(qemu_cluster)
    create_and_boot(qemu_cluster, "linux-2", linux_config(linux))
    first_pid = qemu_pid(qemu_cluster, "linux-2")

    down = qemu_cluster.vms.ShutdownVm(vm_pb2.ShutdownVmRequest(vm_id="linux-2",
                                                                timeout_seconds=30))
    assert down.state == S.VM_STATE_SHUTDOWN
    text = console(qemu_cluster, "linux-2")
    # The guest's power-button handler ran: it was the guest that ended the VM.
    assert linux.poweroff_marker in text
    assert text.index(linux.poweroff_marker) > text.index(linux.marker)
    assert process_gone(first_pid)
    assert info(qemu_cluster, "linux-2").state == S.VM_STATE_SHUTDOWN

    booted = qemu_cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="linux-2"))
    assert booted.state == S.VM_STATE_RUNNING
    again = console(qemu_cluster, "linux-2")
    assert again.count(linux.marker) == 2
    assert again.rindex(linux.marker) > again.index(linux.poweroff_marker)
    second_pid = qemu_pid(qemu_cluster, "linux-2")
    assert second_pid != first_pid

    delete_leaves_nothing(qemu_cluster, state, "linux-2", second_pid)


def test_linux_guest_without_a_root_device_panics_and_is_reported_failed(
        qemu_cluster: Cluster, linux: LinuxGuest) -> None:
    """The support matrix's Lambda example failed this way: the kernel cannot mount its root
    file system and panics; the VM must not stay RUNNING."""
    add_qemu_agent(qemu_cluster)
    config = vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=1), memory=vm_pb2.MemoryConfig(size_bytes=256 * MIB),
        boot=vm_pb2.BootConfig(kernel_path=str(linux.bzimage), kernel_args=linux.cmdline))
    create_and_boot(qemu_cluster, "no-root", config)
    pid = qemu_pid(qemu_cluster, "no-root")

    failed = wait_until(lambda: (i := info(qemu_cluster, "no-root")).state == S.VM_STATE_FAILED
                        and i, timeout=OPERATION_TIMEOUT, what="the panicked VM to be FAILED")
    assert isinstance(failed, vm_pb2.GetVmInfoResponse)
    reason = failed.state_reason
    assert reason.startswith("guest kernel panic: VFS: Unable to mount root fs"), reason
    assert "console tail:" in reason and "Kernel panic - not syncing" in reason
    # The dead guest's hypervisor is stopped; the VM stays FAILED, and boots again on request.
    wait_until(lambda: process_gone(pid), what=f"qemu {pid} to be stopped")
    assert info(qemu_cluster, "no-root").state == S.VM_STATE_FAILED


# ---- the tiny guest ---------------------------------------------------------------------


def test_tiny_guest_boots_under_kvm_and_its_marker_reads_back(
        qemu_cluster: Cluster, tiny: TinyGuest, kvm: None) -> None:
    state = add_qemu_agent(qemu_cluster)
    create_and_boot(qemu_cluster, "tiny-1", tiny_config(tiny, tiny.marker))

    assert tiny.marker in console(qemu_cluster, "tiny-1")
    tail = qemu_cluster.vms.GetConsoleLog(vm_pb2.GetConsoleLogRequest(vm_id="tiny-1",
                                                                      tail_lines=1))
    assert tail.text.strip() == tiny.marker
    vm_info = info(qemu_cluster, "tiny-1")
    assert vm_info.state == S.VM_STATE_RUNNING
    assert vm_info.backend_info["accel"] == "kvm"
    assert vm_info.backend_info["machine"] == "microvm"

    delete_leaves_nothing(qemu_cluster, state, "tiny-1", qemu_pid(qemu_cluster, "tiny-1"))


def test_guest_that_never_becomes_ready_is_failed_with_its_console_tail(
        qemu_cluster: Cluster, tiny: TinyGuest) -> None:
    state = add_qemu_agent(qemu_cluster, "--boot-timeout", str(SHORT_BOOT_TIMEOUT))
    never = "THIS-LINE-IS-NEVER-PRINTED"
    qemu_cluster.vms.CreateVm(vm_pb2.CreateVmRequest(
        vm_id="hung", config=tiny_config(tiny, never), backend="qemu"))

    with pytest.raises(grpc.RpcError) as refused:
        qemu_cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="hung"))
    assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert never in refused.value.details()
    # The guest did run: what it printed instead is in the error.
    assert tiny.marker in refused.value.details()

    failed = info(qemu_cluster, "hung")
    assert failed.state == S.VM_STATE_FAILED
    assert never in failed.state_reason and tiny.marker in failed.state_reason
    # The hung guest was stopped, not left to hold its memory.
    pid = int(failed.backend_info["pid"])
    assert process_gone(pid)

    # A failed VM may be booted again: the agent really starts it again (and it fails
    # the same way, since its marker still never appears).
    with pytest.raises(grpc.RpcError) as again:
        qemu_cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="hung"))
    assert again.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert console(qemu_cluster, "hung").count(tiny.marker) == 2
    assert info(qemu_cluster, "hung").state == S.VM_STATE_FAILED

    delete_leaves_nothing(qemu_cluster, state, "hung", int(info(qemu_cluster, "hung")
                                                         .backend_info["pid"]))


def test_guest_panic_signalled_on_the_pvpanic_device_is_reported_failed(
        qemu_cluster: Cluster, tiny: TinyGuest) -> None:
    """A guest whose console says nothing of its panic: only QEMU's GUEST_PANICKED tells."""
    add_qemu_agent(qemu_cluster)
    config = tiny_config(tiny, TINY_GUEST_PVPANIC_MARKER)
    config.boot.kernel_path = str(tiny.panic_pvh32)
    qemu_cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="pvpanic", config=config,
                                                     backend="qemu"))
    pid = qemu_pid(qemu_cluster, "pvpanic")
    # The guest panics right after its marker: the boot may already see it, and answer so.
    try:
        booted = qemu_cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="pvpanic"))
        assert booted.state in (S.VM_STATE_RUNNING, S.VM_STATE_FAILED)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.ABORTED and "panic" in str(err.details()), err

    failed = wait_until(lambda: (i := info(qemu_cluster, "pvpanic")).state == S.VM_STATE_FAILED
                        and i, timeout=OPERATION_TIMEOUT, what="the panicked VM to be FAILED")
    assert isinstance(failed, vm_pb2.GetVmInfoResponse)
    assert failed.state_reason.startswith("guest kernel panic"), failed.state_reason
    assert TINY_GUEST_PVPANIC_MARKER in failed.state_reason  # the console tail
    wait_until(lambda: process_gone(pid), what=f"qemu {pid} to be stopped")
