"""Request validation: the shape of a VmConfig, then what a chosen backend can honour.

Backend checks read only the capability data agents report (vmm.v1.BackendCapabilities);
no backend is special-cased here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from controller.errors import Violation
from vmm import features
from vmm.v1 import host_pb2, vm_pb2

MIB = 1024 * 1024
VM_ID_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ID_RULE = "must be 1-64 letters, digits, '_' or '-'"
MAC_PATTERN = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def human_bytes(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n} bytes"


def check_vm_id(vm_id: str, field_path: str = "vm_id") -> list[Violation]:
    if not vm_id:
        return [Violation(field_path, "is required")]
    if not VM_ID_PATTERN.match(vm_id):
        return [Violation(field_path, f"{vm_id!r} must be 1-63 lowercase letters, digits, '.', '_' "
                          "or '-', starting and ending with a letter or digit")]
    return []


def check_config(config: vm_pb2.VmConfig, prefix: str = "config") -> list[Violation]:
    """Backend-independent checks of a VM configuration."""
    out: list[Violation] = []

    def bad(path: str, description: str) -> None:
        out.append(Violation(f"{prefix}.{path}", description))

    if not config.HasField("cpu"):
        bad("cpu", "is required")
    else:
        cpu = config.cpu
        if cpu.vcpu_count < 1:
            bad("cpu.vcpu_count", f"must be at least 1, got {cpu.vcpu_count}")
        if cpu.max_vcpu_count < 0:
            bad("cpu.max_vcpu_count", f"must not be negative, got {cpu.max_vcpu_count}")
        elif 0 < cpu.max_vcpu_count < cpu.vcpu_count:
            bad("cpu.max_vcpu_count",
                f"{cpu.max_vcpu_count} is below vcpu_count {cpu.vcpu_count}")
        for name in ("sockets", "cores_per_socket", "threads_per_core"):
            if getattr(cpu.topology, name) < 0:
                bad(f"cpu.topology.{name}", "must not be negative")
    if not config.HasField("memory"):
        bad("memory", "is required")
    else:
        mem = config.memory
        if mem.size_bytes <= 0:
            bad("memory.size_bytes", f"must be positive, got {mem.size_bytes}")
        elif mem.size_bytes % MIB:
            bad("memory.size_bytes", f"{mem.size_bytes} is not a whole number of MiB")
        if mem.max_size_bytes < 0:
            bad("memory.max_size_bytes", f"must not be negative, got {mem.max_size_bytes}")
        elif mem.max_size_bytes and mem.max_size_bytes < mem.size_bytes:
            bad("memory.max_size_bytes",
                f"{mem.max_size_bytes} is below size_bytes {mem.size_bytes}")
        elif mem.max_size_bytes % MIB:
            bad("memory.max_size_bytes", f"{mem.max_size_bytes} is not a whole number of MiB")
        if mem.hotplug_enabled and mem.max_size_bytes <= mem.size_bytes:
            bad("memory.max_size_bytes", "must exceed size_bytes when hotplug_enabled is set")
    if not config.HasField("boot"):
        bad("boot", "is required")
    elif not config.boot.kernel_path:
        bad("boot.kernel_path", "is required")
    elif not config.boot.kernel_path.startswith("/"):
        bad("boot.kernel_path", f"{config.boot.kernel_path!r} must be an absolute path")
    if config.boot.initrd_path and not config.boot.initrd_path.startswith("/"):
        bad("boot.initrd_path", f"{config.boot.initrd_path!r} must be an absolute path")
    out.extend(check_storage(config.storage, f"{prefix}.storage"))
    out.extend(check_network(config.network, f"{prefix}.network"))
    return out


def check_storage(disks: Iterable[vm_pb2.StorageDevice], prefix: str) -> list[Violation]:
    out: list[Violation] = []
    seen: dict[str, int] = {}
    roots: list[int] = []
    for i, disk in enumerate(disks):
        out.extend(check_disk(disk, f"{prefix}[{i}]"))
        if disk.id:
            if disk.id in seen:
                first = f"{prefix}[{seen[disk.id]}]"
                out.append(Violation(f"{prefix}[{i}].id",
                                     f"duplicate storage id {disk.id!r} (also {first})"))
            seen.setdefault(disk.id, i)
        if disk.is_root_device:
            roots.append(i)
    if len(roots) > 1:
        out.append(Violation(
            f"{prefix}[{roots[1]}].is_root_device",
            f"only one root device is allowed; {prefix}[{roots[0]}] is already root"))
    return out


def check_disk(disk: vm_pb2.StorageDevice, prefix: str) -> list[Violation]:
    out: list[Violation] = []
    if disk.id and not DEVICE_ID_PATTERN.match(disk.id):
        out.append(Violation(f"{prefix}.id", f"{disk.id!r} {ID_RULE}"))
    if not disk.path:
        out.append(Violation(f"{prefix}.path", "is required"))
    elif not disk.path.startswith("/"):
        out.append(Violation(f"{prefix}.path", f"{disk.path!r} must be an absolute path"))
    return out


def check_network(nics: Iterable[vm_pb2.NetworkInterface], prefix: str) -> list[Violation]:
    out: list[Violation] = []
    seen: dict[str, int] = {}
    for i, nic in enumerate(nics):
        out.extend(check_nic(nic, f"{prefix}[{i}]"))
        if nic.id:
            if nic.id in seen:
                first = f"{prefix}[{seen[nic.id]}]"
                out.append(Violation(f"{prefix}[{i}].id",
                                     f"duplicate network id {nic.id!r} (also {first})"))
            seen.setdefault(nic.id, i)
    return out


def check_nic(nic: vm_pb2.NetworkInterface, prefix: str) -> list[Violation]:
    out: list[Violation] = []
    if nic.id and not DEVICE_ID_PATTERN.match(nic.id):
        out.append(Violation(f"{prefix}.id", f"{nic.id!r} {ID_RULE}"))
    if nic.mac_address:
        if not MAC_PATTERN.match(nic.mac_address):
            out.append(Violation(
                f"{prefix}.mac_address",
                f"{nic.mac_address!r} is not a MAC address like 52:54:00:12:34:56"))
        elif int(nic.mac_address[:2], 16) & 1:
            out.append(Violation(
                f"{prefix}.mac_address",
                f"{nic.mac_address!r} is a multicast address; a NIC needs a unicast one"))
    # vhost-user and SR-IOV (VFIO) interfaces have no TAP device on the host.
    kind = nic.interface_type.lower()
    if kind not in features.VHOST_USER_TYPES | features.SRIOV_TYPES and not (
            nic.tap_device or nic.network):
        out.append(Violation(f"{prefix}.tap_device", "is required (or a network)"))
    elif len(nic.tap_device) > 15:
        out.append(Violation(f"{prefix}.tap_device",
                             f"{nic.tap_device!r} is longer than the 15 characters Linux allows"))
    return out


@dataclass
class BackendFit:
    """Whether one backend can run a config, and what it would ignore."""

    backend: str
    violations: list[Violation] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def check_backend(config: vm_pb2.VmConfig, caps: host_pb2.BackendCapabilities,
                  prefix: str = "config") -> BackendFit:
    """Check a (structurally valid) config against one backend's declared capabilities."""
    name = caps.backend
    fit = BackendFit(name)
    lim = caps.limits

    def bad(path: str, description: str) -> None:
        fit.violations.append(Violation(f"{prefix}.{path}", description))

    vcpus = config.cpu.vcpu_count
    if lim.max_vcpus and not lim.min_vcpus <= vcpus <= lim.max_vcpus:
        bad("cpu.vcpu_count",
            f"{vcpus} is outside {name}'s range of {lim.min_vcpus}-{lim.max_vcpus} vCPUs")
    mem = config.memory.size_bytes
    if mem < lim.min_memory_bytes or (lim.max_memory_bytes and mem > lim.max_memory_bytes):
        upper = human_bytes(lim.max_memory_bytes) if lim.max_memory_bytes else "no limit"
        bad("memory.size_bytes", f"{human_bytes(mem)} is outside {name}'s range of "
            f"{human_bytes(lim.min_memory_bytes)} to {upper}")
    if lim.max_disks and len(config.storage) > lim.max_disks:
        bad("storage", f"{len(config.storage)} disks exceed {name}'s limit of {lim.max_disks}")
    if lim.max_nics and len(config.network) > lim.max_nics:
        bad("network", f"{len(config.network)} network interfaces exceed {name}'s limit of "
            f"{lim.max_nics}")

    ignored: set[str] = set()
    for key, field_path in features.features_used(config):
        decl = features.support_of(caps, key)
        path = field_path.removeprefix("config.")
        if decl.support == host_pb2.SUPPORT_NONE:
            bad(path, f"{decl.title or key} is not supported by {name}")
        elif decl.support == host_pb2.SUPPORT_IGNORED and key not in ignored:
            ignored.add(key)
            why = f": {decl.detail}" if decl.detail else ""
            fit.warnings.append(f"{prefix}.{path} is ignored by {name}{why}")
    if config.cpu.max_vcpu_count and "cpu.max_vcpu_count" not in ignored:
        if lim.max_vcpus and config.cpu.max_vcpu_count > lim.max_vcpus:
            bad("cpu.max_vcpu_count", f"{config.cpu.max_vcpu_count} is above {name}'s limit of "
                f"{lim.max_vcpus} vCPUs")
    return fit


def required_feature(caps: host_pb2.BackendCapabilities, key: str) -> str | None:
    """An error message if the backend cannot do `key` at all, else None."""
    decl = features.support_of(caps, key)
    if decl.support in (host_pb2.SUPPORT_NONE, host_pb2.SUPPORT_UNSPECIFIED):
        return f"{decl.title or key} is not supported by {caps.backend}"
    return None
