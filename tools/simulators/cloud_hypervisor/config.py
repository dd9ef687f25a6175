"""The VM config: its schema (vmm/src/vm_config.rs) as serde sees it, and its checks at boot."""

from __future__ import annotations

import random
from typing import Any

from tools.simulators.cloud_hypervisor.serde import (
    ANY,
    BOOL,
    PATH,
    REQUIRED,
    STRING,
    U8,
    U16,
    U32,
    U64,
    USIZE,
    Field,
    ListOf,
    Maybe,
    Struct,
    Variant,
)

MAX_SUPPORTED_CPUS = 8192  # x86_64 with KVM
MINIMUM_BLOCK_QUEUE_SIZE = 2
VIRTIO_BLK_ID_BYTES = 20
MIN_MTU = 1280
VHOST_USER_RATE_LIMITER = "Rate limiting is not supported with vhost-user"


# ---- the config schema (vmm/src/vm_config.rs) -----------------------------------------


def _random_mac() -> str:
    # MacAddr::local_random(): locally administered, unicast.
    octets = [random.randrange(256) for _ in range(6)]
    octets[0] = (octets[0] | 0x02) & 0xFE
    return ":".join(f"{o:02x}" for o in octets)


PCI_COMMON = (
    Field("id", Maybe(STRING)),
    Field("iommu", BOOL, False, skip_if_false=True),
    Field("pci_segment", U16, 0),
    Field("pci_device_id", Maybe(U8)),
)
TOKEN_BUCKET = Struct("TokenBucketConfig", [
    Field("size", U64, REQUIRED), Field("one_time_burst", Maybe(U64)),
    Field("refill_time", U64, REQUIRED)])
RATE_LIMITER = Struct("RateLimiterConfig", [
    Field("bandwidth", Maybe(TOKEN_BUCKET)), Field("ops", Maybe(TOKEN_BUCKET))],
    deny_unknown=True)
CPU_TOPOLOGY = Struct("CpuTopology", [
    Field("threads_per_core", U16, REQUIRED), Field("cores_per_die", U16, REQUIRED),
    Field("dies_per_package", U16, REQUIRED), Field("packages", U16, REQUIRED)])
CPU_AFFINITY = Struct("CpuAffinity", [
    Field("vcpu", U32, REQUIRED), Field("host_cpus", ListOf(USIZE), REQUIRED)])
CPUS = Struct("CpusConfig", [
    Field("boot_vcpus", U32, REQUIRED), Field("max_vcpus", U32, REQUIRED),
    Field("topology", Maybe(CPU_TOPOLOGY)), Field("kvm_hyperv", BOOL, False),
    Field("max_phys_bits", U8, 46), Field("affinity", Maybe(ListOf(CPU_AFFINITY))),
    Field("features", ANY, dict), Field("nested", BOOL, True)])
HOTPLUG_METHOD = Variant("HotplugMethod", ["Acpi", "VirtioMem"])
MEMORY_ZONE = Struct("MemoryZoneConfig", [
    Field("id", STRING, REQUIRED), Field("size", U64, REQUIRED), Field("file", Maybe(PATH)),
    Field("shared", BOOL, False), Field("hugepages", BOOL, False),
    Field("hugepage_size", Maybe(U64)), Field("host_numa_node", Maybe(U32)),
    Field("hotplug_size", Maybe(U64)), Field("hotplugged_size", Maybe(U64)),
    Field("prefault", BOOL, False)])
MEMORY = Struct("MemoryConfig", [
    Field("size", U64, REQUIRED), Field("mergeable", BOOL, False),
    Field("hotplug_method", HOTPLUG_METHOD, "Acpi"), Field("hotplug_size", Maybe(U64)),
    Field("hotplugged_size", Maybe(U64)), Field("shared", BOOL, False),
    Field("hugepages", BOOL, False), Field("hugepage_size", Maybe(U64)),
    Field("prefault", BOOL, False), Field("zones", Maybe(ListOf(MEMORY_ZONE))),
    Field("thp", BOOL, True)])
PAYLOAD = Struct("PayloadConfig", [
    Field("firmware", Maybe(PATH)), Field("kernel", Maybe(PATH)),
    Field("cmdline", Maybe(STRING)), Field("initramfs", Maybe(PATH))])
IMAGE_TYPE = Variant("ImageType", ["FixedVhd", "Qcow2", "Raw", "Vhdx", "Unknown"])
DISK = Struct("DiskConfig", [
    *PCI_COMMON, Field("path", Maybe(PATH)), Field("readonly", BOOL, False),
    Field("direct", BOOL, False), Field("num_queues", USIZE, 1), Field("queue_size", U16, 128),
    Field("vhost_user", BOOL, False), Field("vhost_socket", Maybe(STRING)),
    Field("rate_limit_group", Maybe(STRING)),
    Field("rate_limiter_config", Maybe(RATE_LIMITER)),
    Field("disable_io_uring", BOOL, False), Field("disable_aio", BOOL, False),
    Field("serial", Maybe(STRING)), Field("backing_files", BOOL, False),
    Field("sparse", BOOL, True), Field("image_type", IMAGE_TYPE, "Unknown")])
