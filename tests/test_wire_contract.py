"""The public API stays wire compatible with vmm.v1.VmService as existing clients know it:
these RPCs, messages, field numbers and types, with only additions after them."""

from __future__ import annotations

import subprocess
import sys

import pytest
from google.protobuf.descriptor import FieldDescriptor as F

from tools.fleet.cluster import ROOT
from vmm.v1 import vm_pb2

I32, I64, STR, BOOL, DBL, MSG, ENUM = (F.TYPE_INT32, F.TYPE_INT64, F.TYPE_STRING, F.TYPE_BOOL,
                                       F.TYPE_DOUBLE, F.TYPE_MESSAGE, F.TYPE_ENUM)
MAP = "map"
REP = "repeated"

# message -> {field: (number, type, label-or-None)}
CONTRACT: dict[str, dict[str, tuple[int, object, str | None]]] = {
    "VmConfig": {"cpu": (1, MSG, None), "memory": (2, MSG, None), "boot": (3, MSG, None),
                 "storage": (4, MSG, REP), "network": (5, MSG, REP), "console": (6, MSG, None),
                 "metadata": (7, MSG, MAP)},
    "CpuConfig": {"vcpu_count": (1, I32, None), "max_vcpu_count": (2, I32, None),
                  "topology": (3, MSG, None), "features": (4, MSG, MAP)},
    "CpuTopology": {"sockets": (1, I32, None), "cores_per_socket": (2, I32, None),
                    "threads_per_core": (3, I32, None)},
    "MemoryConfig": {"size_bytes": (1, I64, None), "hotplug_enabled": (2, BOOL, None),
                     "max_size_bytes": (3, I64, None), "backing": (4, MSG, MAP)},
    "BootConfig": {"kernel_path": (1, STR, None), "initrd_path": (2, STR, None),
                   "kernel_args": (3, STR, None), "boot_options": (4, MSG, MAP)},
    "StorageDevice": {"id": (1, STR, None), "path": (2, STR, None), "read_only": (3, BOOL, None),
                      "is_root_device": (4, BOOL, None), "interface_type": (5, STR, None),
                      "options": (6, MSG, MAP)},
    "NetworkInterface": {"id": (1, STR, None), "mac_address": (2, STR, None),
                         "tap_device": (3, STR, None), "interface_type": (4, STR, None),
                         "options": (5, MSG, MAP)},
    "ConsoleConfig": {"enabled": (1, BOOL, None), "output": (2, STR, None),
                      "input": (3, STR, None), "console_type": (4, STR, None)},
    "CreateVmRequest": {"vm_id": (1, STR, None), "config": (2, MSG, None)},
    "CreateVmResponse": {"vm_id": (1, STR, None), "state": (2, ENUM, None)},
    "DeleteVmRequest": {"vm_id": (1, STR, None), "force": (2, BOOL, None)},
    "DeleteVmResponse": {"success": (1, BOOL, None)},
    "BootVmRequest": {"vm_id": (1, STR, None)},
    "BootVmResponse": {"success": (1, BOOL, None), "state": (2, ENUM, None)},
    "PauseVmRequest": {"vm_id": (1, STR, None)},
    "PauseVmResponse": {"success": (1, BOOL, None), "state": (2, ENUM, None)},
    "ResumeVmRequest": {"vm_id": (1, STR, None)},
    "ResumeVmResponse": {"success": (1, BOOL, None), "state": (2, ENUM, None)},
    "ShutdownVmRequest": {"vm_id": (1, STR, None), "force": (2, BOOL, None),
                          "timeout_seconds": (3, I32, None)},
    "ShutdownVmResponse": {"success": (1, BOOL, None), "state": (2, ENUM, None)},
    "RebootVmRequest": {"vm_id": (1, STR, None), "force": (2, BOOL, None)},
    "RebootVmResponse": {"success": (1, BOOL, None), "state": (2, ENUM, None)},
    "GetVmInfoRequest": {"vm_id": (1, STR, None)},
    "GetVmInfoResponse": {"vm_id": (1, STR, None), "config": (2, MSG, None),
                          "state": (3, ENUM, None), "metrics": (4, MSG, None),
                          "backend_info": (5, MSG, MAP)},
    "ListVmsRequest": {"state_filter": (1, ENUM, REP), "page_size": (2, I32, None),
                       "page_token": (3, STR, None)},
    "ListVmsResponse": {"vms": (1, MSG, REP), "next_page_token": (2, STR, None),
                        "total_count": (3, I32, None)},
    "VmInfo": {"vm_id": (1, STR, None), "state": (2, ENUM, None), "vcpu_count": (3, I32, None),
               "memory_size_bytes": (4, I64, None), "created_timestamp": (5, I64, None),
               "modified_timestamp": (6, I64, None), "metadata": (7, MSG, MAP)},
    "VmMetrics": {"cpu_usage_percent": (1, DBL, None), "memory_usage_bytes": (2, I64, None),
                  "network_stats": (3, MSG, None), "storage_stats": (4, MSG, None),
                  "uptime_seconds": (5, I64, None)},
    "NetworkStats": {"bytes_received": (1, I64, None), "bytes_transmitted": (2, I64, None),
                     "packets_received": (3, I64, None), "packets_transmitted": (4, I64, None)},
    "StorageStats": {"bytes_read": (1, I64, None), "bytes_written": (2, I64, None),
                     "read_operations": (3, I64, None), "write_operations": (4, I64, None)},
}

