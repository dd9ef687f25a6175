"""Request validation: the shape of a VmConfig, then what a chosen backend can honour.

Backend checks read only the capability data agents report (vmm.v1.BackendCapabilities);
no backend is special-cased here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from controller.errors import Violation
from vmm import features
from vmm.v1 import host_pb2, vm_pb2

MIB = 1024 * 1024
# Patterns are matched against the whole string (re.fullmatch): no trailing newline.
VM_ID_PATTERN = re.compile(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?")
NAMESPACE_PATTERN = VM_ID_PATTERN
DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
ID_RULE = "must be 1-64 letters, digits, '_' or '-'"
MAC_PATTERN = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")

# Bounds on a request, so that a VM's record stays far below etcd's request limit and a
# listing page below a client's receive limit.
MAX_STRING_BYTES = 4096          # any string field of a config (a path, kernel_args, ...)
MAX_PATH_COMPONENT = 255         # what Linux allows for one file name
MAX_DEVICES = 64                 # disks, and network interfaces, per VM
MAX_MAP_ENTRIES = 64             # entries of any map (metadata, options, ...)
MAX_MAP_KEY_BYTES = 128
MAX_METADATA_BYTES = 64 * 1024   # all of config.metadata's keys and values together
MAX_LOOKUP_ID = 256              # longest id worth looking up (longer ones cannot exist)


def shown(value: str, limit: int = 64) -> str:
    """A value for an error message: quoted, and cut short when long."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


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
    if not VM_ID_PATTERN.fullmatch(vm_id):
        return [Violation(field_path, f"{shown(vm_id)} must be 1-63 lowercase letters, digits, "
                          "'.', '_' or '-', starting and ending with a letter or digit")]
    return []


def check_vm_id_lookup(vm_id: str, field_path: str = "vm_id") -> list[Violation]:
    """An id to look a VM up by: required and of a sane length (records made before the
    current id rules keep their ids, so the pattern is not applied)."""
    if not vm_id:
        return [Violation(field_path, "is required")]
    if len(vm_id) > MAX_LOOKUP_ID:
        return [Violation(field_path, f"{shown(vm_id)} is longer than any VM id")]
    return []


def check_namespace(namespace: str, field_path: str = "namespace") -> list[Violation]:
    if not NAMESPACE_PATTERN.fullmatch(namespace):
        return [Violation(field_path, f"{shown(namespace)} must be 1-63 lowercase letters, "
                          "digits, '.', '_' or '-', starting and ending with a letter or digit")]
    return []


def check_bounds(message: Message, prefix: str) -> list[Violation]:
    """Size limits on every field of a config, whatever the field: string lengths, map
    entries, repeated messages. Values are not looked at otherwise."""
    out: list[Violation] = []
    for fd, value in message.ListFields():
        path = f"{prefix}.{fd.name}"
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            # Metadata values are bounded by the metadata total instead.
            out.extend(_check_map(value, path, MAX_METADATA_BYTES if fd.name == "metadata"
                                  else MAX_STRING_BYTES))
        elif fd.is_repeated:
            if fd.type == FieldDescriptor.TYPE_MESSAGE and len(value) > MAX_DEVICES:
                out.append(Violation(path, f"{len(value)} entries exceed the limit of "
                                     f"{MAX_DEVICES}"))
                continue
            for i, item in enumerate(value):
                if fd.type == FieldDescriptor.TYPE_MESSAGE:
                    out.extend(check_bounds(item, f"{path}[{i}]"))
                elif isinstance(item, str) and len(item.encode()) > MAX_STRING_BYTES:
                    out.append(Violation(f"{path}[{i}]", _too_long(item)))
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            out.extend(check_bounds(value, path))
        elif isinstance(value, str | bytes) and len(value) > MAX_STRING_BYTES:
            out.append(Violation(path, _too_long(value)))
    return out


def _too_long(value: str | bytes) -> str:
    size = len(value.encode()) if isinstance(value, str) else len(value)
    return f"is {size} bytes long; the limit is {MAX_STRING_BYTES}"


def _check_map(entries: dict[str, str], path: str, max_value: int) -> list[Violation]:
    if len(entries) > MAX_MAP_ENTRIES:
        return [Violation(path, f"{len(entries)} entries exceed the limit of {MAX_MAP_ENTRIES}")]
    out: list[Violation] = []
    for key, value in entries.items():
        if not key or len(key.encode()) > MAX_MAP_KEY_BYTES:
            out.append(Violation(path, f"key {shown(key)} must be 1-{MAX_MAP_KEY_BYTES} bytes"))
        if isinstance(value, str) and len(value.encode()) > max_value:
            out.append(Violation(f"{path}[{shown(key)}]",
                                 f"is {len(value.encode())} bytes long; the limit is {max_value}"))
    return out


