"""Hotplug on a running QEMU VM, on the q35 machine only (see config).

vCPUs are added with device_add of free CPU slots, memory as pc-dimm devices, disks and
NICs on spare PCIe root ports. Removing anything needs the guest to release it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import json_format

from agent.hypervisors.qmp import QmpClient
from agent.runtimes.base import RuntimeFailure
from agent.runtimes.qemu import record
from agent.runtimes.qemu.config import (
    MAX_DISKS,
    MAX_NICS,
    MIB,
    Machine,
    disk_ids,
    disk_violations,
    hugepage_size,
    nic_ids,
    nic_violations,
    parse_cpu_list,
    qemu_id,
    raise_violations,
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
from vmm.agent.v1 import agent_pb2
from vmm.v1 import vm_pb2

log = logging.getLogger(__name__)

# Seconds a guest gets to release a device asked to be removed.
_UNPLUG_TIMEOUT = 10.0


async def apply_hotplug(vm: VmDir, request: agent_pb2.HotplugRequest) -> vm_pb2.VmConfig:
    """Carry out one hotplug request on the VM's running QEMU; the VmConfig it runs after."""
    change = request.WhichOneof("change")
    data = vm.load_runtime()
    config = record.running_config(vm)
    if data.get(record.MACHINE) != Machine.Q35:
        key = _hotplug_feature(request)
        raise RuntimeFailure(
            f"{features.FEATURES_BY_KEY[key].title} on qemu needs the q35 machine; VM "
            f"{vm.vm_id} runs on {data.get(record.MACHINE, 'an unknown machine')} (create it with "
            "boot_options machine=q35, or with max_vcpu_count/max_size_bytes above its "
            "size)")
    async with QmpClient(vm.api_socket, timeout=_UNPLUG_TIMEOUT + 5) as qmp:
        if change == "resize":
            await _resize(vm, qmp, config, request.resize)
        elif change == "attach_disk":
            await _attach_disk(vm, qmp, config, request.attach_disk)
        elif change == "detach_disk":
            await _detach_disk(vm, qmp, config, request.detach_disk)
        elif change == "attach_nic":
            await _attach_nic(vm, qmp, config, request.attach_nic)
        elif change == "detach_nic":
            await _detach_nic(vm, qmp, config, request.detach_nic)
        else:
            raise RuntimeFailure("the hotplug request names no change", "INVALID_ARGUMENT")
    record.update(vm, **{record.CONFIG: json_format.MessageToDict(config)})
    return config


async def pin_vcpus(vm: VmDir, qmp: QmpClient, config: vm_pb2.VmConfig) -> None:
    """Pin every vCPU thread to the host CPUs the config's cpu affinity names, if any."""
    cpus = parse_cpu_list(config.cpu.features.get(features.CPU_AFFINITY_KEY, ""))
    if not cpus:
        return
    for vcpu in await qmp.execute("query-cpus-fast") or []:
        try:
            os.sched_setaffinity(int(vcpu["thread-id"]), cpus)
        except OSError as e:
            raise RuntimeFailure(f"VM {vm.vm_id}: cannot pin vCPU {vcpu.get('cpu-index')} "
                                 f"to host CPUs {sorted(cpus)}: {e}") from e


async def _resize(vm: VmDir, qmp: QmpClient, config: vm_pb2.VmConfig,
                  resize: vm_pb2.ResizeVmRequest) -> None:
    if resize.vcpu_count and resize.vcpu_count != config.cpu.vcpu_count:
        await _resize_vcpus(vm, qmp, config, resize.vcpu_count)
    if resize.memory_size_bytes and resize.memory_size_bytes != config.memory.size_bytes:
        await _resize_memory(qmp, config, resize.memory_size_bytes)


async def _resize_vcpus(vm: VmDir, qmp: QmpClient, config: vm_pb2.VmConfig,
                        wanted: int) -> None:
    slots = await qmp.execute("query-hotpluggable-cpus") or []
    ceiling = len(slots)
    if not 1 <= wanted <= ceiling:
        raise RuntimeFailure(f"vcpu_count {wanted} is outside 1-{ceiling} (max_vcpu_count)",
                             "INVALID_ARGUMENT")
    plugged = [s for s in slots if s.get("qom-path")]
    if wanted > len(plugged):
        free = [s for s in slots if not s.get("qom-path")]
        # QEMU lists slots from the highest id down; plug the lowest first.
        free.sort(key=lambda s: tuple(sorted(s.get("props", {}).items())))
        for slot in free[:wanted - len(plugged)]:
            props = slot.get("props", {})
            await qmp.execute("device_add", {
                "driver": slot["type"], "id": _vcpu_device_id(props), **props})
        await pin_vcpus(vm, qmp, config)
    elif wanted < len(plugged):
        ours = sorted((s for s in plugged if "/peripheral/" in s["qom-path"]),
                      key=lambda s: s["qom-path"], reverse=True)
        excess = len(plugged) - wanted
        if len(ours) < excess:
            raise RuntimeFailure(
                f"only vCPUs added at runtime can be removed: VM {vm.vm_id} booted with "
                f"{len(plugged) - len(ours)}")
        for slot in ours[:excess]:
            await _unplug(qmp, slot["qom-path"].rsplit("/", 1)[-1])
    config.cpu.vcpu_count = wanted


