"""A device plugged into (or pulled from) a running VM, as the agent carries it out around
the runtime's own hotplug: host paths checked and resolved first, a new NIC's TAP made
before the device and a removed NIC's TAP removed after it."""

from __future__ import annotations

from agent.host_paths import HostPathPolicy, refuse
from agent.network.host import HostNetwork
from agent.runtimes.base import Runtime
from agent.vm_dir import VmDir
from vmm.agent.v1 import agent_pb2
from vmm.v1 import vm_pb2


def with_allowed_paths(host_paths: HostPathPolicy, request: agent_pb2.HotplugRequest
                       ) -> agent_pb2.HotplugRequest:
    """A copy of the request with the host path it names allowed and resolved."""
    allowed = agent_pb2.HotplugRequest()
    allowed.CopyFrom(request)
    violations: list[agent_pb2.FieldViolation] = []
    if request.HasField("attach_disk"):
        disk, violations = host_paths.resolved_disk(request.attach_disk, "device")
        allowed.attach_disk.CopyFrom(disk)
    elif request.HasField("attach_nic"):
        nic, violations = host_paths.resolved_nic(request.attach_nic, "interface")
        allowed.attach_nic.CopyFrom(nic)
    refuse(violations)
    return allowed


async def with_network(network: HostNetwork | None, runtime: Runtime, vm: VmDir,
                       desired: agent_pb2.DesiredVm,
                       request: agent_pb2.HotplugRequest) -> vm_pb2.VmConfig:
    """The runtime's hotplug, with a new NIC's TAP made before the device and a removed
    NIC's TAP removed after it: the VM's config as it now runs."""
    if network is None or request.WhichOneof("change") not in ("attach_nic", "detach_nic"):
        return await runtime.hotplug(vm, request)
    if request.HasField("attach_nic"):
        resolved = agent_pb2.HotplugRequest()
        resolved.CopyFrom(request)
        nic = await network.attach_nic(vm.vm_id, request.attach_nic,
                                       len(desired.config.network), runtime)
        resolved.attach_nic.CopyFrom(nic)
        try:
            return await runtime.hotplug(vm, resolved)
        except BaseException:
            await network.release_nic(vm.vm_id, nic.id)
            raise
    config = await runtime.hotplug(vm, request)
    await network.release_nic(vm.vm_id, request.detach_nic)
    return config
