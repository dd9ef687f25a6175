"""What the QEMU runtime records in a VM's runtime.json beside the process reference."""

from __future__ import annotations

from google.protobuf import json_format

from agent.vm_dir import VmDir
from vmm.v1 import vm_pb2

ACCEL = "accel"
ACCEL_REASON = "accel_reason"
MACHINE = "machine"
PORTS = "pcie_ports"  # QEMU device id -> root port
PORT_COUNT = "pcie_port_count"
CONFIG = "config"  # the VmConfig as it runs, after hotplug changes
BOOTED_AT = "booted_at"
STOPPED_AT = "stopped_at"


def update(vm: VmDir, **changes: object) -> None:
    vm.save_runtime({**vm.load_runtime(), **changes})


def running_config(vm: VmDir) -> vm_pb2.VmConfig:
    stored = vm.load_runtime().get(CONFIG)
    config = vm_pb2.VmConfig()
    if isinstance(stored, dict):
        json_format.ParseDict(stored, config)
    return config