async def _resize_memory(qmp: QmpClient, config: vm_pb2.VmConfig,
                         wanted: int) -> None:
    if wanted % MIB:
        raise RuntimeFailure(f"memory_size_bytes {wanted} is not a whole number of MiB",
                             "INVALID_ARGUMENT")
    ceiling = max(config.memory.max_size_bytes, config.memory.size_bytes)
    if wanted > ceiling:
        raise RuntimeFailure(f"memory_size_bytes {wanted} is above max_size_bytes "
                             f"{ceiling}", "INVALID_ARGUMENT")
    dimms = [d["data"] for d in await qmp.execute("query-memory-devices") or []
             if d.get("type") == "dimm"]
    current = config.memory.size_bytes
    if wanted > current:
        page = hugepage_size(config) or 2 * MIB
        if (wanted - current) % page:
            raise RuntimeFailure(f"memory can grow only in multiples of {page // MIB} MiB",
                                 "INVALID_ARGUMENT")
        index = len(dimms)
        while any(d.get("id") == f"dimm{index}" for d in dimms):
            index += 1
        backend = memory_backend(f"mem-dimm{index}", wanted - current, config)
        await qmp.execute("object-add", backend)
        await qmp.execute("device_add", {"driver": "pc-dimm", "id": f"dimm{index}",
                                         "memdev": backend["id"]})
    else:
        # Remove the most recent DIMMs that together make up the difference exactly.
        remaining, chosen = current - wanted, []
        for dimm in sorted(dimms, key=lambda d: d.get("addr", 0), reverse=True):
            if remaining <= 0:
                break
            chosen.append(dimm)
            remaining -= int(dimm.get("size", 0))
        if remaining != 0:
            raise RuntimeFailure(
                "qemu can only remove whole hot-added DIMMs: no set of the most recent "
                f"ones adds up to the {current - wanted} bytes asked for")
        for dimm in chosen:
            await _unplug(qmp, str(dimm["id"]))
            await qmp.execute("object-del", {"id": str(dimm["memdev"]).rsplit("/", 1)[-1]})
    config.memory.size_bytes = wanted


async def _attach_disk(vm: VmDir, qmp: QmpClient, config: vm_pb2.VmConfig,
                       disk: vm_pb2.StorageDevice) -> None:
    disk_id = disk.id or f"disk{len(config.storage)}"
    if disk_id in disk_ids(config.storage):
        raise RuntimeFailure(f"VM {vm.vm_id} already has a disk {disk_id!r}",
                             "ALREADY_EXISTS")
    # The agent's host path policy has already allowed and resolved the disk's path.
    raise_violations(disk_violations(disk, "device"))
    if len(config.storage) >= MAX_DISKS:
        raise RuntimeFailure(f"VM {vm.vm_id} already has {MAX_DISKS} disks",
                             "RESOURCE_EXHAUSTED")
    device_qemu_id = qemu_id("disk", disk_id)
    port = _claim_port(vm, device_qemu_id)
    added: list[tuple[str, dict[str, Any]]] = []
    try:
        if group := disk_throttle_group(disk, disk_id):
            await qmp.execute("object-add", group)
            added.append(("object-del", {"id": group["id"]}))
        await qmp.execute("blockdev-add", disk_blockdev(disk, disk_id))
        added.append(("blockdev-del", {"node-name": device_qemu_id}))
        await qmp.execute("device_add", disk_device(disk, disk_id, Machine.Q35, port))
    except BaseException:
        await _undo(qmp, added)
        _release_port(vm, device_qemu_id)
        raise
    stored = config.storage.add()
    stored.CopyFrom(disk)
    stored.id = disk_id


async def _detach_disk(vm: VmDir, qmp: QmpClient, config: vm_pb2.VmConfig,
                       disk_id: str) -> None:
    ids = disk_ids(config.storage)
    if disk_id not in ids:
        raise RuntimeFailure(f"VM {vm.vm_id} has no disk {disk_id!r}", "NOT_FOUND")
    index = ids.index(disk_id)
    disk = config.storage[index]
    await _unplug(qmp, qemu_id("disk", disk_id))
    await qmp.execute("blockdev-del", {"node-name": qemu_id("disk", disk_id)})
    if disk_throttle_group(disk, disk_id):
        await qmp.execute("object-del", {"id": qemu_id("throttle", disk_id)})
    _release_port(vm, qemu_id("disk", disk_id))
    del config.storage[index]


