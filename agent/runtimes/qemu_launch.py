"""A VmConfig as a qemu-system-x86_64 command line, and the QMP objects hotplug adds.

Two machine types:

* microvm: no PCI, no firmware tables beyond ACPI, virtio-mmio devices. Boots
  fastest and is the default under KVM.
* q35: PCIe, needed for anything added at runtime. Every device sits on its own
  PCIe root port so it can be removed again, and spare ports are reserved for
  hotplug; vCPUs and memory are declared with room to grow (-smp maxcpus,
  -m slots/maxmem). Chosen when the config asks for CPU or memory hotplug, NUMA,
  or a passed-through NIC, under TCG (see choose_machine), or with
  boot_options["machine"] = "q35".

The same dictionaries build the command line and the hotplug QMP commands, so a
disk attached at runtime is configured exactly like one present at boot.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from agent.runtimes.base import positive_int
from agent.runtimes.qemu_accel import Accel, AccelChoice
from agent.vm_dir import VmDir
from vmm import features
from vmm.agent.v1 import agent_pb2
from vmm.v1 import vm_pb2

MIB = 1024 * 1024
GIB = 1024 * MIB

# boot.boot_options keys this runtime reads.
MACHINE_OPTION = "machine"  # "microvm" | "q35"
ACCEL_OPTION = "accel"  # "auto" | "kvm" | "tcg": overrides the runtime's setting for one VM

# Kernel arguments when a config names none: without a console the log stays empty.
DEFAULT_KERNEL_ARGS = "console=ttyS0"

# microvm has 24 virtio-mmio transports, shared by disks and NICs.
MICROVM_VIRTIO_TRANSPORTS = 24
MAX_DISKS = 16
MAX_NICS = 8
MAX_VCPUS = 255
MIN_MEMORY_BYTES = 16 * MIB
MAX_MEMORY_BYTES = 1024 * GIB
# q35: PCIe root ports kept free for devices attached at runtime, and DIMM slots.
SPARE_HOTPLUG_PORTS = 8
MEMORY_SLOTS = 8

HUGEPAGE_SIZES = {"2M": 2 * MIB, "1G": GIB}
DISK_OPTIONS = ("cache_type", "io_engine", "direct", "num_queues", "queue_size",
                "rate_limit_bandwidth", "rate_limit_ops")
NIC_OPTIONS = ("vhost", "num_queues", "socket", "pci_address")
# cache_type -> (host page cache bypassed, flushes ignored, guest-visible write cache)
_CACHE_TYPES = {"writeback": (False, False, True), "none": (True, False, True),
                "directsync": (True, False, False), "writethrough": (False, False, False),
                "unsafe": (False, True, True)}
# io_engine -> the file driver's aio mode ("sync"/"async" are Firecracker's words).
_IO_ENGINES = {"threads": "threads", "sync": "threads", "native": "native",
               "io_uring": "io_uring", "async": "io_uring"}


class Machine(StrEnum):
    MICROVM = "microvm"
    Q35 = "q35"


class NicKind(StrEnum):
    TAP = "tap"
    VHOST_USER = "vhost-user"
    VFIO = "vfio"


# ---- reading a VmConfig -----------------------------------------------------------------


def disk_ids(storage: Sequence[vm_pb2.StorageDevice]) -> list[str]:
    """Stable device ids: the config's id, else "rootfs" / "disk<index>"."""
    return [d.id or ("rootfs" if d.is_root_device else f"disk{i}") for i, d in enumerate(storage)]


def nic_ids(network: Sequence[vm_pb2.NetworkInterface]) -> list[str]:
    return [n.id or f"eth{i}" for i, n in enumerate(network)]


def qemu_id(kind: str, device_id: str) -> str:
    """A QEMU id (a letter, then letters, digits, '-', '_', '.') for a config device id."""
    return f"{kind}-" + re.sub(r"[^A-Za-z0-9_.-]", "_", device_id)


def nic_kind(nic: vm_pb2.NetworkInterface) -> NicKind:
    kind = nic.interface_type.lower()
    if kind in features.VHOST_USER_TYPES:
        return NicKind.VHOST_USER
    if kind in features.SRIOV_TYPES:
        return NicKind.VFIO
    return NicKind.TAP


