"""Reading a VmConfig for QEMU: device ids, the machine type, and what QEMU cannot express.

Two machine types:

* microvm: no PCI, no firmware tables beyond ACPI, virtio-mmio devices. Boots
  fastest and is the default under KVM.
* q35: PCIe, needed for anything added at runtime. Every device sits on its own
  PCIe root port so it can be removed again, and spare ports are reserved for
  hotplug; vCPUs and memory are declared with room to grow (-smp maxcpus,
  -m slots/maxmem). Chosen when the config asks for CPU or memory hotplug, NUMA,
  or a passed-through NIC, under TCG (see choose_machine), or with
  boot_options["machine"] = "q35".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import StrEnum

from agent.runtimes.base import RuntimeFailure, positive_int
from agent.runtimes.qemu.accel import Accel
from vmm import features
from vmm.agent.v1 import agent_pb2
from vmm.v1 import vm_pb2

MIB = 1024 * 1024
GIB = 1024 * MIB

# boot.boot_options keys this runtime reads.
MACHINE_OPTION = "machine"  # "microvm" | "q35"
ACCEL_OPTION = "accel"  # "auto" | "kvm" | "tcg": overrides the runtime's setting for one VM

# microvm has 24 virtio-mmio transports, shared by disks and NICs.
MICROVM_VIRTIO_TRANSPORTS = 24
MAX_DISKS = 16
MAX_NICS = 8
MAX_VCPUS = 255
MIN_MEMORY_BYTES = 16 * MIB
MAX_MEMORY_BYTES = 1024 * GIB

HUGEPAGE_SIZES = {"2M": 2 * MIB, "1G": GIB}
DISK_OPTIONS = ("cache_type", "io_engine", "direct", "num_queues", "queue_size",
                "rate_limit_bandwidth", "rate_limit_ops")
# rate_limit_bandwidth (bytes/s) is enforced on the host TAP by the agent, not by QEMU.
NIC_OPTIONS = ("vhost", "num_queues", "socket", "pci_address", "rate_limit_bandwidth")
# cache_type -> (host page cache bypassed, flushes ignored, guest-visible write cache)
CACHE_TYPES = {"writeback": (False, False, True), "none": (True, False, True),
               "directsync": (True, False, False), "writethrough": (False, False, False),
               "unsafe": (False, True, True)}
# io_engine -> the file driver's aio mode ("sync"/"async" are Firecracker's words).
IO_ENGINES = {"threads": "threads", "sync": "threads", "native": "native",
              "io_uring": "io_uring", "async": "io_uring"}


class Machine(StrEnum):
    MICROVM = "microvm"
    Q35 = "q35"


class NicKind(StrEnum):
    TAP = "tap"
    VHOST_USER = "vhost-user"
    VFIO = "vfio"


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
    if key == "cache_type" and v not in CACHE_TYPES:
        return f"expected one of {', '.join(CACHE_TYPES)}, got {value!r}"
    if key == "io_engine" and v not in IO_ENGINES:
        return f"expected one of {', '.join(IO_ENGINES)}, got {value!r}"
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
        elif key in ("num_queues", "rate_limit_bandwidth") and positive_int(value) is None:
            violation(f".options[{key}]", f"expected a positive whole number, got {value!r}")
        elif key == "vhost" and value.strip().lower() not in {"true", "false", "on", "off"}:
            violation(f".options[{key}]", f"expected true or false, got {value!r}")
    return out


_MAC = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
_PCI_ADDRESS = re.compile(r"[0-9A-Fa-f]{4}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7]")


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


def raise_violations(violations: Sequence[agent_pb2.FieldViolation]) -> None:
    if violations:
        raise RuntimeFailure("; ".join(f"{v.field}: {v.description}" for v in violations),
                             "INVALID_ARGUMENT")
