"""A VmConfig as Firecracker takes it: the pre-boot API bodies, the refusals of what the
binary cannot hold, and the ids and instance name the runtime gives each VM."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.hypervisors.firecracker_api import (
    BootSource,
    Drive,
    MachineConfig,
    NetworkInterface,
    RateLimiter,
    TokenBucket,
)
from agent.runtimes.base import (
    RuntimeFailure,
    positive_int,
)
from vmm import features
from vmm.agent.v1 import agent_pb2
from vmm.v1 import vm_pb2

log = logging.getLogger(__name__)



MIB = 1024 * 1024
# Bytes of Firecracker's guest kernel command line, its terminating NUL included.
CMDLINE_CAPACITY = 2048
# VmConfig options that map onto Firecracker's API, per device kind.
DISK_OPTIONS = ("cache_type", "io_engine", "rate_limit_bandwidth", "rate_limit_ops")
NIC_OPTIONS = ("rate_limit_bandwidth", "rate_limit_ops")


@dataclass(frozen=True)
class FirecrackerConfig:
    """A VmConfig as the sequence of pre-boot API bodies that configure it."""

    machine: MachineConfig
    boot: BootSource
    drives: tuple[Drive, ...]
    nics: tuple[NetworkInterface, ...]
    # What the guest reads from MMDS (each NIC's address), served on the NICs that have one.
    mmds: dict[str, Any] | None = None
    mmds_interfaces: tuple[str, ...] = ()


def drive_ids(storage: Sequence[vm_pb2.StorageDevice]) -> list[str]:
    """Stable Firecracker drive ids: the device id, else "rootfs" / "disk<index>"."""
    return [d.id or ("rootfs" if d.is_root_device else f"disk{i}") for i, d in enumerate(storage)]


def nic_ids(network: Sequence[vm_pb2.NetworkInterface]) -> list[str]:
    return [n.id or f"eth{i}" for i, n in enumerate(network)]


def firecracker_cmdline_additions(config: vm_pb2.VmConfig) -> int:
    """Bytes Firecracker adds to the boot args at InstanceStart: " pci=off", the root
    drive's " root=/dev/vda rw" and a virtio_mmio.device entry (its IRQs from 5) per device."""
    added = len(" pci=off")
    if any(disk.is_root_device for disk in config.storage):
        added += len(" root=/dev/vda rw")
    devices = len(config.storage) + len(config.network)
    return added + sum(len(f" virtio_mmio.device=4K@0xc0001000:{5 + i}") for i in range(devices))


def config_violations(config: vm_pb2.VmConfig) -> list[agent_pb2.FieldViolation]:
    """What in a config Firecracker cannot express, by field path."""
    out: list[agent_pb2.FieldViolation] = []

    def violation(field_path: str, description: str) -> None:
        out.append(agent_pb2.FieldViolation(field=field_path, description=description))

    args_bytes = len(config.boot.kernel_args.encode())
    added = firecracker_cmdline_additions(config)
    if args_bytes + added >= CMDLINE_CAPACITY:
        violation("config.boot.kernel_args",
                  f"{args_bytes} bytes is too long: firecracker's kernel command line holds "
                  f"{CMDLINE_CAPACITY - 1} bytes, and for this VM's devices it adds {added} "
                  "of its own (pci=off, root=, one virtio_mmio.device= per device), which "
                  f"leaves {CMDLINE_CAPACITY - 1 - added}")
    size = config.memory.size_bytes
    if size % MIB:
        violation("config.memory.size_bytes",
                  f"firecracker sizes memory in whole MiB: {size} bytes is not a multiple "
                  f"of {MIB}")
    for kind, options, ids, supported in (
        ("storage", [d.options for d in config.storage], drive_ids(config.storage),
         DISK_OPTIONS),
        ("network", [n.options for n in config.network], nic_ids(config.network), NIC_OPTIONS),
    ):
        seen: set[str] = set()
        for i, (device_options, device_id) in enumerate(zip(options, ids, strict=True)):
            if device_id in seen:
                violation(f"config.{kind}[{i}].id",
                          f"device id {device_id!r} is used twice; firecracker needs unique ids")
            seen.add(device_id)
            for key, value in sorted(device_options.items()):
                path = f"config.{kind}[{i}].options[{key}]"
                if key not in supported:
                    violation(path, f"firecracker does not support the {kind} option {key!r} "
                                    f"(it supports: {', '.join(supported)})")
                elif key.startswith("rate_limit_") and positive_int(value) is None:
                    violation(path, f"expected a positive whole number per second, got {value!r}")
    return out


