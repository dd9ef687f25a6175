"""Crash at any step: the agent (and the controller) killed at each named failpoint of each
lifecycle operation, restarted, and the fleet checked once it has converged.

One VM per failpoint. All the agent's failpoints are armed at once, each for its own VM
(`name@vm_id`), so one restart serves the next case: a restarted agent carries the cases
still to come, not the ones that fired.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from tests.support import invariants
from tools.fleet.cluster import GIB, Cluster, Process, wait_until
from tools.guests.images import TinyGuest
from vmm import features
from vmm.common import failpoints
from vmm.v1 import vm_pb2

S = vm_pb2
HOST = "h1"


@dataclass
class Case:
    op: str
    point: str
    backend: str = features.FIRECRACKER
    outcome: list[object] = field(default_factory=list)

    @property
    def vm_id(self) -> str:
        return f"{self.op}-{self.point.removeprefix('agent.').replace('.', '-')}"


# Every agent failpoint at least once, and every operation with the points it passes.
AGENT_CASES = [
    Case("create", "agent.desired.saved"),
    Case("create", "agent.process.spawned"),
    Case("create", "agent.runtime.recorded"),
    Case("create", "agent.vm.created"),
    Case("boot", "agent.vm.booted"),
    Case("boot", "agent.status.saved"),
    Case("shutdown", "agent.vm.stopped"),
    Case("reboot", "agent.vm.rebooted"),
    Case("reboot", "agent.process.spawned"),
    Case("delete", "agent.vm.destroyed"),
    Case("delete", "agent.vm.removed"),
    Case("hot-add", "agent.vm.hotplugged", features.CLOUD_HYPERVISOR),
]

# The power state each operation asks for (None: the VM is gone).
TARGETS: dict[str, int | None] = {
    "create": S.VM_STATE_CREATED, "boot": S.VM_STATE_RUNNING, "shutdown": S.VM_STATE_SHUTDOWN,
    "reboot": S.VM_STATE_RUNNING, "delete": None, "hot-add": S.VM_STATE_RUNNING,
}


def spec(cases: list[Case]) -> str:
    return ";".join(f"{c.point}@{c.vm_id}=exit" for c in cases)


class Fleet:
    def __init__(self, cluster: Cluster, config: Callable[[str], vm_pb2.VmConfig],
                 disk: Path) -> None:
        self.cluster = cluster
        self.config = config
        self.disk = disk

    def request(self, case: Case) -> Callable[[], object]:
        """The case's call; the lifecycle calls carry an idempotency key, so that a retry
        after a crash gets the answer the first call would have given."""
        api, vm_id, key = self.cluster.vms, case.vm_id, f"{case.vm_id}-{case.op}"
        return {
            "create": lambda: api.CreateVm(vm_pb2.CreateVmRequest(
                vm_id=vm_id, config=self.config(case.backend), backend=case.backend,
                request_id=key)),
            "boot": lambda: api.BootVm(vm_pb2.BootVmRequest(vm_id=vm_id, request_id=key)),
            "shutdown": lambda: api.ShutdownVm(vm_pb2.ShutdownVmRequest(
                vm_id=vm_id, force=True, request_id=key)),
            "reboot": lambda: api.RebootVm(vm_pb2.RebootVmRequest(
                vm_id=vm_id, force=True, request_id=key)),
            "delete": lambda: api.DeleteVm(vm_pb2.DeleteVmRequest(
                vm_id=vm_id, force=True, request_id=key)),
            "hot-add": lambda: api.AttachDisk(vm_pb2.AttachDiskRequest(
                vm_id=vm_id, device=vm_pb2.StorageDevice(id="extra", path=str(self.disk)))),
        }[case.op]

    def prepare(self, case: Case) -> None:
        """Bring the case's VM to the state its operation starts from."""
        if case.op == "create":
            return
        self.cluster.vms.CreateVm(vm_pb2.CreateVmRequest(
            vm_id=case.vm_id, config=self.config(case.backend), backend=case.backend))
        if case.op != "boot":
            self.cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id=case.vm_id))


def call_in_background(case: Case, call: Callable[[], object]) -> threading.Thread:
    def run() -> None:
        try:
            case.outcome.append(call())
        except grpc.RpcError as err:
            case.outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def crash_sweep(cluster: Cluster, fleet: Fleet, cases: list[Case], backends: str) -> None:
    """Prepare every case's VM, then run each case's operation on an agent armed to crash
    in it; restart the agent after each crash; check the invariants at the end."""

    def start_agent(armed: list[Case]) -> Process:
        return cluster.add_agent(HOST, vcpus=64, memory=64 * GIB, backends=backends,
                                 env={failpoints.ENV: spec(armed)})

    agent = start_agent([])
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(fleet.prepare, cases))
    agent.signal(signal.SIGKILL)  # no cleanup: the VMs stay, as after any crash
    remaining = list(cases)
    agent = start_agent(remaining)
    for case in cases:
        thread = call_in_background(case, fleet.request(case))
        proc = agent.proc
        assert proc is not None
        wait_until(lambda p=proc: p.poll() is not None, timeout=60,  # type: ignore[misc]
                   what=f"the agent to crash at {case.point} during {case.op}")
        assert proc.returncode == failpoints.EXIT_STATUS, cluster.logs()
        remaining.remove(case)
        agent = start_agent(remaining)
        thread.join(60)
    gone = {c.vm_id for c in cases if TARGETS[c.op] is None}
    present = {c.vm_id for c in cases} - gone
    converged = invariants.converged([cluster.etcd.endpoint],
                                     {HOST: cluster.workdir / f"agent-{HOST}"},
                                     present=present, absent=gone, timeout=60)
    for case in cases:
        if case.vm_id in present:
            assert converged.records[case.vm_id].desired_state == TARGETS[case.op], case
        # Never OK with success=false: an answer is an error or a success.
        for outcome in case.outcome:
            if not isinstance(outcome, grpc.RpcError) and hasattr(outcome, "success"):
                assert outcome.success, (case, outcome)
    # Every VM the crashes left behind can still be driven: boot the created ones.
    for case in cases:
        if case.op == "create":
            booted = cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id=case.vm_id))
            assert booted.success and booted.state == S.VM_STATE_RUNNING, case