async def _attach_nic(vm: VmDir, qmp: QmpClient, config: vm_pb2.VmConfig,
                      nic: vm_pb2.NetworkInterface) -> None:
    nic_id = nic.id or f"eth{len(config.network)}"
    if nic_id in nic_ids(config.network):
        raise RuntimeFailure(f"VM {vm.vm_id} already has a NIC {nic_id!r}", "ALREADY_EXISTS")
    raise_violations(nic_violations(nic, "interface"))
    if len(config.network) >= MAX_NICS:
        raise RuntimeFailure(f"VM {vm.vm_id} already has {MAX_NICS} NICs",
                             "RESOURCE_EXHAUSTED")
    device_qemu_id = qemu_id("nic", nic_id)
    port = _claim_port(vm, device_qemu_id)
    chardev, netdev = nic_backend(nic, nic_id)
    added: list[tuple[str, dict[str, Any]]] = []
    try:
        if chardev:
            await qmp.execute("chardev-add", chardev)
            added.append(("chardev-remove", {"id": chardev["id"]}))
        if netdev:
            await qmp.execute("netdev_add", netdev)
            added.append(("netdev_del", {"id": netdev["id"]}))
        await qmp.execute("device_add", nic_device(nic, nic_id, Machine.Q35, port))
    except BaseException:
        await _undo(qmp, added)
        _release_port(vm, device_qemu_id)
        raise
    stored = config.network.add()
    stored.CopyFrom(nic)
    stored.id = nic_id


async def _detach_nic(vm: VmDir, qmp: QmpClient, config: vm_pb2.VmConfig,
                      nic_id: str) -> None:
    ids = nic_ids(config.network)
    if nic_id not in ids:
        raise RuntimeFailure(f"VM {vm.vm_id} has no NIC {nic_id!r}", "NOT_FOUND")
    index = ids.index(nic_id)
    chardev, netdev = nic_backend(config.network[index], nic_id)
    await _unplug(qmp, qemu_id("nic", nic_id))
    if netdev:
        await qmp.execute("netdev_del", {"id": netdev["id"]})
    if chardev:
        await qmp.execute("chardev-remove", {"id": chardev["id"]})
    _release_port(vm, qemu_id("nic", nic_id))
    del config.network[index]


def _claim_port(vm: VmDir, device_qemu_id: str) -> str:
    data = vm.load_runtime()
    ports: dict[str, str] = dict(data.get(record.PORTS, {}))
    used = set(ports.values())
    for i in range(int(data.get(record.PORT_COUNT, 0))):
        if root_port_id(i) not in used:
            ports[device_qemu_id] = root_port_id(i)
            record.update(vm, **{record.PORTS: ports})
            return root_port_id(i)
    raise RuntimeFailure(f"VM {vm.vm_id} has no free PCIe port left for hotplug",
                         "RESOURCE_EXHAUSTED")


def _release_port(vm: VmDir, device_qemu_id: str) -> None:
    ports = dict(vm.load_runtime().get(record.PORTS, {}))
    if ports.pop(device_qemu_id, None) is not None:
        record.update(vm, **{record.PORTS: ports})


async def _unplug(qmp: QmpClient, device_id: str) -> None:
    """device_del, then wait for the guest to release the device (DEVICE_DELETED)."""
    await qmp.execute("device_del", {"id": device_id})
    deadline = time.monotonic() + _UNPLUG_TIMEOUT
    while time.monotonic() < deadline:
        try:
            event = await qmp.wait_event("DEVICE_DELETED", deadline - time.monotonic())
        except TimeoutError:
            break
        if event.data.get("device") == device_id:
            return
    raise RuntimeFailure(f"the guest did not release {device_id} within {_UNPLUG_TIMEOUT:g}s; "
                         "QEMU removes it once the guest does", "DEADLINE_EXCEEDED")


async def _undo(qmp: QmpClient, added: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Remove what a failed attach had added, most recent first."""
    for command, arguments in reversed(added):
        try:
            await qmp.execute(command, arguments)
        except RuntimeFailure as e:
            log.warning("hotplug_undo_failed command=%s error=%s", command, e.message)


def _vcpu_device_id(props: Mapping[str, Any]) -> str:
    return "vcpu-" + "-".join(f"{k.removesuffix('-id')}{v}" for k, v in sorted(props.items()))


def _hotplug_feature(request: agent_pb2.HotplugRequest) -> str:
    change = request.WhichOneof("change")
    if change == "resize":
        return "memory.hotplug" if not request.resize.vcpu_count else "cpu.hotplug"
    return "storage.hotplug" if change in {"attach_disk", "detach_disk"} else "network.hotplug"
