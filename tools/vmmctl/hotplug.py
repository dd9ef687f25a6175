"""vmmctl's hotplug commands: resize a running VM, attach and detach its disks and NICs."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from tools.vmmctl import render
from tools.vmmctl.connection import controller
from tools.vmmctl.inputs import memory_size_option
from tools.vmmctl.output import report, state_summary
from tools.vmmctl.vms import VmIdArg
from vmm.v1 import vm_pb2


def resize(
    ctx: typer.Context,
    vm_id: VmIdArg,
    vcpus: Annotated[int | None, typer.Option("--vcpus", min=1, show_default=False,
                                              help="New vCPU count.")] = None,
    memory: Annotated[int | None, typer.Option(
        "--memory", parser=memory_size_option, metavar="SIZE", show_default=False,
        help="New memory size: 2GiB, 512MiB or bytes.")] = None,
) -> None:
    """Change a running VM's vCPUs or memory (hotplug)."""
    if vcpus is None and memory is None:
        raise typer.BadParameter("give at least one of them", param_hint="'--vcpus' / '--memory'")
    ctl = controller(ctx)
    response = ctl.call(ctl.vms.ResizeVm, vm_pb2.ResizeVmRequest(
        vm_id=vm_id, vcpu_count=vcpus or 0, memory_size_bytes=memory or 0))
    report(ctx, response, Text(
        f"{vm_id}: resized to {response.vcpu_count} vCPUs, "
        f"{render.format_bytes(response.memory_size_bytes)}"))


def attach_disk(
    ctx: typer.Context,
    vm_id: VmIdArg,
    path: Annotated[str, typer.Option("--path", show_default=False,
                                      help="Disk image or block device on the host.")],
    disk_id: Annotated[str, typer.Option("--id", help="Device id; the server picks one "
                                                      "when omitted.")] = "",
    read_only: Annotated[bool, typer.Option("--read-only")] = False,
) -> None:
    """Hotplug a disk into a running VM."""
    ctl = controller(ctx)
    device = vm_pb2.StorageDevice(id=disk_id, path=path, read_only=read_only)
    response = ctl.call(ctl.vms.AttachDisk, vm_pb2.AttachDiskRequest(vm_id=vm_id, device=device))
    report(ctx, response, state_summary(vm_id, f"attached disk {disk_id or path}",
                                          response.state))


def detach_disk(ctx: typer.Context, vm_id: VmIdArg,
                disk_id: Annotated[str, typer.Argument(help="The disk's id.")]) -> None:
    """Unplug a disk from a running VM."""
    ctl = controller(ctx)
    response = ctl.call(ctl.vms.DetachDisk,
                        vm_pb2.DetachDiskRequest(vm_id=vm_id, device_id=disk_id))
    report(ctx, response, state_summary(vm_id, f"detached disk {disk_id}", response.state))


def attach_nic(
    ctx: typer.Context,
    vm_id: VmIdArg,
    tap: Annotated[str, typer.Option("--tap", show_default=False, help="TAP device name.")],
    nic_id: Annotated[str, typer.Option("--id", help="Interface id; the server picks one "
                                                     "when omitted.")] = "",
    mac: Annotated[str, typer.Option("--mac", help="Guest MAC address.")] = "",
) -> None:
    """Hotplug a network interface into a running VM."""
    ctl = controller(ctx)
    nic = vm_pb2.NetworkInterface(id=nic_id, tap_device=tap, mac_address=mac)
    response = ctl.call(ctl.vms.AttachNetworkInterface,
                        vm_pb2.AttachNetworkInterfaceRequest(vm_id=vm_id, interface=nic))
    report(ctx, response, state_summary(vm_id, f"attached interface {nic_id or tap}",
                                          response.state))


def detach_nic(ctx: typer.Context, vm_id: VmIdArg,
               nic_id: Annotated[str, typer.Argument(help="The interface's id.")]) -> None:
    """Unplug a network interface from a running VM."""
    ctl = controller(ctx)
    response = ctl.call(ctl.vms.DetachNetworkInterface,
                        vm_pb2.DetachNetworkInterfaceRequest(vm_id=vm_id, interface_id=nic_id))
    report(ctx, response, state_summary(vm_id, f"detached interface {nic_id}",
                                          response.state))
