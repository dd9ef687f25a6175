"""The unified API's feature vocabulary: the rows of the backend support matrix.

Runtimes declare, per feature key below, how they support it (vmm.v1.Support)
in their BackendCapabilities; the controller reads those declarations to
validate requests, warn about ignored fields and pick backends; the docs table
is generated from them. This module only names features and says which parts
of a VmConfig use which feature: it holds no backend's answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmm.v1 import host_pb2, vm_pb2


@dataclass(frozen=True)
class FeatureDef:
    key: str
    category: str
    title: str


CORE = "Core VM Operations"
CPU = "CPU"
MEMORY = "Memory"
STORAGE = "Storage"
NETWORK = "Network"
CONSOLE = "Console & Debugging"

# In the order of the support matrix.
FEATURES: tuple[FeatureDef, ...] = (
    FeatureDef("vm.create", CORE, "VM Creation"),
    FeatureDef("vm.boot", CORE, "VM Boot"),
    FeatureDef("vm.shutdown", CORE, "VM Shutdown"),
    FeatureDef("vm.pause_resume", CORE, "VM Pause/Resume"),
    FeatureDef("vm.reboot", CORE, "VM Reboot"),
    FeatureDef("vm.delete", CORE, "VM Delete"),
    FeatureDef("cpu.vcpu_count", CPU, "vCPU Count"),
    FeatureDef("cpu.hotplug", CPU, "CPU Hotplug"),
    FeatureDef("cpu.max_vcpu_count", CPU, "max_vcpu_count"),
    FeatureDef("cpu.topology", CPU, "CPU Topology"),
    FeatureDef("cpu.affinity", CPU, "CPU Affinity"),
    FeatureDef("memory.size", MEMORY, "Memory Size"),
    FeatureDef("memory.hotplug", MEMORY, "Memory Hotplug"),
    FeatureDef("memory.hugepages", MEMORY, "Hugepages"),
    FeatureDef("memory.numa", MEMORY, "NUMA"),
    FeatureDef("memory.sharing", MEMORY, "Memory Sharing"),
    FeatureDef("storage.block", STORAGE, "Block Devices"),
    FeatureDef("storage.read_only", STORAGE, "Read-only Disks"),
    FeatureDef("storage.multiple", STORAGE, "Multiple Disks"),
    FeatureDef("storage.hotplug", STORAGE, "Disk Hotplug"),
    FeatureDef("storage.advanced_io", STORAGE, "Advanced I/O"),
    FeatureDef("network.tap", NETWORK, "TAP Interfaces"),
    FeatureDef("network.mac", NETWORK, "MAC Addresses"),
    FeatureDef("network.vhost_user", NETWORK, "vhost-user"),
    FeatureDef("network.hotplug", NETWORK, "Network Hotplug"),
    FeatureDef("network.sriov", NETWORK, "SR-IOV"),
    FeatureDef("console.serial", CONSOLE, "Serial Console"),
    FeatureDef("console.logging", CONSOLE, "Console Logging"),
    FeatureDef("debug.rich", CONSOLE, "Debug Features"),
    FeatureDef("debug.gdb", CONSOLE, "GDB Support"),
)
FEATURES_BY_KEY = {f.key: f for f in FEATURES}

# Backend names as the API spells them.
FIRECRACKER = "firecracker"
CLOUD_HYPERVISOR = "cloud-hypervisor"
QEMU = "qemu"
BACKENDS = (FIRECRACKER, CLOUD_HYPERVISOR, QEMU)

# Keys of the free-form maps that select features.
CPU_AFFINITY_KEY = "affinity"  # cpu.features["affinity"] = "0-3"
HUGEPAGES_KEY = "hugepages"  # memory.backing["hugepages"] = "2M" | "1G"
NUMA_KEY = "numa_nodes"  # memory.backing["numa_nodes"] = "2"
SHARED_KEY = "shared"  # memory.backing["shared"] = "true"
GDB_KEY = "gdb_socket"  # boot.boot_options["gdb_socket"] = path
# storage.options / network options keys counted as advanced I/O.
ADVANCED_IO_KEYS = frozenset(
    {"io_engine", "direct", "num_queues", "queue_size", "rate_limit_bandwidth",
     "rate_limit_ops", "cache_type"}
)
VHOST_USER_TYPES = frozenset({"vhost-user", "vhost_user"})
SRIOV_TYPES = frozenset({"sriov", "vfio"})


def feature(key: str, support: host_pb2.Support.ValueType, detail: str = "") -> host_pb2.Feature:
    """One row of a runtime's capability declaration."""
    d = FEATURES_BY_KEY[key]
    return host_pb2.Feature(name=key, support=support, detail=detail, category=d.category,
                            title=d.title)


