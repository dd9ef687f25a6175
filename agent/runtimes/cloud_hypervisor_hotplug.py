"""Hotplug on a running Cloud Hypervisor VM: vm.resize for vCPUs and memory (ACPI hot-add),
vm.add-disk / vm.add-net / vm.add-device and vm.remove-device for devices."""

from __future__ import annotations

from typing import Any, cast

from agent.hypervisors.cloud_hypervisor_api import (
    CloudHypervisorApi,
    CloudHypervisorApiError,
    DeviceJson,
    NetJson,
    VmInfo,
)
from agent.runtimes.base import RuntimeFailure
from agent.runtimes.cloud_hypervisor_config import disk_to_attach, nic_to_attach, running_config
from agent.vm_dir import VmDir
from vmm.agent.v1 import agent_pb2
from vmm.v1 import vm_pb2


async def apply_hotplug(vm: VmDir, api: CloudHypervisorApi, recorded: vm_pb2.VmConfig,
                        request: agent_pb2.HotplugRequest) -> vm_pb2.VmConfig:
    """Make the change on the running VM; its config as it runs afterwards. `recorded` is
    the config the VM runs with (an attached device joins it)."""
    change = request.WhichOneof("change")
    before = await api.vm_info()
    if change == "resize":
        await _resize(vm, api, before, request.resize)
    elif change == "attach_disk":
        recorded.storage.append(request.attach_disk)
        await api.add_disk(disk_to_attach(recorded))
    elif change == "attach_nic":
        recorded.network.append(request.attach_nic)
        nic = nic_to_attach(recorded)
        if "path" in nic:
            await api.add_device(cast(DeviceJson, nic))
        else:
            await api.add_net(cast(NetJson, nic))
    elif change == "detach_disk":
        await _detach(vm, api, before, request.detach_disk, ("disks",), "disk")
    elif change == "detach_nic":
        await _detach(vm, api, before, request.detach_nic, ("net", "devices"),
                      "network interface")
    else:
        raise RuntimeFailure("the hotplug request names no change", "INVALID_ARGUMENT")
    return running_config(recorded, await api.vm_info())


async def _detach(vm: VmDir, api: CloudHypervisorApi, info: VmInfo, device_id: str,
                  kinds: tuple[str, ...], what: str) -> None:
    if device_id not in {d.get("id") for kind in kinds for d in info.devices(kind)}:
        raise RuntimeFailure(f"VM {vm.vm_id} has no {what} with id {device_id!r}", "NOT_FOUND")
    await api.remove_device(device_id)


async def _resize(vm: VmDir, api: CloudHypervisorApi, info: VmInfo,
                  resize: vm_pb2.ResizeVmRequest) -> None:
    cpus, memory = info.config.get("cpus") or {}, info.config.get("memory") or {}
    vcpus = resize.vcpu_count or None
    if vcpus is not None and vcpus > int(cpus.get("max_vcpus", 0)):
        raise RuntimeFailure(
            f"vcpu_count {vcpus} exceeds the VM's max_vcpu_count "
            f"{cpus.get('max_vcpus')}: Cloud Hypervisor hot-adds vCPUs only up to "
            "config.cpu.max_vcpu_count, set when the VM is created", "INVALID_ARGUMENT")
    ram = resize.memory_size_bytes or None
    if ram is not None and ram != int(memory.get("size", 0)):
        _check_memory_resize(vm, memory, ram)
    try:
        await api.resize(desired_vcpus=vcpus, desired_ram=ram)
    except CloudHypervisorApiError as e:
        if e.status != 429:
            raise
        # A vCPU removal stays pending until the guest ejects the vCPUs (ACPI CPU
        # hotplug); one that has no CPU hotplug never does.
        raise RuntimeFailure(
            f"VM {vm.vm_id} still has a vCPU removal pending: the guest has not ejected "
            "the vCPUs an earlier resize took away, and Cloud Hypervisor refuses every "
            "vCPU resize until it does (a guest without ACPI CPU hotplug never does; "
            "reboot it to apply the new count)", "FAILED_PRECONDITION") from e


def _check_memory_resize(vm: VmDir, memory: dict[str, Any], ram: int) -> None:
    if memory.get("zones"):
        raise RuntimeFailure("memory hotplug is not available for a VM with NUMA nodes "
                             "on cloud-hypervisor", "FAILED_PRECONDITION")
    maximum = int(vm.load_runtime().get("max_memory_bytes") or 0)
    if "hotplug_size" not in memory or not maximum:
        raise RuntimeFailure("memory hotplug needs config.memory.hotplug_enabled and a "
                             "config.memory.max_size_bytes above size_bytes when the VM is "
                             "created", "INVALID_ARGUMENT")
    if ram > maximum:
        raise RuntimeFailure(f"memory_size_bytes {ram} exceeds the VM's max_size_bytes "
                             f"{maximum} (config.memory.max_size_bytes)", "INVALID_ARGUMENT")
    if ram < int(memory.get("size", 0)):
        raise RuntimeFailure("Cloud Hypervisor cannot take ACPI-hotplugged memory back from "
                             "a running guest; memory_size_bytes may only grow",
                             "INVALID_ARGUMENT")
