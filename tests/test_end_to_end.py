"""The whole system: real etcd, the controller and agents as separate processes, the
Firecracker runtime driving the API simulator (or a real binary, see test_real_binaries)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import psutil
import pytest
from google.protobuf import json_format

from agent.process import WAITER
from agent.vm_dir import VmDir
from tools.fleet.cluster import GIB, Cluster, wait_until
from vmm.v1 import host_pb2, vm_pb2

S = vm_pb2


def info(cluster: Cluster, vm_id: str) -> vm_pb2.GetVmInfoResponse:
    return cluster.vms.GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id=vm_id))


def vm_dir(cluster: Cluster, host_id: str, vm_id: str) -> Path:
    return cluster.workdir / f"agent-{host_id}" / "vms" / vm_id


def api_calls(cluster: Cluster, host_id: str, vm_id: str) -> list[str]:
    """The API requests the hypervisor logged, e.g. 'Put /actions InstanceStart'."""
    log = vm_dir(cluster, host_id, vm_id) / "hypervisor.log"
    calls = []
    for line in log.read_text(errors="replace").splitlines():
        if "The API server received a" in line:
            calls.append(line.split("The API server received a ", 1)[1])
    return calls


def hypervisor_pid(cluster: Cluster, vm_id: str) -> int:
    return int(info(cluster, vm_id).backend_info["pid"])


def test_lifecycle_reaches_every_state_and_drives_the_hypervisor_api(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster.add_agent("h1")
    created = cluster.vms.CreateVm(vm_pb2.CreateVmRequest(
        vm_id="fn-1", config=example("lambda-function")))
    assert created.state == S.VM_STATE_CREATED
    assert created.placement.host_id == "h1"
    assert created.placement.backend == "firecracker"

    assert cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="fn-1")).state == S.VM_STATE_RUNNING
    console = vm_dir(cluster, "h1", "fn-1") / "console.log"
    assert "init=/lambda/init" in console.read_text()
    assert cluster.vms.PauseVm(vm_pb2.PauseVmRequest(vm_id="fn-1")).state == S.VM_STATE_PAUSED
    assert cluster.vms.ResumeVm(vm_pb2.ResumeVmRequest(vm_id="fn-1")).state == S.VM_STATE_RUNNING
    calls = " | ".join(api_calls(cluster, "h1", "fn-1"))
    for expected in ("/machine-config", "/boot-source", "/drives/rootfs", "InstanceStart",
                     "Paused", "Resumed"):
        assert expected in calls

    pid_before = hypervisor_pid(cluster, "fn-1")
    rebooted = cluster.vms.RebootVm(vm_pb2.RebootVmRequest(vm_id="fn-1"))
    assert rebooted.state == S.VM_STATE_RUNNING
    # Firecracker cannot reboot in place: Ctrl+Alt+Del ends the process, a new one boots.
    assert hypervisor_pid(cluster, "fn-1") != pid_before
    assert not psutil.pid_exists(pid_before) or \
        psutil.Process(pid_before).status() == psutil.STATUS_ZOMBIE

    down = cluster.vms.ShutdownVm(vm_pb2.ShutdownVmRequest(vm_id="fn-1", timeout_seconds=5))
    assert down.state == S.VM_STATE_SHUTDOWN
    assert "SendCtrlAltDel" in " | ".join(api_calls(cluster, "h1", "fn-1"))
    assert cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="fn-1")).state == S.VM_STATE_RUNNING

    with pytest.raises(grpc.RpcError) as refused:
        cluster.vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id="fn-1"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "RUNNING" in refused.value.details()
    pid = hypervisor_pid(cluster, "fn-1")
    assert cluster.vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id="fn-1", force=True)).success
    assert not vm_dir(cluster, "h1", "fn-1").exists()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(grpc.RpcError) as gone:
        info(cluster, "fn-1")
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


SPEC_EXAMPLES = ("production-workload", "serverless-function", "web-application",
                 "lambda-function", "database-server", "ci-runner")


def test_every_spec_example_reaches_running(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster.add_agent("big", vcpus=128, memory=256 * GIB,
                      backends="firecracker,cloud-hypervisor")
    for name in SPEC_EXAMPLES:
        created = cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id=name, config=example(name)))
        assert created.state == S.VM_STATE_CREATED, name
        booted = cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id=name))
        assert booted.state == S.VM_STATE_RUNNING, name
    placed = {v.vm_id: v.placement.backend
              for v in cluster.vms.ListVms(vm_pb2.ListVmsRequest()).vms}
    # 64 GiB is beyond Firecracker's 32 GiB; max_vcpu_count asks for hotplug.
    assert placed["database-server"] == "cloud-hypervisor"
    assert placed["production-workload"] == "cloud-hypervisor"
    assert placed["lambda-function"] == "firecracker"


def test_wrong_state_calls_name_the_current_state(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster.add_agent("h1")
    cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="ws", config=example("lambda-function")))
    with pytest.raises(grpc.RpcError) as err:
        cluster.vms.PauseVm(vm_pb2.PauseVmRequest(vm_id="ws"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "CREATED" in err.value.details()
    cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="ws"))
    cluster.vms.ShutdownVm(vm_pb2.ShutdownVmRequest(vm_id="ws", force=True))
    with pytest.raises(grpc.RpcError) as err:
        cluster.vms.PauseVm(vm_pb2.PauseVmRequest(vm_id="ws"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "SHUTDOWN" in err.value.details()
    assert info(cluster, "ws").state == S.VM_STATE_SHUTDOWN


def test_placement_packs_the_fullest_host_that_fits(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster.add_agent("h1", vcpus=4, memory=4 * GIB)
    cluster.add_agent("h2", vcpus=4, memory=4 * GIB)
    config = example("ci-runner")  # 2 vCPUs, 2 GiB
    config.memory.size_bytes = 1 * GIB
    first = cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="a", config=config))
    second = cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="b", config=config))
    third = cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="c", config=config))
    assert first.placement.host_id == second.placement.host_id
    assert third.placement.host_id != first.placement.host_id
    host = cluster.hosts.GetHost(host_pb2.GetHostRequest(host_id=first.placement.host_id)).host
    assert host.allocated.vcpus == 4 and host.vm_count == 2

    with pytest.raises(grpc.RpcError) as full:
        big = vm_pb2.VmConfig()
        big.CopyFrom(config)
        big.cpu.vcpu_count = 4
        cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="d", config=big))
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4 vCPUs" in full.value.details() and "2 vCPUs" in full.value.details()
    listed = cluster.vms.ListVms(vm_pb2.ListVmsRequest())
    assert sorted(v.vm_id for v in listed.vms) == ["a", "b", "c"]


def test_restarted_agent_adopts_running_vms_without_reboot(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    agent = cluster.add_agent("h1")
    for vm_id in ("x1", "x2"):
        cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id=vm_id, config=example("ci-runner")))
        cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id=vm_id))
    cluster.vms.PauseVm(vm_pb2.PauseVmRequest(vm_id="x2"))
    pids = {vm_id: hypervisor_pid(cluster, vm_id) for vm_id in ("x1", "x2")}
    boots = {vm_id: (vm_dir(cluster, "h1", vm_id) / "console.log").read_text().count("GUEST-READY")
             for vm_id in pids}

    agent.signal(signal.SIGKILL)
    wait_until(lambda: info(cluster, "x1").state == S.VM_STATE_UNKNOWN, what="host down")
    assert all(psutil.pid_exists(pid) for pid in pids.values())
    agent.start()
    cluster.wait_host_ready("h1")

    assert info(cluster, "x1").state == S.VM_STATE_RUNNING
    assert info(cluster, "x2").state == S.VM_STATE_PAUSED
    for vm_id, pid in pids.items():
        assert hypervisor_pid(cluster, vm_id) == pid
        console = (vm_dir(cluster, "h1", vm_id) / "console.log").read_text()
        assert console.count("GUEST-READY") == boots[vm_id]
        api_socket = str(VmDir(vm_dir(cluster, "h1", vm_id)).api_socket)
        # The hypervisor, not the waiter that is its parent (agent/waiter.py).
        serving = [p for p in psutil.process_iter(["cmdline"])
                   if api_socket in (p.info["cmdline"] or [])
                   and WAITER not in p.info["cmdline"]]
        assert len(serving) == 1, f"{vm_id} has {len(serving)} hypervisor processes"
    # The adopted VMs are still driven: resume goes through.
    assert cluster.vms.ResumeVm(vm_pb2.ResumeVmRequest(vm_id="x2")).state == S.VM_STATE_RUNNING


def test_agent_removes_vms_nobody_wants_after_restart(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    agent = cluster.add_agent("h1")
    cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="gone", config=example("ci-runner")))
    cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="gone"))
    pid = hypervisor_pid(cluster, "gone")
    agent.signal(signal.SIGKILL)
    wait_until(lambda: info(cluster, "gone").state == S.VM_STATE_UNKNOWN, what="host down")
    # Deleted while its agent is away: forgotten now, removed when the agent returns.
    cluster.vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id="gone", force=True))
    agent.start()
    cluster.wait_host_ready("h1")
    wait_until(lambda: not vm_dir(cluster, "h1", "gone").exists(), what="vm dir removed")
    wait_until(lambda: not psutil.pid_exists(pid)
               or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, what="process gone")


def test_killed_hypervisor_is_reported_with_the_reason(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster.add_agent("h1")
    cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="crash", config=example("ci-runner")))
    cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="crash"))
    os.kill(hypervisor_pid(cluster, "crash"), signal.SIGKILL)
    wait_until(lambda: info(cluster, "crash").state == S.VM_STATE_FAILED, what="FAILED state")
    reason = info(cluster, "crash").state_reason
    assert "SIGKILL" in reason
    # Booting again starts a fresh hypervisor.
    assert cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="crash")).state == S.VM_STATE_RUNNING


def test_controller_restart_loses_nothing(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster.add_agent("h1")
    cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="keep-1", config=example("ci-runner")))
    cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="keep-2", config=example("ci-runner")))
    cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="keep-2"))
    cluster.restart_controller()
    cluster.wait_host_ready("h1")
    states = {v.vm_id: v.state for v in cluster.vms.ListVms(vm_pb2.ListVmsRequest()).vms}
    assert states == {"keep-1": S.VM_STATE_CREATED, "keep-2": S.VM_STATE_RUNNING}
    assert cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="keep-1")).state == S.VM_STATE_RUNNING


def test_watch_streams_existing_vms_then_changes(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster.add_agent("h1")
    cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="w1", config=example("ci-runner")))
    stream = cluster.vms.WatchVms(vm_pb2.WatchVmsRequest(vm_ids=["w1"]), timeout=30)
    first = next(stream)
    assert first.type == vm_pb2.VM_EVENT_TYPE_EXISTING and first.vm.vm_id == "w1"
    cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="w1"))
    for event in stream:
        if event.vm.state == S.VM_STATE_RUNNING:
            assert event.type == vm_pb2.VM_EVENT_TYPE_UPDATED
            break
    stream.cancel()


def test_watch_announces_a_new_vm_with_its_first_state_and_each_change_once(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster.add_agent("h1")
    stream = cluster.vms.WatchVms(vm_pb2.WatchVmsRequest(), timeout=60)
    cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="w2", config=example("ci-runner")))
    cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="w2"))
    cluster.vms.PauseVm(vm_pb2.PauseVmRequest(vm_id="w2"))
    cluster.vms.ResumeVm(vm_pb2.ResumeVmRequest(vm_id="w2"))
    cluster.vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id="w2", force=True))
    events = []
    for event in stream:
        events.append((vm_pb2.VmEventType.Name(event.type), vm_pb2.VmState.Name(event.vm.state)))
        if event.type == vm_pb2.VM_EVENT_TYPE_DELETED:
            break
    stream.cancel()
    assert events == [("VM_EVENT_TYPE_CREATED", "VM_STATE_CREATED"),
                      ("VM_EVENT_TYPE_UPDATED", "VM_STATE_RUNNING"),
                      ("VM_EVENT_TYPE_UPDATED", "VM_STATE_PAUSED"),
                      ("VM_EVENT_TYPE_UPDATED", "VM_STATE_RUNNING"),
                      ("VM_EVENT_TYPE_DELETED", "VM_STATE_RUNNING")]


def test_generated_ids_are_unique_and_caller_ids_are_honoured(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster.add_agent("h1", vcpus=64, memory=64 * GIB)
    ids = {cluster.vms.CreateVm(vm_pb2.CreateVmRequest(config=example("ci-runner"))).vm_id
           for _ in range(5)}
    assert len(ids) == 5
    named = cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="mine",
                                                        config=example("ci-runner")))
    assert named.vm_id == "mine"
    # Paging: pages of two, following next_page_token, give every VM exactly once.
    seen: list[str] = []
    token = ""
    while True:
        page = cluster.vms.ListVms(vm_pb2.ListVmsRequest(page_size=2, page_token=token))
        assert page.total_count == 6 and len(page.vms) <= 2
        seen += [v.vm_id for v in page.vms]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted([*ids, "mine"])
    running = cluster.vms.ListVms(vm_pb2.ListVmsRequest(state_filter=[S.VM_STATE_RUNNING]))
    assert running.total_count == 0
    with pytest.raises(grpc.RpcError) as err:
        cluster.vms.ListVms(vm_pb2.ListVmsRequest(page_token="not-a-token!"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_silent_agent_is_degraded_and_gets_no_new_vms(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster.restart_controller_with(["--heartbeat-timeout", "2"])
    agent = cluster.add_agent("h1")
    agent.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: cluster.hosts.GetHost(host_pb2.GetHostRequest(host_id="h1")).host
                   .health == host_pb2.HOST_HEALTH_DEGRADED, what="DEGRADED")
        with pytest.raises(grpc.RpcError) as err:
            cluster.vms.CreateVm(vm_pb2.CreateVmRequest(config=example("ci-runner")))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        agent.signal(signal.SIGCONT)
    cluster.wait_host_ready("h1")
    created = cluster.vms.CreateVm(vm_pb2.CreateVmRequest(config=example("ci-runner")))
    assert created.placement.host_id == "h1"


def test_vmmctl_drives_the_real_controller(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig], tmp_path: Path) -> None:
    cluster.add_agent("h1")
    spec = tmp_path / "vm.json"
    spec.write_text(json.dumps({"config": json_format.MessageToDict(
        example("lambda-function"), preserving_proto_field_name=True)}))

    def vmmctl(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "tools.vmmctl", "--server",
                               cluster.address, *args], capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    vmmctl("create", "-f", str(spec), "--id", "cli-vm")
    vmmctl("boot", "cli-vm")
    listed = json.loads(vmmctl("-o", "json", "list"))
    assert [(v["vm_id"], v["state"]) for v in listed["vms"]] == [("cli-vm", "VM_STATE_RUNNING")]
    assert "GUEST-READY" in vmmctl("console", "cli-vm")
    vmmctl("delete", "cli-vm", "--force")
    assert json.loads(vmmctl("-o", "json", "list"))["total_count"] == 0