NET = Struct("NetConfig", [
    *PCI_COMMON, Field("tap", Maybe(STRING)), Field("ip", Maybe(STRING)),
    Field("mask", Maybe(STRING)), Field("mac", STRING, _random_mac),
    Field("host_mac", Maybe(STRING)), Field("mtu", Maybe(U16)),
    Field("num_queues", USIZE, 2), Field("queue_size", U16, 256),
    Field("vhost_user", BOOL, False), Field("vhost_socket", Maybe(STRING)),
    Field("vhost_mode", Variant("VhostMode", ["Client", "Server"]), "Client"),
    Field("rate_limiter_config", Maybe(RATE_LIMITER)),
    Field("offload_tso", BOOL, True), Field("offload_ufo", BOOL, True),
    Field("offload_csum", BOOL, True)])
RNG = Struct("RngConfig", [*PCI_COMMON, Field("src", PATH, REQUIRED)])
CONSOLE_MODE = Variant("ConsoleOutputMode", ["Off", "Pty", "Tty", "File", "Socket", "Null"])
SERIAL = Struct("SerialConfig", [
    Field("file", Maybe(PATH)), Field("mode", CONSOLE_MODE, REQUIRED),
    Field("socket", Maybe(PATH))])
CONSOLE = Struct("ConsoleConfig", [
    Field("file", Maybe(PATH)), Field("mode", CONSOLE_MODE, REQUIRED),
    Field("socket", Maybe(PATH)), *PCI_COMMON])
NUMA = Struct("NumaConfig", [
    Field("guest_numa_id", U32, REQUIRED), Field("cpus", Maybe(ListOf(U32))),
    Field("distances", Maybe(ANY)), Field("memory_zones", Maybe(ListOf(STRING))),
    Field("pci_segments", Maybe(ANY)), Field("device_id", Maybe(STRING))])
_OPTIONAL_PASSTHROUGH = ("rate_limit_groups", "balloon", "generic_vhost_user", "fs", "pmem",
                         "devices", "user_devices", "vdpa", "vsock", "rtc", "pci_segments",
                         "platform", "tpm", "landlock_rules")
VM_CONFIG = Struct("VmConfig", [
    Field("cpus", CPUS, lambda: CPUS.default_value(boot_vcpus=1, max_vcpus=1)),
    Field("memory", MEMORY, lambda: MEMORY.default_value(size=512 << 20)),
    Field("payload", Maybe(PAYLOAD)),
    Field("disks", Maybe(ListOf(DISK))),
    Field("net", Maybe(ListOf(NET))),
    Field("rng", RNG, lambda: RNG.default_value(src="/dev/urandom")),
    Field("serial", SERIAL, lambda: SERIAL.default_value(mode="Null")),
    Field("console", CONSOLE, lambda: CONSOLE.default_value(mode="Tty")),
    Field("debug_console", ANY, lambda: {"mode": "Off", "iobase": 233}),
    Field("numa", Maybe(ListOf(NUMA))),
    Field("pvpanic", BOOL, False), Field("iommu", BOOL, False),
    Field("watchdog", BOOL, False), Field("landlock_enable", BOOL, False),
    *(Field(name, Maybe(ANY)) for name in _OPTIONAL_PASSTHROUGH),
])
RESIZE_DATA = Struct("VmResizeData", [
    Field("desired_vcpus", Maybe(U32)), Field("desired_ram", Maybe(U64)),
    Field("desired_balloon", Maybe(U64))])
REMOVE_DEVICE_DATA = Struct("VmRemoveDeviceData", [Field("id", STRING, REQUIRED)])