def test_agent_crash_at_every_failpoint_converges(
        tmp_path: Path, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster = Cluster(tmp_path, operation_timeout=20)
    disk = tmp_path / "extra.img"
    disk.write_bytes(b"\0" * 4096)
    configs = {features.FIRECRACKER: example("lambda-function"),
               features.CLOUD_HYPERVISOR: example("web-application")}
    try:
        cluster.start()
        crash_sweep(cluster, Fleet(cluster, configs.__getitem__, disk), AGENT_CASES,
                    "firecracker,cloud-hypervisor")
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


QEMU_CASES = [
    Case("create", "agent.process.spawned", features.QEMU),
    Case("create", "agent.runtime.recorded", features.QEMU),
    Case("create", "agent.vm.created", features.QEMU),
    Case("boot", "agent.vm.booted", features.QEMU),
]


@pytest.mark.qemu
def test_agent_crash_during_qemu_create_and_boot_converges(tiny: TinyGuest, kvm: None) -> None:
    # A short work dir: QMP sockets live under it, within the Unix socket path limit.
    workdir = Path(tempfile.mkdtemp(prefix="vmm-crash-"))
    cluster = Cluster(workdir, operation_timeout=30)
    config = vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=1), memory=vm_pb2.MemoryConfig(size_bytes=32 << 20),
        boot=vm_pb2.BootConfig(kernel_path=str(tiny.pvh32),
                               boot_options={"ready_marker": tiny.marker}))
    try:
        cluster.start()
        crash_sweep(cluster, Fleet(cluster, lambda _backend: config, workdir), QEMU_CASES,
                    "qemu")
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()
        shutil.rmtree(workdir, ignore_errors=True)


def test_every_failpoint_is_named_once_and_used() -> None:
    root = Path(__file__).resolve().parents[1]
    used: set[str] = set()
    for path in [*root.glob("agent/**/*.py"), *root.glob("controller/**/*.py")]:
        text = path.read_text()
        used |= {name for name in failpoints.POINTS if f'"{name}"' in text}
    points = [*failpoints.AGENT_POINTS, *failpoints.CONTROLLER_POINTS]
    assert len(points) == len(set(points))
    assert used == set(points)
    failpoints.arm("agent.vm.booted@x=sleep(0.01)")
    started = time.monotonic()
    failpoints.hit("agent.vm.booted", "y")
    failpoints.hit("agent.vm.booted", "x")
    assert time.monotonic() - started >= 0.01
    failpoints.arm("")
    with pytest.raises(failpoints.FailpointError):
        failpoints.parse("agent.vm.nosuch=exit")
    with pytest.raises(failpoints.FailpointError):
        failpoints.parse("agent.vm.booted=explode")


# ---- the controller ------------------------------------------------------------------------

CONTROLLER_CASES = [
    Case("create", "controller.create.committed"),
    Case("create", "controller.status.applied"),
    Case("boot", "controller.vm.mutated"),
    Case("boot", "controller.desired.pushed"),
    # The RPC's waiter is woken by the report, the write of it never made.
    Case("boot", "controller.status.noted"),
    Case("delete", "controller.vm.deleted"),
]


def test_controller_crash_at_every_failpoint_converges_and_retries_succeed(
        tmp_path: Path, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    """Each case's call crashes the controller at its point; the client retries the same
    call against the restarted controller, as a gRPC client does after UNAVAILABLE, and
    gets the answer the first call would have given."""
    cluster = Cluster(tmp_path, operation_timeout=20)
    config = example("lambda-function")
    fleet = Fleet(cluster, lambda _backend: config, tmp_path)
    remaining = list(CONTROLLER_CASES)

    def restart_controller() -> None:
        cluster.controller.env = {**cluster.env, failpoints.ENV: spec(remaining)}
        cluster.controller.start()
        assert cluster.channel is not None
        cluster.controller.wait_serving(cluster.channel)
        cluster.wait_host_ready(HOST, timeout=30)

    try:
        cluster.start()
        cluster.add_agent(HOST, extra=["--reconnect-backoff-max", "1"])
        for case in CONTROLLER_CASES:
            fleet.prepare(case)
        cluster.controller.stop()
        restart_controller()
        for case in CONTROLLER_CASES:
            call = fleet.request(case)
            try:
                first = call()
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, (case, err)
            else:  # answered before the crash (a report wakes the call before its write)
                assert getattr(first, "success", True), first
            proc = cluster.controller.proc
            assert proc is not None
            wait_until(lambda p=proc: p.poll() is not None, timeout=30,  # type: ignore[misc]
                       what=f"the controller to crash at {case.point}")
            assert proc.returncode == failpoints.EXIT_STATUS, cluster.logs()
            remaining.remove(case)
            restart_controller()
            # A deletion that finished before the crash answers its retry as done, not
            # NOT_FOUND: the deletion's pending mark says this call removed the VM.
            answer = call()
            assert getattr(answer, "success", True), answer
        gone = {c.vm_id for c in CONTROLLER_CASES if TARGETS[c.op] is None}
        invariants.converged(cluster.etcd_endpoints, {HOST: tmp_path / f"agent-{HOST}"},
                             present={c.vm_id for c in CONTROLLER_CASES} - gone, absent=gone)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()