def hugepage_size(config: vm_pb2.VmConfig) -> int | None:
    value = config.memory.backing.get(features.HUGEPAGES_KEY, "")
    return HUGEPAGE_SIZES.get(value.strip().upper()) if value else None


def numa_nodes(config: vm_pb2.VmConfig) -> int:
    value = config.memory.backing.get(features.NUMA_KEY, "")
    return int(value) if value.strip().isdigit() else 0


def shared_memory(config: vm_pb2.VmConfig) -> bool:
    """Guest memory must be a shared mapping: asked for, or a vhost-user NIC needs it."""
    asked = config.memory.backing.get(features.SHARED_KEY, "").strip().lower()
    return asked in {"1", "true", "yes", "on"} or any(
        nic_kind(n) == NicKind.VHOST_USER for n in config.network)


def max_vcpus(config: vm_pb2.VmConfig) -> int:
    return max(config.cpu.max_vcpu_count, config.cpu.vcpu_count)


def max_memory_bytes(config: vm_pb2.VmConfig) -> int:
    return max(config.memory.max_size_bytes, config.memory.size_bytes)


def memory_hotplug(config: vm_pb2.VmConfig) -> bool:
    return config.memory.hotplug_enabled or max_memory_bytes(config) > config.memory.size_bytes


def choose_machine(config: vm_pb2.VmConfig, accel: Accel) -> Machine:
    named = config.boot.boot_options.get(MACHINE_OPTION, "").strip().lower()
    if named:
        return Machine(named)
    if (max_vcpus(config) > config.cpu.vcpu_count or memory_hotplug(config)
            or numa_nodes(config) > 1 or any(nic_kind(n) == NicKind.VFIO
                                             for n in config.network)):
        return Machine.Q35
    if accel == Accel.TCG:
        # microvm's only timer a Linux guest can calibrate its TSC against is the PIT.
        # Under TCG on a busy host that calibration fails and boot hangs; q35 adds the
        # HPET and the ACPI PM timer as references.
        return Machine.Q35
    return Machine.MICROVM


def requested_accel(config: vm_pb2.VmConfig, default: Accel) -> Accel:
    value = config.boot.boot_options.get(ACCEL_OPTION, "").strip().lower()
    return Accel(value) if value else default