# ---- config validation at boot (VmConfig::validate, vmm/src/config.rs) -----------------


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def validation_error(config: dict[str, Any]) -> list[str] | None:
    """The error chain below "Failed to validate config", or None when the config is valid."""
    payload = config.get("payload")
    if not payload or ("kernel" not in payload and "firmware" not in payload):
        return ["Payload configuration is not bootable",
                "No bootitem provided: neither firmware nor kernel"]
    if "kernel" in payload and "firmware" in payload:
        return ["Payload configuration is not bootable",
                "Specifying a kernel is not supported when a firmware is provided"]
    for console in (config["console"], config["serial"]):
        if console["mode"] == "File" and "file" not in console:
            return ["Path missing when using file console mode"]
    cpus, memory = config["cpus"], config["memory"]
    if cpus["max_vcpus"] < cpus["boot_vcpus"]:
        return [f"Max CPUs ({cpus['max_vcpus']}) lower than boot CPUs ({cpus['boot_vcpus']})"]
    if cpus["max_vcpus"] > MAX_SUPPORTED_CPUS:
        return [f"Too many CPUs: specified {cpus['max_vcpus']} but {MAX_SUPPORTED_CPUS} "
                "is the limit"]
    shared_memory = memory["shared"] or memory["hugepages"]
    ids: set[str] = set()

    def identifier_error(device: dict[str, Any]) -> list[str] | None:
        device_id = device.get("id")
        if device_id is None:
            return None
        if device_id.startswith("__"):
            return [f"Identifier {device_id} is not invalid"]
        if device_id in ids:
            return [f"Identifier {device_id} is not unique"]
        ids.add(device_id)
        return None

    for disk in config.get("disks") or []:
        if "vhost_socket" in disk and "path" in disk:
            return ["Disk path and vhost socket both provided"]
        if disk["vhost_user"] and not shared_memory:
            return ["Using vhost-user requires using shared memory or huge pages"]
        if disk["vhost_user"] and "vhost_socket" not in disk:
            return ["No socket provided when using vhost-user"]
        if disk["vhost_user"] and ("rate_limiter_config" in disk
                                   or "rate_limit_group" in disk):
            return [VHOST_USER_RATE_LIMITER]
        if disk["num_queues"] > cpus["boot_vcpus"]:
            return [f"Queue count ({disk['num_queues']}) must not exceed boot vCPUs "
                    f"({cpus['boot_vcpus']})"]
        if not _is_power_of_two(disk["queue_size"]):
            return [f"Queue size must be a power of 2 no greater than 32768: "
                    f"{disk['queue_size']}"]
        if disk["queue_size"] <= MINIMUM_BLOCK_QUEUE_SIZE:
            return [f"Block queue size must be greater than {MINIMUM_BLOCK_QUEUE_SIZE}: "
                    f"{disk['queue_size']}"]
        serial = disk.get("serial")
        if serial is not None and len(serial.encode()) > VIRTIO_BLK_ID_BYTES:
            return [f"Block device serial length ({len(serial.encode())}) exceeds maximum "
                    f"allowed length ({VIRTIO_BLK_ID_BYTES})"]
        if error := identifier_error(disk):
            return error
    for net in config.get("net") or []:
        if net["vhost_user"] and not shared_memory:
            return ["Using vhost-user requires using shared memory or huge pages"]
        if net["vhost_user"] and "vhost_socket" not in net:
            return ["No socket provided when using vhost-user"]
        if net["vhost_user"] and "rate_limiter_config" in net:
            return [VHOST_USER_RATE_LIMITER]
        if net["num_queues"] < 2:
            return [f"Number of queues ({net['num_queues']}) to virtio_net should be higher "
                    "than 2"]
        if net["num_queues"] // 2 > cpus["boot_vcpus"]:
            return [f"Queue count ({net['num_queues']}) must not exceed boot vCPUs "
                    f"({cpus['boot_vcpus']})"]
        if not _is_power_of_two(net["queue_size"]):
            return [f"Queue size must be a power of 2 no greater than 32768: "
                    f"{net['queue_size']}"]
        if "mtu" in net and net["mtu"] < MIN_MTU:
            return [f"Provided MTU {net['mtu']} is lower than {MIN_MTU} (expected by VIRTIO "
                    "specification)"]
        if error := identifier_error(net):
            return error
    for device in (config["rng"], config["console"]):
        if error := identifier_error(device):
            return error
    topology = cpus.get("topology")
    if topology:
        parts = (topology["threads_per_core"], topology["cores_per_die"],
                 topology["dies_per_package"], topology["packages"])
        if 0 in parts:
            return ["No part of the CPU topology can be zero"]
        if topology["threads_per_core"] > 2:
            return ["CPU topology supports at most 2 threads per core"]
        if parts[0] * parts[1] * parts[2] * parts[3] != cpus["max_vcpus"]:
            return ["Product of CPU topology parts does not match maximum vCPU"]
    if "hugepage_size" in memory:
        if not memory["hugepages"]:
            return ["Huge page size specified but huge pages not enabled"]
        if not _is_power_of_two(memory["hugepage_size"]):
            return [f"Huge page size is not power of 2: {memory['hugepage_size']}"]
    if memory["shared"] and memory["mergeable"]:
        return ["Invalid to set both 'mergeable' and 'shared' for memory"]
    return None


def memory_actual_size(config: dict[str, Any]) -> int:
    """vm.info's memory_actual_size for ACPI hotplug: the configured RAM and zones."""
    memory = config["memory"]
    return int(memory["size"] + sum(zone["size"] for zone in memory.get("zones") or []))
