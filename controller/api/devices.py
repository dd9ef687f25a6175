"""VmService hotplug RPCs: resize a running VM, attach and detach its disks and NICs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc

from controller import validation
from controller.api.operations import S, VmOperations, api_method, raise_for_reply, state_name
from controller.errors import (
    ApiError,
    Violation,
    failed_precondition,
    invalid,
    invalid_field,
)
from controller.networks import Networks
from controller.placement import Placer
from controller.vm_cache import namespace_of
from vmm.agent.v1 import agent_pb2
from vmm.store.v1 import records_pb2
from vmm.v1 import vm_pb2

Device = TypeVar("Device", vm_pb2.StorageDevice, vm_pb2.NetworkInterface)


def check_new_device(check: Callable[[list[Device], str], list[Violation]],
                     existing: Sequence[Device], device: Device, list_path: str, field: str,
                     noun: str) -> None:
    """Validate a device to hot-add as if it were appended to the VM's config at list_path
    (ids stay unique, one root disk), naming the request's own field in errors."""
    if bounds := validation.check_bounds(device, field):
        raise invalid(bounds)
    if len(existing) >= validation.MAX_DEVICES:
        raise invalid([Violation(field, f"the VM has {len(existing)} already, the limit")])
    prefix = f"{list_path}[{len(existing)}]"
    devices = list(existing)
    devices.append(device)
    violations = [Violation(v.field.replace(prefix, field), v.description)
                  for v in check(devices, list_path) if v.field.startswith(prefix)]
    if not device.id:
        violations.append(Violation(f"{field}.id", f"is required to detach the {noun} later"))
    if violations:
        raise invalid(violations)


def remove_by_id(devices: Any, device_id: str) -> None:
    """Drop the device with this id from a repeated field, keeping the others' order."""
    keep = [d for d in devices if d.id != device_id]
    del devices[:]
    devices.extend(keep)


