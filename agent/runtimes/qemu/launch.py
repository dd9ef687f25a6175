"""A VmConfig as a qemu-system-x86_64 command line (machine types: see config).

On q35 every device sits on its own PCIe root port, and spare ports and DIMM slots
are left for hotplug.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.runtimes.qemu import events
from agent.runtimes.qemu.accel import AccelChoice
from agent.runtimes.qemu.config import (
    MIB,
    Machine,
    choose_machine,
    disk_ids,
    hugepage_size,
    max_memory_bytes,
    max_vcpus,
    memory_hotplug,
    nic_ids,
    numa_nodes,
    qemu_id,
    shared_memory,
)
from agent.runtimes.qemu.devices import (
    disk_blockdev,
    disk_device,
    disk_throttle_group,
    memory_backend,
    nic_backend,
    nic_device,
    root_port_id,
)
from agent.vm_dir import VmDir
from vmm import features
from vmm.v1 import vm_pb2

# Kernel arguments when a config names none: without a console the log stays empty.
DEFAULT_KERNEL_ARGS = "console=ttyS0"
# q35: PCIe root ports kept free for devices attached at runtime, and DIMM slots.
SPARE_HOTPLUG_PORTS = 8
MEMORY_SLOTS = 8
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class QemuLaunch:
    machine: Machine
    accel: AccelChoice
    argv: list[str]
    # device QEMU id -> the PCIe root port it sits on (q35), for later hot-unplug.
    ports: dict[str, str]
    # Number of PCIe root ports created (q35).
    port_count: int


def build_launch(binary: str, vm: VmDir, config: vm_pb2.VmConfig,
                 accel: AccelChoice) -> QemuLaunch:
    """The full command line of a VM that starts paused (-S) with its QMP socket open."""
    machine = choose_machine(config, accel.accel)
    argv: list[str] = [
        binary, "-name", f"{vm.vm_id},debug-threads=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-S",
        "-qmp", f"unix:{vm.api_socket},server=on,wait=off",
        # append=on: the file outlives a process; each boot's output follows the last.
        "-chardev", f"file,id=serial0,path={vm.console_log},append=on",
        "-serial", "chardev:serial0",
        "-cpu", accel.cpu_model,
        # QEMU's defaults, spelled out because the runtime relies on them: a guest
        # power-off ends the process, a guest reboot resets the machine in place.
        # A guest kernel panic reported through pvpanic stops the guest where it is
        # (QMP status guest-panicked), so the agent sees it even after its own restart.
        "-action", "shutdown=poweroff,reboot=reset,panic=pause",
        # The ISA pvpanic device (port 0x505, described in ACPI) works on microvm and q35.
        "-device", "pvpanic",
        # QMP events (GUEST_PANICKED among them) written to a file: see qemu.events.
        "-chardev", f"pipe,id=qmp-events,path={_escape(str(events.base_path(vm)))}",
        "-mon", "chardev=qmp-events,mode=control",
        # QEMU's seccomp filter: no obsolete syscalls, no setuid, no fork/exec, no changing
        # its own scheduling or limits (the agent pins vCPU threads from outside).
        "-sandbox", SANDBOX,
    ]
    machine_props = [f"{machine.value}", f"accel={accel.accel.value}"]
    argv += _smp_args(config)
    memory_args, ram_backend = _memory_args(config)
    if ram_backend:
        machine_props.append(f"memory-backend={ram_backend}")
    argv += ["-machine", ",".join(machine_props), *memory_args]

    boot = config.boot
    if machine == Machine.Q35 and (firmware := fast_firmware(binary)):
        argv += ["-bios", str(firmware)]
    argv += ["-kernel", boot.kernel_path]
    if boot.initrd_path:
        argv += ["-initrd", boot.initrd_path]
    argv += ["-append", kernel_args(config)]
    if gdb := boot.boot_options.get(features.GDB_KEY):
        argv += ["-gdb", f"unix:{gdb},server=on,wait=off"]

    ports: dict[str, str] = {}
    port_count = 0

    def next_bus(device_id: str) -> str | None:
        nonlocal port_count
        if machine != Machine.Q35:
            return None
        port = root_port_id(port_count)
        port_count += 1
        ports[device_id] = port
        return port

    device_args: list[str] = []
    for disk, disk_id in _root_first(config.storage):
        if group := disk_throttle_group(disk, disk_id):
            device_args += ["-object", json.dumps(group)]
        device_args += ["-blockdev", json.dumps(disk_blockdev(disk, disk_id))]
        device = disk_device(disk, disk_id, machine, next_bus(qemu_id("disk", disk_id)))
        device_args += ["-device", device_option(device)]
    for nic, nic_id in zip(config.network, nic_ids(config.network), strict=True):
        chardev, netdev = nic_backend(nic, nic_id)
        if chardev:
            device_args += ["-chardev", f"socket,id={chardev['id']},path="
                            f"{_escape(nic.options['socket'])}"]
        if netdev:
            device_args += ["-netdev", device_option(
                {k: v for k, v in netdev.items() if k != "type"}, head=netdev["type"])]
        device = nic_device(nic, nic_id, machine, next_bus(qemu_id("nic", nic_id)))
        device_args += ["-device", device_option(device)]

    if machine == Machine.Q35:
        total_ports = port_count + SPARE_HOTPLUG_PORTS
        for i in range(total_ports):
            argv += ["-device", f"pcie-root-port,id={root_port_id(i)},bus=pcie.0,"
                                f"chassis={i + 1},slot={i + 1}"]
        port_count = total_ports
    argv += device_args
    return QemuLaunch(machine=machine, accel=accel, argv=argv, ports=ports,
                      port_count=port_count)


def fast_firmware(binary: str) -> Path | None:
    """qboot, where QEMU ships it beside its other firmware. A direct kernel boot needs
    no BIOS services, and qboot hands over to the kernel in milliseconds, where SeaBIOS
    takes seconds on a CPU that is emulated or paravirtualised."""
    resolved = shutil.which(binary)
    if resolved is None:
        return None
    candidate = Path(resolved).resolve().parent.parent / "share" / "qemu" / "qboot.rom"
    return candidate if candidate.is_file() else None


def kernel_args(config: vm_pb2.VmConfig) -> str:
    """The configured kernel arguments; root= for a root disk when they name none."""
    args = config.boot.kernel_args.strip() or DEFAULT_KERNEL_ARGS
    roots = [d for d in config.storage if d.is_root_device]
    if roots and not re.search(r"(^|\s)root=", args):
        # The root disk is the first virtio disk: build_launch puts it first.
        args += " root=/dev/vda " + ("ro" if roots[0].read_only else "rw")
    return args


def _root_first(storage: Sequence[vm_pb2.StorageDevice]
                ) -> list[tuple[vm_pb2.StorageDevice, str]]:
    pairs = list(zip(storage, disk_ids(storage), strict=True))
    return sorted(pairs, key=lambda pair: not pair[0].is_root_device)


def _smp_args(config: vm_pb2.VmConfig) -> list[str]:
    cpu = config.cpu
    smp = [f"cpus={cpu.vcpu_count}", f"maxcpus={max_vcpus(config)}"]
    topology = cpu.topology if cpu.HasField("topology") else vm_pb2.CpuTopology()
    sockets = topology.sockets or (numa_nodes(config) if numa_nodes(config) > 1 else 0)
    for name, value in (("sockets", sockets), ("cores", topology.cores_per_socket),
                        ("threads", topology.threads_per_core)):
        if value:
            smp.append(f"{name}={value}")
    return ["-smp", ",".join(smp)]


def _memory_args(config: vm_pb2.VmConfig) -> tuple[list[str], str | None]:
    """-m (with hotplug room) and the memory backends; the machine's backend id, if one."""
    size_mib = config.memory.size_bytes // MIB
    memory = [f"size={size_mib}M"]
    if memory_hotplug(config):
        memory += [f"slots={MEMORY_SLOTS}", f"maxmem={max_memory_bytes(config) // MIB}M"]
    args = ["-m", ",".join(memory)]
    nodes = numa_nodes(config)
    special = hugepage_size(config) or shared_memory(config)
    if nodes > 1:
        per_node = config.memory.size_bytes // nodes
        for node in range(nodes):
            backend = memory_backend(f"ram-node{node}", per_node, config)
            args += ["-object", json.dumps(backend),
                     "-numa", f"node,nodeid={node},memdev=ram-node{node}"]
        sockets = config.cpu.topology.sockets or nodes
        for socket in range(sockets):
            args += ["-numa", f"cpu,node-id={socket * nodes // sockets},socket-id={socket}"]
        return args, None
    if special:
        args += ["-object", json.dumps(memory_backend("ram", config.memory.size_bytes, config))]
        return args, "ram"
    return args, None


def device_option(props: Mapping[str, Any], head: str | None = None) -> str:
    """QEMU's key=value option syntax: 'driver,key=value,...' (commas doubled in values)."""
    props = dict(props)
    parts = [head if head is not None else str(props.pop("driver"))]
    for key, value in props.items():
        text = ("on" if value else "off") if isinstance(value, bool) else str(value)
        parts.append(f"{key}={_escape(text)}")
    return ",".join(parts)


def _escape(value: str) -> str:
    return value.replace(",", ",,")
