"""vmmctl against a real gRPC server on a loopback port.

The server here is a small in-memory stand-in for the controller: it records
the requests it gets and answers from fixed data, so each test can check both
what the CLI sent over the wire and what it printed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from typer.testing import CliRunner, Result

from tools.vmmctl import cli as vmmctl
from tools.vmmctl.inputs import parse_memory_size
from vmm.v1 import host_pb2, host_pb2_grpc, vm_pb2, vm_pb2_grpc

# The spec's "Lambda Function (Firecracker)" example, verbatim.
LAMBDA_EXAMPLE = """
{
  "config": {
    "cpu": {"vcpu_count": 1},
    "memory": {"size_bytes": 268435456},
    "boot": {
      "kernel_path": "/opt/kernels/lambda",
      "kernel_args": "console=ttyS0 init=/lambda/init quiet"
    },
    "storage": [{
      "path": "/var/lib/lambda/nodejs-runtime.ext4",
      "read_only": true,
      "is_root_device": true
    }]
  }
}
"""

LAMBDA_CONFIG = vm_pb2.VmConfig(
    cpu=vm_pb2.CpuConfig(vcpu_count=1),
    memory=vm_pb2.MemoryConfig(size_bytes=268435456),
    boot=vm_pb2.BootConfig(kernel_path="/opt/kernels/lambda",
                           kernel_args="console=ttyS0 init=/lambda/init quiet"),
    storage=[vm_pb2.StorageDevice(path="/var/lib/lambda/nodejs-runtime.ext4", read_only=True,
                                  is_root_device=True)],
)

# vm-1 as GetVmInfo shows it: a NIC on a fleet network, and what its host made of it.
RUNNING_CONFIG = vm_pb2.VmConfig()
RUNNING_CONFIG.CopyFrom(LAMBDA_CONFIG)
RUNNING_CONFIG.network.add(id="eth0", network="web", bridge="br-web",
                           ip_address="10.20.0.7/24", gateway="10.20.0.1")
RUNNING_NICS = [vm_pb2.NetworkInterfaceStatus(
    id="eth0", network="web", bridge="br-web", tap_device="vmm0a1b2c3d4e5f",
    mac_address="02:5e:11:22:33:44", ip_address="10.20.0.7/24", managed=True)]

FIRECRACKER_VCPU_LIMIT = 32
PAGE_SIZE_DEFAULT = 2
CONSOLE_CHUNKS = (b"booting\r\n", b"\x1b[1mready\x1b[0m\n", b"\xff\xfe raw\n")


def _vm(vm_id: str, state: vm_pb2.VmState, host: str = "host-a") -> vm_pb2.VmInfo:
    return vm_pb2.VmInfo(
        vm_id=vm_id, state=state, vcpu_count=2, memory_size_bytes=268435456,
        created_timestamp=1_700_000_000,
        placement=vm_pb2.Placement(host_id=host, backend="firecracker", simulated=True))


FLEET = [
    _vm("vm-1", vm_pb2.VM_STATE_RUNNING),
    _vm("vm-2", vm_pb2.VM_STATE_PAUSED),
    _vm("vm-3", vm_pb2.VM_STATE_RUNNING, host="host-b"),
    _vm("vm-4", vm_pb2.VM_STATE_FAILED),
    _vm("vm-5", vm_pb2.VM_STATE_CREATED),
]


class FakeVmService(vm_pb2_grpc.VmServiceServicer):
    """Answers from FLEET; every request lands in `requests`, with its metadata."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.metadata: list[dict[str, str]] = []
        self.follow_cancelled = threading.Event()
        self._lock = threading.Lock()

    def _record(self, request: Any, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.requests.append(request)
            self.metadata.append({k: v for k, v in context.invocation_metadata()
                                  if isinstance(v, str)})

    def of_type(self, kind: type) -> list[Any]:
        with self._lock:
            return [r for r in self.requests if isinstance(r, kind)]

    def CreateVm(self, request: vm_pb2.CreateVmRequest,
                 context: grpc.ServicerContext) -> vm_pb2.CreateVmResponse:
        self._record(request, context)
        if request.config.cpu.vcpu_count > FIRECRACKER_VCPU_LIMIT:
            violation = error_details_pb2.BadRequest.FieldViolation(
                field="config.cpu.vcpu_count",
                description=f"{request.config.cpu.vcpu_count} vCPUs exceeds firecracker's "
                            f"limit of {FIRECRACKER_VCPU_LIMIT}")
            detail = any_pb2.Any()
            detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
            context.abort_with_status(rpc_status.to_status(status_pb2.Status(
                code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                message="the request does not fit the backend", details=[detail])))
        warnings = []
        if request.config.cpu.max_vcpu_count:
            warnings.append("config.cpu.max_vcpu_count is ignored by firecracker")
        return vm_pb2.CreateVmResponse(
            vm_id=request.vm_id or "vm-generated", state=vm_pb2.VM_STATE_CREATED,
            warnings=warnings,
            placement=vm_pb2.Placement(host_id=request.host_id or "host-a",
                                       backend=request.backend or "firecracker"))

    def GetVmInfo(self, request: vm_pb2.GetVmInfoRequest,
                  context: grpc.ServicerContext) -> vm_pb2.GetVmInfoResponse:
        self._record(request, context)
        if request.vm_id == "etcd-down":
            context.abort(grpc.StatusCode.UNAVAILABLE, "the store is unreachable")
        if request.vm_id == "crashy":
            return vm_pb2.GetVmInfoResponse(
                vm_id="crashy", state=vm_pb2.VM_STATE_FAILED, state_reason="guest kernel panic",
                config=vm_pb2.VmConfig(restart_policy=vm_pb2.RestartPolicy(
                    mode=vm_pb2.RESTART_MODE_ON_FAILURE, attempts=3, interval_seconds=600)),
                restart=vm_pb2.RestartStatus(attempts=1, next_restart_timestamp=1767225602,
                                             backoff_seconds=2))
        if request.vm_id != "vm-1":
            context.abort(grpc.StatusCode.NOT_FOUND, f"vm {request.vm_id!r} not found")
        return vm_pb2.GetVmInfoResponse(
            vm_id="vm-1", config=RUNNING_CONFIG, state=vm_pb2.VM_STATE_RUNNING,
            network_interfaces=RUNNING_NICS,
            desired_state=vm_pb2.VM_STATE_RUNNING, state_reason="booted",
            placement=FLEET[0].placement, generation=3, observed_generation=3,
            created_timestamp=1_700_000_000,
            metrics=vm_pb2.VmMetrics(cpu_usage_percent=12.5, memory_usage_bytes=104857600,
                                     uptime_seconds=42),
            backend_info={"api_socket": "/run/vmm/vm-1/api.sock"})

    def ListVms(self, request: vm_pb2.ListVmsRequest,
                context: grpc.ServicerContext) -> vm_pb2.ListVmsResponse:
        self._record(request, context)
        matching = [vm for vm in FLEET
                    if not request.state_filter or vm.state in request.state_filter]
        start = int(request.page_token or 0)
        end = start + (request.page_size or PAGE_SIZE_DEFAULT)
        return vm_pb2.ListVmsResponse(
            vms=matching[start:end], total_count=len(matching),
            next_page_token=str(end) if end < len(matching) else "")

    def _action(self, request: Any, context: grpc.ServicerContext) -> dict[str, Any]:
        self._record(request, context)
        return {"success": True, "state": vm_pb2.VM_STATE_RUNNING}

    def BootVm(self, request: Any, context: grpc.ServicerContext) -> vm_pb2.BootVmResponse:
        return vm_pb2.BootVmResponse(**self._action(request, context))

    def ShutdownVm(self, request: Any, context: grpc.ServicerContext) -> vm_pb2.ShutdownVmResponse:
        self._record(request, context)
        return vm_pb2.ShutdownVmResponse(success=True, state=vm_pb2.VM_STATE_SHUTDOWN)

    def DeleteVm(self, request: Any, context: grpc.ServicerContext) -> vm_pb2.DeleteVmResponse:
        self._record(request, context)
        # A controller answering without success and without an error status.
        return vm_pb2.DeleteVmResponse(success=request.vm_id != "stuck")

    def ResizeVm(self, request: vm_pb2.ResizeVmRequest,
                 context: grpc.ServicerContext) -> vm_pb2.ResizeVmResponse:
        self._record(request, context)
        return vm_pb2.ResizeVmResponse(success=True, state=vm_pb2.VM_STATE_RUNNING,
                                       vcpu_count=request.vcpu_count or 2,
                                       memory_size_bytes=request.memory_size_bytes or 268435456)

    def AttachDisk(self, request: Any, context: grpc.ServicerContext) -> vm_pb2.AttachDiskResponse:
        return vm_pb2.AttachDiskResponse(**self._action(request, context))

    def WatchVms(self, request: vm_pb2.WatchVmsRequest,
                 context: grpc.ServicerContext) -> Iterator[vm_pb2.WatchVmsResponse]:
        self._record(request, context)
        yield vm_pb2.WatchVmsResponse(type=vm_pb2.VM_EVENT_TYPE_EXISTING, vm=FLEET[0], revision=7)
        if list(request.vm_ids) == ["follow"]:  # a watch that only ends when the client leaves
            while context.is_active():
                threading.Event().wait(0.05)
            self.follow_cancelled.set()
            return
        paused = vm_pb2.VmInfo()
        paused.CopyFrom(FLEET[0])
        paused.state = vm_pb2.VM_STATE_PAUSED
        yield vm_pb2.WatchVmsResponse(type=vm_pb2.VM_EVENT_TYPE_UPDATED, vm=paused, revision=8)
        yield vm_pb2.WatchVmsResponse(type=vm_pb2.VM_EVENT_TYPE_DELETED, vm=paused, revision=9)

    def GetConsoleLog(self, request: vm_pb2.GetConsoleLogRequest,
                      context: grpc.ServicerContext) -> vm_pb2.GetConsoleLogResponse:
        self._record(request, context)
        return vm_pb2.GetConsoleLogResponse(text="line 9\nline 10\n", truncated=True)

    def StreamConsole(self, request: vm_pb2.StreamConsoleRequest,
                      context: grpc.ServicerContext) -> Iterator[vm_pb2.StreamConsoleResponse]:
        self._record(request, context)
        for chunk in CONSOLE_CHUNKS:
            yield vm_pb2.StreamConsoleResponse(data=chunk)


def _capabilities(backend: str) -> host_pb2.BackendCapabilities:
    firecracker = backend == "firecracker"
    return host_pb2.BackendCapabilities(
        backend=backend,
        limits=host_pb2.BackendLimits(min_vcpus=1, max_vcpus=32 if firecracker else 448,
                                      min_memory_bytes=128 << 20,
                                      # qemu declares no upper bound
                                      max_memory_bytes=32 << 30 if firecracker else 0),
        features=[
            host_pb2.Feature(name="vm.shutdown", category="Core VM Operations",
                             title="VM Shutdown",
                             support=host_pb2.SUPPORT_PARTIAL if firecracker
                             else host_pb2.SUPPORT_FULL,
                             detail="force only" if firecracker else "graceful"),
            host_pb2.Feature(name="cpu.vcpu_count", category="CPU", title="vCPU Count",
                             support=host_pb2.SUPPORT_FULL,
                             detail="1-32 vCPUs" if firecracker else "1-448 vCPUs"),
            host_pb2.Feature(name="cpu.max_vcpu_count", category="CPU", title="max_vcpu_count",
                             support=host_pb2.SUPPORT_IGNORED if firecracker
                             else host_pb2.SUPPORT_FULL,
                             detail="ignored - no hotplug support" if firecracker else ""),
            host_pb2.Feature(name="cpu.hotplug", category="CPU", title="CPU Hotplug",
                             support=host_pb2.SUPPORT_NONE if firecracker
                             else host_pb2.SUPPORT_FULL),
        ])


HOST_A = host_pb2.Host(
    host_id="host-a", hostname="node-a", health=host_pb2.HOST_HEALTH_READY,
    capacity=host_pb2.Resources(vcpus=8, memory_bytes=16 << 30),
    allocatable=host_pb2.Resources(vcpus=32, memory_bytes=24 << 30),
    allocated=host_pb2.Resources(vcpus=6, memory_bytes=1536 << 20),
    cpu_overcommit_ratio=4.0, memory_overcommit_ratio=1.5, vm_count=3,
    backends=[host_pb2.Backend(name="firecracker", simulated=True, version="1.14.2",
                               capabilities=_capabilities("firecracker")),
              host_pb2.Backend(name="qemu", version="8.2.2", capabilities=_capabilities("qemu"))])


class FakeHostService(host_pb2_grpc.HostServiceServicer):
    def ListHosts(self, request: Any, context: grpc.ServicerContext) -> host_pb2.ListHostsResponse:
        return host_pb2.ListHostsResponse(hosts=[HOST_A])

    def GetHost(self, request: host_pb2.GetHostRequest,
                context: grpc.ServicerContext) -> host_pb2.GetHostResponse:
        if request.host_id != HOST_A.host_id:
            context.abort(grpc.StatusCode.NOT_FOUND, f"host {request.host_id!r} not found")
        return host_pb2.GetHostResponse(host=HOST_A)

    def GetBackendCapabilities(
        self, request: host_pb2.GetBackendCapabilitiesRequest, context: grpc.ServicerContext,
    ) -> host_pb2.GetBackendCapabilitiesResponse:
        names = [request.backend] if request.backend else ["firecracker", "qemu"]
        return host_pb2.GetBackendCapabilitiesResponse(
            backends=[_capabilities(name) for name in names])


@pytest.fixture(scope="module")
def controller() -> Iterator[tuple[str, FakeVmService]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    vms = FakeVmService()
    vm_pb2_grpc.add_VmServiceServicer_to_server(vms, server)
    host_pb2_grpc.add_HostServiceServicer_to_server(FakeHostService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", vms
    finally:
        server.stop(grace=None)


@pytest.fixture
def server(controller: tuple[str, FakeVmService]) -> str:
    return controller[0]


@pytest.fixture
def fake(controller: tuple[str, FakeVmService]) -> FakeVmService:
    controller[1].requests.clear()
    controller[1].metadata.clear()
    return controller[1]


def run(server: str, *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(vmmctl.app, ["--server", server, *args], input=stdin,
                              env={"VMM_TOKEN": None, "VMM_CA_CERT": None})


def _keys(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keys(item)


# ---------------------------------------------------------------- create


def test_create_sends_the_spec_lambda_example_exactly(
    server: str, fake: FakeVmService, tmp_path: Path,
) -> None:
    config_file = tmp_path / "lambda.json"
    config_file.write_text(LAMBDA_EXAMPLE)

    result = run(server, "create", "-f", str(config_file), "--id", "fn-1",
                 "--backend", "firecracker", "--host", "host-b")

    assert result.exit_code == 0, result.output
    [request] = fake.of_type(vm_pb2.CreateVmRequest)
    assert request == vm_pb2.CreateVmRequest(vm_id="fn-1", config=LAMBDA_CONFIG,
                                             backend="firecracker", host_id="host-b")
    assert "fn-1" in result.stdout
    assert "CREATED" in result.stdout
    assert "firecracker on host-b" in result.stdout


def test_create_reads_a_bare_vm_config_from_stdin(server: str, fake: FakeVmService) -> None:
    bare = json.dumps(json.loads(LAMBDA_EXAMPLE)["config"])

    result = run(server, "-o", "json", "create", "-f", "-", stdin=bare)

    assert result.exit_code == 0, result.output
    [request] = fake.of_type(vm_pb2.CreateVmRequest)
    assert request.config == LAMBDA_CONFIG
    assert request.vm_id == ""
    assert json.loads(result.stdout)["vm_id"] == "vm-generated"


def test_create_names_an_unknown_field_and_the_file_and_sends_nothing(
    server: str, fake: FakeVmService, tmp_path: Path,
) -> None:
    config_file = tmp_path / "typo.json"
    config_file.write_text('{"config": {"cpu": {"vcpu_count": 1}, '
                           '"storage": [{"path": "/a"}, {"path": "/b", "readonly": true}]}}')

    result = run(server, "create", "-f", str(config_file))

    assert result.exit_code == vmmctl.EXIT_USAGE
    assert "typo.json" in result.stderr
    assert "config.storage[1].readonly" in result.stderr
    assert "read_only" in result.stderr  # the valid names are listed
    assert fake.of_type(vm_pb2.CreateVmRequest) == []


def test_create_reports_a_field_of_the_wrong_type(server: str, fake: FakeVmService) -> None:
    result = run(server, "create", "-f", "-", stdin='{"config": {"cpu": {"vcpu_count": "two"}}}')

    assert result.exit_code == vmmctl.EXIT_USAGE
    assert "config.cpu.vcpu_count" in result.stderr
    assert fake.of_type(vm_pb2.CreateVmRequest) == []


def test_create_rejects_a_file_that_is_not_json(server: str, tmp_path: Path) -> None:
    config_file = tmp_path / "broken.json"
    config_file.write_text('{"config": {"cpu": }')

    result = run(server, "create", "-f", str(config_file))

    assert result.exit_code == vmmctl.EXIT_USAGE
    assert "broken.json: not valid JSON" in result.stderr


def test_create_prints_warnings_on_stderr_only(server: str, fake: FakeVmService) -> None:
    config = {"config": {"cpu": {"vcpu_count": 1, "max_vcpu_count": 4}}}

    result = run(server, "-o", "json", "create", "-f", "-", stdin=json.dumps(config))

    assert result.exit_code == 0, result.output
    assert "warning: config.cpu.max_vcpu_count is ignored by firecracker" in result.stderr
    response = json.loads(result.stdout)  # stdout stays pure JSON
    assert response["warnings"] == ["config.cpu.max_vcpu_count is ignored by firecracker"]


# ---------------------------------------------------------------- errors


def test_invalid_argument_prints_each_field_violation_and_exits_1(
    server: str, fake: FakeVmService,
) -> None:
    config = {"config": {"cpu": {"vcpu_count": 64}}}

    result = run(server, "create", "-f", "-", "--backend", "firecracker",
                 stdin=json.dumps(config))

    assert result.exit_code == vmmctl.EXIT_SERVER_ERROR
    assert "INVALID_ARGUMENT" in result.stderr
    assert "the request does not fit the backend" in result.stderr
    assert "config.cpu.vcpu_count: 64 vCPUs exceeds firecracker's limit of 32" in result.stderr
    assert result.stdout == ""


def test_not_found_exits_1_with_the_servers_message(server: str, fake: FakeVmService) -> None:
    result = run(server, "get", "vm-404")

    assert result.exit_code == vmmctl.EXIT_SERVER_ERROR
    assert "NOT_FOUND: vm 'vm-404' not found" in result.stderr


def test_unavailable_from_a_reachable_server_is_a_server_error(
    server: str, fake: FakeVmService,
) -> None:
    result = run(server, "get", "etcd-down")

    assert result.exit_code == vmmctl.EXIT_SERVER_ERROR
    assert "UNAVAILABLE: the store is unreachable" in result.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_server_exits_3() -> None:
    address = f"127.0.0.1:{_closed_port()}"

    result = run(address, "list")

    assert result.exit_code == vmmctl.EXIT_UNREACHABLE
    assert f"cannot reach the controller at {address}" in result.stderr


def test_unreachable_server_exits_3_for_a_stream_too() -> None:
    result = run(f"127.0.0.1:{_closed_port()}", "watch")

    assert result.exit_code == vmmctl.EXIT_UNREACHABLE


def test_success_false_without_a_status_is_still_a_failure(
    server: str, fake: FakeVmService,
) -> None:
    result = run(server, "delete", "stuck")

    assert result.exit_code == vmmctl.EXIT_SERVER_ERROR
    assert "without success" in result.stderr


# ---------------------------------------------------------------- output


def test_json_output_uses_the_proto_field_names(server: str, fake: FakeVmService) -> None:
    result = run(server, "-o", "json", "get", "vm-1")

    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["vm_id"] == "vm-1"
    assert info["state"] == "VM_STATE_RUNNING"
    assert info["placement"] == {"host_id": "host-a", "backend": "firecracker",
                                 "simulated": True}
    assert int(info["config"]["memory"]["size_bytes"]) == 268435456
    assert info["config"]["storage"][0]["is_root_device"] is True
    assert info["backend_info"] == {"api_socket": "/run/vmm/vm-1/api.sock"}
    camel = [k for k in _keys(info) if k != k.lower() and k not in ("api_socket",)]
    assert camel == []


@pytest.mark.parametrize("args", [("list", "-o", "json"), ("list", "--output=json"),
                                  ("list", "--all", "-ojson")])
def test_output_option_is_accepted_after_the_command(
        server: str, fake: FakeVmService, args: tuple[str, ...]) -> None:
    result = run(server, *args)

    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [vm["vm_id"] for vm in listed["vms"]][:1] == [FLEET[0].vm_id]


def test_get_shows_the_restart_policys_count_and_next_restart(
        server: str, fake: FakeVmService) -> None:
    result = run(server, "get", "crashy")

    assert result.exit_code == 0, result.output
    assert "1 of 3 within 600s (on failure), next at 2026-01-01 00:00:02 UTC (backoff 2s)" \
        in " ".join(result.stdout.split())


def test_get_table_shows_reason_placement_metrics_and_backend_info(
    server: str, fake: FakeVmService,
) -> None:
    result = run(server, "get", "vm-1")

    assert result.exit_code == 0, result.output
    for expected in ("RUNNING", "booted", "firecracker on host-a (simulated)", "256MiB",
                     "/var/lib/lambda/nodejs-runtime.ext4", "12.5%", "100MiB",
                     "/run/vmm/vm-1/api.sock"):
        assert expected in result.stdout
    nic_row = next(line for line in result.stdout.splitlines() if line.startswith("eth0"))
    assert nic_row.split() == ["eth0", "web", "10.20.0.7/24", "vmm0a1b2c3d4e5f",
                               "02:5e:11:22:33:44", "-"]


def test_list_table_shows_human_sizes(server: str, fake: FakeVmService) -> None:
    result = run(server, "list", "--page-size", "10")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATE", "BACKEND", "HOST", "VCPUS", "MEMORY", "AGE"]
    assert lines[1].split()[:5] == ["vm-1", "RUNNING", "firecracker", "(simulated)", "host-a"]
    assert "256MiB" in lines[1]
    assert len(lines) == 1 + len(FLEET)


def test_list_all_follows_page_tokens(server: str, fake: FakeVmService) -> None:
    result = run(server, "-o", "json", "list", "--all", "--page-size", "2")

    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert [vm["vm_id"] for vm in listing["vms"]] == [vm.vm_id for vm in FLEET]
    assert listing["next_page_token"] == ""
    assert [r.page_token for r in fake.of_type(vm_pb2.ListVmsRequest)] == ["", "2", "4"]
    assert {r.page_size for r in fake.of_type(vm_pb2.ListVmsRequest)} == {2}


def test_list_without_all_shows_one_page_and_the_next_token(
    server: str, fake: FakeVmService,
) -> None:
    result = run(server, "list", "--page-size", "2")

    assert result.exit_code == 0, result.output
    assert "vm-2" in result.stdout
    assert "vm-3" not in result.stdout
    assert "--page-token 2" in result.stderr
    assert len(fake.of_type(vm_pb2.ListVmsRequest)) == 1


def test_list_sends_state_filters(server: str, fake: FakeVmService) -> None:
    result = run(server, "-o", "json", "list", "--all", "--state", "running", "--state", "FAILED")

    assert result.exit_code == 0, result.output
    requests = fake.of_type(vm_pb2.ListVmsRequest)
    assert len(requests) == 2  # every page asks with the same filter
    for request in requests:
        assert list(request.state_filter) == [vm_pb2.VM_STATE_RUNNING, vm_pb2.VM_STATE_FAILED]
    assert {vm["state"] for vm in json.loads(result.stdout)["vms"]} == {
        "VM_STATE_RUNNING", "VM_STATE_FAILED"}


def test_list_rejects_an_unknown_state(server: str, fake: FakeVmService) -> None:
    result = run(server, "list", "--state", "sleeping")

    assert result.exit_code == vmmctl.EXIT_USAGE
    assert fake.of_type(vm_pb2.ListVmsRequest) == []


def test_watch_prints_one_json_object_per_event(server: str, fake: FakeVmService) -> None:
    result = run(server, "-o", "json", "watch", "vm-1", "--state", "paused")

    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["type"] for e in events] == ["VM_EVENT_TYPE_EXISTING", "VM_EVENT_TYPE_UPDATED",
                                           "VM_EVENT_TYPE_DELETED"]
    assert events[1]["vm"]["state"] == "VM_STATE_PAUSED"
    [request] = fake.of_type(vm_pb2.WatchVmsRequest)
    assert list(request.vm_ids) == ["vm-1"]
    assert list(request.state_filter) == [vm_pb2.VM_STATE_PAUSED]


def test_ctrl_c_ends_a_watch_and_cancels_the_stream(server: str, fake: FakeVmService) -> None:
    # A real process, so SIGINT goes through Python's own KeyboardInterrupt path.
    repo = Path(__file__).resolve().parent.parent
    with subprocess.Popen(
        [sys.executable, "-m", "tools.vmmctl", "--server", server, "watch", "follow"],
        cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k not in ("VMM_TOKEN", "VMM_CA_CERT")},
        # A shell may start us with SIGINT ignored; the child must see it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    ) as cli:
        assert cli.stdout is not None
        first = cli.stdout.readline()
        cli.send_signal(signal.SIGINT)
        _, stderr = cli.communicate(timeout=30)

    assert first.split()[:2] == [b"EXISTING", b"vm-1"]
    assert cli.returncode == vmmctl.EXIT_INTERRUPTED, stderr
    assert b"Traceback" not in stderr
    assert fake.follow_cancelled.wait(10), "the server never saw the watch cancelled"


def test_watch_table_prints_one_line_per_event(server: str, fake: FakeVmService) -> None:
    result = run(server, "watch")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert lines[1].split()[:3] == ["UPDATED", "vm-1", "PAUSED"]
    assert "rev=8" in lines[1]


def test_console_follow_writes_the_raw_bytes(server: str, fake: FakeVmService) -> None:
    result = run(server, "console", "vm-1", "-f", "--tail", "5")

    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == b"".join(CONSOLE_CHUNKS)
    [request] = fake.of_type(vm_pb2.StreamConsoleRequest)
    assert request.tail_lines == 5


def test_console_log_prints_text_and_notes_truncation(server: str, fake: FakeVmService) -> None:
    result = run(server, "console", "vm-1", "--tail", "2")

    assert result.exit_code == 0, result.output
    assert result.stdout == "line 9\nline 10\n"
    assert "left out" in result.stderr
    [request] = fake.of_type(vm_pb2.GetConsoleLogRequest)
    assert request.tail_lines == 2


def test_console_reads_the_hypervisor_log_on_request(server: str, fake: FakeVmService) -> None:
    assert run(server, "console", "vm-1").exit_code == 0
    assert run(server, "console", "vm-1", "--source", "hypervisor").exit_code == 0

    serial, hypervisor = fake.of_type(vm_pb2.GetConsoleLogRequest)
    assert serial.source == vm_pb2.CONSOLE_SOURCE_SERIAL
    assert hypervisor.source == vm_pb2.CONSOLE_SOURCE_HYPERVISOR


def test_hosts_table_marks_simulated_backends(server: str) -> None:
    result = run(server, "hosts")

    assert result.exit_code == 0, result.output
    row = result.stdout.splitlines()[1]
    assert "host-a" in row
    assert "READY" in row
    assert "firecracker (simulated), qemu" in row
    assert "6/32" in row
    assert "1.5GiB/24GiB" in row


def test_host_detail_shows_each_backends_capabilities(server: str) -> None:
    result = run(server, "host", "host-a")

    assert result.exit_code == 0, result.output
    assert "Backend firecracker" in result.stdout
    assert "Backend qemu" in result.stdout
    assert "force only" in result.stdout
    assert "1-448" in result.stdout


def test_backends_matrix_has_a_column_per_backend_and_support_marks(server: str) -> None:
    result = run(server, "backends")

    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "FEATURE" in line)
    assert header.index("firecracker") < header.index("qemu")
    shutdown = next(line for line in result.stdout.splitlines() if "VM Shutdown" in line)
    assert "⚠️ force only" in shutdown
    assert "✅ graceful" in shutdown
    hotplug = next(line for line in result.stdout.splitlines() if "CPU Hotplug" in line)
    assert "❌" in hotplug
    max_vcpus = next(line for line in result.stdout.splitlines() if "max_vcpu_count" in line)
    assert max_vcpus.count("ignored") == 1  # the mark is not repeated before its detail
    assert "no hotplug support" in max_vcpus
    memory = next(line for line in result.stdout.splitlines() if "Memory limit" in line)
    assert "128MiB-32GiB" in memory
    assert "128MiB and up" in memory


def test_backends_json_for_one_backend(server: str) -> None:
    result = run(server, "-o", "json", "backends", "qemu")

    assert result.exit_code == 0, result.output
    [caps] = json.loads(result.stdout)["backends"]
    assert caps["backend"] == "qemu"
    assert caps["limits"]["max_vcpus"] == 448


# ---------------------------------------------------------------- requests built from flags


def test_resize_parses_memory_sizes(server: str, fake: FakeVmService) -> None:
    result = run(server, "resize", "vm-1", "--memory", "2GiB")

    assert result.exit_code == 0, result.output
    [request] = fake.of_type(vm_pb2.ResizeVmRequest)
    assert request == vm_pb2.ResizeVmRequest(vm_id="vm-1", memory_size_bytes=2 << 30)
    assert "2GiB" in result.stdout


def test_resize_refuses_an_ambiguous_unit(server: str, fake: FakeVmService) -> None:
    result = run(server, "resize", "vm-1", "--memory", "2GB")

    assert result.exit_code == vmmctl.EXIT_USAGE
    assert "2GiB" in result.stderr  # the hint
    assert fake.of_type(vm_pb2.ResizeVmRequest) == []


def test_resize_needs_something_to_change(server: str, fake: FakeVmService) -> None:
    result = run(server, "resize", "vm-1")

    assert result.exit_code == vmmctl.EXIT_USAGE
    assert fake.of_type(vm_pb2.ResizeVmRequest) == []


def test_shutdown_sends_force_and_grace_period(server: str, fake: FakeVmService) -> None:
    result = run(server, "shutdown", "vm-1", "--timeout", "45")

    assert result.exit_code == 0, result.output
    [request] = fake.of_type(vm_pb2.ShutdownVmRequest)
    assert request == vm_pb2.ShutdownVmRequest(vm_id="vm-1", timeout_seconds=45)
    assert "SHUTDOWN" in result.stdout


def test_attach_disk_sends_the_device(server: str, fake: FakeVmService) -> None:
    result = run(server, "-o", "json", "attach-disk", "vm-1", "--path", "/var/lib/data.img",
                 "--id", "data", "--read-only")

    assert result.exit_code == 0, result.output
    [request] = fake.of_type(vm_pb2.AttachDiskRequest)
    assert request.device == vm_pb2.StorageDevice(id="data", path="/var/lib/data.img",
                                                  read_only=True)
    assert json.loads(result.stdout) == {"success": True, "state": "VM_STATE_RUNNING"}


def test_token_is_sent_as_bearer_metadata(server: str, fake: FakeVmService) -> None:
    result = run(server, "--token", "s3cret", "boot", "vm-1")

    assert result.exit_code == 0, result.output
    assert fake.metadata[-1].get("authorization") == "Bearer s3cret"


# ---------------------------------------------------------------- memory sizes


@pytest.mark.parametrize(("text", "size"), [
    ("1073741824", 1073741824),
    ("512MiB", 512 << 20),
    ("2GiB", 2 << 30),
    ("2gib", 2 << 30),
    ("1.5GiB", 3 << 29),
    ("512M", 512 << 20),
    ("64Ki", 64 << 10),
    ("1TiB", 1 << 40),
    ("4096B", 4096),
])
def test_parse_memory_size(text: str, size: int) -> None:
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("text", ["512MB", "2GB", "lots", "", "0", "-1GiB", "0.3B", "1.5"])
def test_parse_memory_size_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_memory_size(text)
