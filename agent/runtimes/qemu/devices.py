"""A VM's devices as QEMU objects: block nodes, virtio devices, netdevs, memory backends.

The same dictionaries build the command line and the hotplug QMP commands, so a
disk attached at runtime is configured exactly like one present at boot.
"""

from __future__ import annotations

from typing import Any

from agent.runtimes.base import positive_int
from agent.runtimes.qemu.config import (
    CACHE_TYPES,
    IO_ENGINES,
    Machine,
    NicKind,
    hugepage_size,
    nic_kind,
    qemu_id,
    shared_memory,
)
from vmm.v1 import vm_pb2


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
    direct, no_flush, _ = CACHE_TYPES.get(options.get("cache_type", "writeback"),
                                          CACHE_TYPES["writeback"])
    if "direct" in options:
        direct = _flag(options["direct"])
    aio = IO_ENGINES.get(options.get("io_engine", ""), "threads")
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
    _, _, write_cache = CACHE_TYPES.get(options.get("cache_type", "writeback"),
                                        CACHE_TYPES["writeback"])
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


def _flag(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}