def _truthy(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def features_used(config: vm_pb2.VmConfig) -> list[tuple[str, str]]:
    """(feature key, field path) for every optional feature a config asks for.

    Core features every VM uses (create, boot, serial console, ...) are not
    listed; limits (counts, sizes) are checked against BackendLimits instead.
    """
    used: list[tuple[str, str]] = []
    cpu, mem = config.cpu, config.memory
    # max_vcpu_count is hotplug *preparation*: its own row, so a backend can ignore it
    # (Firecracker) without refusing the VM; cpu.hotplug itself is used by ResizeVm.
    if cpu.max_vcpu_count:
        used.append(("cpu.max_vcpu_count", "config.cpu.max_vcpu_count"))
    if cpu.HasField("topology") and (
        cpu.topology.sockets > 1 or cpu.topology.cores_per_socket > 0
        or cpu.topology.threads_per_core > 1
    ):
        used.append(("cpu.topology", "config.cpu.topology"))
    if CPU_AFFINITY_KEY in cpu.features:
        used.append(("cpu.affinity", f"config.cpu.features[{CPU_AFFINITY_KEY}]"))
    if mem.hotplug_enabled:
        used.append(("memory.hotplug", "config.memory.hotplug_enabled"))
    elif mem.max_size_bytes > mem.size_bytes:
        used.append(("memory.hotplug", "config.memory.max_size_bytes"))
    if HUGEPAGES_KEY in mem.backing:
        used.append(("memory.hugepages", f"config.memory.backing[{HUGEPAGES_KEY}]"))
    if NUMA_KEY in mem.backing:
        used.append(("memory.numa", f"config.memory.backing[{NUMA_KEY}]"))
    if _truthy(mem.backing.get(SHARED_KEY, "")):
        used.append(("memory.sharing", f"config.memory.backing[{SHARED_KEY}]"))
    for i, disk in enumerate(config.storage):
        if disk.read_only:
            used.append(("storage.read_only", f"config.storage[{i}].read_only"))
        for key in sorted(ADVANCED_IO_KEYS & disk.options.keys()):
            used.append(("storage.advanced_io", f"config.storage[{i}].options[{key}]"))
    if len(config.storage) > 1:
        used.append(("storage.multiple", "config.storage"))
    for i, nic in enumerate(config.network):
        if nic.mac_address:
            used.append(("network.mac", f"config.network[{i}].mac_address"))
        kind = nic.interface_type.lower()
        if kind in VHOST_USER_TYPES:
            used.append(("network.vhost_user", f"config.network[{i}].interface_type"))
        if kind in SRIOV_TYPES:
            used.append(("network.sriov", f"config.network[{i}].interface_type"))
    if GDB_KEY in config.boot.boot_options:
        used.append(("debug.gdb", f"config.boot.boot_options[{GDB_KEY}]"))
    return used


def support_of(caps: host_pb2.BackendCapabilities, key: str) -> host_pb2.Feature:
    """The backend's declaration for key; an undeclared feature counts as unsupported."""
    for f in caps.features:
        if f.name == key:
            return f
    return feature(key, host_pb2.SUPPORT_NONE, "not declared by the backend")