def check_path(path: str, field_path: str) -> list[Violation]:
    """An absolute host path of sane length (what the agent's path policy then judges)."""
    if not path.startswith("/"):
        return [Violation(field_path, f"{shown(path)} must be an absolute path")]
    if "\x00" in path:
        return [Violation(field_path, "must not contain a NUL character")]
    if any(len(part.encode()) > MAX_PATH_COMPONENT for part in path.split("/")):
        return [Violation(field_path, f"{shown(path)} has a component longer than "
                          f"{MAX_PATH_COMPONENT} bytes")]
    return []


def check_config(config: vm_pb2.VmConfig, prefix: str = "config") -> list[Violation]:
    """Backend-independent checks of a VM configuration."""
    out = check_bounds(config, prefix)
    metadata_bytes = sum(len(k.encode()) + len(v.encode()) for k, v in config.metadata.items())
    if metadata_bytes > MAX_METADATA_BYTES:
        out.append(Violation(f"{prefix}.metadata", f"is {metadata_bytes} bytes in all; the "
                             f"limit is {MAX_METADATA_BYTES}"))
    if out:
        return out  # the rest would only repeat oversized values

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
    else:
        out.extend(check_path(config.boot.kernel_path, f"{prefix}.boot.kernel_path"))
    if config.boot.initrd_path:
        out.extend(check_path(config.boot.initrd_path, f"{prefix}.boot.initrd_path"))
    out.extend(check_storage(config.storage, f"{prefix}.storage"))
    out.extend(check_network(config.network, f"{prefix}.network"))
    out.extend(check_restart_policy(config.restart_policy, f"{prefix}.restart_policy"))
    return out


def check_restart_policy(policy: vm_pb2.RestartPolicy, prefix: str) -> list[Violation]:
    out: list[Violation] = []
    if policy.mode not in vm_pb2.RestartMode.values():
        out.append(Violation(f"{prefix}.mode", f"unknown restart mode {policy.mode}"))
    for name in ("attempts", "interval_seconds", "delay_seconds", "max_delay_seconds"):
        if getattr(policy, name) < 0:
            out.append(Violation(f"{prefix}.{name}", "must not be negative"))
    if 0 < policy.backoff_multiplier < 1 or policy.backoff_multiplier < 0:
        out.append(Violation(f"{prefix}.backoff_multiplier",
                             "must be at least 1 (or 0 for the default, 2)"))
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
    if disk.id and not DEVICE_ID_PATTERN.fullmatch(disk.id):
        out.append(Violation(f"{prefix}.id", f"{shown(disk.id)} {ID_RULE}"))
    if not disk.path:
        out.append(Violation(f"{prefix}.path", "is required"))
    else:
        out.extend(check_path(disk.path, f"{prefix}.path"))
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
    if nic.id and not DEVICE_ID_PATTERN.fullmatch(nic.id):
        out.append(Violation(f"{prefix}.id", f"{shown(nic.id)} {ID_RULE}"))
    if nic.mac_address:
        if not MAC_PATTERN.fullmatch(nic.mac_address):
            out.append(Violation(
                f"{prefix}.mac_address",
                f"{shown(nic.mac_address)} is not a MAC address like 52:54:00:12:34:56"))
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
                             f"{shown(nic.tap_device)} is longer than the 15 characters Linux "
                             "allows"))
    if len(nic.bridge) > 15:
        out.append(Violation(f"{prefix}.bridge", f"{shown(nic.bridge)} is longer than the 15 "
                                                 "characters Linux allows"))
    if nic.mtu and not 68 <= nic.mtu <= 65535:
        out.append(Violation(f"{prefix}.mtu", f"{nic.mtu} is not 0 (the bridge's) or 68-65535"))
    if not 0 <= nic.vlan <= 4094:
        out.append(Violation(f"{prefix}.vlan", f"{nic.vlan} is not 0 (none) or 1-4094"))
    if nic.network and nic.ip_address:
        out.append(Violation(f"{prefix}.ip_address",
                             "is handed out by the controller from the NIC's network; leave it "
                             "empty"))
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
                  prefix: str = "config",
                  used: list[tuple[str, str]] | None = None) -> BackendFit:
    """Check a (structurally valid) config against one backend's declared capabilities.

    `used` is features.features_used(config), when the caller has it already."""
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
    for key, field_path in features.features_used(config) if used is None else used:
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
