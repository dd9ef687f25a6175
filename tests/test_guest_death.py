"""Guests and hypervisors that die: the agent's reconciler with real hypervisor processes
(the simulators, and the real Firecracker binary where this machine has one).

A panicked guest is FAILED with the panic as its reason and the guest's own serial output
as the console tail (the hypervisor's log is kept apart, and readable on its own).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from agent.console import ConsoleRelay
from agent.host_paths import HostPathPolicy
from agent.reconciler import Reconciler
from agent.runtimes.base import Runtime, RuntimeSettings
from agent.runtimes.cloud_hypervisor import CloudHypervisorRuntime
from agent.runtimes.cloud_hypervisor_events import event_file
from agent.runtimes.firecracker import FirecrackerRuntime
from agent.vm_dir import StateDir
from tests.conftest import FAKE_KERNEL
from tests.test_host_paths import violations
from tools.fleet.cluster import Cluster, wait_until
from tools.guests.images import TINY_GUEST_PANIC_LINE, GuestBuildError, TinyGuest, tiny_guest
from vmm.agent.v1 import agent_pb2
from vmm.v1 import vm_pb2

S = vm_pb2
MIB = 1 << 20
# Generous bound for what normally takes a second or two; never asserted on.
PATIENCE = 30.0
SIM_PANIC = "guest kernel panic: VFS: Unable to mount root fs on unknown-block(0,0)"


@pytest.fixture
def state_dir() -> Iterator[StateDir]:
    # Short: API sockets live under it, and a Unix socket path has 107 bytes at most.
    root = Path(tempfile.mkdtemp(prefix="death-"))
    yield StateDir(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyGuest:
    try:
        return tiny_guest(tmp_path_factory.mktemp("guests"))
    except GuestBuildError as e:
        pytest.skip(f"cannot build the tiny guest: {e}")


@dataclass
class Agent:
    """A reconciler as the agent runs it, with the statuses it reported."""

    reconciler: Reconciler
    reports: list[agent_pb2.VmStatus]

    def latest(self, vm_id: str) -> agent_pb2.VmStatus | None:
        return next((r for r in reversed(self.reports) if r.vm_id == vm_id), None)

    async def wait_for(self, vm_id: str, state: vm_pb2.VmState.ValueType) -> agent_pb2.VmStatus:
        deadline = asyncio.get_running_loop().time() + PATIENCE
        while (status := self.latest(vm_id)) is None or status.state != state:
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(f"vm {vm_id} never became {S.VmState.Name(state)}; "
                            f"last report: {status}")
            await asyncio.sleep(0.02)
        return status


@pytest.fixture
async def start_agent(state_dir: StateDir) -> AsyncIterator[
        type[object]]:
    started: list[Reconciler] = []

    async def start(runtime: Runtime) -> Agent:
        reports: list[agent_pb2.VmStatus] = []
        reconciler = Reconciler(state_dir, {runtime.name: runtime}, reports.append,
                                runtime.settings,
                                # The guests and the state dir are under the temp dir.
                                host_paths=HostPathPolicy.of([tempfile.gettempdir()]))
        await reconciler.adopt_all()
        reconciler.start_monitor()
        started.append(reconciler)
        return Agent(reconciler, reports)

    yield start  # type: ignore[misc]
    for reconciler in started:
        await reconciler.stop_all()
        await reconciler.stop()


async def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + PATIENCE
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"still waiting for {what}")
        await asyncio.sleep(0.02)


def desired(vm_id: str, kernel: Path, kernel_args: str, backend: str,
            **config: object) -> agent_pb2.DesiredVm:
    return agent_pb2.DesiredVm(
        vm_id=vm_id, generation=1, backend=backend, power_state=S.VM_STATE_RUNNING,
        config=vm_pb2.VmConfig(
            cpu=vm_pb2.CpuConfig(vcpu_count=1), memory=vm_pb2.MemoryConfig(size_bytes=128 * MIB),
            boot=vm_pb2.BootConfig(kernel_path=str(kernel), kernel_args=kernel_args),
            **config))  # type: ignore[arg-type]


def fake_linux_kernel(directory: Path) -> Path:
    kernel = directory / "vmlinux"
    kernel.write_bytes(FAKE_KERNEL)
    return kernel


# ---- Firecracker: a panicked guest reboots (panic=1) and Firecracker exits ---------------


@dataclass(frozen=True)
class PanickingFirecracker:
    runtime: FirecrackerRuntime
    kernel: Path
    kernel_args: str
    reason: str


@pytest.fixture(params=["simulator", "real"])
def panicking_firecracker(request: pytest.FixtureRequest, tiny: TinyGuest,
                          state_dir: StateDir) -> PanickingFirecracker:
    if request.param == "simulator":
        runtime = FirecrackerRuntime.detect(RuntimeSettings(force_simulator=True))
        assert runtime is not None and runtime.simulated
        # No root drive and no initrd for a root= the kernel is told to mount.
        return PanickingFirecracker(runtime, fake_linux_kernel(state_dir.root),
                                    "console=ttyS0 reboot=k root=/dev/vda", SIM_PANIC)
    binary = os.environ.get("VMM_FIRECRACKER_BINARY") or shutil.which("firecracker")
    if not binary:
        pytest.skip("no firecracker binary: set VMM_FIRECRACKER_BINARY or put firecracker "
                    "on PATH")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("firecracker needs read/write access to /dev/kvm, which this machine lacks")
    runtime = FirecrackerRuntime.detect(RuntimeSettings(binary=binary))
    assert runtime is not None and not runtime.simulated
    reason = "guest kernel panic: " + TINY_GUEST_PANIC_LINE.split(": ", 1)[1]
    return PanickingFirecracker(runtime, tiny.panic_elf64, "console=ttyS0", reason)


async def test_firecracker_guest_panic_is_failed_with_the_panic_and_the_guests_console(
        panicking_firecracker: PanickingFirecracker, start_agent: type[object]) -> None:
    backend = panicking_firecracker
    agent: Agent = await start_agent(backend.runtime)  # type: ignore[operator]
    agent.reconciler.set_desired(desired("fc-panic", backend.kernel, backend.kernel_args,
                                         backend.runtime.name))

    failed = await agent.wait_for("fc-panic", S.VM_STATE_FAILED)
    assert failed.reason.startswith(backend.reason), failed.reason
    tail = failed.reason.split("; console tail:\n", 1)[1]
    assert "Kernel panic - not syncing" in tail
    # The tail is the guest's serial output only: Firecracker's own lines are elsewhere.
    relay = ConsoleRelay(agent.reconciler.state)
    hypervisor_log, _ = relay.tail("fc-panic", 0, vm_pb2.CONSOLE_SOURCE_HYPERVISOR)
    serial, _ = relay.tail("fc-panic", 0, vm_pb2.CONSOLE_SOURCE_SERIAL)
    for line in ("Running Firecracker", "API server"):
        assert line in hypervisor_log
        assert line not in serial and line not in tail
    # Whether panic=1's reboot ended Firecracker first or the agent stopped it on seeing the
    # panic line: no process, no stale socket.
    vm = agent.reconciler.state.vm("fc-panic")
    await eventually(lambda: backend.runtime.live_process(vm) is None
                     and not vm.api_socket.exists(), "firecracker and its socket to be gone")


# ---- Cloud Hypervisor: its pvpanic device reports the panic as an event ------------------


async def test_cloud_hypervisor_reports_a_guest_panic_through_its_pvpanic_device(
        start_agent: type[object], state_dir: StateDir) -> None:
    runtime = CloudHypervisorRuntime.detect(RuntimeSettings(force_simulator=True))
    assert runtime is not None and runtime.simulated
    agent: Agent = await start_agent(runtime)  # type: ignore[operator]
    agent.reconciler.set_desired(desired("ch-panic", fake_linux_kernel(state_dir.root),
                                         "console=ttyS0 root=/dev/vda", runtime.name))

    failed = await agent.wait_for("ch-panic", S.VM_STATE_FAILED)
    assert failed.reason.startswith(SIM_PANIC), failed.reason
    vm = agent.reconciler.state.vm("ch-panic")
    # Cloud Hypervisor itself said so: a ("guest", "panic") event from its pvpanic device.
    assert '"source": "guest"' in event_file(vm).read_text()
    assert runtime.guest_panic_reported(vm)
    # The guest hangs in its panic: the agent shuts the VM down (the VMM process stays, as
    # Cloud Hypervisor's does with --no-shutdown), and a later boot starts afresh.
    deadline = asyncio.get_running_loop().time() + PATIENCE
    while (await runtime.observe(vm)).backend_info.get("hypervisor_state") == "Running":
        assert asyncio.get_running_loop().time() < deadline, "the panicked VM still runs"
        await asyncio.sleep(0.05)


# ---- restart policy ------------------------------------------------------------------------


def vm_info(cluster: Cluster, vm_id: str) -> vm_pb2.GetVmInfoResponse:
    return cluster.vms.GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id=vm_id))


def restart_when(cluster: Cluster, vm_id: str, what: str,
                 check: Callable[[vm_pb2.RestartStatus], bool]) -> vm_pb2.GetVmInfoResponse:
    found = wait_until(lambda: (i := vm_info(cluster, vm_id)).state == S.VM_STATE_FAILED
                       and check(i.restart) and i, timeout=PATIENCE, interval=0.02, what=what)
    assert isinstance(found, vm_pb2.GetVmInfoResponse)
    return found


def test_restart_policy_restarts_a_failed_vm_with_backoff_counting_across_agent_restarts(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = cluster.add_agent("h1", extra=["--force-simulator", "true"])
    # A guest that panics at every boot: its root device does not exist.
    config = vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=1), memory=vm_pb2.MemoryConfig(size_bytes=128 * MIB),
        boot=vm_pb2.BootConfig(kernel_path=str(fake_linux_kernel(tmp_path)),
                               kernel_args="console=ttyS0 reboot=k root=/dev/vda"),
        restart_policy=vm_pb2.RestartPolicy(
            mode=vm_pb2.RESTART_MODE_ON_FAILURE, attempts=2, interval_seconds=3600,
            delay_seconds=0.5, backoff_multiplier=2))
    bad = vm_pb2.VmConfig()
    bad.CopyFrom(config)
    bad.restart_policy.backoff_multiplier = 0.5
    with pytest.raises(grpc.RpcError) as refused:
        cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="bad-policy", config=bad))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.restart_policy.backoff_multiplier" in violations(refused.value)

    cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="crashy", config=config))
    try:
        cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="crashy"))
    except grpc.RpcError as err:  # the guest may panic before the boot is reported
        assert err.code() == grpc.StatusCode.ABORTED and "panic" in err.details(), err
    first = restart_when(cluster, "crashy", "the first restart to be scheduled",
                         lambda r: r.next_restart_timestamp > 0 and r.attempts == 0)
    assert first.state_reason.startswith(SIM_PANIC)
    assert first.restart.backoff_seconds == 0.5
    second = restart_when(cluster, "crashy", "the second restart to be scheduled",
                          lambda r: r.next_restart_timestamp > 0 and r.attempts == 1)
    assert second.restart.backoff_seconds == 1  # the delay, then twice as long

    # The agent dies while the restart waits; the count is the VM's, not the agent's.
    agent.signal(signal.SIGKILL)
    agent.start()
    cluster.wait_host_ready("h1")
    final = restart_when(cluster, "crashy", "the policy's attempts to be used up",
                         lambda r: r.exhausted)
    assert final.restart.attempts == 2 and final.restart.next_restart_timestamp == 0
    assert final.state_reason.startswith(SIM_PANIC)


# ---- a hypervisor that dies after its agent restarted ------------------------------------


def test_adopted_hypervisor_that_dies_is_reported_with_its_signal_and_its_socket_goes(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = cluster.add_agent("h1", extra=["--force-simulator", "true"])
    config = vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=1), memory=vm_pb2.MemoryConfig(size_bytes=128 * MIB),
        boot=vm_pb2.BootConfig(kernel_path=str(fake_linux_kernel(tmp_path)),
                               kernel_args="console=ttyS0"))
    cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="adopted", config=config))
    cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="adopted"))
    running = vm_info(cluster, "adopted")
    pid, socket = int(running.backend_info["pid"]), Path(running.backend_info["api_socket"])
    # A new agent adopts the hypervisor: it is not that agent's child.
    agent.signal(signal.SIGKILL)
    agent.start()
    cluster.wait_host_ready("h1")
    wait_until(lambda: vm_info(cluster, "adopted").state == S.VM_STATE_RUNNING,
               what="the VM adopted as RUNNING")
    assert int(vm_info(cluster, "adopted").backend_info["pid"]) == pid

    os.kill(pid, signal.SIGKILL)
    failed = wait_until(lambda: (i := vm_info(cluster, "adopted")).state == S.VM_STATE_FAILED
                        and i, what="the VM to be FAILED")
    assert isinstance(failed, vm_pb2.GetVmInfoResponse)
    assert f"hypervisor process {pid} was killed by SIGKILL" in failed.state_reason
    assert not socket.exists(), f"the dead hypervisor's socket {socket} is left behind"