def config_violations(config: vm_pb2.VmConfig) -> list[agent_pb2.FieldViolation]:
    """What in a config this runtime cannot express on QEMU, by field path."""
    out: list[agent_pb2.FieldViolation] = []

    def violation(field_path: str, description: str) -> None:
        out.append(agent_pb2.FieldViolation(field=field_path, description=description))

    boot_options = config.boot.boot_options
    machine = boot_options.get(MACHINE_OPTION, "").strip().lower()
    if machine and machine not in set(Machine):
        violation(f"config.boot.boot_options[{MACHINE_OPTION}]",
                  f"expected one of {', '.join(Machine)}, got {machine!r}")
    accel = boot_options.get(ACCEL_OPTION, "").strip().lower()
    if accel and accel not in set(Accel):
        violation(f"config.boot.boot_options[{ACCEL_OPTION}]",
                  f"expected one of {', '.join(Accel)}, got {accel!r}")
    if not config.boot.kernel_path:
        violation("config.boot.kernel_path", "qemu boots a kernel directly: a kernel is needed")

    cpu, mem = config.cpu, config.memory
    if not 1 <= cpu.vcpu_count <= MAX_VCPUS:
        violation("config.cpu.vcpu_count", f"expected 1-{MAX_VCPUS} vCPUs, got {cpu.vcpu_count}")
    if cpu.max_vcpu_count > MAX_VCPUS:
        violation("config.cpu.max_vcpu_count",
                  f"expected at most {MAX_VCPUS} vCPUs, got {cpu.max_vcpu_count}")
    for key, size in (("size_bytes", mem.size_bytes), ("max_size_bytes", mem.max_size_bytes)):
        if size % MIB:
            violation(f"config.memory.{key}",
                      f"qemu sizes memory in whole MiB: {size} bytes is not a multiple of {MIB}")
    if mem.hotplug_enabled and mem.max_size_bytes <= mem.size_bytes:
        violation("config.memory.max_size_bytes",
                  "memory hotplug needs max_size_bytes above size_bytes (the most the VM "
                  "may grow to)")
    page = config.memory.backing.get(features.HUGEPAGES_KEY)
    page_bytes = hugepage_size(config)
    if page is not None and page_bytes is None:
        violation(f"config.memory.backing[{features.HUGEPAGES_KEY}]",
                  f"expected one of {', '.join(HUGEPAGE_SIZES)}, got {page!r}")
    if page_bytes and mem.size_bytes % page_bytes:
        violation("config.memory.size_bytes",
                  f"with {page} hugepages the size must be a multiple of {page}")
    nodes_text = config.memory.backing.get(features.NUMA_KEY)
    nodes = numa_nodes(config)
    if nodes_text is not None and nodes < 1:
        violation(f"config.memory.backing[{features.NUMA_KEY}]",
                  f"expected a whole number of nodes, got {nodes_text!r}")
    elif nodes > 1:
        if max_vcpus(config) % nodes or (mem.size_bytes // MIB) % nodes:
            violation(f"config.memory.backing[{features.NUMA_KEY}]",
                      f"{nodes} NUMA nodes must split the vCPUs ({max_vcpus(config)}) and the "
                      f"memory ({mem.size_bytes // MIB} MiB) evenly")
        if cpu.topology.sockets and cpu.topology.sockets % nodes:
            violation("config.cpu.topology.sockets",
                      f"{cpu.topology.sockets} sockets cannot be split over {nodes} NUMA nodes")
    if cpu.HasField("topology"):
        t = cpu.topology
        sockets, cores, threads = t.sockets or 1, t.cores_per_socket or 1, t.threads_per_core or 1
        if (t.sockets and t.cores_per_socket and t.threads_per_core
                and sockets * cores * threads != max_vcpus(config)):
            violation("config.cpu.topology",
                      f"{sockets} sockets x {cores} cores x {threads} threads is not the "
                      f"{max_vcpus(config)} vCPUs the VM may have")
    affinity = cpu.features.get(features.CPU_AFFINITY_KEY)
    if affinity is not None and parse_cpu_list(affinity) is None:
        violation(f"config.cpu.features[{features.CPU_AFFINITY_KEY}]",
                  f"expected a host CPU list such as '0-3,6', got {affinity!r}")

    if len(config.storage) > MAX_DISKS:
        violation("config.storage", f"at most {MAX_DISKS} disks, got {len(config.storage)}")
    if len(config.network) > MAX_NICS:
        violation("config.network", f"at most {MAX_NICS} NICs, got {len(config.network)}")
    for kind, ids in (("storage", disk_ids(config.storage)),
                      ("network", nic_ids(config.network))):
        seen: set[str] = set()
        for i, device_id in enumerate(ids):
            if device_id in seen:
                violation(f"config.{kind}[{i}].id", f"device id {device_id!r} is used twice")
            seen.add(device_id)
    for i, disk in enumerate(config.storage):
        out += disk_violations(disk, f"config.storage[{i}]")
    for i, nic in enumerate(config.network):
        out += nic_violations(nic, f"config.network[{i}]")
    return out


def disk_violations(disk: vm_pb2.StorageDevice, path: str) -> list[agent_pb2.FieldViolation]:
    out: list[agent_pb2.FieldViolation] = []
    if not disk.path:
        out.append(agent_pb2.FieldViolation(field=f"{path}.path",
                                            description="a disk needs a path"))
    for key, value in sorted(disk.options.items()):
        problem = _disk_option_problem(key, value)
        if problem:
            out.append(agent_pb2.FieldViolation(field=f"{path}.options[{key}]",
                                                description=problem))
    return out


def _disk_option_problem(key: str, value: str) -> str:
    v = value.strip().lower()
    if key not in DISK_OPTIONS:
        return (f"qemu does not support the storage option {key!r} "
                f"(it supports: {', '.join(DISK_OPTIONS)})")
    if key == "cache_type" and v not in _CACHE_TYPES:
        return f"expected one of {', '.join(_CACHE_TYPES)}, got {value!r}"
    if key == "io_engine" and v not in _IO_ENGINES:
        return f"expected one of {', '.join(_IO_ENGINES)}, got {value!r}"
    if key == "direct" and v not in {"true", "false", "1", "0", "on", "off"}:
        return f"expected true or false, got {value!r}"
    if key in {"num_queues", "queue_size", "rate_limit_bandwidth",
               "rate_limit_ops"} and positive_int(value) is None:
        return f"expected a positive whole number, got {value!r}"
    return ""


def nic_violations(nic: vm_pb2.NetworkInterface, path: str) -> list[agent_pb2.FieldViolation]:
    out: list[agent_pb2.FieldViolation] = []

    def violation(sub: str, description: str) -> None:
        out.append(agent_pb2.FieldViolation(field=f"{path}{sub}", description=description))

    kind = nic_kind(nic)
    if kind == NicKind.TAP and not nic.tap_device:
        violation(".tap_device", "a TAP interface needs the host TAP device name")
    if kind == NicKind.VHOST_USER and not nic.options.get("socket"):
        violation(".options[socket]", "a vhost-user interface needs the backend's socket path")
    if kind == NicKind.VFIO and not _PCI_ADDRESS.fullmatch(nic.options.get("pci_address", "")):
        violation(".options[pci_address]",
                  "a passed-through interface needs the host PCI address of its virtual "
                  "function, e.g. 0000:3b:02.1")
    if nic.mac_address and not _MAC.fullmatch(nic.mac_address):
        violation(".mac_address", f"expected a MAC such as 52:54:00:12:34:56, got "
                                  f"{nic.mac_address!r}")
    for key, value in sorted(nic.options.items()):
        if key not in NIC_OPTIONS:
            violation(f".options[{key}]", f"qemu does not support the network option {key!r} "
                                          f"(it supports: {', '.join(NIC_OPTIONS)})")
        elif key == "num_queues" and positive_int(value) is None:
            violation(f".options[{key}]", f"expected a positive whole number, got {value!r}")
        elif key == "vhost" and value.strip().lower() not in {"true", "false", "on", "off"}:
            violation(f".options[{key}]", f"expected true or false, got {value!r}")
    return out


_MAC = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
_PCI_ADDRESS = re.compile(r"[0-9A-Fa-f]{4}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7]")


def _flag(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def parse_cpu_list(text: str) -> set[int] | None:
    """A host CPU list such as "0-3,6" as a set; None when malformed."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            return None
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            return None
        cpus.update(range(first, last + 1))
    return cpus or None


# ---- devices as QEMU objects ------------------------------------------------------------


def disk_throttle_group(disk: vm_pb2.StorageDevice, device_id: str) -> dict[str, Any] | None:
    """The throttle-group object (for object-add) limiting this disk, if it has limits."""
    limits: dict[str, Any] = {}
    if bandwidth := positive_int(disk.options.get("rate_limit_bandwidth", "")):
        limits["x-bps-total"] = bandwidth
    if ops := positive_int(disk.options.get("rate_limit_ops", "")):
        limits["x-iops-total"] = ops
    if not limits:
        return None
    return {"qom-type": "throttle-group", "id": qemu_id("throttle", device_id), **limits}


def disk_blockdev(disk: vm_pb2.StorageDevice, device_id: str) -> dict[str, Any]:
    """The block node graph (for blockdev-add): file, raw format, then an optional throttle."""
    options = {k: v.strip().lower() for k, v in disk.options.items()}
    direct, no_flush, _ = _CACHE_TYPES.get(options.get("cache_type", "writeback"),
                                           _CACHE_TYPES["writeback"])
    if "direct" in options:
        direct = _flag(options["direct"])
    aio = _IO_ENGINES.get(options.get("io_engine", ""), "threads")
    if aio == "native":
        direct = True  # Linux native AIO only works on O_DIRECT files
    read_only = disk.read_only
    node: dict[str, Any] = {
        "driver": "raw",
        "node-name": qemu_id("fmt", device_id),
        "read-only": read_only,
        "cache": {"direct": direct, "no-flush": no_flush},
        "file": {"driver": "host_device" if disk.path.startswith("/dev/") else "file",
                 "filename": disk.path, "node-name": qemu_id("file", device_id),
                 "read-only": read_only, "aio": aio,
                 "cache": {"direct": direct, "no-flush": no_flush}},
    }
    if disk_throttle_group(disk, device_id):
        return {"driver": "throttle", "node-name": qemu_id("disk", device_id),
                "read-only": read_only, "throttle-group": qemu_id("throttle", device_id),
                "file": node}
    node["node-name"] = qemu_id("disk", device_id)
    return node


def disk_device(disk: vm_pb2.StorageDevice, device_id: str, machine: Machine,
                bus: str | None) -> dict[str, Any]:
    """The virtio-blk device (for device_add) in front of the disk's block node."""
    options = {k: v.strip().lower() for k, v in disk.options.items()}
    _, _, write_cache = _CACHE_TYPES.get(options.get("cache_type", "writeback"),
                                         _CACHE_TYPES["writeback"])
    device: dict[str, Any] = {
        "driver": "virtio-blk-pci" if machine == Machine.Q35 else "virtio-blk-device",
        "id": qemu_id("disk", device_id), "drive": qemu_id("disk", device_id),
        "write-cache": "on" if write_cache else "off",
    }
    if bus:
        device["bus"] = bus
    if queues := positive_int(options.get("num_queues", "")):
        device["num-queues"] = queues
    if queue_size := positive_int(options.get("queue_size", "")):
        device["queue-size"] = queue_size
    return device


def nic_backend(nic: vm_pb2.NetworkInterface, device_id: str) -> tuple[dict[str, Any] | None,
                                                                      dict[str, Any] | None]:
    """(chardev, netdev) for netdev_add / chardev-add; (None, None) for passthrough."""
    kind = nic_kind(nic)
    netdev_id = qemu_id("net", device_id)
    if kind == NicKind.VFIO:
        return None, None
    if kind == NicKind.VHOST_USER:
        chardev_id = qemu_id("chr", device_id)
        chardev = {"id": chardev_id, "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": nic.options["socket"]}},
            "server": False}}}
        return chardev, {"type": "vhost-user", "id": netdev_id, "chardev": chardev_id}
    netdev: dict[str, Any] = {"type": "tap", "id": netdev_id, "ifname": nic.tap_device,
                              "script": "no", "downscript": "no"}
    if "vhost" in nic.options:
        netdev["vhost"] = _flag(nic.options["vhost"])
    if queues := positive_int(nic.options.get("num_queues", "")):
        netdev["queues"] = queues
    return None, netdev