RPCS = {
    "CreateVm": ("CreateVmRequest", "CreateVmResponse"),
    "DeleteVm": ("DeleteVmRequest", "DeleteVmResponse"),
    "BootVm": ("BootVmRequest", "BootVmResponse"),
    "ShutdownVm": ("ShutdownVmRequest", "ShutdownVmResponse"),
    "PauseVm": ("PauseVmRequest", "PauseVmResponse"),
    "ResumeVm": ("ResumeVmRequest", "ResumeVmResponse"),
    "RebootVm": ("RebootVmRequest", "RebootVmResponse"),
    "GetVmInfo": ("GetVmInfoRequest", "GetVmInfoResponse"),
    "ListVms": ("ListVmsRequest", "ListVmsResponse"),
}


def test_package_and_service() -> None:
    assert vm_pb2.DESCRIPTOR.package == "vmm.v1"
    service = vm_pb2.DESCRIPTOR.services_by_name["VmService"]
    assert service.full_name == "vmm.v1.VmService"
    for name, (request, response) in RPCS.items():
        method = service.methods_by_name[name]
        assert method.input_type.full_name == f"vmm.v1.{request}"
        assert method.output_type.full_name == f"vmm.v1.{response}"
        assert not method.client_streaming and not method.server_streaming


@pytest.mark.parametrize("message", sorted(CONTRACT))
def test_message_fields(message: str) -> None:
    descriptor = vm_pb2.DESCRIPTOR.message_types_by_name[message]
    for name, (number, kind, label) in CONTRACT[message].items():
        field = descriptor.fields_by_name[name]
        assert field.number == number, f"{message}.{name}"
        assert field.type == kind, f"{message}.{name}"
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        if label == MAP:
            assert is_map, f"{message}.{name} must be a map"
        elif label == REP:
            assert field.is_repeated and not is_map, f"{message}.{name} must be repeated"
        else:
            assert not field.is_repeated, f"{message}.{name} must be singular"
    # Additions only take numbers after the contract's.
    top = max(n for n, _, _ in CONTRACT[message].values())
    for field in descriptor.fields:
        if field.name not in CONTRACT[message]:
            assert field.number > top, f"{message}.{field.name} reuses a contract number"


def test_vm_state_values() -> None:
    values = {v.name: v.number for v in vm_pb2.DESCRIPTOR.enum_types_by_name["VmState"].values}
    assert {k: values[k] for k in ("VM_STATE_UNSPECIFIED", "VM_STATE_CREATED", "VM_STATE_RUNNING",
                                   "VM_STATE_PAUSED", "VM_STATE_SHUTDOWN")} == {
        "VM_STATE_UNSPECIFIED": 0, "VM_STATE_CREATED": 1, "VM_STATE_RUNNING": 2,
        "VM_STATE_PAUSED": 3, "VM_STATE_SHUTDOWN": 4}
    assert all(n > 4 for name, n in values.items() if name not in (
        "VM_STATE_UNSPECIFIED", "VM_STATE_CREATED", "VM_STATE_RUNNING", "VM_STATE_PAUSED",
        "VM_STATE_SHUTDOWN"))


def test_generated_modules_are_fresh() -> None:
    result = subprocess.run([sys.executable, "-m", "tools.codegen.proto", "--check"], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