class DeviceRpcs:
    """VmService mixin: changes the agent applies to a running VM in place."""

    ops: VmOperations
    networks: Networks
    placer: Placer

    async def _hotplug(self, vm_id: str, feature_key: str,
                       request: agent_pb2.HotplugRequest,
                       update: Callable[[records_pb2.VmRecord], None]) -> vm_pb2.VmState.ValueType:
        # A boot still under way is waited for: the VM is about to be running.
        stored = await self.ops.settled(vm_id, "change", self.ops.settings.operation_timeout)
        record = stored.record
        caps = self.ops.fleet.capabilities(record.host_id, record.backend)
        if caps is not None and (msg := validation.required_feature(caps, feature_key)):
            raise failed_precondition(msg)
        state = self.ops.current_state(record)
        if state not in (S.VM_STATE_RUNNING, S.VM_STATE_PAUSED):
            raise failed_precondition(f"cannot change vm {vm_id} while it is {state_name(state)}; "
                                      "hotplug needs a running VM")
        session = self.ops.hub.host_of(record.host_id)
        if session is None:
            raise ApiError(grpc.StatusCode.UNAVAILABLE,
                           f"host {record.host_id} of vm {vm_id} is not connected here")
        request.vm_id = vm_id
        reply = await self.ops.call(session, agent_pb2.Request(hotplug=request))
        raise_for_reply(reply)

        def follow(r: records_pb2.VmRecord) -> None:
            # The desired config follows the change so that a restart recreates the VM as it
            # is now. The generation is not bumped: the agent already runs this config.
            if reply.hotplug.HasField("config"):
                r.config.CopyFrom(reply.hotplug.config)
            else:
                update(r)

        written = await self.ops.store.mutate_vm(vm_id, follow)
        if written is not None:
            self.ops.cache.note_write(written)
        return reply.hotplug.state or state

    @api_method
    async def ResizeVm(self, request: vm_pb2.ResizeVmRequest,
                       context: grpc.aio.ServicerContext) -> vm_pb2.ResizeVmResponse:
        record = (await self.ops.get(request.vm_id)).record
        violations = []
        if request.vcpu_count < 0:
            violations.append(Violation("vcpu_count", "must not be negative"))
        if request.memory_size_bytes < 0:
            violations.append(Violation("memory_size_bytes", "must not be negative"))
        elif request.memory_size_bytes % validation.MIB:
            violations.append(Violation("memory_size_bytes", "is not a whole number of MiB"))
        if not request.vcpu_count and not request.memory_size_bytes:
            violations.append(Violation("vcpu_count", "give vcpu_count, memory_size_bytes or both"))
        if violations:
            raise invalid(violations)
        key = "cpu.hotplug" if request.vcpu_count else "memory.hotplug"
        caps = self.ops.fleet.capabilities(record.host_id, record.backend)
        if caps is not None:
            for needed, asked in (("cpu.hotplug", request.vcpu_count),
                                  ("memory.hotplug", request.memory_size_bytes)):
                if asked and (msg := validation.required_feature(caps, needed)):
                    raise failed_precondition(msg)
        cpu_max = record.config.cpu.max_vcpu_count or record.config.cpu.vcpu_count
        if request.vcpu_count > cpu_max:
            raise invalid_field("vcpu_count", f"{request.vcpu_count} exceeds the VM's "
                                f"max_vcpu_count of {cpu_max}")
        mem_max = record.config.memory.max_size_bytes or record.config.memory.size_bytes
        if request.memory_size_bytes > mem_max:
            raise invalid_field("memory_size_bytes", f"{request.memory_size_bytes} exceeds the "
                                f"VM's max_size_bytes of {mem_max}")

        def update(r: records_pb2.VmRecord) -> None:
            if request.vcpu_count:
                r.config.cpu.vcpu_count = request.vcpu_count
            if request.memory_size_bytes:
                r.config.memory.size_bytes = request.memory_size_bytes

        state = await self._hotplug(request.vm_id, key,
                                    agent_pb2.HotplugRequest(resize=request), update)
        now_cfg = (await self.ops.get(request.vm_id)).record.config
        return vm_pb2.ResizeVmResponse(success=True, state=state,
                                       vcpu_count=now_cfg.cpu.vcpu_count,
                                       memory_size_bytes=now_cfg.memory.size_bytes)

    @api_method
    async def AttachDisk(self, request: vm_pb2.AttachDiskRequest,
                         context: grpc.aio.ServicerContext) -> vm_pb2.AttachDiskResponse:
        record = (await self.ops.get(request.vm_id)).record
        check_new_device(validation.check_storage, record.config.storage, request.device,
                         "config.storage", "device", "disk")
        self._refuse_shared_image(record, request.device)
        # Held from the check (no await between) until the record has it: a concurrent
        # create or attach on this replica sees it meanwhile.
        claim = self.placer.claim_disk(record.host_id, record.vm_id, namespace_of(record),
                                       request.device)

        def update(r: records_pb2.VmRecord) -> None:
            r.config.storage.append(request.device)

        try:
            state = await self._hotplug(request.vm_id, "storage.hotplug",
                                        agent_pb2.HotplugRequest(attach_disk=request.device),
                                        update)
        finally:
            self.placer.release_disks([claim], record.vm_id)
        return vm_pb2.AttachDiskResponse(success=True, state=state)

    def _refuse_shared_image(self, record: records_pb2.VmRecord,
                             disk: vm_pb2.StorageDevice) -> None:
        """What CreateVm refuses of a config's disks (see Placer.disk_conflict), for a disk
        plugged into a VM that runs: an image one of the two would write, whether the other
        is a disk of this VM or of another VM on its host."""
        for i, own in enumerate(record.config.storage):
            if own.path == disk.path and not (own.read_only and disk.read_only):
                raise invalid_field("device.path", f"{disk.path!r} is already "
                                    f"config.storage[{i}] of vm {record.vm_id}; an image "
                                    "written by one disk cannot be another")
        conflict = self.placer.disk_conflict(record.host_id, record.vm_id,
                                             namespace_of(record), disk, "device.path")
        if conflict is not None:
            raise invalid([conflict])

    @api_method
    async def DetachDisk(self, request: vm_pb2.DetachDiskRequest,
                         context: grpc.aio.ServicerContext) -> vm_pb2.DetachDiskResponse:
        record = (await self.ops.get(request.vm_id)).record
        if not any(d.id == request.device_id for d in record.config.storage):
            raise ApiError(grpc.StatusCode.NOT_FOUND,
                           f"vm {request.vm_id} has no disk "
                           f"{validation.shown(request.device_id)}")

        def update(r: records_pb2.VmRecord) -> None:
            remove_by_id(r.config.storage, request.device_id)

        state = await self._hotplug(request.vm_id, "storage.hotplug",
                                    agent_pb2.HotplugRequest(detach_disk=request.device_id), update)
        return vm_pb2.DetachDiskResponse(success=True, state=state)

    @api_method
    async def AttachNetworkInterface(self, request: vm_pb2.AttachNetworkInterfaceRequest,
                                     context: grpc.aio.ServicerContext
                                     ) -> vm_pb2.AttachNetworkInterfaceResponse:
        record = (await self.ops.get(request.vm_id)).record
        check_new_device(validation.check_network, record.config.network, request.interface,
                         "config.network", "interface", "interface")
        nic = vm_pb2.NetworkInterface()
        nic.CopyFrom(request.interface)
        if nic.network:
            network = self.networks.get(nic.network)
            host = self.ops.fleet.index.get(record.host_id)
            if network is not None and host is not None and network.bridge not in host.bridges:
                raise failed_precondition(f"host {record.host_id} of vm {record.vm_id} has no "
                                          f"bridge {network.bridge} for network {nic.network}")
            violation = await self.networks.attach_nic(record.vm_id, nic, nic.id,
                                                       "interface.network")
            if violation:
                raise invalid([violation])

        def update(r: records_pb2.VmRecord) -> None:
            r.config.network.append(nic)

        try:
            state = await self._hotplug(request.vm_id, "network.hotplug",
                                        agent_pb2.HotplugRequest(attach_nic=nic), update)
        except BaseException:
            await self.networks.release([nic])
            raise
        return vm_pb2.AttachNetworkInterfaceResponse(success=True, state=state)

    @api_method
    async def DetachNetworkInterface(self, request: vm_pb2.DetachNetworkInterfaceRequest,
                                     context: grpc.aio.ServicerContext
                                     ) -> vm_pb2.DetachNetworkInterfaceResponse:
        record = (await self.ops.get(request.vm_id)).record
        detached = [n for n in record.config.network if n.id == request.interface_id]
        if not detached:
            raise ApiError(grpc.StatusCode.NOT_FOUND,
                           f"vm {request.vm_id} has no network interface "
                           f"{validation.shown(request.interface_id)}")

        def update(r: records_pb2.VmRecord) -> None:
            remove_by_id(r.config.network, request.interface_id)

        state = await self._hotplug(request.vm_id, "network.hotplug",
                                    agent_pb2.HotplugRequest(detach_nic=request.interface_id),
                                    update)
        await self.networks.release(detached)
        return vm_pb2.DetachNetworkInterfaceResponse(success=True, state=state)