def reboot_on_panic(config: vm_pb2.VmConfig) -> str:
    """The kernel args with `panic=1` unless they choose: a panicked guest then reboots
    after a second, which ends the Firecracker process, so the agent notices the death
    (the console's panic line tells it from an orderly reboot) rather than only from the
    panic line of a guest hung for good. Left out where the command line has no room."""
    args = config.boot.kernel_args
    longer = f"{args} panic=1"
    if not args.strip() or re.search(r"(^|\s)panic=", args) or \
            len(longer.encode()) + firecracker_cmdline_additions(config) >= CMDLINE_CAPACITY:
        return args
    return longer


def translate(config: vm_pb2.VmConfig) -> FirecrackerConfig:
    """The API bodies for config; RuntimeFailure (INVALID_ARGUMENT) if it cannot be expressed."""
    violations = config_violations(config)
    if violations:
        raise RuntimeFailure("; ".join(f"{v.field}: {v.description}" for v in violations),
                             "INVALID_ARGUMENT")
    boot = config.boot
    return FirecrackerConfig(
        machine=MachineConfig(
            vcpu_count=config.cpu.vcpu_count,
            mem_size_mib=config.memory.size_bytes // MIB,
            gdb_socket_path=boot.boot_options.get(features.GDB_KEY) or None,
        ),
        boot=BootSource(kernel_image_path=boot.kernel_path,
                        # Empty args leave Firecracker's own defaults (panic=1 included).
                        boot_args=reboot_on_panic(config) or None,
                        initrd_path=boot.initrd_path or None),
        drives=tuple(
            Drive(drive_id=drive_id, path_on_host=disk.path,
                  is_root_device=disk.is_root_device, is_read_only=disk.read_only,
                  cache_type=_variant(disk.options.get("cache_type")),
                  io_engine=_variant(disk.options.get("io_engine")),
                  rate_limiter=_rate_limiter(disk.options))
            for disk, drive_id in zip(config.storage, drive_ids(config.storage), strict=True)
        ),
        nics=tuple(
            NetworkInterface(iface_id=iface_id, host_dev_name=nic.tap_device,
                             guest_mac=nic.mac_address or None,
                             # A NIC's limits apply to each direction.
                             rx_rate_limiter=_rate_limiter(nic.options),
                             tx_rate_limiter=_rate_limiter(nic.options))
            for nic, iface_id in zip(config.network, nic_ids(config.network), strict=True)
        ),
        **_mmds(config),
    )


def _mmds(config: vm_pb2.VmConfig) -> dict[str, Any]:
    """The MMDS document telling the guest its NICs' addresses (none without any)."""
    nics = [(iface_id, nic) for nic, iface_id in zip(config.network, nic_ids(config.network),
                                                     strict=True) if nic.ip_address]
    if not nics:
        return {}
    return {"mmds_interfaces": tuple(i for i, _ in nics), "mmds": {"vmm": {"network_interfaces": [
        {"id": iface_id, "mac_address": nic.mac_address, "ip_address": nic.ip_address,
         "gateway": nic.gateway, "mtu": nic.mtu, "network": nic.network}
        for iface_id, nic in nics]}}}


def _variant(value: str | None) -> str | None:
    # Firecracker's enum variants are capitalised ("Writeback", "Async").
    return value.strip().capitalize() if value else None


def _rate_limiter(options: Mapping[str, str]) -> RateLimiter | None:
    bandwidth = positive_int(options.get("rate_limit_bandwidth", ""))
    ops = positive_int(options.get("rate_limit_ops", ""))
    if bandwidth is None and ops is None:
        return None
    return RateLimiter(bandwidth=TokenBucket(bandwidth) if bandwidth else None,
                       ops=TokenBucket(ops) if ops else None)


def instance_id(vm_id: str) -> str:
    """Firecracker's --id accepts 1-64 characters of [A-Za-z0-9-]."""
    return re.sub(r"[^A-Za-z0-9-]", "-", vm_id)[:64] or "vm"


# ---- metrics --------------------------------------------------------------------------