def nic_device(nic: vm_pb2.NetworkInterface, device_id: str, machine: Machine,
               bus: str | None) -> dict[str, Any]:
    if nic_kind(nic) == NicKind.VFIO:
        device: dict[str, Any] = {"driver": "vfio-pci", "id": qemu_id("nic", device_id),
                                  "host": nic.options["pci_address"]}
    else:
        device = {"driver": "virtio-net-pci" if machine == Machine.Q35 else "virtio-net-device",
                  "id": qemu_id("nic", device_id), "netdev": qemu_id("net", device_id)}
        if nic.mac_address:
            device["mac"] = nic.mac_address.lower()
        queues = positive_int(nic.options.get("num_queues", ""))
        if queues and queues > 1:
            device["mq"] = "on"
            if machine == Machine.Q35:
                device["vectors"] = 2 * queues + 2  # rx and tx per queue, config, control
    if bus:
        device["bus"] = bus
    return device


def memory_backend(object_id: str, size_bytes: int, config: vm_pb2.VmConfig) -> dict[str, Any]:
    """A memory backend object (for object-add) of the kind the config's backing asks for."""
    backend: dict[str, Any] = {"qom-type": "memory-backend-ram", "id": object_id,
                               "size": size_bytes}
    page = hugepage_size(config)
    if page or shared_memory(config):
        backend["qom-type"] = "memory-backend-memfd"
        backend["share"] = shared_memory(config)
        if page:
            backend.update({"hugetlb": True, "hugetlbsize": page})
    return backend


def root_port_id(index: int) -> str:
    return f"port{index}"


# ---- the command line -------------------------------------------------------------------


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
        # append=on: the process's own stderr shares this file (see agent.process.spawn).
        "-chardev", f"file,id=serial0,path={vm.console_log},append=on",
        "-serial", "chardev:serial0",
        "-cpu", accel.cpu_model,
        # QEMU's defaults, spelled out because the runtime relies on them: a guest
        # power-off ends the process, a guest reboot resets the machine in place.
        "-action", "shutdown=poweroff,reboot=reset",
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
