"""The QEMU column of the backend support matrix, the runtime's limits, and the checks a
config must pass on this host before a VM is created from it."""

from __future__ import annotations

from pathlib import Path

from agent.runtimes.qemu.accel import Accel, kvm_device_usable
from agent.runtimes.qemu.config import (
    ACCEL_OPTION,
    HUGEPAGE_SIZES,
    MAX_DISKS,
    MAX_MEMORY_BYTES,
    MAX_NICS,
    MAX_VCPUS,
    MIN_MEMORY_BYTES,
    config_violations,
    hugepage_size,
    requested_accel,
)
from vmm import features
from vmm.agent.v1 import agent_pb2
from vmm.v1 import host_pb2, vm_pb2

_FULL = host_pb2.SUPPORT_FULL
_PARTIAL = host_pb2.SUPPORT_PARTIAL
_NONE = host_pb2.SUPPORT_NONE

SUPPORT_MATRIX: tuple[tuple[str, host_pb2.Support.ValueType, str], ...] = (
    # feature key            support    detail
    ("vm.create",            _FULL,     ""),
    ("vm.boot",              _FULL,     "KVM where the guest runs under it, else TCG emulation"),
    ("vm.shutdown",          _FULL,     "graceful: ACPI power button, then quit after the timeout"),
    ("vm.pause_resume",      _FULL,     ""),
    ("vm.reboot",            _PARTIAL,  "hard reset (system_reset): the guest is not asked first"),
    ("vm.delete",            _FULL,     ""),
    ("cpu.vcpu_count",       _FULL,     f"1-{MAX_VCPUS} vCPUs"),
    ("cpu.hotplug",          _PARTIAL,  "q35 machine (chosen when max_vcpu_count > vcpu_count); "
                                        "removal needs the guest to release the vCPU"),
    ("cpu.max_vcpu_count",   _FULL,     "-smp maxcpus"),
    ("cpu.topology",         _FULL,     "sockets, cores, threads"),
    ("cpu.affinity",         _PARTIAL,  "all vCPU threads pinned to one host CPU set"),
    ("memory.size",          _FULL,     "16 MiB - 1 TiB"),
    ("memory.hotplug",       _PARTIAL,  "q35 machine, up to max_size_bytes in DIMMs; removal "
                                        "only of hot-added DIMMs the guest releases"),
    ("memory.hugepages",     _FULL,     "2M/1G (memfd hugetlb; pages reserved on the host)"),
    ("memory.numa",          _FULL,     "q35 machine; vCPUs and memory split evenly"),
    ("memory.sharing",       _FULL,     "shared memfd backing"),
    ("storage.block",        _FULL,     "virtio-blk on files and raw block devices"),
    ("storage.read_only",    _FULL,     ""),
    ("storage.multiple",     _FULL,     f"up to {MAX_DISKS}"),
    ("storage.hotplug",      _PARTIAL,  "q35 machine (boot_options machine=q35)"),
    ("storage.advanced_io",  _FULL,     "cache modes, io_uring/native AIO, queues, rate limits"),
    ("network.tap",          _FULL,     f"up to {MAX_NICS}"),
    ("network.mac",          _FULL,     ""),
    ("network.vhost_user",   _FULL,     "options[socket]; guest memory is shared"),
    ("network.hotplug",      _PARTIAL,  "q35 machine (boot_options machine=q35)"),
    ("network.sriov",        _PARTIAL,  "VFIO passthrough of options[pci_address]; q35 machine"),
    ("console.serial",       _FULL,     ""),
    ("console.logging",      _FULL,     "file output"),
    ("debug.rich",           _FULL,     "QMP introspection"),
    ("debug.gdb",            _FULL,     "gdbstub on boot_options[gdb_socket]"),
)  # fmt: skip

LIMITS = host_pb2.BackendLimits(
    min_vcpus=1, max_vcpus=MAX_VCPUS,
    min_memory_bytes=MIN_MEMORY_BYTES, max_memory_bytes=MAX_MEMORY_BYTES,
    max_disks=MAX_DISKS, max_nics=MAX_NICS,
)


def preflight_violations(config: vm_pb2.VmConfig,
                         default_accel: Accel) -> list[agent_pb2.FieldViolation]:
    """What keeps config from running here: its own faults and what this host lacks."""
    violations = config_violations(config)
    if not any(v.field.startswith("config.boot.boot_options") for v in violations):
        if requested_accel(config, default_accel) == Accel.KVM and not kvm_device_usable():
            violations.append(agent_pb2.FieldViolation(
                field=f"config.boot.boot_options[{ACCEL_OPTION}]",
                description="kvm was asked for but /dev/kvm is missing or not usable here"))
    violations += _hugepage_violations(config)
    return violations


def _hugepage_violations(config: vm_pb2.VmConfig) -> list[agent_pb2.FieldViolation]:
    """Hugepage-backed memory needs that many free pages of the size on this host."""
    size = hugepage_size(config)
    if not size:
        return []
    pool = Path(f"/sys/kernel/mm/hugepages/hugepages-{size // 1024}kB/free_hugepages")
    name = next(k for k, v in HUGEPAGE_SIZES.items() if v == size)
    field_path = f"config.memory.backing[{features.HUGEPAGES_KEY}]"
    try:
        free = int(pool.read_text())
    except (OSError, ValueError):
        return [agent_pb2.FieldViolation(field=field_path,
                                         description=f"this host has no {name} hugepage pool")]
    needed = config.memory.size_bytes // size
    if free < needed:
        return [agent_pb2.FieldViolation(
            field=field_path, description=f"the VM needs {needed} free {name} hugepages; "
                                          f"this host has {free}")]
    return []
